"""Failed-login throttling: growing delays, lockout, reset on success, window expiry."""

from __future__ import annotations

from mailroom.throttle import AuthThrottle


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
