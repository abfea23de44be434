"""The local registry diagnosis -> connections, and synchronous fan-out into their outboxes."""

from __future__ import annotations

from collections.abc import Iterator

from realtime_service.connection import Connection
from realtime_service.protocol import wsframe


class Hub:
    """Connections of this node, by diagnosis. Fan-out never awaits: a slow client only closes itself."""

    def __init__(self) -> None:
        self._by_diagnosis: dict[int, dict[str, Connection]] = {}
        self._count = 0

    def add(self, conn: Connection) -> bool:
        """Register; True when it is the first local connection of its diagnosis."""
        conns = self._by_diagnosis.get(conn.diagnosis_id)
        first = conns is None
        if conns is None:
            conns = self._by_diagnosis[conn.diagnosis_id] = {}
        if conn.session not in conns:
            conns[conn.session] = conn
            self._count += 1
        return first

    def remove(self, conn: Connection) -> bool:
        """Unregister; True when it was the last local connection of its diagnosis."""
        conns = self._by_diagnosis.get(conn.diagnosis_id)
        if conns is None or conns.pop(conn.session, None) is None:
            return False
        self._count -= 1
        if not conns:
            del self._by_diagnosis[conn.diagnosis_id]
            return True
        return False

    def fanout(self, diagnosis_id: int, frame: bytes, offset: int | None, exclude_session: str | None = None,
               user_id: int | None = None) -> int:
        """Hand one encoded frame to every matching connection; returns how many took it.

        The frame is WebSocket-framed here, once, and the same bytes go to every outbox.
        """
        conns = self._by_diagnosis.get(diagnosis_id)
        if not conns:
            return 0
        frame = wsframe.text(frame)
        delivered = 0
        for conn in list(conns.values()):
            if conn.session == exclude_session or (user_id is not None and conn.user_id != user_id):
                continue
            if conn.deliver(frame, offset):
                delivered += 1
        return delivered

    def connections(self, diagnosis_id: int) -> list[Connection]:
        return list(self._by_diagnosis.get(diagnosis_id, {}).values())

    def all(self) -> Iterator[Connection]:
        for conns in list(self._by_diagnosis.values()):
            yield from list(conns.values())

    def diagnoses(self) -> list[int]:
        return list(self._by_diagnosis)

    @property
    def count(self) -> int:
        return self._count

    @property
    def diagnosis_count(self) -> int:
        return len(self._by_diagnosis)
