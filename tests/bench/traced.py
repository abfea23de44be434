"""`realtime-service serve` with tracemalloc on, for `profile.py memory` (not a scenario server).

SIGUSR1 writes a tracemalloc snapshot to $BENCH_TRACE_DIR/snap-<n>.pickle (n counts from 0) and then creates
snap-<n>.done, so the driver knows the file is whole. Frames are kept 25 deep, so an allocation can be charged
to the code that asked for it, not only to the stdlib function that made the object.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType


def main() -> int:
    out = Path(os.environ["BENCH_TRACE_DIR"])
    count = [0]
    from realtime_service.cli import main as cli_main
    from realtime_service.web import app  # noqa: F401 - imported before tracing: imports under it take minutes

    tracemalloc.start(25)

    def dump(_signum: int, _frame: FrameType | None) -> None:
        gc.collect()
        n = count[0]
        count[0] += 1
        tracemalloc.take_snapshot().dump(str(out / f"snap-{n}.pickle"))
        (out / f"snap-{n}.done").write_text("")

    signal.signal(signal.SIGUSR1, dump)
    return cli_main(["serve", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
