"""mailroom.mime: ENVELOPE/BODY/BODYSTRUCTURE goldens over a corpus, sections, BINARY, SEARCH helpers.

The corpus is tests/mime_corpus/*.eml (CRLF); beside each, NAME.imap holds the expected
ENVELOPE, BODY and BODYSTRUCTURE in IMAP wire form (``wire.encode``), one item per line.
After a deliberate change, rewrite them with ``python -m tests.test_mime --regenerate`` and
read the diff: a golden is only worth what the review of it was.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from mailroom import mime
from mailroom.errors import UnknownTransferEncodingError
from mailroom.imap.wire import Adjacent, Value, encode
from mailroom.mime import Message, Section

CORPUS = Path(__file__).parent / "mime_corpus"
EMLS = sorted(CORPUS.glob("*.eml"))


def load(name: str) -> Message:
    return Message((CORPUS / f"{name}.eml").read_bytes())


def golden(message: Message) -> bytes:
    return (
        b"ENVELOPE "
        + encode(message.envelope())
        + b"\r\nBODY "
        + encode(message.body())
        + b"\r\nBODYSTRUCTURE "
        + encode(message.bodystructure())
        + b"\r\n"
    )


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("utf-8")


# -- goldens -----------------------------------------------------------------------------------


def test_corpus_is_big_enough() -> None:
    assert len(EMLS) >= 30
    assert all(p.with_suffix(".imap").exists() for p in EMLS)


@pytest.mark.parametrize("path", EMLS, ids=[p.stem for p in EMLS])
def test_golden(path: Path) -> None:
    message = Message(path.read_bytes())
    assert golden(message) == path.with_suffix(".imap").read_bytes()


# -- invariants over the corpus ------------------------------------------------------------------


def _leaves(
    structure: Value, path: tuple[int, ...] = ()
) -> list[tuple[tuple[int, ...], list[Value]]]:
    """(part number, body structure) of every part that is not a multipart."""
    assert isinstance(structure, list)
    if not isinstance(structure[0], Adjacent):
        return [(path or (1,), structure)]
    out: list[tuple[tuple[int, ...], list[Value]]] = []
    for n, item in enumerate(_bodies(structure), 1):
        out += _leaves(item, (*path, n))
    return out


def _bodies(structure: Value) -> tuple[Value, ...]:
    """The bodies of a multipart's structure (written one after another, RFC 9051 9)."""
    assert isinstance(structure, list) and isinstance(structure[0], Adjacent)
    return structure[0].values


@pytest.mark.parametrize("path", EMLS, ids=[p.stem for p in EMLS])
def test_sizes_and_lines_match_sections(path: Path) -> None:
    raw = path.read_bytes()
    message = Message(raw)
    for part, structure in _leaves(message.bodystructure()):
        body = message.section(Section(part))
        assert body is not None, part
        size = structure[6]
        assert size == len(body), part
        if structure[0] == "TEXT":
            assert structure[7] == body.count(b"\n"), part
        if structure[:2] == ["MESSAGE", "RFC822"]:
            assert structure[9] == body.count(b"\n"), part
        mime_header = message.section(Section(part, "MIME"))
        assert mime_header is not None
        assert mime_header + body in raw, part  # the part's header sits right before its body


@pytest.mark.parametrize("path", EMLS, ids=[p.stem for p in EMLS])
def test_header_and_text_make_the_message(path: Path) -> None:
    raw = path.read_bytes()
    message = Message(raw)
    assert message.section(Section()) == raw
    header = message.section(Section((), "HEADER"))
    text = message.section(Section((), "TEXT"))
    assert header is not None and text is not None
    assert header + text == raw


# -- sections --------------------------------------------------------------------------------------


def test_plain_message_sections() -> None:
    m = load("01-plain")
    raw = (CORPUS / "01-plain.eml").read_bytes()
    header, _, body = raw.partition(b"\r\n\r\n")
    assert m.section(Section((), "HEADER")) == header + b"\r\n\r\n"
    assert m.section(Section((), "TEXT")) == body
    # RFC 9051 6.4.5.1: a non-multipart message has a part 1, its body; its MIME header is the header.
    assert m.section(Section((1,))) == body
    assert m.section(Section((1,), "MIME")) == header + b"\r\n\r\n"
    assert m.section(Section((2,))) is None
    assert m.section(Section((1, 1))) is None
    assert m.section(Section((1,), "HEADER")) is None  # part 1 is not a message/rfc822
    assert m.section(Section((), "MIME")) is None


