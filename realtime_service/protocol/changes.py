"""`changed_fields` of a recommendation update (PROTOCOL 3.4)."""

from __future__ import annotations

from typing import Any

import orjson


def _canonical(value: Any) -> bytes:
    # JSON equality, not Python equality: 1, 1.0 and true are different values on the wire.
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Top-level keys whose values differ, a key on one side only included (whatever its value), sorted."""
    keys = set(old) | set(new)
    return sorted(k for k in keys if k not in old or k not in new or _canonical(old[k]) != _canonical(new[k]))
