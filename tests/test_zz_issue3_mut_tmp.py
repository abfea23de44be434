from __future__ import annotations
import pytest
from realtime_service.node import Node
from realtime_service.connection import Connection
import tests.test_resume_property as prop

async def _noop(self, conn, offset):
    return None

def test_mut_confirm(pg_dsn, monkeypatch):
    monkeypatch.setattr(Node, "confirm", _noop)
    with pytest.raises(AssertionError) as info:
        prop.test_every_device_gets_every_broadcast_once_in_order(pg_dsn)
    print("CAUGHT", str(info.value)[:300])

def test_mut_live_dup(pg_dsn, monkeypatch):
    orig = Connection.deliver
    def twice(self, frame, offset):
        ok = orig(self, frame, offset)
        if offset == 5:
            orig(self, frame, offset)
        return ok
    monkeypatch.setattr(Connection, "deliver", twice)
    with pytest.raises(AssertionError) as info:
        prop.test_every_device_gets_every_broadcast_once_in_order(pg_dsn)
    print("CAUGHT", str(info.value)[:300])
