"""SMTP attacks on port 25 (inbound) and 587/465 (submission), over real sockets.

Each table row is one attack; each assertion is what would break if its protection went:
smuggling (every bare end-of-data variant), open relay (nmap's 16 smtp-open-relay forms and
more), unauthenticated relay and plaintext AUTH on 587, SIZE and body limits, AUTH payload
sizes, malformed SASL PLAIN, hop count and alias loops.
"""

from __future__ import annotations

import base64
import uuid

import pytest

from tests.conftest import HOSTNAME, PASSWORD
from tests.security.servers import MESSAGE_SIZE_LIMIT, Attacked, attacked
from tests.security.wire import Wire

__all__ = ["attacked"]

ALICE, BOB = "alice@example.test", "bob@example.test"


def inbound(a: Attacked) -> Wire:
    w = Wire(a.ports["smtp"])
    assert w.smtp_reply().startswith(b"220 ")
    assert w.smtp(b"EHLO client.example").startswith(b"250 ")
    return w


def submission(a: Attacked, *, login: bool = True) -> Wire:
    """Port 587 after STARTTLS (and AUTH as alice when ``login``)."""
    w = Wire(a.ports["submission"])
    assert w.smtp_reply().startswith(b"220 ")
    assert w.smtp(b"EHLO client.example").startswith(b"250 ")
    assert w.smtp(b"STARTTLS").startswith(b"220 ")
    w.starttls()
    assert w.smtp(b"EHLO client.example").startswith(b"250 ")
    if login:
        assert w.smtp(b"AUTH PLAIN " + plain(f"\0{ALICE}\0{PASSWORD}")).startswith(b"235 ")
    return w


def plain(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw)


def delivered_containing(a: Attacked, marker: bytes) -> list[str]:
    """Files anywhere under the data directory (mail, queue) that contain ``marker``."""
    return [str(p) for p in a.all_files() if marker in p.read_bytes()]


# -- smuggling -------------------------------------------------------------------------------

# Every way to end a line, a "." and end a line again other than CRLF "." CRLF: a server or
# the next hop reading any of them as the end of DATA would run the smuggled commands.
ENDINGS = [
    b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\r\n", b"\n.\r", b"\r.\n",
    b"\n.\n\r\n", b"\r\n.\r\r\n", b"\r\n.\r.\r\n", b"\r\n\x00.\r\n", b"\r\n.\x00\r\n",
]  # fmt: skip


@pytest.mark.parametrize("port", ["smtp", "submission"])
@pytest.mark.parametrize("ending", ENDINGS, ids=[repr(e)[2:-1] for e in ENDINGS])
def test_smuggling_is_refused(attacked: Attacked, port: str, ending: bytes) -> None:
    marker = uuid.uuid4().hex.encode()
    # A sender each port would take: on 587 only alice's own address passes the sender check.
    sender = b"evil@elsewhere.test" if port == "smtp" else ALICE.encode()
    smuggled = (
        b"RSET\r\nMAIL FROM:<" + sender + b">\r\nRCPT TO:<" + BOB.encode() + b">\r\n"
        b"DATA\r\nSubject: smuggled " + marker + b"\r\n\r\nsmuggled\r\n"
    )
    w = inbound(attacked) if port == "smtp" else submission(attacked)
    with w:
        assert w.smtp(f"MAIL FROM:<{ALICE}>".encode()).startswith(b"250 ")
        assert w.smtp(f"RCPT TO:<{ALICE}>".encode()).startswith(b"250 ")
        assert w.smtp(b"DATA").startswith(b"354 ")
        w.send(b"From: " + ALICE.encode() + b"\r\nSubject: a\r\n\r\nbody" + ending + smuggled)
        w.send(b".\r\n")
        # RFC 5321 4.1.1.4: only CRLF "." CRLF ends the data; bare CR/LF are refused.
        assert w.smtp_reply().startswith(b"554 5.6.0 ")
        # Still in step: the very next reply is QUIT's, so no smuggled command was answered
        # (a NOOP's "250" would not tell it from the smuggled RSET's), and by the time the
        # connection is closed nothing of the session is still being stored.
        assert w.smtp(b"QUIT").startswith(b"221 ")
        assert w.closed()
    assert delivered_containing(attacked, marker) == []


# -- open relay ------------------------------------------------------------------------------

