"""Failed-login throttling: each failure from an address makes its next attempts slower.

Per client address: a failure costs ``base * 2**(n-1)`` seconds of delay before the answer
(capped), and after ``lockout_after`` failures within ``window`` seconds the address is
refused without checking the password until the window passes. A success clears the address.
The records live in a ``FailureStore``: the accounts database in the servers, so that every
protocol and every process counts the same failures and a restart forgets nothing; a dict
in memory for tests. The clock is injected (wall-clock time, shared between processes).
``throttled`` wraps a password check (``Accounts.verify_password``) in these rules, for one
client address, logging each outcome without the password.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class FailureStore(Protocol):
    """Where failure counts live (``Accounts`` is one)."""

    def get_failures(self, peer: str) -> tuple[int, float] | None: ...

    def put_failures(
        self, peer: str, failures: int, last: float, *, forget_before: float
    ) -> None: ...

    def clear_failures(self, peer: str) -> None: ...


class MemoryFailures:
    """A FailureStore in this process's memory, bounded."""

    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        self.records: dict[str, tuple[int, float]] = {}

    def get_failures(self, peer: str) -> tuple[int, float] | None:
        return self.records.get(peer)

    def put_failures(self, peer: str, failures: int, last: float, *, forget_before: float) -> None:
        self.records[peer] = (failures, last)
        if len(self.records) > self.limit:  # bounded memory under a distributed attack
            for old in [p for p, (_, t) in self.records.items() if t < forget_before] or [
                min(self.records, key=lambda p: self.records[p][1])
            ]:
                del self.records[old]

    def clear_failures(self, peer: str) -> None:
        self.records.pop(peer, None)


class AuthThrottle:
    """Counts failures per client address and says how long to make it wait."""

    def __init__(
        self,
        store: FailureStore | None = None,
        *,
        base_delay: float = 0.5,
        max_delay: float = 8.0,
        lockout_after: int = 10,
        window: float = 900.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store: FailureStore = store if store is not None else MemoryFailures()
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.lockout_after = lockout_after
        self.window = window
        self.clock = clock
        self._lock = threading.Lock()

    def _failures(self, peer: str) -> int:
        record = self.store.get_failures(peer)
        if record is None or self.clock() - record[1] > self.window:
            return 0
        return record[0]

    def locked_out(self, peer: str) -> bool:
        with self._lock:
            return self._failures(peer) >= self.lockout_after

    def failed(self, peer: str) -> float:
        """Record a failure; returns the delay (seconds) to impose before answering."""
        with self._lock:
            now = self.clock()
            failures = self._failures(peer) + 1
            self.store.put_failures(peer, failures, now, forget_before=now - self.window)
            return float(min(self.base_delay * 2 ** (failures - 1), self.max_delay))

    def succeeded(self, peer: str) -> None:
        with self._lock:
            self.store.clear_failures(peer)


def throttled(
    verify: Callable[[str, str], T | None],
    throttle: AuthThrottle,
    peer: str,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> Callable[[str, str], T | None]:
    """``verify(username, password)`` for a client at ``peer``, under ``throttle``.

    A locked-out address gets None without a password check; a failure sleeps the delay
    (the caller runs this in a worker thread) before answering None.
    """

    def check(username: str, password: str) -> T | None:
        extra = {"CLIENT_ADDR": peer}
        if throttle.locked_out(peer):
            log.warning("login refused for %s: too many failures", peer, extra=extra)
            return None
        user = verify(username, password)
        if user is None:
            delay = throttle.failed(peer)
            log.info("login failed for %r from %s", username[:64], peer, extra=extra)
            sleep(delay)
            return None
        throttle.succeeded(peer)
        log.info("login %s from %s", username[:64], peer, extra=extra)
        return user

    return check
