"""Fuzzing the SMTP DATA reader (smtpd.read_data): any byte stream gets the message or an error
reply, stops at the first end-of-data and leaves what follows (pipelining) in the reader,
never keeps more than the size limit, and gives back exactly what a client dot-stuffed."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from mailroom.smtpd import read_data
from tests.security import fuzzing  # noqa: F401  (the settings profile)

LINE_LIMIT = 1000
PIECES = [b"\r\n", b"\n", b"\r", b".", b"..", b"\r\n.\r\n", b"\n.\n", b"\r\n.\n", b"\n.\r\n",
          b"\r.\r", b".\r\n", b"\x00", b"x" * 999, b"Subject: hi"]  # fmt: skip


def _read(stream: bytes, size_limit: int | None, buffer: int = 2**16) -> tuple[bytes | str, bytes]:
    async def go() -> tuple[bytes | str, bytes]:
        reader = asyncio.StreamReader(limit=buffer)
        reader.feed_data(stream)
        reader.feed_eof()
        result = await read_data(reader, size_limit, LINE_LIMIT)
        return result, await reader.read()

    return asyncio.run(go())


def _stuff(body: bytes) -> bytes:
    """What a client sends for ``body`` (RFC 5321 4.5.2), with the end-of-data."""
    lines = body.split(b"\r\n")
    return (
        b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)
        + b"\r\n.\r\n"
    )


tricky = st.lists(st.sampled_from(PIECES) | st.binary(max_size=20), max_size=30).map(b"".join)


@given(
    tricky,
    st.binary(max_size=40),
    st.sampled_from([None, 0, 100, 5000]),
    st.sampled_from([8, 64, 2**16]),
)
def test_any_stream_ends_at_the_first_end_of_data(
    data: bytes, after: bytes, size_limit: int | None, buffer: int
) -> None:
    stream = data + b"\r\n.\r\n" + after
    result, rest = _read(stream, size_limit, buffer)
    # The end is the first CRLF "." CRLF, where the DATA line's CRLF counts as a first CRLF.
    end = (b"\r\n" + stream).index(b"\r\n.\r\n") + 3
    assert rest == stream[end:], "read past the end of data, or stopped early"
    if isinstance(result, str):
        assert result[:3] in ("552", "500"), result
        if result.startswith("552"):
            assert size_limit and end > size_limit
    else:
        assert len(result) <= end
        if size_limit:
            assert len(result) <= size_limit + 3
        assert all(len(line) + 2 <= LINE_LIMIT for line in result.split(b"\r\n"))


@given(
    st.lists(st.sampled_from(PIECES[:-3]) | st.binary(max_size=30), max_size=30).map(b"".join),
    st.sampled_from([8, 2**16]),
)
def test_dot_stuffing_round_trips(body: bytes, buffer: int) -> None:
    lines = body.split(b"\r\n")
    body = b"\r\n".join(line.replace(b"\r", b"").replace(b"\n", b"") for line in lines)
    if b"\r\n.\r\n" in _stuff(body)[:-5]:  # cannot happen once stuffed
        raise AssertionError(body)
    result, rest = _read(_stuff(body) + b"QUIT\r\n", None, buffer)
    assert result == body + b"\r\n"  # the message keeps the CRLF before the end-of-data
    assert rest == b"QUIT\r\n"


@given(st.integers(min_value=1, max_value=64))
def test_unterminated_line_is_read_in_bounded_pieces(buffer: int) -> None:
    """A 200 kB line without CRLF, then the end: memory stays at the size limit, 552."""
    result, rest = _read(b"x" * 200_000 + b"\r\n.\r\nNOOP\r\n", 10_000, buffer)
    assert result.startswith("552") if isinstance(result, str) else False
    assert rest == b"NOOP\r\n"
