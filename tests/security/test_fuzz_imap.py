"""Fuzzing the IMAP command parser and session: any input gets a tagged/untagged answer in
whole CRLF lines, a protocol error or a valid answer, never a traceback (SERVERBUG) and never
output or memory out of proportion to the input."""

from __future__ import annotations

import contextlib
import tracemalloc

from hypothesis import given
from hypothesis import strategies as st

from mailroom.imap.parser import Args, ParseError
from mailroom.imap.session import State
from mailroom.imap.wire import MailboxNameError
from tests.imap_fake_store import FakeStore
from tests.imap_transcript import conversation, fill
from tests.security import fuzzing  # noqa: F401  (the settings profile)

VERBS = [
    "CAPABILITY", "NOOP", "LOGOUT", "ID", "STARTTLS", "LOGIN", "AUTHENTICATE", "ENABLE", "SELECT",
    "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "NAMESPACE", "LIST",
    "LSUB", "STATUS", "APPEND", "IDLE", "COMPRESS", "GETQUOTAROOT", "GETQUOTA", "SETQUOTA",
    "CLOSE", "UNSELECT", "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY", "MOVE", "UID FETCH",
    "UID SEARCH", "UID STORE", "UID COPY", "UID MOVE", "UID EXPUNGE", "DONE", "XYZZY",
]  # fmt: skip
TOKENS = [
    "(", ")", "[", "]", "<", ">", "{", "}", '"', "\\", "*", "%", "~", "NIL", "INBOX", "1", "0",
    "1:*", "2,4:5", "4294967295", "4294967296", "99999999999999999999", "-1", "$", "\\Seen",
    "\\Deleted", "FLAGS", "+FLAGS.SILENT", "BODY[]", "BODY.PEEK[HEADER.FIELDS (SUBJECT)]<0.10>",
    "BINARY[1]", "BODYSTRUCTURE", "ENVELOPE", "RFC822.SIZE", "UID", "ALL", "OR", "NOT", "TEXT",
    "CHARSET", "UTF-8", "RETURN", "(MIN MAX COUNT)", "CHANGEDSINCE", "QRESYNC", "CONDSTORE",
    "&AOk-", "&-", "&Jjo", "&,,,-", '"a\\"b"', '"\x00"', "\xff", "{3}\r\nabc", "{3+}\r\nabc",
    "{0}\r\n", "{4294967295}", "{-1}", "{}", "{5000+}", "~{2}\r\nab", "{2}\r\n\r\n", "\r\n",
    "PLAIN", "AGFsaWNlQGV4YW1wbGUudGVzdABjb3JyZWN0IGhvcnNl", "=", "DEFLATE", "1-Feb-2026",
    '"01-Feb-2026 10:00:00 +0000"', "(" * 50, ")" * 50,
]  # fmt: skip

token_lists = st.lists(st.sampled_from(TOKENS) | st.text(max_size=8), max_size=12)


@st.composite
def command(draw: st.DrawFn) -> bytes:
    """A command line built from IMAP's own pieces: close enough to reach deep into handlers."""
    tag = draw(st.sampled_from(["a1", "*", "+", "", "a(b", "t" * 300]) | st.text(max_size=5))
    verb = draw(st.sampled_from(VERBS))
    args = " ".join(draw(token_lists))
    line = f"{tag} {verb} {args}".encode("utf-8", "surrogatepass")
    return line + draw(st.sampled_from([b"\r\n", b"\n", b"\r\n", b""]))


def _check(data: bytes, out: bytes) -> None:
    assert not out or out.endswith(b"\r\n"), (data, out)
    assert b"SERVERBUG" not in out, (data, out)
    # The fake store holds three messages of about 150 octets: no answer should dwarf that.
    assert len(out) <= 64 * 1024 + 64 * len(data), (data, len(out))


def _play(chunks: list[bytes], *, login: bool) -> None:
    store = FakeStore()
    fill(store, 3)
    conv = conversation(store, login=login)
    sent = b""
    for chunk in chunks:
        sent += chunk
        out = conv.session.feed(chunk)
        _check(sent, out.data)
        if out.action == "close" or conv.session.state is State.LOGOUT:
            return
        if out.action == "starttls":  # the transport would start TLS here; no more input
            return
    _check(sent, conv.session.feed(b"\r\nDONE\r\n").data)


@given(st.lists(command(), min_size=1, max_size=8))
def test_structured_commands_after_login(commands: list[bytes]) -> None:
    _play([b"s SELECT INBOX\r\n", *commands], login=True)


@given(st.lists(command(), min_size=1, max_size=6))
def test_structured_commands_before_login(commands: list[bytes]) -> None:
    _play(commands, login=False)


@given(st.binary(max_size=2000), st.integers(min_value=1, max_value=64))
def test_arbitrary_bytes_in_any_chunking(data: bytes, size: int) -> None:
    chunks = [data[i : i + size] for i in range(0, len(data), size)]
    _play(chunks, login=True)


@given(
    st.sampled_from(["{4294967295}", "{99999999999999999999}", "{1000000000+}", "~{4294967295}"]),
    st.binary(max_size=200),
)
def test_huge_literal_announcements_allocate_nothing(literal: str, rest: bytes) -> None:
    """A literal size is a promise, not an allocation: the parser must not reserve it."""
    tracemalloc.start()
    try:
        _play([b"a APPEND INBOX " + literal.encode() + b"\r\n", rest], login=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, peak


ARG_READERS = [
    "atom", "word", "number", "quoted", "string", "astring", "nstring", "sequence_set", "flag",
    "flag_list", "mailbox", "list_mailbox", "date", "date_time",
]  # fmt: skip


@given(st.binary(max_size=300), st.sampled_from(ARG_READERS), st.booleans())
def test_argument_readers_parse_or_raise_parse_error(data: bytes, reader: str, utf8: bool) -> None:
    args = Args(data, utf8=utf8)
    with contextlib.suppress(ParseError, MailboxNameError):
        getattr(args, reader)()
