"""The example load balancer configurations (config/haproxy.cfg, config/nginx.conf) keep what several nodes need.

A balancer that cuts an idle WebSocket before the server's next PING drops healthy clients, one that does not
pass the upgrade headers never reaches a node, and one that never asks /readyz keeps sending clients to a node
that cannot serve them. These checks hold the examples to the service's defaults (docs/operations.md).
"""

from __future__ import annotations

import re
from pathlib import Path

from realtime_service.settings import Settings

CONFIG = Path(__file__).resolve().parent.parent / "config"
LONGER_THAN = 2 * Settings().heartbeat  # PROTOCOL 3.6: a silent client is dropped within 2 x heartbeat


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", value)
    assert match, f"not a duration: {value!r}"
    number, unit = float(match.group(1)), match.group(2) or "s"
    return number * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def test_haproxy_keeps_websockets_longer_than_two_heartbeats_and_checks_readiness() -> None:
    text = (CONFIG / "haproxy.cfg").read_text()
    timeouts = dict(re.findall(r"^\s*timeout (tunnel|client|server) (\S+)", text, re.MULTILINE))
    for name in ("tunnel", "client", "server"):
        assert seconds(timeouts[name]) > LONGER_THAN, f"timeout {name} {timeouts[name]} <= 2 x heartbeat"
    assert re.search(r"http-check send meth GET uri /readyz", text)
    assert re.search(r"http-check expect status 200", text)
    assert not re.search(r"^\s*[^#\s].*on-marked-down shutdown-sessions", text, re.MULTILINE), \
        "a node marked down must keep its open connections (PROTOCOL 5.3)"
    assert "balance leastconn" in text
    # No stickiness: the point of the broker is that any node serves any client.
    assert not re.search(r"^\s*(stick|cookie|balance source)", text, re.MULTILINE)


def test_nginx_passes_the_upgrade_and_keeps_websockets_longer_than_two_heartbeats() -> None:
    text = re.sub(r"#.*", "", (CONFIG / "nginx.conf").read_text())  # directives only
    ws = re.search(r"location /ws/ \{(.*?)\n    \}", text, re.DOTALL)
    assert ws, "no location /ws/"
    block = ws.group(1)
    assert "proxy_http_version 1.1;" in block
    assert "proxy_set_header Upgrade $http_upgrade;" in block
    assert "proxy_set_header Connection $connection_upgrade;" in block
    for name in ("proxy_read_timeout", "proxy_send_timeout"):
        value = re.search(rf"{name} (\S+);", block)
        assert value and seconds(value.group(1)) > LONGER_THAN, f"{name} must exceed 2 x heartbeat"
    assert "ip_hash" not in text and "sticky" not in text
