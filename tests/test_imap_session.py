"""Transcript tests of the sans-IO IMAP session: every command in every state, bytes in, bytes out.

The store is ``tests.imap_fake_store.FakeStore`` (in memory); ``test_imap_realstore`` runs a
selection of these against the real Maildir store.
"""

from __future__ import annotations

import ast
import base64
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailroom.errors import StoreError
from mailroom.imap.session import IMAPSession, State
from mailroom.imap.wire import Atom, Value
from mailroom.mailstore import MessageInfo
from mailroom.mime import Section
from tests.imap_fake_store import FakeStore
from tests.imap_transcript import PASSWORD, Conversation, conversation, fill, make_config, message

CAPS_AUTH = (
    "IMAP4rev1 IMAP4rev2 SASL-IR LITERAL- ID ENABLE IDLE NAMESPACE UNSELECT UIDPLUS MOVE "
    "SPECIAL-USE CREATE-SPECIAL-USE CHILDREN LIST-EXTENDED LIST-STATUS STATUS=SIZE ESEARCH SEARCHRES "
    "CONDSTORE QRESYNC BINARY QUOTA QUOTA=RES-STORAGE APPENDLIMIT=67108864 UTF8=ACCEPT "
    "COMPRESS=DEFLATE"
)

PLAIN = base64.b64encode(b"\0alice@example.test\0" + PASSWORD.encode()).decode()
PLAIN_AUTHZ = base64.b64encode(
    b"alice@example.test\0alice@example.test\0" + PASSWORD.encode()
).decode()
PLAIN_OTHER = base64.b64encode(
    b"bob@example.test\0alice@example.test\0" + PASSWORD.encode()
).decode()


def selected(count: int = 3) -> tuple[Conversation, FakeStore]:
    store = FakeStore()
    fill(store, count)
    conv = conversation(store)
    conv.send(b"S1 SELECT INBOX\r\n")
    conv.pending.clear()
    return conv, store


# -- sans-IO ---------------------------------------------------------------------------------------

CORE = ["wire", "parser", "search", "session"]


@pytest.mark.parametrize("module", CORE)
def test_core_modules_import_no_io(module: str) -> None:
    """Principle 1: the protocol core imports no asyncio, socket, sqlite3 or dns."""
    path = Path(__file__).parent.parent / "mailroom" / "imap" / f"{module}.py"
    tree = ast.parse(path.read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & {"asyncio", "socket", "sqlite3", "dns", "ssl", "selectors"}


def test_core_loads_no_io_modules() -> None:
    code = (
        "import sys; import mailroom.imap.session, mailroom.imap.search, mailroom.imap.parser;"
        "print(sorted(m for m in ('asyncio', 'sqlite3', 'dns') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- greeting, CAPABILITY, STARTTLS, LOGIN -----------------------------------------------------------


def test_greeting_on_993_offers_auth() -> None:
    session = IMAPSession(make_config(FakeStore()))
    greeting = session.greeting().decode()
    assert greeting.startswith("* OK [CAPABILITY IMAP4rev1 IMAP4rev2 AUTH=PLAIN AUTH=LOGIN SASL-IR")
    assert "LOGINDISABLED" not in greeting and "STARTTLS" not in greeting
    assert "COMPRESS" not in greeting  # only after authentication
    assert session.timeout == 60


def test_before_tls_on_143_login_is_disabled() -> None:
    conv = conversation(login=False, implicit_tls=False, starttls_available=True)
    greeting = conv.session.greeting().decode()
    assert "STARTTLS LOGINDISABLED" in greeting and "AUTH=" not in greeting
    conv.run(f"""
        C: a0 LOGIN alice@example.test {PASSWORD}
        S: a0 NO [PRIVACYREQUIRED] Use STARTTLS or port 993 first
        C: a1 LOGIN alice@example.test "{PASSWORD}"
        S: a1 NO [PRIVACYREQUIRED] Use STARTTLS or port 993 first
        C: a2 AUTHENTICATE PLAIN {PLAIN}
        S: a2 NO [PRIVACYREQUIRED] Use STARTTLS or port 993 first
        C: a3 CAPABILITY
        S: * CAPABILITY IMAP4rev1 IMAP4rev2 STARTTLS LOGINDISABLED SASL-IR *
        S: a3 OK CAPABILITY completed
    """)
    assert conv.session.state is State.NOT_AUTHENTICATED


def test_starttls_drops_injected_commands() -> None:
    """RFC 9051 6.2.1: nothing sent behind STARTTLS in the clear is executed."""
    conv = conversation(login=False, implicit_tls=False, starttls_available=True)
    out = conv.send(f'a1 STARTTLS\r\na2 LOGIN alice@example.test "{PASSWORD}"\r\n'.encode())
    assert out.data == b"a1 OK Begin TLS negotiation now\r\n"
    assert out.action == "starttls"
    conv.pending.clear()
    conv.session.tls_started()
    assert conv.session.state is State.NOT_AUTHENTICATED
    conv.run(f"""
        C: a3 CAPABILITY
        S: * CAPABILITY IMAP4rev1 IMAP4rev2 AUTH=PLAIN AUTH=LOGIN SASL-IR *
        S: a3 OK CAPABILITY completed
        C: a4 STARTTLS
        S: a4 BAD TLS is already active
        C: a5 LOGIN alice@example.test "{PASSWORD}"
        S: a5 OK [CAPABILITY {CAPS_AUTH}] Logged in
    """)


def test_starttls_unavailable() -> None:
    conv = conversation(login=False, implicit_tls=False, starttls_available=False)
    assert "STARTTLS" not in conv.session.greeting().decode()
    conv.run("""
        C: a1 STARTTLS
        S: a1 BAD TLS is not available
    """)


def test_login_with_literals_as_in_style_md() -> None:
    conv = conversation(login=False)
    conv.run(f"""
        C: a1 LOGIN {{18}}
        S: + Ready for literal data
        C: alice@example.test {{{len(PASSWORD)}}}
        S: + Ready for literal data
        C: {PASSWORD}
        S: a1 OK [CAPABILITY {CAPS_AUTH}] Logged in
    """)
    assert conv.session.state is State.AUTHENTICATED
    assert conv.session.timeout == 30 * 60


def test_login_with_nonsync_literals_rfc7888_example() -> None:
    conv = conversation(login=False)
    out = conv.send(
        f"A001 LOGIN {{18+}}\r\nalice@example.test {{{len(PASSWORD)}+}}\r\n{PASSWORD}\r\n".encode()
    )
    assert out.data.startswith(b"A001 OK [CAPABILITY")


def test_failed_logins_then_bye() -> None:
    conv = conversation(login=False)
    conv.run("""
        C: a1 LOGIN alice@example.test wrong
        S: a1 NO [AUTHENTICATIONFAILED] Authentication failed
        C: a2 LOGIN nobody@example.test wrong
        S: a2 NO [AUTHENTICATIONFAILED] Authentication failed
        C: a3 LOGIN alice@example.test "also wrong"
        S: a3 NO [AUTHENTICATIONFAILED] Authentication failed
        S: * BYE Too many failed logins
    """)
    assert conv.action == "close"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_authenticate_plain_with_initial_response() -> None:
    conv = conversation(login=False)
    conv.run(f"""
        C: a1 AUTHENTICATE PLAIN {PLAIN}
        S: a1 OK [CAPABILITY {CAPS_AUTH}] Logged in
    """)


def test_authenticate_plain_with_continuation() -> None:
    conv = conversation(login=False)
    conv.run(f"""
        C: a1 AUTHENTICATE PLAIN
        S: +
        C: {PLAIN_AUTHZ}
        S: a1 OK [CAPABILITY {CAPS_AUTH}] Logged in
    """)


def test_authenticate_login_mechanism() -> None:
    conv = conversation(login=False)
    conv.run(f"""
        C: a1 AUTHENTICATE LOGIN
        S: + VXNlcm5hbWU6
        C: {b64("alice@example.test")}
        S: + UGFzc3dvcmQ6
        C: {b64(PASSWORD)}
        S: a1 OK [CAPABILITY {CAPS_AUTH}] Logged in
    """)


def test_authenticate_errors() -> None:
    conv = conversation(login=False)
    conv.run(f"""
        C: a1 AUTHENTICATE PLAIN
        S: +
        C: *
        S: a1 BAD Authentication cancelled
        C: a2 AUTHENTICATE PLAIN !!!notbase64
        S: a2 BAD Invalid base64 in the SASL response
        C: a3 AUTHENTICATE PLAIN
        S: +
        C: ####
        S: a3 BAD Invalid base64 in the SASL response
        C: a4 AUTHENTICATE PLAIN {PLAIN_OTHER}
        S: a4 NO [AUTHORIZATIONFAILED] Cannot act as another user
        C: a5 AUTHENTICATE CRAM-MD5
        S: a5 NO Unsupported mechanism CRAM-MD5
        C: a6 AUTHENTICATE PLAIN {b64("no-nuls")}
        S: a6 BAD Malformed PLAIN response
    """)
    assert conv.session.state is State.NOT_AUTHENTICATED


# -- commands in the wrong state, garbage ------------------------------------------------------------


def test_unknown_and_wrong_state_commands() -> None:
    conv = conversation(login=False)
    conv.run("""
        C: a1 FROB
        S: a1 BAD Unknown command FROB
        C: a2 SELECT INBOX
        S: a2 BAD SELECT is not valid in the not authenticated state
        C: a3 FETCH 1 FLAGS
        S: a3 BAD FETCH is not valid in the not authenticated state
        C: a4 NOOP extra
        S: a4 BAD Syntax error: *
    """)
    conv = conversation()
    conv.run(f"""
        C: b1 LOGIN alice@example.test "{PASSWORD}"
        S: b1 BAD LOGIN is not valid in the authenticated state
        C: b2 EXPUNGE
        S: b2 BAD EXPUNGE is not valid in the authenticated state
        C: b3 UID FETCH 1 FLAGS
        S: b3 BAD UID FETCH is not valid in the authenticated state
        C: b4 SELECT INBOX
        S: * 0 EXISTS
        S: * 0 RECENT
        S: * FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)
        S: * OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] Flags that can be stored
        S: * OK [UIDVALIDITY 1000] UIDs valid
        S: * OK [UIDNEXT 1] Predicted next UID
        S: * OK [HIGHESTMODSEQ 1] Highest
        S: b4 OK [READ-WRITE] SELECT completed
        C: b5 ENABLE CONDSTORE
        S: b5 BAD ENABLE is not valid in the selected state
        C: b6 UID FROB 1
        S: b6 BAD Unknown command UID FROB
    """)


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"\x00\x01\x02",
        b"a",
        b"(",
        b"+ LOGIN a b",
        b"a1 NOOP(",
        b"a1 LOGIN{",
        b"a1 ID(",
        b"a1 LOGIN",
        b'a1 LOGIN "unterminated',
        b"a1 SELECT \xff\xfe",
    ],
)
def test_garbage_gets_bad(line: bytes) -> None:
    conv = conversation(login=False)
    out = conv.send(line + b"\r\n")
    assert out.data.endswith(b"\r\n")
    status = out.data.split(b" ")[1]
    assert status == b"BAD", out.data
    assert b"Traceback" not in out.data


