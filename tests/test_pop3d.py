"""mailroom-pop3d over real sockets: poplib, fetchmail and getmail6, limits, bad input, crashes.

The server runs behind mailroom's activator exactly as in ``bin/dev``; the Maildir is the real
one, written by ``maildir.deliver`` as the SMTP server writes it. Every client must receive
exactly the bytes of the Maildir files (with CRLF line ends).
"""

from __future__ import annotations

import base64
import contextlib
import imaplib
import os
import poplib
import random
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailroom.addresses import parse_address
from mailroom.maildir import Maildir
from mailroom.pop3.session import unique_id
from tests.conftest import BIN, HOSTNAME, PASSWORD, Certificate, MailEnv, Server

ALICE = "alice@example.test"
BOB = "bob@example.test"


def message(i: int, lines: int = 3) -> bytes:
    """A message with a few lines that need byte-stuffing, of a size varying with ``i``."""
    body = "".join(f"Line {n} of message {i}.\r\n" for n in range(lines + i % 7))
    return (
        f"From: Sender {i} <s{i}@elsewhere.test>\r\nTo: {ALICE}\r\nSubject: message {i}\r\n"
        f"Message-ID: <{i}@elsewhere.test>\r\n\r\n.starts with a dot\r\n{body}..two dots\r\n.\r\n"
        "end\r\n"
    ).encode()


def deliver(env: MailEnv, address: str, data: bytes) -> str:
    """Deliver as the SMTP server does; returns the message's key (its Maildir base name)."""
    maildir = Maildir.for_address(env.data_dir / "mail", parse_address(address), HOSTNAME)
    return key(maildir.deliver(data))


def inbox(env: MailEnv, address: str = ALICE) -> dict[str, bytes]:
    """The INBOX's messages (new/ and cur/) by key, with CRLF line ends as POP3 sends them."""
    root = env.mailbox(address)
    paths = [p for sub in ("new", "cur") if (root / sub).exists() for p in (root / sub).iterdir()]
    return {key(p): p.read_bytes().replace(b"\n", b"\r\n") for p in paths}


def key(path: Path) -> str:
    return path.name.split(":2,")[0]


def tls_context(certificate: Certificate) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certificate[0]))
    context.check_hostname = False
    return context


def configure(env: MailEnv, **pop3: object) -> None:
    lines = ["[pop3]"] + [
        f"{k} = {str(v).lower() if isinstance(v, bool) else v}" for k, v in pop3.items()
    ]
    with env.config.open("a") as f:
        f.write("\n".join(lines) + "\n")


@pytest.fixture
def pop3d(mail_env: MailEnv) -> Iterator[Server]:
    server = Server(mail_env, "mailroom-pop3d", ("pop3", "pop3s"))
    yield server
    server.stop()


def pop3s(server: Server, certificate: Certificate, user: str = ALICE) -> poplib.POP3_SSL:
    client = poplib.POP3_SSL(
        "127.0.0.1", server.ports["pop3s"], context=tls_context(certificate), timeout=30
    )
    client.user(user)
    client.pass_(PASSWORD)
    return client


def retr(client: poplib.POP3, number: int) -> bytes:
    _, lines, _ = client.retr(number)
    return b"".join(line + b"\r\n" for line in lines)


# -- clients ---------------------------------------------------------------------------------------


def test_poplib_110_with_stls(pop3d: Server, mail_env: MailEnv, certificate: Certificate) -> None:
    keys = [deliver(mail_env, ALICE, message(i)) for i in range(3)]
    client = poplib.POP3("127.0.0.1", pop3d.ports["pop3"], timeout=30)
    assert client.getwelcome() == f"+OK {HOSTNAME} POP3 server ready".encode()
    caps = client.capa()
    assert "STLS" in caps and "USER" not in caps and "SASL" not in caps
    with pytest.raises(poplib.error_proto, match="requires TLS"):
        client.user(ALICE)
    client.stls(tls_context(certificate))
    caps = client.capa()
    assert "STLS" not in caps and caps["SASL"] == ["PLAIN"] and "USER" in caps
    client.user(ALICE)
    assert client.pass_(PASSWORD).startswith(b"+OK Logged in: 3 messages")
    files = inbox(mail_env)
    count, size = client.stat()
    assert count == 3 and size == sum(len(files[k]) for k in keys)
    _, listing, _ = client.list()
    assert listing == [f"{n} {len(files[k])}".encode() for n, k in enumerate(keys, 1)]
    for n, k in enumerate(keys, 1):
        assert retr(client, n) == files[k] == message(n - 1)
    _, uidl, _ = client.uidl()
    assert uidl == [f"{n} {unique_id(k)}".encode() for n, k in enumerate(keys, 1)]
    _, top, _ = client.top(2, 1)
    head = message(1).split(b"\r\n\r\n")[0]
    assert b"\r\n".join(top) + b"\r\n" == head + b"\r\n\r\n.starts with a dot\r\n"
    client.quit()
    assert sorted(inbox(mail_env)) == sorted(keys)


