"""Transcript tests of the sans-IO POP3 session: every command in every state, bytes in, bytes out.

The maildrop is ``tests.pop3_fake_store.FakeMaildrop`` on an in-memory store; a transcript is
``C:`` lines (sent together) followed by the ``S:`` lines the server must answer, exactly.
"""

from __future__ import annotations

import ast
import base64
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mailroom.accounts import User
from mailroom.addresses import parse_address
from mailroom.errors import DeliveryError, MailboxInUseError
from mailroom.pop3.session import (
    MAX_BAD_COMMANDS,
    MAX_LINE,
    POP3Session,
    SessionConfig,
    State,
    byte_stuff,
    unique_id,
)
from tests.pop3_fake_store import FakeMaildrop, FakeStore

ALICE = "alice@example.test"
PASSWORD = "correct horse battery"
HOST = "mail.example.test"
KEY1 = "1764000000.M1P1R0000000000000001.mail.example.test"
KEY2 = "1764000000.M2P1R0000000000000002.mail.example.test"
KEY3 = "1764000000.M3P1R0000000000000003.mail.example.test"

PLAIN = base64.b64encode(f"\0{ALICE}\0{PASSWORD}".encode()).decode()

MSG1 = b"From: a@x.test\r\nSubject: one\r\n\r\nHello.\r\n"  # 40 octets
MSG2 = b"Subject: two\r\n\r\n.dot line\r\nline 2\r\n..two dots\r\nline 4\r\n"  # 55
MSG3 = b"Subject: three\r\n\r\nno final newline"  # 34


@dataclass
class World:
    """The outside world of a session: a store, and the logins and maildrops it gave out."""

    store: FakeStore = field(default_factory=FakeStore)
    logins: list[tuple[str, str]] = field(default_factory=list)
    maildrops: list[FakeMaildrop] = field(default_factory=list)
    open_error: Exception | None = None

    def authenticate(self, username: str, password: str) -> User | None:
        self.logins.append((username, password))
        if username == ALICE and password == PASSWORD:
            return User(parse_address(ALICE), True, 0)
        return None

    def open_maildrop(self, user: User) -> FakeMaildrop:
        if self.open_error is not None:
            raise self.open_error
        maildrop = FakeMaildrop(self.store)
        self.maildrops.append(maildrop)
        return maildrop


def filled() -> World:
    world = World()
    world.store.add(MSG1, KEY1)
    world.store.add(MSG2, KEY2)
    world.store.add(MSG3, KEY3)
    return world


def session(
    world: World | None = None, *, tls: bool = True, starttls: bool = False, plaintext: bool = False
) -> POP3Session:
    world = world or filled()
    return POP3Session(
        SessionConfig(
            hostname=HOST,
            authenticate=world.authenticate,
            open_maildrop=world.open_maildrop,
            implicit_tls=tls,
            starttls_available=starttls,
            plaintext_auth=plaintext,
        )
    )


def run(s: POP3Session, script: str) -> None:
    """Play ``script``: each run of C: lines is fed at once, the S: lines after it must follow.

    ``<SP>`` stands for a space at the end of a line.
    """
    sent: list[str] = []
    expected: list[str] = []

    def flush() -> None:
        if sent:
            got = s.feed("".join(f"{c}\r\n" for c in sent).encode()).data
            want = "".join(f"{e}\r\n" for e in expected).encode()
            assert got == want, f"after {sent!r}"
        sent.clear()
        expected.clear()

    for line in script.strip("\n").split("\n"):
        line = line.lstrip().replace("<SP>", " ")  # <SP>: a space at the end of a line
        if not line:
            continue
        if line.startswith("C: ") or line == "C:":
            if expected:
                flush()
            sent.append(line[3:])
        elif line.startswith("S: ") or line == "S:":
            expected.append(line[3:])
        else:
            raise ValueError(f"not a transcript line: {line!r}")
    flush()