def test_header_fields_keep_folding_order_and_blank_line() -> None:
    m = load("01-plain")
    got = m.section(Section((), "HEADER.FIELDS", ("SUBJECT", "FROM", "RECEIVED")))
    assert got == (
        b"Received: from mail.example.org (mail.example.org [192.0.2.10])\r\n"
        b"\tby mx.example.net (Postfix) with ESMTPS id 4F2A81234\r\n"
        b"\tfor <bob@example.net>; Tue, 14 May 2024 09:12:44 +0200 (CEST)\r\n"
        b"From: Alice Example <alice@example.org>\r\n"
        b"Subject: Lunch on Thursday?\r\n"
        b"\r\n"
    )
    assert m.section(Section((), "HEADER.FIELDS", ("X-NOT-THERE",))) == b"\r\n"
    not_ = m.section(Section((), "HEADER.FIELDS.NOT", ("RECEIVED", "RETURN-PATH", "MESSAGE-ID")))
    assert not_ is not None
    assert not_.startswith(b"Date: Tue, 14 May 2024 09:12:40 +0200\r\nMIME-Version: 1.0\r\n")
    assert b"Received" not in not_ and b"\tby mx" not in not_ and b"Message-ID" not in not_
    assert not_.endswith(b"Content-Transfer-Encoding: 7bit\r\n\r\n")


def test_header_fields_match_names_written_with_space_before_colon() -> None:
    m = load("22-whitespace-before-colon")
    got = m.section(Section((), "HEADER.FIELDS", ("SUBJECT", "TO")))
    assert got == b"To\t: bob@example.net\r\nSubject  : spaces before the colon\r\n\r\n"


def test_multipart_sections() -> None:
    m = load("03-mixed-attachments")
    assert m.section(Section((1, 1))) == b"Report and chart attached."
    assert m.section(Section((1, 2))) == b"<p>Report and chart attached.</p>"
    assert m.section(Section((1, 2), "MIME")) == (
        b"Content-Type: text/html; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
    )
    part1 = m.section(Section((1,)))
    assert part1 is not None
    assert part1.startswith(b"------=_Part_124_987654.1718210403\r\n")
    assert part1.endswith(b"------=_Part_124_987654.1718210403--\r\n")
    assert m.section(Section((3,), "MIME")) == (
        b"Content-Type: image/png; name=chart.png\r\nContent-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment;\r\n filename=chart.png\r\n\r\n"
    )
    assert m.section(Section((4,))) is None
    assert m.section(Section((1, 3))) is None
    assert m.section(Section((1, 1, 1))) is None
    assert m.section(Section((0,))) is None


def test_rfc822_part_sections() -> None:
    m = load("06-forwarded-rfc822")
    assert m.section(Section((2,), "MIME")) == (
        b"Content-Type: message/rfc822\r\nContent-Disposition: inline\r\n\r\n"
    )
    inner = m.section(Section((2,)))
    header = m.section(Section((2,), "HEADER"))
    text = m.section(Section((2,), "TEXT"))
    assert inner is not None and header is not None and text is not None
    assert inner == header + text
    assert header.startswith(b"From: Billing <billing@vendor.example>\r\n")
    assert header.endswith(b'boundary="inner-alt"\r\n\r\n')
    assert m.section(Section((2,), "HEADER.FIELDS", ("SUBJECT",))) == (
        b"Subject: Invoice 2024-117\r\n\r\n"
    )
    # 2.1 is the first part of the enclosed multipart (RFC 9051 6.4.5.1 example, 3.1).
    assert m.section(Section((2, 1))) == b"Amount due: 120.00 EUR"
    assert m.section(Section((2, 2))) == b"<p>Amount due: <b>120.00 EUR</b></p>"
    assert (
        m.section(Section((2, 2), "MIME")) == b"Content-Type: text/html; charset=us-ascii\r\n\r\n"
    )
    assert m.section(Section((2, 3))) is None
    assert m.section(Section((2, 1), "HEADER")) is None


def test_rfc822_nested_twice_sections() -> None:
    m = load("07-rfc822-nested-twice")
    assert m.section(Section((2, 2), "HEADER.FIELDS", ("SUBJECT",))) == (
        b"Subject: the original\r\n\r\n"
    )
    # A non-multipart enclosed message has one part, its body.
    assert m.section(Section((2, 2), "TEXT")) == b"The original text."
    assert m.section(Section((2, 2, 1))) == b"The original text."
    assert m.section(Section((2, 2, 2))) is None
    assert m.section(Section((2, 1))) == b"Here is the original."
    assert m.section(Section((1,))) == b"Forwarding a forward."


