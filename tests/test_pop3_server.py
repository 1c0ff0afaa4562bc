"""The POP3 server's wiring: which clients may send a password without TLS."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailroom.accounts import Accounts, User
from mailroom.config import POP3Settings, Settings
from mailroom.pop3.server import is_loopback, session_factory
from mailroom.throttle import AuthThrottle
from tests.pop3_fake_store import FakeMaildrop, FakeStore


@pytest.mark.parametrize(
    ("peer", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("192.0.2.1", False),
        ("::ffff:192.0.2.1", False),
        ("2001:db8::1", False),
        ("fe80::1%eth0", False),
        ("local", False),  # a UNIX socket: not an address we vouch for
        ("", False),
    ],
)
def test_is_loopback(peer: str, loopback: bool) -> None:
    assert is_loopback(peer) is loopback


@pytest.mark.parametrize(
    ("allow", "peer", "expected"),
    [
        (False, "127.0.0.1", False),
        (True, "127.0.0.1", True),
        (True, "::1", True),
        (True, "192.0.2.1", False),
    ],
)
def test_plaintext_only_from_loopback_and_only_when_allowed(
    tmp_path: Path, allow: bool, peer: str, expected: bool
) -> None:
    settings = Settings(
        hostname="mail.example.test",
        data_dir=tmp_path,
        pop3=POP3Settings(allow_plaintext_loopback=allow),
    )

    def open_maildrop(user: User) -> FakeMaildrop:
        return FakeMaildrop(FakeStore())

    with Accounts(tmp_path / "auth.sqlite3") as accounts:
        make = session_factory(
            settings, accounts, AuthThrottle(), open_maildrop, implicit_tls=False, starttls=True
        )
        session = make(peer)
        assert session.config.plaintext_auth is expected
        assert session.config.starttls_available and session.timeout == 600
        reply = session.feed(b"USER alice@example.test\r\n").data
        assert reply.startswith(b"+OK") is expected
        implicit = session_factory(
            settings, accounts, AuthThrottle(), open_maildrop, implicit_tls=True, starttls=True
        )(peer)
        assert not implicit.config.starttls_available and implicit.tls