def logged_in(world: World | None = None) -> POP3Session:
    s = session(world)
    s.feed(f"USER {ALICE}\r\nPASS {PASSWORD}\r\n".encode())
    assert s.state is State.TRANSACTION
    return s


# -- sans-IO ---------------------------------------------------------------------------------------


def test_core_imports_no_io() -> None:
    """Principle 1: the protocol core imports no asyncio, socket, sqlite3 or dns."""
    path = Path(__file__).parent.parent / "mailroom" / "pop3" / "session.py"
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & {"asyncio", "socket", "sqlite3", "dns", "ssl", "selectors"}
    code = (
        "import sys, mailroom.pop3.session;"
        "print(sorted(m for m in ('asyncio', 'socket', 'sqlite3', 'dns') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- AUTHORIZATION ---------------------------------------------------------------------------------


def test_greeting() -> None:
    assert session().greeting() == b"+OK mail.example.test POP3 server ready\r\n"


def test_capa_on_995() -> None:
    run(
        session(),
        """
        C: CAPA
        S: +OK Capability list follows
        S: TOP
        S: UIDL
        S: RESP-CODES
        S: AUTH-RESP-CODE
        S: PIPELINING
        S: USER
        S: SASL PLAIN
        S: EXPIRE NEVER
        S: IMPLEMENTATION mailroom
        S: .
        """,
    )


def test_capa_before_stls_offers_no_login() -> None:
    run(
        session(tls=False, starttls=True),
        """
        C: capa
        S: +OK Capability list follows
        S: TOP
        S: UIDL
        S: RESP-CODES
        S: AUTH-RESP-CODE
        S: PIPELINING
        S: STLS
        S: EXPIRE NEVER
        S: IMPLEMENTATION mailroom
        S: .
        """,
    )


def test_no_password_before_tls() -> None:
    world = filled()
    run(
        session(world, tls=False, starttls=True),
        f"""
        C: USER {ALICE}
        S: -ERR Authentication requires TLS: send STLS first, or connect to port 995
        C: PASS {PASSWORD}
        S: -ERR Authentication requires TLS: send STLS first, or connect to port 995
        C: AUTH PLAIN {PLAIN}
        S: -ERR Authentication requires TLS: send STLS first, or connect to port 995
        C: AUTH PLAIN
        S: -ERR Authentication requires TLS: send STLS first, or connect to port 995
        """,
    )
    assert world.logins == [] and world.maildrops == []


def test_plaintext_allowed_when_configured() -> None:
    s = session(tls=False, plaintext=True)
    run(
        s,
        f"C: USER {ALICE}\nS: +OK Send PASS\nC: PASS {PASSWORD}\nS: +OK Logged in: 3 messages (129 octets)",
    )


def test_stls_discards_what_follows_in_plaintext() -> None:
    world = filled()
    s = session(world, tls=False, starttls=True, plaintext=False)
    out = s.feed(f"STLS\r\nUSER {ALICE}\r\nPASS {PASSWORD}\r\n".encode())
    assert out.data == b"+OK Begin TLS negotiation\r\n" and out.action == "starttls"
    assert s.feed(b"CAPA\r\n").data == b""  # nothing more until the handshake is done
    s.tls_started()
    assert world.logins == []
    run(s, "C: PASS x\nS: -ERR Send USER first\nC: STLS\nS: -ERR TLS is already active")


def test_stls_forgets_user_given_in_plaintext() -> None:
    world = filled()
    s = session(world, tls=False, starttls=True, plaintext=True)
    run(s, f"C: USER {ALICE}\nS: +OK Send PASS\nC: STLS\nS: +OK Begin TLS negotiation")
    s.tls_started()
    run(s, f"C: PASS {PASSWORD}\nS: -ERR Send USER first")


def test_stls_unavailable() -> None:
    run(
        session(tls=False),
        "C: STLS\nS: -ERR TLS is not available\nC: STLS now\nS: -ERR STLS takes no argument",
    )


def test_user_pass_login() -> None:
    world = filled()
    s = session(world)
    run(
        s,
        f"""
        C: USER {ALICE}
        S: +OK Send PASS
        C: PASS {PASSWORD}
        S: +OK Logged in: 3 messages (129 octets)
        """,
    )
    assert s.state is State.TRANSACTION and world.logins == [(ALICE, PASSWORD)]


def test_pass_is_the_rest_of_the_line_and_needs_user() -> None:
    world = filled()
    s = session(world)
    run(
        s,
        f"""
        C: PASS {PASSWORD}
        S: -ERR Send USER first
        C: USER
        S: -ERR Usage: USER name
        C: USER {ALICE}
        S: +OK Send PASS
        C: PASS wrong password
        S: -ERR [AUTH] Invalid user name or password
        C: PASS {PASSWORD}
        S: -ERR Send USER first
        """,
    )
    assert world.logins == [(ALICE, "wrong password")]


def test_failed_logins_end_the_session() -> None:
    s = session()
    out = s.feed(b"USER a\r\nPASS b\r\nUSER a\r\nPASS b\r\nUSER a\r\nPASS b\r\nCAPA\r\n")
    assert out.data == (
        b"+OK Send PASS\r\n-ERR [AUTH] Invalid user name or password\r\n" * 3
        + b"-ERR Too many failed logins; closing\r\n"
    )
    assert out.action == "close" and s.state is State.CLOSED


def test_auth_plain_with_initial_response() -> None:
    world = filled()
    s = session(world)
    run(s, f"C: AUTH PLAIN {PLAIN}\nS: +OK Logged in: 3 messages (129 octets)")
    assert world.logins == [(ALICE, PASSWORD)]


def test_auth_plain_continuation_and_authzid() -> None:
    world = filled()
    s = session(world)
    same = base64.b64encode(f"{ALICE}\0{ALICE}\0{PASSWORD}".encode()).decode()
    run(s, f"C: AUTH PLAIN\nS: +<SP>\nC: {same}\nS: +OK Logged in: 3 messages (129 octets)")


def test_auth_plain_refusals() -> None:
    world = filled()
    other = base64.b64encode(f"bob@example.test\0{ALICE}\0{PASSWORD}".encode()).decode()
    run(
        session(world),
        f"""
        C: AUTH
        S: +OK Mechanisms follow
        S: PLAIN
        S: .
        C: AUTH CRAM-MD5
        S: -ERR Unsupported mechanism CRAM-MD5 (PLAIN only)
        C: AUTH PLAIN
        S: +<SP>
        C: *
        S: -ERR Authentication cancelled
        C: AUTH PLAIN !!!
        S: -ERR Invalid base64 in the SASL response
        C: AUTH PLAIN =
        S: -ERR [AUTH] Malformed PLAIN response
        C: AUTH PLAIN {other}
        S: -ERR [AUTH] Cannot log in as another user
        """,
    )
    assert world.logins == []


def test_in_use() -> None:
    world = filled()
    world.open_error = MailboxInUseError("locked")
    s = session(world)
    run(
        s,
        f"C: USER {ALICE}\nC: PASS {PASSWORD}\nS: +OK Send PASS\nS: -ERR [IN-USE] Mailbox is open in another POP3 session",
    )
    assert s.state is State.AUTHORIZATION


def test_store_failure_at_login_is_temporary() -> None:
    world = filled()
    world.open_error = DeliveryError("disk on fire")
    s = session(world)
    run(
        s,
        f"C: USER {ALICE}\nC: PASS {PASSWORD}\nS: +OK Send PASS\nS: -ERR [SYS/TEMP] Cannot open the mailbox now; try again later",
    )


def test_transaction_commands_need_login() -> None:
    run(
        session(),
        """
        C: STAT
        S: -ERR STAT is not allowed in the AUTHORIZATION state
        C: RETR 1
        S: -ERR RETR is not allowed in the AUTHORIZATION state
        C: QUIT
        S: +OK mail.example.test signing off
        """,
    )


def test_quit_in_authorization() -> None:
    s = session()
    out = s.feed(b"QUIT\r\n")
    assert out.action == "close" and s.state is State.CLOSED


# -- TRANSACTION -----------------------------------------------------------------------------------


def test_stat_list_uidl() -> None:
    run(
        logged_in(),
        f"""
        C: STAT
        S: +OK 3 129
        C: LIST
        S: +OK 3 messages (129 octets)
        S: 1 40
        S: 2 55
        S: 3 34
        S: .
        C: LIST 2
        S: +OK 2 55
        C: UIDL
        S: +OK Unique-ID listing follows
        S: 1 {KEY1}
        S: 2 {KEY2}
        S: 3 {KEY3}
        S: .
        C: UIDL 3
        S: +OK 3 {KEY3}
        C: LIST 4
        S: -ERR No such message 4
        C: UIDL 0
        S: -ERR No such message 0
        C: LIST x
        S: -ERR Invalid message number x
        C: LIST 1 2
        S: -ERR At most one message number
        C: STAT 1
        S: -ERR STAT takes no argument
        """,
    )


def test_retr_sends_list_size_octets_once_unstuffed() -> None:
    """RFC 1939 11: the size is the message's octets with CRLF line ends, before byte-stuffing."""
    s = logged_in()
    for number, message in enumerate((MSG1, MSG2), 1):
        size = int(s.feed(f"LIST {number}\r\n".encode()).data.split()[2])
        out = s.feed(f"RETR {number}\r\n".encode()).data
        head, _, body = out.partition(b"\r\n")
        assert head == f"+OK {size} octets".encode()
        assert body.endswith(b"\r\n.\r\n")
        lines = body[: -len(b".\r\n")].split(b"\r\n")
        unstuffed = b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)
        assert unstuffed == message and len(unstuffed) == size


