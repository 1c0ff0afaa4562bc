"""``mailroom-imapd``: the IMAP server (fd names ``imap``: 143 with STARTTLS, ``imaps``: 993 TLS).

Wires the pieces together and hands over: settings, accounts, the TLS context, one inotify
watcher and one thread pool for the whole process, and a session factory per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import gc
import logging
import os
import threading
from asyncio import sslproto
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from mailroom.accounts import Accounts, User
from mailroom.activation import Endpoint, Limits, serve
from mailroom.config import Settings
from mailroom.errors import ConnectionLimitError, StoreError
from mailroom.imap.server import IMAPConnection
from mailroom.imap.session import IMAPSession, SessionConfig, SharedCache
from mailroom.inotify import Watcher
from mailroom.maildir import Maildir
from mailroom.mailstore import MailStore
from mailroom.service import Sockets, run
from mailroom.throttle import AuthThrottle, throttled
from mailroom.tls import ServerTLS

log = logging.getLogger(__name__)

ENDPOINT_NAMES = ("imap", "imaps")
# asyncio gives each TLS connection a read buffer of SSLProtocol.max_size (256 KiB in Python
# 3.11-3.13), written through when the connection is made: 25 MB of a worker holding 100 IDLE
# clients. A TLS record is at most 16 KiB, so reading 32 KiB at a time costs nothing.
TLS_READ_BUFFER = 32 * 1024
MALLOC_ARENAS = 2  # see _fewer_malloc_arenas
_M_ARENA_MAX = -8  # glibc malloc.h


SESSIONS_DIR = "mailroom-sessions"  # in the user's Maildir root: one lock file per session slot


class SharedStores:
    """One MailStore per user for all of that user's sessions in this process, and the limit
    on how many sessions a user may have open in all the service's worker processes (each
    session holds an flock on one of ``limit`` slot files; the kernel drops it if the
    process dies).

    Sharing the store means one SQLite connection, one in-memory copy of each mailbox and
    one set of directory listings per user: a change made by one session is applied to the
    shared copy once, instead of being read back by each of the user's other sessions.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lock = threading.Lock()
        self.stores: dict[str, SharedStore] = {}

    def open(self, maildir: Maildir, user: str, quota_bytes: int) -> MailStore:
        slot = self._claim_slot(maildir, user)
        try:
            with self.lock:
                store = self.stores.get(user)
                if store is None:
                    store = SharedStore(maildir, quota_bytes=quota_bytes, owner=self, user=user)
                    self.stores[user] = store
                store.quota_bytes = quota_bytes  # the latest login's figure
                store.slots.append(slot)
                store.sessions += 1
                return store
        except BaseException:
            os.close(slot)
            raise

    def _claim_slot(self, maildir: Maildir, user: str) -> int:
        directory = maildir.root / SESSIONS_DIR
        try:
            maildir.create()
            directory.mkdir(mode=0o700, exist_ok=True)
            for n in range(self.limit):
                fd = os.open(directory / str(n), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    os.close(fd)
        except OSError as err:
            raise StoreError(f"cannot count the sessions of {user}: {err}") from None
        raise ConnectionLimitError(f"{user} already has {self.limit} sessions open")

    def release(self, store: SharedStore) -> bool:
        """One session of ``store`` ended; True if it was the last (the store is then out
        of the registry, so no new session can be given it)."""
        with self.lock:
            store.sessions -= 1
            if store.slots:  # slots are alike: give back any one
                os.close(store.slots.pop())
            if store.sessions > 0:
                return False
            if self.stores.get(store.user) is store:
                del self.stores[store.user]
            return True


class SharedStore(MailStore):
    """A MailStore shared by several sessions: closed when the last of them closes it."""

    def __init__(
        self, maildir: Maildir, *, quota_bytes: int, owner: SharedStores, user: str
    ) -> None:
        super().__init__(maildir, quota_bytes=quota_bytes)
        self.owner = owner
        self.user = user
        self.sessions = 0
        self.slots: list[int] = []  # the slot locks of its sessions

    def close(self) -> None:
        if self.owner.release(self):
            super().close()


def session_factory(
    settings: Settings, accounts: Accounts, throttle: AuthThrottle
) -> Callable[[str, bool, bool], SessionConfig]:
    """A function making the SessionConfig of one connection from the client's address."""

    stores = SharedStores(settings.imap.max_connections_per_user)
    shared_cache = SharedCache()

    def open_store(user: User) -> MailStore:
        maildir = Maildir.for_address(settings.mail_root, user.address, settings.hostname)
        return stores.open(maildir, str(user.address), user.quota_bytes)

    def make(peer: str, implicit_tls: bool, starttls: bool) -> SessionConfig:
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
    # What the imports and the configuration made lives as long as the process: frozen, it is
    # no longer walked by each full garbage collection, which indexing a big mailbox triggers
    # (a first SELECT of 10,000 messages: 20 ms less, of 260).
    gc.freeze()
    sslproto.SSLProtocol.max_size = TLS_READ_BUFFER  # this process's connections (and STARTTLS)
    tls = ServerTLS.for_clients(settings)
    executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="imap")
    watcher = Watcher()

    def on_inotify() -> None:
        for connection in watcher.read():
            assert isinstance(connection, IMAPConnection)
            connection.changed()

    loop.add_reader(watcher.fd, on_inotify)
    make = session_factory(settings, accounts, AuthThrottle.from_settings(settings, accounts))
    busy = b"* BYE [UNAVAILABLE] Too many connections from your address\r\n"

    def connection(implicit_tls: bool) -> IMAPConnection:
        starttls = None if implicit_tls else tls.context()  # the pair of this connection
        return IMAPConnection(
            lambda peer: IMAPSession(make(peer, implicit_tls, starttls is not None)),
            starttls=starttls,
            executor=executor,
            watcher=watcher,
        )

    if tls.context() is None:
        log.error("imaps: no TLS certificate at %s; connections are closed", settings.tls_cert)
    endpoints = {
        "imap": Endpoint(lambda: connection(False), busy),
        # 993: asked per connection; the handshake gets the current pair.
        "imaps": Endpoint(lambda: connection(True), busy, tls=tls.context),
    }
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


def _fewer_malloc_arenas() -> None:
    """glibc gives threads malloc arenas of their own, up to 8 a core, and each keeps what is
    freed in it: after a delivery storm a worker's 16 arenas held 15 MB of free memory, with
    two 5 MB. The executor's threads spend most of their time waiting for the GIL, so they do
    not contend for two. ``MALLOC_ARENA_MAX`` in the environment, if set, has the last word."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc: its allocator decides
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, MALLOC_ARENAS)


def main() -> int:
    """Entry point of ``mailroom-imapd``."""
    _fewer_malloc_arenas()
    return run(
        "mailroom-imapd",
        _serve,
        workers=lambda s: s.imap,
    )
