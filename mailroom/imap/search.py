"""SEARCH criteria: parsing them from a command (RFC 9051 6.4.4, RFC 3501 6.4.4, RFC 7162 3.1.5,
RFC 4731 ESEARCH RETURN options) and deciding whether one message matches.

Sans-IO: a message is seen through ``Candidate``, which the session builds; its text parts are
loaded only when a key needs them (flag, size, date and set keys never read the file).
String keys match case-insensitively as substrings (RFC 9051 6.4.4).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Protocol

from mailroom.imap.parser import MAX_NUMBER64, Args, ParseError, SequenceSet

CHARSETS = ("UTF-8", "US-ASCII")
RETURN_OPTIONS = ("MIN", "MAX", "ALL", "COUNT", "SAVE")


class BadCharsetError(Exception):
    """RFC 9051 6.4.4: an unsupported CHARSET gets NO [BADCHARSET (...)]."""


# -- the key tree -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class All:
    pass


@dataclass(frozen=True, slots=True)
class HasFlag:
    flag: str  # "\\Seen", a keyword, or "\\Recent"
    present: bool = True


@dataclass(frozen=True, slots=True)
class DateKey:
    sent: bool  # Date: header (SENT*) or INTERNALDATE
    op: str  # "BEFORE", "ON", "SINCE"
    day: date


@dataclass(frozen=True, slots=True)
class SizeKey:
    larger: bool
    size: int


@dataclass(frozen=True, slots=True)
class HeaderKey:
    field: str  # upper-case
    text: str


@dataclass(frozen=True, slots=True)
class TextKey:
    body_only: bool  # BODY (body only) or TEXT (header and body)
    text: str


@dataclass(frozen=True, slots=True)
class SetKey:
    numbers: SequenceSet
    uid: bool


@dataclass(frozen=True, slots=True)
class ModSeqKey:
    modseq: int


@dataclass(frozen=True, slots=True)
class Not:
    key: Key


@dataclass(frozen=True, slots=True)
class Or:
    left: Key
    right: Key


@dataclass(frozen=True, slots=True)
class And:
    keys: tuple[Key, ...]


Key = All | HasFlag | DateKey | SizeKey | HeaderKey | TextKey | SetKey | ModSeqKey | Not | Or | And


@dataclass(frozen=True, slots=True)
class SearchRequest:
    key: Key
    returns: tuple[str, ...] | None  # None: no RETURN (plain SEARCH response)


# -- parsing ----------------------------------------------------------------------------------

_FLAG_KEYS: dict[str, Key] = {
    "ANSWERED": HasFlag("\\Answered"),
    "DELETED": HasFlag("\\Deleted"),
    "DRAFT": HasFlag("\\Draft"),
    "FLAGGED": HasFlag("\\Flagged"),
    "SEEN": HasFlag("\\Seen"),
    "RECENT": HasFlag("\\Recent"),
    "UNANSWERED": HasFlag("\\Answered", False),
    "UNDELETED": HasFlag("\\Deleted", False),
    "UNDRAFT": HasFlag("\\Draft", False),
    "UNFLAGGED": HasFlag("\\Flagged", False),
    "UNSEEN": HasFlag("\\Seen", False),
    "NEW": And((HasFlag("\\Recent"), HasFlag("\\Seen", False))),
    "OLD": HasFlag("\\Recent", False),
    "ALL": All(),
}
_HEADER_KEYS = {"BCC", "CC", "FROM", "SUBJECT", "TO"}
_DATE_KEYS = {
    "BEFORE": (False, "BEFORE"),
    "ON": (False, "ON"),
    "SINCE": (False, "SINCE"),
    "SENTBEFORE": (True, "BEFORE"),
    "SENTON": (True, "ON"),
    "SENTSINCE": (True, "SINCE"),
}
MAX_KEYS = 1000  # search keys in one command


def parse_search(args: Args, *, esearch: bool = True) -> SearchRequest:
    """``[RETURN (...)] [CHARSET x] key *(SP key)`` after "SEARCH " (RFC 4731 3, RFC 9051 6.4.4)."""
    returns: tuple[str, ...] | None = None
    if esearch and args.peek_ci("RETURN "):
        args.word()
        args.sp()
        options = args.list_of(args.word)
        for option in options:
            if option not in RETURN_OPTIONS:
                raise ParseError(f"unknown RETURN option {option}")
        returns = tuple(options) or ("ALL",)  # RFC 4731 3.1: RETURN () means ALL
        args.sp()
    if args.peek_ci("CHARSET "):
        args.word()
        args.sp()
        charset = args.astring().upper()
        if charset not in CHARSETS:
            raise BadCharsetError(charset)
        args.sp()
    counter = [0]
    keys = [_key(args, counter)]
    while not args.at_end():
        args.sp()
        keys.append(_key(args, counter))
    return SearchRequest(keys[0] if len(keys) == 1 else And(tuple(keys)), returns)


def _key(args: Args, counter: list[int]) -> Key:
    counter[0] += 1
    if counter[0] > MAX_KEYS:
        raise ParseError(f"more than {MAX_KEYS} search keys")
    if args.peek(b"("):
        args.open()
        keys = [_key(args, counter)]
        while not args.take(b")"):
            args.sp()
            keys.append(_key(args, counter))
        args.depth -= 1
        return keys[0] if len(keys) == 1 else And(tuple(keys))
    if (
        args.peek(b"*")
        or args.peek(b"$")
        or (args.pos < len(args.data) and 0x30 <= args.data[args.pos] <= 0x39)
    ):
        return SetKey(args.sequence_set(), uid=False)
    name = args.word()
    if name in _FLAG_KEYS:
        return _FLAG_KEYS[name]
    if name in ("KEYWORD", "UNKEYWORD"):
        args.sp()
        return HasFlag(args.atom(), name == "KEYWORD")
    if name in _HEADER_KEYS:
        args.sp()
        return HeaderKey(name, args.astring())
    if name == "HEADER":
        args.sp()
        field = args.astring().upper()
        args.sp()
        return HeaderKey(field, args.astring())
    if name in ("BODY", "TEXT"):
        args.sp()
        return TextKey(name == "BODY", args.astring())
    if name in _DATE_KEYS:
        args.sp()
        sent, op = _DATE_KEYS[name]
        return DateKey(sent, op, args.date())
    if name in ("LARGER", "SMALLER"):
        args.sp()
        return SizeKey(name == "LARGER", args.number(limit=MAX_NUMBER64))
    if name == "UID":
        args.sp()
        return SetKey(args.sequence_set(), uid=True)
    if name == "NOT":
        args.sp()
        _descend(args)
        key: Key = Not(_key(args, counter))
        args.depth -= 1
        return key
    if name == "OR":
        args.sp()
        _descend(args)
        left = _key(args, counter)
        args.sp()
        key = Or(left, _key(args, counter))
        args.depth -= 1
        return key
    if name == "MODSEQ":
        # RFC 7162 3.1.5: MODSEQ [entry-name entry-type-req] mod-sequence-valzer
        args.sp()
        if args.peek(b'"'):
            args.quoted()
            args.sp()
            entry_type = args.word()
            if entry_type not in ("PRIV", "SHARED", "ALL"):
                raise ParseError(f"bad MODSEQ entry type {entry_type}")
            args.sp()
        return ModSeqKey(args.number(limit=MAX_NUMBER64))
    raise ParseError(f"unknown search key {name}")


def _descend(args: Args) -> None:
    """NOT and OR nest like parentheses; the same depth limit applies."""
    args.depth += 1
    if args.depth > args.max_nesting:
        raise ParseError(f"search keys nested deeper than {args.max_nesting}")


def uses_modseq(key: Key) -> bool:
    """Whether ``key`` has a MODSEQ criterion (RFC 7162 3.1.5: then report the highest MODSEQ)."""
    if isinstance(key, ModSeqKey):
        return True
    if isinstance(key, Not):
        return uses_modseq(key.key)
    if isinstance(key, Or):
        return uses_modseq(key.left) or uses_modseq(key.right)
    if isinstance(key, And):
        return any(uses_modseq(k) for k in key.keys)
    return False


def header_fields(key: Key) -> set[str]:
    """The header fields ``key`` tests (FROM, SUBJECT, HEADER X-Foo ...), upper-case."""
    if isinstance(key, HeaderKey):
        return {key.field}
    if isinstance(key, Not):
        return header_fields(key.key)
    if isinstance(key, Or):
        return header_fields(key.left) | header_fields(key.right)
    if isinstance(key, And):
        return set().union(*(header_fields(k) for k in key.keys))
    return set()


# -- matching ---------------------------------------------------------------------------------


class Parsed(Protocol):
    """What string and sent-date keys need of a parsed message (``mailroom.mime.Message``)."""

    def header_values(self, name: str) -> list[str]: ...
    def text(self) -> str: ...
    def date(self) -> datetime | None: ...


@dataclass(slots=True)
class Candidate:
    """One message as search sees it; ``parsed`` and ``header_text`` load the file lazily."""

    seq: int
    uid: int
    flags: frozenset[str]  # with "\\Recent" when recent in this session
    size: int
    modseq: int
    internaldate: datetime
    largest_seq: int
    largest_uid: int
    load: Callable[[], Parsed]
    load_header_text: Callable[[], str]
    saved: frozenset[int] = frozenset()  # UIDs of "$" (RFC 5182)
    _parsed: Parsed | None = None
    _header_text: str | None = None

    def become(
        self, seq: int, uid: int, flags: frozenset[str], size: int, modseq: int, when: datetime
    ) -> None:
        """Stand for another message (one Candidate serves a whole SEARCH)."""
        self.seq, self.uid, self.flags, self.size = seq, uid, flags, size
        self.modseq, self.internaldate = modseq, when
        self._parsed = self._header_text = None

    @property
    def parsed(self) -> Parsed:
        if self._parsed is None:
            self._parsed = self.load()
        return self._parsed

    @property
    def header_text(self) -> str:
        if self._header_text is None:
            self._header_text = self.load_header_text()
        return self._header_text


FlagTest = Callable[[frozenset[str]], bool]


def flag_test(key: Key) -> FlagTest | None:
    """``key`` as a test of the flags alone, when that is all it looks at (UNSEEN, DELETED,
    NOT FLAGGED ...): the same answers as ``matches``, without a Candidate; else None."""
    if isinstance(key, All):
        return lambda flags: True
    if isinstance(key, HasFlag):
        flag = key.flag
        if key.present:
            return lambda flags: flag in flags
        return lambda flags: flag not in flags
    if isinstance(key, Not):
        inner = flag_test(key.key)
        return None if inner is None else lambda flags: not inner(flags)
    if isinstance(key, Or):
        left, right = flag_test(key.left), flag_test(key.right)
        if left is None or right is None:
            return None
        return lambda flags: left(flags) or right(flags)
    if isinstance(key, And):
        tests = [flag_test(k) for k in key.keys]
        if any(t is None for t in tests):
            return None
        chosen = [t for t in tests if t is not None]
        return lambda flags: all(t(flags) for t in chosen)
    return None


def matches(key: Key, c: Candidate) -> bool:
    """Whether message ``c`` satisfies ``key``."""
    if isinstance(key, All):
        return True
    if isinstance(key, HasFlag):
        return (key.flag in c.flags) == key.present
    if isinstance(key, SizeKey):
        return c.size > key.size if key.larger else c.size < key.size
    if isinstance(key, SetKey):
        if key.numbers.saved:
            return c.uid in c.saved
        if key.uid:
            return key.numbers.contains(c.uid, c.largest_uid)
        return key.numbers.contains(c.seq, c.largest_seq)
    if isinstance(key, ModSeqKey):
        return c.modseq >= key.modseq
    if isinstance(key, DateKey):
        if key.sent:
            sent = c.parsed.date()
            if sent is None:
                return False
            day = sent.date()
        else:
            day = c.internaldate.date()  # RFC 9051 6.4.4: disregarding time and timezone
        if key.op == "BEFORE":
            return day < key.day
        if key.op == "ON":
            return day == key.day
        return day >= key.day
    if isinstance(key, HeaderKey):
        values = c.parsed.header_values(key.field)
        if not key.text:
            return bool(values)  # RFC 9051 6.4.4: HEADER field "" matches any message with it
        needle = key.text.casefold()
        return any(needle in v.casefold() for v in values)
    if isinstance(key, TextKey):
        needle = key.text.casefold()
        if needle in c.parsed.text().casefold():
            return True
        return not key.body_only and needle in c.header_text.casefold()
    if isinstance(key, Not):
        return not matches(key.key, c)
    if isinstance(key, Or):
        return matches(key.left, c) or matches(key.right, c)
    return all(matches(k, c) for k in key.keys)
