"""Socket activation, the receiving side: take the listening sockets systemd passed and serve them.

What this module owns:

- ``inherited_sockets()`` reads the systemd protocol (``LISTEN_PID``, ``LISTEN_FDS``,
  ``LISTEN_FDNAMES``; sd_listen_fds(3)) through libsystemd (systemd-python) where it is
  installed, else from the environment directly, and returns the sockets by fd name.
- ``serve()`` runs one asyncio loop over those sockets, picks the protocol per fd name,
  limits connections (in all and per client address), exits by itself after
  ``idle_exit_seconds`` with no connection open, and on SIGTERM/SIGINT stops accepting and
  lets open sessions finish for at most ``shutdown_grace_seconds``. In a service of several
  worker processes (``mailroom.workers``) the counts are the service's, shared by all, and
  a new connection goes to the least busy worker (``_Acceptor``).

The same code runs under systemd, under ``systemd-socket-activate`` and under mailroom's own
activator (``mailroom.activator``, used by ``bin/dev`` and the tests).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import ssl
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mailroom.errors import ActivationError
from mailroom.throttle import client_group
from mailroom.workers import SharedCounts

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
DEFER_SECONDS = 0.005  # how long a busier worker leaves a new connection to the others
ACCEPT_BATCH = 64  # connections taken per wakeup, at most
HANDSHAKE_TIMEOUT = 10.0  # implicit TLS: a client silent this long is hung up on (asyncio: 60)


def inherited_sockets(environ: Mapping[str, str] | None = None) -> dict[str, list[socket.socket]]:
    """The listening sockets passed to this process, grouped by fd name.

    Raises ``ActivationError`` when none were passed (or they were meant for another process).
    Removes the ``LISTEN_*`` variables so that children do not inherit them.
    """
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()):
        raise ActivationError(
            "no sockets were passed to this process: it is started by systemd socket units "
            "(or bin/dev, or systemd-socket-activate), which set LISTEN_PID/LISTEN_FDS"
        )
    try:
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        raise ActivationError(f"LISTEN_FDS is not a number: {env.get('LISTEN_FDS')!r}") from None
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    fds = {SD_LISTEN_FDS_START + i: names[i] if i < len(names) else "unknown" for i in range(count)}
    if environ is None:
        fds = _systemd_listen_fds() or fds
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(key, None)
    if not fds:
        raise ActivationError("LISTEN_FDS says no sockets were passed")
    result: dict[str, list[socket.socket]] = {}
    for fd, name in fds.items():
        try:
            sock = socket.socket(fileno=fd)
        except OSError as err:
            raise ActivationError(f"fd {fd} ({name}) is not a socket: {err}") from None
        os.set_inheritable(fd, False)
        sock.setblocking(False)
        result.setdefault(name, []).append(sock)
    return result


def _systemd_listen_fds() -> dict[int, str]:
    """sd_listen_fds_with_names(3) through systemd-python, when it is installed."""
    try:
        from systemd.daemon import listen_fds_with_names
    except ImportError:
        return {}
    return {
        int(fd): str(name) for fd, name in listen_fds_with_names(unset_environment=False).items()
    }


@dataclass(frozen=True, slots=True)
class Limits:
    """How many connections one process serves, in all and per client address."""

    max_connections: int
    max_per_ip: int


ProtocolFactory = Callable[[], asyncio.BaseProtocol]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """What to run on the sockets of one fd name, and what to say when refusing a client."""

    factory: ProtocolFactory
    busy_reply: bytes
    # Implicit TLS (ports 465, 993, 995): handshake first. A function is asked on each
    # connection (mailroom.tls.ServerTLS.context); its None (no certificate) hangs up at once.
    tls: ssl.SSLContext | Callable[[], ssl.SSLContext | None] | None = None


class _Refuse(asyncio.Protocol):
    """Says one line (e.g. ``421 4.7.0 too many connections``) and hangs up."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(self.reply)
        transport.close()


_shared_counts: SharedCounts | None = None


def share_counts(counts: SharedCounts) -> None:
    """Count connections in ``counts`` (made before forking the workers of one service)."""
    global _shared_counts
    _shared_counts = counts


