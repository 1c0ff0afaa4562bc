"""IMAP and POP3 attacks over real sockets: credentials before TLS, literals, nesting, names.

Each row is one attack with the answer that proves the protection: plaintext LOGIN,
AUTHENTICATE, USER and AUTH refused before TLS; hostile literal sizes and 10,000 nested
parentheses answered with BAD (never a continuation, never a crash); mailbox and user names
that try to leave their directory refused, with nothing created outside the user's Maildir;
names that differ only in case or Unicode normalisation are one name.
"""

from __future__ import annotations

import base64
import unicodedata

import pytest

from tests.conftest import PASSWORD
from tests.security.servers import Attacked, attacked
from tests.security.wire import Wire

__all__ = ["attacked"]

ALICE = "alice@example.test"


def imap(a: Attacked, *, login: bool = False, port: str = "imaps") -> Wire:
    w = Wire(a.ports[port], tls=port == "imaps")
    assert w.line().startswith(b"* OK")
    if login:
        w.send(f'l LOGIN "{ALICE}" "{PASSWORD}"\r\n'.encode())
        assert w.until(b"l ")[-1].startswith(b"l OK")
    return w


def tagged(w: Wire, command: bytes, tag: bytes = b"t") -> bytes:
    w.send(tag + b" " + command + b"\r\n")
    return w.until(tag + b" ")[-1]


def pop3(a: Attacked, port: str = "pop3s") -> Wire:
    w = Wire(a.ports[port], tls=port == "pop3s")
    assert w.line().startswith(b"+OK")
    return w


def pop3_line(w: Wire, command: bytes) -> bytes:
    w.send(command + b"\r\n")
    return w.line()


# -- credentials before TLS ----------------------------------------------------------------

PLAIN = base64.b64encode(f"\0{ALICE}\0{PASSWORD}".encode())


@pytest.mark.parametrize(
    "command", [f'LOGIN "{ALICE}" "{PASSWORD}"'.encode(), b"AUTHENTICATE PLAIN " + PLAIN]
)
def test_imap_credentials_refused_before_tls(attacked: Attacked, command: bytes) -> None:
    with imap(attacked, port="imap") as w:
        # RFC 9051 6.2.3: NO [PRIVACYREQUIRED], the password not even checked
        assert tagged(w, command).startswith(b"t NO [PRIVACYREQUIRED]")
        assert tagged(w, b"SELECT INBOX", b"s").startswith(b"s BAD")  # still not logged in


@pytest.mark.parametrize("command", [f"USER {ALICE}".encode(), b"AUTH PLAIN " + PLAIN])
def test_pop3_credentials_refused_before_tls(attacked: Attacked, command: bytes) -> None:
    with pop3(attacked, port="pop3") as w:
        assert pop3_line(w, command).startswith(b"-ERR")
        assert pop3_line(w, f"PASS {PASSWORD}".encode()).startswith(b"-ERR")
        assert pop3_line(w, b"STAT").startswith(b"-ERR")  # still not logged in


# -- literals and nesting ----------------------------------------------------------------------

LITERALS = [b"{4294967295}", b"{-1}", b"{}", b"{" + b"9" * 20 + b"}", b"{99999999999999999999+}"]


@pytest.mark.parametrize("literal", LITERALS, ids=[x.decode() for x in LITERALS])
@pytest.mark.parametrize("login", [False, True], ids=["preauth", "authenticated"])
def test_hostile_literal_sizes(attacked: Attacked, literal: bytes, login: bool) -> None:
    with imap(attacked, login=login) as w:
        command = b"APPEND INBOX " if login else b"LOGIN "
        w.send(b"t " + command + literal + b"\r\n")
        reply = w.line()
        assert not reply.startswith(b"+"), reply  # never asks for the data
        assert reply.startswith((b"t BAD", b"t NO", b"* BYE")), reply
        if literal.endswith(b"+}"):  # RFC 7888 4: the data is on its way: the server hangs up
            assert w.until(b"* BYE")[-1].startswith(b"* BYE") and w.closed()
        else:
            assert tagged(w, b"NOOP", b"n").startswith(b"n OK")


def test_large_non_synchronizing_literal_before_login(attacked: Attacked) -> None:
    """{5000+}: more than the 1024 octets allowed before login, sent without asking."""
    with imap(attacked) as w:
        w.send(b"t LOGIN {5000+}\r\n" + b"x" * 5000 + b" {4}\r\npass\r\nn NOOP\r\n")
        lines = w.until(b"n ")
        assert lines[0].startswith(b"t BAD [TOOBIG]"), lines
        # RFC 7888 4: the literal's octets cannot be told from commands: the server hangs up
        assert any(line.startswith(b"* BYE") for line in lines) or lines[-1] == b"", lines
        assert not any(line.startswith(b"t OK") or line.startswith(b"n OK") for line in lines)


@pytest.mark.parametrize("login", [False, True], ids=["preauth", "authenticated"])
def test_ten_thousand_nested_parentheses(attacked: Attacked, login: bool) -> None:
    with imap(attacked, login=login) as w:
        nested = b"(" * 10_000 + b")" * 10_000
        command = b"SEARCH " + nested if login else b"ID " + nested
        if login:
            assert tagged(w, b"SELECT INBOX", b"s").startswith(b"s OK")
        assert tagged(w, command).startswith(b"t BAD")
        assert tagged(w, b"NOOP", b"n").startswith(b"n OK")


