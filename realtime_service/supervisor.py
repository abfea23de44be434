"""`serve --workers N` (PROTOCOL 5.4): N worker processes on one port, started, watched, restarted and drained.

One Python process serves from one core; a worker per core is how one machine uses all of them. Each worker is a
whole node (its own app, broker connection and replica pool) and binds its own listening socket on the shared port
with SO_REUSEPORT, so the kernel spreads new connections evenly over the workers (by a hash of the addresses).
Which is why more than one worker needs the broker: without it every worker would be a node of its own, and a
publish would reach only the clients of the worker that took it.

The parent never accepts a connection. It binds the port first (with SO_REUSEPORT, without listening: such a
socket takes no connections), which picks the port for `--port 0`, reports a busy port before anything starts,
and holds the port while a worker restarts. It then starts the workers as fresh interpreters of the same Python
(not forks: no event loop, thread, lock or socket of the parent leaks into them), hands each its settings over
its stdin (pickled: secrets never show in argv), and keeps that pipe open: when the parent dies, even by SIGKILL,
the pipe ends and the worker drains and exits instead of serving on as an orphan. A worker reports on its stdout
(`ready`, or the one-line error it would have printed), so a start-up error is shown once, not once per worker.

Workers run in their own session: a Ctrl-C in a terminal reaches only the parent, which decides for all of them.
SIGTERM or SIGINT to the parent sends SIGTERM to every worker, each of which drains as a single node does
(PROTOCOL 8: its clients closed 1012 over the drain period); the parent exits 0 once all have exited, killing any
still running when the grace period ends. A second signal kills them at once. A worker that dies at any other
time is logged and restarted, after a delay that doubles while it keeps dying young, so a crash loop does not
spin.

Metrics: the parent makes a fresh directory for prometheus-client's multiprocess mode (see metrics.py), passes
it to every worker in PROMETHEUS_MULTIPROC_DIR, removes a dead worker's live gauges, and deletes the directory
when it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from realtime_service.settings import ConfigError

if TYPE_CHECKING:
    from realtime_service.settings import Loaded, Settings

log = logging.getLogger("realtime.supervisor")

MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's switch; metrics.py reads it
RESTART_FIRST_DELAY = 0.25  # seconds before restarting a worker that died after a healthy run
RESTART_MAX_DELAY = 30.0
HEALTHY_AFTER = 10.0  # a worker that ran this long before dying counts as healthy: its restart is quick again
KILL_MARGIN = 0.5  # seconds of the grace period kept for killing stragglers and exiting
READY = "ready"
ERROR = "error"
_LENGTH = struct.Struct(">I")
# Where this package was imported from, appended to the worker's path: a parent started as `python -m
# realtime_service` from a source folder (cwd on its path, not on the worker's, see -P) starts workers that find it.
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
_WORKER_CODE = (f"import sys; sys.path.append({_PACKAGE_ROOT!r}); "
                "from realtime_service.supervisor import worker_main; raise SystemExit(worker_main())")


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs from its parent: its number and the settings, with the port the parent bound."""

    index: int
    settings: Settings


def check_workers(loaded: Loaded) -> None:
    """More than one worker needs a broker (PROTOCOL 5.4); say so before anything is bound or started."""
    settings = loaded.settings
    if settings.workers > 1 and settings.redis_url is None:
        raise ConfigError(
            f"{settings.workers} workers ({loaded.where('workers')}) need REALTIME_REDIS_URL: without a broker each "
            "worker is a separate node and a publish reaches only the clients of the worker that takes it; "
            "set REALTIME_REDIS_URL or run one worker")


def supervise(settings: Settings, sockets: Sequence[socket.socket], environ: Mapping[str, str]) -> int:
    """Run `settings.workers` workers on the port `sockets` hold until SIGTERM/SIGINT; returns the exit code."""
    metrics_dir = tempfile.mkdtemp(prefix="realtime-metrics-")
    try:
        supervisor = Supervisor(settings, sockets, environ, metrics_dir)
        return asyncio.run(supervisor.run())
    finally:
        for sock in sockets:
            sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def restart_delay(quick_deaths: int) -> float:
    """Seconds before a restart: doubling with each death in a row that came before HEALTHY_AFTER, capped."""
    doublings = min(max(quick_deaths, 1) - 1, 16)
    return min(RESTART_MAX_DELAY, RESTART_FIRST_DELAY * float(1 << doublings))


