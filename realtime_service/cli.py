"""The `realtime-service` command line (serve, dev, migrate, token).

It is the only reader of argv and os.environ; everything below it gets settings passed in.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import jwt

from realtime_service.logs import configure_logging
from realtime_service.settings import ConfigError, Loaded, Settings, load

if TYPE_CHECKING:
    import socket

    from realtime_service.devlock import DevLock

log = logging.getLogger("realtime.cli")


class StartupError(Exception):
    """Something the command needs could not be started; the message says what."""

DEV_FOLDER = ".realtime-dev"


DESCRIPTION = """\
Realtime diagnosis updates over WebSockets, beside the main API.

Start here: `realtime-service dev` runs everything on this machine (an embedded PostgreSQL, demo data, the
debug console) and prints tokens to try it with. `realtime-service serve` is the production server."""

EPILOG = """\
Every setting is an environment variable REALTIME_<NAME> (REALTIME_PORT, REALTIME_DATABASE_URL,
REALTIME_JWT_SECRET, REALTIME_REDIS_URL, ...) or a key <name> of the TOML file given with --config. Flags win
over the environment, the environment wins over the file. Every key with its default: config/default.toml;
the protocol and every variable: docs/protocol.md. `realtime-service COMMAND --help` shows a command's flags."""

_SERVE_HELP = """\
Run the server: WebSocket clients on /ws/<diagnosis_id>, the REST API for the main API, /healthz, /readyz,
/metrics. Needs REALTIME_DATABASE_URL (the main API's read replica) and the token settings
(REALTIME_JWT_SECRET, or REALTIME_JWT_ALGORITHMS=RS256 with REALTIME_JWT_PUBLIC_KEY_FILE). SIGTERM drains the
connections and exits 0."""

_DEV_HELP = """\
Run everything on this machine for development: an embedded PostgreSQL in --data-dir (unless
REALTIME_DATABASE_URL is set), the migrations, demo users and diagnoses, the debug console, and a JWT secret
kept in --data-dir. Prints the console's URL and `export` lines for a demo user token and a service token.
Listens on 127.0.0.1:8080 unless told otherwise. Ctrl-C stops it (and its PostgreSQL)."""

_MIGRATE_HELP = """\
Apply the SQL migrations shipped with the package to REALTIME_DATABASE_URL (the dev/test schema: users,
diagnoses). Running it again changes nothing. Needs no JWT secret."""

_LISTEN_HELP = """\
Follow one diagnosis with the Python client (realtime_service.client): print each update as a JSON line as it
arrives, reconnect and resume by itself, and on a close that ends it print `closed <code> <reason>: ...` and exit
1. The user token comes from --token or $USER_TOKEN."""

