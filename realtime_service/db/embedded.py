"""Runs the PostgreSQL bundled in the ``pgserver`` wheel for ``realtime-service dev``, also when started as root.

PostgreSQL refuses to run as root and ``pgserver`` only listens on a unix socket (and, as root, widens the
permissions of every parent folder of its data folder), so this module drives the bundled ``initdb`` and
``pg_ctl`` itself: as root it runs them as an unprivileged system user, and the server listens on loopback TCP
so that a plain DSN reaches it. Authentication is ``trust``: this is a development database, not a service.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

_log = logging.getLogger(__name__)

DEFAULT_SYSTEM_USER = "realtime-pg"
SUPERUSER = "postgres"

# Where a data folder (or a copy of the binaries) goes when the requested place is out of the user's reach.
_FALLBACK_BASES = (Path("/var/tmp"), Path("/tmp"))
_FALLBACK_NAME = "realtime-pg"
# A fixed environment keeps the caller's PG* variables and locale out of initdb and pg_ctl.
_CHILD_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C", "LANG": "C"}
_SETTING_VALUE = re.compile(r"^[A-Za-z0-9_.:/-]*$")


class EmbeddedPostgresError(RuntimeError):
    """The embedded PostgreSQL could not be prepared, started or stopped; the message says why."""


@dataclass(frozen=True)
class Account:
    """The operating-system account PostgreSQL runs as (``name`` is None when that is the current one)."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    name: str | None

    @property
    def is_other(self) -> bool:
        """Whether commands must switch to this account (we are root and it is not us)."""
        return self.name is not None