def describe_exit(code: int) -> str:
    """`exited with code 1` or `killed by SIGKILL`, for a log line an operator reads."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


@dataclass
class _Slot:
    """One worker place: the process in it now, and how its last runs went."""

    index: int
    process: asyncio.subprocess.Process | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    error: tuple[int, str] | None = None  # what the worker reported when it could not start
    quick_deaths: int = 0


class Supervisor:
    """The parent of the workers. Runs in its own event loop (`supervise`)."""

    def __init__(self, settings: Settings, sockets: Sequence[socket.socket], environ: Mapping[str, str],
                 metrics_dir: str) -> None:
        self.port: int = sockets[0].getsockname()[1]
        self.addresses = [_address(sock.getsockname()) for sock in sockets]
        self.settings = settings.model_copy(update={"port": self.port})
        self.environ = {**environ, MULTIPROCESS_DIR_VARIABLE: metrics_dir}
        self.metrics_dir = metrics_dir
        self.slots = [_Slot(index) for index in range(1, settings.workers + 1)]
        self._stopping: asyncio.Event | None = None
        self._started = False  # every worker reported ready once: from now on a death means restart

    @property
    def stopping(self) -> asyncio.Event:
        assert self._stopping is not None, "only inside run()"
        return self._stopping

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        # SIGHUP (re-read the key files, PROTOCOL 2) is for every worker.
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        keepers = [asyncio.create_task(self._keep(slot)) for slot in self.slots]
        stop = asyncio.create_task(self.stopping.wait())
        all_ready = asyncio.create_task(self._all_ready())
        failed = asyncio.create_task(self._first_failure(keepers))
        await asyncio.wait([stop, all_ready, failed], return_when=asyncio.FIRST_COMPLETED)
        all_ready.cancel()
        if failed.done() and not self.stopping.is_set():
            slot = failed.result()
            self.stopping.set()
            await self._stop_all(keepers)
            stop.cancel()
            raise _startup_error(slot)
        failed.cancel()
        if not self.stopping.is_set():
            log.info("listening on %s (env %s, broker %s, %d workers)", ", ".join(self.addresses),
                     self.settings.env, "redis" if self.settings.redis_url else "memory", len(self.slots),
                     extra={"port": self.port, "workers": len(self.slots)})
        await stop
        await self._stop_all(keepers)
        log.info("stopped")
        return 0

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.stopping.is_set():
            log.warning("%s again: killing the workers now", sig.name)
            self._signal_all(signal.SIGKILL)
            return
        log.info("%s: draining %d worker(s)", sig.name, sum(1 for s in self.slots if s.process is not None))
        self.stopping.set()
        self._signal_all(signal.SIGTERM)

    def _reload(self) -> None:
        """Only to workers that are ready: before its handler is installed, SIGHUP would end a worker."""
        ready = [slot for slot in self.slots
                 if slot.process is not None and slot.process.returncode is None and slot.ready.is_set()]
        log.info("SIGHUP: passing it to %d worker(s)", len(ready))
        for slot in ready:
            assert slot.process is not None
            with contextlib.suppress(ProcessLookupError):
                slot.process.send_signal(signal.SIGHUP)

    def _signal_all(self, sig: signal.Signals) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.process.send_signal(sig)

    async def _all_ready(self) -> None:
        for slot in self.slots:
            await slot.ready.wait()
        self._started = True  # set here, not by run(): a death from now on is a restart, never a failed start

    async def _first_failure(self, keepers: list[asyncio.Task[_Slot | None]]) -> _Slot:
        """The first slot whose worker died before the start completed."""
        for next_done in asyncio.as_completed(keepers):
            slot = await next_done
            if slot is not None:
                return slot
        await asyncio.Event().wait()  # every keeper ended without failing: only a stop ends them
        raise AssertionError("unreachable")

    async def _stop_all(self, keepers: list[asyncio.Task[_Slot | None]]) -> None:
        """Workers got SIGTERM; wait for them within the grace period, then kill what is left."""
        self._signal_all(signal.SIGTERM)
        pending = [task for task in keepers if not task.done()]
        if pending:
            _, pending_set = await asyncio.wait(pending, timeout=max(0.1, self.settings.shutdown_grace - KILL_MARGIN))
            if pending_set:
                log.warning("%d worker(s) still running after the grace period: killing them", len(pending_set))
                self._signal_all(signal.SIGKILL)
                await asyncio.wait(pending_set, timeout=5)

    async def _keep(self, slot: _Slot) -> _Slot | None:
        """Keep a worker running in `slot` until the stop. Returns the slot if its worker could not start."""
        loop = asyncio.get_running_loop()
        while not self.stopping.is_set():
            started = loop.time()
            try:
                process = await self._spawn(slot)
            except OSError as exc:  # no process at all (out of memory, of file descriptors, ...)
                slot.error = (1, f"cannot start worker {slot.index}: {exc}")
                if not self._started:
                    return slot
                log.error("%s", slot.error[1], extra={"worker": slot.index})
                await self._pause_before_restart(slot, quick=True)
                continue
            reader = asyncio.create_task(self._read_reports(slot, process))
            code = await process.wait()
            await reader
            slot.process = None
            _mark_dead(process.pid, self.metrics_dir)
            if self.stopping.is_set():
                level = logging.INFO if code in (0, -signal.SIGTERM) else logging.WARNING  # -SIGTERM: still starting
                log.log(level, "worker %d (pid %d) %s", slot.index, process.pid, describe_exit(code),
                        extra={"worker": slot.index, "worker_pid": process.pid})
                return None
            if not self._started:
                if slot.error is None:  # it died without saying why (a traceback on stderr, or a signal)
                    slot.error = (code if code > 0 else 1, "")
                return slot
            await self._pause_before_restart(slot, quick=loop.time() - started < HEALTHY_AFTER,
                                             announce=(process.pid, code))
        return None

    async def _pause_before_restart(self, slot: _Slot, quick: bool, announce: tuple[int, int] | None = None
                                    ) -> float:
        """Wait the backoff (or until the stop); `announce` (pid, exit code) logs the death first."""
        slot.quick_deaths = slot.quick_deaths + 1 if quick else 1
        delay = restart_delay(slot.quick_deaths)
        if announce is not None:
            pid, code = announce
            log.warning("worker %d (pid %d) %s; restarting it in %.2fs", slot.index, pid, describe_exit(code), delay,
                        extra={"worker": slot.index, "worker_pid": pid, "restart_in": delay})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), delay)
        return delay

    async def _spawn(self, slot: _Slot) -> asyncio.subprocess.Process:
        slot.ready.clear()
        slot.error = None
        command = [sys.executable, "-P", "-c", _WORKER_CODE]  # -P: nothing imported from the working directory
        process = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=self.environ,
            start_new_session=True)
        slot.process = process
        assert process.stdin is not None
        payload = pickle.dumps(WorkerSpec(slot.index, self.settings))
        process.stdin.write(_LENGTH.pack(len(payload)) + payload)
        with contextlib.suppress(ConnectionError):  # it died at once: its exit is handled by the caller
            await process.stdin.drain()
        if self.stopping.is_set():  # the stop came while it was being started
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        return process

    async def _read_reports(self, slot: _Slot, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            kind, _, rest = raw.decode(errors="replace").rstrip("\n").partition(" ")
            if kind == READY:
                log.log(logging.INFO if not self._started else logging.WARNING,
                        "worker %d (pid %d) %s", slot.index, process.pid,
                        "ready" if not self._started else "restarted and ready",
                        extra={"worker": slot.index, "worker_pid": process.pid})
                slot.ready.set()
            elif kind == ERROR:
                code, _, message = rest.partition(" ")
                slot.error = (int(code) if code.isdigit() else 1, message)
                if self._started:  # after the start, a restart that cannot start is logged, then retried
                    log.error("worker %d (pid %d) cannot start: %s", slot.index, process.pid, message,
                              extra={"worker": slot.index, "worker_pid": process.pid})


def _startup_error(slot: _Slot) -> Exception:
    """The worker's own one-line message, as `serve` alone would have printed it (exit 2 or 1)."""
    from realtime_service.cli import StartupError

    code, message = slot.error or (1, "")
    if not message:
        message = f"worker {slot.index} stopped while starting (its log is above)"
    return ConfigError(message) if code == 2 else StartupError(message)


