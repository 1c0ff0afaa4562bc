"""IMAP commands from bytes: framing (lines and literals, with limits) and argument reading.

Sans-IO. Two pieces:

``Framer`` cuts the client's byte stream into whole commands. A command is its lines with
their literals inline, exactly as sent, without the final CRLF. Before a synchronizing
literal it asks its ``check`` callback whether the size is acceptable, so the session can
refuse a literal *before* the client is told to send it (RFC 9051 7.5: "+" continuation).
Line length (without literals) is capped; a longer line is discarded up to its CRLF.

``Args`` reads the arguments of one command, one grammar rule at a time (RFC 9051 9:
atom, astring, string, literal, number, sequence-set, flag list, mailbox, date-time). A
malformed argument raises ``ParseError``, which the session answers with a tagged BAD.
Parenthesis depth and list lengths are capped.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from functools import lru_cache
from typing import TypeVar

from mailroom.imap.wire import MailboxNameError, decode_mailbox

MAX_NUMBER = 2**32 - 1  # RFC 9051 9: number is unsigned 32-bit
MAX_NUMBER64 = 2**63 - 1  # RFC 9051 9: number64 (mod-sequence values)
MAX_LIST = 10_000  # elements of one parenthesized list, and of one sequence set
MAX_NONSYNC = 4096  # RFC 7888 3: LITERAL- non-synchronizing literals

_LITERAL = re.compile(rb"(~?)\{([0-9]+)([+-]?)\}$")
_TAG = re.compile(rb"^[\x21-\x7e]+$")
# RFC 9051 9: atom-specials = "(" / ")" / "{" / SP / CTL / list-wildcards / quoted-specials / resp-specials
_ATOM_SPECIALS = frozenset(b'(){ %*"\\]') | frozenset(range(0x20)) | {0x7F}
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class ParseError(Exception):
    """A command that does not follow the grammar: answered with a tagged BAD."""


# -- framing ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Command:
    """One whole command: its bytes with literals inline, without the final CRLF."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Continue:
    """A synchronizing literal was accepted: send a "+" continuation request now."""


@dataclass(frozen=True, slots=True)
class Rejected:
    """The command was refused while being framed (literal too big, line too long).

    ``response`` is the complete answer; with ``close`` the stream cannot be trusted any more
    (the client is already sending data we refused) and the connection must be closed.
    """

    response: bytes
    close: bool = False


Event = Command | Continue | Rejected


@dataclass(frozen=True, slots=True)
class LiteralRequest:
    """What ``Framer`` tells its ``check`` callback about a literal announced by the client."""

    tag: str  # "*" when the line has no usable tag
    words: tuple[str, ...]  # the first words of the command, upper-cased (e.g. ("UID", "COPY"))
    size: int
    synchronizing: bool
    binary: bool  # literal8 (~{n}), RFC 3516
    command_size: int  # bytes of the command so far (lines and literals)


def tag_of(line: bytes) -> str:
    """The tag of a command line, or "*" when it has none that can be echoed safely."""
    tag = line.split(b" ", 1)[0]
    # RFC 9051 9: tag = 1*<any ASTRING-CHAR except "+">
    if (
        tag
        and _TAG.match(tag)
        and not any((c in _ATOM_SPECIALS and c != 0x5D) or c == 0x2B for c in tag)
    ):
        return tag.decode("ascii")
    return "*"


