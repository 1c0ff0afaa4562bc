"""The DATA reader: end of data, dot-unstuffing, limits, and nothing read past the end."""

from __future__ import annotations

import asyncio
import time

import pytest

from mailroom.smtpd import read_data
from tests.conftest import MailEnv, Server
from tests.smtpclient import SMTPConversation


def _read(
    stream: bytes, size_limit: int | None = 1 << 20, line_limit: int = 1000
) -> tuple[bytes | str, bytes]:
    async def go() -> tuple[bytes | str, bytes]:
        reader = asyncio.StreamReader(limit=64 * 1024)
        reader.feed_data(stream)
        reader.feed_eof()
        result = await read_data(reader, size_limit, line_limit)
        return result, await reader.read()

    return asyncio.run(go())


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (b".\r\n", b""),
        (b"\r\n.\r\n", b"\r\n"),
        (b"..\r\n.\r\n", b".\r\n"),
        (b"..x\r\n.\r\n", b".x\r\n"),
        (b"a.\r\nb\r\n.\r\n", b"a.\r\nb\r\n"),
        (b"a\r\n..\r\n...\r\n.\r\n", b"a\r\n.\r\n..\r\n"),
        (b"a\r\n. \r\n.x\r\n.\r\n", b"a\r\n \r\nx\r\n"),
        (b"a\n.\nb\r\n.\r\n", b"a\n.\nb\r\n"),  # bare LF is not an end (refused later)
        (b"a\r\n.\r\r\n.\r\n", b"a\r\n\r\r\n"),
    ],
)
def test_end_and_unstuffing(stream: bytes, message: bytes) -> None:
    assert _read(stream + b"QUIT\r\n") == (message, b"QUIT\r\n")


def test_large_message_crosses_the_read_limit() -> None:
    lines = [b"%07d .\r\n" % i for i in range(30000)]  # 300 KB; many lines end in ".<CRLF>"
    body = b"".join(lines)
    assert _read(body + b".\r\nNOOP\r\n") == (body, b"NOOP\r\n")


def test_size_limit_reads_to_the_end() -> None:
    body = b"x" * 997 + b"\r\n"
    result, rest = _read(body * 20 + b".\r\nNOOP\r\n", size_limit=10000)
    assert isinstance(result, str) and result.startswith("552 5.3.4") and rest == b"NOOP\r\n"
    assert _read(body * 5 + b".\r\n", size_limit=5000)[0] == body * 5


def test_line_limit() -> None:
    assert _read(b"x" * 998 + b"\r\n.\r\n")[0] == b"x" * 998 + b"\r\n"
    assert _read(b"." + b"x" * 998 + b"\r\n.\r\n")[0] == b"x" * 998 + b"\r\n"  # the dot is extra
    result, rest = _read(b"x" * 999 + b"\r\n.\r\nNOOP\r\n")
    assert str(result).startswith("500 5.5.2") and rest == b"NOOP\r\n"


def test_end_of_data_split_across_packets(smtpd: Server, mail_env: MailEnv) -> None:
    with SMTPConversation(smtpd.port) as conv:
        assert conv.last().startswith("220")
        conv.send(
            b"EHLO c.test\r\nMAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
        )
        assert [conv.last()[:3] for _ in range(4)] == ["250", "250", "250", "354"]
        for byte in b"Subject: s\r\n\r\n..dot\r\n.\r\nNOOP\r\n":
            conv.send(bytes([byte]))
            time.sleep(0.002)
        assert conv.last().startswith("250 2.0.0")
        assert conv.last().startswith("250 2.0.0")  # the NOOP sent behind the end of data
    [path] = mail_env.new_messages("alice@example.test")
    assert path.read_bytes().endswith(b"\nSubject: s\n\n.dot\n")