def _mark_dead(pid: int, metrics_dir: str) -> None:
    """Drop a dead worker's live gauges (its connections are gone); its counters stay in the machine's sums."""
    from prometheus_client import multiprocess

    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]


def _address(sockname: tuple[str, int] | tuple[str, int, int, int]) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- the worker side ---------------------------------------------------------------------------------------------

class _WorkerFields(logging.Filter):
    """Every log line of a worker names it, so the lines of N workers on one stderr can be told apart."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index
        self.pid = os.getpid()

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        record.worker_pid = self.pid
        return True


def _read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise SystemExit(1)  # the parent went away before sending everything
        data += chunk
    return data


def _read_spec(fd: int) -> WorkerSpec:
    """Plain reads on the descriptor, not sys.stdin: a thread blocked in a buffered read would hold its lock when
    the interpreter exits, and Python aborts on that."""
    (length,) = _LENGTH.unpack(_read_exactly(fd, _LENGTH.size))
    spec = pickle.loads(_read_exactly(fd, length))  # from our own parent, over a pipe only it holds
    assert isinstance(spec, WorkerSpec)
    return spec


def _drain_when_orphaned(fd: int) -> None:
    """The parent holds our stdin open while it lives: at its end, drain as if told to (SIGTERM)."""
    def watch() -> None:
        with contextlib.suppress(OSError):
            while os.read(fd, 65536):
                pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def worker_main() -> int:
    """Entry point of one worker process (started by `Supervisor._spawn`)."""
    from realtime_service.cli import StartupError, run_loop, run_server
    from realtime_service.listening import BindError, bind_sockets
    from realtime_service.logs import configure_logging

    # Until run_server installs its handlers, a stray SIGINT or SIGHUP must not end a starting worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Our stdout is the report channel to the parent; anything else printed goes to stderr with the logs.
    reports = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    stdin = sys.stdin.fileno()
    spec = _read_spec(stdin)
    settings = spec.settings
    _drain_when_orphaned(stdin)
    configure_logging(settings.log_level)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerFields(spec.index))

    def report(kind: str, text: str = "") -> None:
        with contextlib.suppress(OSError):
            reports.write(f"{kind} {text}".rstrip() + "\n")

    try:
        sockets = bind_sockets(settings.host, settings.port, reuse_port=True)
        return run_loop(run_server(settings, sockets=sockets, announce=lambda _addresses: report(READY)))
    except ConfigError as exc:
        report(ERROR, f"2 {_one_line(exc)}")
        return 2
    except (StartupError, BindError) as exc:
        report(ERROR, f"1 {_one_line(exc)}")
        return 1


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
