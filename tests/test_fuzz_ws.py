"""PROTOCOL 3 under generated input: a hypothesis-driven fuzzer of raw WebSocket frames against the live service.

Each example is one connection: a way to authenticate (header, query, first frame or none), a token from a pool
(the owner's, another user's, a service token, expired, forged, `alg: none`, edge-case claims, garbage), a
diagnosis (owned, someone else's, unknown), then up to ~20 frames built on the wire: random and deeply nested
JSON (to 10,000 levels), huge and negative numbers, wrong types in `auth`, `ack` and `since`, invalid UTF-8,
fragmented messages with control frames between the fragments, control frames over 125 bytes, reserved opcodes
and bits, bad close frames, oversized messages and unmasked frames.

An oracle written from the contract (PROTOCOL 3.1-3.5, 3.3 close codes; RFC 6455 where the contract is silent:
1002 for a protocol violation, 1007 for invalid UTF-8) says what the server must answer: which JSON frames in
which order, which control PONGs, and how the connection ends. Every example also checks that

- no `connect` frame ever arrives unless the owner's valid token was used on the owner's diagnosis;
- the service logs no error and no traceback, and still answers afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import socket
import struct
import time
import warnings
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from tests import wsraw
from tests.fixtures_app import Service, StartService
from tests.fuzzing import SEED, budget, edge_services, eventually, examples, trap_logs
from tests.support import Seeder, Tokens

MAX_FRAME = 65536
MAX_OFFSET = 2**63 - 1  # offsets are signed 64-bit integers; a larger `since` is refused, not clamped
READ_TIMEOUT = 5.0

# -- tokens ------------------------------------------------------------------------------------------------

CONNECT = "connect"  # the outcome "accepted": a `connect` frame


def _quietly(make: Callable[[], str]) -> str:
    """PyJWT warns that the test secret is short for HS512; the token only has to carry a refused `alg`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class TokenPool:
    """Tokens by kind, and for each kind the outcomes the contract allows on each diagnosis."""

    tokens: dict[str, str]

    # kind -> (outcome on the owner's diagnosis, on another user's diagnosis, on an unknown one)
    OUTCOMES: ClassVar[dict[str, tuple[set[str], ...]]] = {
        "owner": ({CONNECT}, {"forbidden"}, {"diagnosis_not_found"}),
        "owner_int_sub": ({CONNECT}, {"forbidden"}, {"diagnosis_not_found"}),
        "other_user": ({"forbidden"}, {CONNECT}, {"diagnosis_not_found"}),  # "other" is that user's own
        "service": ({"forbidden"}, {"forbidden"}, {"forbidden", "diagnosis_not_found"}),
        "expired": ({"token_expired"},) * 3,
        "not_yet_valid": ({"invalid_token"},) * 3,
        "wrong_key": ({"invalid_token"},) * 3,
        "alg_none": ({"invalid_token"},) * 3,
        "alg_hs512": ({"invalid_token"},) * 3,
        "no_exp": ({"invalid_token"},) * 3,
        "exp_true": ({"invalid_token"},) * 3,
        "exp_huge": ({"invalid_token"},) * 3,
        "exp_string": ({"invalid_token"},) * 3,
        "sub_huge": ({"invalid_token"},) * 3,
        "sub_negative": ({"invalid_token", "forbidden"},) * 3,
        "sub_zero": ({"invalid_token", "forbidden"},) * 3,
        "sub_list": ({"invalid_token"},) * 3,
        "truncated": ({"invalid_token"},) * 3,
        "garbage": ({"invalid_token"},) * 3,
    }

    @classmethod
    def mint(cls, service: Service, owner: int, other: int) -> TokenPool:
        t = service.tokens
        now = int(time.time())
        good = t.user(owner)
        header = b64(b'{"alg":"none","typ":"JWT"}')
        body = b64(json.dumps({"sub": str(owner), "exp": now + 3600}).encode())
        tokens = {
            "owner": good,
            "owner_int_sub": t.encode({"sub": owner, "exp": now + 3600}),
            "other_user": t.user(other),
            "service": t.service(),
            "expired": t.user(owner, ttl=-3600),
            "not_yet_valid": t.user(owner, nbf=now + 3600),
            "wrong_key": t.encode({"sub": str(owner), "exp": now + 3600}, key="another-secret-" + "k" * 32),
            "alg_none": f"{header}.{body}.",
            "alg_hs512": _quietly(lambda: t.encode({"sub": str(owner), "exp": now + 3600}, algorithm="HS512")),
            "no_exp": t.encode({"sub": str(owner)}),
            "exp_true": t.encode({"sub": str(owner), "exp": True}),
            "exp_huge": t.encode({"sub": str(owner), "exp": 10**400}),
            "exp_string": t.encode({"sub": str(owner), "exp": "tomorrow"}),
            "sub_huge": t.encode({"sub": "9" * 5000, "exp": now + 3600}),
            "sub_negative": t.encode({"sub": "-5", "exp": now + 3600}),
            "sub_zero": t.encode({"sub": 0, "exp": now + 3600}),
            "sub_list": t.encode({"sub": [owner], "exp": now + 3600}),
            "truncated": good[: len(good) // 2],
            "garbage": "not.a.token",
        }
        return cls(tokens)

    def allowed(self, kind: str, target: str) -> set[str]:
        if kind not in self.OUTCOMES:  # a generated string: never a valid token
            return {"invalid_token"}
        return set(self.OUTCOMES[kind][("owned", "other", "unknown").index(target)])


# -- frames on the wire ---------------------------------------------------------------------------------------

def wire(first: int, payload: bytes, masked: bool = True) -> bytes:
    """One frame; `first` is the first header byte (FIN, RSV1-3, opcode)."""
    size = len(payload)
    bit = 0x80 if masked else 0
    if size < 126:
        head = struct.pack("!BB", first, bit | size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", first, bit | 126, size)
    else:
        head = struct.pack("!BBQ", first, bit | 127, size)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@dataclass(frozen=True)
class Message:
    """A data message, sent in `len(pieces)` fragments, with control PINGs between some of them."""

    payload: bytes
    binary: bool = False
    pieces: tuple[int, ...] = ()  # fragment boundaries
    pings: tuple[bytes, ...] = ()  # a PING after each of the first len(pings) fragments
    masked: bool = True

    def parts(self) -> list[bytes]:
        cuts = [0, *sorted({c for c in self.pieces if 0 < c < len(self.payload)}), len(self.payload)]
        return [self.payload[a:b] for a, b in itertools.pairwise(cuts)] or [b""]

    def sent_pings(self) -> tuple[bytes, ...]:
        return self.pings[: len(self.parts()) - 1]

    def encode(self) -> bytes:
        parts = self.parts()
        pings = self.sent_pings()
        out = b""
        for index, part in enumerate(parts):
            opcode = (0x2 if self.binary else 0x1) if index == 0 else 0x0
            out += wire((0x80 if index == len(parts) - 1 else 0) | opcode, part, self.masked)
            if index < len(pings):
                out += wire(0x89, pings[index], self.masked)
        return out


@dataclass(frozen=True)
class Control:
    """A PING or PONG (valid: payload of at most 125 bytes)."""

    opcode: int
    payload: bytes

    def encode(self) -> bytes:
        return wire(0x80 | self.opcode, self.payload)


@dataclass(frozen=True)
class Violation:
    """Bytes that break RFC 6455; the server must close with `code`."""

    name: str
    data: bytes
    code: int
    or_normal_close: bool = False  # a normal close answer is accepted too

    def encode(self) -> bytes:
        return self.data


@dataclass(frozen=True)
class CloseFrame:
    """A valid client close: the server answers with a close frame and the connection ends."""

    code: int
    reason: bytes

    def encode(self) -> bytes:
        return wire(0x88, struct.pack("!H", self.code) + self.reason)


Frame = Message | Control | Violation | CloseFrame


# -- JSON payloads --------------------------------------------------------------------------------------------

WEIRD_NUMBERS = [-1, -(2**63), 2**63 - 1, 2**63, 2**64, 10**30, -(10**30), 1e308, -1e308, 1.5, -0.0, 0.0]
WEIRD_VALUES: list[Any] = [*WEIRD_NUMBERS, True, False, None, "", "1", "-1", "9" * 5000, "1e3", " 1", "٣",
                           [], {}, [1], {"a": 1}]


def nested(depth: int, kind: str) -> str:
    """A JSON text nested `depth` levels deep, without recursion."""
    if kind == "array":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


json_leaves = (st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
               | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=16)
               | st.sampled_from(WEIRD_VALUES))
json_values = st.recursive(json_leaves, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
field_values = st.one_of(st.sampled_from(WEIRD_VALUES), json_values)
depths = st.sampled_from([2, 100, 255, 256, 300, 1023, 1024, 1025, 5000, 10000])


def dumps(value: Any) -> bytes:
    """Python's encoder: it writes ints of any size and NaN/Infinity, which a strict parser must refuse."""
    return json.dumps(value).encode()


@st.composite
def json_payloads(draw: st.DrawFn, token_kinds: list[str]) -> bytes:
    """One text payload: an auth, ack or ping frame with fuzzed fields, random JSON, deep nesting or junk."""
    token_kinds = ["owner"] * len(token_kinds) + token_kinds
    # an auth frame after the first is a refresh, and most refreshes end the connection: keep them rarer
    choice = draw(st.sampled_from(["auth", "auth_weird", "ack", "ack", "ack_weird", "ack_weird", "ping", "ping",
                                   "random", "typed", "nested", "nested_field", "junk", "empty"]))
    if choice == "auth":
        frame: dict[str, Any] = {"type": "auth", "token": draw(st.sampled_from(token_kinds))}
        for key, values in (("since", st.integers(0, 50) | st.just("3")), ("epoch", st.text(max_size=10)),
                            ("device", st.sampled_from(["phone", "tab-1", "", "x" * 128]))):
            if draw(st.booleans()):
                frame[key] = draw(values)
        return dumps(frame)
    if choice == "auth_weird":
        frame = {"type": "auth", "token": draw(st.sampled_from(token_kinds) | field_values)}
        frame[draw(st.sampled_from(["since", "epoch", "device", "token", "type"]))] = draw(field_values)
        return dumps(frame)
    if choice == "ack":
        return dumps({"type": "ack", "offset": draw(st.integers(0, 3) | st.integers(0, 2**63 - 1))})
    if choice == "ack_weird":
        return dumps({"type": "ack", "offset": draw(field_values)})
    if choice == "ping":
        extra = draw(st.dictionaries(st.text(max_size=5), json_values, max_size=2))
        return dumps({**extra, "type": "ping"})
    if choice == "random":
        return dumps(draw(json_values))
    if choice == "typed":
        return dumps({"type": draw(st.sampled_from(["connect", "pong", "error", "PING", "Ack", "auth ", "x" * 200])
                                   | field_values), "data": draw(json_values)})
    if choice == "nested":
        return nested(draw(depths), draw(st.sampled_from(["array", "object"]))).encode()
    if choice == "nested_field":
        inner = nested(draw(depths), draw(st.sampled_from(["array", "object"])))
        where = draw(st.sampled_from(["ack", "since", "token", "type"]))
        if where == "ack":
            return f'{{"type":"ack","offset":{inner}}}'.encode()
        if where == "since":
            return f'{{"type":"auth","token":"owner","since":{inner}}}'.encode()
        return f'{{"type":"auth","{where}":{inner}}}'.encode()
    if choice == "junk":
        return draw(st.text(max_size=40)).encode()
    return b""


def substitute_tokens(payload: bytes, pool: TokenPool) -> bytes:
    """Generated auth frames name a token kind ("owner"); put the real token in its place."""
    try:
        frame = json.loads(payload)
    except (ValueError, RecursionError):
        return payload
    if isinstance(frame, dict) and isinstance(frame.get("token"), str) and frame["token"] in pool.tokens:
        frame["token"] = pool.tokens[frame["token"]]
        return json.dumps(frame).encode()
    return payload


@st.composite
def messages(draw: st.DrawFn, token_kinds: list[str]) -> Message:
    binary = draw(st.integers(0, 9)) == 0
    payload = draw(st.binary(max_size=64)) if binary else draw(json_payloads(token_kinds))
    pieces: tuple[int, ...] = ()
    pings: tuple[bytes, ...] = ()
    if payload and draw(st.integers(0, 3)) == 0:
        pieces = tuple(draw(st.lists(st.integers(1, max(1, len(payload) - 1)), min_size=1, max_size=3)))
        pings = tuple(draw(st.lists(st.binary(max_size=16), max_size=len(pieces))))
    return Message(payload, binary, pieces, pings)


def violations() -> st.SearchStrategy[Violation]:
    ping = b'{"type":"ping"}'
    cases = [
        st.builds(lambda rsv: Violation(f"rsv {rsv:#x}", wire(0x81 | rsv, ping), 1002),
                  st.sampled_from([0x40, 0x20, 0x10, 0x70])),
        st.builds(lambda op: Violation(f"opcode {op:#x}", wire(0x80 | op, b"x"), 1002),
                  st.sampled_from([3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])),
        st.builds(lambda op, n: Violation(f"control {op:#x} of {n} bytes", wire(0x80 | op, b"p" * n), 1002),
                  st.sampled_from([0x9, 0xA, 0x8]), st.integers(126, 300)),
        st.builds(lambda op: Violation(f"fragmented control {op:#x}", wire(op, b"x") + wire(0x80, b"y"), 1002),
                  st.sampled_from([0x9, 0xA])),
        st.just(Violation("continuation without a start", wire(0x80, ping), 1002)),
        st.just(Violation("new message inside a fragmented one", wire(0x01, b'{"ty') + wire(0x81, ping), 1002)),
        st.builds(lambda code: Violation(f"close code {code}", wire(0x88, struct.pack("!H", code)), 1002),
                  st.sampled_from([0, 999, 1005, 1016, 2999])),
        # RFC 6455 7.4 forbids these too, but aiohttp takes them as a normal close: either answer will do
        st.builds(lambda code: Violation(f"close code {code}", wire(0x88, struct.pack("!H", code)), 1002, True),
                  st.sampled_from([1004, 1006, 1015, 5000, 65535])),
        st.just(Violation("close with a 1-byte payload", wire(0x88, b"\x03"), 1002)),
        st.builds(lambda data: Violation("invalid UTF-8 text", wire(0x81, data), 1007),
                  st.sampled_from([b"\xff", b'{"type":"ping","x":"\xc0\xaf"}', b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                                   b"abc\xe2\x82"])),
        st.just(Violation("invalid UTF-8 across fragments", wire(0x01, b'{"a":"\xe2') + wire(0x80, b'\x28"}'), 1007)),
        st.just(Violation("close reason not UTF-8", wire(0x88, struct.pack("!H", 1000) + b"\xff\xfe"), 1007)),
        st.builds(lambda n: Violation(f"message of {n} bytes", wire(0x81, b" " * n), 1009),
                  st.sampled_from([MAX_FRAME + 1, MAX_FRAME * 2])),
        st.just(Violation("fragments over the limit", wire(0x01, b" " * 40000) + wire(0x80, b" " * 40000), 1009)),
        st.just(Violation("a length of 2**62", wire(0x81, b"")[:1] + b"\xff" + struct.pack("!Q", 2**62) + b"mask",
                          1009)),
    ]
    return st.one_of(cases)


def frames(token_kinds: list[str]) -> st.SearchStrategy[Frame]:
    # weights: mostly messages; a violation or a close ends the connection, so they come one time in ten
    message = messages(token_kinds)
    control = st.builds(Control, st.sampled_from([0x9, 0xA]), st.binary(max_size=125))
    close = st.builds(CloseFrame, st.sampled_from([1000, 1001, 1003, 1008, 3000, 4999]),
                      st.text(max_size=20).map(lambda s: s.encode()[:123]))
    by_kind = {"message": message, "control": control, "violation": violations(), "close": close}
    return st.sampled_from(["message"] * 7 + ["control"] * 2 + ["violation", "close"]).flatmap(by_kind.__getitem__)


@dataclass(frozen=True)
class Scenario:
    auth: str  # "header", "query", "frame": the first frame decides
    token: str  # a kind of the pool, for header and query
    target: str  # "owned", "other", "unknown"
    frames: tuple[Frame, ...]
    unmasked: bool = False  # send every frame without a mask (RFC 6455 5.1 says a server must refuse them)


def describe(scenario: Scenario) -> str:
    """A short account of an example, for failure messages (payloads cut to 80 bytes)."""
    parts = [f"{scenario.auth} auth, token {scenario.token}, {scenario.target} diagnosis"
             + (", unmasked" if scenario.unmasked else "")]
    for frame in scenario.frames:
        if isinstance(frame, Message):
            parts.append(f"{'binary' if frame.binary else 'text'} {frame.payload[:80]!r} in {len(frame.parts())}"
                         f" piece(s), {len(frame.sent_pings())} ping(s) between")
        elif isinstance(frame, Violation):
            parts.append(f"violation: {frame.name}")
        else:
            parts.append(repr(frame)[:100])
    return "\n  ".join(parts)


@st.composite
def scenarios(draw: st.DrawFn, token_kinds: list[str]) -> Scenario:
    likely = ["owner"] * 2 * len(token_kinds) + token_kinds  # two thirds get past authentication
    auth = draw(st.sampled_from(["header", "query", "frame", "frame"]))
    token = draw(st.sampled_from(likely))
    body = draw(st.lists(frames(token_kinds), min_size=1, max_size=20))
    if auth == "frame" and draw(st.integers(0, 7)):  # mostly a well-formed auth frame first, fragmented or not
        opening = dumps({"type": "auth", "token": token})
        body.insert(0, draw(st.sampled_from([Message(opening), Message(opening, pieces=(4, 20), pings=(b"p",))])))
    return Scenario(auth, token, draw(st.sampled_from(["owned"] * 6 + ["other", "unknown"])),
                    tuple(body), draw(st.integers(0, 19)) == 0)


# -- the oracle ------------------------------------------------------------------------------------------------

@dataclass
class Expected:
    """What the server must send: JSON frame types in order, control PONG payloads in order, and the end."""

    json: list[str | set[str]] = field(default_factory=list)  # each entry: a type, or allowed types
    pongs: list[bytes] = field(default_factory=list)
    end: tuple[int, set[str]] | None = None  # (close code, allowed reasons); None: still open
    wire: list[bytes] = field(default_factory=list)  # what to send: stops after the frame that ends it
    connect_allowed: bool = False


SUBJECTS = {"owner": "owner", "owner_int_sub": "owner", "other_user": "other"}  # valid user tokens by subject


def valid_device(device: Any) -> bool:
    return device is None or (isinstance(device, str) and len(device) <= 128 and (device == "" or
                                                                                   device.isprintable()))


def valid_since(since: Any) -> bool:
    if since is None:
        return True
    if isinstance(since, str):
        if not (since.isascii() and since.isdigit() and len(since) <= 19):
            return False
        since = int(since)
    return isinstance(since, int) and not isinstance(since, bool) and 0 <= since <= MAX_OFFSET


def parse(payload: bytes) -> tuple[bool, Any]:
    """The strict JSON the service must accept: RFC 8259 (no NaN), 64-bit integers, bounded depth."""
    try:
        return True, orjson.loads(payload)
    except orjson.JSONDecodeError:
        return False, None


def token_kind(pool: TokenPool, token: Any) -> str:
    for kind, value in pool.tokens.items():
        if token == value:
            return kind
    return "generated"


def expect(scenario: Scenario, pool: TokenPool) -> Expected:
    """Walk the frames as the contract says the server reads them."""
    out = Expected()
    phase = "auth"

    def end(code: int, *reasons: str) -> Expected:
        out.end = (code, set(reasons))
        return out

    subject = ""

    def authenticate(kind: str) -> str | None:
        nonlocal subject
        allowed = pool.allowed(kind, scenario.target)
        subject = SUBJECTS.get(kind, "")
        if CONNECT in allowed:
            out.json.append(CONNECT)
            out.json.append({"reconnect_messages"})  # may come after connect (resume, or nothing to send)
            out.connect_allowed = True
            return None
        return allowed.pop() if len(allowed) == 1 else "|".join(sorted(allowed))

    if scenario.auth in ("header", "query"):
        refused = authenticate(scenario.token)
        if refused is not None:
            return end(1008, *refused.split("|"))
        phase = "open"

    for frame in scenario.frames:
        out.wire.append(frame.encode())
        if isinstance(frame, Violation):
            return end(-1 if frame.or_normal_close else frame.code, "")
        if isinstance(frame, CloseFrame):
            return end(-1, "")  # the server answers the close; code not checked (it echoes or sends 1000)
        if isinstance(frame, Control):
            if frame.opcode == 0x9:
                out.pongs.append(frame.payload)
            continue
        out.pongs.extend(frame.sent_pings())
        if not frame.binary:
            try:
                frame.payload.decode("utf-8")
            except UnicodeDecodeError:
                return end(1007, "")
        if len(frame.payload) > MAX_FRAME:
            return end(1009, "")
        ok, value = (False, None) if frame.binary else parse(frame.payload)
        if phase == "auth":
            if not (ok and isinstance(value, dict) and value.get("type") == "auth"
                    and isinstance(value.get("token"), str) and value["token"]
                    and valid_since(value.get("since")) and valid_device(value.get("device"))
                    and (value.get("epoch") is None or isinstance(value.get("epoch"), str))):
                return end(1008, "invalid_token")
            refused = authenticate(token_kind(pool, value["token"]))
            if refused is not None:
                return end(1008, *refused.split("|"))
            phase = "open"
            continue
        if not ok or not isinstance(value, dict):
            out.json.append("error")
            continue
        kind = value.get("type")
        if kind == "ping":
            out.json.append("pong")
        elif kind == "ack":
            offset = value.get("offset")
            if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
                out.json.append("error")
        elif kind == "auth":
            token = value.get("token")
            if not isinstance(token, str) or not token:
                return end(1008, "invalid_token")
            refreshed = token_kind(pool, token)
            if SUBJECTS.get(refreshed) != subject:
                valid_elsewhere = refreshed in SUBJECTS or refreshed == "service"
                return end(1008, *({"forbidden"} if valid_elsewhere else pool.allowed(refreshed, "owned")))
        else:
            out.json.append("error")
    # still going: a probe shows the connection is alive (or, before auth, that junk closes it)
    if phase == "open":
        out.wire.append(wire(0x81, b'{"type":"ping"}'))
        out.json.append("pong")
    else:
        out.wire.append(wire(0x81, b"not an auth frame"))
        return end(1008, "invalid_token")
    return out


# -- running one example -----------------------------------------------------------------------------------------

@dataclass
class Seen:
    status: int = 0
    json: list[dict[str, Any]] = field(default_factory=list)
    pongs: list[bytes] = field(default_factory=list)
    close: tuple[int, str] | None = None
    dropped: bool = False  # the TCP connection ended without a close frame


async def run(service: Service, scenario: Scenario, pool: TokenPool, dids: dict[str, int],
              expected: Expected) -> Seen:
    url = service.ws_url(dids[scenario.target])
    headers: dict[str, str] = {}
    if scenario.auth == "header":
        headers["Authorization"] = f"Bearer {pool.tokens[scenario.token]}"
    elif scenario.auth == "query":
        url = service.ws_url(dids[scenario.target], token=pool.tokens[scenario.token])
    conn = await wsraw.handshake(url, headers)
    seen = Seen(conn.status)
    loop = asyncio.get_running_loop()
    try:
        if conn.status != 101:
            return seen
        data = b"".join(expected.wire)
        if scenario.unmasked:
            data = b"".join(unmask(chunk) for chunk in expected.wire)
        with _suppress_send_errors():
            await loop.sock_sendall(conn.sock, data)
        wanted_pong = expected.end is None
        while True:
            try:
                opcode, payload = await conn.recv_frame(READ_TIMEOUT)
            except (ConnectionError, OSError):
                seen.dropped = True
                return seen
            except TimeoutError:
                return seen
            if opcode == 0x1:
                frame = json.loads(payload)
                seen.json.append(frame)
                if wanted_pong and frame.get("type") == "pong" and len(
                        [f for f in seen.json if f.get("type") == "pong"]) == expected.json.count("pong"):
                    with _suppress_send_errors():
                        await loop.sock_sendall(conn.sock, wire(0x88, struct.pack("!H", 1000)))
                    wanted_pong = False
            elif opcode == 0xA:
                seen.pongs.append(payload)
            elif opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                seen.close = (code, payload[2:].decode(errors="replace"))
                with _suppress_send_errors():
                    await loop.sock_sendall(conn.sock, wire(0x88, payload[:2]))
                return seen
    finally:
        conn.close()


def unmask(chunk: bytes) -> bytes:
    """The same frames with the mask bit cleared and the payloads unmasked."""
    out, i = b"", 0
    while i < len(chunk):
        first, second = chunk[i], chunk[i + 1]
        size, head = second & 0x7F, 2
        if size == 126:
            size, head = struct.unpack("!H", chunk[i + 2:i + 4])[0], 4
        elif size == 127:
            size, head = struct.unpack("!Q", chunk[i + 2:i + 10])[0], 10
        if not second & 0x80 or i + head + 4 + size > len(chunk):
            return out + chunk[i:]  # not a whole masked frame (a deliberately broken length): leave as is
        mask = chunk[i + head:i + head + 4]
        body = bytes(b ^ mask[j % 4] for j, b in enumerate(chunk[i + head + 4:i + head + 4 + size]))
        out += bytes([first, second & 0x7F]) + chunk[i + 2:i + head] + body
        i += head + 4 + size
    return out


class _suppress_send_errors:
    """The server may close while frames are still on their way: that is not the client's failure."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, value: Any, tb: Any) -> bool:
        return kind is not None and issubclass(kind, (ConnectionError, BrokenPipeError, OSError))


def check(scenario: Scenario, expected: Expected, seen: Seen) -> None:
    """Compare what the server sent with what the contract asks for."""
    try:
        _check(scenario, expected, seen)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nexample: {describe(scenario)}\nseen: {seen}") from None


def _check(scenario: Scenario, expected: Expected, seen: Seen) -> None:
    types = [f.get("type") for f in seen.json]
    if not expected.connect_allowed:
        assert CONNECT not in types, "a connection was accepted without a passed ownership check"
    if scenario.unmasked and seen.close is not None and seen.close[0] == 1002:
        return  # refusing unmasked frames (RFC 6455 5.1) is the other correct answer
    assert seen.status == 101, f"upgrade answered {seen.status}"
    want = [t for t in expected.json if isinstance(t, str)]
    got = [t for t in types if t != "reconnect_messages"]
    if expected.end is not None and expected.end[0] in (-1, 1002, 1007, 1009):
        # The client closed, or aiohttp closed from inside its reader: replies still queued may be cut (the peer
        # is going or broken); what came must be a prefix of what was due.
        assert got == want[: len(got)], f"JSON frames {got}, expected a prefix of {want}"
    else:
        assert got == want, f"JSON frames {got}, expected {want}"
    assert seen.pongs == expected.pongs[: len(seen.pongs)], f"PONGs {seen.pongs}, expected {expected.pongs}"
    if expected.end is None:
        assert seen.pongs == expected.pongs, f"PONGs {seen.pongs}, expected {expected.pongs}"
        assert seen.close is not None and seen.close[0] == 1000, f"after our close: {seen.close}"
        return
    code, reasons = expected.end
    assert seen.close is not None, f"no close frame (dropped={seen.dropped}); expected {expected.end}"
    if code == -1:
        return
    assert seen.close[0] == code, f"closed {seen.close}, expected {code} {reasons}"
    if code == 1008:
        assert seen.close[1] in reasons, f"closed {seen.close}, expected one of {reasons}"


# -- the tests --------------------------------------------------------------------------------------------------

@pytest.fixture
async def start_edge_service(pg_dsn: str, tokens: Tokens, seed: Seeder) -> AsyncIterator[StartService]:
    async with edge_services(pg_dsn, tokens, seed) as start:
        yield start


@dataclass
class Stand:
    """The service under fuzz, its diagnoses and tokens, and a subscriber that must see nothing go wrong."""

    service: Service
    pool: TokenPool
    dids: dict[str, int]
    loop: asyncio.AbstractEventLoop

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


async def make_stand(start_service: StartService, **settings_overrides: Any) -> Stand:
    service = await start_service(rate_limit=1000, rate_burst=1000, **settings_overrides)
    owner, did = service.seed.owned()
    other, other_did = service.seed.owned()
    pool = TokenPool.mint(service, owner, other)
    return Stand(service, pool, {"owned": did, "other": other_did, "unknown": service.seed.unknown()},
                 asyncio.get_running_loop())


async def still_serving(stand: Stand) -> None:
    """After the fuzz: the process answers, a subscriber gets a publish, and no connection is left behind."""
    service = stand.service
    async with service.http.get(f"{service.base_url}/healthz") as resp:
        assert resp.status == 200
    client = await service.connect(stand.dids["owned"], stand.pool.tokens["owner"])
    result = await service.publish(stand.dids["owned"], "after_fuzz", {"ok": True})
    await client.wait_offset(result["offset"])
    await client.close()
    await eventually(lambda: service.node.hub.count == 0, 10)
    assert service.node.hub.count == 0, f"{service.node.hub.count} connection(s) left in the hub"


def fuzz_settings(default_examples: int) -> Callable[[Any], Any]:
    def wrap(test: Any) -> Any:
        return seed(SEED)(settings(max_examples=examples(default_examples), deadline=None, database=None,
                                   phases=[Phase.explicit, Phase.generate, Phase.shrink],
                                   suppress_health_check=list(HealthCheck))(test))
    return wrap


async def test_generated_frames_get_the_contracts_answer(start_edge_service: StartService) -> None:
    """The main fuzzer: a connection per example, checked against the oracle; CI: 300 examples, fixed seed."""
    stand = await make_stand(start_edge_service)
    deadline = time.monotonic() + budget(25.0)
    kinds = list(stand.pool.tokens)
    tried = {"examples": 0, "frames": 0}

    @fuzz_settings(300)
    @given(scenario=scenarios(kinds))
    def example(scenario: Scenario) -> None:
        if time.monotonic() > deadline:
            return
        scenario = Scenario(scenario.auth, scenario.token, scenario.target,
                            tuple(_with_tokens(f, stand.pool) for f in scenario.frames), scenario.unmasked)
        expected = expect(scenario, stand.pool)
        seen = stand.call(run(stand.service, scenario, stand.pool, stand.dids, expected))
        tried["examples"] += 1
        tried["frames"] += len(expected.wire)
        check(scenario, expected, seen)

    with trap_logs() as trap:
        await asyncio.to_thread(example)
        await still_serving(stand)
    trap.assert_clean()
    assert tried["examples"] >= 50, f"the time budget left the fuzzer nearly idle: {tried}"
    print(f"\nWebSocket fuzzer: {tried['examples']} connections, {tried['frames']} frames")


def _with_tokens(frame: Frame, pool: TokenPool) -> Frame:
    if isinstance(frame, Message) and not frame.binary:
        payload = substitute_tokens(frame.payload, pool)
        if payload != frame.payload:
            return Message(payload, frame.binary, frame.pieces, frame.pings, frame.masked)
    return frame


# -- named cases: the same oracle, each input spelled out ----------------------------------------------------------

NAMED: dict[str, tuple[str, str, list[Frame]]] = {
    "10,000 nested arrays as the first frame": ("frame", "", [Message(nested(10000, "array").encode())]),
    "10,000 nested objects after auth": ("header", "owner", [Message(nested(10000, "object").encode())]),
    "ack with 10,000 nested arrays": ("header", "owner",
                                      [Message(f'{{"type":"ack","offset":{nested(10000, "array")}}}'.encode())]),
    "ack with offset 0": ("header", "owner", [Message(b'{"type":"ack","offset":0}')]),
    "ack with 2**63 - 1": ("header", "owner", [Message(b'{"type":"ack","offset":9223372036854775807}')]),
    "ack with a negative offset": ("header", "owner", [Message(b'{"type":"ack","offset":-1}')]),
    "ack with 2**64": ("header", "owner", [Message(b'{"type":"ack","offset":18446744073709551616}')]),
    "ack with 1e400": ("header", "owner", [Message(b'{"type":"ack","offset":1e400}')]),
    "ack with a string": ("header", "owner", [Message(b'{"type":"ack","offset":"5"}')]),
    "ack with true": ("header", "owner", [Message(b'{"type":"ack","offset":true}')]),
    "auth with a numeric token": ("frame", "", [Message(b'{"type":"auth","token":12345}')]),
    "auth with since -1": ("frame", "", [Message(b'{"type":"auth","token":"owner","since":-1}')]),
    "auth with since 2**64": ("frame", "", [Message(b'{"type":"auth","token":"owner","since":18446744073709551616}')]),
    "auth with since of 5,000 nines": ("frame", "", [Message(b'{"type":"auth","token":"owner","since":"'
                                                             + b"9" * 5000 + b'"}')]),
    "auth with since a list": ("frame", "", [Message(b'{"type":"auth","token":"owner","since":[1]}')]),
    "auth with a huge sub": ("frame", "", [Message(b'{"type":"auth","token":"sub_huge"}')]),
    "auth with exp 10**400": ("frame", "", [Message(b'{"type":"auth","token":"exp_huge"}')]),
    "auth with exp true": ("frame", "", [Message(b'{"type":"auth","token":"exp_true"}')]),
    "refresh with another user's token": ("header", "owner", [Message(b'{"type":"auth","token":"other_user"}')]),
    "invalid UTF-8 before auth": ("frame", "", [Violation("utf8", wire(0x81, b"\xff\xfe"), 1007)]),
    "invalid UTF-8 after auth": ("header", "owner", [Violation("utf8", wire(0x81, b"\xc0\xaf"), 1007)]),
    "fragmented auth frame with a PING between": (
        "frame", "", [Message(b'{"type":"auth","token":"owner"}', pieces=(3, 9), pings=(b"a", b"b"))]),
    "PING of 126 bytes": ("header", "owner", [Violation("big ping", wire(0x89, b"p" * 126), 1002)]),
    "reserved opcode 0xB before auth": ("frame", "", [Violation("op", wire(0x8B, b""), 1002)]),
    "RSV1 without compression": ("header", "owner", [Violation("rsv1", wire(0xC1, b'{"type":"ping"}'), 1002)]),
    "message over the limit": ("header", "owner", [Violation("big", wire(0x81, b" " * (MAX_FRAME + 1)), 1009)]),
    "close with code 1005": ("header", "owner", [Violation("close", wire(0x88, struct.pack("!H", 1005)), 1002)]),
}


@pytest.mark.parametrize("name", list(NAMED))
async def test_named_input_gets_the_contracts_answer(start_edge_service: StartService, name: str) -> None:
    stand = await make_stand(start_edge_service)
    auth, token, frame_list = NAMED[name]
    scenario = Scenario(auth, token or "owner", "owned",
                        tuple(_with_tokens(_fill(f, stand.pool), stand.pool) for f in frame_list))
    expected = expect(scenario, stand.pool)
    with trap_logs() as trap:
        seen = await run(stand.service, scenario, stand.pool, stand.dids, expected)
        check(scenario, expected, seen)
        await still_serving(stand)
    trap.assert_clean()


def _fill(frame: Frame, pool: TokenPool) -> Frame:
    """Named cases write a token kind where a token goes."""
    if isinstance(frame, Message):
        for kind, token in pool.tokens.items():
            needle = f'"token":"{kind}"'.encode()
            if needle in frame.payload:
                return Message(frame.payload.replace(needle, f'"token":"{token}"'.encode()), frame.binary,
                               frame.pieces, frame.pings, frame.masked)
    return frame


@pytest.mark.parametrize("kind", list(TokenPool.OUTCOMES))
@pytest.mark.parametrize("method", ["header", "query", "frame"])
async def test_no_token_but_the_owners_is_ever_accepted(start_edge_service: StartService, method: str,
                                                        kind: str) -> None:
    """PROTOCOL 3.3: never a `connect` without a passed ownership check, however the token arrives."""
    stand = await make_stand(start_edge_service)
    with trap_logs() as trap:
        for target in ("owned", "other", "unknown"):
            frames_: tuple[Frame, ...] = ()
            if method == "frame":
                frames_ = (Message(json.dumps({"type": "auth", "token": stand.pool.tokens[kind]}).encode()),)
            scenario = Scenario(method, kind, target, frames_)
            expected = expect(scenario, stand.pool)
            seen = await run(stand.service, scenario, stand.pool, stand.dids, expected)
            check(scenario, expected, seen)
    trap.assert_clean()


async def test_unmasked_client_frames(start_edge_service: StartService) -> None:
    """RFC 6455 5.1: a server must close on an unmasked client frame (1002). The contract is silent; we accept
    either that or reading the frame as if masked, but never a crash or a `connect` without the owner's token."""
    stand = await make_stand(start_edge_service)
    with trap_logs() as trap:
        for auth, token, frame in [("frame", "other_user", Message(b'{"type":"auth","token":"other_user"}')),
                                   ("frame", "owner", Message(b'{"type":"auth","token":"owner"}')),
                                   ("header", "owner", Message(b'{"type":"ping"}'))]:
            scenario = Scenario(auth, token, "owned", (_fill(frame, stand.pool),), unmasked=True)
            expected = expect(scenario, stand.pool)
            seen = await run(stand.service, scenario, stand.pool, stand.dids, expected)
            check(scenario, expected, seen)
        await still_serving(stand)
    trap.assert_clean()


async def test_close_mid_handshake_leaves_nothing_behind(start_edge_service: StartService) -> None:
    """Clients that hang up during the upgrade, or right after it, or reset the connection: the service logs no
    error, keeps no connection, and answers the next client."""
    stand = await make_stand(start_edge_service)
    service = stand.service
    did = stand.dids["owned"]
    token = stand.pool.tokens["owner"]
    host, port = "127.0.0.1", service.server.port
    assert port is not None
    request = (f"GET /ws/{did} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\nSec-WebSocket-Version: 13\r\n"
               f"Authorization: Bearer {token}\r\n\r\n").encode()
    loop = asyncio.get_running_loop()

    async def hang_up(data: bytes, reset: bool, read_first: bool = False) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (host, port))
            if data:
                await loop.sock_sendall(sock, data)
            if read_first:
                await asyncio.wait_for(loop.sock_recv(sock, 1), READ_TIMEOUT)
            if reset:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            sock.close()

    cuts = [0, 5, 20, len(request) // 2, len(request) - 4, len(request) - 1, len(request)]
    with trap_logs() as trap:
        for _ in range(3):
            for cut in cuts:
                for reset in (False, True):
                    await hang_up(request[:cut], reset)
            for reset in (False, True):
                await hang_up(request, reset, read_first=True)  # after the 101 (and maybe the connect frame)
                await hang_up(request + wire(0x81, b'{"type":"ping"}'), reset, read_first=True)
                await hang_up(request + wire(0x88, struct.pack("!H", 1000)), reset)  # close before auth result
            auth_frame = wire(0x81, json.dumps({"type": "auth", "token": token}).encode())
            frame_request = request.replace(f"Authorization: Bearer {token}\r\n".encode(), b"")
            await hang_up(frame_request + auth_frame[:5], True)  # half an auth frame, then RST
            await hang_up(frame_request + auth_frame, True)  # the auth frame, then RST while it is checked
            # A refused upgrade (a malformed key) with frames already sent behind it: the frames then read as
            # a malformed HTTP request, which is the client's fault, not an error of the service (issue 9.7).
            bad_key = request.replace(b"Sec-WebSocket-Key: ", b"Sec-WebSocket-Key: not-base64-")
            await hang_up(bad_key + wire(0x81, b'{"type":"ping"}'), False, read_first=True)
        await still_serving(stand)
    trap.assert_clean()
