"""Delivery status notifications: the bounce and the delay warning the queue runner sends.

What this module owns: the bytes of a DSN (RFC 3464) and the rule of who gets one. It never
touches the queue or the network: the runner enqueues what ``build_bounce`` and
``build_delay_warning`` return, with the null sender ``<>`` as envelope sender (RFC 5321 6.1,
RFC 3464 2: so that a DSN never causes another DSN) and ``msg.sender`` as its recipient. What it
promises about a DSN:

* A complete RFC 5322 message: ``From: "Mail Delivery System" <MAILER-DAEMON@{hostname}>``,
  ``To:`` the original sender, ``Subject:``, ``Date:``, ``Message-ID:``,
  ``Auto-Submitted: auto-replied`` (RFC 3834 5) and MIME ``multipart/report;
  report-type=delivery-status`` (RFC 6522) with three parts: (1) ``text/plain``, a human
  explanation naming each recipient and what the remote server said; (2)
  ``message/delivery-status`` (RFC 3464 2.2, 2.3) with one block per recipient; (3)
  ``text/rfc822-headers``, the original message's header section only, never its body.
* CRLF line ends, no line over 998 octets (RFC 5322 2.1.1), 7bit: non-ASCII in the explanation
  is quoted-printable UTF-8; in delivery-status fields an address with non-ASCII is written as
  ``utf-8;`` with RFC 6533 ``\\x{HEX}`` escapes and other text loses its non-ASCII; an original
  header with 8-bit bytes is sent quoted-printable. Only a non-ASCII *sender* address (SMTPUTF8,
  which cannot be encoded in ``To:``) puts raw UTF-8 into the header (RFC 6532).
* Status codes are RFC 3463: a failed recipient's is its ``status`` when that is a 5.x.x code,
  ``5.4.7`` (delivery time expired) when it was a 4.x.x code and the queue gave up, else
  ``5.0.0``; a delayed one's is its 4.x.x ``status`` or ``4.0.0``.
"""

from __future__ import annotations

import quopri
import re
import secrets
import textwrap
from collections.abc import Sequence
from datetime import UTC, datetime
from email.header import decode_header, make_header
from email.utils import format_datetime

from mailroom.queue import QueuedMessage, Recipient

MAX_LINE = 998  # RFC 5322 2.1.1, without CRLF
WRAP = 76
BOUNCE_SUBJECT = "Undelivered Mail Returned to Sender"
DELAY_SUBJECT = "Delayed Mail (still being retried)"
NULL_SENDERS = frozenset({"", "<>"})

_STATUS_RE = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")
_SMTP_REPLY_RE = re.compile(r"^[2-5]\d\d(?:[ -]|$)")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_HEADER_END_RE = re.compile(rb"\r?\n\r?\n")


def should_bounce(sender: str) -> bool:
    """Whether a DSN may be sent to ``sender`` about its message.

    Never to the null sender (RFC 5321 6.1, RFC 3464 2: the message was itself a DSN or
    similar), nor to a ``MAILER-DAEMON`` address (another mail system's bounce daemon: a loop,
    and nobody reads it). Auto-submitted mail does get DSNs: RFC 3834 2 concerns automatic
    *responses*, and its only stop for DSNs is the null sender.
    """
    address = sender.strip()
    if address in NULL_SENDERS:
        return False
    localpart = address.strip("<>").rpartition("@")[0] or address.strip("<>")
    return localpart.lower() != "mailer-daemon"


def build_bounce(
    hostname: str,
    msg: QueuedMessage,
    failed: Sequence[Recipient],
    original: bytes,
    now: float,
) -> bytes:
    """The DSN telling ``msg.sender`` that ``failed`` recipients will never get the message."""
    if not failed:
        raise ValueError("a bounce needs at least one failed recipient")
    lines = [
        f"This is the mail delivery system at {hostname}.",
        "Your message could not be delivered to the recipients below: their servers refused"
        " it, or the mail system has given up after retrying for too long.",
    ]
    return _build(hostname, msg, failed, original, now, BOUNCE_SUBJECT, "failed", lines, None)


