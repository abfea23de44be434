"""`GET /metrics` (PROTOCOL 4): Prometheus text that parses, counters that follow what users do, bounded labels
that never carry an id or a token, and one registry per app."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures_app import Service, StartService

EXPECTED_FAMILIES = {
    "realtime_build_info", "realtime_connections", "realtime_connection_attempts", "realtime_disconnects",
    "realtime_publishes", "realtime_deliveries", "realtime_fanout_seconds", "realtime_outbox_bytes",
    "realtime_slow_consumer_closes", "realtime_ownership_query_seconds", "realtime_ownership_lookups",
    "realtime_broker_errors", "realtime_broker_reconnects", "realtime_broker_gap_fills", "realtime_broker_catchups",
    "realtime_http_requests",
}


class Scrape:
    """One parsed scrape: sample values by name and labels, and every label value seen."""

    def __init__(self, text: str) -> None:
        self.families = {family.name: family for family in text_string_to_metric_families(text)}
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in self.families.values():
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def label_values(self) -> set[str]:
        return {value for (_name, labels) in self.samples for _key, value in labels}


async def scrape(service: Service) -> Scrape:
    async with service.http.get(f"{service.base_url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        return Scrape(await resp.text())


async def scrape_until(service: Service, ready: Callable[[Scrape], bool], what: str, timeout: float = 5.0
                       ) -> Scrape:
    """Scrape until the server side has caught up (a client's close returns before the server's cleanup)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        current = await scrape(service)
        if ready(current):
            return current
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def delta(after: Scrape, before: Scrape, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


async def test_text_format_parses_with_every_family_and_known_series_at_zero(service: Service) -> None:
    first = await scrape(service)
    assert set(first.families) >= EXPECTED_FAMILIES
    assert first.families["realtime_connection_attempts"].type == "counter"
    assert first.families["realtime_fanout_seconds"].type == "histogram"
    assert first.families["realtime_connections"].type == "gauge"
    # Known outcomes exist before the first event, so rate() and alerts need no absent().
    for outcome in ("accepted", "forbidden", "invalid_token", "ownership_unavailable", "slow_consumer"):
        assert ("realtime_connection_attempts_total", frozenset({("outcome", outcome)})) in first.samples
    assert first.value("realtime_build_info", version="1.0.0") == 1
    assert first.value("realtime_connections") == 0


async def test_counters_follow_connects_publishes_and_refusals(service: Service) -> None:
    uid, did = service.seed.owned()
    stranger = service.tokens.user(service.seed.user())
    before = await scrape(service)

    client = await service.connect(did, service.tokens.user(uid))
    refused = await service.open(did, stranger, "header")
    assert await refused.wait_closed() == 1008
    bad = await service.open(did, "not-a-jwt", "auth_frame")
    assert await bad.wait_closed() == 1008
    await service.publish(did, "note", {"n": 1})
    await client.next_of("note")
    await service.publish(did, "private_note", {"n": 2}, user_id=uid)
    await client.next_of("private_note")
    open_now = await scrape(service)

    assert delta(open_now, before, "realtime_connection_attempts_total", outcome="accepted") == 1
    assert delta(open_now, before, "realtime_connection_attempts_total", outcome="forbidden") == 1
    assert delta(open_now, before, "realtime_connection_attempts_total", outcome="invalid_token") == 1
    assert open_now.value("realtime_connections") == 1
    assert delta(open_now, before, "realtime_publishes_total", kind="broadcast") == 1
    assert delta(open_now, before, "realtime_publishes_total", kind="personal") == 1
    assert delta(open_now, before, "realtime_deliveries_total") == 2
    assert delta(open_now, before, "realtime_fanout_seconds_count") == 1
    lookups = sum(delta(open_now, before, "realtime_ownership_lookups_total", result=r)
                  for r in ("hit", "miss", "shared"))
    assert lookups >= 4  # two admissions, two publish checks (and the personal target)
    assert delta(open_now, before, "realtime_ownership_query_seconds_count", result="ok") >= 1

    await client.close()
    closed = await scrape_until(service, lambda s: s.value("realtime_connections") == 0, "the server to detach")
    disconnects = {reason: delta(closed, open_now, "realtime_disconnects_total", reason=reason)
                   for (name, labels) in closed.samples if name == "realtime_disconnects_total"
                   for _key, reason in labels}
    assert sum(disconnects.values()) == 1, disconnects  # one close, whatever word the core gives a client's own


async def test_no_label_carries_an_id_or_a_token(service: Service) -> None:
    uid, did = service.seed.owned()
    client = await service.connect(did, service.tokens.user(uid), device="phone-of-patient")
    await service.publish(did, "note", {"secret": "x"})
    await client.next_of("note")
    refused = await service.open(service.seed.unknown(), service.tokens.user(uid), "query")
    assert await refused.wait_closed() == 1008
    async with service.http.get(f"{service.base_url}/metrics?token={service.tokens.service()}") as resp:
        text = await resp.text()
    values = Scrape(text).label_values()
    forbidden: list[Any] = [str(uid), str(did), "phone-of-patient", *service.tokens.minted]
    leaks = [(needle, value) for needle in forbidden for value in values if str(needle) in value]
    assert not leaks, leaks
    for secret in service.tokens.minted:
        assert secret not in text
    await client.close()


async def test_each_app_has_its_own_registry(start_service: StartService) -> None:
    one, two = await start_service(), await start_service()
    uid, did = one.seed.owned()
    client = await one.connect(did, one.tokens.user(uid))
    assert (await scrape(one)).value("realtime_connection_attempts_total", outcome="accepted") == 1
    assert (await scrape(two)).value("realtime_connection_attempts_total", outcome="accepted") == 0
    await client.close()
