"""mailroom.threadpool: blocking calls on threads, their outcomes back on the event loop."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from mailroom.threadpool import ThreadPool


class CountingPool(ThreadPool):
    """A pool that counts how often the loop was woken to collect outcomes."""

    def __init__(self, size: int) -> None:
        super().__init__(size, "test")
        self.drains = 0

    def _drain(self) -> None:
        self.drains += 1
        super()._drain()


def test_returns_the_result_from_another_thread() -> None:
    async def main() -> None:
        pool = ThreadPool(2, "test")
        here = threading.get_ident()
        result, ident = await pool.run(lambda a, b: (a + b, threading.get_ident()), 2, 3)
        assert result == 5 and ident != here

    asyncio.run(main())


def test_raises_what_the_call_raised_and_goes_on() -> None:
    async def main() -> None:
        pool = ThreadPool(1, "test")

        def fail() -> None:
            raise OSError(28, "No space left on device")

        with pytest.raises(OSError, match="No space left"):
            await pool.run(fail)
        assert await pool.run(int, "7") == 7  # the thread survived

    asyncio.run(main())


def test_runs_up_to_size_calls_at_once_and_no_more() -> None:
    size = 4
    barrier = threading.Barrier(size, timeout=5)
    running = 0
    most = 0
    lock = threading.Lock()

    def call() -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        barrier.wait()  # only passes if `size` calls run at the same time
        time.sleep(0.01)
        with lock:
            running -= 1
        return threading.get_ident()

    async def main() -> set[int]:
        pool = ThreadPool(size, "test")
        return set(await asyncio.gather(*(pool.run(call) for _ in range(3 * size))))

    threads = asyncio.run(main())
    assert most == size and len(threads) == size


def test_calls_that_end_together_wake_the_loop_once() -> None:
    release = threading.Event()
    finished = threading.Semaphore(0)

    def call(n: int) -> int:
        release.wait(5)
        finished.release()
        return n

    async def main() -> tuple[list[int], int]:
        pool = CountingPool(8)
        calls = asyncio.gather(*(pool.run(call, n) for n in range(8)))
        await asyncio.sleep(0.1)  # all eight are waiting in their threads
        release.set()
        for _ in range(8):  # the loop stays busy here while every call finishes
            assert finished.acquire(timeout=5)
        time.sleep(0.05)
        results = await calls
        return results, pool.drains

    results, drains = asyncio.run(main())
    assert results == list(range(8))
    assert drains == 1


def test_a_cancelled_wait_drops_the_result_and_the_pool_goes_on() -> None:
    release = threading.Event()

    errors: list[dict[str, object]] = []

    async def main() -> int:
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, context: errors.append(context)
        )
        pool = ThreadPool(1, "test")
        waiting = asyncio.ensure_future(pool.run(lambda: release.wait(5)))
        await asyncio.sleep(0.05)
        waiting.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        return await pool.run(lambda: 42)

    assert asyncio.run(main()) == 42
    assert errors == []  # nothing tried to settle the cancelled wait


def test_refuses_a_second_event_loop() -> None:
    pool = ThreadPool(1, "test")
    assert asyncio.run(pool.run(lambda: 1)) == 1
    with pytest.raises(RuntimeError, match="another event loop"):
        asyncio.run(pool.run(lambda: 2))


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="no SCHED_BATCH here")
def test_the_threads_run_as_batch_and_the_loop_does_not() -> None:
    async def main() -> tuple[int, int]:
        pool = ThreadPool(1, "test")
        return await pool.run(os.sched_getscheduler, 0), os.sched_getscheduler(0)

    assert asyncio.run(main()) == (os.SCHED_BATCH, os.SCHED_OTHER)