def test_retr_byte_stuffs() -> None:
    run(
        logged_in(),
        """
        C: RETR 2
        S: +OK 55 octets
        S: Subject: two
        S:
        S: ..dot line
        S: line 2
        S: ...two dots
        S: line 4
        S: .
        C: RETR 3
        S: +OK 34 octets
        S: Subject: three
        S:
        S: no final newline
        S: .
        C: RETR 9
        S: -ERR No such message 9
        C: RETR
        S: -ERR Usage: RETR msg
        """,
    )


def test_byte_stuff_first_line_and_empty() -> None:
    assert byte_stuff(b".hidden\r\n") == b"..hidden\r\n.\r\n"
    assert byte_stuff(b"") == b".\r\n"
    assert byte_stuff(b"a\r\n.\r\n") == b"a\r\n..\r\n.\r\n"


def test_top() -> None:
    run(
        logged_in(),
        """
        C: TOP 2 0
        S: +OK Top of message follows
        S: Subject: two
        S:
        S: .
        C: TOP 2 2
        S: +OK Top of message follows
        S: Subject: two
        S:
        S: ..dot line
        S: line 2
        S: .
        C: TOP 2 100
        S: +OK Top of message follows
        S: Subject: two
        S:
        S: ..dot line
        S: line 2
        S: ...two dots
        S: line 4
        S: .
        C: TOP 3 5
        S: +OK Top of message follows
        S: Subject: three
        S:
        S: no final newline
        S: .
        C: TOP 2
        S: -ERR Usage: TOP msg n
        C: TOP 2 -1
        S: -ERR Invalid line count -1
        """,
    )


