"""Bind the listening sockets before anything is printed, and say in one line why a bind failed.

`dev` used to print its banner and tokens, then die on `OSError: [Errno 98]`. Binding first (the sockets are
handed to aiohttp afterwards, which starts listening on them) makes a busy port or a bad host the first and
only thing the user sees.
"""

from __future__ import annotations

import errno
import socket


class BindError(Exception):
    """The address cannot be listened on; the message names it and what to do."""


def bind_sockets(host: str, port: int, *, host_from: str = "--host", port_from: str = "--port",
                 reuse_port: bool = False) -> list[socket.socket]:
    """One bound (not yet listening) TCP socket per address `host` resolves to; `port` 0 picks a free one.

    `host_from`/`port_from` name where the values came from, for the message.
    """
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise BindError(f"cannot listen on {host!r} ({host_from}): not an IP address of this machine nor a host "
                        f"name that resolves ({_reason(exc)}); use e.g. --host 127.0.0.1 or --host 0.0.0.0") from None
    sockets: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address[0]) in seen:
                continue
            seen.add((family, address[0]))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:  # the same free port on every address
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            try:
                sock.bind(address)
            except OSError as exc:
                raise BindError(_bind_message(exc, host, port, host_from, port_from)) from None
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def bound_port(sockets: list[socket.socket]) -> int:
    """The port actually bound (the kernel's choice when 0 was asked for)."""
    port: int = sockets[0].getsockname()[1]
    return port


def _bind_message(exc: OSError, host: str, port: int, host_from: str, port_from: str) -> str:
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        other = 8081 if port == 8080 else port + 1 if 0 < port < 65535 else 8081
        return (f"port {port} on {host} is already in use by another program ({port_from}); choose another "
                f"with --port {other} or REALTIME_PORT={other} (--port 0 picks a free one)")
    if exc.errno == errno.EACCES:
        return (f"not allowed to listen on {shown} ({port_from}): ports below 1024 need privileges; "
                "choose --port 8080 or another above 1023")
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"cannot listen on {host} ({host_from}): it is not an address of this machine; "
                "use --host 127.0.0.1 (this machine only) or --host 0.0.0.0 (every interface)")
    return f"cannot listen on {shown}: {exc.strerror or exc}"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror) and len(exc.args) > 1:
        return str(exc.args[1])
    return str(exc)