def test_digest_parts_default_to_messages() -> None:
    m = load("08-digest")
    assert m.section(Section((2, 1), "HEADER.FIELDS", ("SUBJECT",))) == (
        b"Subject: First post\r\n\r\n"
    )
    assert m.section(Section((2, 1, 1))) == b"Hello list.\r\n"
    assert m.section(Section((2, 2), "TEXT")) == b"Hello Alice.\r\n"
    assert m.section(Section((2, 3), "HEADER")) is None  # explicitly text/plain


def test_preamble_and_epilogue_are_not_parts() -> None:
    m = load("21-preamble-epilogue")
    # RFC 2046 5.1.1: the CRLF before a delimiter belongs to the delimiter.
    assert m.section(Section((1,))) == (
        b"This is implicitly typed plain US-ASCII text.\r\nIt does NOT end with a linebreak."
    )
    assert m.section(Section((1,), "MIME")) == b"\r\n"  # no fields, only the blank line
    assert m.section(Section((2,))) == (
        b"This is explicitly typed plain US-ASCII text.\r\nIt DOES end with a linebreak.\r\n"
    )
    assert m.section(Section((3,))) is None


def test_broken_multiparts_keep_their_content_reachable() -> None:
    m = load("18-missing-boundary")
    assert m.section(Section((1,))) == b"This body has no boundary parameter to split on.\r\n"
    assert m.section(Section((1,), "MIME")) == b""
    m = load("19-boundary-never-appears")
    body = m.section(Section((), "TEXT"))
    assert m.section(Section((1,))) == body
    m = load("20-missing-close-boundary")
    assert m.section(Section((1,))) == b"First part."
    assert m.section(Section((2,))) == b"Second part, and the message was cut here.\r\n"


def test_header_only_and_empty_messages() -> None:
    raw = (CORPUS / "27-header-only.eml").read_bytes()
    m = Message(raw)
    assert m.section(Section((), "HEADER")) == raw
    assert m.section(Section((), "TEXT")) == b""
    assert m.section(Section((1,))) == b""
    # RFC 9051 6.4.5.1: no blank line is added to a message that has none.
    assert m.section(Section((), "HEADER.FIELDS", ("SUBJECT",))) == (
        b"Subject: header only, no blank line\r\n"
    )
    m = Message(b"")
    assert m.section(Section((), "HEADER")) == b""
    assert m.section(Section((), "TEXT")) == b""
    assert m.section(Section((1,))) == b""
    assert m.section(Section((), "HEADER.FIELDS.NOT", ("FROM",))) == b""
    assert m.envelope() == [None] * 10
    assert m.text() == ""
    assert m.date() is None


def test_rfc2231_parameters() -> None:
    # The example of RFC 2231 4.1: charset, language and continuations mixed.
    m = Message(
        crlf(
            "Content-Type: application/x-stuff;\n"
            " title*0*=us-ascii'en'This%20is%20even%20more%20;\n"
            " title*1*=%2A%2A%2Afun%2A%2A%2A%20;\n"
            ' title*2="isn\'t it!";\n'
            " other*=x-no-such-charset''%E9t%E9; plain=1; PLAIN=2\n\nx"
        )
    )
    structure = m.bodystructure()
    assert isinstance(structure, list)
    assert structure[2] == [
        "TITLE*",
        "utf-8'en'This%20is%20even%20more%20%2A%2A%2Afun%2A%2A%2A%20isn%27t%20it!",
        "OTHER*",
        "x-no-such-charset''%E9t%E9",
        "PLAIN",
        "1",
    ]


def test_base64_message_rfc822_is_described_from_its_decoded_octets() -> None:
    m = load("34-rfc822-base64")
    assert m.section(Section((2,), "HEADER.FIELDS", ("SUBJECT",))) == (
        b"Subject: wrapped in base64\r\n\r\n"
    )
    assert m.section(Section((2, 1))) == b"The enclosed text.\r\n"
    raw_part = m.section(Section((2,)))
    assert raw_part is not None and raw_part.startswith(b"RnJvbTog")


# -- BINARY ----------------------------------------------------------------------------------------


def test_binary_decodes_base64_text_to_crlf_lines() -> None:
    m = load("16-base64-text")
    text = "Привет, Боб!\r\nЭто письмо в base64.\r\n".encode()  # noqa: RUF001
    assert m.binary((1,)) == text
    assert m.binary_size((1,)) == len(text)


