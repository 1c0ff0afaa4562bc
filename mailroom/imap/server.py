"""The asyncio layer of the IMAP server: what IMAP adds to ``connection.SessionConnection``.

Owned here: COMPRESS=DEFLATE on the stream (RFC 4978), and waking an IDLE session when the
selected mailbox changes on disk (inotify, never polling: RFC 2177 clients expect EXISTS
within moments of a delivery). Reading, writing, worker threads, STARTTLS, timers and
back-pressure are the common part in ``mailroom.connection``; the protocol is ``session``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import zlib
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path

from mailroom.connection import SessionConnection
from mailroom.imap.session import IMAPSession
from mailroom.inotify import Watcher

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024  # inflated input is queued in pieces of at most this size
_IDLE_DEBOUNCE = 0.02  # seconds to gather a burst of file events into one IDLE update
_CHANGED = object()  # queue marker: inotify says the selected mailbox changed


class IMAPConnection(SessionConnection):
    """One IMAP client connection."""

    def __init__(
        self,
        make_session: Callable[[str], IMAPSession],
        *,
        starttls: ssl.SSLContext | None,
        executor: Executor,
        watcher: Watcher | None,
    ) -> None:
        super().__init__(
            make_session,
            starttls=starttls,
            executor=executor,
            name="IMAP",
            crash_reply=b"* BYE Internal error\r\n",
        )
        self.imap_session: IMAPSession | None = None
        self.watcher = watcher
        self.watched: list[Path] = []
        self.watched_name: str | None = None  # the selected mailbox when ``watched`` was set
        self.change_pending = False
        self.inflate: zlib._Decompress | None = None
        self.deflate: zlib._Compress | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert isinstance(self.session, IMAPSession)
        self.imap_session = self.session

    def inline(self, data: bytes) -> bool:
        return self.imap_session is not None and self.imap_session.quick(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.watcher is not None:
            self.watcher.forget(self)
        super().connection_lost(exc)

    # RFC 4978 COMPRESS=DEFLATE: raw deflate both ways, a sync flush after every write.

    def data_received(self, data: bytes) -> None:
        if self.inflate is None:
            super().data_received(data)
            return
        try:
            data = self.inflate.decompress(data)
        except zlib.error:
            log.info("%s: corrupt DEFLATE stream; closing", self.peer)
            self.abort()
            return
        # A small compressed input can inflate to a lot: queue it piecewise, under back-pressure.
        for start in range(0, len(data), _CHUNK):
            super().data_received(data[start : start + _CHUNK])

    def write(self, data: bytes) -> None:
        if data and self.deflate is not None:
            data = self.deflate.compress(data) + self.deflate.flush(zlib.Z_SYNC_FLUSH)
        super().write(data)

    def on_action(self, action: str) -> None:
        if action != "compress":
            super().on_action(action)
            return
        # The OK went out uncompressed; everything after it is compressed. RFC 4978 3: the
        # client sends nothing compressed before it has read the OK, so nothing queued is kept.
        self.drop_queued_input()
        self.deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
        self.inflate = zlib.decompressobj(-15)
        assert self.imap_session is not None
        self.imap_session.compress_started()

    # IDLE: inotify on the selected mailbox's directories.

    def changed(self) -> None:
        """inotify: a directory of the selected mailbox changed (called by the process's watcher)."""
        if not self.change_pending:
            self.change_pending = True
            asyncio.get_running_loop().call_later(_IDLE_DEBOUNCE, self.queue.put_nowait, _CHANGED)

    async def on_event(self, item: object) -> None:
        if item is not _CHANGED:
            return
        self.change_pending = False
        session = self.imap_session
        if session is not None and session.idling:
            loop = asyncio.get_running_loop()
            update = await loop.run_in_executor(self.executor, session.idle_poll)
            self.write(update)
            if update.startswith(b"* BYE") or b"\r\n* BYE" in update:  # e.g. UIDVALIDITY changed
                self.abort()

    def after_feed(self) -> None:
        if self.watcher is None or self.imap_session is None:
            return
        selected = self.imap_session.selected
        name = selected.name if selected is not None else None
        if name == self.watched_name:
            return  # the same mailbox (and so the same directories) as after the last command
        self.watched_name = name
        dirs = self.imap_session.watch_dirs()
        if dirs == self.watched:
            return
        self.watcher.forget(self)
        for directory in dirs:
            try:
                self.watcher.watch(directory, self)
            except OSError as err:
                log.warning("cannot watch %s: %s", directory, err)
        self.watched = dirs