def test_garbage_flood_is_disconnected() -> None:
    conv = conversation(login=False)
    out = conv.send(b"x\r\n" * 20)
    assert out.data.count(b"BAD") == 10
    assert out.data.endswith(b"* BYE Too many invalid commands\r\n")
    assert out.action == "close"


def test_http_request_is_disconnected() -> None:
    conv = conversation(login=False)
    out = conv.send(b"GET / HTTP/1.1\r\nHost: mail.example.test\r\n\r\n")
    assert out == type(out)(b"* BYE This is an IMAP server\r\n", "close")
    assert conv.session.feed(b"a1 NOOP\r\n").action == "close"


# -- limits on literals, lines, nesting ---------------------------------------------------------------


@pytest.mark.parametrize("size", ["4294967295", "99999999999999999999", "1025"])
def test_preauth_literal_too_big_refused_before_continuation(size: str) -> None:
    conv = conversation(login=False)
    conv.run(f"""
        C: a1 LOGIN {{{size}}}
        S: a1 BAD [TOOBIG] Literal larger than 1024 octets
        C: a2 NOOP
        S: a2 OK NOOP completed
    """)


def test_huge_digit_string_is_refused() -> None:
    conv = conversation(login=False)
    conv.run(f"""
        C: a1 LOGIN {{{"9" * 5000}}}
        S: a1 BAD [TOOBIG] Literal larger than 1024 octets
    """)


@pytest.mark.parametrize("marker", ["{-1}", "{}", "{1x}", "{+}"])
def test_malformed_literal_markers_get_bad_without_continuation(marker: str) -> None:
    conv = conversation(login=False)
    conv.run(f"""
        C: a1 LOGIN {marker}
        S: a1 BAD Syntax error: *
    """)


def test_nonsync_literal_over_literal_minus_limit_closes() -> None:
    """RFC 7888 5: LITERAL- non-synchronizing literals are at most 4096 octets."""
    conv = conversation()
    out = conv.send(b"a1 APPEND INBOX {5000+}\r\n" + b"x" * 100)
    assert out.data == (
        b"a1 BAD [TOOBIG] Non-synchronizing literal larger than 4096 octets\r\n"
        b"* BYE [TOOBIG] Cannot continue after a refused non-synchronizing literal\r\n"
    )
    assert out.action == "close"


def test_nonsync_literal_preauth_limit() -> None:
    conv = conversation(login=False)
    out = conv.send(b"a1 LOGIN {2000+}\r\n")
    assert out.data.startswith(b"a1 BAD [TOOBIG] Non-synchronizing literal larger than 1024")
    assert out.action == "close"


def test_append_over_limit_gets_toobig_before_continuation() -> None:
    store = FakeStore()
    conv = conversation(store, max_literal=1000)
    conv.run("""
        C: a1 APPEND INBOX {1001}
        S: a1 NO [TOOBIG] Message larger than 1000 octets
        C: a2 APPEND INBOX {1000}
        S: + Ready for literal data
    """)
    conv.send(b"x" * 998 + b"\r\n\r\n")
    assert conv.pending == ["a2 OK [APPENDUID 1000 1] APPEND completed"]
    assert store.folders["INBOX"].bodies[1] == b"x" * 998 + b"\r\n"


def test_literal_in_other_commands_capped_at_line_limit() -> None:
    conv = conversation(max_line=2000)
    conv.run("""
        C: a1 SELECT {2001}
        S: a1 BAD [TOOBIG] Literal larger than 2000 octets
    """)


def test_line_too_long() -> None:
    conv = conversation(login=False, max_line=100)
    out = conv.send(b"a1 LOGIN " + b"x" * 200)
    assert out.data == b"a1 BAD Command line too long\r\n"
    out = conv.send(b"y" * 200 + b"\r\na2 NOOP\r\n")  # the rest of the long line is skipped
    assert out.data == b"a2 OK NOOP completed\r\n"


def test_ten_thousand_nested_parentheses() -> None:
    conv, _ = selected()
    out = conv.send(b"a1 SEARCH " + b"(" * 10_000 + b"ALL" + b")" * 10_000 + b"\r\n")
    assert out.data == b"a1 BAD Syntax error: parentheses nested deeper than 100\r\n"
    out = conv.send(b"a2 SEARCH " + b"(" * 50 + b"ALL" + b")" * 50 + b"\r\n")
    assert out.data.startswith(b"* ESEARCH") or out.data.startswith(b"* SEARCH 1 2 3")


def test_not_nested_deeply_but_deep_or_chain_is_capped() -> None:
    conv, _ = selected()
    out = conv.send(b"a1 SEARCH " + b"NOT " * 5000 + b"ALL\r\n")
    assert out.data == b"a1 BAD Syntax error: search keys nested deeper than 100\r\n"
    out = conv.send(b"a2 SEARCH " + b"ALL " * 1500 + b"ALL\r\n")
    assert out.data == b"a2 BAD Syntax error: more than 1000 search keys\r\n"


def test_long_lists_are_capped() -> None:
    conv, _ = selected()
    flags = " ".join(f"k{i}" for i in range(10_001))
    out = conv.send(f"a1 STORE 1 +FLAGS ({flags})\r\n".encode())
    assert out.data == b"a1 BAD Syntax error: more than 10000 elements in a list\r\n"
    numbers = ",".join(str(i) for i in range(1, 10_003))
    out = conv.send(f"a2 UID FETCH {numbers} FLAGS\r\n".encode())
    assert out.data == b"a2 BAD Syntax error: more than 10000 ranges in a sequence set\r\n"


def test_partial_input_is_buffered() -> None:
    conv = conversation(login=False)
    assert conv.send(b"a1 NO").data == b""
    assert conv.send(b"OP\r").data == b""
    assert (
        conv.send(b"\na2 NOOP\r\na3 CAPA").data
        == b"a1 OK NOOP completed\r\na2 OK NOOP completed\r\n"
    )


# -- mailbox names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        '".."',
        '"../x"',
        '"a/../b"',
        '"/x"',
        '"a//b"',
        '"a/"' + "",
        '".hidden"',
        '"a\x01b"',
        '"a\x7fb"',
        '"x*"',
        '"x%"',
    ],
)
@pytest.mark.parametrize("utf8", [False, True])
def test_mailbox_names_that_could_escape_are_refused(name: str, utf8: bool) -> None:
    conv = conversation()
    if utf8:  # names are not modified UTF-7 then: only the session's own check stops them
        conv.send(b"e ENABLE UTF8=ACCEPT\r\n")
    out = conv.send(f"a1 CREATE {name}\r\n".encode())
    if name == '"a/"':  # RFC 9051 6.3.4: the trailing delimiter is dropped; "a" is fine
        assert out.data.endswith(b"a1 OK CREATE completed\r\n")
        return
    if utf8 or ("\x01" not in name and "\x7f" not in name):
        assert out.data.split(b"\r\n")[-2].startswith(b"a1 NO [CANNOT]"), out.data
    else:  # not modified UTF-7 either
        assert out.data.startswith(b"a1 BAD"), out.data
    store = conv.session.store
    assert isinstance(store, FakeStore)
    assert set(store.folders) == {"INBOX", "Sent", "Drafts", "Trash", "Junk", "Archive"}


def test_nul_in_mailbox_name_is_bad() -> None:
    conv = conversation()
    assert conv.send(b'a1 CREATE "a\x00b"\r\n').data.startswith(b"a1 BAD")
    assert conv.send(b"a2 CREATE {3}\r\n").data == b"+ Ready for literal data\r\n"
    assert conv.send(b"a\x00b\r\n").data == b"a2 BAD Syntax error: NUL in a literal\r\n"


def test_rename_and_delete_refuse_escaping_names() -> None:
    conv = conversation()
    conv.run("""
        C: a1 RENAME Sent ../Sent
        S: a1 NO [CANNOT] Invalid mailbox name '../Sent'
        C: a2 DELETE /etc
        S: a2 NO [CANNOT] Invalid mailbox name '/etc'
        C: a3 DELETE INBOX
        S: a3 NO [CANNOT] INBOX cannot be deleted
    """)


