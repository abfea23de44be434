"""Database errors in one line an operator can act on: which server (password masked) and why.

psycopg2's messages span several lines and its exception class alone ("OperationalError") says nothing; both
the start-up checks and the replica's run-time warnings go through here, so they read the same way.
"""

from __future__ import annotations

import re

import psycopg2
from psycopg2.extensions import parse_dsn

_PASSWORD_IN_URL = re.compile(r"(://[^:/@]*:)[^@]*@")
_PASSWORD_IN_KEYWORDS = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
MASK = "***"


def mask_dsn(dsn: str) -> str:
    """The DSN with its password replaced, in either libpq form (URL or key=value)."""
    return _PASSWORD_IN_KEYWORDS.sub(lambda m: m.group(1) + MASK, _PASSWORD_IN_URL.sub(rf"\1{MASK}@", dsn))


def server_of(dsn: str) -> str:
    """`host:port` of a DSN (libpq's defaults where the DSN leaves them out), for messages."""
    try:
        parts = parse_dsn(dsn)
    except psycopg2.Error:
        return "an unparsable DSN"
    host = parts.get("host") or parts.get("hostaddr") or "localhost (unix socket)"
    return f"{host}:{parts.get('port') or 5432}"


def describe_db_error(exc: BaseException, dsn: str | None = None) -> str:
    """One line: the server's own words (whitespace folded), never the password, never just the class name."""
    text = " ".join(str(exc).split())
    if isinstance(exc, psycopg2.Error) and exc.pgcode:  # a server error: its SQLSTATE helps a search
        text = f"{text} (SQLSTATE {exc.pgcode})"
    if not text:
        text = type(exc).__name__
    if dsn:
        password = _password(dsn)
        if password:
            text = text.replace(password, MASK)
    return text


def _password(dsn: str) -> str | None:
    try:
        return parse_dsn(dsn).get("password") or None
    except psycopg2.Error:
        return None