class Framer:
    """Cuts a byte stream into ``Event``s; see the module docstring."""

    def __init__(self, check: Callable[[LiteralRequest], Rejected | None], max_line: int) -> None:
        self.check = check
        self.max_line = max_line
        self.buf = bytearray()
        self.parts: list[bytes] = []
        self.line_total = 0  # bytes of line text (not literals) in the current command
        self.literal_left = 0
        self.skipping = False  # discarding an over-long line up to its CRLF
        self.scanned = 0  # bytes of buf known to hold no LF

    def feed(self, data: bytes) -> None:
        self.buf += data

    def discard(self) -> None:
        """Forget everything buffered (STARTTLS, COMPRESS: what follows is not for us)."""
        self.buf.clear()
        self.parts.clear()
        self.line_total = self.literal_left = self.scanned = 0
        self.skipping = False

    @property
    def pending(self) -> bool:
        """Whether a command has been started but not finished."""
        return bool(self.parts or self.literal_left or self.buf)

    def events(self) -> Iterator[Event]:
        """Every event the buffered bytes complete; stops when more input is needed."""
        while True:
            if self.literal_left:
                take = min(self.literal_left, len(self.buf))
                if not take:
                    return
                self.parts.append(bytes(self.buf[:take]))
                del self.buf[:take]
                self.literal_left -= take
                continue
            end = self.buf.find(b"\n", self.scanned)
            if end < 0:
                self.scanned = len(self.buf)
                if self.skipping:
                    self.buf.clear()
                    self.scanned = 0
                elif self.line_total + len(self.buf) > self.max_line:
                    tag = tag_of(bytes(self.parts[0] if self.parts else self.buf[:200]))
                    self.discard()
                    self.skipping = True
                    yield Rejected(f"{tag} BAD Command line too long\r\n".encode())
                return
            line = bytes(self.buf[:end])
            del self.buf[: end + 1]
            self.scanned = 0
            if self.skipping:
                self.skipping = False
                continue
            if line.endswith(b"\r"):
                line = line[:-1]
            self.line_total += len(line)
            if self.line_total > self.max_line:
                tag = tag_of(self.parts[0] if self.parts else line)
                self.discard()
                yield Rejected(f"{tag} BAD Command line too long\r\n".encode())
                continue
            match = _LITERAL.search(line)
            if match is None:
                self.parts.append(line)
                data = b"".join(self.parts)
                self.parts.clear()
                self.line_total = 0
                yield Command(data)
                continue
            first = self.parts[0] if self.parts else line
            digits = match.group(2)
            size = int(digits) if len(digits) <= 20 else 2**70  # never int() a huge digit string
            request = LiteralRequest(
                tag=tag_of(first),
                words=tuple(w.decode("ascii", "replace").upper() for w in first.split(b" ")[1:3]),
                size=size,
                synchronizing=not match.group(3),
                binary=bool(match.group(1)),
                command_size=sum(len(p) for p in self.parts) + len(line),
            )
            refusal = self.check(request)
            if refusal is not None:
                self.parts.clear()
                self.line_total = 0
                if refusal.close:
                    self.discard()
                yield refusal
                continue
            self.parts.append(line + b"\r\n")
            self.literal_left = size
            if request.synchronizing:
                yield Continue()
            if size == 0:
                continue


# -- argument reading -------------------------------------------------------------------------

T = TypeVar("T")
Star = None  # "*" in a sequence set: the largest number in use


@dataclass(frozen=True, slots=True)
class SequenceSet:
    """RFC 9051 9 sequence-set: ranges (low, high), either end possibly ``None`` for "*".

    ``saved`` is "$", the result of the last SEARCH ... RETURN (SAVE) (RFC 5182 2.1).
    """

    ranges: tuple[tuple[int | None, int | None], ...]
    saved: bool = False

    def bounds(self, largest: int) -> Iterator[tuple[int, int]]:
        """Each range as (low, high) with "*" resolved to ``largest`` and low <= high."""
        for low, high in self.ranges:
            a = largest if low is None else low
            b = largest if high is None else high
            yield (a, b) if a <= b else (b, a)

    def contains(self, number: int, largest: int) -> bool:
        """Whether ``number`` is in the set: O(log ranges), for SEARCH over many messages."""
        lows, highs = _merged(self.ranges, largest)
        i = bisect_right(lows, number) - 1
        return i >= 0 and number <= highs[i]

    def numbers(self, largest: int) -> list[int]:
        """The numbers of the set that are between 1 and ``largest``, ascending, no repeats."""
        seen: set[int] = set()
        for low, high in self.bounds(largest):
            seen.update(range(max(low, 1), min(high, largest) + 1))
        return sorted(seen)

    def members(self, candidates: list[int]) -> list[int]:
        """The ``candidates`` (ascending, e.g. UIDs in use) that the set contains, ascending."""
        if not candidates:
            return []
        found: set[int] = set()
        for low, high in self.bounds(candidates[-1]):
            found.update(candidates[bisect_left(candidates, low) : bisect_right(candidates, high)])
        return sorted(found)

    def __str__(self) -> str:
        def one(n: int | None) -> str:
            return "*" if n is None else str(n)

        return ",".join(one(a) if a == b else f"{one(a)}:{one(b)}" for a, b in self.ranges)