def test_poplib_995_auth_plain_dele_quit(
    pop3d: Server, mail_env: MailEnv, certificate: Certificate
) -> None:
    keys = [deliver(mail_env, ALICE, message(i)) for i in range(4)]
    # an IMAP client's \Deleted mark on message 4: POP3 must leave it alone
    new = next((mail_env.mailbox(ALICE) / "new").glob(keys[3] + "*"))
    new.rename(mail_env.mailbox(ALICE) / "cur" / (new.name + ":2,T"))
    client = poplib.POP3_SSL(
        "127.0.0.1", pop3d.ports["pop3s"], context=tls_context(certificate), timeout=30
    )
    assert "STLS" not in client.capa()
    token = base64.b64encode(f"\0{ALICE}\0{PASSWORD}".encode()).decode()
    reply = client._shortcmd(f"AUTH PLAIN {token}")  # type: ignore[attr-defined]
    assert reply.startswith(b"+OK Logged in: 4 messages")
    client.dele(1)
    client.dele(3)
    with pytest.raises(poplib.error_proto, match="already deleted"):
        client.retr(1)
    assert client.quit() == f"+OK {HOSTNAME} signing off (2 messages deleted)".encode()
    assert sorted(inbox(mail_env)) == sorted([keys[1], keys[3]])
    with pop3s_session(pop3d, certificate) as again:
        _, uidl, _ = again.uidl()
        assert uidl == [f"1 {unique_id(keys[1])}".encode(), f"2 {unique_id(keys[3])}".encode()]


@contextlib.contextmanager
def pop3s_session(server: Server, certificate: Certificate) -> Iterator[poplib.POP3_SSL]:
    client = pop3s(server, certificate)
    yield client
    client.quit()


def test_uidl_stable_across_restarts_and_index_rebuild(
    pop3d: Server, mail_env: MailEnv, certificate: Certificate
) -> None:
    keys = [deliver(mail_env, ALICE, message(i)) for i in range(3)]
    with pop3s_session(pop3d, certificate) as client:
        first = client.uidl()[1]
    assert first == [f"{n} {unique_id(k)}".encode() for n, k in enumerate(keys, 1)]
    for pid in pop3d.child_pids():
        os.kill(pid, signal.SIGKILL)
    indexes = list(mail_env.mailbox(ALICE).glob("mailroom-index*"))
    assert indexes
    for index in indexes:
        index.unlink()
    time.sleep(0.2)
    with pop3s_session(pop3d, certificate) as client:
        assert client.uidl()[1] == first


def test_second_session_is_in_use(
    pop3d: Server, mail_env: MailEnv, certificate: Certificate
) -> None:
    deliver(mail_env, ALICE, message(1))
    first = pop3s(pop3d, certificate)
    second = poplib.POP3_SSL(
        "127.0.0.1", pop3d.ports["pop3s"], context=tls_context(certificate), timeout=30
    )
    second.user(ALICE)
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        second.pass_(PASSWORD)
    pop3s(pop3d, certificate, BOB).quit()  # another mailbox is not locked
    first.quit()
    second.user(ALICE)
    assert second.pass_(PASSWORD).startswith(b"+OK")
    second.quit()


def test_snapshot_and_drop_without_quit(
    pop3d: Server, mail_env: MailEnv, certificate: Certificate
) -> None:
    keys = [deliver(mail_env, ALICE, message(i)) for i in range(2)]
    client = pop3s(pop3d, certificate)
    late = deliver(mail_env, ALICE, message(9))
    assert client.stat()[0] == 2  # RFC 1939 8: the maildrop as it was at login
    client.dele(1)
    client.sock.shutdown(socket.SHUT_RDWR)  # gone without QUIT: nothing is removed
    client.close()
    time.sleep(0.3)
    assert sorted(inbox(mail_env)) == sorted([*keys, late])
    with pop3s_session(pop3d, certificate) as again:
        assert again.stat()[0] == 3