class EmbeddedPostgres:
    """A PostgreSQL server in a data folder, listening on a loopback TCP port; ``with`` starts and stops it."""

    def __init__(
        self,
        data_dir: Path | str,
        *,
        system_user: str = DEFAULT_SYSTEM_USER,
        host: str = "127.0.0.1",
        port: int | None = None,
        durable: bool = True,
        settings: Mapping[str, str] | None = None,
        bin_dir: Path | None = None,
        timeout: float = 60.0,
        adopt: bool = False,
    ) -> None:
        """Describe the server; nothing happens on disk until ``start()``.

        ``adopt``: the caller owns the data folder (``dev`` holds its lock), so a server already running on it was
        left behind by a previous run that died; use it (and stop it at the end) instead of refusing.
        """
        self._requested_dir = Path(data_dir)
        self._system_user = system_user
        self._host = host
        self._port = port
        self._durable = durable
        self._settings = dict(settings or {})
        for name, value in self._settings.items():
            if not re.fullmatch(r"[a-z_.]+", name) or not _SETTING_VALUE.match(value):
                raise ValueError(f"unsupported PostgreSQL setting {name}={value!r}")
        self._bin_override = bin_dir
        self._timeout = timeout
        self._adopt = adopt
        self._data_dir: Path | None = None
        self._bin_dir: Path | None = None
        self._account: Account | None = None
        self._dsn: str | None = None

    @property
    def data_dir(self) -> Path:
        """The data folder in use: the requested one, or the fallback chosen by ``start()``."""
        return self._requested_dir if self._data_dir is None else self._data_dir

    @property
    def dsn(self) -> str:
        """The superuser's libpq URI of the running server."""
        if self._dsn is None:
            raise EmbeddedPostgresError("the embedded PostgreSQL is not running")
        return self._dsn

    @property
    def running(self) -> bool:
        """Whether ``start()`` succeeded and ``stop()`` has not run since."""
        return self._dsn is not None

    def start(self) -> str:
        """Initialise the data folder if needed, start the server and return its DSN."""
        if self._dsn is not None:
            return self._dsn
        account = resolve_account(self._system_user)
        bin_dir = self._bin_override or bundled_bin_dir()
        if account.is_other:
            bin_dir = reachable_binaries(bin_dir, account)
        data_dir = prepare_data_dir(self._requested_dir, account)
        self._account, self._bin_dir, self._data_dir = account, bin_dir, data_dir
        _log.info("embedded PostgreSQL data folder: %s", data_dir)
        if not (data_dir / "PG_VERSION").exists():
            self._initdb()
        if self._status() == 0:
            port = self._running_port()
            if self._adopt and port is not None:
                _log.warning("reusing the embedded PostgreSQL left running on %s (port %d)", data_dir, port)
                self._dsn = f"postgresql://{SUPERUSER}@{self._host}:{port}/postgres"
                return self._dsn
            # Someone else's server: never suggest stopping it, it may be serving another process.
            raise EmbeddedPostgresError(
                f"another PostgreSQL server is already running on {data_dir}"
                + (f" (port {port})" if port is not None else "")
                + "; use another data folder for this one"
            )
        self._dsn = self._start_on_free_port()
        return self._dsn

    def stop(self) -> None:
        """Stop the server (fast shutdown: sessions are cut, data is kept); does nothing if not started."""
        if self._dsn is None:
            return
        if self._status() == 0:
            timeout = f"{self._timeout:.0f}"
            self._run(["pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", timeout, "stop"])
        self._dsn = None
        _log.info("embedded PostgreSQL stopped")

    def __enter__(self) -> Self:
        """Start the server for the duration of a ``with`` block."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server when the ``with`` block ends, however it ends."""
        self.stop()

    def _initdb(self) -> None:
        """Create a cluster whose superuser is ``postgres``, trusting local connections."""
        args = [
            "initdb", "-D", str(self.data_dir), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8",
            "--locale=C", "--no-instructions",
        ]
        if not self._durable:
            args.append("--no-sync")
        self._run(args)

    def _start_on_free_port(self) -> str:
        """Start on the configured port, or on a free one (retrying if another process takes it first)."""
        attempts = 1 if self._port is not None else 3
        for attempt in range(1, attempts + 1):
            port = self._port if self._port is not None else free_port(self._host)
            try:
                self._pg_ctl_start(port)
            except EmbeddedPostgresError:
                # A port chosen here can be taken between the probe and the bind: try another one.
                if attempt == attempts or "already in use" not in self._log_tail():
                    raise
                _log.warning("port %d was taken; starting the embedded PostgreSQL again", port)
                continue
            _log.info("embedded PostgreSQL listening on %s:%d", self._host, port)
            return f"postgresql://{SUPERUSER}@{self._host}:{port}/postgres"
        raise AssertionError("unreachable")

    def _pg_ctl_start(self, port: int) -> None:
        """Start postgres on ``host:port`` only (no unix socket), waiting until it accepts connections."""
        settings = {"listen_addresses": self._host, "port": str(port), "unix_socket_directories": "''"}
        if not self._durable:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        settings |= self._settings
        options = " ".join(f"-c {name}={value}" for name, value in settings.items())
        self._run([
            "pg_ctl", "-D", str(self.data_dir), "-l", str(self._log_path()), "-w", "-t",
            f"{self._timeout:.0f}", "-o", options, "start",
        ], log_hint=True)

    def _running_port(self) -> int | None:
        """The port in ``postmaster.pid`` of the server running on the data folder (line 4), if readable."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            return int(lines[3])
        except (OSError, IndexError, ValueError):
            return None

    def _status(self) -> int:
        """Return ``pg_ctl status``'s exit code: 0 when a server runs on the data folder."""
        return self._run(["pg_ctl", "-D", str(self.data_dir), "status"], check=False)

    def _log_path(self) -> Path:
        """The server log, kept in the data folder the server's account owns."""
        return self.data_dir / "server.log"

    def _log_tail(self, lines: int = 20) -> str:
        """The end of the server log, for error messages."""
        try:
            return "\n".join(self._log_path().read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _run(self, args: Sequence[str], *, check: bool = True, log_hint: bool = False) -> int:
        """Run a bundled program as the server's account; raise with its output when it fails."""
        assert self._bin_dir is not None
        assert self._account is not None
        command = [str(self._bin_dir / args[0]), *args[1:]]
        account = self._account
        # Output goes to a file: a pipe could be inherited by the daemonised postmaster and never close.
        with tempfile.TemporaryFile() as output:
            try:
                completed = subprocess.run(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    env=_CHILD_ENV,
                    cwd=self.data_dir,
                    timeout=self._timeout + 30,
                    check=False,
                    user=account.uid if account.is_other else None,
                    group=account.gid if account.is_other else None,
                    extra_groups=list(account.groups) if account.is_other else None,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise EmbeddedPostgresError(f"{args[0]} failed: {exc}") from exc
            if check and completed.returncode != 0:
                output.seek(0)
                text = output.read().decode(errors="replace").strip()
                hint = f"\nserver log {self._log_path()}:\n{self._log_tail()}" if log_hint else ""
                raise EmbeddedPostgresError(
                    f"{args[0]} exited with {completed.returncode}: {text}{hint}"
                )
        return completed.returncode


def bundled_bin_dir() -> Path:
    """Locate the PostgreSQL binaries inside the installed ``pgserver`` wheel without importing it."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError("the embedded database needs pgserver: pip install 'realtime-service[embedded]'")
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "postgres").is_file():
        raise EmbeddedPostgresError(f"pgserver is installed but has no PostgreSQL binaries in {bin_dir}")
    return bin_dir


def free_port(host: str = "127.0.0.1") -> int:
    """Ask the kernel for a TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def resolve_account(system_user: str) -> Account:
    """Pick who runs PostgreSQL: ourselves, or as root an unprivileged system user created on demand."""
    if os.geteuid() != 0:
        return Account(uid=os.geteuid(), gid=os.getegid(), groups=(), name=None)
    try:
        entry = pwd.getpwnam(system_user)
    except KeyError:
        _log.info("creating system user %s to run the embedded PostgreSQL", system_user)
        result = subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", "/usr/sbin/nologin", system_user],
            capture_output=True, text=True, check=False,
        )
        if result.returncode not in (0, 9):  # 9: created meanwhile by a concurrent start
            raise EmbeddedPostgresError(f"useradd {system_user} failed: {result.stderr.strip()}") from None
        entry = pwd.getpwnam(system_user)
    if entry.pw_uid == 0:
        raise EmbeddedPostgresError(f"system user {system_user} is root; PostgreSQL refuses to run as root")
    groups = tuple(os.getgrouplist(system_user, entry.pw_gid))
    return Account(uid=entry.pw_uid, gid=entry.pw_gid, groups=groups, name=system_user)


def can_traverse(path: Path, account: Account) -> bool:
    """Whether ``account`` may search every existing folder from ``/`` down to ``path`` (inclusive)."""
    for folder in [*reversed(path.parents), path]:
        try:
            info = folder.stat()
        except FileNotFoundError:
            return True  # the rest does not exist yet; we create it traversable
        if not _grants(info, account, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH):
            return False
    return True


def prepare_data_dir(requested: Path, account: Account) -> Path:
    """Create the data folder, or as root choose a reachable fallback, and hand it to the server's account."""
    requested = requested.expanduser().resolve()
    if not account.is_other:
        requested.mkdir(parents=True, exist_ok=True, mode=0o700)
        return requested
    data_dir = requested
    if not can_traverse(requested.parent, account):
        data_dir = _fallback_root(account) / f"{requested.name}-{_digest(str(requested))}"
        _log.warning(
            "data folder %s is not reachable by user %s; using %s instead", requested, account.name, data_dir
        )
    _make_parents(data_dir.parent)
    data_dir.mkdir(exist_ok=True)
    if data_dir.stat().st_uid != account.uid:
        for path in _walk(data_dir):
            os.chown(path, account.uid, account.gid, follow_symlinks=False)
    data_dir.chmod(0o700)
    return data_dir


def reachable_binaries(bin_dir: Path, account: Account) -> Path:
    """Return ``bin_dir``, or a world-readable copy of the install when ``account`` cannot run it in place."""
    if _binaries_usable(bin_dir, account):
        return bin_dir
    install = bin_dir.parent  # .../pgserver/pginstall
    libs = install.parents[1] / "pgserver.libs"  # the wheel's vendored libpq, found via $ORIGIN/../../../
    postgres_info = (bin_dir / "postgres").stat()
    key = _digest(f"{install}:{postgres_info.st_size}:{postgres_info.st_mtime_ns}")
    copy_root = _fallback_root(account) / f"pginstall-{key}"
    copied_bin = copy_root / "pgserver" / "pginstall" / "bin"
    if not copied_bin.is_dir():
        _log.warning("PostgreSQL binaries in %s are not reachable by user %s; copying them to %s",
                     bin_dir, account.name, copy_root)
        staging = Path(tempfile.mkdtemp(prefix=".pginstall-", dir=copy_root.parent))
        shutil.copytree(install, staging / "pgserver" / "pginstall", symlinks=True)
        if libs.is_dir():
            shutil.copytree(libs, staging / "pgserver.libs", symlinks=True)
        for path in _walk(staging):
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | stat.S_IRGRP | stat.S_IROTH
                           | (stat.S_IXGRP | stat.S_IXOTH if path.is_dir() else 0))
        try:
            staging.rename(copy_root)  # atomic: a concurrent start sees all of it or none
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    if not _binaries_usable(copied_bin, account):
        raise EmbeddedPostgresError(f"user {account.name} cannot run PostgreSQL from {bin_dir} nor {copied_bin}")
    return copied_bin


