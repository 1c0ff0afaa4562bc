"""Minimal line clients for the attack suite: raw bytes over real sockets, TLS when asked.

The standard library's clients refuse to send much of what the suite sends (bare CR, huge
literals, a chosen source address), so the suite talks bytes itself.
"""

from __future__ import annotations

import socket
import ssl
from types import TracebackType

TIMEOUT = 10.0


def client_context(*, tls10: bool = False) -> ssl.SSLContext:
    """A client context that trusts anything (the tests' self-signed certificate)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if tls10:
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1
    return ctx


class Wire:
    """One connection: ``send`` bytes, read ``line``s (CRLF or LF stripped), ``close``."""

    def __init__(self, port: int, *, tls: bool = False, source: str = "127.0.0.1") -> None:
        self.sock: socket.socket = socket.create_connection(
            ("127.0.0.1", port), timeout=TIMEOUT, source_address=(source, 0)
        )
        self.buffer = b""
        if tls:
            self.starttls()

    def starttls(self) -> None:
        """TLS on this connection; bytes already read past the reply would be lost."""
        assert not self.buffer, f"unread bytes before TLS: {self.buffer!r}"
        self.sock = client_context().wrap_socket(self.sock, server_hostname="mail.example.test")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        """The next line, without its end; b"" when the server closed the connection."""
        while b"\n" not in self.buffer:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                chunk = b""
            if not chunk:
                rest, self.buffer = self.buffer, b""
                return rest
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.rstrip(b"\r")

    def until(self, prefix: bytes) -> list[bytes]:
        """Lines up to and including the first starting with ``prefix`` (or the close)."""
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if line.startswith(prefix) or line == b"":
                return lines

    def smtp(self, command: bytes) -> bytes:
        """Send an SMTP command; the last line of its (multi-line) reply."""
        self.send(command + b"\r\n")
        return self.smtp_reply()

    def smtp_reply(self) -> bytes:
        while True:
            line = self.line()
            if len(line) < 4 or line[3:4] != b"-":
                return line

    def closed(self) -> bool:
        """Whether the server has closed the connection (reads to the end)."""
        try:
            self.sock.settimeout(TIMEOUT)
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Wire:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
