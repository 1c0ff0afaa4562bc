"""``mailroom-imapd``: the IMAP server (fd names ``imap``: 143 with STARTTLS, ``imaps``: 993 TLS).

Wires the pieces together and hands over: settings, accounts, the TLS context, one inotify
watcher and one thread pool for the whole process, and a session factory per connection.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from mailroom.accounts import Accounts, User
from mailroom.activation import Endpoint, Hangup, Limits, serve
from mailroom.config import Settings
from mailroom.errors import ConnectionLimitError
from mailroom.imap.server import IMAPConnection
from mailroom.imap.session import IMAPSession, SessionConfig, SharedCache
from mailroom.inotify import Watcher
from mailroom.maildir import Maildir
from mailroom.mailstore import MailStore
from mailroom.service import Sockets, run
from mailroom.throttle import AuthThrottle, throttled
from mailroom.tls import server_context

log = logging.getLogger(__name__)

ENDPOINT_NAMES = ("imap", "imaps")


class UserSessions:
    """How many logged-in sessions each user has in this process, against a limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: Counter[str] = Counter()
        self.lock = threading.Lock()

    def claim(self, user: str) -> None:
        with self.lock:
            if self.open[user] >= self.limit:
                raise ConnectionLimitError(f"{user} already has {self.limit} sessions open")
            self.open[user] += 1

    def release(self, user: str) -> None:
        with self.lock:
            self.open[user] -= 1
            if self.open[user] <= 0:
                del self.open[user]


class CountedStore(MailStore):
    """A MailStore that tells UserSessions when its session ends."""

    def __init__(
        self, maildir: Maildir, *, user: str, quota_bytes: int, on_close: Callable[[str], None]
    ) -> None:
        super().__init__(maildir, quota_bytes=quota_bytes)
        self._user = user
        self._on_close: Callable[[str], None] | None = on_close

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self._on_close is not None:
                self._on_close(self._user)
                self._on_close = None


def session_factory(
    settings: Settings, accounts: Accounts, throttle: AuthThrottle, starttls: bool
) -> Callable[[str, bool], SessionConfig]:
    """A function making the SessionConfig of one connection from the client's address."""

    sessions = UserSessions(settings.imap.max_connections_per_user)
    shared_cache = SharedCache()

    def open_store(user: User) -> MailStore:
        maildir = Maildir.for_address(settings.mail_root, user.address, settings.hostname)
        sessions.claim(str(user.address))
        try:
            return CountedStore(
                maildir,
                user=str(user.address),
                quota_bytes=user.quota_bytes,
                on_close=sessions.release,
            )
        except BaseException:
            sessions.release(str(user.address))
            raise

    def make(peer: str, implicit_tls: bool) -> SessionConfig:
        return SessionConfig(
            hostname=settings.hostname,
            implicit_tls=implicit_tls,
            starttls_available=starttls and not implicit_tls,
            authenticate=throttled(accounts.verify_password, throttle, peer),
            open_store=open_store,
            max_literal=settings.message_size_limit,
            preauth_timeout=settings.imap.preauth_timeout_seconds,
            autologout=settings.imap.autologout_seconds,
            shared_cache=shared_cache,
        )

    return make


async def _serve(settings: Settings, accounts: Accounts, sockets: Sockets) -> None:
    loop = asyncio.get_running_loop()
    tls = server_context(settings.tls_cert, settings.tls_key)
    executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="imap")
    watcher = Watcher()

    def on_inotify() -> None:
        for connection in watcher.read():
            assert isinstance(connection, IMAPConnection)
            connection.changed()

    loop.add_reader(watcher.fd, on_inotify)
    make = session_factory(settings, accounts, AuthThrottle(accounts), starttls=tls is not None)
    busy = b"* BYE [UNAVAILABLE] Too many connections from your address\r\n"

    def connection(implicit_tls: bool) -> IMAPConnection:
        return IMAPConnection(
            lambda peer: IMAPSession(make(peer, implicit_tls)),
            starttls=tls,
            executor=executor,
            watcher=watcher,
        )

    endpoints = {"imap": Endpoint(lambda: connection(False), busy)}
    if tls is not None:
        endpoints["imaps"] = Endpoint(lambda: connection(True), busy, tls=tls)
    else:
        log.error(
            "imaps: no TLS certificate at %s; connections on 993 are closed", settings.tls_cert
        )
        endpoints["imaps"] = Endpoint(Hangup, busy)
    try:
        await serve(
            endpoints,
            sockets,
            limits=Limits(settings.imap.max_connections, settings.imap.max_connections_per_ip),
            idle_exit_seconds=settings.idle_exit_seconds,
            shutdown_grace_seconds=settings.shutdown_grace_seconds,
        )
    finally:
        loop.remove_reader(watcher.fd)
        watcher.close()
        executor.shutdown(wait=False, cancel_futures=True)


def main() -> int:
    """Entry point of ``mailroom-imapd``."""
    return run("mailroom-imapd", _serve)