def build_delay_warning(
    hostname: str,
    msg: QueuedMessage,
    delayed: Sequence[Recipient],
    original: bytes,
    now: float,
    retry_until: float,
) -> bytes:
    """The DSN telling ``msg.sender`` that ``delayed`` recipients do not have it yet.

    ``retry_until`` is when the queue gives up (``msg.created + give_up_seconds``): the DSN's
    Will-Retry-Until.
    """
    if not delayed:
        raise ValueError("a delay warning needs at least one delayed recipient")
    lines = [
        f"This is the mail delivery system at {hostname}.",
        "Your message has not yet been delivered to the recipients below. The mail system"
        f" will keep trying until {_date(retry_until)}; you do not need to send it again."
        " If it still cannot be delivered by then, you will get another notice.",
    ]
    return _build(
        hostname, msg, delayed, original, now, DELAY_SUBJECT, "delayed", lines, retry_until
    )


def _build(
    hostname: str,
    msg: QueuedMessage,
    recipients: Sequence[Recipient],
    original: bytes,
    now: float,
    subject: str,
    action: str,
    intro: list[str],  # paragraphs
    retry_until: float | None,
) -> bytes:
    boundary = f"=_mailroom_{msg.id}_{secrets.token_hex(8)}"
    original_header = _original_header(original)
    original_subject = _header_value(original_header, b"subject")
    paragraphs = list(intro)
    if original_subject:
        paragraphs.append(f"Subject of your message: {original_subject}")
    explanation: list[str] = []
    for paragraph in paragraphs:
        explanation += [textwrap.fill(paragraph, width=WRAP, break_on_hyphens=False), ""]
    for r in recipients:
        explanation.append(f"<{r.address}>:")
        said = _one_line(r.last_error) or "no reason given"
        where = f"{r.remote_mta} said: " if r.remote_mta else ""
        explanation.append(
            textwrap.fill(
                where + said,
                width=WRAP,
                initial_indent="    ",
                subsequent_indent="    ",
                break_on_hyphens=False,
            )
        )
        explanation.append("")
    explanation.append("The header of your message is attached.")

    header = [
        f'From: "Mail Delivery System" <MAILER-DAEMON@{hostname}>',
        f"To: <{_one_line(msg.sender)}>",
        f"Subject: {subject}",
        f"Date: {_date(now)}",
        f"Message-ID: <{msg.id}.{secrets.token_hex(6)}@{hostname}>",
        "Auto-Submitted: auto-replied",  # RFC 3834 5
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
    ]
    out = "\r\n".join(header).encode("utf-8") + b"\r\n"
    out += _part(boundary, *_text_part(explanation))
    status = _delivery_status(hostname, msg, recipients, action, retry_until)
    out += _part(boundary, ["Content-Type: message/delivery-status"], status)
    out += _part(boundary, *_headers_part(original_header))
    out += f"--{boundary}--\r\n".encode()
    return out


def _part(boundary: str, header: list[str], body: bytes) -> bytes:
    head = "".join(f"{line}\r\n" for line in header)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    # RFC 2046 5.1.1: the CRLF before the next delimiter belongs to it, not to the body.
    return f"--{boundary}\r\n{head}\r\n".encode() + body + b"\r\n"


def _text_part(lines: list[str]) -> tuple[list[str], bytes]:
    text = "\n".join(lines) + "\n"
    if text.isascii():
        header = ["Content-Type: text/plain; charset=us-ascii", "Content-Transfer-Encoding: 7bit"]
        return header, _crlf(text.encode("ascii"))
    header = [
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: quoted-printable",
    ]
    return header, _crlf(quopri.encodestring(text.encode("utf-8")))


def _headers_part(original_header: bytes) -> tuple[list[str], bytes]:
    """``text/rfc822-headers`` (RFC 6522 4): the original header section, 7bit-safe."""
    lines = original_header.split(b"\n")
    if original_header.isascii() and all(len(line) <= MAX_LINE for line in lines):
        return ["Content-Type: text/rfc822-headers", "Content-Transfer-Encoding: 7bit"], _crlf(
            original_header
        )
    header = [
        "Content-Type: text/rfc822-headers; charset=utf-8",
        "Content-Transfer-Encoding: quoted-printable",
    ]
    return header, _crlf(quopri.encodestring(original_header))