def _binaries_usable(bin_dir: Path, account: Account) -> bool:
    """Whether ``account`` can run initdb and postgres from ``bin_dir`` and read their share folder."""
    if not (can_traverse(bin_dir, account) and can_traverse(bin_dir.parent / "share" / "postgresql", account)):
        return False
    for program in ("initdb", "pg_ctl", "postgres"):
        result = subprocess.run(
            [str(bin_dir / program), "--version"],
            capture_output=True, env=_CHILD_ENV, cwd="/", check=False,
            user=account.uid, group=account.gid, extra_groups=list(account.groups),
        )
        if result.returncode != 0:
            return False
    return True


def _fallback_root(account: Account) -> Path:
    """A private folder owned by ``account`` under /var/tmp (or /tmp), refusing one planted by someone else."""
    for base in _FALLBACK_BASES:
        if not (base.is_dir() and can_traverse(base, account)):
            continue
        root = base / _FALLBACK_NAME
        try:
            root.mkdir(mode=0o700)
        except FileExistsError:
            pass
        info = root.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid not in (0, account.uid):
            raise EmbeddedPostgresError(f"{root} exists but is not a folder owned by root or {account.name}")
        os.chown(root, account.uid, account.gid)
        root.chmod(0o700)
        return root
    raise EmbeddedPostgresError(f"none of {', '.join(map(str, _FALLBACK_BASES))} is reachable by {account.name}")


def _make_parents(folder: Path) -> None:
    """Create missing folders down to ``folder`` with mode 0755, whatever the umask."""
    missing = [p for p in [*reversed(folder.parents), folder] if not p.exists()]
    for path in missing:
        path.mkdir(exist_ok=True)
        path.chmod(0o755)


def _grants(info: os.stat_result, account: Account, user_bit: int, group_bit: int, other_bit: int) -> bool:
    """Apply the owner, group, other permission rule for ``account`` to one file's mode."""
    if info.st_uid == account.uid:
        return bool(info.st_mode & user_bit)
    if info.st_gid == account.gid or info.st_gid in account.groups:
        return bool(info.st_mode & group_bit)
    return bool(info.st_mode & other_bit)


def _walk(root: Path) -> Iterator[Path]:
    """Yield ``root`` and everything below it, without following symlinks."""
    yield root
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            yield Path(folder) / name


def _digest(text: str) -> str:
    """A short stable name for a path, so each requested folder gets its own fallback."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]
