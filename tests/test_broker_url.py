"""REALTIME_REDIS_URL as operators write it (PROTOCOL 5.1): a password and a database number in the URL are used."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from realtime_service.broker.redis import RedisBroker
from realtime_service.protocol import frames
from tests.conftest import free_port

PASSWORD = "s3cret-broker-pass"


@pytest.fixture(scope="module")
def guarded_redis() -> Iterator[int]:
    binary = shutil.which("redis-server")
    assert binary is not None, "redis-server is not on PATH (tests/run.sh installs it)"
    workdir = Path(tempfile.mkdtemp(prefix="realtime-test-redis-auth-"))
    port = free_port()
    process = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly",
                                "no", "--dir", str(workdir), "--requirepass", PASSWORD],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None, "redis-server did not start"
                time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def broker(url: str) -> RedisBroker:
    return RedisBroker(url, prefix="url", history_size=10, history_max_bytes=1 << 20, history_ttl=60,
                       inbox_size=10, idempotency_ttl=600, timeout=1.0)


async def test_password_and_database_from_the_url_are_used(guarded_redis: int) -> None:
    node = broker(f"redis://:{PASSWORD}@127.0.0.1:{guarded_redis}/5")
    seen: list[int] = []
    node.set_handler(lambda publication: seen.append(publication.offset))
    await node.start()
    try:
        await node.ping()
        await node.subscribe(1)
        assert (await node.publish(1, frames.broadcast_body("t", 1, {}))).offset == 1
        assert seen == [1]  # the pub/sub link authenticated too
    finally:
        await node.close()
    check = redis.Redis(host="127.0.0.1", port=guarded_redis, password=PASSWORD, db=5)
    try:
        assert check.exists(node.keys.stream(1)) == 1  # in database 5, not 0
        assert redis.Redis(host="127.0.0.1", port=guarded_redis, password=PASSWORD, db=0).dbsize() == 0
    finally:
        check.close()
