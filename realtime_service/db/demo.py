"""Seeds a few demo users and diagnoses so ``realtime-service dev`` has something to subscribe to."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import psycopg2

# (id, name) and (id, owner, title): user 456 owns two diagnoses, 457 owns one, so "not yours" is testable.
_USERS = ((456, "Demo patient"), (457, "Other patient"))
_DIAGNOSES = ((123, 456, "Demo diagnosis"), (124, 456, "Second demo diagnosis"), (125, 457, "Someone else's"))


@dataclass(frozen=True)
class DemoData:
    """What the demo database holds: users, diagnoses and who owns each diagnosis."""

    user_ids: tuple[int, ...]
    diagnosis_ids: tuple[int, ...]
    owner_of: Mapping[int, int]

    def diagnoses_of(self, user_id: int) -> tuple[int, ...]:
        """The demo diagnoses ``user_id`` may subscribe to."""
        return tuple(d for d in self.diagnosis_ids if self.owner_of[d] == user_id)


def seed_demo(dsn: str) -> DemoData:
    """Insert the demo rows unless present (idempotent) and return what the database now says about them."""
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO users (id, name) VALUES (%s, %s) ON CONFLICT (id) DO NOTHING", _USERS
            )
            cur.executemany(
                "INSERT INTO diagnoses (id, user_id, title) VALUES (%s, %s, %s) ON CONFLICT (id) DO NOTHING",
                _DIAGNOSES,
            )
            # Read back rather than trust the constants: a pre-existing row keeps its own owner.
            cur.execute(
                "SELECT id, user_id FROM diagnoses WHERE id = ANY(%s) ORDER BY id",
                ([d[0] for d in _DIAGNOSES],),
            )
            owners: dict[int, int] = {int(row[0]): int(row[1]) for row in cur.fetchall()}
    finally:
        conn.close()
    return DemoData(
        user_ids=tuple(u[0] for u in _USERS),
        diagnosis_ids=tuple(owners),
        owner_of=MappingProxyType(owners),
    )
