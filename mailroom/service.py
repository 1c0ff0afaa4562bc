"""The common start of every socket-activated mailroom program.

``run(program, serve)`` loads the settings (a bad configuration: one message, exit 78;
validated settings are kept in systemd's ``$CACHE_DIRECTORY`` for the next start),
sets up logging, takes the sockets systemd passed, opens the accounts database and runs
``serve`` until it returns (idle exit or SIGTERM). Any ``MailroomError`` ends the program with
one clear line and exit status 1, never a traceback. With ``workers`` saying more than one,
the sockets are served by that many forked processes (``mailroom.workers``), each opening
its own database connection after the fork.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol

from mailroom.accounts import Accounts
from mailroom.activation import inherited_sockets, share_counts
from mailroom.config import Settings, load_settings
from mailroom.errors import MailroomError
from mailroom.logs import setup_logging
from mailroom.workers import SharedCounts, run_workers

log = logging.getLogger(__name__)

EX_CONFIG = 78  # sysexits.h: configuration error

Sockets = dict[str, list[socket.socket]]
Serve = Callable[[Settings, Accounts, Sockets], Coroutine[Any, Any, None]]


class WorkerSection(Protocol):
    """A settings section of a service that may run several processes (``[smtp]``, ...)."""

    @property
    def workers(self) -> int: ...  # 0: one per CPU
    @property
    def max_connections(self) -> int: ...


def run(
    program: str,
    serve: Serve,
    workers: Callable[[Settings], WorkerSection] | None = None,
    *,
    one_cpu_each: bool = False,
) -> int:
    """Run ``serve`` as ``program``; returns the exit status.

    ``workers(settings)`` gives the section saying how many processes serve the sockets and
    the connection limit they share; ``one_cpu_each`` keeps each of them to one CPU (see
    ``run_workers``).
    """
    settings = start(program)
    if settings is None:
        return EX_CONFIG
    try:
        sockets = inherited_sockets()
    except MailroomError as err:
        return failed(program, err)
    if workers is None:
        return _serve(program, serve, settings, sockets)
    section = workers(settings)
    count = section.workers or os.cpu_count() or 1
    if count <= 1:
        return _serve(program, serve, settings, sockets)
    counts = SharedCounts(section.max_connections)
    share_counts(counts)
    log.info("starting %d worker processes", count)

    def child() -> int:
        return _serve(program, serve, settings, sockets)

    return run_workers(count, child, counts, one_cpu_each=one_cpu_each)


def start(program: str) -> Settings | None:
    """The settings, with logging set up for ``program``; None after saying on stderr what
    is wrong with the configuration (the caller exits ``EX_CONFIG``)."""
    try:
        settings = load_settings(cache=cache_directory())
    except MailroomError as err:
        print(f"{program}: {err}", file=sys.stderr)
        return None
    setup_logging(program, settings.log_level)
    return settings


def cache_directory() -> Path | None:
    """The service's own cache directory (``CacheDirectory=`` in its unit), if it has one."""
    first = os.environ.get("CACHE_DIRECTORY", "").split(":")[0]
    return Path(first) if first else None


def _serve(program: str, serve: Serve, settings: Settings, sockets: Sockets) -> int:
    try:
        with Accounts(settings.auth_db) as accounts:
            asyncio.run(serve(settings, accounts, sockets))
    except MailroomError as err:
        return failed(program, err)
    return 0


def failed(program: str, err: MailroomError) -> int:
    """Log and print ``err`` as ``program``'s one line; exit status 1."""
    log.error("%s", err)
    print(f"{program}: {err}", file=sys.stderr)
    return 1