def test_rset_undeletes(pop3d: Server, mail_env: MailEnv, certificate: Certificate) -> None:
    keys = [deliver(mail_env, ALICE, message(i)) for i in range(2)]
    with pop3s_session(pop3d, certificate) as client:
        client.dele(1)
        client.dele(2)
        client.rset()
        assert client.stat()[0] == 2
    assert sorted(inbox(mail_env)) == sorted(keys)


# -- fetchmail and getmail6 ------------------------------------------------------------------------


def _many(env: MailEnv, count: int) -> list[bytes]:
    """``count`` messages delivered; returns them as stored (LF line ends)."""
    messages = [message(i, lines=20 + i % 50) for i in range(count)]
    for data in messages:
        deliver(env, ALICE, data)
    return sorted(data.replace(b"\r\n", b"\n") for data in messages)


def _fetchmail(rc: Path, home: Path) -> str:
    out = subprocess.run(
        ["fetchmail", "-f", str(rc), "--nosyslog", "-i", str(home / "fetchids")],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, HOME=str(home)),
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def test_fetchmail_downloads_then_empties_200(
    pop3d: Server, mail_env: MailEnv, certificate: Certificate, tmp_path: Path
) -> None:
    stored = _many(mail_env, 200)
    assert sorted(v.replace(b"\r\n", b"\n") for v in inbox(mail_env).values()) == stored
    dest = tmp_path / "fetched"
    dest.mkdir()
    mda = tmp_path / "mda.sh"
    mda.write_text(f'#!/bin/sh\nexec cat > "$(mktemp {dest}/msg.XXXXXXXX)"\n')
    mda.chmod(0o755)
    rc = tmp_path / "fetchmailrc"

    def write_rc(keep: bool) -> None:
        rc.write_text(
            f"poll 127.0.0.1 service {pop3d.ports['pop3s']} protocol POP3 uidl auth password\n"
            f'  user "{ALICE}" there with password "{PASSWORD}" is root here\n'
            f"  ssl sslcertck sslcertfile {certificate[0]} sslcommonname {HOSTNAME}\n"
            f'  {"keep" if keep else "nokeep"} fetchall mda "{mda}"\n'
        )
        rc.chmod(0o600)

    write_rc(keep=True)
    _fetchmail(rc, tmp_path)
    assert sorted(_strip_fetchmail(p.read_bytes()) for p in dest.iterdir()) == stored
    assert len(inbox(mail_env)) == 200  # keep: nothing removed
    for p in dest.iterdir():
        p.unlink()
    write_rc(keep=False)
    _fetchmail(rc, tmp_path)
    assert inbox(mail_env) == {}
    assert sorted(_strip_fetchmail(p.read_bytes()) for p in dest.iterdir()) == stored


def _strip_fetchmail(data: bytes) -> bytes:
    """fetchmail prepends its own Received: header (folded over several lines)."""
    assert data.startswith(b"Received: from 127.0.0.1"), data[:200]
    _, _, rest = data.partition(b"\n")
    while rest.startswith((b"\t", b" ")):
        _, _, rest = rest.partition(b"\n")
    return rest