def test_binary_decodes_quoted_printable() -> None:
    m = load("15-quoted-printable")
    data = m.binary((1,))
    assert data is not None
    assert (
        "el envío salió ayer. Este párrafo es largo y se parte con un salto suave".encode(
            "iso-8859-1"
        )
        in data
    )
    assert m.binary_size((1,)) == len(data)


def test_binary_of_attachments_and_identity_parts() -> None:
    m = load("03-mixed-attachments")
    png = m.binary((3,))
    assert png is not None and png.startswith(b"\x89PNG\r\n\x1a\n")
    assert m.binary_size((3,)) == len(png) == 70
    pdf = m.binary((2,))
    assert pdf is not None and pdf.startswith(b"%PDF-1.4\n")  # binary data: no CRLF rewriting
    assert m.binary((1, 1)) == b"Report and chart attached."
    assert m.binary_size((1, 1)) == 26
    assert m.binary((1,)) == m.section(Section((1,)))  # a multipart is passed through
    assert m.binary(()) == (CORPUS / "03-mixed-attachments.eml").read_bytes()
    assert m.binary((9,)) is None
    assert m.binary_size((9,)) is None


def test_binary_of_broken_base64_is_lenient() -> None:
    m = load("28-broken-base64")
    assert m.binary((1,)) == b"Hello, this is a scan with garbage"
    jpeg = m.binary((2,))
    assert jpeg is not None and jpeg.startswith(b"\xff\xd8\xff\xe0\x00\x10JFIF")


def test_binary_unknown_encoding_raises() -> None:
    m = load("36-unknown-transfer-encoding")
    assert m.binary((1,)) == b"File attached."
    with pytest.raises(UnknownTransferEncodingError):
        m.binary((2,))
    with pytest.raises(UnknownTransferEncodingError):
        m.binary_size((2,))
    assert m.section(Section((2,))) is not None  # BODY[2] still works


def test_binary_text_line_ends_become_crlf() -> None:
    # RFC 9051 7.5.2: textual sections go out with CRLF whatever the decoded data used.
    m = Message(
        crlf(
            "Content-Type: text/plain\nContent-Transfer-Encoding: base64\n\nb25lCnR3bwp0aHJlZQ==\n"
        )
    )
    assert m.binary((1,)) == b"one\r\ntwo\r\nthree"
    assert m.binary_size((1,)) == 15


# -- SEARCH helpers ----------------------------------------------------------------------------------


def test_header_values_decode_encoded_words() -> None:
    m = load("09-encoded-words")
    assert m.header_values("Subject") == ["Grüße aus München ☀ und schönes Wetter"]
    assert m.header_values("FROM") == ["Jörg Müller <joerg@example.de>"]
    assert m.header_values("to") == [
        'André Dupont <andre@example.fr>, "Renée O\'Neil" <renee@example.ie>'
    ]
    assert m.header_values("X-Missing") == []


def test_header_values_8bit_and_duplicates() -> None:
    m = load("17-8bit-headers")
    assert m.header_values("Subject") == ["Smörgåsbord für alle"]
    assert m.header_values("From") == ["Zoë Ångström <zoe@example.se>"]
    assert m.header_values("X-Latin1") == ["café"]  # not UTF-8: read as latin-1
    m = load("14-duplicate-headers")
    assert m.header_values("Subject") == ["The first subject", "The second subject"]
    assert len(m.header_values("Received")) == 2


def test_header_values_join_a_character_split_across_words() -> None:
    # "é" is C3 A9 in UTF-8; a broken encoder put the two octets in two words.
    m = Message(b"Subject: =?utf-8?Q?caf=C3?= =?utf-8?Q?=A9?= ok\r\n\r\n")
    assert m.header_values("Subject") == ["café ok"]
    m = Message(b"Subject: =?x-no-such-charset?Q?abc?= and =?utf-8?B?!!?=\r\n\r\n")
    assert m.header_values("Subject") == ["abc and "]


def test_text_decodes_text_parts() -> None:
    assert "el envío salió ayer" in load("15-quoted-printable").text()
    assert "Это письмо в base64." in load("16-base64-text").text()
    text = load("02-alternative").text()
    assert "Sounds good, see you at 10." in text
    assert '<div dir="ltr">' in text  # the HTML alternative, QP decoded
    text = load("06-forwarded-rfc822").text()
    assert "See the invoice below." in text and "Amount due: 120.00 EUR" in text
    assert "Invoice 2024-117" not in text  # enclosed headers are not body text
    text = load("03-mixed-attachments").text()
    assert "%PDF" not in text and "Report and chart attached." in text
    assert "caf\u00e9" in load("23-odd-case-types").text()
    assert "Hello, this is a scan with garbage" in load("28-broken-base64").text()


