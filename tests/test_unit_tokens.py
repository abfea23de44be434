"""PROTOCOL 2: TokenVerifier turns a JWT into a Principal, or refuses it with InvalidToken / TokenExpired."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from realtime_service.auth.tokens import TokenVerifier
from realtime_service.errors import InvalidToken, ServiceError, TokenExpired

SECRET = "unit-test-secret-that-is-long-enough-for-hs512-0123456789abcdef0123456789"


def now() -> int:
    return int(time.time())


def claims(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "456", "iat": now(), "exp": now() + 3600}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def hs(payload: dict[str, Any], alg: str = "HS256", key: Any = SECRET) -> str:
    return jwt.encode(payload, key, algorithm=alg)


def verifier(algorithms: tuple[str, ...] = ("HS256",), secret: str | None = SECRET, public_key_file: Path | None = None,
             audience: str | None = None, issuer: str | None = None, leeway: float = 0) -> TokenVerifier:
    return TokenVerifier(algorithms, secret, public_key_file, audience, issuer, leeway)


def refused(v: TokenVerifier, token: str, kind: type[ServiceError] = InvalidToken) -> ServiceError:
    """Verify must refuse with exactly `kind`, and say so without quoting the token or its parts."""
    with pytest.raises(ServiceError) as info:
        v.verify(token)
    exc = info.value
    assert type(exc) is kind, f"{type(exc).__name__}: {exc.message}"
    for text in (str(exc), exc.message, repr(exc), json.dumps(exc.body())):
        assert not token or token not in text
        for part in token.split("."):
            if len(part) >= 8:
                assert part not in text, text
    return exc


def unsigned(header: dict[str, Any], payload: dict[str, Any], signature: str = "") -> str:
    def b64(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{b64(header)}.{b64(payload)}.{signature}"


# -- accepted tokens --------------------------------------------------------------------------------------

@pytest.mark.parametrize("sub", ["456", 456])
def test_hs256_user_token_with_string_or_int_sub(sub: Any) -> None:
    token = hs(claims(sub=sub))
    principal = verifier().verify(token)
    assert principal.user_id == 456
    assert principal.sub == "456"
    assert not principal.is_service
    assert principal.expires_at == pytest.approx(now() + 3600, abs=5)


@pytest.mark.parametrize("scope", ["realtime:publish", "read realtime:publish write", ["other", "realtime:publish"]])
def test_service_scope_as_string_spaces_or_list(scope: Any) -> None:
    principal = verifier().verify(hs(claims(sub="main-api", scope=scope)))
    assert principal.is_service
    assert principal.sub == "main-api"
    assert principal.user_id is None


@pytest.mark.parametrize("scope", ["realtime:publisher", "realtime", ["realtime:read"], "REALTIME:PUBLISH"])
def test_other_scopes_do_not_make_a_service(scope: Any) -> None:
    principal = verifier().verify(hs(claims(sub="77", scope=scope)))
    assert not principal.is_service
    assert principal.user_id == 77
    refused(verifier(), hs(claims(sub="main-api", scope=scope)))  # and then sub must be a user id


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
def test_other_hmac_algorithms_work_when_allowed(alg: str) -> None:
    assert verifier(algorithms=(alg,)).verify(hs(claims(), alg=alg)).user_id == 456


# -- refused tokens ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("sub", ["abc", "", "-5", "0", "4.5", " 45", "١٢", True, None, 0, -3, ["456"]])
def test_user_token_with_non_numeric_sub_is_refused(sub: Any) -> None:
    payload = claims()
    payload["sub"] = sub
    if sub is None:
        del payload["sub"]
    refused(verifier(), hs(payload))


def test_alg_none_is_refused() -> None:
    refused(verifier(), unsigned({"alg": "none", "typ": "JWT"}, claims()))
    refused(verifier(), unsigned({"alg": "none", "typ": "JWT"}, claims(sub="main-api", scope="realtime:publish")))


@pytest.mark.parametrize("header", [{"alg": "None"}, {"alg": "NONE"}, {}, {"alg": 5}, {"alg": None}])
def test_missing_or_odd_alg_is_refused(header: dict[str, Any]) -> None:
    refused(verifier(), unsigned(header, claims(), "c2ln"))


def test_hs384_is_refused_when_not_in_allow_list() -> None:
    refused(verifier(algorithms=("HS256",)), hs(claims(), alg="HS384"))


def test_bad_signature_and_wrong_secret_are_refused() -> None:
    refused(verifier(), hs(claims(), key=SECRET + "x"))
    good = hs(claims())
    head, body, sig = good.split(".")
    refused(verifier(), f"{head}.{body}.{sig[:-4]}AAAA")
    refused(verifier(), f"{head}.{body}.")


@pytest.mark.parametrize("garbage", ["", "not-a-jwt", "a.b.c", "eyJhbGciOiJIUzI1NiJ9..", "....",
                                     "eyJ" + "A" * 300 + "." + "B" * 300 + "." + "C" * 300])
def test_malformed_tokens_are_refused(garbage: str) -> None:
    refused(verifier(), garbage)


def test_missing_exp_is_refused() -> None:
    refused(verifier(), hs(claims(exp=None)))
    payload = claims()
    payload["exp"] = "tomorrow"
    refused(verifier(), hs(payload))


def test_expired_token_is_token_expired() -> None:
    refused(verifier(), hs(claims(exp=now() - 1, iat=now() - 100)), TokenExpired)


def test_leeway_is_honoured_for_exp() -> None:
    token = hs(claims(exp=now() - 5, iat=now() - 100))
    assert verifier(leeway=30).verify(token).user_id == 456
    refused(verifier(leeway=0), token, TokenExpired)


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_token_not_yet_valid_is_invalid_token(claim: str) -> None:
    future = hs(claims(**{claim: now() + 600}))
    refused(verifier(leeway=0), future, InvalidToken)
    refused(verifier(leeway=10), future, InvalidToken)
    slightly = hs(claims(**{claim: now() + 5}))
    refused(verifier(leeway=0), slightly, InvalidToken)
    assert verifier(leeway=30).verify(slightly).user_id == 456


def test_aud_and_iss_are_ignored_when_not_configured() -> None:
    v = verifier()
    assert v.verify(hs(claims(aud="someone-else", iss="https://elsewhere"))).user_id == 456
    assert v.verify(hs(claims())).user_id == 456


@pytest.mark.parametrize(("aud", "ok"), [("realtime", True), (["x", "realtime"], True), ("other", False),
                                         (["other"], False), (None, False)])
def test_audience_checked_when_configured(aud: Any, ok: bool) -> None:
    v = verifier(audience="realtime")
    token = hs(claims(aud=aud))
    if ok:
        assert v.verify(token).user_id == 456
    else:
        refused(v, token)


@pytest.mark.parametrize(("iss", "ok"), [("https://api.example", True), ("https://evil.example", False),
                                         (None, False)])
def test_issuer_checked_when_configured(iss: Any, ok: bool) -> None:
    v = verifier(issuer="https://api.example")
    token = hs(claims(iss=iss))
    if ok:
        assert v.verify(token).user_id == 456
    else:
        refused(v, token)


# -- public-key algorithms --------------------------------------------------------------------------------

def _pem_pair(kind: str) -> tuple[bytes, bytes]:
    private: Any = (rsa.generate_private_key(public_exponent=65537, key_size=2048) if kind == "RSA"
                    else ec.generate_private_key(ec.SECP256R1()))
    private_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    public_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    return private_pem, public_pem


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[bytes, bytes]:
    return _pem_pair("RSA")


@pytest.fixture(scope="module")
def ec_keys() -> tuple[bytes, bytes]:
    return _pem_pair("EC")


def _key_file(tmp_path: Path, public_pem: bytes) -> Path:
    path = tmp_path / "public.pem"
    path.write_bytes(public_pem)
    return path


@pytest.mark.parametrize(("alg", "keys"), [("RS256", "rsa_keys"), ("ES256", "ec_keys")])
def test_public_key_algorithms_work(alg: str, keys: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    private_pem, public_pem = request.getfixturevalue(keys)
    v = verifier(algorithms=(alg,), secret=None, public_key_file=_key_file(tmp_path, public_pem))
    assert v.verify(jwt.encode(claims(), private_pem, algorithm=alg)).user_id == 456
    service = v.verify(jwt.encode(claims(sub="main-api", scope="realtime:publish"), private_pem, algorithm=alg))
    assert service.is_service
    other_private, _ = _pem_pair("RSA" if alg == "RS256" else "EC")
    refused(v, jwt.encode(claims(), other_private, algorithm=alg))  # signed by someone else
    refused(v, jwt.encode(claims(exp=now() - 60), private_pem, algorithm=alg), TokenExpired)
    refused(v, hs(claims()))  # HS256 is not in this allow-list


def test_rs256_refused_when_only_hs256_allowed(rsa_keys: tuple[bytes, bytes]) -> None:
    private_pem, _ = rsa_keys
    refused(verifier(), jwt.encode(claims(), private_pem, algorithm="RS256"))


def _hmac_with_public_pem(public_pem: bytes, payload: dict[str, Any]) -> str:
    """The alg-confusion attack: HS256 keyed with the server's public key (PyJWT refuses to do it, so by hand)."""
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{b64(json.dumps(payload).encode())}"
    signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


