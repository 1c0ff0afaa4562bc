"""Failed-login throttling: growing delays, lockout, reset on success, window expiry."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailroom.accounts import Accounts
from mailroom.throttle import AuthThrottle, MemoryFailures, TooManyFailures, throttled


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_delays_grow_and_cap() -> None:
    throttle = AuthThrottle(base_delay=0.5, max_delay=4, clock=Clock())
    assert [throttle.failed("192.0.2.1") for _ in range(6)] == [0.5, 1, 2, 4, 4, 4]
    assert throttle.failed("192.0.2.2") == 0.5  # per address


def test_lockout_window_and_success() -> None:
    clock = Clock()
    throttle = AuthThrottle(lockout_after=3, window=60, clock=clock)
    for _ in range(3):
        assert not throttle.locked_out("a")
        throttle.failed("a")
    assert throttle.locked_out("a")
    clock.now += 61
    assert not throttle.locked_out("a")
    throttle.failed("b")
    throttle.succeeded("b")
    assert throttle.failed("b") == 0.5


def test_throttled_check_delays_failures_and_locks_out() -> None:
    clock = Clock()
    throttle = AuthThrottle(base_delay=1, lockout_after=2, clock=clock)
    slept: list[float] = []
    calls: list[tuple[str, str]] = []

    def verify(user: str, password: str) -> str | None:
        calls.append((user, password))
        return user if password == "right" else None

    check = throttled(verify, throttle, "192.0.2.7", sleep=slept.append)
    assert check("u", "wrong") is None and check("u", "wrong") is None
    assert slept == [1, 2]
    with pytest.raises(TooManyFailures):  # locked out: the password is not even checked
        check("u", "right")
    assert calls == [("u", "wrong"), ("u", "wrong")]
    assert throttled(verify, throttle, "192.0.2.8", sleep=slept.append)("u", "right") == "u"
    clock.now += 901
    assert check("u", "right") == "u" and not throttle.locked_out("192.0.2.7")


def test_failures_are_shared_through_the_accounts_database(tmp_path: Path) -> None:
    """IMAP and POP3 run in different processes: both count the same failures, across restarts."""
    clock = Clock()
    db = tmp_path / "auth.sqlite3"
    with Accounts(db) as imap_side, Accounts(db) as pop3_side:
        imap = AuthThrottle(imap_side, lockout_after=4, window=60, clock=clock)
        pop3 = AuthThrottle(pop3_side, lockout_after=4, window=60, clock=clock)
        assert imap.failed("198.51.100.7") == 0.5
        assert pop3.failed("198.51.100.7") == 1
        imap.failed("198.51.100.7")
        assert not pop3.locked_out("198.51.100.7")
        pop3.failed("198.51.100.7")
        assert imap.locked_out("198.51.100.7")
    with Accounts(db) as restarted:
        assert AuthThrottle(restarted, lockout_after=4, window=60, clock=clock).locked_out(
            "198.51.100.7"
        )
        clock.now += 61
        later = AuthThrottle(restarted, lockout_after=4, window=60, clock=clock)
        assert not later.locked_out("198.51.100.7")
        later.failed("203.0.113.9")  # a write also forgets records older than the window
        assert restarted.get_failures("198.51.100.7") is None


def test_memory_store_stays_bounded() -> None:
    store = MemoryFailures(limit=100)
    throttle = AuthThrottle(store, clock=Clock())
    for i in range(1000):
        throttle.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(store.records) <= 101


def test_per_account_limit_counts_every_address_and_every_spelling() -> None:
    """A guess spread over many addresses still locks the name; other names are untouched."""
    clock = Clock()
    throttle = AuthThrottle(lockout_after=5, account_lockout_after=3, window=60, clock=clock)
    for i, name in enumerate(["alice@example.test", "ALICE@example.test", "Alice@Example.Test"]):
        assert not throttle.locked_out(f"192.0.2.{i}", "alice@example.test")
        throttle.failed(f"192.0.2.{i}", name)
    assert throttle.locked_out("198.51.100.1", "alice@example.test")  # a fresh address too
    assert throttle.locked_out("198.51.100.1", "a\u0308lice@example.test") is False
    assert not throttle.locked_out("198.51.100.1", "bob@example.test")
    clock.now += 61
    assert not throttle.locked_out("198.51.100.1", "alice@example.test")


def test_success_clears_the_address_and_the_account() -> None:
    throttle = AuthThrottle(lockout_after=3, account_lockout_after=3, clock=Clock())
    throttle.failed("a", "u")
    throttle.failed("a", "u")
    throttle.succeeded("a", "u")
    throttle.failed("a", "u")
    throttle.failed("a", "u")
    assert not throttle.locked_out("a", "u")