def test_date() -> None:
    assert load("01-plain").date() == datetime(
        2024, 5, 14, 9, 12, 40, tzinfo=timezone(timedelta(hours=2))
    )
    assert load("35-address-edge-cases").date() == datetime(2024, 9, 1, 10, 0, tzinfo=UTC)
    assert load("30-garbage-headers").date() is None
    assert load("12-missing-from-date-subject").date() is None
    minus_zero = Message(b"Date: Tue, 1 Oct 2024 08:00:00 -0000\r\n\r\n").date()
    assert minus_zero == datetime(2024, 10, 1, 8, 0, tzinfo=UTC)


# -- malformed and hostile input --------------------------------------------------------------------


def _depth(value: Value) -> int:
    if isinstance(value, Adjacent):  # written without parentheses: no level of its own
        return max((_depth(v) for v in value.values), default=0)
    if isinstance(value, list | tuple):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def test_deep_multipart_nesting_is_capped() -> None:
    levels = 150
    head = "".join(
        f"Content-Type: multipart/mixed; boundary=b{i}\n\n--b{i}\n" for i in range(levels)
    )
    tail = "".join(f"\n--b{i}--" for i in reversed(range(levels)))
    m = Message(crlf(f"Subject: deep\n{head}Content-Type: text/plain\n\ndeep text{tail}\n"))
    structure = m.bodystructure()
    # MAX_DEPTH multiparts, then one opaque part; each multipart adds one list level.
    assert _depth(structure) == mime.MAX_DEPTH + 2
    innermost: Value = structure
    for _ in range(mime.MAX_DEPTH):
        innermost = _bodies(innermost)[0]
    assert isinstance(innermost, list)
    assert innermost[:2] == ["APPLICATION", "OCTET-STREAM"]
    encode(structure)
    encode(m.body())
    assert m.section(Section((1,) * (mime.MAX_DEPTH - 1))) is not None
    assert m.section(Section((1,) * (mime.MAX_DEPTH + 1))) is None
    assert "deep text" not in m.text()


def test_deep_message_nesting_is_capped() -> None:
    inner = "Subject: bottom\n\nbottom text\n"
    for i in range(150):
        inner = f"Subject: level {i}\nContent-Type: message/rfc822\n\n{inner}"
    m = Message(crlf(inner))
    encode(m.bodystructure())
    assert m.envelope() == [None, "level 149", *[None] * 8]
    assert m.section(Section((1,) * 50, "HEADER.FIELDS", ("SUBJECT",))) == (
        b"Subject: level 99\r\n\r\n"
    )


def test_enormous_header_and_part_counts() -> None:
    fields = "".join(f"X-Field-{i}: value {i}\n" for i in range(100_000))
    m = Message(crlf(f"From: a@example.com\n{fields}Subject: last\n\nbody\n"))
    start = time.perf_counter()
    envelope = m.envelope()
    assert isinstance(envelope, list) and envelope[1] == "last"
    assert m.section(Section((), "HEADER.FIELDS", ("SUBJECT",))) == b"Subject: last\r\n\r\n"
    assert time.perf_counter() - start < 5
    parts = "".join(
        f"--p\nContent-Type: text/plain\n\npart {i}\n" for i in range(mime.MAX_PARTS + 50)
    )
    m = Message(crlf(f"Content-Type: multipart/mixed; boundary=p\n\n{parts}--p--\n"))
    structure = m.bodystructure()
    assert isinstance(structure, list)
    bodies = [s for s in _bodies(structure) if isinstance(s, list) and s and s[0] == "TEXT"]
    assert len(bodies) < mime.MAX_PARTS
    last = m.section(Section((len(bodies),)))
    assert last is not None and last.endswith(f"part {mime.MAX_PARTS + 49}".encode())