def test_modified_utf7_names() -> None:
    conv = conversation()
    conv.run("""
        C: a1 CREATE "Entw&APw-rfe"
        S: a1 OK CREATE completed
        C: a2 CREATE "bad&Jjo"
        S: a2 BAD Syntax error: *
        C: a3 LIST "" "Entw*"
        S: * LIST (\\HasNoChildren) "/" "Entw&APw-rfe"
        S: a3 OK LIST completed
    """)
    store = conv.session.store
    assert isinstance(store, FakeStore)
    assert "Entwürfe" in store.folders


def test_utf8_accept_names() -> None:
    """RFC 6855 3: after ENABLE UTF8=ACCEPT names are UTF-8 on the wire."""
    conv = conversation()
    conv.run("""
        C: a1 ENABLE UTF8=ACCEPT
        S: * ENABLED UTF8=ACCEPT
        S: a1 OK ENABLE completed
        C: a2 CREATE "Entwürfe"
        S: a2 OK CREATE completed
        C: a3 LIST "" "Entw*"
        S: * LIST (\\HasNoChildren) "/" "Entwürfe"
        S: a3 OK LIST completed
    """)


def test_inbox_is_case_insensitive() -> None:
    store = FakeStore()
    fill(store, 2)
    conv = conversation(store)
    conv.run("""
        C: a1 STATUS inbox (MESSAGES)
        S: * STATUS "INBOX" (MESSAGES 2)
        S: a1 OK STATUS completed
        C: a2 EXAMINE InBoX
        S: * 2 EXISTS
        S: * 0 RECENT
        S: * OK [UNSEEN 1] First unseen
        S: * FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)
        S: * OK [PERMANENTFLAGS ()] Flags that can be stored
        S: * OK [UIDVALIDITY 1000] UIDs valid
        S: * OK [UIDNEXT 3] Predicted next UID
        S: * OK [HIGHESTMODSEQ 3] Highest
        S: a2 OK [READ-ONLY] EXAMINE completed
        C: a3 CREATE inbox
        S: a3 NO [ALREADYEXISTS] INBOX exists
    """)


# -- mailbox management ------------------------------------------------------------------------------


def test_create_delete_rename_subscribe() -> None:
    conv = conversation()
    conv.run("""
        C: a1 CREATE Projects/2026
        S: a1 OK CREATE completed
        C: a2 CREATE Projects/2026
        S: a2 NO [ALREADYEXISTS] Projects/2026 exists
        C: a3 RENAME Projects/2026 Projects/Done
        S: a3 OK RENAME completed
        C: a4 RENAME Nope Other
        S: a4 NO [NONEXISTENT] No mailbox Nope
        C: a5 SUBSCRIBE Projects/Done
        S: a5 OK SUBSCRIBE completed
        C: a6 LSUB "" "Pro*"
        S: * LSUB () "/" "Projects/Done"
        S: a6 OK LSUB completed
        C: a7 LSUB "" "%"
        S: * LSUB () "/" "INBOX"
        S: * LSUB () "/" "Archive"
        S: * LSUB () "/" "Drafts"
        S: * LSUB () "/" "Junk"
        S: * LSUB () "/" "Sent"
        S: * LSUB () "/" "Trash"
        S: * LSUB (\\Noselect) "/" "Projects"
        S: a7 OK LSUB completed
        C: a8 UNSUBSCRIBE Projects/Done
        S: a8 OK UNSUBSCRIBE completed
        C: a9 DELETE Projects/Done
        S: a9 OK DELETE completed
        C: b1 DELETE Projects/Done
        S: b1 NO [NONEXISTENT] No mailbox Projects/Done
        C: b2 SUBSCRIBE Nope
        S: b2 NO [NONEXISTENT] No mailbox Nope
    """)


def test_create_special_use() -> None:
    """RFC 6154 5.4 example."""
    conv = conversation()
    conv.run("""
        C: t1 CREATE "Important Messages" (USE (\\Flagged))
        S: t1 OK CREATE completed
        C: t2 CREATE "Other" (USE (\\Frob))
        S: t2 NO [USEATTR] Unknown special use \\Frob
        C: t3 LIST (SPECIAL-USE) "" "*"
        S: * LIST (\\HasNoChildren \\Subscribed \\Archive) "/" "Archive"
        S: * LIST (\\HasNoChildren \\Subscribed \\Drafts) "/" "Drafts"
        S: * LIST (\\HasNoChildren \\Flagged) "/" "Important Messages"
        S: * LIST (\\HasNoChildren \\Subscribed \\Junk) "/" "Junk"
        S: * LIST (\\HasNoChildren \\Subscribed \\Sent) "/" "Sent"
        S: * LIST (\\HasNoChildren \\Subscribed \\Trash) "/" "Trash"
        S: t3 OK LIST completed
    """)


def test_list_basic_and_patterns() -> None:
    conv = conversation()
    conv.send(b"c1 CREATE a/b/c\r\nc2 CREATE a/b\r\n")
    conv.pending.clear()
    conv.run("""
        C: a1 LIST "" ""
        S: * LIST (\\Noselect) "/" ""
        S: a1 OK LIST completed
        C: a2 LIST "" %
        S: * LIST (\\HasNoChildren \\Subscribed) "/" "INBOX"
        S: * LIST (\\HasNoChildren \\Subscribed \\Archive) "/" "Archive"
        S: * LIST (\\HasNoChildren \\Subscribed \\Drafts) "/" "Drafts"
        S: * LIST (\\HasNoChildren \\Subscribed \\Junk) "/" "Junk"
        S: * LIST (\\HasNoChildren \\Subscribed \\Sent) "/" "Sent"
        S: * LIST (\\HasNoChildren \\Subscribed \\Trash) "/" "Trash"
        S: * LIST (\\Noselect \\HasChildren) "/" "a"
        S: a2 OK LIST completed
        C: a3 LIST a/ *
        S: * LIST (\\HasChildren) "/" "a/b"
        S: * LIST (\\HasNoChildren) "/" "a/b/c"
        S: a3 OK LIST completed
        C: a4 LIST "" inbox
        S: * LIST (\\HasNoChildren \\Subscribed) "/" "INBOX"
        S: a4 OK LIST completed
        C: a5 LIST "" ("Sent" "Trash")
        S: * LIST (\\HasNoChildren \\Subscribed \\Sent) "/" "Sent"
        S: * LIST (\\HasNoChildren \\Subscribed \\Trash) "/" "Trash"
        S: a5 OK LIST completed
    """)


def test_list_extended_subscribed_recursivematch() -> None:
    """RFC 5258 5: SUBSCRIBED selection; RECURSIVEMATCH reports CHILDINFO."""
    conv = conversation()
    conv.send(b"c1 CREATE Foo\r\nc2 CREATE Foo/Bar\r\nc3 SUBSCRIBE Foo/Bar\r\n")
    conv.pending.clear()
    conv.run("""
        C: a1 LIST (SUBSCRIBED) "" "Foo*"
        S: * LIST (\\HasNoChildren \\Subscribed) "/" "Foo/Bar"
        S: a1 OK LIST completed
        C: a2 LIST (SUBSCRIBED RECURSIVEMATCH) "" "Foo"
        S: * LIST (\\HasChildren) "/" "Foo" ("CHILDINFO" ("SUBSCRIBED"))
        S: a2 OK LIST completed
        C: a5 LIST (SUBSCRIBED RECURSIVEMATCH) "" "Fo*"
        S: * LIST (\\HasNoChildren \\Subscribed) "/" "Foo/Bar"
        S: * LIST (\\HasChildren) "/" "Foo" ("CHILDINFO" ("SUBSCRIBED"))
        S: a5 OK LIST completed
        C: a3 LIST (RECURSIVEMATCH) "" "%"
        S: a3 BAD Syntax error: RECURSIVEMATCH needs another selection option
        C: a4 LIST (FROB) "" "%"
        S: a4 BAD Syntax error: unknown LIST selection option FROB
    """)


def test_list_status() -> None:
    """RFC 5819 2: LIST ... RETURN (STATUS (...))."""
    store = FakeStore()
    fill(store, 2)
    conv = conversation(store)
    conv.run("""
        C: a1 LIST "" "INBOX" RETURN (CHILDREN STATUS (MESSAGES UNSEEN SIZE))
        S: * LIST (\\HasNoChildren \\Subscribed) "/" "INBOX"
        S: * STATUS "INBOX" (MESSAGES 2 UNSEEN 2 SIZE 316)
        S: a1 OK LIST completed
        C: a2 LIST "" "INBOX" RETURN (STATUS (FROB))
        S: a2 BAD Syntax error: unknown STATUS item FROB
    """)


def test_namespace_id_noop_check() -> None:
    conv = conversation()
    conv.run("""
        C: a1 NAMESPACE
        S: * NAMESPACE (("" "/")) NIL NIL
        S: a1 OK NAMESPACE completed
        C: a2 ID ("name" "sodr" "version" "19.34")
        S: * ID ("name" "mailroom")
        S: a2 OK ID completed
        C: a3 ID NIL
        S: * ID ("name" "mailroom")
        S: a3 OK ID completed
        C: a4 ID ("name")
        S: a4 BAD Syntax error: ID takes up to 30 field-value pairs
        C: a5 NOOP
        S: a5 OK NOOP completed
        C: a6 CHECK
        S: a6 BAD CHECK is not valid in the authenticated state
    """)


def test_status_items() -> None:
    store = FakeStore()
    fill(store, 3, m1=frozenset({"\\Seen"}), m2=frozenset({"\\Deleted"}))
    conv = conversation(store)
    conv.run("""
        C: a1 STATUS INBOX (MESSAGES UIDNEXT UIDVALIDITY UNSEEN DELETED SIZE HIGHESTMODSEQ RECENT APPENDLIMIT)
        S: * STATUS "INBOX" (MESSAGES 3 UIDNEXT 4 UIDVALIDITY 1000 UNSEEN 2 DELETED 1 SIZE 474 HIGHESTMODSEQ 4 RECENT 0 APPENDLIMIT 67108864)
        S: a1 OK STATUS completed
        C: a2 STATUS Nope (MESSAGES)
        S: a2 NO [NONEXISTENT] No mailbox Nope
        C: a3 STATUS INBOX ()
        S: a3 BAD Syntax error: empty list
    """)


