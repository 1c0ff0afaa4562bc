"""Failed-login throttling: growing delays, lockout, reset on success, window expiry."""

from __future__ import annotations

from mailroom.throttle import AuthThrottle, throttled


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
    assert check("u", "right") is None  # locked out: the password is not even checked
    assert calls == [("u", "wrong"), ("u", "wrong")]
    assert throttled(verify, throttle, "192.0.2.8", sleep=slept.append)("u", "right") == "u"
    clock.now += 901
    assert check("u", "right") == "u" and not throttle.locked_out("192.0.2.7")
