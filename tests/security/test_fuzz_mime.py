"""Fuzzing the ENVELOPE/BODYSTRUCTURE builder (mailroom.mime) with arbitrary octets and with
structured, nested, half-broken MIME: never an exception, always a well-formed IMAP value (every
literal's length right, parentheses balanced, no bare CR/LF), of a size bounded by the input."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from mailroom.imap.wire import encode
from mailroom.mime import Message
from tests.security import fuzzing  # noqa: F401  (the settings profile)

_ATOM = re.compile(rb"[^\x00-\x20()\"{}\x7f]+")


def _value(data: bytes, i: int, depth: int = 0) -> int:
    """The end of the IMAP value at ``data[i:]`` (NIL, number, atom, string, literal, list)."""
    assert depth < 1000
    if data[i : i + 1] == b"(":
        i += 1
        while data[i : i + 1] != b")":
            i = _value(data, i, depth + 1)
            if data[i : i + 1] == b" ":
                i += 1
        return i + 1
    if data[i : i + 1] == b'"':
        i += 1
        while data[i : i + 1] != b'"':
            assert data[i : i + 1] not in (b"", b"\r", b"\n", b"\x00"), data[i - 20 : i + 20]
            i += 2 if data[i : i + 1] == b"\\" else 1
        return i + 1
    if data[i : i + 1] == b"{":
        m = re.compile(rb"\{(\d+)\}\r\n").match(data, i)
        assert m, data[i : i + 20]
        end = m.end() + int(m.group(1))
        assert end <= len(data)
        return end
    m = _ATOM.match(data, i)
    assert m, (i, data[i : i + 40])
    return m.end()


def _well_formed(data: bytes) -> None:
    assert _value(data, 0) == len(data), data


def _check(raw: bytes) -> None:
    msg = Message(raw)
    for value in (msg.envelope(), msg.bodystructure(), msg.body()):
        for utf8 in (False, True):
            out = encode(value, utf8=utf8)
            _well_formed(out)
            # every part costs at most a few hundred octets of description, each one at least
            # a boundary line of input: no blow-up
            assert len(out) <= 4096 + 64 * len(raw), (len(raw), len(out))


token = st.sampled_from(["text/plain", "multipart/mixed", "message/rfc822", "multipart/digest",
    "text/html; charset=utf-8", 'multipart/alternative; boundary="b"', "multipart/mixed; boundary=b",
    "; name*0=a; name*1=b", "; name*=utf-8''%E2%82%AC", "; name*=x-unknown'en'%FF", '; x="\\"', ";;;",
    "=?utf-8?b?4oKs?=", "base64", "quoted-printable", "7bit", "x-uuencode", "(comment (nested)",
    "<a@b>", '"q\\"x" <a@b>', "group: a@b, c@d;", "@", ",,", "\x80\xff", "\x00"])  # fmt: skip
fields = st.sampled_from(["From", "To", "Cc", "Subject", "Date", "Message-ID", "In-Reply-To",
    "Content-Type", "Content-Transfer-Encoding", "Content-Disposition", "Content-Language",
    "Content-Location", "Content-ID", "Sender", "Reply-To", "Bcc", "X"])  # fmt: skip


@st.composite
def header(draw: st.DrawFn, content_type: str) -> bytes:
    lines = [f"Content-Type: {content_type}"]
    for _ in range(draw(st.integers(0, 5))):
        value = "".join(draw(st.lists(token | st.text(max_size=5), max_size=4)))
        lines.append(
            f"{draw(fields)}: {value}" + draw(st.sampled_from(["", "\r\n folded", "\n\t x"]))
        )
    return "\r\n".join(lines).encode("utf-8", "surrogatepass") + b"\r\n\r\n"


@st.composite
def entity(draw: st.DrawFn, depth: int = 0) -> bytes:
    kind = draw(st.sampled_from(["leaf", "leaf", "multi", "message"] if depth < 4 else ["leaf"]))
    if kind == "leaf":
        body = draw(
            st.binary(max_size=40) | st.sampled_from([b"SGVsbG8=\r\n", b"=E2=82=AC=\r\nx", b""])
        )
        return draw(header("text/plain; charset=utf-8")) + body
    if kind == "message":
        return draw(header("message/rfc822")) + draw(entity(depth + 1))
    boundary = draw(st.sampled_from(["b", "b1", "=_x", "b" * 70, ""]))
    parts = draw(st.lists(entity(depth + 1), max_size=4))
    body = b"preamble\r\n" + b"".join(f"--{boundary}\r\n".encode() + p + b"\r\n" for p in parts)
    if draw(st.booleans()):
        body += f"--{boundary}--\r\nepilogue".encode()
    subtype = draw(st.sampled_from(["mixed", "digest", "alternative"]))
    return draw(header(f'multipart/{subtype}; boundary="{boundary}"')) + body


@given(st.binary(max_size=3000))
def test_arbitrary_octets(raw: bytes) -> None:
    _check(raw)


@given(entity())
def test_structured_mime(raw: bytes) -> None:
    _check(raw)


@given(
    entity(),
    st.lists(st.tuples(st.integers(0, 10_000), st.binary(min_size=1, max_size=4)), max_size=5),
)
def test_mutated_mime(raw: bytes, edits: list[tuple[int, bytes]]) -> None:
    data = bytearray(raw)
    for at, junk in edits:
        at %= len(data) + 1
        data[at : at + len(junk)] = junk
    _check(bytes(data))


def test_many_tiny_parts_stay_bounded() -> None:
    raw = (
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        + b"--b\r\n\r\n" * 20_000
        + b"--b--\r\n"
    )
    _check(raw)
