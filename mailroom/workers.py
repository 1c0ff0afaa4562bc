"""Several worker processes on one set of passed sockets, for the servers that need the cores.

What this module owns:

- ``SharedCounts``: the open connections in all, per worker and per client address, in memory
  shared by the workers (an anonymous shared mapping made before the fork, under one lock),
  so the connection limits hold for the service as a whole, not per worker, and a busier
  worker can leave a new connection to a less busy one (``activation``).
- ``run_workers(n, child)``: forks ``n`` workers that each run ``child()`` (their own asyncio
  loop accepting on the same listening sockets: the kernel hands each connection to one of
  them), if asked each kept to one of the CPUs this process may use (worker ``i`` on the
  ``i``-th, round robin), and supervises them: SIGTERM/SIGINT are passed on, a worker that
  crashed while the others serve is started again (at most ``RESTARTS`` a minute), and the
  parent exits when every worker has exited, with the first failure's status.

Why one CPU per worker (port 25 asks for it): a worker's event loop and its threads (Maildir
deliveries, their fsyncs) hand the interpreter lock to each other many times a message. On
one CPU a hand-off is a switch between threads; across CPUs it is a wake-up of another CPU,
several times dearer (on a 2-CPU VM, 17 us against 2.4 us; port 25 then takes about a tenth
less CPU a message). The servers that check passwords do not ask: argon2 computes its four
lanes on four threads, which one CPU would serialize. One worker alone is never kept to a CPU.

A worker leaves by itself only when the whole service is idle (``SharedCounts.total`` zero
for the idle time, see ``activation.ConnectionTracker``), so systemd sees one service that
exits when nobody is connected, exactly as with one process.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import signal
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from types import FrameType

log = logging.getLogger(__name__)

RESTARTS = 10  # crashed workers started again per minute, at most
MAX_WORKERS = 64
_TOTALS = struct.Struct(f"={MAX_WORKERS}q")  # open connections of each worker
_LIVE = struct.Struct(f"={MAX_WORKERS}?")  # which workers are running
_SLOTS_AT = _TOTALS.size + _LIVE.size
_SLOT = struct.Struct("=ii46s")  # worker, its open connections from one address, the address


class SharedCounts:
    """Open connections in all and per address, shared by the workers of one service.

    Each worker counts its own (``worker`` is set in the child after the fork), so that
    ``forget(worker)`` can drop exactly the connections of a worker that died without
    releasing them. Per (worker, address) counts live in an open-addressing table with room
    for ``capacity`` entries per worker; a slot whose count is back to zero is free again.
    The lock is an ``fcntl`` record lock on an unlinked file: the kernel releases it when its
    holder dies, so a worker killed inside it cannot stop the others.
    """

    def __init__(self, capacity: int) -> None:
        self.worker = 0
        self.slots = 1
        while self.slots < 2 * capacity * 2:
            self.slots *= 2
        self._map = mmap.mmap(-1, _SLOTS_AT + self.slots * _SLOT.size, flags=mmap.MAP_SHARED)
        self._lock_file = tempfile.TemporaryFile()  # noqa: SIM115 - open as long as the counts

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.lockf(self._lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self._lock_file, fcntl.LOCK_UN)

    @property
    def total(self) -> int:
        with self._locked():
            return sum(_TOTALS.unpack_from(self._map, 0))

    def admit(self, peer: str, max_total: int, max_per_peer: int) -> bool:
        """Count one more connection from ``peer`` if both limits allow it."""
        key = _key(peer)
        with self._locked():
            totals = list(_TOTALS.unpack_from(self._map, 0))
            if sum(totals) >= max_total:
                return False
            mine, of_peer = self._find(key)
            if of_peer >= max_per_peer:
                return False
            _, count, _ = _SLOT.unpack_from(self._map, mine)
            _SLOT.pack_into(self._map, mine, self.worker, count + 1, key)
            totals[self.worker] += 1
            _TOTALS.pack_into(self._map, 0, *totals)
            return True

    def release(self, peer: str) -> None:
        key = _key(peer)
        with self._locked():
            mine, _ = self._find(key)
            _, count, _ = _SLOT.unpack_from(self._map, mine)
            if count <= 0:
                return
            _SLOT.pack_into(self._map, mine, self.worker, count - 1, key)
            totals = list(_TOTALS.unpack_from(self._map, 0))
            totals[self.worker] = max(totals[self.worker] - 1, 0)
            _TOTALS.pack_into(self._map, 0, *totals)

    def join(self, worker: int) -> None:
        """Count as ``worker`` (in the worker, after the fork): a live worker from now on."""
        self.worker = worker
        with self._locked():
            self._set_live(worker, True)

    def _set_live(self, worker: int, live: bool) -> None:
        """Call with the lock held."""
        flags = list(_LIVE.unpack_from(self._map, _TOTALS.size))
        flags[worker] = live
        _LIVE.pack_into(self._map, _TOTALS.size, *flags)

    def busier(self, starting: int = 0) -> bool:
        """Whether another live worker has fewer open connections than this one, counting
        ``starting`` more for this one (accepted, not yet counted)."""
        with self._locked():
            totals = _TOTALS.unpack_from(self._map, 0)
            live = _LIVE.unpack_from(self._map, _TOTALS.size)
        mine = totals[self.worker] + starting
        return any(live[i] and totals[i] < mine for i in range(MAX_WORKERS) if i != self.worker)

    def forget(self, worker: int) -> None:
        """Drop every connection ``worker`` counted (it has exited)."""
        with self._locked():
            self._set_live(worker, False)
            totals = list(_TOTALS.unpack_from(self._map, 0))
            totals[worker] = 0
            _TOTALS.pack_into(self._map, 0, *totals)
            for i in range(self.slots):
                offset = _SLOTS_AT + i * _SLOT.size
                owner, count, key = _SLOT.unpack_from(self._map, offset)
                if owner == worker and count:
                    _SLOT.pack_into(self._map, offset, owner, 0, key)

    def _find(self, key: bytes) -> tuple[int, int]:
        """(the slot of this worker for ``key``, or the first free one on the probe path;
        the connections from ``key`` counted by all workers)."""
        start = hash(key) & (self.slots - 1)  # same hash in every worker: forked, one seed
        mine = free = -1
        of_peer = 0
        for i in range(self.slots):
            offset = _SLOTS_AT + ((start + i) & (self.slots - 1)) * _SLOT.size
            owner, count, name = _SLOT.unpack_from(self._map, offset)
            if name == key:
                of_peer += count
                if owner == self.worker:
                    mine = offset
            elif count == 0 and free < 0:
                free = offset
            if not name.strip(b"\0"):  # never used: the key is not further on
                if free < 0:
                    free = offset
                break
        if mine < 0:
            if free < 0:  # pragma: no cover - room for twice every worker's limit
                raise RuntimeError("connection table full")
            mine = free
        return mine, of_peer


def _key(peer: str) -> bytes:
    return peer.encode("ascii", "replace")[: _SLOT.size - 8].ljust(_SLOT.size - 8, b"\0")


def _die_with_parent(parent: int) -> None:
    """prctl(PR_SET_PDEATHSIG, SIGTERM): a worker whose supervisor was killed stops too
    (systemd would kill the cgroup anyway; mailroom's own activator relies on this)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl: stop now
        os.kill(os.getpid(), signal.SIGTERM)


def _keep_to(cpu: int, index: int) -> None:
    """Keep this process (and the threads it will start) to ``cpu``; where a seccomp filter
    or a cpuset refuses, it serves unpinned, as it would have otherwise."""
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as exc:
        log.info("worker %d not kept to CPU %d: %s", index, cpu, exc.strerror or exc)


def run_workers(
    count: int,
    child: Callable[[], int],
    counts: SharedCounts | None = None,
    *,
    one_cpu_each: bool = False,
) -> int:
    """Run ``child`` in ``count`` forked processes until all have exited; the exit status.

    With ``counts``, each worker counts as its own index, and the connections of a worker
    that has exited are forgotten. With ``one_cpu_each`` (and more than one worker), worker
    ``i`` is kept to the ``i``-th CPU this process may use, round robin.
    """
    count = min(count, MAX_WORKERS)
    cpus = sorted(os.sched_getaffinity(0)) if one_cpu_each and count > 1 else []
    workers: dict[int, int] = {}  # pid -> index
    stopping = False
    restarts: list[float] = []
    status = 0

    stop_signals = {signal.SIGTERM, signal.SIGINT}
    supervisor = os.getpid()

    def spawn(index: int) -> None:
        # A stop signal must find every worker in ``workers``: none is delivered between
        # the fork and the pid's recording (the child resets its handlers, then unblocks).
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        try:
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    signal.signal(signal.SIGINT, signal.SIG_DFL)
                    _die_with_parent(supervisor)
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
                    if counts is not None:
                        counts.join(index)
                    if len(cpus) > 1:
                        _keep_to(cpus[index % len(cpus)], index)
                    code = child()
                except BaseException:
                    log.exception("worker %d failed", index)
                finally:
                    logging.shutdown()
                    os._exit(code)
            workers[pid] = index
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for index in range(count):
            if stopping:
                break
            spawn(index)
        while workers:
            try:
                pid, wait_status = os.wait()
            except ChildProcessError:  # pragma: no cover - none left
                break
            index = workers.pop(pid)
            if counts is not None:
                counts.forget(index)  # a worker that died may not have released its own
            code = os.waitstatus_to_exitcode(wait_status)
            if code == 0 or stopping:
                continue  # idle exit, or told to stop
            log.error("worker %d exited with status %d", index, code)
            now = time.monotonic()
            restarts[:] = [t for t in restarts if now - t < 60] + [now]
            if workers and not stopping and len(restarts) <= RESTARTS:
                spawn(index)  # the others still serve: keep the service at full strength
            else:
                status = status or (code if code > 0 else 1)
                forward(signal.SIGTERM, None)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return status