def test_truncated_and_corrupted_messages_never_raise() -> None:
    rng = random.Random(20240901)
    samples = [p.read_bytes() for p in EMLS]
    variants: list[bytes] = []
    for raw in samples:
        for cut in range(0, len(raw), max(1, len(raw) // 40)):
            variants.append(raw[:cut])
        for _ in range(10):
            data = bytearray(raw)
            for _ in range(1 + len(data) // 200):
                if data:
                    data[rng.randrange(len(data))] = rng.choice(b'\r\n:;"()<>=-\\\x00\xff ')
            variants.append(bytes(data))
    for raw in variants:
        m = Message(raw)
        encode(m.envelope())
        encode(m.body())
        encode(m.bodystructure())
        m.header_values("subject")
        m.text()
        m.date()
        for section in (
            Section(),
            Section((), "HEADER"),
            Section((), "TEXT"),
            Section((), "HEADER.FIELDS", ("FROM",)),
            Section((1,)),
            Section((1,), "MIME"),
            Section((2, 1)),
            Section((2,), "HEADER"),
        ):
            m.section(section)
        for part in ((1,), (2,), (1, 1)):
            try:
                m.binary(part)
                m.binary_size(part)
            except UnknownTransferEncodingError:
                pass


# -- speed and shape ------------------------------------------------------------------------------


def _sized_message(size: int) -> bytes:
    """A Thunderbird-like message with a text part and a base64 attachment, ``size`` octets."""
    header, _, _ = (CORPUS / "01-plain.eml").read_bytes().partition(b"\r\n\r\n")
    header = header.replace(
        b"Content-Type: text/plain; charset=UTF-8; format=flowed\r\nContent-Transfer-Encoding: 7bit",
        b'Content-Type: multipart/mixed; boundary="------------x0"',
    )
    head = (
        header
        + b"\r\n\r\n--------------x0\r\nContent-Type: text/plain; charset=UTF-8\r\n\r\nSee attached.\r\n"
        + b"--------------x0\r\nContent-Type: application/octet-stream; name=data.bin\r\n"
        + b"Content-Transfer-Encoding: base64\r\n\r\n"
    )
    tail = b"\r\n--------------x0--\r\n"
    line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAx\r\n"
    lines = (size - len(head) - len(tail)) // len(line) + 1
    return head + line * lines + tail


def test_envelope_of_a_10k_message_is_fast() -> None:
    raw = _sized_message(10 * 1024)
    runs = 300
    start = time.perf_counter()
    for _ in range(runs):
        Message(raw).envelope()
    per_message = (time.perf_counter() - start) / runs
    assert per_message < 0.001, per_message


def test_mime_is_sans_io() -> None:
    code = (
        "import sys, mailroom.mime; "
        "print(sorted(m for m in ('asyncio', 'socket', 'sqlite3') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _regenerate() -> None:
    for path in EMLS:
        path.with_suffix(".imap").write_bytes(golden(Message(path.read_bytes())))
        print("wrote", path.with_suffix(".imap").name)


if __name__ == "__main__":
    if sys.argv[1:] == ["--regenerate"]:
        _regenerate()
    else:
        print("usage: python -m tests.test_mime --regenerate", file=sys.stderr)


def test_the_usual_mailbox_read_by_the_expression_gives_what_the_tokens_give(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``_addresses`` reads ``Name <a@b>`` and ``a@b`` with one regular expression; for every
    value it accepts, the answer must be the tokenizer's, and odd values must still parse."""

    def both(value: str) -> tuple[object, object]:
        quick = mime._addresses(value)
        with monkeypatch.context() as patch:
            patch.setattr(mime, "_SIMPLE_MAILBOX", re.compile(r"(?!)"))  # never matches
            slow = mime._addresses(value)
        return quick, slow

    rnd = random.Random(9051)
    pieces = ["a", "Bob", "x.y", "@", "<", ">", " ", "\t", "\r\n ", '"q s"', "(c)", ",", ":",
              ";", ".", "é", "=?utf-8?q?x?=", "ex.test", "[1.2.3.4]", "\\", "-", "+tag"]  # fmt: skip
    taken = 0
    for _ in range(40_000):
        value = "".join(rnd.choice(pieces) for _ in range(rnd.randrange(1, 9)))
        if rnd.random() < 0.5:
            name = rnd.choice(["", "Name ", "A B  ", " ", "\tX\r\n Y ", "J. Doe "])
            spec = rnd.choice(["u", "a.b", "x+y", "a..b"]) + "@" + rnd.choice(["d.t", "d", "e-x."])
            value = name + "<" + spec + ">" + rnd.choice(["", " ", "\t", "x", ","])
        taken += mime._SIMPLE_MAILBOX.fullmatch(value) is not None
        quick, slow = both(value)
        assert quick == slow, value
    assert taken > 5_000  # the expression was tried on many, not just a few
    assert both("Sender 70 <sender70@elsewhere.test>")[0] == [
        Adjacent((["Sender 70", None, "sender70", "elsewhere.test"],))
    ]
