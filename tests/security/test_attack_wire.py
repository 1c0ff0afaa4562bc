"""Attacks common to every protocol, over real sockets: HTTP as the first line, commands
injected behind STARTTLS/STLS, over-long lines and a 10 MB line without CRLF (the service
process's resident memory measured from /proc), and a TLS 1.0 ClientHello.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time

import pytest

from tests.conftest import Certificate
from tests.security.servers import Attacked, attacked, rss
from tests.security.wire import Wire, client_context

__all__ = ["attacked"]
pytestmark = pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")

IMPLICIT_TLS = {"submissions", "imaps", "pop3s"}
PROGRAM = {
    "smtp": "smtpd", "submission": "submission", "submissions": "submission",
    "imap": "imapd", "imaps": "imapd", "pop3": "pop3d", "pop3s": "pop3d",
}  # fmt: skip
HTTP_REFUSAL = {
    "smtp": b"521 5.5.1 This is an SMTP server",
    "imap": b"* BYE This is an IMAP server",
    "pop3": b"-ERR This is a POP3 server",
}


def greeted(a: Attacked, port: str) -> Wire:
    w = Wire(a.ports[port], tls=port in IMPLICIT_TLS)
    assert w.line()[:1] in (b"2", b"*", b"+")
    return w


def family(port: str) -> str:
    return "smtp" if port.startswith("sub") else port.rstrip("s")


# -- HTTP --------------------------------------------------------------------------------------


@pytest.mark.parametrize("port", list(PROGRAM))
def test_http_request_as_the_first_line_is_hung_up_on(attacked: Attacked, port: str) -> None:
    """A browser posting a form to a mail port (cross-protocol attack): none of it runs."""
    with greeted(attacked, port) as w:
        w.send(
            b"POST / HTTP/1.1\r\nHost: mail\r\nContent-Type: text/plain\r\n\r\n"
            b"EHLO x\r\nUSER alice@example.test\r\na LOGOUT\r\nQUIT\r\n"
        )
        assert w.line().startswith(HTTP_REFUSAL[family(port)])
        assert w.line() == b""  # hung up at once: no line after the request line was read


def test_get_is_refused_on_every_port(attacked: Attacked) -> None:
    for port in PROGRAM:
        with greeted(attacked, port) as w:
            w.send(b"GET / HTTP/1.0\r\n\r\n")
            assert w.line().startswith(HTTP_REFUSAL[family(port)]), port
            assert w.line() == b"", port


# -- STARTTLS injection ------------------------------------------------------------------------

STARTTLS = {
    "smtp": (b"EHLO x\r\n", b"STARTTLS\r\nEHLO injected\r\n", b"220 "),
    "submission": (b"EHLO x\r\n", b"STARTTLS\r\nEHLO injected\r\n", b"220 "),
    "imap": (b"", b"a STARTTLS\r\nb CAPABILITY\r\n", b"a OK"),
    "pop3": (b"", b"STLS\r\nCAPA\r\n", b"+OK"),
}


def say_hello(w: Wire, hello: bytes) -> None:
    """EHLO on the SMTP ports, through its last 250 line (IMAP and POP3 need none)."""
    if hello:
        w.send(hello)
        while not w.line().startswith(b"250 "):
            pass


@pytest.mark.parametrize("port", list(STARTTLS))
def test_commands_behind_starttls_are_not_run_inside_tls(attacked: Attacked, port: str) -> None:
    """RFC 3207 6 / RFC 2595 3.1: bytes sent after STARTTLS in plaintext are discarded."""
    hello, injected, ok = STARTTLS[port]
    with greeted(attacked, port) as w:
        say_hello(w, hello)
        w.send(injected)
        assert w.line().startswith(ok)
        assert w.buffer == b""  # nothing answered in plaintext either
        w.starttls()
        w.sock.settimeout(1.0)
        try:
            unsolicited = w.sock.recv(4096)
        except TimeoutError:
            unsolicited = b""
        assert unsolicited == b"", unsolicited  # the injected command did not run inside TLS
        w.sock.settimeout(10)
        check = {"imap": b"c NOOP\r\n", "pop3": b"NOOP\r\n"}.get(port, b"NOOP\r\n")
        w.send(check)
        assert w.line()[:1] in (b"2", b"c", b"+", b"-")  # the session carries on


# -- line lengths and memory -------------------------------------------------------------------

LONG_LINE = {  # the refusal of a line over each protocol's limit
    "smtp": (b"NOOP " + b"x" * 70_000 + b"\r\n", b"500 5.5.2"),
    "submission": (b"NOOP " + b"x" * 70_000 + b"\r\n", b"5"),
    "imap": (b"a NOOP " + b"x" * 70_000 + b"\r\n", b"a BAD"),
    "pop3": (b"NOOP " + b"x" * 5_000 + b"\r\n", b"-ERR"),
}


@pytest.mark.parametrize("port", list(LONG_LINE))
def test_over_long_lines_are_refused(attacked: Attacked, port: str) -> None:
    line, refusal = LONG_LINE[port]
    with greeted(attacked, port) as w:
        w.send(line)
        reply = w.line()
        assert reply.startswith(refusal) or reply.startswith(b"* BYE"), reply


MB = 1024 * 1024


@pytest.mark.parametrize("port", ["smtp", "submission", "imap", "pop3"])
def test_ten_megabyte_line_without_crlf_keeps_memory_bounded(attacked: Attacked, port: str) -> None:
    with greeted(attacked, port) as w:
        pid = attacked.pid(PROGRAM[port])
        before = rss(pid)
        chunk = b"A" * (64 * 1024)
        sent = 0
        try:
            while sent < 10 * MB:
                w.sock.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # hung up on: also bounded
        time.sleep(0.3)
        grown = rss(pid) - before
        assert grown < 4 * MB, f"{port}: resident memory grew by {grown / MB:.1f} MB"
    # and the service still answers
    with greeted(attacked, port) as w:
        w.send(b"a NOOP\r\n" if port == "imap" else b"NOOP\r\n")
        assert w.line()[:1] in (b"2", b"a", b"+", b"-")


# -- TLS 1.0 -----------------------------------------------------------------------------------


def tls10_handshake(sock: socket.socket) -> str | None:
    """The protocol version agreed with a TLS 1.0-only client, or None if refused."""
    try:
        with client_context(tls10=True).wrap_socket(sock, server_hostname="mail") as tls:
            return tls.version()
    except (ssl.SSLError, ConnectionResetError, OSError):
        return None


@pytest.mark.parametrize("port", sorted(IMPLICIT_TLS))
def test_tls_1_0_is_refused_on_the_tls_ports(attacked: Attacked, port: str) -> None:
    with socket.create_connection(("127.0.0.1", attacked.ports[port]), timeout=10) as sock:
        assert tls10_handshake(sock) is None


@pytest.mark.parametrize("port", list(STARTTLS))
def test_tls_1_0_is_refused_after_starttls(attacked: Attacked, port: str) -> None:
    hello, injected, ok = STARTTLS[port]
    with greeted(attacked, port) as w:
        say_hello(w, hello)
        w.send(injected.split(b"\n")[0] + b"\n")
        assert w.line().startswith(ok)
        assert tls10_handshake(w.sock) is None


def test_the_tls10_client_works(certificate: Certificate) -> None:
    """The client above can speak TLS 1.0 at all (else the refusals prove nothing)."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.set_ciphers("DEFAULT:@SECLEVEL=0")
    server.minimum_version = ssl.TLSVersion.TLSv1
    server.load_cert_chain(*certificate)
    client, served = socket.socketpair()
    result: list[str | None] = []

    def serve() -> None:
        try:
            with server.wrap_socket(served, server_side=True) as tls:
                result.append(tls.version())
        except ssl.SSLError as err:
            result.append(str(err))

    thread = threading.Thread(target=serve)
    thread.start()
    assert tls10_handshake(client) == "TLSv1"
    thread.join(10)
    assert result == ["TLSv1"]