_TOKEN_HELP = """\
Print a token signed with REALTIME_JWT_SECRET (HS256), for development and tests: a user token with
--sub <user id>, or a service token with --scope realtime:publish. Needs no database."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line that says where the help is (not a usage dump)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _add_config(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--config", type=Path, metavar="FILE",
                     help="a TOML file of settings (keys are the variable names without REALTIME_, in lower "
                          "case, e.g. port = 8080); never picked up unless named here")


def _add_listen_address(cmd: argparse.ArgumentParser, default_host: str) -> None:
    cmd.add_argument("--host", metavar="ADDRESS",
                     help=f"address to listen on (REALTIME_HOST; default {default_host})")
    cmd.add_argument("--port", type=int, metavar="PORT",
                     help="TCP port to listen on (REALTIME_PORT; default 8080; 0 picks a free one)")


def _parser() -> argparse.ArgumentParser:
    from realtime_service import __version__

    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="realtime-service", description=DESCRIPTION, epilog=EPILOG, formatter_class=formatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the server (production)", description=_SERVE_HELP, epilog=EPILOG,
                           formatter_class=formatter)
    _add_config(serve)
    _add_listen_address(serve, "0.0.0.0")
    serve.add_argument("--workers", type=int, metavar="N",
                       help="worker processes sharing the port, one per core (REALTIME_WORKERS; default 1); more "
                            "than 1 needs REALTIME_REDIS_URL")
    dev = sub.add_parser("dev", help="run everything locally: embedded PostgreSQL, demo data, console, tokens",
                         description=_DEV_HELP, epilog=EPILOG, formatter_class=formatter)
    _add_config(dev)
    _add_listen_address(dev, "127.0.0.1")
    dev.add_argument("--data-dir", type=Path, default=Path(DEV_FOLDER), metavar="DIR",
                     help=f"where the embedded PostgreSQL and the dev JWT secret live (default ./{DEV_FOLDER}); "
                          "a second `dev` needs its own")
    migrate = sub.add_parser("migrate", help="apply the shipped migrations to REALTIME_DATABASE_URL",
                             description=_MIGRATE_HELP, epilog=EPILOG, formatter_class=formatter)
    _add_config(migrate)
    token = sub.add_parser("token", help="print a development token signed with REALTIME_JWT_SECRET",
                           description=_TOKEN_HELP, epilog=EPILOG, formatter_class=formatter)
    _add_config(token)
    token.add_argument("--sub", required=True, metavar="SUBJECT",
                       help="the token's subject: a user id (a positive integer) for a user token, or a caller "
                            "name such as main-api together with --scope")
    token.add_argument("--scope", metavar="SCOPE",
                       help="realtime:publish makes a service token (publishes to any diagnosis, owns none)")
    token.add_argument("--ttl", type=int, default=3600, metavar="SECONDS",
                       help="seconds until the token expires, at least 1 (default 3600)")
    listen = sub.add_parser("listen", help="print a diagnosis's updates as they arrive (the Python client)",
                            description=_LISTEN_HELP, epilog=EPILOG, formatter_class=formatter)
    listen.add_argument("diagnosis_id", type=int, metavar="DIAGNOSIS_ID",
                        help="the diagnosis to follow (dev's demo user 456 owns 123 and 124)")
    listen.add_argument("--token", metavar="JWT",
                        help="the user token (default $USER_TOKEN, which keeps it out of your shell history)")
    listen.add_argument("--url", default="http://127.0.0.1:8080", metavar="URL",
                        help="the service's base URL (default http://127.0.0.1:8080)")
    listen.add_argument("--device", default="cli", metavar="ID",
                        help="device id for the server's delivery cursor (default cli)")
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = _parser().parse_args(argv)
    env = dict(os.environ if environ is None else environ)
    try:
        if args.command == "token":
            return _token(args, env)
        if args.command == "migrate":
            return _migrate(args, env)
        if args.command == "serve":
            return _serve(args, env)
        if args.command == "listen":
            return _listen(args, env)
        return _dev(args, env)
    except ConfigError as exc:
        print(f"realtime-service {args.command}: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"realtime-service {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C while starting (the embedded PostgreSQL, the replica check)
        print(f"realtime-service {args.command}: interrupted", file=sys.stderr)
        return 130


def _load(args: argparse.Namespace, env: Mapping[str, str], defaults: dict[str, Any] | None = None) -> Loaded:
    overrides = {"host": getattr(args, "host", None), "port": getattr(args, "port", None),
                 "workers": getattr(args, "workers", None)}
    return load(env, getattr(args, "config", None), defaults=defaults, overrides=overrides)


def _warn(loaded: Loaded) -> None:
    """Log what the settings loader noticed but did not refuse (an unknown REALTIME_* variable)."""
    for line in loaded.warnings:
        log.warning("%s", line)


def _bind(loaded: Loaded, reuse_port: bool = False) -> list[socket.socket]:
    """Bind before anything is printed or started: a busy port is the first and only thing the user sees."""
    from realtime_service.listening import BindError, bind_sockets

    settings = loaded.settings
    try:
        return bind_sockets(settings.host, settings.port, host_from=loaded.where("host"),
                            port_from=loaded.where("port"), reuse_port=reuse_port)
    except BindError as exc:
        raise StartupError(str(exc)) from None


def _check_settings(loaded: Loaded) -> None:
    """Refuse at start what would fail later: a file a setting names that is missing, a weak secret."""
    from realtime_service.preflight import check_files, check_secrets

    check_files(loaded)
    check_secrets(loaded)


def _check_replica(loaded: Loaded) -> None:
    """Run the ownership query once: refuse one that cannot answer, log a replica that does not."""
    from realtime_service.preflight import check_replica

    check_replica(loaded)


def mint_token(secret: str, sub: str, scope: str | None, ttl: int) -> str:
    """An HS256 token for development and tests."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + ttl}
    if scope:
        claims["scope"] = scope
    return jwt.encode(claims, secret, algorithm="HS256")


MAX_USER_ID = 2**63 - 1  # ids are bigint