# -- APPEND ------------------------------------------------------------------------------------------


def test_append_with_flags_and_date() -> None:
    store = FakeStore()
    conv = conversation(store)
    raw = message("Appended")
    conv.run(f"""
        C: a1 APPEND Drafts (\\Draft $Label) "05-Nov-2026 10:11:12 +0100" {{{len(raw)}}}
        S: + Ready for literal data
    """)
    conv.send(raw + b"\r\n")
    conv.run("""
        S: a1 OK [APPENDUID 1002 1] APPEND completed
        C: a2 APPEND Nope {3+}
        C: abc
        S: a2 NO [TRYCREATE] No mailbox Nope
        C: a3 APPEND INBOX {0}
        S: + Ready for literal data
        C:
        S: a3 NO Empty message
    """)
    info = store.folders["Drafts"].messages[1]
    assert info.flags == {"\\Draft", "$Label"}
    assert info.internaldate.isoformat() == "2026-11-05T10:11:12+01:00"
    assert store.folders["Drafts"].bodies[1] == raw


def test_append_over_quota() -> None:
    store = FakeStore(quota_bytes=10)
    conv = conversation(store)
    conv.run("""
        C: a1 APPEND INBOX {20+}
        C: 01234567890123456789
        S: a1 NO [OVERQUOTA] Quota exceeded
    """)


def test_append_bare_lf_becomes_crlf_and_literal8() -> None:
    store = FakeStore()
    conv = conversation(store)
    out = conv.send(b"a1 APPEND INBOX ~{13+}\r\nSubject: x\n\nb\r\n")
    assert out.data == b"a1 OK [APPENDUID 1000 1] APPEND completed\r\n"
    assert store.folders["INBOX"].bodies[1] == b"Subject: x\r\n\r\nb"


def test_append_to_selected_mailbox_announces_exists() -> None:
    conv, _ = selected(2)
    conv.run("""
        C: a1 APPEND INBOX {5+}
        C: hello
        S: * 3 EXISTS
        S: * 1 RECENT
        S: a1 OK [APPENDUID 1000 3] APPEND completed
    """)


def test_append_bad_date() -> None:
    conv = conversation()
    conv.run("""
        C: a1 APPEND INBOX "31-Feb-2026 10:11:12 +0100" {5+}
        C: hello
        S: a1 BAD Syntax error: bad date-time '31-Feb-2026 10:11:12 +0100'
    """)


# -- SELECT / EXAMINE / CLOSE / UNSELECT -------------------------------------------------------------


def test_select_reports_state() -> None:
    store = FakeStore()
    fill(store, 3, m1=frozenset({"\\Seen", "$Work"}))
    store.append("INBOX", message("new"))
    conv = conversation(store)
    conv.run("""
        C: a1 SELECT INBOX
        S: * 4 EXISTS
        S: * 1 RECENT
        S: * OK [UNSEEN 2] First unseen
        S: * FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Work)
        S: * OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Work \\*)] Flags that can be stored
        S: * OK [UIDVALIDITY 1000] UIDs valid
        S: * OK [UIDNEXT 5] Predicted next UID
        S: * OK [HIGHESTMODSEQ 5] Highest
        S: a1 OK [READ-WRITE] SELECT completed
        C: a2 FETCH 3:4 FLAGS
        S: * 3 FETCH (FLAGS ())
        S: * 4 FETCH (FLAGS (\\Recent))
        S: a2 OK FETCH completed
        C: a3 SELECT Nope
        S: * OK [CLOSED] Previous mailbox closed
        S: a3 NO [NONEXISTENT] No mailbox Nope
    """)
    assert conv.session.state is State.AUTHENTICATED


def test_select_imap4rev2() -> None:
    """RFC 9051 6.3.2: no RECENT or UNSEEN, a LIST response."""
    store = FakeStore()
    fill(store, 1)
    conv = conversation(store)
    conv.run("""
        C: a1 ENABLE IMAP4rev2
        S: * ENABLED IMAP4rev2
        S: a1 OK ENABLE completed
        C: a2 SELECT INBOX
        S: * 1 EXISTS
        S: * FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)
        S: * OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] Flags that can be stored
        S: * OK [UIDVALIDITY 1000] UIDs valid
        S: * OK [UIDNEXT 2] Predicted next UID
        S: * OK [HIGHESTMODSEQ 2] Highest
        S: * LIST () "/" "INBOX"
        S: a2 OK [READ-WRITE] SELECT completed
        C: a3 SEARCH ALL
        S: * ESEARCH (TAG "a3") ALL 1
        S: a3 OK SEARCH completed
    """)


def test_examine_is_read_only() -> None:
    store = FakeStore()
    fill(store, 2, m1=frozenset({"\\Deleted"}))
    conv = conversation(store)
    conv.send(b"a1 EXAMINE INBOX\r\n")
    conv.pending.clear()
    conv.run("""
        C: a2 STORE 1 +FLAGS (\\Seen)
        S: a2 NO [READ-ONLY] Mailbox is read-only
        C: a3 EXPUNGE
        S: a3 NO [READ-ONLY] Mailbox is read-only
        C: a4 FETCH 2 BODY[TEXT]
        S: * 2 FETCH (BODY[TEXT] {16}
        S: Body number 2.
        S: )
        S: a4 OK FETCH completed
        C: a5 CLOSE
        S: a5 OK CLOSE completed
    """)
    assert store.folders["INBOX"].messages[2].flags == frozenset()  # EXAMINE: BODY[] sets no \Seen
    assert sorted(store.folders["INBOX"].messages) == [1, 2]  # CLOSE after EXAMINE expunges nothing


def test_close_expunges_silently_unselect_does_not() -> None:
    store = FakeStore()
    fill(store, 3, m1=frozenset({"\\Deleted"}), m3=frozenset({"\\Deleted"}))
    conv = conversation(store)
    conv.send(b"a1 SELECT INBOX\r\n")
    conv.pending.clear()
    conv.run("""
        C: a2 UNSELECT
        S: a2 OK UNSELECT completed
        C: a3 UNSELECT
        S: a3 BAD UNSELECT is not valid in the authenticated state
    """)
    assert sorted(store.folders["INBOX"].messages) == [1, 2, 3]
    conv.send(b"a4 SELECT INBOX\r\n")
    conv.pending.clear()
    conv.run("""
        C: a5 CLOSE
        S: a5 OK CLOSE completed
    """)
    assert sorted(store.folders["INBOX"].messages) == [2]
    assert conv.session.state is State.AUTHENTICATED


# -- FETCH -------------------------------------------------------------------------------------------


def test_fetch_simple_items_and_macros() -> None:
    conv, _ = selected(2)
    conv.run("""
        C: a1 FETCH 1:* (FLAGS UID RFC822.SIZE INTERNALDATE)
        S: * 1 FETCH (FLAGS () UID 1 RFC822.SIZE 158 INTERNALDATE " 1-Nov-2026 12:00:00 +0000")
        S: * 2 FETCH (FLAGS () UID 2 RFC822.SIZE 158 INTERNALDATE " 2-Nov-2026 12:00:00 +0000")
        S: a1 OK FETCH completed
        C: a2 FETCH 2 FAST
        S: * 2 FETCH (FLAGS () INTERNALDATE " 2-Nov-2026 12:00:00 +0000" RFC822.SIZE 158)
        S: a2 OK FETCH completed
        C: a3 UID FETCH 2 FLAGS
        S: * 2 FETCH (UID 2 FLAGS ())
        S: a3 OK FETCH completed
        C: a4 UID FETCH 7:9 FLAGS
        S: a4 OK FETCH completed
        C: a5 UID FETCH 3:* FLAGS
        S: * 2 FETCH (UID 2 FLAGS ())
        S: a5 OK FETCH completed
        C: a6 FETCH 3 FLAGS
        S: a6 BAD Invalid message sequence number 3
        C: a7 FETCH 1 (FROB)
        S: a7 BAD Syntax error: unknown FETCH item FROB
        C: a8 FETCH 1 BODY[FROB]
        S: a8 BAD Syntax error: bad section text FROB
    """)


def test_fetch_body_sections() -> None:
    conv, store = selected(1)
    raw = store.folders["INBOX"].bodies[1]
    header, _, text = raw.partition(b"\r\n\r\n")
    out = conv.send(b"a1 FETCH 1 (BODY.PEEK[] BODY.PEEK[HEADER] BODY.PEEK[TEXT])\r\n")
    assert out.data == (
        b"* 1 FETCH (BODY[] {%d}\r\n%s BODY[HEADER] {%d}\r\n%s\r\n\r\n BODY[TEXT] {16}\r\n%s)\r\n"
        b"a1 OK FETCH completed\r\n" % (len(raw), raw, len(header) + 4, header, text)
    )
    assert store.folders["INBOX"].messages[1].flags == frozenset()  # PEEK does not set \Seen
    assert text == b"Body number 1.\r\n"
    out = conv.send(b"a2 FETCH 1 BODY.PEEK[HEADER.FIELDS (SUBJECT to)]\r\n")
    assert out.data == (
        b"* 1 FETCH (BODY[HEADER.FIELDS (SUBJECT to)] {46}\r\n"
        b"To: alice@example.test\r\nSubject: Message 1\r\n\r\n)\r\na2 OK FETCH completed\r\n"
    )
    out = conv.send(b"a3 FETCH 1 BODY.PEEK[HEADER.FIELDS.NOT (From To Date Message-ID)]\r\n")
    assert out.data == (
        b"* 1 FETCH (BODY[HEADER.FIELDS.NOT (From To Date Message-ID)] {22}\r\n"
        b"Subject: Message 1\r\n\r\n)\r\na3 OK FETCH completed\r\n"
    )