class ConnectionTracker:
    """Counts open connections per client address and tells when the process is idle."""

    def __init__(
        self, limits: Limits, idle_exit_seconds: float, on_idle: Callable[[], None]
    ) -> None:
        self.limits = limits
        self.shared = _shared_counts
        self.idle_exit_seconds = idle_exit_seconds
        self.on_idle = on_idle
        self.per_ip: Counter[str] = Counter()
        self.open = 0
        self.drained = asyncio.Event()
        self._idle_timer: asyncio.TimerHandle | None = None
        self.arm_idle_timer()

    def arm_idle_timer(self) -> None:
        if self.idle_exit_seconds > 0:
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_later(self.idle_exit_seconds, self._idle)

    def _idle(self) -> None:
        if self.shared is not None and self.shared.total > 0:
            self.arm_idle_timer()  # another worker serves: the service is not idle
            return
        self.on_idle()

    def admit(self, peer: str) -> bool:
        """Whether a new connection from ``peer`` may be served."""
        if self.shared is not None:
            limits = self.limits
            if not self.shared.admit(peer, limits.max_connections, limits.max_per_ip):
                return False
        elif (
            self.open >= self.limits.max_connections or self.per_ip[peer] >= self.limits.max_per_ip
        ):
            return False
        self.open += 1
        self.per_ip[peer] += 1
        self.drained.clear()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        return True

    def release(self, peer: str) -> None:
        if self.shared is not None:
            self.shared.release(peer)
        self.open -= 1
        self.per_ip[peer] -= 1
        if self.per_ip[peer] <= 0:
            del self.per_ip[peer]
        if self.open == 0:
            self.drained.set()
            self.arm_idle_timer()


