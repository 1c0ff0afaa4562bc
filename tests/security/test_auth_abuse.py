"""Authentication abuse: persistent per-address and per-account limits on every protocol.

Against the real servers on their implicit-TLS ports, one new connection per attempt. Each
limit answers with the protocol's temporary refusal (IMAP ``NO [UNAVAILABLE]``, POP3
``-ERR [SYS/TEMP]``, SMTP ``454 4.7.0``) even for the right password, on a new connection,
from another protocol, and after the server process restarted; it expires with its window.
Other clients source their connections from other loopback addresses (127.0.0.2, ...).
Equal time for failures whether the account exists: ``test_auth_timing``.
"""

from __future__ import annotations

import base64
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mailroom.throttle import AuthThrottle
from tests.conftest import PASSWORD, Certificate, MailEnv, Server, write_config
from tests.security.wire import Wire

ALICE, BOB = "alice@example.test", "bob@example.test"
Outcome = str  # "ok", "failed", "refused"
Login = Callable[[dict[str, int], str, str, str], Outcome]


def _plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def imap_login(ports: dict[str, int], user: str, password: str, source: str) -> Outcome:
    with Wire(ports["imaps"], tls=True, source=source) as w:
        assert w.line().startswith(b"* OK")
        w.send(f'a LOGIN "{user}" "{password}"\r\n'.encode())
        return _imap(w.until(b"a ")[-1])


def imap_authenticate(ports: dict[str, int], user: str, password: str, source: str) -> Outcome:
    with Wire(ports["imaps"], tls=True, source=source) as w:
        assert w.line().startswith(b"* OK")
        w.send(f"a AUTHENTICATE PLAIN {_plain(user, password)}\r\n".encode())
        return _imap(w.until(b"a ")[-1])


def _outcome(reply: bytes, ok: bytes, failed: bytes, refused: bytes) -> Outcome:
    """What a protocol's reply to a login says, by its prefix (else the reply itself)."""
    for prefix, outcome in ((ok, "ok"), (failed, "failed"), (refused, "refused")):
        if reply.startswith(prefix):
            return outcome
    return reply.decode(errors="replace")


def _imap(reply: bytes) -> Outcome:
    return _outcome(reply, b"a OK", b"a NO [AUTHENTICATIONFAILED]", b"a NO [UNAVAILABLE]")


def pop3_user_pass(ports: dict[str, int], user: str, password: str, source: str) -> Outcome:
    with Wire(ports["pop3s"], tls=True, source=source) as w:
        assert w.line().startswith(b"+OK")
        w.send(f"USER {user}\r\n".encode())
        assert w.line().startswith(b"+OK")
        w.send(f"PASS {password}\r\n".encode())
        return _pop3(w.line())


def pop3_auth_plain(ports: dict[str, int], user: str, password: str, source: str) -> Outcome:
    with Wire(ports["pop3s"], tls=True, source=source) as w:
        assert w.line().startswith(b"+OK")
        w.send(f"AUTH PLAIN {_plain(user, password)}\r\n".encode())
        return _pop3(w.line())


def _pop3(reply: bytes) -> Outcome:
    return _outcome(reply, b"+OK", b"-ERR [AUTH]", b"-ERR [SYS/TEMP]")


def submission_auth(ports: dict[str, int], user: str, password: str, source: str) -> Outcome:
    with Wire(ports["submissions"], tls=True, source=source) as w:
        assert w.smtp_reply().startswith(b"220")
        assert w.smtp(b"EHLO client.example").startswith(b"250 ")
        reply = w.smtp(f"AUTH PLAIN {_plain(user, password)}".encode())
    return _outcome(reply, b"235 ", b"535 5.7.8", b"454 4.7.0")


PROGRAMS = {
    "imap": ("mailroom-imapd", ("imaps",)),
    "pop3": ("mailroom-pop3d", ("pop3s",)),
    "submission": ("mailroom-submission", ("submissions",)),
}
LOGINS: dict[str, tuple[str, Login]] = {
    "imap-login": ("imap", imap_login),
    "imap-authenticate": ("imap", imap_authenticate),
    "pop3-user-pass": ("pop3", pop3_user_pass),
    "pop3-auth-plain": ("pop3", pop3_auth_plain),
    "submission-auth-plain": ("submission", submission_auth),
}


def configure(env: MailEnv, certificate: Certificate, **limits: object) -> None:
    write_config(
        env.root, certificate, None, idle_exit_seconds=30, shutdown_grace_seconds=1, **limits
    )


@contextmanager
def servers(env: MailEnv, *protocols: str) -> Iterator[dict[str, int]]:
    """The servers of ``protocols`` running on ``env``; their ports by fd name."""
    running = [Server(env, *PROGRAMS[p]) for p in protocols]
    try:
        yield {name: port for s in running for name, port in s.ports.items()}
    finally:
        for server in running:
            server.stop()