def test_fetch_partial() -> None:
    conv, _ = selected(1)
    conv.run("""
        C: a1 FETCH 1 BODY.PEEK[]<0.10>
        S: * 1 FETCH (BODY[]<0> "From: Bob ")
        S: a1 OK FETCH completed
        C: a2 FETCH 1 BODY.PEEK[TEXT]<5.6>
        S: * 1 FETCH (BODY[TEXT]<5> "number")
        S: a2 OK FETCH completed
        C: a3 FETCH 1 BODY.PEEK[TEXT]<500.6>
        S: * 1 FETCH (BODY[TEXT]<500> "")
        S: a3 OK FETCH completed
        C: a4 FETCH 1 BODY.PEEK[TEXT]<5.0>
        S: a4 BAD Syntax error: expected a number greater than 0
    """)


def test_fetch_body_sets_seen_and_reports_flags() -> None:
    conv, store = selected(2)
    out = conv.send(b"a1 FETCH 1 BODY[TEXT]\r\n")
    assert (
        out.data
        == b"* 1 FETCH (BODY[TEXT] {16}\r\nBody number 1.\r\n FLAGS (\\Seen))\r\na1 OK FETCH completed\r\n"
    )
    assert store.folders["INBOX"].messages[1].flags == {"\\Seen"}
    out = conv.send(b"a2 FETCH 1 BODY[TEXT]\r\n")  # already seen: no FLAGS
    assert (
        out.data
        == b"* 1 FETCH (BODY[TEXT] {16}\r\nBody number 1.\r\n)\r\na2 OK FETCH completed\r\n"
    )
    out = conv.send(b"a3 FETCH 2 RFC822.HEADER\r\n")
    assert b"FLAGS" not in out.data and out.data.startswith(b"* 2 FETCH (RFC822.HEADER {")
    out = conv.send(b"a4 FETCH 2 (FLAGS RFC822)\r\n")
    assert out.data.startswith(b"* 2 FETCH (FLAGS (\\Seen) RFC822 {158}\r\nFrom: Bob")


def test_fetch_reads_each_message_once() -> None:
    conv, store = selected(5)
    before = store.reads
    conv.send(b"a1 FETCH 1:5 (BODY.PEEK[HEADER] BODY.PEEK[TEXT] RFC822.SIZE BODY.PEEK[]<0.5>)\r\n")
    assert store.reads - before == 5
    conv.send(b"a2 FETCH 1:5 (FLAGS RFC822.SIZE UID INTERNALDATE)\r\n")
    assert store.reads - before == 5  # metadata only: no file read


def test_fetch_from_expunged_message_in_another_session() -> None:
    """RFC 9051 7.5.1: no EXPUNGE during FETCH; the message is reported gone at the end."""
    store = FakeStore()
    fill(store, 2, m1=frozenset({"\\Deleted"}))
    one = conversation(store)
    two = conversation(store)
    one.send(b"a SELECT INBOX\r\n")
    two.send(b"a SELECT INBOX\r\n")
    one.pending.clear()
    two.pending.clear()
    two.run("""
        C: b1 EXPUNGE
        S: * 1 EXPUNGE
        S: b1 OK EXPUNGE completed
    """)
    one.run("""
        C: c1 FETCH 1:2 BODY.PEEK[TEXT]
        S: * 2 FETCH (BODY[TEXT] {16}
        S: Body number 2.
        S: )
        S: c1 NO [EXPUNGEISSUED] Some messages were expunged
        C: c2 FETCH 1 FLAGS
        S: * 1 FETCH (FLAGS (\\Deleted))
        S: c2 OK FETCH completed
        C: c3 NOOP
        S: * 1 EXPUNGE
        S: c3 OK NOOP completed
        C: c4 FETCH 1 UID
        S: * 1 FETCH (UID 2)
        S: c4 OK FETCH completed
    """)


# -- STORE ------------------------------------------------------------------------------------------


def test_store_flags() -> None:
    """RFC 9051 6.4.6."""
    conv, store = selected(4)
    conv.run("""
        C: A003 STORE 2:4 +FLAGS (\\Deleted)
        S: * 2 FETCH (FLAGS (\\Deleted))
        S: * 3 FETCH (FLAGS (\\Deleted))
        S: * 4 FETCH (FLAGS (\\Deleted))
        S: A003 OK STORE completed
        C: a2 STORE 2 FLAGS.SILENT (\\Seen $Work)
        S: * FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Work)
        S: * OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Work \\*)] Flags that can be stored
        S: a2 OK STORE completed
        C: a3 STORE 2 -FLAGS $Work
        S: * 2 FETCH (FLAGS (\\Seen))
        S: a3 OK STORE completed
        C: a4 UID STORE 3 +FLAGS (\\Recent \\Answered)
        S: * 3 FETCH (UID 3 FLAGS (\\Answered \\Deleted))
        S: a4 OK STORE completed
        C: a5 STORE 1 +FLAGS (\\Frob)
        S: a5 BAD Syntax error: unknown system flag \\Frob
        C: a6 STORE 1 FROB (\\Seen)
        S: a6 BAD Syntax error: expected FLAGS, +FLAGS or -FLAGS, not FROB
        C: a7 NOOP
        S: a7 OK NOOP completed
    """)
    assert store.folders["INBOX"].messages[2].flags == {"\\Seen"}


def test_store_unchangedsince_rfc7162_example() -> None:
    """RFC 7162 3.1.3: a message changed since gets reported in [MODIFIED]."""
    store = FakeStore()
    fill(store, 3)
    one = conversation(store)
    one.send(b"a SELECT INBOX (CONDSTORE)\r\n")
    one.pending.clear()
    store.store("INBOX", [2], "+", ["$Other"])  # modseq 5 by someone else
    one.run("""
        C: d105 STORE 1:3 (UNCHANGEDSINCE 4) +FLAGS.SILENT (\\Deleted)
        S: * 1 FETCH (MODSEQ (6))
        S: * 3 FETCH (MODSEQ (7))
        S: * FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Other)
        S: * OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Other \\*)] Flags that can be stored
        S: * 2 FETCH (FLAGS ($Other) MODSEQ (5))
        S: d105 OK [MODIFIED 2] STORE completed
    """)


# -- SEARCH -----------------------------------------------------------------------------------------


def search_store() -> FakeStore:
    store = FakeStore()
    store.append("INBOX", message("Lunch", "Pizza at noon", "carol@example.test"), ["\\Seen"],
                 datetime(2026, 11, 1, 9, 0, tzinfo=UTC))  # fmt: skip
    store.append("INBOX", message("Report", "Numbers attached", "dave@example.test"), ["\\Flagged", "$Work"],
                 datetime(2026, 11, 5, 9, 0, tzinfo=UTC))  # fmt: skip
    store.append("INBOX", b"Subject: huge\r\n\r\n" + b"x" * 5000 + b"\r\n", ["\\Deleted"],
                 datetime(2026, 11, 10, 9, 0, tzinfo=UTC))  # fmt: skip
    store.claim_recent("INBOX")
    return store


@pytest.mark.parametrize(
    ("criteria", "result"),
    [
        ("ALL", "1 2 3"),
        ("SEEN", "1"),
        ("UNSEEN", "2 3"),
        ("FLAGGED", "2"),
        ("UNFLAGGED DELETED", "3"),
        ("KEYWORD $Work", "2"),
        ("UNKEYWORD $Work", "1 3"),
        ("ANSWERED", ""),
        ("UNANSWERED UNDRAFT UNDELETED", "1 2"),
        ("DRAFT", ""),
        ("LARGER 1000", "3"),
        ("SMALLER 1000", "1 2"),
        ("BEFORE 5-Nov-2026", "1"),
        ("ON 5-Nov-2026", "2"),
        ('SINCE "5-Nov-2026"', "2 3"),
        ("2:*", "2 3"),
        ("1,3", "1 3"),
        ("*", "3"),
        ("UID 2", "2"),
        ("UID 1:*", "1 2 3"),
        ("NOT SEEN", "2 3"),
        ("OR SEEN FLAGGED", "1 2"),
        ("(SEEN) (LARGER 1)", "1"),
        ("OR (SEEN LARGER 1) DELETED", "1 3"),
        ("NOT (SEEN FLAGGED)", "1 2 3"),
        ("NOT OR SEEN FLAGGED", "3"),
        ("OR NOT SEEN (KEYWORD $Work ALL)", "2 3"),
        ("NEW", ""),
        ("OLD", "1 2 3"),
        ("RECENT", ""),
        ("MODSEQ 3", "2 3 (MODSEQ 4)"),
    ],
)
def test_search_keys_without_parsing_messages(criteria: str, result: str) -> None:
    store = search_store()
    conv = conversation(store, parse_message=_no_mime)
    conv.send(b"a SELECT INBOX\r\n")
    conv.pending.clear()
    conv.run(f"""
        C: s1 SEARCH {criteria}
        S: * SEARCH{" " + result if result else ""}
        S: s1 OK SEARCH completed
    """)


def _no_mime(raw: bytes) -> object:
    raise AssertionError("this search should not parse a message")


