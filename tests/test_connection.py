"""The asyncio layer shared by the servers: a sans-IO session behind a real loopback socket."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from mailroom.connection import PAUSE_ABOVE, SessionConnection


@dataclass(frozen=True)
class Out:
    data: bytes
    action: str | None = None


class EchoSession:
    """Echoes each feed as ``got:<data>``; ``close`` ends it; records what happened, in order."""

    def __init__(self, timeout: float = 60, feed_delay: float = 0.0) -> None:
        self.timeout = timeout
        self.feed_delay = feed_delay
        self.events: list[str] = []
        self.threads: list[threading.Thread] = []
        self.gate = threading.Event()
        self.gate.set()

    def greeting(self) -> bytes:
        return b"hello\r\n"

    def feed(self, data: bytes) -> Out:
        self.events.append("feed")
        self.threads.append(threading.current_thread())
        self.gate.wait()
        time.sleep(self.feed_delay)
        if data.startswith(b"boom"):
            raise RuntimeError("a bug in the session")
        self.events.append("fed")
        return Out(b"got:" + data, "close" if data.startswith(b"bye") else None)

    def tls_started(self) -> None:
        self.events.append("tls")

    def timed_out(self) -> bytes:
        self.events.append("timed out")
        return b"too slow\r\n"

    def close(self) -> None:
        self.events.append("close")


class QuickConnection(SessionConnection):
    def inline(self, data: bytes) -> bool:
        return data.startswith(b"quick")


async def _serve(
    session: EchoSession, kind: type[SessionConnection] = SessionConnection
) -> tuple[asyncio.Server, list[SessionConnection], int]:
    executor = ThreadPoolExecutor(2)
    made: list[SessionConnection] = []

    def factory() -> SessionConnection:
        conn = kind(
            lambda peer: session, starttls=None, executor=executor, crash_reply=b"crashed\r\n"
        )
        made.append(conn)
        return conn

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    return server, made, server.sockets[0].getsockname()[1]


async def _until(condition: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_conversation_and_close_after_goodbye() -> None:
    async def main() -> None:
        session = EchoSession()
        server, _, port = await _serve(session)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await reader.readline() == b"hello\r\n"
        writer.write(b"one\r\n")
        assert await reader.readline() == b"got:one\r\n"
        writer.write(b"bye\r\n")
        assert await reader.read() == b"got:bye\r\n"  # then EOF: the server hung up
        await _until(lambda: "close" in session.events)
        assert session.events == ["feed", "fed", "feed", "fed", "close"]
        server.close()

    asyncio.run(main())


def test_close_waits_for_the_feed_in_progress() -> None:
    async def main() -> None:
        session = EchoSession(feed_delay=0.3)
        server, _, port = await _serve(session)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        writer.write(b"slow\r\n")
        await _until(lambda: "feed" in session.events)
        writer.close()  # the client leaves while its command is still being served
        await _until(lambda: "close" in session.events)
        assert session.events == ["feed", "fed", "close"]
        server.close()

    asyncio.run(main())


def test_inactivity_timeout() -> None:
    async def main() -> None:
        session = EchoSession(timeout=0.2)
        server, _, port = await _serve(session)
        reader, _ = await asyncio.open_connection("127.0.0.1", port)
        start = time.monotonic()
        assert await reader.read() == b"hello\r\ntoo slow\r\n"
        assert 0.15 < time.monotonic() - start < 3
        await _until(lambda: "close" in session.events)
        assert session.events == ["timed out", "close"]
        server.close()

    asyncio.run(main())


def test_a_session_bug_is_answered_and_logged_not_a_traceback_to_the_client() -> None:
    async def main() -> None:
        session = EchoSession()
        server, _, port = await _serve(session)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        writer.write(b"boom\r\n")
        assert await reader.read() == b"crashed\r\n"
        await _until(lambda: "close" in session.events)
        server.close()

    asyncio.run(main())


def test_input_is_bounded_while_the_session_is_busy() -> None:
    async def main() -> None:
        session = EchoSession()
        session.gate.clear()  # the first feed blocks until we let it go
        server, made, port = await _serve(session)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        chunk = b"x" * 65536
        sent = 0

        async def flood() -> None:
            nonlocal sent
            while sent < 16 * PAUSE_ABOVE:
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)

        task = asyncio.create_task(flood())
        await asyncio.sleep(1.0)
        conn = made[0]
        assert conn.paused and conn.queued <= PAUSE_ABOVE + 256 * 1024
        assert sent < 16 * PAUSE_ABOVE  # the client is held back, not buffered without end
        task.cancel()
        session.gate.set()
        writer.close()
        await _until(lambda: "close" in session.events, timeout=30)
        server.close()

    asyncio.run(main())


def test_feeds_run_in_a_worker_unless_inline_says_quick() -> None:
    async def main() -> None:
        session = EchoSession()
        server, _, port = await _serve(session, QuickConnection)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        for line in (b"slow\r\n", b"quick\r\n"):
            writer.write(line)
            assert await reader.readline() == b"got:" + line
        loop_thread = threading.current_thread()
        assert session.threads[0] is not loop_thread and session.threads[1] is loop_thread
        writer.close()
        server.close()

    asyncio.run(main())
