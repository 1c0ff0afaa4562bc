"""A byte-exact SMTP client for tests, and a transcript runner in the chasquid style.

A transcript is a list of lines: ``C: text`` sends ``text\\r\\n``; ``S: pattern`` reads one
whole reply and matches its last line with fnmatch (``*`` and ``?``).
"""

from __future__ import annotations

import fnmatch
import socket
import ssl


class SMTPConversation:
    """One raw connection; reads whole (multi-line) replies."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 15) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(
            (host, port), timeout=timeout
        )
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self, text: str) -> None:
        self.send(text.encode("utf-8") + b"\r\n")

    def _readline(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; buffered {self.buffer!r}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def reply(self) -> list[str]:
        """All lines of the next reply."""
        lines = []
        while True:
            line = self._readline().decode("utf-8", "replace")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return lines

    def last(self) -> str:
        return self.reply()[-1]

    def expect(self, command: str, code: str) -> list[str]:
        """Send ``command``; the reply's last line must start with ``code``."""
        self.line(command)
        reply = self.reply()
        assert reply[-1].startswith(code), f"{command!r}: expected {code}, got {reply}"
        return reply

    def hello(self) -> None:
        """Read the greeting and say EHLO."""
        assert self.last().startswith("220 ")
        self.expect("EHLO client.test", "250 ")

    def transaction(
        self, rcpts: list[str], sender: str = "x@elsewhere.test", data: bool = True
    ) -> None:
        """MAIL FROM, every RCPT TO (each accepted) and, with ``data``, DATA up to its 354."""
        self.expect(f"MAIL FROM:<{sender}>", "250 2.1.0")
        for rcpt in rcpts:
            self.expect(f"RCPT TO:<{rcpt}>", "250 2.1.5")
        if data:
            self.expect("DATA", "354 ")

    def starttls(self, context: ssl.SSLContext | None = None) -> None:
        if context is None:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        assert not self.buffer, f"unread data before TLS: {self.buffer!r}"
        self.sock = context.wrap_socket(self.sock, server_hostname="mail.example.test")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> SMTPConversation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_transcript(port: int, transcript: str) -> list[str]:
    """Play ``transcript`` against the server; returns the replies' last lines."""
    seen = []
    with SMTPConversation(port) as conv:
        for raw in transcript.strip().splitlines():
            kind, _, text = raw.strip().partition(": ")
            if kind == "C":
                conv.line(text)
            elif kind == "S":
                got = conv.last()
                seen.append(got)
                assert fnmatch.fnmatchcase(got, text), (
                    f"expected {text!r}, got {got!r} (after {seen[:-1]})"
                )
            else:
                raise ValueError(f"bad transcript line {raw!r}")
    return seen