def peer_host(transport: asyncio.BaseTransport) -> str:
    """The client's address without the port ("local" for a UNIX socket)."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "local"


def _tracked_factory(endpoint: Endpoint, tracker: ConnectionTracker) -> ProtocolFactory:
    def make() -> asyncio.BaseProtocol:
        return _TrackingProxy(endpoint, tracker)

    return make


class _TrackingProxy(asyncio.Protocol):
    """Admits or refuses the connection, then hands every event to the real protocol.

    The real protocol is created only when the connection is admitted, so a refused client
    costs nothing but one line of reply.
    """

    def __init__(self, endpoint: Endpoint, tracker: ConnectionTracker) -> None:
        self.endpoint = endpoint
        self.tracker = tracker
        self.inner: asyncio.BaseProtocol | None = None
        self.peer = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        host = peer_host(transport)
        self.peer = client_group(host)
        if not self.tracker.admit(self.peer):
            log.warning("refusing connection from %s: too many connections", host)
            _Refuse(self.endpoint.busy_reply).connection_made(transport)
            return
        self.inner = self.endpoint.factory()
        # The inner protocol talks to the transport directly from now on (set_protocol),
        # which also keeps STARTTLS's own set_protocol calls working.
        transport.set_protocol(self.inner)
        self.inner.connection_made(transport)
        _watch_close(self.inner, lambda: self.tracker.release(self.peer))

    def data_received(self, data: bytes) -> None:  # only before admission; drop
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        pass


class _Acceptor:
    """Accepts the connections of one listening socket into the running loop.

    In a service of several workers every worker's loop watches the same socket and the
    kernel wakes them all for a new connection. A worker with more open connections than
    another live worker then waits ``DEFER_SECONDS`` before taking it, so that the less busy
    one does and the connections spread over the cores; if nobody has taken it by then (that
    worker is stuck), this one does. A burst is shared the same way: a worker stops taking
    connections as soon as the ones it has just accepted make it the busier one.
    """

    def __init__(
        self,
        sock: socket.socket,
        factory: ProtocolFactory,
        tls: ssl.SSLContext | Callable[[], ssl.SSLContext | None] | None,
        shared: SharedCounts | None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.factory = factory
        self.tls = tls
        self.shared = shared
        self.stopped = False
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._starting = 0  # accepted, not yet counted in ``shared`` (being set up)
        sock.setblocking(False)

    def start(self) -> None:
        self.loop.add_reader(self.sock.fileno(), self._readable)

    def stop(self) -> None:
        self.stopped = True
        self.loop.remove_reader(self.sock.fileno())
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _pause(self, seconds: float) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self._timer = self.loop.call_later(seconds, self._resume)

    def _busier(self) -> bool:
        return self.shared is not None and self.shared.busier(self._starting)

    def _readable(self) -> None:
        if self._busier():
            self._pause(DEFER_SECONDS)
        else:
            self._accept()

    def _resume(self) -> None:
        self._timer = None
        if not self.stopped and self._accept():
            self.start()

    def _accept(self) -> bool:
        """Take the waiting connections; False when accepting is paused (out of descriptors)."""
        for taken in range(ACCEPT_BATCH):
            if taken and self._busier():
                return True  # the others are left to a less busy worker (see _readable)
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return True
            except OSError as err:
                if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("cannot accept connections (%s); trying again in a second", err)
                    self._pause(1.0)
                    return False
                raise
            conn.setblocking(False)
            self._starting += 1
            task = self.loop.create_task(self._connect(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return True

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self._set_up(conn)
        finally:
            self._starting -= 1  # counted by the tracker now, or closed

    async def _set_up(self, conn: socket.socket) -> None:
        tls = self.tls() if callable(self.tls) else self.tls
        if tls is None and self.tls is not None:
            conn.close()  # implicit TLS without a certificate: nothing can be said
            return
        try:
            await self.loop.connect_accepted_socket(
                self.factory,
                conn,
                ssl=tls,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT if tls else None,
            )
        except (OSError, ssl.SSLError, TimeoutError) as err:  # a failed TLS handshake, a reset
            log.debug("connection not set up: %s", err)
            conn.close()


def _watch_close(protocol: asyncio.BaseProtocol, callback: Callable[[], None]) -> None:
    """Call ``callback`` once, after ``protocol.connection_lost`` ran."""
    original = protocol.connection_lost
    done = False

    def connection_lost(exc: Exception | None) -> None:
        nonlocal done
        try:
            original(exc)
        finally:
            if not done:
                done = True
                callback()

    protocol.connection_lost = connection_lost  # type: ignore[method-assign]


async def serve(
    endpoints: Mapping[str, Endpoint],
    sockets: Mapping[str, list[socket.socket]],
    *,
    limits: Limits,
    idle_exit_seconds: float,
    shutdown_grace_seconds: float,
    on_shutdown: Callable[[], None] | None = None,
) -> None:
    """Serve ``sockets`` with the endpoint of each fd name until idle or told to stop."""
    unknown = sorted(set(sockets) - set(endpoints))
    if unknown:
        raise ActivationError(
            f"passed sockets with fd names {', '.join(unknown)}; this program serves "
            f"{', '.join(sorted(endpoints))} (set FileDescriptorName= in the .socket unit)"
        )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reason: list[str] = []

    def request_stop(why: str) -> None:
        if not stop.is_set():
            reason.append(why)
            stop.set()

    tracker = ConnectionTracker(limits, idle_exit_seconds, lambda: request_stop("idle"))
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, request_stop, signal.Signals(signum).name)
    acceptors = []
    for name, socks in sockets.items():
        for sock in socks:
            factory = _tracked_factory(endpoints[name], tracker)
            acceptor = _Acceptor(sock, factory, endpoints[name].tls, tracker.shared)
            acceptor.start()
            acceptors.append(acceptor)
    log.info("serving %s", ", ".join(f"{n} ({len(s)} socket(s))" for n, s in sockets.items()))
    await stop.wait()
    for acceptor in acceptors:
        acceptor.stop()
    if tracker.open:
        log.info("%s: waiting for %d open session(s) to finish", reason[0], tracker.open)
        if on_shutdown is not None:
            on_shutdown()
        try:
            await asyncio.wait_for(tracker.drained.wait(), shutdown_grace_seconds)
        except TimeoutError:
            log.warning(
                "%d session(s) still open after %ss; closing them",
                tracker.open,
                shutdown_grace_seconds,
            )
    log.info("exiting (%s)", reason[0])