def test_getmail6_downloads_and_deletes_200(
    pop3d: Server, mail_env: MailEnv, certificate: Certificate, tmp_path: Path
) -> None:
    stored = _many(mail_env, 200)
    dest = tmp_path / "dest"
    dest.mkdir()
    mda = tmp_path / "mda.sh"
    mda.write_text(f'#!/bin/sh\nexec cat > "$(mktemp {dest}/msg.XXXXXXXX)"\n')
    mda.chmod(0o755)
    rc = tmp_path / "getmailrc"
    # getmail's Maildir destination refuses to deliver as root (the tests run as root); an
    # external MDA writing one file per message is allowed to.
    rc.write_text(
        "[retriever]\ntype = SimplePOP3SSLRetriever\nserver = 127.0.0.1\n"
        f"port = {pop3d.ports['pop3s']}\nusername = {ALICE}\npassword = {PASSWORD}\n"
        f"ca_certs = {certificate[0]}\n\n"
        f"[destination]\ntype = MDA_external\npath = {mda}\nallow_root_commands = true\n\n"
        "[options]\nread_all = true\ndelete = true\ndelivered_to = false\nreceived = false\n"
    )
    out = subprocess.run(
        ["getmail", "--rcfile", str(rc), "--getmaildir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(_strip_return_path(p.read_bytes()) for p in dest.iterdir()) == stored
    assert inbox(mail_env) == {}


def _strip_return_path(data: bytes) -> bytes:
    """getmail prepends a Return-Path: header (POP3 has no envelope sender: unknown)."""
    assert data.startswith(b"Return-Path: <unknown>\n"), data[:200]
    return data.removeprefix(b"Return-Path: <unknown>\n")


# -- concurrency -----------------------------------------------------------------------------------


def test_pop3_while_mail_arrives(
    pop3d: Server, mail_env: MailEnv, certificate: Certificate
) -> None:
    """Deliveries during POP3 sessions that delete: every message is either fetched or still there."""
    for i in range(50):
        deliver(mail_env, ALICE, message(i))
    stop = threading.Event()
    delivered: list[str] = []

    def keep_delivering() -> None:
        i = 1000
        while not stop.is_set():
            delivered.append(deliver(mail_env, ALICE, message(i)))
            i += 1
            time.sleep(0.005)

    thread = threading.Thread(target=keep_delivering)
    thread.start()
    fetched: list[bytes] = []
    try:
        for _ in range(5):
            with pop3s_session(pop3d, certificate) as client:
                count = client.stat()[0]
                for n in range(1, count + 1):
                    fetched.append(retr(client, n))
                    client.dele(n)
    finally:
        stop.set()
        thread.join()
    remaining = list(inbox(mail_env).values())
    expected = [message(i) for i in range(50)] + [message(1000 + j) for j in range(len(delivered))]
    assert len(fetched) >= 50 and len(delivered) > 10
    assert sorted(fetched + remaining) == sorted(expected)  # none lost, none twice


# -- limits and bad input --------------------------------------------------------------------------


def _raw(server: Server, name: str = "pop3") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.ports[name]), timeout=30)
    assert sock.recv(1024).startswith(b"+OK")
    return sock


def _read_until(sock: socket.socket, end: bytes) -> bytes:
    data = b""
    while not data.endswith(end):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_no_password_before_tls_even_from_loopback(pop3d: Server) -> None:
    sock = _raw(pop3d)
    sock.sendall(f"USER {ALICE}\r\n".encode())
    assert _read_until(sock, b"\r\n").startswith(b"-ERR Authentication requires TLS")
    token = base64.b64encode(f"\0{ALICE}\0{PASSWORD}".encode())
    sock.sendall(b"AUTH PLAIN " + token + b"\r\n")
    assert _read_until(sock, b"\r\n").startswith(b"-ERR Authentication requires TLS")
    sock.close()


def test_plaintext_loopback_when_allowed(mail_env: MailEnv) -> None:
    configure(mail_env, allow_plaintext_loopback=True)
    server = Server(mail_env, "mailroom-pop3d", ("pop3", "pop3s"))
    try:
        client = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
        client.user(ALICE)
        assert client.pass_(PASSWORD).startswith(b"+OK Logged in")
        client.quit()
    finally:
        server.stop()


def test_stls_injection(pop3d: Server, certificate: Certificate) -> None:
    """Commands pipelined behind STLS in plaintext are never executed inside TLS."""
    sock = _raw(pop3d)
    sock.sendall(f"STLS\r\nUSER {ALICE}\r\nPASS {PASSWORD}\r\nCAPA\r\n".encode())
    assert _read_until(sock, b"\r\n") == b"+OK Begin TLS negotiation\r\n"
    tls = tls_context(certificate).wrap_socket(sock, server_hostname=HOSTNAME)
    tls.sendall(b"NOOP\r\n")
    # the first reply inside TLS answers NOOP (not allowed before login): nothing else ran
    assert _read_until(tls, b"\r\n") == b"-ERR NOOP is not allowed in the AUTHORIZATION state\r\n"
    tls.sendall(f"PASS {PASSWORD}\r\n".encode())
    assert _read_until(tls, b"\r\n") == b"-ERR Send USER first\r\n"
    tls.close()


