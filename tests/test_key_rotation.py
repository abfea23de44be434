"""PROTOCOL 2, key rotation: a previous HMAC secret, a JWKS chosen by `kid` and read again when it changes or on
SIGHUP (no connection dropped), a broken file keeping the keys in force, and no algorithm confusion."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from realtime_service.auth.keyset import JwksFile
from realtime_service.auth.tokens import TokenVerifier
from realtime_service.errors import InvalidToken
from tests.support import Seeder
from tests.test_settings_cli import ServerProcess, serve_env

SECRET = "current-secret-" + "c" * 40
PREVIOUS = "previous-secret-" + "p" * 40


def claims(sub: str = "456", ttl: int = 3600) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": sub, "iat": now, "exp": now + ttl}


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str, **extra: Any) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    return {**jwk, "kid": kid, "use": "sig", **extra}


def write_jwks(path: Path, *keys: dict[str, Any]) -> None:
    """Replace the file atomically, as an operator (or a config management tool) would."""
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps({"keys": list(keys)}))
    os.replace(staging, path)


def _part(value: Any) -> str:
    return jwt.utils.base64url_encode(json.dumps(value).encode()).decode()


def hand_signed(header: dict[str, Any], payload: dict[str, Any], key: rsa.RSAPrivateKey) -> str:
    """An RS256 token with a header PyJWT would refuse to write (a kid that is not a string)."""
    signing_input = f"{_part(header)}.{_part(payload)}"
    signature = RSAAlgorithm(RSAAlgorithm.SHA256).sign(signing_input.encode(), key)
    return f"{signing_input}.{jwt.utils.base64url_encode(signature).decode()}"


def hmac_signed(header: dict[str, Any], payload: dict[str, Any], secret: bytes) -> str:
    """An HS256 token signed with any bytes at all, as an attacker holding a public key would make one."""
    signing_input = f"{_part(header)}.{_part(payload)}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{jwt.utils.base64url_encode(signature).decode()}"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- previous secret --------------------------------------------------------------------------------------------

def test_previous_secret_verifies_beside_the_current_one() -> None:
    verifier = TokenVerifier(("HS256",), SECRET, None, None, None, 0, previous_secret=PREVIOUS)
    assert verifier.verify(jwt.encode(claims("1"), SECRET, algorithm="HS256")).user_id == 1
    assert verifier.verify(jwt.encode(claims("2"), PREVIOUS, algorithm="HS256")).user_id == 2
    with pytest.raises(InvalidToken):
        verifier.verify(jwt.encode(claims("3"), "another-secret-" + "x" * 40, algorithm="HS256"))
    without = TokenVerifier(("HS256",), SECRET, None, None, None, 0)
    with pytest.raises(InvalidToken):
        without.verify(jwt.encode(claims("2"), PREVIOUS, algorithm="HS256"))


def test_previous_secret_alone_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="PREVIOUS_SECRET"):
        TokenVerifier(("HS256",), None, None, None, None, 0, previous_secret=PREVIOUS)


# -- JWKS by kid ------------------------------------------------------------------------------------------------

def test_jwks_keys_are_chosen_by_kid(tmp_path: Path) -> None:
    first, second = rsa_key(), rsa_key()
    curve = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "jwks.json"
    ec_jwk = {**json.loads(ECAlgorithm.to_jwk(curve.public_key())), "kid": "e1"}
    write_jwks(path, rsa_jwk(first, "r1"), rsa_jwk(second, "r2"), ec_jwk)
    verifier = TokenVerifier(("RS256", "ES256"), None, None, None, None, 0, jwks_file=path)
    assert verifier.verify(jwt.encode(claims("1"), first, algorithm="RS256", headers={"kid": "r1"})).user_id == 1
    assert verifier.verify(jwt.encode(claims("2"), second, algorithm="RS256", headers={"kid": "r2"})).user_id == 2
    assert verifier.verify(jwt.encode(claims("3"), curve, algorithm="ES256", headers={"kid": "e1"})).user_id == 3
    refused = {
        "the other key's kid": jwt.encode(claims(), first, algorithm="RS256", headers={"kid": "r2"}),
        "an unknown kid": jwt.encode(claims(), first, algorithm="RS256", headers={"kid": "r9"}),
        "no kid and no static key": jwt.encode(claims(), first, algorithm="RS256"),
        "a kid that is not a string": hand_signed({"alg": "RS256", "typ": "JWT", "kid": 1}, claims(), first),
        "RS384 with an RS256 key": jwt.encode(claims(), first, algorithm="RS384", headers={"kid": "r1"}),
    }
    for case, token in refused.items():
        with pytest.raises(InvalidToken):  # noqa: PT012 - names the case that was wrongly accepted
            verifier.verify(token)
            pytest.fail(f"accepted: {case}")


def test_a_jwks_that_cannot_be_used_at_start_up_is_a_configuration_error(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    for content in ("not json", json.dumps({"keys": []}), json.dumps([1]), json.dumps({"keys": [{"kty": "RSA"}]})):
        path.write_text(content)
        with pytest.raises(ValueError, match="JWKS_FILE"):
            TokenVerifier(("RS256",), None, None, None, None, 0, jwks_file=path)
    with pytest.raises(ValueError, match="JWKS_FILE"):
        TokenVerifier(("RS256",), None, None, None, None, 0, jwks_file=tmp_path / "missing.json")


# -- algorithm confusion ---------------------------------------------------------------------------------------

def test_an_rsa_public_key_is_never_used_as_an_hmac_secret(tmp_path: Path) -> None:
    key = rsa_key()
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    pem_file = tmp_path / "public.pem"
    pem_file.write_bytes(pem)
    jwks = tmp_path / "jwks.json"
    jwk = rsa_jwk(key, "r1")
    write_jwks(jwks, jwk)
    verifier = TokenVerifier(("HS256", "RS256"), SECRET, pem_file, None, None, 0, jwks_file=jwks)
    forged = [
        # The classic: sign HS256 with the public key's bytes, hoping the verifier uses them as the HMAC secret.
        # (PyJWT refuses to sign that way, so the attacker's signature is made by hand.)
        hmac_signed({"alg": "HS256", "typ": "JWT"}, claims(), pem),
        hmac_signed({"alg": "HS256", "typ": "JWT", "kid": "r1"}, claims(), pem),
        hmac_signed({"alg": "HS256", "typ": "JWT", "kid": "r1"}, claims(), json.dumps(jwk).encode()),
        hmac_signed({"alg": "HS256", "typ": "JWT", "kid": "r1"}, claims(), jwk["n"].encode()),
    ]
    for token in forged:
        with pytest.raises(InvalidToken):
            verifier.verify(token)
    # the genuine ones still pass
    assert verifier.verify(jwt.encode(claims("7"), key, algorithm="RS256", headers={"kid": "r1"})).user_id == 7
    assert verifier.verify(jwt.encode(claims("8"), key, algorithm="RS256")).user_id == 8
    assert verifier.verify(jwt.encode(claims("9"), SECRET, algorithm="HS256")).user_id == 9


def test_an_hmac_secret_is_never_used_as_an_rsa_key(tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    oct_key = {"kty": "oct", "kid": "h1", "alg": "HS256", "k": jwt.utils.base64url_encode(SECRET.encode()).decode()}
    write_jwks(jwks, oct_key)
    verifier = TokenVerifier(("HS256", "RS256"), SECRET, None, None, None, 0, jwks_file=jwks)
    assert verifier.verify(jwt.encode(claims("5"), SECRET, algorithm="HS256", headers={"kid": "h1"})).user_id == 5
    with pytest.raises(InvalidToken):
        verifier.verify(jwt.encode(claims(), rsa_key(), algorithm="RS256", headers={"kid": "h1"}))
    with pytest.raises(InvalidToken):  # an RSA token without kid and no public key configured: no key at all
        verifier.verify(jwt.encode(claims(), rsa_key(), algorithm="RS256"))
    # an oct key whose JWK claims an RSA algorithm is not a usable key: PyJWT skips it, so the set has none
    jwks.write_text(json.dumps({"keys": [{**oct_key, "alg": "RS256"}]}))
    with pytest.raises(ValueError, match="JWKS_FILE"):
        TokenVerifier(("RS256",), None, None, None, None, 0, jwks_file=jwks)


# -- reading the file again -----------------------------------------------------------------------------------

def test_a_changed_file_is_read_within_a_second_and_a_removed_key_stops_at_once(tmp_path: Path) -> None:
    old, new = rsa_key(), rsa_key()
    path = tmp_path / "jwks.json"
    write_jwks(path, rsa_jwk(old, "old"))
    verifier = TokenVerifier(("RS256",), None, None, None, None, 0, jwks_file=path)
    clock = Clock()
    verifier._jwks = JwksFile(path, clock=clock)  # the same file, on a clock the test moves
    old_token = jwt.encode(claims("1"), old, algorithm="RS256", headers={"kid": "old"})
    new_token = jwt.encode(claims("2"), new, algorithm="RS256", headers={"kid": "new"})
    assert verifier.verify(old_token).user_id == 1  # now in the verified-token cache
    write_jwks(path, rsa_jwk(new, "new"))
    assert verifier.verify(old_token).user_id == 1, "looked at the file again before a second passed"
    clock.now += 1.0
    assert verifier.verify(new_token).user_id == 2
    with pytest.raises(InvalidToken):
        verifier.verify(old_token)  # the cache was emptied with the key set


def test_a_broken_file_keeps_the_keys_in_force_and_is_logged_once(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    key = rsa_key()
    path = tmp_path / "jwks.json"
    write_jwks(path, rsa_jwk(key, "k1"))
    clock = Clock()
    keys = JwksFile(path, clock=clock)
    for broken in ('{"keys": [', json.dumps({"keys": [{"kty": "RSA", "kid": "k2"}]}), ""):
        path.write_text(broken)
        clock.now += 1.0
        with caplog.at_level(logging.ERROR, logger="realtime.tokens"):
            caplog.clear()
            assert not keys.maybe_reload()
            clock.now += 1.0
            assert not keys.maybe_reload()  # unchanged since: not read, not logged again
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1, [r.getMessage() for r in errors]
        assert "keeping the 1 key(s)" in errors[0].getMessage()
        assert errors[0].exc_info is None
        assert keys.key("k1") is not None
    path.unlink()  # a missing file too
    assert not keys.reload()
    assert keys.kids == {"k1"}


async def test_sighup_reads_the_jwks_again_without_dropping_a_connection(pg_dsn: str, tmp_path: Path) -> None:
    """Only SIGHUP can have caused the reload: the new file has the old one's inode, size and mtime."""
    old, new = rsa_key(), rsa_key()
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [rsa_jwk(old, "k-a")]}))
    before = path.stat()
    uid, did = Seeder(pg_dsn).owned()
    env = serve_env(pg_dsn, "s" * 32, REALTIME_JWT_ALGORITHMS="RS256,HS256", REALTIME_JWT_JWKS_FILE=str(path))
    server = await ServerProcess.start(env, tmp_path)
    try:
        await server.ready()
        old_token = jwt.encode(claims(str(uid)), old, algorithm="RS256", headers={"kid": "k-a"})
        new_token = jwt.encode(claims(str(uid)), new, algorithm="RS256", headers={"kid": "k-b"})
        async with aiohttp.ClientSession() as http:
            url = f"ws://127.0.0.1:{server.port}/ws/{did}"
            live = await http.ws_connect(url, headers={"Authorization": f"Bearer {old_token}"})
            assert json.loads((await live.receive(timeout=10)).data)["type"] == "connect"
            # rewrite in place, same length, then put the old mtime back: polling cannot see the change
            content = json.dumps({"keys": [rsa_jwk(new, "k-b")]})
            assert len(content) == before.st_size
            with path.open("r+") as handle:
                handle.write(content)
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
            after = path.stat()
            assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size,
                                                                        before.st_mtime_ns)
            await asyncio.sleep(1.2)  # a poll has had its chance to (wrongly) notice
            assert await outcome(http, url, new_token) == "refused", "the change was seen without SIGHUP"
            server.proc.send_signal(signal.SIGHUP)
            await server.wait_for(lambda text: "reloaded" in text, "the reload to be logged")
            assert await outcome(http, url, new_token) == "connect"
            assert await outcome(http, url, old_token) == "refused"
            await live.send_str(json.dumps({"type": "ping"}))
            pong = json.loads((await live.receive(timeout=10)).data)
            assert pong["type"] == "pong", "the connection opened with the removed key was dropped"
            await live.close()
        code, _ = await server.terminate()
        assert code == 0, server.text
        assert old_token not in server.text and new_token not in server.text
    finally:
        await server.kill()


async def outcome(http: aiohttp.ClientSession, url: str, token: str) -> str:
    ws = await http.ws_connect(url, headers={"Authorization": f"Bearer {token}"})
    try:
        msg = await ws.receive(timeout=10)
        if msg.type is aiohttp.WSMsgType.TEXT and json.loads(msg.data)["type"] == "connect":
            return "connect"
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.extra == "invalid_token", (msg.type, msg.data, msg.extra)
        return "refused"
    finally:
        await ws.close()