def test_top_of_message_without_body() -> None:
    world = World()
    world.store.add(b"Subject: only a header\r\n")
    run(
        logged_in(world),
        "C: TOP 1 3\nS: +OK Top of message follows\nS: Subject: only a header\nS: .",
    )


def test_dele_rset_noop() -> None:
    world = filled()
    s = logged_in(world)
    run(
        s,
        """
        C: DELE 2
        S: +OK Message 2 deleted
        C: DELE 2
        S: -ERR Message 2 already deleted
        C: RETR 2
        S: -ERR Message 2 already deleted
        C: LIST 2
        S: -ERR Message 2 already deleted
        C: STAT
        S: +OK 2 74
        C: LIST
        S: +OK 2 messages (74 octets)
        S: 1 40
        S: 3 34
        S: .
        C: NOOP
        S: +OK
        C: RSET
        S: +OK Maildrop has 3 messages (129 octets)
        C: STAT
        S: +OK 3 129
        C: DELE
        S: -ERR Usage: DELE msg
        """,
    )
    assert world.store.removed == []


def test_quit_removes_exactly_the_deleted() -> None:
    world = filled()
    world.store.store("INBOX", [3], "+", {"\\Deleted"})  # an IMAP client's mark: not ours
    s = logged_in(world)
    run(s, "C: DELE 1\nS: +OK Message 1 deleted\nC: DELE 2\nS: +OK Message 2 deleted")
    out = s.feed(b"QUIT\r\n")
    assert out.data == b"+OK mail.example.test signing off (2 messages deleted)\r\n"
    assert out.action == "close" and s.state is State.CLOSED
    assert world.store.removed == [1, 2] and sorted(world.store.infos) == [3]
    assert world.maildrops[0].closed


