"""Faults survived (issue 9): SIGTERM in the middle of a publish burst against a real `realtime-service serve`.

Node A runs on a private key prefix of the session's Redis. Subscribers connect, four publishers post as fast as
A answers, and A gets SIGTERM after the first 60 answers. The publishers keep going until A is gone. Then node B
starts on the same Redis and every subscriber resumes there with `since`/`epoch`, as PROTOCOL 3.7 tells it to.

What must hold (PROTOCOL 4 and 3.7):
- every publish answered 200 is in history with the offset it was given, and reached every subscriber (live on
  A, or in its `reconnect_messages` on B);
- every publish answered with an error status is never delivered and is not in history;
- each subscriber's received offsets are 1..newest exactly: no loss, no duplicate, in order; `recovered` is true;
- A closes its connections `1012 service_restart` and exits 0.
A publish whose connection broke without an answer may have landed or not; those are counted, not judged.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from tests.cluster import HTTP_TIMEOUT, NodeProcess, assert_gapless, broadcasts, free_port, node_env, unique_prefix
from tests.support import Client, Seeder, Tokens

SUBSCRIBERS = 5
PUBLISHERS = 4
SIGTERM_AFTER = 60  # answers before the signal
BURST_LIMIT = 3000  # publishes at most, whatever happens


async def test_sigterm_mid_burst_loses_nothing_and_delivers_no_refused_publish(
        pg_dsn: str, redis_url: str, tmp_path: Path) -> None:
    tokens, seeder = Tokens(), Seeder(pg_dsn)
    prefix = unique_prefix("sigterm")
    settings = {"history_size": 10000, "drain_period": 1, "shutdown_grace": 10}
    node_a = NodeProcess("a", node_env(dsn=pg_dsn, redis_url=redis_url, prefix=prefix, port=free_port(),
                                       **settings), tmp_path)
    node_b = NodeProcess("b", node_env(dsn=pg_dsn, redis_url=redis_url, prefix=prefix, port=free_port(),
                                       **settings), tmp_path)
    uid, did = seeder.owned()
    service = tokens.service()
    try:
        await asyncio.to_thread(node_a.start)
        async with aiohttp.ClientSession() as http:
            subscribers = [await _connect(http, node_a.ws_url(did, device=f"d{i}"), tokens.user(uid))
                           for i in range(SUBSCRIBERS)]
            epoch = subscribers[0].frames[0]["data"]["epoch"]

            answers: dict[int, tuple[str, Any]] = {}  # n -> ("ok", offset) | ("refused", status) | ("lost", exc)
            counter = iter(range(1, BURST_LIMIT + 1))
            signalled = asyncio.Event()
            after_signal: list[int] = []  # publishes answered 200 after SIGTERM was sent

            async def publisher() -> None:
                for n in counter:
                    # one in seven is invalid (a reserved type): answered 422, it must never be delivered
                    body = {"diagnosis_id": did, "type": "connect" if n % 7 == 0 else "burst", "data": {"n": n}}
                    try:
                        async with http.post(f"{node_a.base_url}/api/v1/publish", json=body, timeout=HTTP_TIMEOUT,
                                             headers={"Authorization": f"Bearer {service}"}) as resp:
                            payload = await resp.json(content_type=None)
                            answers[n] = ("ok", payload["offset"]) if resp.status == 200 else ("refused",
                                                                                                resp.status)
                            if signalled.is_set() and resp.status == 200:
                                after_signal.append(n)
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        answers[n] = ("lost", type(exc).__name__)
                        if not node_a.alive:
                            return
                        await asyncio.sleep(0.01)  # refused while A closes its listener: try the next one
                    if len(answers) == SIGTERM_AFTER and not signalled.is_set():
                        signalled.set()
                        assert node_a.process is not None
                        node_a.process.send_signal(signal.SIGTERM)
                    if signalled.is_set() and not node_a.alive:
                        return

            await asyncio.wait_for(asyncio.gather(*(publisher() for _ in range(PUBLISHERS))), 60)
            assert signalled.is_set(), f"the burst ended before the signal: {Counter(a[0] for a in answers.values())}"
            code = await asyncio.to_thread(node_a.terminate, 20)
            assert code == 0, f"node A exited {code}:\n{node_a.log_tail()}"
            for sub in subscribers:
                await sub.wait_closed(15)
                assert (sub.close_code, sub.close_reason) == (1012, "service_restart"), (sub.close_code,
                                                                                         sub.close_reason)

            # B on the same Redis: each subscriber resumes from the last offset it received
            await asyncio.to_thread(node_b.start)
            resumed = []
            for i, sub in enumerate(subscribers):
                last = max((f["offset"] for f in broadcasts(sub)), default=0)
                resumed.append(await _connect(http, node_b.ws_url(did, device=f"d{i}", since=last, epoch=epoch),
                                              tokens.user(uid)))
            history_client = await _connect(http, node_b.ws_url(did, device="auditor", since=0, epoch=epoch),
                                            tokens.user(uid))
            for client in [*resumed, history_client]:
                await client.next_of("reconnect_messages")

            ok = {n: value for n, (kind, value) in answers.items() if kind == "ok"}
            refused = {n for n, (kind, _) in answers.items() if kind == "refused"}
            history = {f["data"]["n"]: f["offset"] for f in broadcasts(history_client)}
            newest = max(history.values(), default=0)
            assert_gapless(sorted(history.values()), 1, newest, "history on B")
            assert ok, "no publish was answered 200"
            assert refused, "no publish was refused"
            assert after_signal, "no publish was answered after the signal: it did not land mid-burst"
            for n, offset in ok.items():
                assert history.get(n) == offset, f"publish {n} answered 200 with offset {offset}: {history.get(n)}"
            assert not refused & set(history), f"refused publishes in history: {sorted(refused & set(history))}"
            for i, (before, after) in enumerate(zip(subscribers, resumed, strict=True)):
                frames = broadcasts(before) + broadcasts(after)
                assert_gapless([f["offset"] for f in frames], 1, newest, f"subscriber d{i} over A then B")
                assert not refused & {f["data"]["n"] for f in frames}, f"d{i} received a refused publish"
                assert after.of_type("reconnect_messages")[0]["data"]["recovered"] is True
            counts = Counter(kind for kind, _ in answers.values())
            lost_landed = sum(1 for n, (kind, _) in answers.items() if kind == "lost" and n in history)
            print(f"\nSIGTERM mid-burst: {counts['ok']} answered 200 ({len(after_signal)} after the signal), "
                  f"{counts['refused']} refused, {counts['lost']} without an answer ({lost_landed} of them landed); "
                  f"history 1..{newest}; {SUBSCRIBERS} subscribers gapless over A then B")
            for client in [*resumed, history_client]:
                await client.close()
    finally:
        for node in (node_a, node_b):
            with contextlib.suppress(Exception):
                await asyncio.to_thread(node.kill)


async def _connect(http: aiohttp.ClientSession, url: str, token: str) -> Client:
    ws = await http.ws_connect(url, headers={"Authorization": f"Bearer {token}"}, autoping=True, max_msg_size=0,
                               timeout=aiohttp.ClientWSTimeout(ws_close=5))
    client = Client(ws).start()
    await client.wait(lambda c: c.frames, "the connect frame")
    assert client.frames[0]["type"] == "connect", client.frames[0]
    return client
