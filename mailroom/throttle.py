"""Failed-login throttling: per client address and per account, shared by every protocol.

Two counters of recent failures, both in a ``FailureStore``:

- per client address (the IP; for an IPv6 client its /64, ``client_group``): each failure
  costs ``base * 2**(n-1)`` seconds of delay before the answer (capped), and after
  ``lockout_after`` failures within ``window`` seconds the address is refused without checking
  a password until the window passes;
- per account name (as typed, normalised: lower case, NFC), whether or not the account
  exists, so that the counter reveals nothing: after ``account_lockout_after`` failures
  within the window, from any addresses, that name is refused the same way. This stops a
  slow guess spread over many addresses, at the price that such an attack can keep the
  owner out until the window passes; the limit is higher than the address's for that reason.

A refusal raises ``TooManyFailures``; the protocol answers its temporary error (IMAP
``NO [UNAVAILABLE]``, POP3 ``-ERR [SYS/TEMP]``, SMTP ``454 4.7.0``). A success clears both
counters of that login. The store is the accounts database in the servers (table
``login_failures``; account keys start with ``account:``, which no IP address does), so every
protocol and process counts the same failures and a restart forgets nothing; a dict in memory
for tests. The clock is injected (wall-clock time, shared between processes). ``throttled``
wraps a password check (``Accounts.verify_password``) in these rules, for one client address,
logging each outcome without the password.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
import unicodedata
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

from mailroom.errors import MailroomError

if TYPE_CHECKING:
    from mailroom.config import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

ACCOUNT_KEY = "account:"
MAX_ACCOUNT_KEY = 320  # octets of a name kept as a key (RFC 5321 4.5.3.1: a path is 256)


class TooManyFailures(MailroomError):
    """Too many recent failed logins from this address or for this account: try later."""


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


def client_group(peer: str) -> str:
    """The key that per-address limits count ``peer`` under: an IPv4 address itself (also
    when written IPv4-mapped), an IPv6 address's /64 (a home or a host is given a whole /64,
    so one client could otherwise take each limit once per address in it), anything else
    (a UNIX socket's "local") as it is."""
    try:
        address = ipaddress.ip_address(peer.partition("%")[0])
    except ValueError:
        return peer
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def account_key(username: str) -> str:
    """The store key of a login name: the same for every spelling of one address."""
    name = unicodedata.normalize("NFC", username).strip().lower()
    return ACCOUNT_KEY + name[:MAX_ACCOUNT_KEY]


class AuthThrottle:
    """Counts failures per client address and per account, says how long to wait or refuses."""

    def __init__(
        self,
        store: FailureStore | None = None,
        *,
        base_delay: float = 0.5,
        max_delay: float = 8.0,
        lockout_after: int = 10,
        account_lockout_after: int = 30,
        window: float = 900.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store: FailureStore = store if store is not None else MemoryFailures()
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.lockout_after = lockout_after
        self.account_lockout_after = account_lockout_after
        self.window = window
        self.clock = clock
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, store: FailureStore) -> AuthThrottle:
        """The servers' throttle: the limits of ``settings``, the failures in ``store``."""
        return cls(
            store,
            base_delay=settings.login_failure_delay_seconds,
            lockout_after=settings.login_failures_per_ip,
            account_lockout_after=settings.login_failures_per_account,
            window=settings.login_failure_window_seconds,
        )

    def _failures(self, key: str) -> int:
        record = self.store.get_failures(key)
        if record is None or self.clock() - record[1] > self.window:
            return 0
        return record[0]

    def locked_out(self, peer: str, username: str | None = None) -> bool:
        """Whether a login from ``peer`` (as ``username``, when given) is refused unchecked."""
        with self._lock:
            if self._failures(client_group(peer)) >= self.lockout_after:
                return True
            return (
                username is not None
                and self._failures(account_key(username)) >= self.account_lockout_after
            )

    def failed(self, peer: str, username: str | None = None) -> float:
        """Record a failure; returns the delay (seconds) to impose before answering."""
        with self._lock:
            now = self.clock()
            group = client_group(peer)
            failures = self._failures(group) + 1
            self.store.put_failures(group, failures, now, forget_before=now - self.window)
            if username is not None:
                key = account_key(username)
                self.store.put_failures(
                    key, self._failures(key) + 1, now, forget_before=now - self.window
                )
            return float(min(self.base_delay * 2 ** (failures - 1), self.max_delay))

    def succeeded(self, peer: str, username: str | None = None) -> None:
        with self._lock:
            self.store.clear_failures(client_group(peer))
            if username is not None:
                self.store.clear_failures(account_key(username))


def throttled(
    verify: Callable[[str, str], T | None],
    throttle: AuthThrottle,
    peer: str,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> Callable[[str, str], T | None]:
    """``verify(username, password)`` for a client at ``peer``, under ``throttle``.

    A locked-out address or account raises ``TooManyFailures`` without a password check; a
    failure sleeps the delay (the caller runs this in a worker thread) before answering None.
    Both take the same time whether the account exists or not (``verify`` must too).
    """

    def check(username: str, password: str) -> T | None:
        extra = {"CLIENT_ADDR": peer}
        if throttle.locked_out(peer, username):
            log.warning(
                "login %r refused for %s: too many failures", username[:64], peer, extra=extra
            )
            raise TooManyFailures("too many failed logins; try again later")
        user = verify(username, password)
        if user is None:
            delay = throttle.failed(peer, username)
            log.info("login failed for %r from %s", username[:64], peer, extra=extra)
            sleep(delay)
            return None
        throttle.succeeded(peer, username)
        log.info("login %s from %s", username[:64], peer, extra=extra)
        return user

    return check