def test_close_without_quit_removes_nothing() -> None:
    world = filled()
    s = logged_in(world)
    run(s, "C: DELE 1\nS: +OK Message 1 deleted")
    s.close()
    assert world.store.removed == [] and world.maildrops[0].closed
    assert s.state is State.CLOSED


def test_timeout_removes_nothing() -> None:
    world = filled()
    s = logged_in(world)
    s.feed(b"DELE 1\r\n")
    assert s.timed_out() == b"-ERR Autologout: idle for too long\r\n"
    assert world.store.removed == [] and world.maildrops[0].closed


def test_snapshot_hides_new_mail_and_reports_gone_mail() -> None:
    world = filled()
    s = logged_in(world)
    world.store.add(b"Subject: late\r\n\r\nlate\r\n")
    world.store.remove("INBOX", [1])  # expunged over IMAP meanwhile
    run(
        s,
        """
        C: STAT
        S: +OK 3 129
        C: RETR 4
        S: -ERR No such message 4
        C: RETR 1
        S: -ERR Message 1 was removed by another client
        """,
    )


def test_transaction_refuses_authorization_commands() -> None:
    run(
        logged_in(),
        f"""
        C: USER {ALICE}
        S: -ERR USER is not allowed in the TRANSACTION state
        C: STLS
        S: -ERR STLS is not allowed in the TRANSACTION state
        C: CAPA
        S: +OK Capability list follows
        S: TOP
        S: UIDL
        S: RESP-CODES
        S: AUTH-RESP-CODE
        S: PIPELINING
        S: EXPIRE NEVER
        S: IMPLEMENTATION mailroom
        S: .
        """,
    )


def test_pipelined_commands_in_one_feed() -> None:
    s = logged_in()
    out = s.feed(b"STAT\r\nLIST 1\r\nUIDL 1\r\nNOOP\r\n")
    assert out.data == f"+OK 3 129\r\n+OK 1 40\r\n+OK 1 {KEY1}\r\n+OK\r\n".encode()


def test_byte_at_a_time() -> None:
    s = session()
    out = b"".join(s.feed(bytes([b])).data for b in b"CAPA\r\nNOOP\r\n")
    assert out.startswith(b"+OK Capability list follows\r\n")
    assert out.endswith(b".\r\n-ERR NOOP is not allowed in the AUTHORIZATION state\r\n")


# -- UIDL values -----------------------------------------------------------------------------------


def test_unique_id_is_the_key_or_a_stable_digest() -> None:
    assert unique_id(KEY1) == KEY1
    long_key = "1764000000.M123456P12345R0123456789abcdef.a-very-long-host-name.example.org,S=100"
    assert len(long_key) > 70
    uid = unique_id(long_key)
    assert uid == unique_id(long_key) and len(uid) <= 70 and uid != unique_id(long_key + "x")
    assert all(0x21 <= ord(c) <= 0x7E for c in uid)
    assert unique_id("with space") != "with space" and " " not in unique_id("with space")
    assert unique_id("line\n") != "line\n"