IP = "[127.0.0.1]"
NMAP_FORMS = [  # nmap smtp-open-relay.nse, with its "domain" = our host name
    ("<>", "<relaytest@nmap.scanme.org>"),
    ("<antispam@nmap.scanme.org>", "<relaytest@nmap.scanme.org>"),
    (f"<antispam@{HOSTNAME}>", "<relaytest@nmap.scanme.org>"),
    (f"<antispam@{IP}>", "<relaytest@nmap.scanme.org>"),
    (f"<antispam@{IP}>", f"<relaytest%nmap.scanme.org@{IP}>"),
    (f"<antispam@{IP}>", f"<relaytest%nmap.scanme.org@{HOSTNAME}>"),
    (f"<antispam@{IP}>", '<"relaytest@nmap.scanme.org">'),
    (f"<antispam@{IP}>", '<"relaytest%nmap.scanme.org">'),
    (f"<antispam@{IP}>", f"<relaytest@nmap.scanme.org@{IP}>"),
    (f"<antispam@{IP}>", f'<"relaytest@nmap.scanme.org"@{IP}>'),
    (f"<antispam@{IP}>", f"<relaytest@nmap.scanme.org@{HOSTNAME}>"),
    (f"<antispam@{IP}>", f"<@{IP}:relaytest@nmap.scanme.org>"),
    (f"<antispam@{IP}>", f"<@{HOSTNAME}:relaytest@nmap.scanme.org>"),
    (f"<antispam@{IP}>", "<nmap.scanme.org!relaytest>"),
    (f"<antispam@{IP}>", f"<nmap.scanme.org!relaytest@{IP}>"),
    (f"<antispam@{IP}>", f"<nmap.scanme.org!relaytest@{HOSTNAME}>"),
]
LOCAL_TRICKS = [  # the same tricks inside a local domain, and a local sender
    (f"<{ALICE}>", "<relaytest%nmap.scanme.org@example.test>"),
    (f"<{ALICE}>", "<nmap.scanme.org!relaytest@example.test>"),
    (f"<{ALICE}>", '<"relaytest@nmap.scanme.org"@example.test>'),
    (f"<{ALICE}>", "<@example.test:relaytest@nmap.scanme.org>"),
    (f"<{ALICE}>", "<relaytest@nmap.scanme.org>"),
    (f"<{ALICE}>", "<alice@[127.0.0.1]>"),
    (f"<{ALICE}>", "<alice@example.test.>"),
]


RELAY_FORMS = [*NMAP_FORMS, *LOCAL_TRICKS]
assert len(NMAP_FORMS) == 16


@pytest.mark.parametrize(("sender", "rcpt"), RELAY_FORMS)
def test_port_25_never_relays(attacked: Attacked, sender: str, rcpt: str) -> None:
    with inbound(attacked) as w:
        mail = w.smtp(f"MAIL FROM:{sender}".encode())
        if mail.startswith(b"250 "):
            reply = w.smtp(f"RCPT TO:{rcpt}".encode())
            assert reply[:1] == b"5", reply  # refused for good, never 250 or a retry
            assert w.smtp(b"DATA")[:1] == b"5"  # no valid recipient: no data
        else:
            assert mail[:1] == b"5", mail


def test_port_587_relays_nothing_without_auth(attacked: Attacked) -> None:
    with submission(attacked, login=False) as w:
        assert w.smtp(f"MAIL FROM:<{ALICE}>".encode()).startswith(b"530 5.7.0")
        assert w.smtp(b"RCPT TO:<relaytest@nmap.scanme.org>")[:1] in (b"5",)
        assert w.smtp(b"DATA")[:1] == b"5"


@pytest.mark.parametrize("port", ["smtp", "submission"])
def test_plaintext_auth_is_refused_before_tls(attacked: Attacked, port: str) -> None:
    with Wire(attacked.ports[port]) as w:
        assert w.smtp_reply().startswith(b"220 ")
        ehlo = w.smtp(b"EHLO client.example")
        assert ehlo.startswith(b"250 ")
        reply = w.smtp(b"AUTH PLAIN " + plain(f"\0{ALICE}\0{PASSWORD}"))
        # 25: no AUTH at all; 587: TLS first (RFC 3207 4 / RFC 4954 4: 530 or 538)
        assert reply[:1] == b"5", reply
        assert w.smtp(f"MAIL FROM:<{ALICE}>".encode()).startswith(
            b"530" if port == "submission" else b"250"
        )


# -- sizes -----------------------------------------------------------------------------------


def test_size_parameter_over_the_limit(attacked: Attacked) -> None:
    with inbound(attacked) as w:
        reply = w.smtp(f"MAIL FROM:<x@elsewhere.test> SIZE={MESSAGE_SIZE_LIMIT + 1}".encode())
        assert reply.startswith(b"552 ")