def _token(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    # Both mistakes below mint a token that can never work; refuse them before touching any setting.
    if args.ttl < 1:
        raise ConfigError(f"--ttl {args.ttl}: a token must live at least 1 second (default 3600)")
    if not args.scope and not (args.sub.isascii() and args.sub.isdigit() and 0 < int(args.sub) <= MAX_USER_ID):
        raise ConfigError(f"--sub {args.sub!r} is not a user id (a positive integer); for a service token add "
                          "--scope realtime:publish")
    loaded = _load(args, env)
    for line in loaded.warnings:  # stdout is the token; a typo such as REALTIME_JWT_SECRT is said on stderr
        print(f"realtime-service token: warning: {line}", file=sys.stderr)
    secret = loaded.settings.secret("jwt_secret")
    if not secret:
        raise ConfigError("REALTIME_JWT_SECRET is required to sign a token (dev keeps its secret in "
                          f"{DEV_FOLDER}/jwt_secret)")
    print(mint_token(secret, args.sub, args.scope, args.ttl))
    return 0


def _listen(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from realtime_service.client.listen import listen

    token = args.token or env.get("USER_TOKEN", "")
    if not token.strip():
        raise ConfigError("a user token is needed: --token JWT, or export USER_TOKEN=...")
    if args.diagnosis_id <= 0:
        raise ConfigError("DIAGNOSIS_ID is a positive integer")
    return listen(args.url, args.diagnosis_id, token.strip(), args.device)


def _migrate(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    loaded = _load(args, env)
    settings = loaded.settings
    configure_logging(settings.log_level)
    _warn(loaded)
    dsn = settings.secret("database_url")
    if not dsn:
        raise ConfigError("REALTIME_DATABASE_URL is required")
    applied = _apply_migrations(dsn, loaded)
    print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else ""))
    return 0


def _apply_migrations(dsn: str, loaded: Loaded) -> list[str]:
    """Migrate, turning psycopg2's multi-line errors into one line naming the server and the setting."""
    import psycopg2

    from realtime_service.db.describe import describe_db_error, server_of
    from realtime_service.db.migrate import apply_migrations

    try:
        return apply_migrations(dsn)
    except psycopg2.OperationalError as exc:
        raise StartupError(f"cannot reach the database at {server_of(dsn)} ({loaded.where('database_url')}): "
                           f"{describe_db_error(exc, dsn)}") from None
    except psycopg2.Error as exc:
        raise StartupError(f"a migration failed on {server_of(dsn)}: {describe_db_error(exc, dsn)}") from None
    except FileNotFoundError as exc:
        raise StartupError(str(exc)) from None


def _serve(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    loaded = _load(args, env)
    settings = loaded.settings
    configure_logging(settings.log_level)
    _warn(loaded)
    _check_settings(loaded)
    workers = settings.workers > 1
    if workers:  # PROTOCOL 5.4: a supervisor and N worker processes on one port
        from realtime_service.supervisor import check_workers, supervise

        check_workers(loaded)
    sockets = _bind(loaded, reuse_port=workers)
    _check_replica(loaded)
    if workers:
        return supervise(settings, sockets, env)
    return run_loop(run_server(settings, sockets=sockets))


def _dev(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from realtime_service.devlock import AlreadyRunning, DevLock

    data_dir: Path = args.data_dir.resolve()
    defaults: dict[str, Any] = {"env": "development", "console_enabled": True, "host": "127.0.0.1"}
    loaded = _load(args, env, defaults)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"cannot create the data folder {data_dir} (--data-dir): {exc.strerror}") from None
    lock = DevLock(data_dir)
    try:
        lock.acquire()  # before binding: a second `dev` is told about the first, not about a busy port
    except AlreadyRunning as exc:
        raise StartupError(str(exc)) from None
    try:
        return _dev_locked(loaded, data_dir, lock)
    finally:
        lock.release()


def _dev_locked(loaded: Loaded, data_dir: Path, lock: DevLock) -> int:
    from realtime_service.db.demo import seed_demo
    from realtime_service.db.embedded import EmbeddedPostgres, EmbeddedPostgresError
    from realtime_service.listening import bound_port

    settings = loaded.settings
    configure_logging(settings.log_level)
    _warn(loaded)
    _check_settings(loaded)
    sockets = _bind(loaded)
    for sock in sockets:
        sock.listen(4096)  # connections made while PostgreSQL starts wait in the backlog instead of failing
    if settings.jwt_secret is None:
        secret_file = data_dir / "jwt_secret"
        if not secret_file.exists():
            secret_file.write_text(secrets.token_urlsafe(32))
            secret_file.chmod(0o600)
        settings = settings.model_copy(update={"jwt_secret": _secret(secret_file.read_text().strip())})
    embedded: EmbeddedPostgres | None = None
    if settings.database_url is None:
        embedded = EmbeddedPostgres(data_dir / "pgdata", adopt=True)
        try:
            settings = settings.model_copy(update={"database_url": _secret(embedded.start())})
        except EmbeddedPostgresError as exc:
            raise StartupError(f"cannot start the embedded PostgreSQL: {exc}") from None
    try:
        dsn = settings.secret("database_url")
        assert dsn is not None
        _apply_migrations(dsn, loaded)
        demo = seed_demo(dsn)
        _check_replica(Loaded(settings, loaded.sources))
        secret = settings.secret("jwt_secret")
        assert secret is not None
        first = demo.diagnosis_ids[0]
        owner = demo.owner_of[first]
        user_token = mint_token(secret, str(owner), None, 24 * 3600)
        service_token = mint_token(secret, "dev-console", "realtime:publish", 24 * 3600)
        shown_host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
        base = f"http://{shown_host}:{bound_port(sockets)}"
        lock.describe(f"{base}/console")
        owned = ", ".join(f"{d} (owner {demo.owner_of[d]})" for d in demo.diagnosis_ids)
        print(f"\nrealtime-service dev is running on {base} (Ctrl-C stops it)\n"
              f"  console:        {base}/console\n"
              f"  demo diagnoses: {owned}\n"
              f"\nPaste these lines into another terminal (the tokens last 24 hours; user {owner} owns diagnosis "
              f"{first}):\n\n"
              f"export USER_TOKEN={user_token}\n"
              f"export SERVICE_TOKEN={service_token}\n"
              f"\nthen follow diagnosis {first} there: {_this_command()} listen {first}\n", flush=True)
        return run_loop(run_server(settings, demo_tokens={"user": user_token, "service": service_token,
                                                             "diagnosis_id": str(first)}, sockets=sockets))
    finally:
        if embedded is not None:
            embedded.stop()


def _this_command() -> str:
    """How the user started us, to repeat in a hint: `.venv/bin/realtime-service` or `python -m realtime_service`."""
    import shutil

    started = sys.argv[0] if sys.argv else ""
    if Path(started).name != "realtime-service":
        return "python -m realtime_service"
    on_path = shutil.which("realtime-service")
    if on_path and Path(on_path).resolve() == Path(started).resolve():
        return "realtime-service"
    relative = os.path.relpath(started)
    return started if relative.startswith("..") else relative


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop where it is installed (it roughly halves the cost of socket I/O), else on asyncio."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def _secret(value: str) -> Any:
    from pydantic import SecretStr

    return SecretStr(value)


async def run_server(settings: Settings, demo_tokens: dict[str, str] | None = None,
                     sockets: Sequence[socket.socket] | None = None,
                     announce: Callable[[list[str]], None] | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then drain (PROTOCOL 8) and return the exit code.

    `announce`, given by a worker of `serve --workers`, takes the addresses instead of the "listening" line: the
    supervisor logs that once, when every worker listens.
    """
    from aiohttp import web

    from realtime_service.gctune import tune_for_connections
    from realtime_service.web.app import create_app
    from realtime_service.web.edge import EdgeRunner
    from realtime_service.web.state import STATE

    app = create_app(settings)
    if demo_tokens:
        app[STATE].demo_tokens = demo_tokens
    runner = EdgeRunner(app)  # keep-alive and head/body deadlines, quiet client faults, redacted access log
    await runner.setup()
    sites: list[web.BaseSite] = [web.SockSite(runner, sock, backlog=4096) for sock in sockets or ()]
    if not sites:
        sites.append(web.TCPSite(runner, settings.host, settings.port, backlog=4096, reuse_address=True))
    for site in sites:
        await site.start()
    tune_for_connections()  # after start-up: its objects are frozen, the collector runs rarely (issue 11)
    # The addresses actually bound: with --port 0 the kernel's choice, not 0.
    addresses = [f"[{a[0]}]:{a[1]}" if ":" in str(a[0]) else f"{a[0]}:{a[1]}" for a in runner.addresses]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP: read REALTIME_JWT_JWKS_FILE again now (key rotation, PROTOCOL 2); no connection is touched.
    loop.add_signal_handler(signal.SIGHUP, app[STATE].node.verifier.reload_keys)
    # After the handlers: whoever reads "listening" (the supervisor, a test, an orchestrator) may signal at once.
    if announce is not None:
        announce(addresses)
    else:
        log.info("listening on %s (env %s, broker %s)", ", ".join(addresses), settings.env,
                 "redis" if settings.redis_url else "memory", extra={"port": runner.addresses[0][1]})
    await stop.wait()
    deadline = loop.time() + settings.shutdown_grace
    node = app[STATE].node
    log.info("draining %d connection(s) over %.1fs", node.hub.count, settings.drain_period)
    node.draining = True
    try:
        await asyncio.wait_for(node.drain(settings.drain_period), max(0.1, deadline - loop.time() - 1))
    except TimeoutError:
        log.warning("drain did not finish within the grace period")
    await node.wait_publishes(max(0.1, deadline - loop.time() - 1))
    await runner.cleanup()
    log.info("stopped")
    return 0