# -- bad input -------------------------------------------------------------------------------------


def test_unknown_commands() -> None:
    run(
        session(),
        """
        C: APOP alice 0123456789abcdef
        S: -ERR Unknown command APOP
        C: GET / HTTP/1.1
        S: -ERR Unknown command GET
        C:
        S: -ERR Unknown command ""
        C: \x00\x01junk
        S: -ERR Unknown command ??junk
        """,
    )


def test_too_many_bad_commands_close() -> None:
    s = session()
    out = s.feed(b"BOGUS\r\n" * (MAX_BAD_COMMANDS + 5))
    assert out.data.count(b"-ERR Unknown command BOGUS") == MAX_BAD_COMMANDS
    assert out.data.endswith(b"-ERR Too many bad commands; closing\r\n")
    assert out.action == "close"


def test_long_line_is_refused_and_not_executed() -> None:
    world = filled()
    s = logged_in(world)
    long = b"DELE 1" + b" " * MAX_LINE + b"\r\n"
    out = s.feed(long[:1000])
    out2 = s.feed(long[1000:] + b"STAT\r\n")
    assert out.data + out2.data == (
        f"-ERR Line too long (at most {MAX_LINE} octets)\r\n+OK 3 129\r\n".encode()
    )
    # one long line in one piece, too
    out = s.feed(b"DELE 2 " + b"x" * MAX_LINE + b"\r\nSTAT\r\n")
    assert out.data == f"-ERR Line too long (at most {MAX_LINE} octets)\r\n+OK 3 129\r\n".encode()
    assert len(s.buffer) == 0


def test_long_line_memory_is_bounded() -> None:
    s = session()
    for _ in range(100):
        s.feed(b"x" * 65536)
        assert len(s.buffer) <= MAX_LINE + 65536
    assert s.feed(b"\r\nCAPA\r\n").data.startswith(b"+OK Capability")


@pytest.mark.parametrize("arg", [b"-1", b"+1", b"1.0", b"0x1", b"9" * 20, b"\xff"])
def test_bad_message_numbers(arg: bytes) -> None:
    out = logged_in().feed(b"RETR " + arg + b"\r\n")
    assert out.data.startswith(b"-ERR ") and out.data.endswith(b"\r\n")
    assert out.data.count(b"\r\n") == 1


# -- what may run on the server's event loop ------------------------------------------------------


def test_quick_only_for_reading_commands_after_login() -> None:
    s = session()
    assert not s.quick(b"CAPA\r\n")  # AUTHORIZATION: USER/PASS/AUTH hash passwords
    s.feed(f"USER {ALICE}\r\nPASS {PASSWORD}\r\n".encode())
    for line in (b"STAT", b"LIST", b"UIDL 1", b"RETR 1", b"TOP 1 0", b"DELE 1", b"NOOP", b"RSET"):
        assert s.quick(line + b"\r\n"), line
    assert s.quick(b"RETR 1\r\nRETR 2\r\nRE")  # an unfinished line is only buffered
    assert not s.quick(b"QUIT\r\n")  # UPDATE removes messages: fsyncs
    assert not s.quick(b"RETR 1\r\nQUIT\r\n")
    assert not s.quick(b"RETR 1 " + b"x" * MAX_LINE + b"\r\n")
    s.feed(b"RE")
    assert not s.quick(b"\r\nQUIT\r\n") and s.quick(b"TR 1\r\n")  # buffered bytes count


def test_quick_never_after_close() -> None:
    s = session()
    s.feed(f"USER {ALICE}\r\nPASS {PASSWORD}\r\nQUIT\r\n".encode())
    assert s.state is State.CLOSED and not s.quick(b"STAT\r\n")
