"""Threads that run one event loop's blocking calls (Maildir deliveries and their fsyncs).

What this module owns: ``ThreadPool``, a smaller ``loop.run_in_executor`` for calls that come
often and finish together. What it promises:

- ``await pool.run(fn, *args)`` returns what ``fn(*args)`` returned in a thread, or raises
  what it raised. Cancelling the await does not stop the call; its result is dropped.
- A thread is started when a call would otherwise wait for one (at most ``size``); threads
  then live as long as the process (daemon threads: a process exits without waiting for them;
  every call that matters is awaited by a session, and the server waits for its sessions).
- Calls that finish while the loop is busy wake it once, not once each: a shared fsync
  ends several deliveries at the same moment.
- The threads run as SCHED_BATCH: they yield the CPU to the event loop instead of taking it
  from the loop when they wake, and then waiting for its interpreter lock.

Why not ``run_in_executor``: it costs a ``concurrent.futures.Future`` with its own lock and
condition, a second future chained to it, and one wake-up of the loop per call. On port 25
that was about a tenth of the event loop's CPU for each message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple["asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]
_Done = tuple["asyncio.Future[Any]", Any, BaseException | None]


class ThreadPool:
    """At most ``size`` threads running blocking calls for the event loop of the first ``run``."""

    def __init__(self, size: int, name: str) -> None:
        self.size = size
        self.name = name
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0  # threads waiting for a job
        self._queued = 0  # jobs no thread has taken yet
        self._done: list[_Done] = []  # finished, not yet handed to the loop
        self._wake_pending = False  # a drain is scheduled on the loop
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in one of the threads."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError(f"thread pool {self.name} belongs to another event loop")
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            self._queued += 1
            start = self._queued > self._idle and self._threads < self.size
            if start:
                self._threads += 1
        if start:
            name = f"{self.name}_{self._threads}"
            threading.Thread(target=self._work, name=name, daemon=True).start()
        self._jobs.put((future, fn, args))
        return await future

    def _work(self) -> None:
        """One thread: take a job, run it, hand the outcome to the loop; forever."""
        _batch_priority()
        while True:
            with self._lock:
                self._idle += 1
            future, fn, args = self._jobs.get()
            with self._lock:
                self._idle -= 1
                self._queued -= 1
            try:
                done: _Done = (future, fn(*args), None)
            except BaseException as exc:  # handed to the awaiting task
                done = (future, None, exc)
            del future, fn, args  # nothing of this job outlives it while the thread waits
            with self._lock:
                self._done.append(done)
                wake = not self._wake_pending
                self._wake_pending = True
            del done
            if wake:
                self._wake()

    def _wake(self) -> None:
        """Have the loop drain the finished calls (one wake-up for all that finish meanwhile)."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            with self._lock:
                self._done.clear()
                self._wake_pending = False

    def _drain(self) -> None:
        """On the loop: settle every call that finished since the last drain."""
        with self._lock:
            done, self._done = self._done, []
            self._wake_pending = False
        for future, result, error in done:
            if future.done():  # the awaiting task was cancelled
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)


def _batch_priority() -> None:
    """Run this thread as SCHED_BATCH (sched(7)): woken by a job or by the end of its fsync, it
    does not preempt the event loop, which holds the interpreter lock the thread would wait
    for at once; it runs when the loop waits. Where the policy is not there, as it was."""
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None:
        return
    with contextlib.suppress(OSError):
        os.sched_setscheduler(0, policy, os.sched_param(0))  # 0: this thread
