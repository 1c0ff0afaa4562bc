"""IMAP wire values: how Python values are written in IMAP responses, and mailbox-name encoding.

Sans-IO and dependency-free. ``encode`` writes the RFC 9051 section 4 data formats:

    None            -> NIL
    int             -> number
    str / bytes     -> quoted string when it is short and safe, else a literal {n}
    Atom("FLAGS")   -> the atom itself (flags, keywords, response keywords)
    list / tuple    -> parenthesized list, elements separated by one space
    Adjacent(...)   -> its values with nothing between them (multipart bodies, address lists)

``encode_mailbox``/``decode_mailbox`` are modified UTF-7 (RFC 3501 5.1.3).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from dataclasses import dataclass

_QUOTABLE = re.compile(rb"^[\x01-\x09\x0b\x0c\x0e-\x7f]*$")
_MAX_QUOTED = 256


@dataclass(frozen=True, slots=True)
class Atom:
    """A value written as-is: a flag, a keyword, a response keyword (e.g. ``\\Seen``)."""

    text: str


@dataclass(frozen=True, slots=True)
class Adjacent:
    """Values written one after another with no separator, e.g. the bodies of a multipart.

    RFC 9051 9: ``body-type-mpart = 1*body SP media-subtype`` and ``"(" 1*address ")"`` have
    no space between the bodies or the addresses.
    """

    values: tuple[Value, ...]


Value = None | int | str | bytes | Atom | Adjacent | list["Value"] | tuple["Value", ...]


def quoted_or_literal(data: bytes, *, utf8: bool = False) -> bytes:
    """``data`` as a quoted string when possible, else as a synchronizing literal."""
    if len(data) <= _MAX_QUOTED and (_QUOTABLE.match(data) or (utf8 and _utf8_quotable(data))):
        return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(data) + data


def _utf8_quotable(data: bytes) -> bool:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return not any(c in "\r\n\x00" for c in text)


def encode(value: Value, *, utf8: bool = False) -> bytes:
    """The IMAP text of ``value`` (see the module docstring)."""
    # The common kinds first, by exact type (an ENVELOPE is some thirty values).
    if type(value) is str:
        return quoted_or_literal(value.encode("utf-8"), utf8=utf8)
    if type(value) is list or type(value) is tuple:
        return b"(" + b" ".join([encode(v, utf8=utf8) for v in value]) + b")"
    if value is None:
        return b"NIL"
    if isinstance(value, bool):  # bool is an int; never meant here
        raise TypeError("bool is not an IMAP value")
    if isinstance(value, int):
        return str(value).encode()
    if isinstance(value, Atom):
        return value.text.encode("utf-8")
    if isinstance(value, str):
        return quoted_or_literal(value.encode("utf-8"), utf8=utf8)
    if isinstance(value, bytes):
        return quoted_or_literal(value, utf8=utf8)
    if isinstance(value, Adjacent):
        return b"".join([encode(v, utf8=utf8) for v in value.values])
    return b"(" + b" ".join([encode(v, utf8=utf8) for v in value]) + b")"


def encode_list(values: Iterable[Value], *, utf8: bool = False) -> bytes:
    return encode(list(values), utf8=utf8)


# RFC 3501 5.1.3: modified UTF-7 for mailbox names.


def encode_mailbox(name: str) -> str:
    """Modified UTF-7 form of ``name``."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode().rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for c in name:
        if 0x20 <= ord(c) <= 0x7E:
            flush()
            out.append("&-" if c == "&" else c)
        else:
            pending.append(c)
    flush()
    return "".join(out)


class MailboxNameError(ValueError):
    """A mailbox name that is not valid modified UTF-7."""


_B64 = re.compile(r"^[A-Za-z0-9+,]*$")


def decode_mailbox(name: str) -> str:
    """The Unicode mailbox name of modified UTF-7 ``name``; strict (canonical form only)."""
    out: list[str] = []
    i = 0
    while i < len(name):
        c = name[i]
        if ord(c) < 0x20 or ord(c) > 0x7E:
            raise MailboxNameError(f"mailbox name {name!r} is not modified UTF-7")
        if c != "&":
            out.append(c)
            i += 1
            continue
        end = name.find("-", i)
        if end < 0:
            raise MailboxNameError(f"mailbox name {name!r} has an unterminated '&'")
        chunk = name[i + 1 : end]
        if not chunk:
            out.append("&")
        else:
            if not _B64.match(chunk):
                raise MailboxNameError(f"mailbox name {name!r} has bad base64")
            padded = chunk.replace(",", "/") + "=" * (-len(chunk) % 4)
            try:
                text = base64.b64decode(padded).decode("utf-16-be")
            except (ValueError, UnicodeDecodeError):
                raise MailboxNameError(f"mailbox name {name!r} has bad UTF-16") from None
            if (
                any(0x20 <= ord(ch) <= 0x7E for ch in text)
                or encode_mailbox(text) != "&" + chunk + "-"
            ):
                raise MailboxNameError(f"mailbox name {name!r} is not in canonical modified UTF-7")
            out.append(text)
        i = end + 1
    return "".join(out)
