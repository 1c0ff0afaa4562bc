"""Several worker processes on one set of passed sockets, for the servers that need the cores.

What this module owns:

- ``SharedCounts``: the open connections in all and per client address, in memory shared by
  the workers (an anonymous shared mapping made before the fork, under one lock), so the
  connection limits hold for the service as a whole, not per worker.
- ``run_workers(n, child)``: forks ``n`` workers that each run ``child()`` (their own asyncio
  loop accepting on the same listening sockets: the kernel hands each connection to one of
  them) and supervises them: SIGTERM/SIGINT are passed on, a worker that crashed while the
  others serve is started again (at most ``RESTARTS`` a minute), and the parent exits when
  every worker has exited, with the first failure's status.

A worker leaves by itself only when the whole service is idle (``SharedCounts.total`` zero
for the idle time, see ``activation.ConnectionTracker``), so systemd sees one service that
exits when nobody is connected, exactly as with one process.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import signal
import struct
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from types import FrameType

log = logging.getLogger(__name__)

RESTARTS = 10  # crashed workers started again per minute, at most
_HEADER = struct.Struct("=q")  # total open connections
_SLOT = struct.Struct("=i46s")  # open connections of one address; the address (ASCII)


class SharedCounts:
    """Open connections in all and per address, shared by the workers of one service.

    Per-address counts live in an open-addressing table with room for ``capacity``
    addresses (at most one per open connection, so ``capacity`` is the connection limit);
    a slot whose count is back to zero is free again.
    """

    def __init__(self, capacity: int) -> None:
        import multiprocessing  # only services with several workers pay for the import

        self.slots = 1
        while self.slots < 2 * capacity:
            self.slots *= 2
        self._lock: AbstractContextManager[object] = multiprocessing.get_context("fork").Lock()
        self._map = mmap.mmap(-1, _HEADER.size + self.slots * _SLOT.size, flags=mmap.MAP_SHARED)

    @property
    def total(self) -> int:
        with self._lock:
            return int(_HEADER.unpack_from(self._map, 0)[0])

    def admit(self, peer: str, max_total: int, max_per_peer: int) -> bool:
        """Count one more connection from ``peer`` if both limits allow it."""
        key = peer.encode("ascii", "replace")[: _SLOT.size - 4]
        with self._lock:
            (total,) = _HEADER.unpack_from(self._map, 0)
            if total >= max_total:
                return False
            offset = self._find(key)
            count, _ = _SLOT.unpack_from(self._map, offset)
            if count >= max_per_peer:
                return False
            _SLOT.pack_into(self._map, offset, count + 1, key)
            _HEADER.pack_into(self._map, 0, total + 1)
            return True

    def release(self, peer: str) -> None:
        key = peer.encode("ascii", "replace")[: _SLOT.size - 4]
        with self._lock:
            (total,) = _HEADER.unpack_from(self._map, 0)
            offset = self._find(key)
            count, _ = _SLOT.unpack_from(self._map, offset)
            if count > 0:
                _SLOT.pack_into(self._map, offset, count - 1, key)
            _HEADER.pack_into(self._map, 0, max(total - 1, 0))

    def _find(self, key: bytes) -> int:
        """The slot of ``key``: its own, else the first free one on its probe path."""
        padded = key.ljust(_SLOT.size - 4, b"\0")
        start = hash(key) & (self.slots - 1)  # same hash in every worker: forked, one seed
        free = -1
        for i in range(self.slots):
            offset = _HEADER.size + ((start + i) & (self.slots - 1)) * _SLOT.size
            count, name = _SLOT.unpack_from(self._map, offset)
            if name == padded:
                return offset
            if count == 0 and free < 0:
                free = offset
            if name == b"\0" * len(padded):  # never used: the key is not further on
                break
        if free < 0:  # pragma: no cover - capacity is twice the connection limit
            raise RuntimeError("connection table full")
        return free


def run_workers(count: int, child: Callable[[], int]) -> int:
    """Run ``child`` in ``count`` forked processes until all have exited; the exit status."""
    workers: dict[int, int] = {}  # pid -> index
    stopping = False
    restarts: list[float] = []
    status = 0

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                code = child()
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                logging.shutdown()
                os._exit(code)
        workers[pid] = index

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for index in range(count):
            spawn(index)
        while workers:
            try:
                pid, wait_status = os.wait()
            except ChildProcessError:  # pragma: no cover - none left
                break
            index = workers.pop(pid)
            code = os.waitstatus_to_exitcode(wait_status)
            if code == 0 or stopping:
                continue  # idle exit, or told to stop
            log.error("worker %d exited with status %d", index, code)
            now = time.monotonic()
            restarts[:] = [t for t in restarts if now - t < 60] + [now]
            if workers and len(restarts) <= RESTARTS:
                spawn(index)  # the others still serve: keep the service at full strength
            else:
                status = status or (code if code > 0 else 1)
                forward(signal.SIGTERM, None)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return status