# -- names -----------------------------------------------------------------------------------

ESCAPES = [
    "../bob", "../../../../../tmp/escaped", "INBOX/../../bob", "foo/../../../bob", "..", ".",
    "/etc/escaped", "~bob/escaped", "../bob/.Sent", ".hidden/../..", "a\\..\\..\\b", "INBOX/..",
]  # fmt: skip


@pytest.mark.parametrize("name", ESCAPES)
def test_mailbox_names_stay_in_the_users_maildir(attacked: Attacked, name: str) -> None:
    env = attacked.env
    quoted = b'"' + name.replace("\\", "\\\\").encode() + b'"'
    with imap(attacked, login=True) as w:
        # After the login, which makes alice's Maildir (and its parents when she is the first).
        before = sorted(p for p in env.data_dir.rglob("*") if "alice" not in p.parts)
        for command in (b"CREATE ", b"SELECT ", b"APPEND "):
            tail = b" {1+}\r\nx" if command == b"APPEND " else b""
            reply = tagged(w, command + quoted + tail)
            if reply.startswith(b"t OK"):  # a name read as a plain folder inside the Maildir
                assert command != b"SELECT " or name not in ("..", ".")
        for path in env.mailbox(ALICE).rglob("*"):
            assert path.resolve().is_relative_to(env.mailbox(ALICE).resolve()), path
    after = sorted(p for p in env.data_dir.rglob("*") if "alice" not in p.parts)
    assert [p for p in after if p not in before and "auth.sqlite3" not in p.name] == []


@pytest.mark.parametrize(
    "user",
    ["../bob@example.test", "alice@example.test/../bob", "alice/../../x@example.test",
     "alice@../example.test", "alice@example.test\x00", "*@example.test", "%@example.test"],
)  # fmt: skip
def test_user_names_that_leave_their_directory_never_log_in(attacked: Attacked, user: str) -> None:
    with imap(attacked) as w:
        literal = user.encode()
        w.send(b"t LOGIN {%d+}\r\n" % len(literal) + literal + f' "{PASSWORD}"\r\n'.encode())
        reply = w.until(b"t ")[-1]
        assert reply.startswith((b"t NO", b"t BAD")), reply
    assert (
        not (attacked.env.data_dir / "mail" / "example.test" / "..")
        .resolve()
        .joinpath("bob")
        .exists()
    )


SPELLINGS = [
    (ALICE, "ALICE@EXAMPLE.TEST"),
    (ALICE, "Alice@Example.Test"),
    ("zo\u00eb@example.test", "zoe\u0308@example.test"),  # NFD
    ("zo\u00eb@example.test", "ZO\u00cb@EXAMPLE.TEST"),
]


@pytest.mark.parametrize(("account", "spelling"), SPELLINGS)
def test_user_names_differing_in_case_or_normalisation_are_one_account(
    attacked: Attacked, account: str, spelling: str
) -> None:
    mark = f"t{len(spelling)}{spelling.encode().hex()[:16]}".encode()
    with imap(attacked) as w:
        name = spelling.encode()
        w.send(b"t LOGIN {%d+}\r\n" % len(name) + name + f' "{PASSWORD}"\r\n'.encode())
        assert w.until(b"t ")[-1].startswith(b"t OK")
        assert tagged(w, b"APPEND INBOX {%d+}\r\n" % len(mark) + mark).startswith(b"t OK")
    # the message is in the one account's Maildir, whatever the spelling
    box = attacked.env.mailbox(account)
    found = [*box.glob("new/*"), *box.glob("cur/*")]
    assert any(mark == p.read_bytes() for p in found)
    with pop3(attacked) as w:
        assert pop3_line(w, b"USER " + spelling.encode()).startswith(b"+OK")
        assert pop3_line(w, f"PASS {PASSWORD}".encode()).startswith(b"+OK")


def test_mailbox_names_differing_in_normalisation_stay_apart(attacked: Attacked) -> None:
    """mailstore's documented rule: names are not normalised, so two spellings are two
    mailboxes: each its own folder on disk, neither reaching into the other."""
    nfc = unicodedata.normalize("NFC", "Caf\u00e9 Norm")
    nfd = unicodedata.normalize("NFD", nfc)
    assert nfc != nfd
    with imap(attacked, login=True) as w:
        assert tagged(w, b"ENABLE UTF8=ACCEPT", b"e").startswith(b"e OK")
        assert tagged(w, f'CREATE "{nfc}"'.encode()).startswith(b"t OK")
        assert tagged(w, f'CREATE "{nfd}"'.encode()).startswith(b"t OK")
        assert tagged(w, f'APPEND "{nfd}" {{3+}}\r\nnfd'.encode()).startswith(b"t OK")
        w.send(f'x STATUS "{nfc}" (MESSAGES)\r\n'.encode())
        assert b"MESSAGES 0" in b"".join(w.until(b"x "))
        w.send(b'l LIST "" "Caf*"\r\n')
        lines = w.until(b"l ")
        assert len([x for x in lines if x.startswith(b"* LIST")]) == 2, lines
        assert tagged(w, b'CREATE "inbox"').startswith(b"t NO")  # INBOX in any case is INBOX
        for name in (nfc, nfd):
            assert tagged(w, f'DELETE "{name}"'.encode()).startswith(b"t OK")
