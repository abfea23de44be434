"""Faults survived (issue 9): a client that vanishes without a FIN. PROTOCOL 3.6: found by the heartbeat, freed.

The client is a real process (a small aiohttp program that prints every broadcast it processes and resumes with
`since`/`epoch` when its connection ends). SIGSTOP freezes it: its kernel still acknowledges TCP segments, so
nothing on the server's side sees it go; only the missing PONGs do. Within 2 x heartbeat the server must drop it
(presence empty, the hub count back, the `heartbeat_timeout` close counted), while another subscriber keeps
receiving. After SIGCONT the client resumes and, in the end, has processed every broadcast exactly once, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time

from tests.fixtures_app import StartService
from tests.fuzzing import eventually

HEARTBEAT = 1.0

CLIENT = r"""
import asyncio, json, sys
import aiohttp

async def main(url, token):
    since = epoch = None
    async with aiohttp.ClientSession() as http:
        while True:
            query = {"device": "frozen"}
            if since is not None:
                query.update(since=str(since), epoch=epoch)
            try:
                async with http.ws_connect(url, params=query, headers={"Authorization": "Bearer " + token},
                                           autoping=True, max_msg_size=0) as ws:
                    async for msg in ws:
                        if msg.type is not aiohttp.WSMsgType.TEXT:
                            continue
                        frame = json.loads(msg.data)
                        if frame["type"] == "connect":
                            epoch = frame["data"]["epoch"]
                            print(json.dumps({"connect": frame["data"]["offset"]}), flush=True)
                        frames = frame["data"]["messages"] if frame["type"] == "reconnect_messages" else [frame]
                        for f in frames:
                            if isinstance(f.get("offset"), int):
                                since = f["offset"]
                                print(json.dumps({"offset": f["offset"]}), flush=True)
            except aiohttp.ClientError:
                pass
            print(json.dumps({"closed": True}), flush=True)
            await asyncio.sleep(0.2)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_a_frozen_client_is_dropped_by_the_heartbeat_and_loses_nothing(start_service: StartService) -> None:
    service = await start_service(heartbeat=HEARTBEAT)
    uid, did = service.seed.owned()
    token = service.tokens.user(uid)
    witness = await service.connect(did, token, device="witness")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", CLIENT, service.ws_url(did), token,
                                                stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    assert proc.stdout is not None
    lines: list[dict[str, object]] = []

    async def read() -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            lines.append(json.loads(line))

    reader = asyncio.create_task(read())

    def offsets() -> list[object]:
        return [entry["offset"] for entry in lines if "offset" in entry]

    async def presence() -> list[dict[str, object]]:
        async with service.http.get(f"{service.base_url}/api/v1/diagnoses/{did}/presence",
                                    headers={"Authorization": f"Bearer {service.tokens.service()}"}) as resp:
            users: list[dict[str, object]] = (await resp.json())["users"]
            return users

    try:
        assert await eventually(lambda: any("connect" in entry for entry in lines), 15), lines
        for n in range(1, 6):
            await service.publish(did, "note", {"n": n})
        assert await eventually(lambda: offsets() == [1, 2, 3, 4, 5], 10), lines
        assert [u["connections"] for u in await presence()] == [2]

        proc.send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        for n in range(6, 11):
            await service.publish(did, "note", {"n": n})
        assert await eventually(lambda: service.node.hub.count == 1, 2 * HEARTBEAT + 2), "the frozen client stayed"
        dropped_after = time.monotonic() - frozen_at
        assert dropped_after <= 2 * HEARTBEAT + 1, f"dropped after {dropped_after:.1f} s"
        assert [u["connections"] for u in await presence()] == [1]
        async with service.http.get(f"{service.base_url}/metrics") as resp:
            metrics = await resp.text()
        assert 'realtime_disconnects_total{reason="heartbeat_timeout"} 1.0' in metrics
        await witness.wait_offset(10)  # the others never waited for it

        proc.send_signal(signal.SIGCONT)
        assert await eventually(lambda: sum("connect" in entry for entry in lines) >= 2, 15), lines
        for n in range(11, 13):
            await service.publish(did, "note", {"n": n})
        assert await eventually(lambda: offsets()[-1:] == [12], 10), lines
        assert offsets() == list(range(1, 13)), f"the resumed client's sequence: {offsets()}"
        assert witness.offsets() == list(range(1, 13))
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        await proc.wait()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await witness.close()