def _delivery_status(
    hostname: str,
    msg: QueuedMessage,
    recipients: Sequence[Recipient],
    action: str,
    retry_until: float | None,
) -> bytes:
    """The ``message/delivery-status`` body: per-message fields, then one block per recipient."""
    blocks = [
        [
            f"Reporting-MTA: dns; {hostname}",  # RFC 3464 2.2.2
            f"X-Mailroom-Queue-ID: {msg.id}",
            f"Arrival-Date: {_date(msg.created)}",  # RFC 3464 2.2.5
        ]
    ]
    if msg.envid:
        blocks[0].insert(1, f"Original-Envelope-Id: {_ascii(msg.envid)}")  # RFC 3464 2.2.1
    for r in recipients:
        block = [
            f"Final-Recipient: {_address_field(r.address)}",  # RFC 3464 2.3.2
            f"Action: {action}",  # RFC 3464 2.3.3
            f"Status: {_status(r.status, action)}",  # RFC 3464 2.3.4
        ]
        if r.remote_mta:
            block.append(f"Remote-MTA: dns; {_ascii(r.remote_mta)}")  # RFC 3464 2.3.5
        error = _ascii(_one_line(r.last_error))
        if error:
            kind = "smtp" if _SMTP_REPLY_RE.match(error) else "X-mailroom"
            block.append(f"Diagnostic-Code: {kind}; {error}")  # RFC 3464 2.3.6
        if r.last_attempt > 0:
            block.append(f"Last-Attempt-Date: {_date(r.last_attempt)}")  # RFC 3464 2.3.7
        if retry_until is not None:
            block.append(f"Will-Retry-Until: {_date(retry_until)}")  # RFC 3464 2.3.9
        blocks.append(block)
    text = "\r\n\r\n".join("\r\n".join(_fold(f) for f in block) for block in blocks) + "\r\n"
    return text.encode("ascii")


def _status(status: str, action: str) -> str:
    match = _STATUS_RE.match(status.strip())
    if action == "failed":
        if match and match.group(1) == "5":
            return match.group(0)
        return "5.4.7" if match and match.group(1) == "4" else "5.0.0"
    if match and match.group(1) == "4":
        return match.group(0)
    return "4.0.0"


def _address_field(address: str) -> str:
    """``rfc822; addr``, or RFC 6533 3 ``utf-8; `` with ``\\x{HEX}`` for a non-ASCII one."""
    if address.isascii() and not _CONTROL_RE.search(address):
        return f"rfc822; {address}"
    escaped = "".join(
        c if "!" <= c <= "~" and c not in "+=\\" else f"\\x{{{ord(c):02X}}}" for c in address
    )
    return f"utf-8; {escaped}"


def _fold(field: str) -> str:
    """Fold a field at spaces so no line exceeds 78 characters where that can be helped,
    and cut words that would exceed 998 (RFC 5322 2.1.1, 2.2.3)."""
    words = field.split(" ")
    lines: list[str] = []
    current = ""
    for word in words:
        while len(word) > MAX_LINE - 1:
            if current:
                lines.append(current)
                current = ""
            lines.append(word[: MAX_LINE - 1])
            word = word[MAX_LINE - 1 :]
        if not current:
            current = word
        elif len(current) + 1 + len(word) <= 78:
            current += " " + word
        else:
            lines.append(current)
            current = word
    lines.append(current)
    lines = [line for line in lines if line] or [""]
    return "\r\n ".join(lines)


def _original_header(original: bytes) -> bytes:
    """The header section of ``original`` (LF line ends, ending in one newline)."""
    match = _HEADER_END_RE.search(original)
    head = original[: match.start()] if match else original
    head = head.replace(b"\r\n", b"\n").replace(b"\r", b"\n").rstrip(b"\n")
    return head + b"\n" if head else b""


def _header_value(header: bytes, name: bytes) -> str:
    """The first ``name:`` field of ``header``, unfolded and decoded (RFC 2047), or ``""``."""
    match = re.search(rb"(?im)^" + re.escape(name) + rb":[ \t]*(.*(?:\n[ \t].*)*)", header)
    if not match:
        return ""
    raw = re.sub(rb"\n[ \t]+", b" ", match.group(1)).decode("utf-8", "replace")
    try:
        return _one_line(str(make_header(decode_header(raw))))[:200]
    except (ValueError, LookupError, UnicodeDecodeError):
        return _one_line(raw)[:200]


def _one_line(text: str) -> str:
    """``text`` on one line: line breaks and control characters become spaces."""
    return " ".join(_CONTROL_RE.sub(" ", text).split())


def _ascii(text: str) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def _crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _date(when: float) -> str:
    return format_datetime(datetime.fromtimestamp(when, UTC))
