"""mailroom.dsn: bounce and delay warning parse into RFC 3464 structure; who gets one."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage, Message
from email.parser import BytesParser

import pytest

from mailroom.dsn import (
    BOUNCE_SUBJECT,
    DELAY_SUBJECT,
    build_bounce,
    build_delay_warning,
    should_bounce,
)
from mailroom.queue import QueuedMessage, Recipient, RecipientState

HOST = "mail.example.org"
NOW = 1_700_000_000.0
CREATED = NOW - 5 * 86400
ORIGINAL = (
    b"Received: from client by mail.example.org\r\n\twith ESMTPSA id 1234\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: Quarterly numbers\r\n"
    b"Message-ID: <orig-1@example.org>\r\n"
    b"\r\n"
    b"SECRET BODY LINE\r\n"
    b"\r\n"
    b"more body\r\n"
)
UNKNOWN = Recipient(
    address="bob@example.net",
    state=RecipientState.FAILED,
    attempts=1,
    next_attempt=0.0,
    last_error="550 5.1.1 <bob@example.net>: Recipient address rejected: User unknown",
    remote_mta="mx.example.net",
    status="5.1.1",
    last_attempt=NOW - 60,
)
REFUSED = Recipient(
    address="carol@example.com",
    state=RecipientState.FAILED,
    attempts=30,
    next_attempt=0.0,
    last_error="connect to mx.example.com[192.0.2.1]:25: Connection refused",
    status="4.4.1",
    last_attempt=NOW - 3600,
)
GREYLISTED = Recipient(
    address="dave@example.com",
    state=RecipientState.DEFERRED,
    attempts=3,
    next_attempt=NOW + 3600,
    last_error="451 4.7.1 Greylisted, please try again later",
    remote_mta="mx.example.com",
    status="4.7.1",
    last_attempt=NOW - 10,
)


def queued(*recipients: Recipient, sender: str = "alice@example.org") -> QueuedMessage:
    return QueuedMessage(
        id="018BCF3E2A9C00AB12CD34EF",
        sender=sender,
        recipients=recipients,
        created=CREATED,
        size=len(ORIGINAL),
    )


def parse(raw: bytes) -> EmailMessage:
    return BytesParser(EmailMessage, policy=email.policy.default).parsebytes(raw)


def wire_checks(raw: bytes) -> None:
    """CRLF only, no line over 998 octets, 7bit."""
    assert raw.endswith(b"\r\n")
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert b"\r" not in raw.replace(b"\r\n", b"")
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert raw.isascii()


def parts(msg: EmailMessage) -> list[Message]:
    payload = msg.get_payload()
    assert isinstance(payload, list)
    return [p for p in payload if isinstance(p, Message)]


def status_blocks(part: Message) -> list[Message]:
    assert part.get_content_type() == "message/delivery-status"
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    return [b for b in blocks if isinstance(b, Message)]


def test_bounce_structure_and_header() -> None:
    raw = build_bounce(HOST, queued(UNKNOWN), [UNKNOWN], ORIGINAL, NOW)
    wire_checks(raw)
    msg = parse(raw)
    assert b'\r\nFrom: "Mail Delivery System" <MAILER-DAEMON@mail.example.org>\r\n' in b"\r\n" + raw
    [sender] = msg["From"].addresses
    assert sender.display_name == "Mail Delivery System"
    assert sender.addr_spec == "MAILER-DAEMON@mail.example.org"
    assert msg["To"].addresses[0].addr_spec == "alice@example.org"
    assert msg["Subject"] == BOUNCE_SUBJECT == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Date"].datetime.timestamp() == NOW
    assert msg["Message-ID"].endswith("@mail.example.org>")
    assert msg["MIME-Version"] == "1.0"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert not msg.defects and all(not p.defects for p in parts(msg))


def test_bounce_explains_in_plain_text() -> None:
    raw = build_bounce(HOST, queued(UNKNOWN, REFUSED), [UNKNOWN, REFUSED], ORIGINAL, NOW)
    text = parts(parse(raw))[0]
    assert isinstance(text, EmailMessage)
    content = text.get_content()
    assert "bob@example.net" in content and "carol@example.com" in content
    assert "mx.example.net said: 550 5.1.1 <bob@example.net>: Recipient address" in content
    assert "Connection refused" in content
    assert "Quarterly numbers" in content
    assert "SECRET BODY LINE" not in content


def test_delivery_status_fields() -> None:
    raw = build_bounce(HOST, queued(UNKNOWN, REFUSED), [UNKNOWN, REFUSED], ORIGINAL, NOW)
    per_message, unknown, refused = status_blocks(parts(parse(raw))[1])
    assert per_message["Reporting-MTA"] == "dns; mail.example.org"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == CREATED
    assert per_message["X-Mailroom-Queue-ID"] == "018BCF3E2A9C00AB12CD34EF"
    assert per_message["Original-Envelope-Id"] is None

    assert unknown["Final-Recipient"] == "rfc822; bob@example.net"
    assert unknown["Action"] == "failed"
    assert unknown["Status"] == "5.1.1"
    assert unknown["Remote-MTA"] == "dns; mx.example.net"
    diagnostic = " ".join(str(unknown["Diagnostic-Code"]).split())
    assert diagnostic == (
        "smtp; 550 5.1.1 <bob@example.net>: Recipient address rejected: User unknown"
    )
    last = email.utils.parsedate_to_datetime(unknown["Last-Attempt-Date"])
    assert last.timestamp() == NOW - 60
    assert unknown["Will-Retry-Until"] is None

    # Given up after temporary failures: RFC 3463 X.4.7, delivery time expired.
    assert refused["Final-Recipient"] == "rfc822; carol@example.com"
    assert refused["Action"] == "failed"
    assert refused["Status"] == "5.4.7"
    assert refused["Remote-MTA"] is None
    assert refused["Diagnostic-Code"].startswith("X-mailroom; connect to mx.example.com")


def test_rfc822_headers_part_has_the_header_not_the_body() -> None:
    raw = build_bounce(HOST, queued(UNKNOWN), [UNKNOWN], ORIGINAL, NOW)
    headers = parts(parse(raw))[2]
    payload = headers.get_payload(decode=True)
    assert isinstance(payload, bytes)
    assert payload == ORIGINAL.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    assert b"SECRET BODY LINE" not in raw and b"more body" not in raw
    assert headers["Content-Transfer-Encoding"] == "7bit"


def test_original_with_8bit_header_is_sent_quoted_printable() -> None:
    original = "Subject: Grüße\r\nFrom: jürgen@example.org\r\n\r\nBody\r\n".encode()
    raw = build_bounce(HOST, queued(UNKNOWN), [UNKNOWN], original, NOW)
    wire_checks(raw)
    headers = parts(parse(raw))[2]
    assert headers["Content-Transfer-Encoding"] == "quoted-printable"
    assert headers.get_payload(decode=True) == original.split(b"\r\n\r\n")[0] + b"\r\n"
    text = parts(parse(raw))[0]
    assert isinstance(text, EmailMessage)
    assert "Grüße" in text.get_content()


def test_original_with_lf_line_ends_and_no_body() -> None:
    raw = build_bounce(HOST, queued(UNKNOWN), [UNKNOWN], b"Subject: x\nX-A: 1", NOW)
    wire_checks(raw)
    assert parts(parse(raw))[2].get_payload(decode=True) == b"Subject: x\r\nX-A: 1\r\n"


def test_non_ascii_recipient_and_reply() -> None:
    intl = Recipient(
        address="jösé@exämple.net",
        state=RecipientState.FAILED,
        attempts=1,
        next_attempt=0.0,
        last_error="550 5.1.1 Unbekannter Empfänger",
        remote_mta="mx.exämple.net",
        status="5.1.1",
    )
    raw = build_bounce(HOST, queued(intl), [intl], ORIGINAL, NOW)
    wire_checks(raw)
    msg = parse(raw)
    text = parts(msg)[0]
    assert isinstance(text, EmailMessage)
    assert text["Content-Transfer-Encoding"] == "quoted-printable"
    assert "jösé@exämple.net" in text.get_content()
    assert "Unbekannter Empfänger" in text.get_content()
    [block] = status_blocks(parts(msg)[1])[1:]
    # RFC 6533 3: utf-8-addr-xtext
    assert block["Final-Recipient"] == "utf-8; j\\x{F6}s\\x{E9}@ex\\x{E4}mple.net"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 Unbekannter Empf?nger"


def test_long_reply_is_folded_within_limits() -> None:
    long = Recipient(
        address="bob@example.net",
        state=RecipientState.FAILED,
        attempts=1,
        next_attempt=0.0,
        last_error="550-5.7.1 " + "word " * 300 + "x" * 2000 + "\r\n550 5.7.1 end",
        remote_mta="mx.example.net",
        status="5.7.1",
    )
    raw = build_bounce(HOST, queued(long), [long], ORIGINAL, NOW)
    wire_checks(raw)
    [block] = status_blocks(parts(parse(raw))[1])[1:]
    assert block["Status"] == "5.7.1"
    diagnostic = str(block["Diagnostic-Code"])
    assert diagnostic.startswith("smtp; 550-5.7.1 word word")
    assert diagnostic.replace(" ", "").endswith("x" * 2000 + "5505.7.1end")


def test_delay_warning() -> None:
    retry_until = CREATED + 5 * 86400 + 3600
    msg = queued(GREYLISTED)
    raw = build_delay_warning(HOST, msg, [GREYLISTED], ORIGINAL, NOW, retry_until)
    wire_checks(raw)
    parsed = parse(raw)
    assert parsed["Subject"] == DELAY_SUBJECT == "Delayed Mail (still being retried)"
    assert parsed["Auto-Submitted"] == "auto-replied"
    assert parsed.get_param("report-type") == "delivery-status"
    text, status, headers = parts(parsed)
    assert isinstance(text, EmailMessage)
    assert "dave@example.com" in text.get_content()
    assert "Greylisted" in text.get_content()
    [block] = status_blocks(status)[1:]
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.7.1"
    assert block["Diagnostic-Code"] == "smtp; 451 4.7.1 Greylisted, please try again later"
    until = email.utils.parsedate_to_datetime(block["Will-Retry-Until"])
    assert until.timestamp() == retry_until
    assert headers.get_content_type() == "text/rfc822-headers"


@pytest.mark.parametrize(
    ("action", "given", "expected"),
    [
        ("failed", "5.1.1", "5.1.1"),
        ("failed", "5.7.26", "5.7.26"),
        ("failed", "4.4.1", "5.4.7"),
        ("failed", "", "5.0.0"),
        ("failed", "junk", "5.0.0"),
        ("delayed", "4.4.1", "4.4.1"),
        ("delayed", "", "4.0.0"),
        ("delayed", "5.1.1", "4.0.0"),
    ],
)
def test_status_codes(action: str, given: str, expected: str) -> None:
    r = Recipient("bob@example.net", RecipientState.FAILED, 1, 0.0, "", "", given)
    if action == "failed":
        raw = build_bounce(HOST, queued(r), [r], ORIGINAL, NOW)
    else:
        raw = build_delay_warning(HOST, queued(r), [r], ORIGINAL, NOW, NOW + 86400)
    [block] = status_blocks(parts(parse(raw))[1])[1:]
    assert block["Status"] == expected
    assert block["Diagnostic-Code"] is None  # no error text, no field


def test_envid_is_reported() -> None:
    msg = QueuedMessage("ABC", "alice@example.org", (UNKNOWN,), CREATED, 10, envid="QQ314159")
    raw = build_bounce(HOST, msg, [UNKNOWN], ORIGINAL, NOW)
    assert status_blocks(parts(parse(raw))[1])[0]["Original-Envelope-Id"] == "QQ314159"


def test_each_dsn_has_its_own_message_id_and_boundary() -> None:
    a = parse(build_bounce(HOST, queued(UNKNOWN), [UNKNOWN], ORIGINAL, NOW))
    b = parse(build_bounce(HOST, queued(UNKNOWN), [UNKNOWN], ORIGINAL, NOW))
    assert a["Message-ID"] != b["Message-ID"]
    assert a.get_boundary() != b.get_boundary()


def test_needs_a_recipient() -> None:
    with pytest.raises(ValueError):
        build_bounce(HOST, queued(UNKNOWN), [], ORIGINAL, NOW)
    with pytest.raises(ValueError):
        build_delay_warning(HOST, queued(UNKNOWN), [], ORIGINAL, NOW, NOW)


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        ("", False),  # RFC 5321 6.1: never bounce a bounce
        ("<>", False),
        ("MAILER-DAEMON@example.net", False),
        ("mailer-daemon@example.net", False),
        ("alice@example.org", True),
        ("postmaster@example.org", True),
        ("noreply@example.org", True),  # auto-submitted mail still gets DSNs (RFC 3834)
    ],
)
def test_should_bounce(sender: str, expected: bool) -> None:
    assert should_bounce(sender) is expected