@pytest.mark.parametrize("allowed", [("RS256",), ("RS256", "HS256")])
def test_alg_confusion_hs256_with_public_key_as_secret_is_refused(allowed: tuple[str, ...], tmp_path: Path,
                                                                   rsa_keys: tuple[bytes, bytes]) -> None:
    _, public_pem = rsa_keys
    v = verifier(algorithms=allowed, secret=SECRET if "HS256" in allowed else None,
                 public_key_file=_key_file(tmp_path, public_pem))
    forged = _hmac_with_public_pem(public_pem, claims(sub="main-api", scope="realtime:publish"))
    refused(v, forged)
    refused(v, _hmac_with_public_pem(public_pem, claims()))


def test_misconfiguration_is_refused_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="REALTIME_JWT_SECRET"):
        verifier(algorithms=("HS256",), secret=None)
    with pytest.raises(ValueError, match="REALTIME_JWT_PUBLIC_KEY_FILE"):
        verifier(algorithms=("RS256",), secret=None, public_key_file=None)


# -- secrecy ----------------------------------------------------------------------------------------------

def test_error_messages_never_contain_the_token() -> None:
    v = verifier(audience="realtime", issuer="https://api.example")
    cases = [
        hs(claims(exp=now() - 60)),
        hs(claims(nbf=now() + 600)),
        hs(claims(), key="wrong-secret-wrong-secret-wrong-secret"),
        hs(claims(aud="realtime")),
        hs(claims(aud="nope", iss="https://api.example")),
        hs(claims(sub="not-a-number", aud="realtime", iss="https://api.example")),
        hs(claims(), alg="HS512"),
    ]
    for token in cases:
        with pytest.raises(ServiceError) as info:
            v.verify(token)
        exc = info.value
        rendered = " ".join([str(exc), exc.message, repr(exc), json.dumps(exc.body()), str(exc.__cause__),
                             str(exc.__context__) if exc.__suppress_context__ is False else ""])
        signature = token.rsplit(".", 1)[1]
        assert token not in rendered
        assert signature not in rendered
        assert exc.__cause__ is None  # `from None`: no PyJWT exception (which may quote input) chained
