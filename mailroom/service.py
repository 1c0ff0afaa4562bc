"""The common start of every socket-activated mailroom program.

``run(program, serve)`` loads the settings (a bad configuration: one message, exit 78),
sets up logging, takes the sockets systemd passed, opens the accounts database and runs
``serve`` until it returns (idle exit or SIGTERM). Any ``MailroomError`` ends the program with
one clear line and exit status 1, never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from mailroom.accounts import Accounts
from mailroom.activation import inherited_sockets
from mailroom.config import Settings, load_settings
from mailroom.errors import MailroomError
from mailroom.logs import setup_logging

log = logging.getLogger(__name__)

EX_CONFIG = 78  # sysexits.h: configuration error

Sockets = dict[str, list[socket.socket]]
Serve = Callable[[Settings, Accounts, Sockets], Coroutine[Any, Any, None]]


def run(program: str, serve: Serve) -> int:
    """Run ``serve`` as ``program``; returns the exit status."""
    try:
        settings = load_settings()
    except MailroomError as err:
        print(f"{program}: {err}", file=sys.stderr)
        return EX_CONFIG
    setup_logging(program, settings.log_level)
    try:
        sockets = inherited_sockets()
        with Accounts(settings.auth_db) as accounts:
            asyncio.run(serve(settings, accounts, sockets))
    except MailroomError as err:
        log.error("%s", err)
        print(f"{program}: {err}", file=sys.stderr)
        return 1
    return 0