def test_long_line_and_unknown_commands(pop3d: Server) -> None:
    sock = _raw(pop3d)
    sock.sendall(b"CAPA " + b"x" * 100_000 + b"\r\nNOOP\r\n")
    data = _read_until(sock, b"state\r\n")
    assert data == (
        b"-ERR Line too long (at most 2048 octets)\r\n"
        b"-ERR NOOP is not allowed in the AUTHORIZATION state\r\n"
    )
    sock.sendall(b"GET / HTTP/1.1\r\n")
    assert _read_until(sock, b"\r\n") == b"-ERR Unknown command GET\r\n"
    sock.sendall(b"\x00\xff\r\n" * 8)
    data = _read_until(sock, b"closing\r\n")
    assert data.endswith(b"-ERR Too many bad commands; closing\r\n") and b"Traceback" not in data
    assert sock.recv(100) == b""  # the server hung up
    sock.close()


def test_failed_logins_are_throttled_and_end_the_session(
    pop3d: Server, certificate: Certificate
) -> None:
    client = poplib.POP3_SSL(
        "127.0.0.1", pop3d.ports["pop3s"], context=tls_context(certificate), timeout=30
    )
    start = time.monotonic()
    for _ in range(2):
        client.user(ALICE)
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            client.pass_("wrong password")
    assert time.monotonic() - start >= 1.5  # 0.5 s, then 1 s: AuthThrottle's delays
    client.user(ALICE)
    with pytest.raises(poplib.error_proto):
        client.pass_("wrong password")
    with pytest.raises((poplib.error_proto, OSError, EOFError)):
        client.noop()  # the session was closed after the third failure


def test_connections_per_ip(mail_env: MailEnv) -> None:
    configure(mail_env, max_connections_per_ip=2)
    server = Server(mail_env, "mailroom-pop3d", ("pop3", "pop3s"))
    try:
        first, second = _raw(server), _raw(server)
        third = socket.create_connection(("127.0.0.1", server.ports["pop3"]), timeout=30)
        assert third.recv(1024) == b"-ERR [SYS/TEMP] Too many connections; try again later\r\n"
        for sock in (first, second, third):
            sock.close()
    finally:
        server.stop()