def test_uid_search_and_esearch() -> None:
    """RFC 4731 3.1 examples, on our data."""
    store = search_store()
    store.expunge("INBOX")  # UIDs 1, 2 remain
    store.append("INBOX", message("late"))
    conv = conversation(store, parse_message=_no_mime)
    conv.send(b"a SELECT INBOX\r\n")
    conv.pending.clear()
    conv.run("""
        C: A282 SEARCH RETURN (MIN COUNT) FLAGGED SINCE 1-Feb-1994 NOT SEEN
        S: * ESEARCH (TAG "A282") MIN 2 COUNT 1
        S: A282 OK SEARCH completed
        C: A283 SEARCH RETURN () UNDELETED
        S: * ESEARCH (TAG "A283") ALL 1:3
        S: A283 OK SEARCH completed
        C: A284 UID SEARCH RETURN (MIN MAX COUNT ALL) UNSEEN
        S: * ESEARCH (TAG "A284") UID MIN 2 MAX 4 COUNT 2 ALL 2,4
        S: A284 OK SEARCH completed
        C: A285 UID SEARCH RETURN (COUNT) DRAFT
        S: * ESEARCH (TAG "A285") UID COUNT 0
        S: A285 OK SEARCH completed
        C: A286 UID SEARCH SEEN
        S: * SEARCH 1
        S: A286 OK SEARCH completed
        C: A287 SEARCH CHARSET UTF-8 SEEN
        S: * SEARCH 1
        S: A287 OK SEARCH completed
        C: A288 SEARCH CHARSET KOI8-R SEEN
        S: A288 NO [BADCHARSET (UTF-8 US-ASCII)] Unsupported charset
        C: A289 SEARCH FROB
        S: A289 BAD Syntax error: unknown search key FROB
        C: A290 SEARCH RETURN (FROB) ALL
        S: A290 BAD Syntax error: unknown RETURN option FROB
        C: A291 SEARCH BEFORE 30-Feb-2026
        S: A291 BAD Syntax error: bad date '30-Feb-2026'
    """)


# -- COPY, MOVE, EXPUNGE ----------------------------------------------------------------------------


def test_copy_with_copyuid() -> None:
    """RFC 4315 3 example shape."""
    conv, store = selected(4)
    conv.run("""
        C: a1 COPY 2:4 Archive
        S: a1 OK [COPYUID 1005 2,3,4 1,2,3] COPY completed
        C: a2 UID COPY 1 Nope
        S: a2 NO [TRYCREATE] No mailbox Nope
        C: a3 UID COPY 99 Archive
        S: a3 OK COPY completed
    """)
    assert len(store.folders["Archive"].messages) == 3
    assert len(store.folders["INBOX"].messages) == 4


def test_move_rfc6851_example() -> None:
    """RFC 6851 4.3: COPYUID untagged before the expunges."""
    conv, store = selected(4)
    conv.run("""
        C: a UID MOVE 2:3 Trash
        S: * OK [COPYUID 1003 2,3 1,2] Moved
        S: * 3 EXPUNGE
        S: * 2 EXPUNGE
        S: a OK MOVE completed
        C: b MOVE 2 Trash
        S: * OK [COPYUID 1003 4 3] Moved
        S: * 2 EXPUNGE
        S: b OK MOVE completed
        C: c FETCH 1:* UID
        S: * 1 FETCH (UID 1)
        S: c OK FETCH completed
    """)
    assert sorted(store.folders["Trash"].messages) == [1, 2, 3]


def test_expunge_and_uid_expunge() -> None:
    store = FakeStore()
    fill(
        store,
        5,
        m2=frozenset({"\\Deleted"}),
        m3=frozenset({"\\Deleted"}),
        m5=frozenset({"\\Deleted"}),
    )
    conv = conversation(store)
    conv.send(b"a SELECT INBOX\r\n")
    conv.pending.clear()
    conv.run("""
        C: b UID EXPUNGE 3:4
        S: * 3 EXPUNGE
        S: b OK EXPUNGE completed
        C: c EXPUNGE
        S: * 4 EXPUNGE
        S: * 2 EXPUNGE
        S: c OK EXPUNGE completed
        C: d FETCH 1:* UID
        S: * 1 FETCH (UID 1)
        S: * 2 FETCH (UID 4)
        S: d OK FETCH completed
    """)


def test_vanished_with_qresync() -> None:
    store = FakeStore()
    fill(store, 5, m2=frozenset({"\\Deleted"}), m3=frozenset({"\\Deleted"}))
    conv = conversation(store)
    conv.run("""
        C: e ENABLE QRESYNC
        S: * ENABLED QRESYNC
        S: e OK ENABLE completed
    """)
    conv.send(b"a SELECT INBOX\r\n")
    conv.pending.clear()
    conv.run("""
        C: b EXPUNGE
        S: * VANISHED 2:3
        S: b OK [HIGHESTMODSEQ 8] EXPUNGE completed
    """)


# -- updates between sessions, IDLE ------------------------------------------------------------------


def test_other_sessions_changes_are_announced() -> None:
    store = FakeStore()
    fill(store, 2)
    one, two = conversation(store), conversation(store)
    one.send(b"a SELECT INBOX\r\n")
    one.pending.clear()
    store.append("INBOX", message("new one"))
    store.store("INBOX", [1], "+", ["\\Flagged"])
    one.run("""
        C: b NOOP
        S: * 1 FETCH (FLAGS (\\Flagged))
        S: * 3 EXISTS
        S: * 1 RECENT
        S: b OK NOOP completed
    """)
    two.send(b"a SELECT INBOX\r\n")
    two.pending.clear()
    two.run("""
        C: c STORE 2 +FLAGS (\\Deleted)
        S: * 2 FETCH (FLAGS (\\Deleted))
        S: c OK STORE completed
        C: d EXPUNGE
        S: * 2 EXPUNGE
        S: d OK EXPUNGE completed
    """)
    # No EXPUNGE while answering STORE or SEARCH: sequence numbers stay put until NOOP.
    one.run("""
        C: e STORE 1 +FLAGS (\\Seen)
        S: * 1 FETCH (FLAGS (\\Flagged \\Seen))
        S: e OK STORE completed
        C: f SEARCH ALL
        S: * SEARCH 1 2 3
        S: f OK SEARCH completed
        C: g NOOP
        S: * 2 EXPUNGE
        S: g OK NOOP completed
        C: h SEARCH ALL
        S: * SEARCH 1 2
        S: h OK SEARCH completed
    """)


def test_condstore_updates_carry_modseq() -> None:
    store = FakeStore()
    fill(store, 1)
    conv = conversation(store)
    conv.send(b"a SELECT INBOX (CONDSTORE)\r\n")
    conv.pending.clear()
    store.store("INBOX", [1], "+", ["\\Answered"])
    conv.run("""
        C: b NOOP
        S: * 1 FETCH (FLAGS (\\Answered) MODSEQ (3))
        S: b OK NOOP completed
        C: c FETCH 1 (FLAGS) (CHANGEDSINCE 2)
        S: * 1 FETCH (FLAGS (\\Answered) MODSEQ (3))
        S: c OK FETCH completed
        C: d FETCH 1 (FLAGS) (CHANGEDSINCE 3)
        S: d OK FETCH completed
        C: e FETCH 1 MODSEQ
        S: * 1 FETCH (MODSEQ (3))
        S: e OK FETCH completed
    """)


def test_idle() -> None:
    """RFC 2177 example shape: updates while idling, DONE ends it."""
    conv, store = selected(1)
    session = conv.session
    conv.run("""
        C: A002 IDLE
        S: + idling
    """)
    assert session.idling
    assert session.idle_poll() == b""
    store.append("INBOX", message("while idling"))
    assert session.idle_poll() == b"* 2 EXISTS\r\n* 1 RECENT\r\n"
    assert session.idle_poll() == b""
    assert session.timeout == 30 * 60
    conv.run("""
        C: DONE
        S: A002 OK IDLE terminated
    """)
    assert not session.idling
    conv.run("""
        C: A003 IDLE
        S: + idling
        C: NOT DONE
        S: A003 BAD Expected DONE
    """)


def test_idle_announces_expunge_and_flags() -> None:
    conv, store = selected(2)
    conv.send(b"a IDLE\r\n")
    conv.pending.clear()
    store.store("INBOX", [1], "+", ["\\Deleted"])
    store.expunge("INBOX")
    store.store("INBOX", [2], "+", ["\\Seen"])
    assert conv.session.idle_poll() == b"* 1 EXPUNGE\r\n* 1 FETCH (FLAGS (\\Seen))\r\n"


def test_watch_dirs_and_timeouts() -> None:
    conv = conversation()
    assert conv.session.watch_dirs() == []
    conv.send(b"a SELECT INBOX\r\n")
    assert conv.session.watch_dirs() == [
        Path("/nonexistent/INBOX/new"),
        Path("/nonexistent/INBOX/cur"),
    ]
    assert conv.session.timed_out() == b"* BYE Autologout; idle for too long\r\n"
    assert conv.session.feed(b"a NOOP\r\n").action == "close"


# -- ENABLE, QRESYNC, QUOTA, COMPRESS, LOGOUT ---------------------------------------------------------


def test_enable() -> None:
    """RFC 5161 4 example shape."""
    conv = conversation()
    conv.run("""
        C: t2 ENABLE CONDSTORE X-GOOD-IDEA
        S: * ENABLED CONDSTORE
        S: t2 OK ENABLE completed
        C: t3 ENABLE CONDSTORE QRESYNC
        S: * ENABLED QRESYNC
        S: t3 OK ENABLE completed
    """)


