"""Failed-login throttling: each failure from an address makes its next attempts slower.

In-process and per client address: a failure costs ``base * 2**(n-1)`` seconds of delay
before the answer (capped), and after ``lockout_after`` failures within ``window`` seconds
the address is refused without checking the password until the window passes. A success
clears the address. Shared by every protocol of one process; the clock is injected.
``throttled`` wraps a password check (``Accounts.verify_password``) in these rules, for one
client address, logging each outcome without the password.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class _Record:
    failures: int
    last: float


class AuthThrottle:
    """Counts failures per client address and says how long to make it wait."""

    def __init__(
        self,
        *,
        base_delay: float = 0.5,
        max_delay: float = 8.0,
        lockout_after: int = 10,
        window: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.lockout_after = lockout_after
        self.window = window
        self.clock = clock
        self._records: dict[str, _Record] = {}
        self._lock = threading.Lock()

    def _record(self, peer: str) -> _Record | None:
        record = self._records.get(peer)
        if record is not None and self.clock() - record.last > self.window:
            del self._records[peer]
            return None
        return record

    def locked_out(self, peer: str) -> bool:
        with self._lock:
            record = self._record(peer)
            return record is not None and record.failures >= self.lockout_after

    def failed(self, peer: str) -> float:
        """Record a failure; returns the delay (seconds) to impose before answering."""
        with self._lock:
            record = self._record(peer) or _Record(0, 0.0)
            record.failures += 1
            record.last = self.clock()
            self._records[peer] = record
            if len(self._records) > 100_000:  # bounded memory under a distributed attack
                oldest = min(self._records, key=lambda p: self._records[p].last)
                del self._records[oldest]
            return float(min(self.base_delay * 2 ** (record.failures - 1), self.max_delay))

    def succeeded(self, peer: str) -> None:
        with self._lock:
            self._records.pop(peer, None)


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