@lru_cache(maxsize=32)
def _merged(
    ranges: tuple[tuple[int | None, int | None], ...], largest: int
) -> tuple[list[int], list[int]]:
    """The ranges resolved against ``largest``, sorted and merged: (lows, highs)."""
    lows: list[int] = []
    highs: list[int] = []
    for low, high in sorted(SequenceSet(ranges).bounds(largest)):
        if highs and low <= highs[-1] + 1:
            highs[-1] = max(highs[-1], high)
        else:
            lows.append(low)
            highs.append(high)
    return lows, highs


def format_set(numbers: list[int]) -> str:
    """A compact sequence set of ascending ``numbers`` (``1:3,7``)."""
    out: list[str] = []
    i = 0
    while i < len(numbers):
        j = i
        while j + 1 < len(numbers) and numbers[j + 1] == numbers[j] + 1:
            j += 1
        out.append(str(numbers[i]) if i == j else f"{numbers[i]}:{numbers[j]}")
        i = j + 1
    return ",".join(out)


class Args:
    """A cursor over the bytes of one command (after tag and name, or from the start)."""

    def __init__(self, data: bytes, *, utf8: bool = False, max_nesting: int = 100) -> None:
        self.data = data
        self.pos = 0
        self.utf8 = utf8
        self.max_nesting = max_nesting
        self.depth = 0

    # primitives

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def end(self) -> None:
        if not self.at_end():
            raise ParseError(f"unexpected text at the end: {self.rest()[:40]!r}")

    def rest(self) -> str:
        return self.data[self.pos :].decode("utf-8", "replace")

    def peek(self, text: bytes) -> bool:
        return self.data.startswith(text, self.pos)

    def peek_ci(self, text: str) -> bool:
        chunk = self.data[self.pos : self.pos + len(text)]
        return chunk.upper() == text.upper().encode()

    def take(self, text: bytes) -> bool:
        if self.peek(text):
            self.pos += len(text)
            return True
        return False

    def expect(self, text: bytes) -> None:
        if not self.take(text):
            found = self.data[self.pos : self.pos + 20].decode("utf-8", "replace")
            raise ParseError(f"expected {text.decode()!r} at {found!r}")

    def sp(self) -> None:
        self.expect(b" ")

    def open(self) -> None:
        """A "(": counts nesting depth."""
        self.expect(b"(")
        self.depth += 1
        if self.depth > self.max_nesting:
            raise ParseError(f"parentheses nested deeper than {self.max_nesting}")

    def close(self) -> None:
        self.expect(b")")
        self.depth -= 1

    def list_of(self, item: Callable[[], T], *, allow_empty: bool = True) -> list[T]:
        """A parenthesized, space-separated list of ``item``."""
        self.open()
        out: list[T] = []
        if not self.take(b")"):
            while True:
                out.append(item())
                if len(out) > MAX_LIST:
                    raise ParseError(f"more than {MAX_LIST} elements in a list")
                if self.take(b")"):
                    break
                self.sp()
        self.depth -= 1
        if not out and not allow_empty:
            raise ParseError("empty list")
        return out

    # atoms and strings

    def atom(self, extra: bytes = b"") -> str:
        """RFC 9051 9 atom (``extra`` adds chars allowed here, e.g. b"]" for ASTRING-CHAR)."""
        start = self.pos
        data = self.data
        while self.pos < len(data) and (
            data[self.pos] not in _ATOM_SPECIALS or data[self.pos] in extra
        ):
            if data[self.pos] > 0x7F and not self.utf8:
                break
            self.pos += 1
        if self.pos == start:
            found = data[self.pos : self.pos + 20].decode("utf-8", "replace")
            raise ParseError(f"expected an atom at {found!r}")
        return data[start : self.pos].decode("utf-8", "replace")

    def word(self) -> str:
        """An atom, upper-cased (command names, keywords)."""
        return self.atom().upper()

    def number(self, *, limit: int = MAX_NUMBER, nonzero: bool = False) -> int:
        start = self.pos
        while self.pos < len(self.data) and 0x30 <= self.data[self.pos] <= 0x39:
            self.pos += 1
        digits = self.data[start : self.pos]
        if not digits:
            raise ParseError("expected a number")
        if len(digits) > 20 or int(digits) > limit:
            raise ParseError(f"number {digits[:24].decode()} out of range")
        value = int(digits)
        if nonzero and value == 0:
            raise ParseError("expected a number greater than 0")
        return value

    def quoted(self) -> bytes:
        self.expect(b'"')
        out = bytearray()
        data = self.data
        while True:
            if self.pos >= len(data):
                raise ParseError("unterminated quoted string")
            c = data[self.pos]
            self.pos += 1
            if c == 0x22:
                return bytes(out)
            if c == 0x5C:
                if self.pos >= len(data) or data[self.pos] not in b'"\\':
                    raise ParseError("bad escape in a quoted string")
                c = data[self.pos]
                self.pos += 1
            elif c in (0x0D, 0x0A, 0x00):
                # RFC 9051 9: QUOTED-CHAR includes UTF-8 (checked when the string is decoded).
                raise ParseError("character not allowed in a quoted string")
            out.append(c)

    def literal(self, *, binary: bool = False) -> bytes:
        """``{n}CRLF`` + n bytes (framed already); with ``binary`` also literal8 ``~{n}``."""
        is8 = self.take(b"~")
        if is8 and not binary:
            raise ParseError("literal8 not allowed here")
        self.expect(b"{")
        size = self.number(limit=2**63)
        self.take(b"+") or self.take(b"-")
        self.expect(b"}\r\n")
        if self.pos + size > len(self.data):
            raise ParseError("literal shorter than announced")
        value = self.data[self.pos : self.pos + size]
        self.pos += size
        if not binary and b"\x00" in value:
            raise ParseError("NUL in a literal")  # RFC 9051 4.3: only literal8 may carry NUL
        return value

    def string_bytes(self) -> bytes:
        if self.peek(b'"'):
            return self.quoted()
        if self.peek(b"{"):
            return self.literal()
        raise ParseError("expected a string")

    def string(self) -> str:
        return _text(self.string_bytes())

    def astring_bytes(self) -> bytes:
        if self.peek(b'"') or self.peek(b"{"):
            return self.string_bytes()
        return self.atom(extra=b"]").encode("utf-8")

    def astring(self) -> str:
        return _text(self.astring_bytes())

    def nstring(self) -> str | None:
        if self.peek_ci("NIL") and not self._atom_continues(3):
            self.pos += 3
            return None
        return self.string()

    def _atom_continues(self, length: int) -> bool:
        after = self.pos + length
        return after < len(self.data) and self.data[after] not in _ATOM_SPECIALS

    # structured values

    def sequence_set(self) -> SequenceSet:
        if self.take(b"$"):
            return SequenceSet((), saved=True)
        ranges: list[tuple[int | None, int | None]] = []
        while True:
            low = self._seq_number()
            high = self._seq_number() if self.take(b":") else low
            ranges.append((low, high))
            if len(ranges) > MAX_LIST:
                raise ParseError(f"more than {MAX_LIST} ranges in a sequence set")
            if not self.take(b","):
                return SequenceSet(tuple(ranges))

    def _seq_number(self) -> int | None:
        if self.take(b"*"):
            return Star
        return self.number(nonzero=True)

    def flag(self) -> str:
        """A flag or keyword: ``\\Seen`` (system flags canonically capitalised) or an atom."""
        if self.take(b"\\"):
            name = self.atom()
            canonical = _SYSTEM_FLAGS.get(name.upper())
            if canonical is None:
                raise ParseError(f"unknown system flag \\{name}")
            return canonical
        return self.atom()

    def flag_list(self) -> list[str]:
        return self.list_of(self.flag)

    def mailbox(self) -> str:
        """A mailbox name, decoded (modified UTF-7, or UTF-8 after ENABLE UTF8=ACCEPT)."""
        return self.decode_mailbox(self.astring_bytes())

    def _decode_name(self, raw: bytes, what: str) -> str:
        """A mailbox name or pattern: modified UTF-7, or UTF-8 after ENABLE UTF8=ACCEPT."""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ParseError(f"{what} is not UTF-8") from None
        if not self.utf8 or text.isascii():
            try:
                text = decode_mailbox(text)
            except MailboxNameError as err:
                if not self.utf8:
                    raise ParseError(str(err)) from None
        return text

    def decode_mailbox(self, raw: bytes) -> str:
        text = self._decode_name(raw, "mailbox name")
        # RFC 9051 5.1: INBOX is case-insensitive.
        if text.upper() == "INBOX":
            return "INBOX"
        if text.upper().startswith("INBOX/"):
            return "INBOX" + text[5:]
        return text

    def list_mailbox(self) -> str:
        """RFC 9051 9 list-mailbox: a string, or atom chars plus % * ]; decoded like a mailbox."""
        if self.peek(b'"') or self.peek(b"{"):
            raw = self.string_bytes()
        else:
            raw = self.atom(extra=b"%*]").encode("utf-8")
        return self._decode_name(raw, "mailbox pattern")

    def date(self) -> date:
        """RFC 9051 9 date: ``d-Mon-yyyy``, optionally quoted."""
        quoted = self.take(b'"')
        start = self.pos
        while self.pos < len(self.data) and self.data[self.pos] not in b' )"':
            self.pos += 1
        text = self.data[start : self.pos].decode("ascii", "replace")
        if quoted:
            self.expect(b'"')
        match = re.fullmatch(r"(\d{1,2})-([A-Za-z]{3})-(\d{4})", text)
        if match is None or match.group(2).capitalize() not in _MONTHS:
            raise ParseError(f"bad date {text!r}")
        try:
            return date(
                int(match.group(3)),
                _MONTHS.index(match.group(2).capitalize()) + 1,
                int(match.group(1)),
            )
        except ValueError:
            raise ParseError(f"bad date {text!r}") from None

    def date_time(self) -> datetime:
        """RFC 9051 9 date-time: ``"dd-Mon-yyyy hh:mm:ss +zzzz"``."""
        text = self.quoted().decode("ascii", "replace")
        match = re.fullmatch(
            r"([ \d]\d)-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)", text
        )
        if match is None or match.group(2).capitalize() not in _MONTHS:
            raise ParseError(f"bad date-time {text!r}")
        d, mon, y, hh, mm, ss, sign, zh, zm = match.groups()
        offset = timedelta(hours=int(zh), minutes=int(zm)) * (-1 if sign == "-" else 1)
        try:
            return datetime(
                int(y), _MONTHS.index(mon.capitalize()) + 1, int(d), int(hh), int(mm), int(ss),
                tzinfo=timezone(offset),
            )  # fmt: skip
        except ValueError:
            raise ParseError(f"bad date-time {text!r}") from None


_SYSTEM_FLAGS = {
    f.upper(): "\\" + f for f in ("Seen", "Answered", "Flagged", "Deleted", "Draft", "Recent")
}


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ParseError("string is not UTF-8") from None


def format_date_time(moment: datetime) -> str:
    """RFC 9051 9 date-time text (without quotes): ``"dd-Mon-yyyy hh:mm:ss +zzzz"``."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    offset = moment.utcoffset() or timedelta(0)
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    minutes = abs(minutes)
    return (
        f"{moment.day:2d}-{_MONTHS[moment.month - 1]}-{moment.year:04d} "
        f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d} {sign}{minutes // 60:02d}{minutes % 60:02d}"
    )