def test_select_qresync_rfc7162_example_shape() -> None:
    """RFC 7162 3.2.5.1: VANISHED (EARLIER) and FETCH of changed messages on SELECT."""
    store = FakeStore()
    fill(store, 5)
    store.store("INBOX", [4], "+", ["\\Deleted"])  # modseq 7
    store.expunge("INBOX")  # modseq 8
    store.store("INBOX", [2], "+", ["\\Seen"])  # modseq 9
    conv = conversation(store)
    conv.run("""
        C: A00 SELECT INBOX (QRESYNC (1000 6))
        S: A00 BAD ENABLE QRESYNC first
        C: A01 ENABLE QRESYNC
        S: * ENABLED QRESYNC
        S: A01 OK ENABLE completed
        C: A02 SELECT INBOX (QRESYNC (1000 6 1:5))
        S: * 4 EXISTS
        S: * 0 RECENT
        S: * OK [UNSEEN 1] First unseen
        S: * FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)
        S: * OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] Flags that can be stored
        S: * OK [UIDVALIDITY 1000] UIDs valid
        S: * OK [UIDNEXT 6] Predicted next UID
        S: * OK [HIGHESTMODSEQ 9] Highest
        S: * VANISHED (EARLIER) 4
        S: * 2 FETCH (UID 2 FLAGS (\\Seen) MODSEQ (9))
        S: A02 OK [READ-WRITE] SELECT completed
        C: A03 UID FETCH 1:* FLAGS (CHANGEDSINCE 8 VANISHED)
        S: * 2 FETCH (UID 2 FLAGS (\\Seen) MODSEQ (9))
        S: A03 OK FETCH completed
        C: A04 UID FETCH 1:* FLAGS (CHANGEDSINCE 6 VANISHED)
        S: * VANISHED (EARLIER) 4
        S: * 2 FETCH (UID 2 FLAGS (\\Seen) MODSEQ (9))
        S: A04 OK FETCH completed
        C: A05 FETCH 1:* FLAGS (CHANGEDSINCE 6 VANISHED)
        S: A05 BAD VANISHED needs UID FETCH, QRESYNC and CHANGEDSINCE
    """)


def test_quota() -> None:
    """RFC 9208 4.3.2 example shape: STORAGE in KiB."""
    store = FakeStore(quota_bytes=512 * 1024)
    fill(store, 2)
    conv = conversation(store)
    conv.run("""
        C: G0 GETQUOTAROOT INBOX
        S: * QUOTAROOT "INBOX" ""
        S: * QUOTA "" (STORAGE 1 512)
        S: G0 OK GETQUOTAROOT completed
        C: G1 GETQUOTA ""
        S: * QUOTA "" (STORAGE 1 512)
        S: G1 OK GETQUOTA completed
        C: G2 GETQUOTA "other"
        S: G2 NO [NONEXISTENT] No quota root other
        C: G3 SETQUOTA "" (STORAGE 1)
        S: G3 NO [NOPERM] Quotas are set by the administrator
    """)
    unlimited = conversation(FakeStore())
    unlimited.run("""
        C: G4 GETQUOTAROOT INBOX
        S: * QUOTAROOT "INBOX"
        S: G4 OK GETQUOTAROOT completed
    """)


def test_compress() -> None:
    conv = conversation()
    out = conv.send(b"a COMPRESS DEFLATE\r\nb NOOP\r\n")
    assert out.data == b"a OK DEFLATE active\r\n" and out.action == "compress"
    conv.pending.clear()
    conv.session.compress_started()
    conv.run("""
        C: c COMPRESS DEFLATE
        S: c NO [COMPRESSIONACTIVE] Compression is already active
        C: d CAPABILITY
        S: * CAPABILITY IMAP4rev1 IMAP4rev2 SASL-IR * UTF8=ACCEPT
        S: d OK CAPABILITY completed
    """)
    other = conversation()
    other.run("""
        C: a COMPRESS ZSTD
        S: a BAD Unsupported compression ZSTD
    """)


def test_logout() -> None:
    conv = conversation()
    out = conv.send(b"a LOGOUT\r\nb NOOP\r\n")
    assert out.data == b"* BYE Logging out\r\na OK LOGOUT completed\r\n"
    assert out.action == "close"
    assert conv.session.state is State.LOGOUT
    conv.session.close()
    store = conv.session.config.open_store  # the store was closed
    assert store is not None


def test_close_closes_the_store() -> None:
    store = FakeStore()
    conv = conversation(store)
    conv.session.close()
    assert store.closed


def test_searchres_rfc5182_examples() -> None:
    """RFC 5182 2.1 / 2.4: RETURN (SAVE) and "$"."""
    store = search_store()
    conv = conversation(store, parse_message=_no_mime)
    conv.send(b"a SELECT INBOX\r\n")
    conv.pending.clear()
    conv.run("""
        C: A282 SEARCH RETURN (SAVE) UNSEEN
        S: A282 OK SEARCH completed, result saved
        C: A283 UID FETCH $ (UID FLAGS)
        S: * 2 FETCH (UID 2 FLAGS (\\Flagged $Work))
        S: * 3 FETCH (UID 3 FLAGS (\\Deleted))
        S: A283 OK FETCH completed
        C: A284 SEARCH $ DELETED
        S: * SEARCH 3
        S: A284 OK SEARCH completed
        C: A285 SEARCH RETURN (SAVE MIN) ALL
        S: * ESEARCH (TAG "A285") MIN 1
        S: A285 OK SEARCH completed
        C: A286 STORE $ +FLAGS (\\Answered)
        S: * 1 FETCH (FLAGS (\\Answered \\Seen))
        S: A286 OK STORE completed
        C: A287 SEARCH RETURN (SAVE) FROB
        S: A287 BAD Syntax error: unknown search key FROB
        C: A288 FETCH $ UID
        S: A288 OK FETCH completed
        C: A289 SEARCH RETURN (SAVE) ALL
        S: A289 OK SEARCH completed, result saved
        C: A290 UNSELECT
        S: A290 OK UNSELECT completed
    """)
    assert conv.session.saved == []


def test_client_text_cannot_break_a_response_line() -> None:
    conv = conversation()
    conv.send(b"e ENABLE UTF8=ACCEPT\r\n")
    out = conv.send(b"a1 SELECT {8}\r\n")
    assert out.data == b"+ Ready for literal data\r\n"
    out = conv.send(b"x\r\n* BYE\r\n")
    assert out.data == b"a1 NO [NONEXISTENT] No mailbox x??* BYE\r\n"


def test_non_ascii_text_only_after_enable() -> None:
    conv = conversation()
    assert (
        conv.send(b'a1 SELECT "Entw&APw-rfe"\r\n').data
        == b"a1 NO [NONEXISTENT] No mailbox Entw?rfe\r\n"
    )
    conv.send(b"e ENABLE IMAP4rev2\r\n")
    out = conv.send(b'a2 SELECT "Entw&APw-rfe"\r\n')
    assert out.data == "a2 NO [NONEXISTENT] No mailbox Entwürfe\r\n".encode()


# -- MIME-backed items: the session's plumbing, with a stand-in parser --------------------------------


class StandIn:
    """A stand-in for ``mailroom.mime.Message``: fixed answers, and a record of what was asked."""

    parsed = 0

    def __init__(self, raw: bytes) -> None:
        StandIn.parsed += 1
        self.raw = raw

    def envelope(self) -> Value:
        return [None, "Hi \u00e9", None, None, None, None, None, None, None, "<id@x>"]

    def bodystructure(self) -> Value:
        return [
            Atom('"TEXT"'),
            "PLAIN",
            ["CHARSET", "UTF-8"],
            None,
            None,
            "8BIT",
            3,
            1,
            None,
            None,
            None,
            None,
        ]

    def body(self) -> Value:
        return ["TEXT", "PLAIN", ["CHARSET", "UTF-8"], None, None, "8BIT", 3, 1]

    def section(self, section: Section) -> bytes | None:
        return (
            f"<{section.part} {section.text} {section.fields}>".encode()
            if section.part != (9,)
            else None
        )

    def binary(self, part: tuple[int, ...]) -> bytes | None:
        return b"\x00\x01bin" if part == (1,) else None

    def binary_size(self, part: tuple[int, ...]) -> int | None:
        return 5 if part == (1,) else None

    def header_values(self, name: str) -> list[str]:
        return ["Bob <bob@example.test>"] if name.upper() == "FROM" else []

    def text(self) -> str:
        return "Café au lait"

    def date(self) -> datetime | None:
        return datetime(2026, 11, 2, 23, 30, tzinfo=UTC)


def stand_in_session(count: int = 2) -> Conversation:
    store = FakeStore()
    fill(store, count)
    StandIn.parsed = 0
    conv = conversation(store, parse_message=StandIn)
    conv.send(b"a SELECT INBOX\r\n")
    conv.pending.clear()
    return conv


def test_envelope_bodystructure_body_are_encoded() -> None:
    conv = stand_in_session()
    out = conv.send(b"a1 FETCH 1 (ENVELOPE BODYSTRUCTURE BODY)\r\n")
    assert out.data == (
        b'* 1 FETCH (ENVELOPE (NIL {5}\r\nHi \xc3\xa9 NIL NIL NIL NIL NIL NIL NIL "<id@x>") '
        b'BODYSTRUCTURE ("TEXT" "PLAIN" ("CHARSET" "UTF-8") NIL NIL "8BIT" 3 1 NIL NIL NIL NIL) '
        b'BODY ("TEXT" "PLAIN" ("CHARSET" "UTF-8") NIL NIL "8BIT" 3 1))\r\n'
        b"a1 OK FETCH completed\r\n"
    )
    conv.send(b"e ENABLE UTF8=ACCEPT\r\n")  # not allowed in the selected state
    assert StandIn.parsed == 1  # three items, one parse


def test_fetch_all_and_full_parse_each_message_once() -> None:
    conv = stand_in_session(5)
    conv.send(b"a1 FETCH 1:5 FULL\r\n")
    assert StandIn.parsed == 5
    out = conv.send(b"a2 FETCH 1:5 ALL\r\n")
    assert out.data.count(b"ENVELOPE") == 5
    assert StandIn.parsed == 5  # cached


