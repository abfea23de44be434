"""Connection limits of PROTOCOL 3.11, without aiohttp: who the client is, how fast it may connect, how many
connections a user may hold.

The per-user count goes through `ConnectionCounter`, so one node counts locally and a cluster can count in Redis
(all of a user's connections over all nodes) without the adapter changing.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Protocol

from realtime_service.protocol.ratelimit import TokenBucket

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_TRACKED_ADDRESSES = 100_000
IPV6_PREFIX = 64  # one IPv6 subscriber usually holds a whole /64: count it as one address


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """CIDRs (or single addresses) as networks; raises ValueError naming the bad one."""
    networks: list[Network] = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or CIDR") from None
    return tuple(networks)


def parse_address(value: str) -> Address | None:
    """An address as a peer or a proxy writes it: `1.2.3.4`, `1.2.3.4:5678`, `::1`, `[::1]:80`; None if not one."""
    text = value.strip().strip('"')
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]  # IPv4 with a port (some proxies add it)
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: Address, trusted: Sequence[Network]) -> bool:
    return any(address.version == net.version and address in net for net in trusted)


def client_address(peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[Network]) -> str:
    """The client's address: the socket's peer, or, when the peer is a trusted proxy, the right-most address of
    X-Forwarded-For that is not a trusted proxy (PROTOCOL 3.11).

    Only the peer's own header is believed: entries left of the first untrusted one could be written by anyone.
    An entry that is not an address stops the walk at the proxy that forwarded it.
    """
    peer_address = parse_address(peer) if peer else None
    if peer_address is None:
        return peer or "unknown"
    if not trusted or not _trusted(peer_address, trusted):
        return str(peer_address)
    hops = [hop for header in forwarded_for for hop in header.split(",") if hop.strip()]
    current = peer_address
    for hop in reversed(hops):
        address = parse_address(hop)
        if address is None:
            return str(current)
        current = address
        if not _trusted(address, trusted):
            return str(address)
    return str(current)  # every hop is a trusted proxy: the left-most one is as close to the client as it gets


def rate_key(address: str) -> str:
    """What the connect rate counts by: the address, or its /64 for IPv6."""
    parsed = parse_address(address)
    if isinstance(parsed, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((parsed, IPV6_PREFIX), strict=False))
    return address


class ConnectRateLimiter:
    """A token bucket per client address (`rate` per second sustained, `burst` at once); pure: the caller passes
    the clock. Memory is bounded: the least recently seen addresses are forgotten first (a forgotten address
    starts again with a full bucket, which only ever errs towards letting a client in)."""

    __slots__ = ("_buckets", "_burst", "_max", "_rate")

    def __init__(self, rate: float, burst: int, max_tracked: int = MAX_TRACKED_ADDRESSES) -> None:
        self._rate = rate
        self._burst = burst if burst > 0 else max(1, math.ceil(rate))
        self._max = max_tracked
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self._rate > 0

    def allow(self, key: str, now: float) -> float:
        """0.0 when this attempt is allowed, else the seconds until the next one would be."""
        if not self.enabled:
            return 0.0
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self._rate, self._burst, now)
            while len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        if bucket.take(now):
            return 0.0
        return 1.0 / self._rate  # a refused attempt spends nothing, so one token is at most 1/rate away

    def __len__(self) -> int:
        return len(self._buckets)


class ConnectionCounter(Protocol):
    """Counts every user's open connections, for REALTIME_MAX_CONNECTIONS_PER_USER.

    One node counts locally (`LocalConnectionCounter`); a cluster backs it with the broker so the limit holds over
    all nodes. `session` is the connection's unique id: releasing twice, or a session never acquired, is a no-op.
    """

    async def acquire(self, user_id: int, session: str, limit: int) -> bool:
        """Count this connection for the user; False (and nothing counted) when the user already holds `limit`."""

    async def release(self, user_id: int, session: str) -> None:
        """The connection closed: stop counting it."""


class LocalConnectionCounter:
    """This node's connections per user."""

    __slots__ = ("_sessions",)

    def __init__(self) -> None:
        self._sessions: dict[int, set[str]] = {}

    async def acquire(self, user_id: int, session: str, limit: int) -> bool:
        sessions = self._sessions.setdefault(user_id, set())
        if session not in sessions and len(sessions) >= limit:
            if not sessions:
                del self._sessions[user_id]
            return False
        sessions.add(session)
        return True

    async def release(self, user_id: int, session: str) -> None:
        sessions = self._sessions.get(user_id)
        if sessions is None:
            return
        sessions.discard(session)
        if not sessions:
            del self._sessions[user_id]

    def count(self, user_id: int) -> int:
        return len(self._sessions.get(user_id, ()))
