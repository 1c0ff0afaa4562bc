"""The asyncio side of the POP3 server: one ``SessionConnection`` with a ``POP3Session`` per client.

What this module owns: building each connection's ``SessionConfig`` from the settings and
the client's address (TLS or not, whether plaintext passwords are allowed from it, the
throttled password check) and the endpoints of the two fd names. Reading, writing, STLS and
the timer are ``mailroom.connection``'s; the protocol is ``session``'s.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from concurrent.futures import Executor

from mailroom.accounts import Accounts, User
from mailroom.activation import Endpoint
from mailroom.config import Settings
from mailroom.connection import SessionConnection
from mailroom.pop3.session import Maildrop, POP3Session, SessionConfig
from mailroom.throttle import AuthThrottle, throttled
from mailroom.tls import ServerTLS

log = logging.getLogger(__name__)

BUSY = b"-ERR [SYS/TEMP] Too many connections; try again later\r\n"
CRASH = b"-ERR [SYS/TEMP] Internal server error\r\n"


def is_loopback(peer: str) -> bool:
    """Whether ``peer`` (an IP address as text) is a loopback address, IPv4-mapped or not."""
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


class POP3Connection(SessionConnection):
    """A connection whose reading commands (RETR, LIST, ...) run on the loop: ``quick``."""

    def inline(self, data: bytes) -> bool:
        session = self.session
        return isinstance(session, POP3Session) and session.quick(data)


def session_factory(
    settings: Settings,
    accounts: Accounts,
    throttle: AuthThrottle,
    open_maildrop: Callable[[User], Maildrop],
    *,
    implicit_tls: bool,
    starttls: bool,
) -> Callable[[str], POP3Session]:
    """A function making the session of one connection from the client's address."""

    def make(peer: str) -> POP3Session:
        plaintext = settings.pop3.allow_plaintext_loopback and is_loopback(peer)
        return POP3Session(
            SessionConfig(
                hostname=settings.hostname,
                authenticate=throttled(accounts.verify_password, throttle, peer),
                open_maildrop=open_maildrop,
                implicit_tls=implicit_tls,
                starttls_available=starttls and not implicit_tls,
                plaintext_auth=plaintext,
                timeout=settings.pop3.timeout_seconds,
            )
        )

    return make


def endpoints(
    settings: Settings,
    accounts: Accounts,
    open_maildrop: Callable[[User], Maildrop],
    tls: ServerTLS,
    executor: Executor,
) -> dict[str, Endpoint]:
    """The endpoints of ``pop3`` (110, STLS) and ``pop3s`` (995, implicit TLS)."""
    throttle = AuthThrottle.from_settings(settings, accounts)  # shared with IMAP, restarts

    def endpoint(implicit_tls: bool) -> Endpoint:
        makers = {
            starttls: session_factory(
                settings,
                accounts,
                throttle,
                open_maildrop,
                implicit_tls=implicit_tls,
                starttls=starttls,
            )
            for starttls in (False, True)
        }

        def connection() -> POP3Connection:
            starttls = None if implicit_tls else tls.context()  # the pair of this connection
            return POP3Connection(
                makers[starttls is not None],
                starttls=starttls,
                executor=executor,
                name="POP3",
                crash_reply=CRASH,
            )

        # 995: asked per connection (none: hang up); the handshake gets the current pair.
        return Endpoint(connection, BUSY, tls=tls.context if implicit_tls else None)

    if tls.context() is None:
        log.error("pop3s: no TLS certificate at %s; connections are closed", settings.tls_cert)
    return {"pop3": endpoint(False), "pop3s": endpoint(True)}