@pytest.mark.parametrize("port", ["smtp", "submission"])
def test_body_over_the_limit(attacked: Attacked, port: str) -> None:
    marker = uuid.uuid4().hex.encode()
    w = inbound(attacked) if port == "smtp" else submission(attacked)
    with w:
        assert w.smtp(f"MAIL FROM:<{ALICE}>".encode()).startswith(b"250 ")
        assert w.smtp(f"RCPT TO:<{BOB}>".encode()).startswith(b"250 ")
        assert w.smtp(b"DATA").startswith(b"354 ")
        w.send(b"From: " + ALICE.encode() + b"\r\nSubject: " + marker + b"\r\n\r\n")
        w.send((b"x" * 98 + b"\r\n") * (MESSAGE_SIZE_LIMIT // 100 + 10) + b".\r\n")
        assert w.smtp_reply().startswith(b"552 ")
        assert w.smtp(b"NOOP").startswith(b"250 ")
    assert delivered_containing(attacked, marker) == []


def test_auth_line_of_12000_octets_is_read_and_100k_refused(attacked: Attacked) -> None:
    with submission(attacked, login=False) as w:
        # RFC 4954 4: a 12288-octet AUTH line must be accepted (then the login fails)
        payload = plain(b"\0" + ALICE.encode() + b"\0" + b"p" * 8980)
        assert len(payload) == 12_000
        assert w.smtp(b"AUTH PLAIN " + payload).startswith(b"535 5.7.8")
        w.send(b"AUTH PLAIN " + b"A" * 100_000 + b"\r\n")
        reply = w.smtp_reply()
        assert reply.startswith(b"500 5.5.2") or reply == b"", reply  # refused (or hung up)
        if reply:
            assert w.smtp(b"NOOP").startswith(b"250 ")


# -- SASL PLAIN --------------------------------------------------------------------------------

BAD_PLAIN: list[tuple[str, bytes]] = [
    ("one field", plain(PASSWORD)),
    ("two fields", plain(f"{ALICE}\0{PASSWORD}")),
    ("four fields", plain(f"\0{ALICE}\0{PASSWORD}\0x")),
    ("bad base64", b"!!!not*base64"),
    ("truncated base64", plain(f"\0{ALICE}\0{PASSWORD}")[:-3]),
    ("authzid is someone else", plain(f"{BOB}\0{ALICE}\0{PASSWORD}")),
    ("CR in user", plain(f"\0{ALICE}\r\0{PASSWORD}")),
    ("LF in user", plain(f"\0{ALICE}\nRCPT TO:<x>\0{PASSWORD}")),
    ("NUL in user", plain(f"\0al\0ice@example.test\0{PASSWORD}")),
    ("not UTF-8", plain(b"\0\xff\xfe@example.test\0" + PASSWORD.encode())),
]


@pytest.mark.parametrize("payload", [p for _, p in BAD_PLAIN], ids=[n for n, _ in BAD_PLAIN])
def test_malformed_plain_never_logs_in(attacked: Attacked, payload: bytes) -> None:
    with submission(attacked, login=False) as w:
        reply = w.smtp(b"AUTH PLAIN " + payload)
        assert reply[:1] == b"5", reply
        assert w.smtp(f"MAIL FROM:<{ALICE}>".encode()).startswith(b"530 5.7.0")


# -- loops -------------------------------------------------------------------------------------


def test_101_received_headers_are_refused(attacked: Attacked) -> None:
    marker = uuid.uuid4().hex.encode()
    with inbound(attacked) as w:
        assert w.smtp(b"MAIL FROM:<x@elsewhere.test>").startswith(b"250 ")
        assert w.smtp(f"RCPT TO:<{ALICE}>".encode()).startswith(b"250 ")
        assert w.smtp(b"DATA").startswith(b"354 ")
        hops = b"".join(b"Received: from hop%d by hop%d; x\r\n" % (i, i + 1) for i in range(101))
        w.send(hops + b"Subject: " + marker + b"\r\n\r\nloop\r\n.\r\n")
        assert w.smtp_reply().startswith(b"554 5.4.6")  # RFC 5321 6.3: a mail loop
    assert delivered_containing(attacked, marker) == []


def test_alias_loops_end(attacked: Attacked) -> None:
    marker = uuid.uuid4().hex.encode()
    with inbound(attacked) as w:
        assert w.smtp(b"MAIL FROM:<x@elsewhere.test>").startswith(b"250 ")
        assert w.smtp(b"RCPT TO:<loop1@example.test>").startswith(b"250 ")  # reaches alice
        assert w.smtp(b"RCPT TO:<ring1@example.test>")[:1] == b"5"  # a ring of aliases only
        assert w.smtp(b"DATA").startswith(b"354 ")
        w.send(b"Subject: " + marker + b"\r\n\r\nloop\r\n.\r\n")
        assert w.smtp_reply().startswith(b"250 ")
    assert len(delivered_containing(attacked, marker)) == 1  # once, to alice
