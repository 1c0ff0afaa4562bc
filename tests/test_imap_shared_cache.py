"""The process-wide cache of FETCH items (``SharedCache``): one computation per key however
many sessions ask at once, failures kept to the thread that failed, and the LRU limits."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from mailroom.imap.session import SharedCache

KEY = ("alice@example.test", "INBOX", 1, 7, "1700000000.M1P1.host", "ENVELOPE", False)
WAIT = 5.0  # seconds; only reached when the cache is broken
OVERLAP = 0.2  # seconds the first computation is held so the other threads pile up behind it


class Blocking:
    """A computation that says when it started and finishes (or fails) only when released."""

    def __init__(self, value: bytes = b"", error: Exception | None = None) -> None:
        self.value, self.error = value, error
        self.calls = 0
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> bytes:
        self.calls += 1
        self.started.set()
        assert self.release.wait(WAIT)
        if self.error is not None:
            raise self.error
        return self.value


def counted(value: bytes, calls: list[bytes]) -> Callable[[], bytes]:
    def compute() -> bytes:
        calls.append(value)
        return value

    return compute


def test_concurrent_askers_share_one_computation() -> None:
    cache = SharedCache()
    compute = Blocking(b"ENVELOPE (NIL)")
    askers = 10
    with ThreadPoolExecutor(askers) as pool:
        first = pool.submit(cache.get_or_compute, KEY, compute)
        assert compute.started.wait(WAIT)
        rest = [pool.submit(cache.get_or_compute, KEY, compute) for _ in range(askers - 1)]
        time.sleep(OVERLAP)
        assert not any(f.done() for f in [first, *rest])  # all waiting on the one computation
        compute.release.set()
        results = [f.result(WAIT) for f in [first, *rest]]
    assert results == [b"ENVELOPE (NIL)"] * askers
    assert compute.calls == 1
    assert cache._flights == {}


def test_a_failure_reaches_only_its_thread_and_a_waiter_computes_instead() -> None:
    cache = SharedCache()
    failing = Blocking(error=RuntimeError("unreadable message"))
    retried: list[bytes] = []
    waiters = 5
    with ThreadPoolExecutor(1 + waiters) as pool:
        first = pool.submit(cache.get_or_compute, KEY, failing)
        assert failing.started.wait(WAIT)
        rest: list[Future[bytes]] = [
            pool.submit(cache.get_or_compute, KEY, counted(b"BODY (NIL)", retried))
            for _ in range(waiters)
        ]
        time.sleep(OVERLAP)
        assert not any(f.done() for f in rest)
        failing.release.set()
        with pytest.raises(RuntimeError, match="unreadable message"):
            first.result(WAIT)
        results = [f.result(WAIT) for f in rest]
    assert results == [b"BODY (NIL)"] * waiters
    assert retried == [b"BODY (NIL)"]  # the retry is single-flight too
    assert cache._flights == {}
    assert cache.get_or_compute(KEY, counted(b"other", retried)) == b"BODY (NIL)"
    assert retried == [b"BODY (NIL)"]


def test_a_failure_with_nobody_waiting_leaves_nothing_behind() -> None:
    cache = SharedCache()

    def broken() -> bytes:
        raise ValueError("bad header")

    with pytest.raises(ValueError, match="bad header"):
        cache.get_or_compute(KEY, broken)
    assert cache._flights == {}
    calls: list[bytes] = []
    assert cache.get_or_compute(KEY, counted(b"x", calls)) == b"x"


def test_the_least_recently_used_entry_goes_beyond_the_entry_limit() -> None:
    cache = SharedCache(entries=2)
    calls: list[bytes] = []
    for name in (b"a", b"b", b"a", b"c"):  # "a" used again: "b" is the oldest when "c" comes
        cache.get_or_compute((name,), counted(name, calls))
    assert calls == [b"a", b"b", b"c"]
    cache.get_or_compute((b"a",), counted(b"a", calls))
    cache.get_or_compute((b"c",), counted(b"c", calls))
    assert calls == [b"a", b"b", b"c"]  # both still kept
    cache.get_or_compute((b"b",), counted(b"b", calls))
    assert calls == [b"a", b"b", b"c", b"b"]  # "b" was dropped


def test_the_octet_limit_drops_old_entries_and_never_keeps_an_oversized_one() -> None:
    cache = SharedCache(octets=10)
    calls: list[bytes] = []
    for value in (b"1111", b"2222", b"3333"):  # 12 octets: "1111" goes
        cache.get_or_compute((value,), counted(value, calls))
    cache.get_or_compute((b"2222",), counted(b"2222", calls))
    cache.get_or_compute((b"3333",), counted(b"3333", calls))
    assert calls == [b"1111", b"2222", b"3333"]
    cache.get_or_compute((b"1111",), counted(b"1111", calls))
    assert calls == [b"1111", b"2222", b"3333", b"1111"]

    big = b"x" * 11
    assert cache.get_or_compute((big,), counted(big, calls)) == big  # returned, not kept
    assert cache.get_or_compute((big,), counted(big, calls)) == big
    assert calls[-2:] == [big, big]
    assert cache._size <= cache.octets