def test_timeout_below_ten_minutes_is_refused(mail_env: MailEnv) -> None:
    configure(mail_env, timeout_seconds=60)
    out = subprocess.run(
        [str(BIN / "mailroom-pop3d")],
        env=mail_env.environ(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 78 and "pop3.timeout_seconds" in out.stderr


# -- crash during UPDATE ---------------------------------------------------------------------------


def test_kill_during_update_loses_nothing_kept_and_leaves_no_ghost(
    pop3d: Server, mail_env: MailEnv, certificate: Certificate
) -> None:
    """SIGKILL while QUIT removes 800 of 1,000 messages, at several points of the UPDATE.

    The first round measures how long the UPDATE takes; the others kill the server at a
    fraction of that. After each kill a new session must list every message that was not
    DELE'd, each one readable and intact (no ghost), and nothing that was not there before.
    """
    rng = random.Random(1939)
    update_seconds = 0.0
    partial = 0  # rounds killed while the files were being unlinked
    for round_, fraction in enumerate((None, 0.1, 0.3, 0.5, 0.7, 0.9)):
        for i in range(1000):
            deliver(mail_env, ALICE, message(round_ * 10_000 + i))
        before = {unique_id(k): data for k, data in inbox(mail_env).items()}
        client = pop3s(pop3d, certificate)
        _, uidl, _ = client.uidl()
        numbered = {int(n): k.decode() for n, k in (line.split() for line in uidl)}
        assert set(numbered.values()) == set(before)
        doomed = set(rng.sample(sorted(numbered), 800))
        for n in sorted(doomed):
            client.dele(n)
        kept = {numbered[n] for n in numbered if n not in doomed}
        if fraction is None:
            start = time.monotonic()
            client.quit()
            update_seconds = time.monotonic() - start
            assert set(before) - set(numbered[n] for n in doomed) == kept
        else:
            pids = pop3d.child_pids()
            client.sock.sendall(b"QUIT\r\n")
            time.sleep(update_seconds * fraction)
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            client.sock.close()
            left = len(inbox(mail_env))
            partial += len(kept) < left < len(before)
        time.sleep(0.1)
        with pop3s_session(pop3d, certificate) as after:
            count, _ = after.stat()
            _, listing, _ = after.uidl()
            seen = {}
            for line in listing:  # no ghost: every listed message can be read, and is intact
                number, uid = line.split()
                seen[uid.decode()] = retr(after, int(number))
            for n in range(1, count + 1):
                after.dele(n)
        assert kept <= set(seen), "a message that was not deleted was lost"
        assert set(seen) <= set(before) and all(seen[k] == before[k] for k in seen)
        assert inbox(mail_env) == {}
    print(f"UPDATE of 800 took {update_seconds:.3f} s; {partial} of 5 kills landed inside it")
    assert partial >= 1, f"no kill landed inside the UPDATE (it takes {update_seconds:.3f} s)"


def test_pop3_imap_and_delivery_on_one_mailbox(mail_env: MailEnv, certificate: Certificate) -> None:
    """A POP3 session, an IMAP session and deliveries at once: each sees what the RFCs promise."""
    pop = Server(mail_env, "mailroom-pop3d", ("pop3", "pop3s"))
    imap = Server(mail_env, "mailroom-imapd", ("imap", "imaps"))
    try:
        first = [message(i) for i in range(30)]
        for data in first:
            deliver(mail_env, ALICE, data)
        client = pop3s(pop, certificate)  # the snapshot: 30 messages
        assert client.stat()[0] == 30
        stop = threading.Event()
        later: list[bytes] = []

        def keep_delivering() -> None:
            while not stop.is_set() and len(later) < 20:
                later.append(message(5000 + len(later)))
                deliver(mail_env, ALICE, later[-1])
                time.sleep(0.01)

        thread = threading.Thread(target=keep_delivering)
        thread.start()
        with imaplib.IMAP4_SSL(
            "127.0.0.1", imap.ports["imaps"], ssl_context=tls_context(certificate)
        ) as other:
            other.login(ALICE, PASSWORD)
            other.select("INBOX")
            other.store("1:5", "+FLAGS", "(\\Seen)")
            other.store("6", "+FLAGS", "(\\Deleted)")
            other.expunge()  # message 6 is gone before POP3 reads it
            other.store("7", "+FLAGS", "(\\Deleted)")  # IMAP's own mark, on what was number 8
            got = {}
            for n in range(1, 31):
                try:
                    got[n] = retr(client, n)
                except poplib.error_proto as err:
                    assert n == 6 and b"removed by another client" in err.args[0]
                other.noop()
            assert got == {n: first[n - 1] for n in range(1, 31) if n != 6}
            for n in range(1, 31):
                if n != 8:  # number 8 keeps the \Deleted an IMAP client gave it
                    client.dele(n)
            assert client.quit() == f"+OK {HOSTNAME} signing off (29 messages deleted)".encode()
            thread.join()
            other.noop()
            typ, found = other.search(None, "ALL")
            ids = found[0]
            assert typ == "OK" and isinstance(ids, bytes) and len(ids.split()) == 1 + len(later)
        stop.set()
        remaining = inbox(mail_env)
        assert sorted(remaining.values()) == sorted([first[7], *later])
        flagged = [p for p in (mail_env.mailbox(ALICE) / "cur").iterdir() if p.name.endswith("T")]
        assert [p.read_bytes().replace(b"\n", b"\r\n") for p in flagged] == [first[7]]
    finally:
        pop.stop()
        imap.stop()


def test_without_a_certificate(mail_env: MailEnv) -> None:
    """No TLS yet: 110 offers no STLS and takes no password; 995 hangs up at once."""
    text = mail_env.config.read_text()
    mail_env.config.write_text(text.split("[tls]")[0])
    server = Server(mail_env, "mailroom-pop3d", ("pop3", "pop3s"))
    try:
        client = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
        assert "STLS" not in client.capa()
        with pytest.raises(poplib.error_proto, match="TLS is not available"):
            client._shortcmd("STLS")  # type: ignore[attr-defined]
        with pytest.raises(poplib.error_proto, match="requires TLS"):
            client.user(ALICE)
        client.quit()
        sock = socket.create_connection(("127.0.0.1", server.ports["pop3s"]), timeout=30)
        assert sock.recv(100) == b""
        sock.close()
    finally:
        server.stop()
