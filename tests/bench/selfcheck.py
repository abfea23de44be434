"""Self-checks of the harness's own logic (no server needed):

    .venv/bin/python -m tests.bench.selfcheck

Deliberately not named test_*.py: benchmarks stay out of the default pytest run.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time

from .run import kill_pid
from .stats import (
    count_offsets,
    median,
    parse_proc_stat_busy,
    parse_stat_cpu,
    parse_status_kb,
    percentile,
    proc_cpu_seconds,
    proc_rss_kb,
    summarize_latencies,
)
from .wire import (
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_TEXT,
    FrameParser,
    HTTPConn,
    encode_client_frame,
    encode_server_frame,
    mask_payload,
)


def check_percentiles() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    v = [float(i) for i in range(1, 101)]  # 1..100
    assert percentile(v, 0) == 1.0
    assert percentile(v, 100) == 100.0
    assert abs(percentile(v, 50) - 50.5) < 1e-9
    assert abs(percentile(v, 99) - 99.01) < 1e-9
    s = summarize_latencies([0.001, 0.002, 0.003])
    assert s["n"] == 3
    assert s["p50_ms"] == 2.0
    assert s["max_ms"] == 3.0
    assert median([3, 1, 2]) == 2
    assert median([1, 2, 3, 4]) == 2.5
    assert median([None, 7]) == 7
    assert median([]) is None


def check_proc() -> None:
    stat = "1234 (we ird) name)) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0 100 0 0"
    assert abs(parse_stat_cpu(stat) - 300 / os.sysconf("SC_CLK_TCK")) < 1e-9
    own = proc_cpu_seconds(os.getpid())
    assert own is not None
    assert own >= 0
    status = "Name:\tpython\nVmPeak:\t  1000 kB\nVmHWM:\t 900 kB\nVmRSS:\t  812 kB\n"
    assert parse_status_kb(status) == 812
    assert parse_status_kb(status, "VmHWM") == 900
    assert parse_status_kb("Name: x\n") is None
    rss = proc_rss_kb(os.getpid())
    assert rss is not None
    assert rss > 1000
    assert proc_cpu_seconds(2**22 + 12345) is None
    busy, steal = parse_proc_stat_busy("cpu  100 5 50 1000 7 3 2 9 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
    assert abs(busy - 160 / os.sysconf("SC_CLK_TCK")) < 1e-9
    assert abs(steal - 9 / os.sysconf("SC_CLK_TCK")) < 1e-9
    # a busy loop is visible in utime
    t0 = proc_cpu_seconds(os.getpid()) or 0.0
    end = time.process_time() + 0.2
    while time.process_time() < end:
        pass
    assert (proc_cpu_seconds(os.getpid()) or 0.0) - t0 >= 0.1


def check_offsets() -> None:
    counts = bytearray(10)
    for o in (1, 2, 2, 4, 9):
        counts[o] += 1
    assert count_offsets(counts, range(1, 6)) == (2, 1, 1)  # lost 3,5; dup 2; unexpected 9
    assert count_offsets(bytearray(3), [1, 2, 5]) == (3, 0, 0)


def check_frames() -> None:
    key = b"\x01\x02\x03\x04"
    assert mask_payload(mask_payload(b"hello world", key), key) == b"hello world"
    f = encode_client_frame(OP_CLOSE, (1000).to_bytes(2, "big"), key)
    assert f[0] == 0x88
    assert f[1] == 0x82
    assert f[2:6] == key
    assert mask_payload(f[6:], key) == b"\x03\xe8"
    big = encode_client_frame(OP_TEXT, b"x" * 70000, key)
    assert big[1] == 0x80 | 127
    assert int.from_bytes(big[2:10], "big") == 70000
    msgs = [b"a" * n for n in (0, 1, 125, 126, 127, 8192, 65535, 65536, 70000)]
    stream = b"".join(encode_server_frame(OP_TEXT, m) for m in msgs)
    stream += encode_server_frame(OP_TEXT, b"frag1-", fin=False) + encode_server_frame(OP_CONT, b"frag2")
    stream += encode_server_frame(OP_PING, b"p") + encode_server_frame(OP_CLOSE, b"\x03\xf5slow_consumer")
    rnd = random.Random(7)
    for _ in range(50):
        p = FrameParser()
        out = []
        i = 0
        while i < len(stream):
            n = rnd.choice((1, 2, 3, 7, 100, 5000, 100000))
            out += p.feed(stream[i : i + n])
            i += n
        assert [m for op, m in out if op == OP_TEXT] == [*msgs, b"frag1-frag2"], "frame reassembly"
        assert (OP_PING, b"p") in out
        assert out[-1] == (OP_CLOSE, b"\x03\xf5slow_consumer")
        assert int.from_bytes(out[-1][1][:2], "big") == 1013
        assert p.buf == b""


def check_http() -> None:
    loop = asyncio.new_event_loop()
    try:

        async def go() -> None:
            c = HTTPConn()

            class T(asyncio.Transport):
                def get_extra_info(self, name: str, default: object = None) -> None:
                    return None

                def write(self, _data: bytes) -> None:
                    pass

                def close(self) -> None:
                    pass

            c.connection_made(T())  # type: ignore[arg-type]
            resp = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{"offset": 7}'
            for chunks in ([resp], [resp[:5], resp[5:40], resp[40:]], [bytes([b]) for b in resp]):
                fut = asyncio.ensure_future(c.request(b"x"))
                await asyncio.sleep(0)
                for ch in chunks:
                    c.data_received(ch)
                status, body = await fut
                assert status == 200
                assert body == b'{"offset": 7}', body
            fut = asyncio.ensure_future(c.request(b"x"))
            await asyncio.sleep(0)
            c.data_received(b"HTTP/1.1 422 Unprocessable\r\ncontent-length: 2\r\n\r\n{}")
            assert await fut == (422, b"{}")

        loop.run_until_complete(go())
    finally:
        loop.close()


def check_kill() -> None:
    # a child that ignores SIGTERM is still gone after kill_pid
    p = subprocess.Popen(
        [sys.executable, "-c", "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"]
    )
    time.sleep(0.3)
    t = time.monotonic()
    kill_pid(p.pid, grace=0.5)
    assert time.monotonic() - t < 3
    assert p.poll() is not None or not os.path.exists(f"/proc/{p.pid}")


def main() -> int:
    for fn in (check_percentiles, check_proc, check_offsets, check_frames, check_http, check_kill):
        fn()
        print(f"ok  {fn.__name__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
