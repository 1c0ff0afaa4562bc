"""``mailroom-pop3d``: the POP3 server (fd names ``pop3``: 110 with STLS, ``pop3s``: 995 TLS).

Wires the pieces together and hands over: settings, accounts, the TLS context, one thread
pool for the whole process, and how a session opens its user's INBOX (the POP3 lock, then
the mail store).
"""

from __future__ import annotations

import gc
import logging
from concurrent.futures import ThreadPoolExecutor

from mailroom.accounts import Accounts, User
from mailroom.activation import Limits, serve
from mailroom.config import Settings
from mailroom.maildir import Maildir
from mailroom.mailstore import MailStore
from mailroom.pop3.maildrop import StoreMaildrop
from mailroom.pop3.server import endpoints
from mailroom.service import Sockets, run
from mailroom.tls import ServerTLS

log = logging.getLogger(__name__)

ENDPOINT_NAMES = ("pop3", "pop3s")


async def _serve(settings: Settings, accounts: Accounts, sockets: Sockets) -> None:
    # What the imports and the configuration made lives as long as the process: frozen, it is
    # no longer walked by each full garbage collection (see mailroom.imapd).
    gc.freeze()

    def open_maildrop(user: User) -> StoreMaildrop:
        maildir = Maildir.for_address(settings.mail_root, user.address, settings.hostname)
        maildir.create()
        return StoreMaildrop.open(
            maildir.root, lambda: MailStore(maildir, quota_bytes=user.quota_bytes)
        )

    tls = ServerTLS.for_clients(settings)
    executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="pop3")
    try:
        await serve(
            endpoints(settings, accounts, open_maildrop, tls, executor),
            sockets,
            limits=Limits(settings.pop3.max_connections, settings.pop3.max_connections_per_ip),
            idle_exit_seconds=settings.idle_exit_seconds,
            shutdown_grace_seconds=settings.shutdown_grace_seconds,
        )
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


def main() -> int:
    """Entry point of ``mailroom-pop3d``."""
    return run("mailroom-pop3d", _serve)
