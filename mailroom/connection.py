"""One client connection driving a sans-IO session: the asyncio layer shared by the servers.

What this module owns: reading and writing the socket, running each ``session.feed`` in a
worker thread (one at a time per connection, so the session may block on the store and on
password hashing; a subclass may say a feed is quick enough for the loop: ``inline``),
STARTTLS on the transport, the inactivity timer, and back-pressure both ways (a client that
sends faster than it is served, or does not read what it asked for, cannot fill memory).
The protocol itself is in the session.

What it promises:

- **STARTTLS injection** (RFC 2595 4, RFC 3207 4.2, RFC 9051 6.2.1): when ``feed`` asks for
  ``"starttls"``, every byte received in plaintext behind the command is discarded before
  the handshake starts, with no await in between.
- ``session.close()`` is called exactly once, after the last ``feed`` has returned (never
  while one runs in its thread), whether the client said goodbye, hung up or timed out.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Protocol

from mailroom.activation import peer_host

log = logging.getLogger(__name__)

PAUSE_ABOVE = 1024 * 1024  # queued input bytes before we stop reading the socket
_HANGUP = object()  # queue marker: the connection is gone
_TIMEOUT = object()  # queue marker: the inactivity timer fired


class Output(Protocol):
    @property
    def data(self) -> bytes: ...

    @property
    def action(self) -> str | None: ...  # None, "starttls" or "close"


class Session(Protocol):
    """The sans-IO session of one connection (``pop3.session.POP3Session`` is one)."""

    @property
    def timeout(self) -> float: ...

    def greeting(self) -> bytes: ...

    def feed(self, data: bytes) -> Output: ...

    def tls_started(self) -> None: ...

    def timed_out(self) -> bytes: ...

    def close(self) -> None: ...


class SessionConnection(asyncio.Protocol):
    """One client connection; ``make_session(peer)`` makes its session."""

    def __init__(
        self,
        make_session: Callable[[str], Session],
        *,
        starttls: ssl.SSLContext | None,
        executor: Executor,
        name: str = "session",
        crash_reply: bytes = b"",
    ) -> None:
        self.make_session = make_session
        self.starttls_context = starttls
        self.executor = executor
        self.name = name
        self.crash_reply = crash_reply  # said when the session raises: a bug, logged
        self.queue: asyncio.Queue[bytes | object] = asyncio.Queue()
        self.queued = 0
        self.paused = False
        self.writable = asyncio.Event()
        self.writable.set()
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.active_at = 0.0  # loop time of the last input or answer
        self.peer = ""

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = peer_host(transport)
        self.session = self.make_session(self.peer)
        self.write(self.session.greeting())
        self.reset_timer()
        self.task = asyncio.get_running_loop().create_task(self.run())

    def data_received(self, data: bytes) -> None:
        self.queue.put_nowait(data)
        self.queued += len(data)
        self.reset_timer()
        if self.queued > PAUSE_ABOVE and not self.paused and self.transport is not None:
            self.transport.pause_reading()
            self.paused = True

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport = None
        self.writable.set()
        self.queue.put_nowait(_HANGUP)

    # plumbing

    def _dequeued(self, size: int) -> None:
        self.queued -= size
        if self.paused and self.queued <= PAUSE_ABOVE // 2 and self.transport is not None:
            self.transport.resume_reading()
            self.paused = False

    def write(self, data: bytes) -> None:
        if data and self.transport is not None:
            self.transport.write(data)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def reset_timer(self) -> None:
        """Restart the inactivity timer. Cheap: it notes the time, and the one timer handle,
        when it fires, sleeps again for what is left (the timeout may also have changed:
        the session's is shorter before login)."""
        if self.session is None or self.transport is None:
            return
        loop = asyncio.get_running_loop()
        self.active_at = loop.time()
        if self.timer is None:
            self.timer = loop.call_at(self.active_at + self.session.timeout, self._timer_fired)

    def _timer_fired(self) -> None:
        self.timer = None
        if self.session is None or self.transport is None:
            return
        loop = asyncio.get_running_loop()
        deadline = self.active_at + self.session.timeout
        if loop.time() >= deadline:
            self.queue.put_nowait(_TIMEOUT)
        else:
            self.timer = loop.call_at(deadline, self._timer_fired)

    def drop_queued_input(self) -> None:
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if isinstance(item, bytes):
                self._dequeued(len(item))
            elif item is _HANGUP:  # keep the news that the client is gone
                self.queue.put_nowait(item)
                return

    # the conversation

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        session = self.session
        assert session is not None
        try:
            while self.transport is not None:
                item = await self.queue.get()
                if item is _HANGUP:
                    break
                if item is _TIMEOUT:
                    if loop.time() < self.active_at + session.timeout:
                        continue  # queued while a command ran (a login waiting for its hash)
                    self.write(await loop.run_in_executor(self.executor, session.timed_out))
                    self.abort()
                    break
                if not isinstance(item, bytes):
                    await self.on_event(item)  # a marker a subclass queued (e.g. "mailbox changed")
                    continue
                self._dequeued(len(item))
                await self.writable.wait()  # the client reads what it asked for first
                if self.inline(item):
                    out = session.feed(item)
                else:
                    out = await loop.run_in_executor(self.executor, session.feed, item)
                self.write(out.data)
                self.reset_timer()
                if out.action == "close":
                    self.abort()
                    break
                if out.action == "starttls":
                    await self.start_tls()
                elif out.action is not None:
                    self.on_action(out.action)
                self.after_feed()
        except asyncio.CancelledError:
            self.session = None
            session.close()  # the loop is going away: release what the session holds now
            raise
        except Exception:
            log.exception("%s: %s connection failed", self.peer, self.name)
            self.write(self.crash_reply)
            self.abort()
        self.session = None
        await loop.run_in_executor(self.executor, session.close)

    # hooks for protocols with more to do than the common part

    async def on_event(self, item: object) -> None:
        """A non-bytes item a subclass put into the queue; runs between two feeds."""

    def on_action(self, action: str) -> None:
        """An action of ``feed`` other than "close" and "starttls"."""
        raise ValueError(f"{self.name}: unknown session action {action!r}")

    def inline(self, data: bytes) -> bool:
        """Whether ``feed(data)`` is quick enough to run on the event loop, saving the two
        thread switches of a worker (tens of microseconds: most of a small command's cost).
        Only for work that never waits on a lock, a password hash or an fsync."""
        return False

    def after_feed(self) -> None:
        """Called after each ``feed`` has been answered."""

    async def start_tls(self) -> None:
        """Discard what was sent behind the STARTTLS command, then do the handshake."""
        assert self.transport is not None and self.session is not None
        assert self.starttls_context is not None
        # No await between dropping the queue and start_tls swapping the protocol: nothing
        # received in plaintext can slip in between.
        self.drop_queued_input()
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                self.transport, self, self.starttls_context, server_side=True
            )
        except (OSError, ssl.SSLError, ConnectionError) as err:
            log.info("%s: TLS handshake failed: %s", self.peer, err)
            self.abort()
            return
        if transport is None:
            self.abort()
            return
        self.transport = transport
        self.session.tls_started()
