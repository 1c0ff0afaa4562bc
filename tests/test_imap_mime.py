"""FETCH and SEARCH through the real MIME parser (``mailroom.mime.Message``): transcripts.

The exact ENVELOPE/BODYSTRUCTURE of many real-world shapes is tested in the MIME tests; here
the session's use of it: item names, sections, partials, BINARY literal8, SEARCH on decoded text,
and one parse per message.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from tests.imap_fake_store import FakeStore
from tests.imap_transcript import PASSWORD, Conversation, conversation, fill, message

MULTIPART = (
    b"From: =?UTF-8?Q?J=C3=B6rg?= <jorg@example.test>\r\n"
    b'To: a@example.test, "B, C" <b@example.test>\r\n'
    b"Subject: Parts\r\n"
    b"Date: Tue, 24 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <parts@example.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=XX\r\n"
    b"\r\n"
    b"--XX\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Hello caf\xc3\xa9\r\n"
    b"--XX\r\n"
    b"Content-Type: application/octet-stream; name=a.bin\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"Content-Disposition: attachment; filename=a.bin\r\n"
    b"\r\n"
    b"AAECAw==\r\n"
    b"--XX\r\n"
    b"Content-Type: message/rfc822\r\n"
    b"\r\n"
    b"Subject: Inner\r\n"
    b"\r\n"
    b"Inner text\r\n"
    b"--XX--\r\n"
)


def session_with_multipart() -> tuple[Conversation, FakeStore]:
    store = FakeStore()
    store.append("INBOX", MULTIPART, (), datetime(2026, 11, 24, 10, 0, tzinfo=UTC))
    store.claim_recent("INBOX")
    conv = conversation(store)
    conv.send(b"a SELECT INBOX\r\n")
    conv.pending.clear()
    return conv, store


def test_envelope_and_bodystructure() -> None:
    conv, _ = session_with_multipart()
    out = conv.send(b"f1 FETCH 1 (ENVELOPE)\r\n")
    assert out.data == (
        b'* 1 FETCH (ENVELOPE ("Tue, 24 Nov 2026 10:00:00 +0000" "Parts" '
        b'(("=?UTF-8?Q?J=C3=B6rg?=" NIL "jorg" "example.test")) '
        b'(("=?UTF-8?Q?J=C3=B6rg?=" NIL "jorg" "example.test")) '
        b'(("=?UTF-8?Q?J=C3=B6rg?=" NIL "jorg" "example.test")) '
        b'((NIL NIL "a" "example.test")("B, C" NIL "b" "example.test")) NIL NIL NIL '
        b'"<parts@example.test>"))\r\n'
        b"f1 OK FETCH completed\r\n"
    )
    out = conv.send(b"f2 FETCH 1 BODYSTRUCTURE\r\n")
    structure = out.data.split(b"\r\n")[0]
    assert structure.startswith(
        b'* 1 FETCH (BODYSTRUCTURE (("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "7BIT" '
    )
    assert (
        b'("APPLICATION" "OCTET-STREAM" ("NAME" "a.bin") NIL NIL "BASE64" 8 NIL ("ATTACHMENT" ("FILENAME" "a.bin")) NIL NIL)'
        in structure
    )
    assert b'("MESSAGE" "RFC822" NIL NIL NIL "7BIT" ' in structure
    assert structure.endswith(b' "MIXED" ("BOUNDARY" "XX") NIL NIL NIL))')
    out = conv.send(b"f3 FETCH 1 BODY\r\n")
    assert out.data.startswith(
        b'* 1 FETCH (BODY (("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "7BIT" '
    )
    assert out.data.endswith(b' "MIXED"))\r\nf3 OK FETCH completed\r\n')


def test_nested_sections_binary_and_partials() -> None:
    conv, store = session_with_multipart()
    conv.run("""
        C: f1 FETCH 1 (BODY.PEEK[1]<0.5> BODY.PEEK[3.HEADER] BODY.PEEK[3.TEXT] BODY.PEEK[4])
        S: * 1 FETCH (BODY[1]<0> "Hello" BODY[3.HEADER] {18}
        S: Subject: Inner
        S:
        S:  BODY[3.TEXT] "Inner text" BODY[4] NIL)
        S: f1 OK FETCH completed
    """)
    out = conv.send(b"f2 FETCH 1 (BINARY.PEEK[2] BINARY.SIZE[2] BODY.PEEK[2.MIME])\r\n")
    assert out.data.startswith(
        b"* 1 FETCH (BINARY[2] ~{4}\r\n\x00\x01\x02\x03 BINARY.SIZE[2] 4 BODY[2.MIME] {"
    )
    out = conv.send(b"f3 FETCH 1 BINARY.PEEK[1]\r\n")
    assert (
        out.data == b"* 1 FETCH (BINARY[1] {11}\r\nHello caf\xc3\xa9)\r\nf3 OK FETCH completed\r\n"
    )
    assert store.folders["INBOX"].messages[1].flags == frozenset()


def test_search_decodes_headers_and_bodies() -> None:
    conv, _ = session_with_multipart()
    conv.run("""
        C: s1 SEARCH CHARSET UTF-8 FROM {5}
        S: + Ready for literal data
        C: Jörg
        S: * SEARCH 1
        S: s1 OK SEARCH completed
        C: s2 SEARCH CHARSET UTF-8 BODY {5}
        S: + Ready for literal data
        C: CAFÉ
        S: * SEARCH 1
        S: s2 OK SEARCH completed
        C: s3 SEARCH SUBJECT parts TO "b@example.test" SENTON 24-Nov-2026
        S: * SEARCH 1
        S: s3 OK SEARCH completed
        C: s4 SEARCH OR SUBJECT nope HEADER Message-ID "<parts@"
        S: * SEARCH 1
        S: s4 OK SEARCH completed
        C: s5 SEARCH BODY "Subject: Parts"
        S: * SEARCH
        S: s5 OK SEARCH completed
        C: s6 SEARCH TEXT "Subject: Parts"
        S: * SEARCH 1
        S: s6 OK SEARCH completed
    """)


def test_fetch_of_a_hundred_envelopes_reads_each_file_once() -> None:
    store = FakeStore()
    fill(store, 100)
    conv = conversation(store)
    conv.send(b"a SELECT INBOX\r\n")
    before = store.reads
    out = conv.send(
        b"f1 FETCH 1:100 (ENVELOPE BODYSTRUCTURE BODY.PEEK[HEADER.FIELDS (DATE)] RFC822.SIZE)\r\n"
    )
    assert out.data.count(b"ENVELOPE (") == 100
    assert store.reads - before == 100
    raw = message("Message 7", "Body number 7.")
    assert raw == store.folders["INBOX"].bodies[7]


def test_binary_of_an_unknown_encoding_is_unknown_cte() -> None:
    store = FakeStore()
    store.append(
        "INBOX",
        b"Subject: uu\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\nbegin 644 a\r\n`\r\nend\r\n",
    )
    conv = conversation(store)
    conv.send(b"a SELECT INBOX\r\n")
    conv.pending.clear()
    conv.run("""
        C: b1 FETCH 1 BINARY.PEEK[1]
        S: b1 NO [UNKNOWN-CTE] *
        C: b2 FETCH 1 BINARY.SIZE[1]
        S: b2 NO [UNKNOWN-CTE] *
        C: b3 FETCH 1 BODY.PEEK[1]
        S: * 1 FETCH (BODY[1] {21}
        S: begin 644 a
        S: `
        S: end
        S: )
        S: b3 OK FETCH completed
    """)


CORPUS = Path(__file__).parent / "mime_corpus"


def test_corpus_through_fetch_matches_the_mime_goldens() -> None:
    """Every corpus message: FETCH (ENVELOPE BODY BODYSTRUCTURE) is the golden, on the wire."""
    emls = sorted(CORPUS.glob("*.eml"))
    assert len(emls) >= 30
    store = FakeStore()
    for path in emls:
        store.append("INBOX", path.read_bytes())
    conv = conversation(store)
    conv.send(b"a SELECT INBOX\r\n")
    out = conv.send(b"f1 FETCH 1:* (ENVELOPE BODY BODYSTRUCTURE)\r\n")
    expected = b"".join(
        b"* %d FETCH (" % seq
        + path.with_suffix(".imap").read_bytes()[:-2].replace(b"\r\nBODY", b" BODY")
        + b")\r\n"
        for seq, path in enumerate(emls, 1)
    )
    assert out.data == expected + b"f1 OK FETCH completed\r\n"


def test_rfc9051_section_8_sample_connection() -> None:
    """RFC 9051 8, on our data: lower-case commands, FULL, BODY[HEADER], a bare \\deleted."""
    store = FakeStore()
    fill(store, 18, m12=frozenset({"\\Seen"}))
    conv = conversation(store, login=False)
    raw = store.folders["INBOX"].bodies[12]
    header = raw[: raw.index(b"\r\n\r\n") + 4]
    conv.run(f"""
        C: a001 login alice@example.test "{PASSWORD}"
        S: a001 OK [CAPABILITY *] Logged in
        C: a000 enable IMAP4rev2
        S: * ENABLED IMAP4rev2
        S: a000 OK ENABLE completed
        C: a002 select inbox
        S: * 18 EXISTS
        S: * FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)
        S: * OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] Flags that can be stored
        S: * OK [UIDVALIDITY 1000] UIDs valid
        S: * OK [UIDNEXT 19] Predicted next UID
        S: * OK [HIGHESTMODSEQ 19] Highest
        S: * LIST () "/" "INBOX"
        S: a002 OK [READ-WRITE] SELECT completed
        C: a003 fetch 12 full
        S: * 12 FETCH (FLAGS (\\Seen) INTERNALDATE "12-Nov-2026 12:00:00 +0000" RFC822.SIZE 161 ENVELOPE ("Mon, 23 Nov 2026 09:00:00 +0100" "Message 12" (("Bob" NIL "bob" "example.test")) (("Bob" NIL "bob" "example.test")) (("Bob" NIL "bob" "example.test")) ((NIL NIL "alice" "example.test")) NIL NIL NIL "<Message.12@x>") BODY ("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 17 1))
        S: a003 OK FETCH completed
    """)
    out = conv.send(b"a004 fetch 12 body[header]\r\n")
    assert out.data == b"* 12 FETCH (BODY[HEADER] {%d}\r\n%s)\r\na004 OK FETCH completed\r\n" % (
        len(header),
        header,
    )
    conv.pending.clear()
    conv.run("""
        C: a005 store 12 +flags \\deleted
        S: * 12 FETCH (UID 12 FLAGS (\\Deleted \\Seen))
        S: a005 OK STORE completed
        C: a006 logout
        S: * BYE Logging out
        S: a006 OK LOGOUT completed
    """)
