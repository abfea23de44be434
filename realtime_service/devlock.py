"""One `realtime-service dev` per data folder: a second one is told where the first runs, never to stop it.

The lock is an exclusive `flock` on a file in the data folder, held for the life of the process, so it vanishes
with the process however it ends (no stale pid files). The file also says where the running one listens.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import IO


class AlreadyRunning(Exception):
    """Another `dev` holds this data folder; the message says where it runs and how to start a second one."""


class DevLock:
    """The data folder's lock; `describe()` records where this `dev` listens, for a second one to read."""

    def __init__(self, data_dir: Path) -> None:
        self._path = data_dir / "dev.lock"
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock, or raise AlreadyRunning naming the process that has it."""
        handle = open(self._path, "a+")  # noqa: SIM115 - held open until release()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            info = _parse(handle.read())
            handle.close()
            raise AlreadyRunning(_running_message(self._path.parent, info)) from None
        self._file = handle

    def describe(self, console: str) -> None:
        """Record this process and its console URL in the lock file."""
        if self._file is None:
            return
        self._file.seek(0)
        self._file.truncate()
        self._file.write(json.dumps({"pid": os.getpid(), "console": console}))
        self._file.flush()

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _parse(text: str) -> dict[str, object]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _running_message(folder: Path, info: dict[str, object]) -> str:
    pid = f" (pid {info['pid']})" if isinstance(info.get("pid"), int) else ""
    console = info.get("console")
    where = f"; its console is {console}" if isinstance(console, str) else " (it is still starting)"
    return (f"another `dev` is already running in {folder}{pid}{where}. Use that one, or start a second "
            "one with its own folder and port: realtime-service dev --data-dir .realtime-dev-2 --port 8081")