@pytest.mark.parametrize("variant", list(LOGINS))
def test_per_address_limit_persists_across_connections_and_restarts(
    mail_env: MailEnv, certificate: Certificate, variant: str
) -> None:
    protocol, login = LOGINS[variant]
    configure(mail_env, certificate, login_failures_per_ip=3, login_failure_delay_seconds=0)
    with servers(mail_env, protocol) as ports:
        assert [login(ports, ALICE, "wrong password", "127.0.0.1") for _ in range(3)] == [
            "failed"
        ] * 3
        # the right password, now and on a new connection: refused without a check
        assert login(ports, ALICE, PASSWORD, "127.0.0.1") == "refused"
        assert login(ports, BOB, PASSWORD, "127.0.0.1") == "refused"
        # another address is not this address's problem (the account limit is 30)
        assert login(ports, ALICE, PASSWORD, "127.0.0.2") == "ok"
    with servers(mail_env, protocol) as ports:  # a new process: the state is on disk
        assert login(ports, ALICE, PASSWORD, "127.0.0.1") == "refused"


def test_each_failure_makes_the_next_answer_wait_longer(
    mail_env: MailEnv, certificate: Certificate
) -> None:
    """The delay before a failure is answered: ``delay * 2**(n-1)`` for the n-th failure of an
    address, so a guesser's rate falls off even under the lockout limit."""
    configure(mail_env, certificate, login_failures_per_ip=10, login_failure_delay_seconds=0.4)
    with servers(mail_env, "pop3") as ports:
        times = []
        for _ in range(3):
            start = time.monotonic()
            assert pop3_user_pass(ports, ALICE, "wrong password", "127.0.0.10") == "failed"
            times.append(time.monotonic() - start)
        start = time.monotonic()
        assert pop3_user_pass(ports, ALICE, PASSWORD, "127.0.0.11") == "ok"  # not delayed
        other = time.monotonic() - start
    assert times[0] >= 0.4 and times[1] >= 0.8 and times[2] >= 1.6, times
    assert other < times[2] / 2, (other, times)  # a success is answered at once


def test_limits_are_shared_by_every_protocol_and_expire(
    mail_env: MailEnv, certificate: Certificate
) -> None:
    configure(
        mail_env,
        certificate,
        login_failures_per_ip=3,
        login_failure_window_seconds=3,
        login_failure_delay_seconds=0,
    )
    with servers(mail_env, "imap", "pop3", "submission") as ports:
        assert imap_login(ports, ALICE, "wrong", "127.0.0.3") == "failed"
        assert pop3_user_pass(ports, ALICE, "wrong", "127.0.0.3") == "failed"
        assert submission_auth(ports, ALICE, "wrong", "127.0.0.3") == "failed"
        refused = [login(ports, ALICE, PASSWORD, "127.0.0.3") for _, login in LOGINS.values()]
        assert refused == ["refused"] * len(LOGINS)
        time.sleep(3.2)  # the window passes: the address may try again
        assert [login(ports, ALICE, PASSWORD, "127.0.0.3") for _, login in LOGINS.values()] == [
            "ok"
        ] * len(LOGINS)


def test_per_account_limit_counts_every_address_and_spares_other_accounts(
    mail_env: MailEnv, certificate: Certificate
) -> None:
    configure(
        mail_env,
        certificate,
        login_failures_per_ip=100,
        login_failures_per_account=3,
        login_failure_delay_seconds=0,
    )
    with servers(mail_env, "imap", "pop3", "submission") as ports:
        # a guess spread over three addresses and three protocols, in three spellings
        assert imap_login(ports, ALICE, "wrong", "127.0.0.4") == "failed"
        assert pop3_user_pass(ports, "ALICE@example.test", "wrong", "127.0.0.5") == "failed"
        assert submission_auth(ports, "Alice@Example.Test", "wrong", "127.0.0.6") == "failed"
        for _, login in LOGINS.values():
            assert login(ports, ALICE, PASSWORD, "127.0.0.1") == "refused"
            assert login(ports, BOB, PASSWORD, "127.0.0.1") == "ok"  # someone else's failures
        # a name that does not exist is counted the same way: the limit reveals nothing
        for _ in range(3):
            assert imap_login(ports, "nobody@example.test", "wrong", "127.0.0.7") == "failed"
        assert pop3_user_pass(ports, "nobody@example.test", "wrong", "127.0.0.8") == "refused"
    with servers(mail_env, "pop3") as ports:
        assert pop3_user_pass(ports, ALICE, PASSWORD, "127.0.0.9") == "refused"


def test_limit_state_is_in_the_accounts_database(mail_env: MailEnv) -> None:
    """Where the state lives: the accounts database, shared by the processes (and survives)."""
    db: Path = mail_env.data_dir / "auth.sqlite3"
    with mail_env.accounts() as accounts:
        AuthThrottle(accounts).failed("192.0.2.1", ALICE)
    with sqlite3.connect(db) as conn:
        keys = {k for (k,) in conn.execute("SELECT peer FROM login_failures")}
    assert keys == {"192.0.2.1", "account:" + ALICE}