def test_nested_sections_go_to_the_mime_parser() -> None:
    conv = stand_in_session()
    conv.run("""
        C: a1 FETCH 1 (BODY.PEEK[1] BODY.PEEK[1.2.MIME] BODY.PEEK[2.HEADER.FIELDS (To)] BODY.PEEK[2.TEXT]<1.3>)
        S: * 1 FETCH (BODY[1] "<(1,)  ()>" BODY[1.2.MIME] "<(1, 2) MIME ()>" BODY[2.HEADER.FIELDS (To)] "<(2,) HEADER.FIELDS ('TO',)>" BODY[2.TEXT]<1> "(2,")
        S: a1 OK FETCH completed
        C: a2 FETCH 1 BODY.PEEK[9]
        S: * 1 FETCH (BODY[9] NIL)
        S: a2 OK FETCH completed
        C: a3 FETCH 1 BODY.PEEK[1.FROB]
        S: a3 BAD Syntax error: bad section text FROB
        C: a4 FETCH 1 BODY.PEEK[0]
        S: a4 BAD Syntax error: expected a number greater than 0
    """)


def test_binary_rfc3516() -> None:
    conv = stand_in_session()
    out = conv.send(
        b"a1 FETCH 1 (BINARY.PEEK[1] BINARY.SIZE[1] BINARY.PEEK[1]<1.2> BINARY.SIZE[2])\r\n"
    )
    assert out.data == (
        b'* 1 FETCH (BINARY[1] ~{5}\r\n\x00\x01bin BINARY.SIZE[1] 5 BINARY[1]<1> "\x01b" BINARY.SIZE[2] NIL)\r\n'
        b"a1 OK FETCH completed\r\n"
    )
    out = conv.send(b"a2 FETCH 2 BINARY[1]\r\n")  # not PEEK: sets \Seen
    assert out.data.endswith(b" FLAGS (\\Seen))\r\na2 OK FETCH completed\r\n")


def test_search_strings_use_the_parsed_message() -> None:
    conv = stand_in_session(2)
    conv.run("""
        C: s1 SEARCH FROM bob
        S: * SEARCH 1 2
        S: s1 OK SEARCH completed
        C: s2 SEARCH FROM carol
        S: * SEARCH
        S: s2 OK SEARCH completed
        C: s3 SEARCH HEADER X-Missing ""
        S: * SEARCH
        S: s3 OK SEARCH completed
        C: s4 SEARCH HEADER From ""
        S: * SEARCH 1 2
        S: s4 OK SEARCH completed
        C: s5 SEARCH CHARSET UTF-8 BODY {4}
        S: + Ready for literal data
        C: THÉ
        S: * SEARCH
        S: s5 OK SEARCH completed
        C: s6 SEARCH CHARSET UTF-8 BODY {5}
        S: + Ready for literal data
        C: CAFÉ
        S: * SEARCH 1 2
        S: s6 OK SEARCH completed
        C: s7 SEARCH TEXT "number 2"
        S: * SEARCH
        S: s7 OK SEARCH completed
        C: s8 SEARCH TEXT "Subject: Message 2"
        S: * SEARCH 2
        S: s8 OK SEARCH completed
        C: s9 SEARCH SENTON 2-Nov-2026
        S: * SEARCH 1 2
        S: s9 OK SEARCH completed
        C: t1 SEARCH SENTBEFORE 2-Nov-2026
        S: * SEARCH
        S: t1 OK SEARCH completed
        C: t2 SEARCH SENTSINCE 3-Nov-2026
        S: * SEARCH
        S: t2 OK SEARCH completed
        C: t3 SEARCH SUBJECT x
        S: * SEARCH
        S: t3 OK SEARCH completed
    """)


def test_many_small_literals_cannot_add_up() -> None:
    conv = conversation(login=False, max_line=1000)
    chunk = b"x" * 1000 + b" {1000+}\r\n"
    out = conv.send(b"a1 ID (" + b"{1000+}\r\n" + chunk * 5)
    assert out.data == (
        b"a1 BAD [TOOBIG] Command larger than 3048 octets\r\n"
        b"* BYE [TOOBIG] Cannot continue after a refused non-synchronizing literal\r\n"
    )
    assert out.action == "close"
    conv = conversation(login=False, max_line=1000)
    out = conv.send(b"a1 LOGIN {10}\r\n")
    assert out.data == b"+ Ready for literal data\r\n"
    out = conv.send(b"x" * 10 + b" {1024}\r\n")
    assert out.data == b"+ Ready for literal data\r\n"  # two literals of a LOGIN are fine


def test_search_with_a_long_set_over_many_messages_is_fast() -> None:
    store = FakeStore()
    folder = store.folders["INBOX"]
    for uid in range(1, 5001):  # metadata only: search by set never reads a message
        folder.messages[uid] = store_info(uid)
    folder.uidnext = 5001
    conv = conversation(store, parse_message=_no_mime)
    conv.send(b"a SELECT INBOX\r\n")
    conv.pending.clear()
    numbers = ",".join(str(i) for i in range(1, 10_000, 2))
    started = time.monotonic()
    out = conv.send(f"a1 UID SEARCH RETURN (COUNT) UID {numbers}\r\n".encode())
    assert out.data.startswith(b'* ESEARCH (TAG "a1") UID COUNT 2500\r\n')
    assert time.monotonic() - started < 2


def store_info(uid: int) -> MessageInfo:
    return MessageInfo(uid, frozenset(), uid, 100, datetime(2026, 1, 1, tzinfo=UTC), f"k{uid}")


class BrokenStore(FakeStore):
    def ensure_defaults(self) -> None:
        raise StoreError("the mail directory is not writable")


def test_store_failure_at_login_is_a_tagged_no() -> None:
    for command in (f'a1 LOGIN alice@example.test "{PASSWORD}"', f"a1 AUTHENTICATE PLAIN {PLAIN}"):
        conv = conversation(BrokenStore(), login=False)
        conv.run(f"""
            C: {command}
            S: a1 NO [CANNOT] the mail directory is not writable
        """)
        assert conv.session.state is State.NOT_AUTHENTICATED


def test_message_cache_is_bounded_in_bytes() -> None:
    store = FakeStore()
    big = b"Subject: big\r\n\r\n" + b"x" * (6 * 1024 * 1024) + b"\r\n"
    for _ in range(4):
        store.append("INBOX", big)
    conv = conversation(store)
    conv.send(b"a SELECT INBOX\r\n")
    out = conv.send(b"f1 FETCH 1:4 (RFC822.SIZE BODY.PEEK[HEADER] BODY.PEEK[TEXT]<0.10>)\r\n")
    assert out.data.count(b"BODY[HEADER]") == 4
    assert store.reads == 4  # several items of one message: one read
    assert conv.session.cache_bytes <= 16 * 1024 * 1024
    assert len(conv.session.cache) == 2


def test_fetch_response_size_is_capped() -> None:
    store = FakeStore()
    fill(store, 10)
    conv = conversation(store, max_fetch_response=500)
    conv.send(b"a SELECT INBOX\r\n")
    out = conv.send(b"f1 FETCH 1:* BODY.PEEK[]\r\n")
    assert out.data.count(b" FETCH (BODY[] {158}") == 3  # 3 x 183 octets pass 500
    assert out.data.endswith(
        b"f1 NO [LIMIT] Response too large; fetch fewer messages at a time\r\n"
    )


def test_uidvalidity_change_under_a_session_disconnects() -> None:
    conv, store = selected(2)
    store.folders["INBOX"].uidvalidity = 2000  # e.g. the index rebuilt without its uidlist
    out = conv.send(b"a1 NOOP\r\nb1 NOOP\r\n")
    assert (
        out.data
        == b"* BYE [UNAVAILABLE] Mailbox UIDVALIDITY changed; please reconnect\r\na1 OK NOOP completed\r\n"
    )
    assert out.action == "close"


def test_imap4rev2_utf8_names_and_uid_in_unsolicited_fetch() -> None:
    """RFC 9051 Appendix E 16 and 21."""
    store = FakeStore()
    fill(store, 1)
    store.create_mailbox("Entwürfe")
    conv = conversation(store)
    conv.run("""
        C: a1 LIST "" "Entw*"
        S: * LIST (\\HasNoChildren) "/" "Entw&APw-rfe"
        S: a1 OK LIST completed
        C: a2 ENABLE IMAP4rev2
        S: * ENABLED IMAP4rev2
        S: a2 OK ENABLE completed
        C: a3 LIST "" "Entw*"
        S: * LIST (\\HasNoChildren) "/" "Entwürfe"
        S: a3 OK LIST completed
    """)
    conv.send(b"a4 SELECT INBOX\r\n")
    conv.pending.clear()
    store.store("INBOX", [1], "+", ["\\Answered"])
    conv.run("""
        C: a5 NOOP
        S: * 1 FETCH (UID 1 FLAGS (\\Answered))
        S: a5 OK NOOP completed
    """)


def test_append_utf8_rfc6855() -> None:
    store = FakeStore()
    conv = conversation(store)
    body = "Subject: Grüße\r\n\r\nHallo\r\n".encode()
    out = conv.send(b"a1 APPEND INBOX UTF8 (~{%d+}\r\n%s)\r\n" % (len(body), body))
    assert out.data == b"a1 BAD Syntax error: UTF8 APPEND needs ENABLE UTF8=ACCEPT\r\n"
    conv.send(b"e ENABLE UTF8=ACCEPT\r\n")
    out = conv.send(b"a2 APPEND INBOX UTF8 (~{%d+}\r\n%s)\r\n" % (len(body), body))
    assert out.data == b"a2 OK [APPENDUID 1000 1] APPEND completed\r\n"
    assert store.folders["INBOX"].bodies[1] == body
