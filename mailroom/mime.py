"""MIME structure of one message for IMAP: ENVELOPE, BODYSTRUCTURE, body sections, BINARY, SEARCH.

Owns ``Section`` (a FETCH section address) and ``Message``, the view of one stored message that
FETCH and SEARCH need. Sans-IO (no socket, not even through ``email.utils``): it takes the
message octets and returns IMAP values (``mailroom.imap.wire.Value``) or octets.

Promises:

- Sections are the exact original octets (RFC 9051 6.4.5.1); nothing is normalized or rewritten.
  The line end before a boundary delimiter belongs to the delimiter (RFC 2046 5.1.1), also after
  an enclosed multipart's close delimiter (where Dovecot counts it into the part). Sizes and line
  counts in BODY/BODYSTRUCTURE are of the octets as given (CRLF, as IMAP serves them); a line
  count is the number of line ends in the body, as Dovecot counts.
- ENVELOPE strings are the raw header values, unfolded (RFC 5322 2.2.3: CRLF removed, the
  whitespace kept) and trimmed; encoded words stay encoded, since RFC 9051 7.5.2 makes the
  envelope the parsed header, not a decoded one. 8-bit header octets are returned as they are
  (``bytes``: the wire layer sends them as a literal, or quoted under UTF8=ACCEPT). A field that
  occurs twice counts once, the first time. Empty list members (``a@b, , c@d``) are skipped.
- An address without a domain gets the host ``MISSING_DOMAIN``, one without a local part the
  mailbox ``MISSING_MAILBOX`` (a NIL host would mean a group, RFC 9051 7.5.2; the names are
  Dovecot's). An address without a display name takes its comment as the name
  (``joe@example.com (Joe)``); an unquoted address as the name (``a@b <a@b>``) is kept as the name.
- Media types, subtypes, parameter names, encodings and disposition types are upper-cased
  (ASCII only); parameter values are kept. RFC 2231: continuations (``name*0``, ``name*1``) are
  joined into ``NAME``; charset-tagged values (``name*``, ``name*0*``...) are decoded, converted
  to UTF-8, joined and returned as ``NAME*`` in RFC 2231 form, ``utf-8'<lang>'<percent-encoded>``,
  which keeps the value 7-bit (RFC 9051 7.5.2 SHOULD); a charset Python does not know is kept as
  it is. Content-Language is a string for one tag, a list for several; Content-Location has its
  folding whitespace removed (RFC 2557 4.4.3).
- Defaults: no (or an invalid) Content-Type is text/plain; charset=us-ascii (RFC 2045 5.2), inside
  multipart/digest a missing one is message/rfc822 (RFC 2046 5.1.5); a text/* part without
  charset gets ``("CHARSET" "US-ASCII")`` (RFC 2046 4.1.2); no Content-Transfer-Encoding is 7BIT.
  message/global is described like message/rfc822, with envelope (RFC 9051 9, body-type-msg).
- Malformed input never raises. A multipart without a boundary parameter, or whose boundary
  never appears, has one headerless text/plain part holding its whole body (Dovecot shows an
  empty part instead; here the content stays reachable); a missing close delimiter ends the last
  part at the end of the body. Nesting deeper than ``MAX_DEPTH`` and entities past ``MAX_PARTS``
  are opaque: reported as application/octet-stream with no sub-parts. A message/rfc822 part with
  base64 or quoted-printable encoding (forbidden by RFC 2046 5.2.1, yet seen) is decoded to
  describe the enclosed message, and its sub-sections address the decoded octets; one with
  another encoding is opaque, since a MESSAGE/RFC822 body structure must carry an envelope.
  Header lines that are not fields (no colon, bad name) are skipped, also by HEADER.FIELDS.NOT.
- BINARY decodes base64 and quoted-printable leniently (junk skipped, padding repaired).
- Work is lazy and done once: ENVELOPE parses only the top header; BODYSTRUCTURE, numeric
  sections, BINARY and ``text()`` parse the MIME tree, which is kept as offsets into the message.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

from mailroom.addresses import ATEXT, DOT_ATOM
from mailroom.errors import UnknownTransferEncodingError
from mailroom.imap.wire import Adjacent, Value

MAX_DEPTH = 100
"""Entities nested deeper than this (multipart in multipart, message in message) are opaque."""
MAX_PARTS = 10_000
"""Entities of one message past this count are not split further (opaque)."""

MISSING_DOMAIN = "MISSING_DOMAIN"
MISSING_MAILBOX = "MISSING_MAILBOX"

_IDENTITY = frozenset({"7BIT", "8BIT", "BINARY"})


@dataclass(frozen=True, slots=True)
class Section:
    """A body section address of FETCH BODY[...] / BINARY[...] (RFC 9051 6.4.5).

    ``part`` is the part number path (``()`` for the whole message, ``(1, 2)`` for ``1.2``);
    ``text`` is ``""``, ``"HEADER"``, ``"HEADER.FIELDS"``, ``"HEADER.FIELDS.NOT"``, ``"TEXT"``
    or ``"MIME"``; ``fields`` are the upper-cased field names of HEADER.FIELDS(.NOT).
    """

    part: tuple[int, ...] = ()
    text: str = ""
    fields: tuple[str, ...] = ()


# -- header ------------------------------------------------------------------------------------

_FIELD_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 3.6.8 ftext


class _Header:
    """The header of one entity: its fields, found once, as offsets into the entity's buffer.

    ``start`` is its first octet, ``fields_end`` where the blank line starts, ``end`` the first
    octet of the body (after the blank line; equal to ``fields_end`` when there is none).
    """

    __slots__ = ("_index", "end", "fields", "fields_end", "start", "text")

    def __init__(self, buf: bytes, start: int, end: int) -> None:
        self.start = start
        if buf.startswith(b"\r\n", start, end):
            fields_end, body = start, start + 2
        elif buf.startswith(b"\n", start, end):
            fields_end, body = start, start + 1
        else:
            crlf = buf.find(b"\n\r\n", start, end)
            lf = buf.find(b"\n\n", start, end if crlf < 0 else crlf + 1)
            if lf >= 0:
                fields_end, body = lf + 1, lf + 2
            elif crlf >= 0:
                fields_end, body = crlf + 1, crlf + 3
            else:
                fields_end = body = end
        self.fields_end = fields_end
        self.end = body
        # latin-1 maps octets to code points one to one: offsets stay octet offsets, and
        # ``.encode("latin-1")`` gives the original octets back.
        self.text = buf[start:fields_end].decode("latin-1")
        # Each field: [NAME, first offset, end offset (after its last line end), value offset],
        # offsets relative to ``start``.
        self.fields: list[tuple[str, int, int, int]] = []
        self._index: dict[str, list[int]] | None = None
        self._parse()

    @classmethod
    def empty(cls, buf: bytes, at: int) -> _Header:
        return cls(buf, at, at)

    def _parse(self) -> None:
        text = self.text
        n = len(text)
        fields = self.fields
        pos = 0
        name = ""  # the field being read; "" after a line that is not a field
        fstart = fend = vstart = 0
        while pos < n:
            nl = text.find("\n", pos)
            line_end = n if nl < 0 else nl + 1
            c = text[pos]
            if c == " " or c == "\t":
                fend = line_end  # a continuation line (of nothing, after a garbage line)
            else:
                if name:
                    fields.append((name, fstart, fend, vstart))
                    name = ""
                colon = text.find(":", pos, line_end)
                if colon > pos:
                    candidate = text[pos:colon].rstrip(" \t")  # "Subject : x" is Subject
                    if _FIELD_NAME.fullmatch(candidate):
                        name, fstart, fend, vstart = candidate.upper(), pos, line_end, colon + 1
            pos = line_end
        if name:
            fields.append((name, fstart, fend, vstart))

    def _lookup(self) -> dict[str, list[int]]:
        if self._index is None:
            index: dict[str, list[int]] = {}
            for i, field in enumerate(self.fields):
                index.setdefault(field[0], []).append(i)
            self._index = index
        return self._index

    def value(self, i: int) -> str:
        """The raw value of field ``i``: after the colon, folding kept, last line end removed."""
        _, _, end, vstart = self.fields[i]
        v = self.text[vstart:end]
        if v.endswith("\n"):
            v = v[:-2] if v.endswith("\r\n") else v[:-1]
        return v

    def get(self, name: str) -> str | None:
        """The unfolded, trimmed value of the first ``name`` field (upper-case), or None."""
        found = self._lookup().get(name)
        return None if found is None else _unfold(self.value(found[0]))

    def all(self, name: str) -> list[str]:
        return [_unfold(self.value(i)) for i in self._lookup().get(name, ())]


def _unfold(value: str) -> str:
    # RFC 5322 2.2.3: unfolding removes the CRLF, not the whitespace after it.
    if "\n" in value:
        value = value.replace("\r\n", "").replace("\n", "")
    return value.strip(" \t\r")


_ASCII_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _upper(text: str) -> str:
    """ASCII-only upper case: 8-bit octets (as latin-1 code points) stay as they are."""
    return text.upper() if text.isascii() else text.translate(_ASCII_UPPER)


def _out(text: str) -> str | bytes:
    """A header-derived string for the wire: ``str`` when ASCII, else the original octets."""
    return text if text.isascii() else text.encode("latin-1")


def _nstring(text: str | None) -> Value:
    return None if text is None else _out(text)


# -- structured header values (RFC 2045 tokens, RFC 5322 comments) ------------------------------

_TOKEN = re.compile(r'[^\x00-\x20()<>@,;:\\"/\[\]?=\x7f]+')  # RFC 2045 5.1 token (8-bit allowed)
_EXTENDED = re.compile(r"([^*]+)\*(?:(\d{1,3})(\*)?|(\*))?")  # RFC 2231 name*, name*0, name*0*
_ATTRIBUTE_CHAR = frozenset(
    b"!#$&+-.0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ^_`abcdefghijklmnopqrstuvwxyz{|}~"
)
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")


def _comment_end(s: str, i: int) -> int:
    """The offset after the comment that starts at ``s[i] == "("`` (nested, quoted-pairs)."""
    depth = 0
    n = len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return n


def _skip_cfws(s: str, i: int) -> int:
    n = len(s)
    while i < n:
        c = s[i]
        if c in " \t\r\n":
            i += 1
        elif c == "(":
            i = _comment_end(s, i)
        else:
            break
    return i


def _quoted(s: str, i: int) -> tuple[str, int]:
    """The content of the quoted string at ``s[i] == '"'`` (quoted-pairs undone), and its end."""
    out: list[str] = []
    n = len(s)
    i += 1
    while i < n:
        c = s[i]
        if c == '"':
            return "".join(out), i + 1
        if c == "\\" and i + 1 < n:
            i += 1
            c = s[i]
        out.append(c)
        i += 1
    return "".join(out), n


def _next_semicolon(s: str, i: int) -> int:
    n = len(s)
    while i < n:
        c = s[i]
        if c == ";":
            return i
        if c == '"':
            i = _quoted(s, i)[1]
        elif c == "(":
            i = _comment_end(s, i)
        else:
            i += 1
    return n


def _raw_params(s: str, i: int) -> list[tuple[str, str]]:
    """``; attribute=value`` pairs from ``s[i:]``, leniently (RFC 2045 5.1)."""
    params: list[tuple[str, str]] = []
    n = len(s)
    while True:
        i = _next_semicolon(s, i)
        if i >= n:
            return params
        i = _skip_cfws(s, i + 1)
        m = _TOKEN.match(s, i)
        if m is None:
            continue
        attribute = m.group()
        i = _skip_cfws(s, m.end())
        if i >= n or s[i] != "=":
            continue
        i = _skip_cfws(s, i + 1)
        if i < n and s[i] == '"':
            value, i = _quoted(s, i)
        else:
            # Lenient: an unquoted value runs to the next ';' (``name=my file.pdf``), comments out.
            chunks: list[str] = []
            start = i
            while i < n and s[i] != ";":
                if s[i] == "(":
                    chunks.append(s[start:i])
                    i = _comment_end(s, i)
                    start = i
                else:
                    i += 1
            chunks.append(s[start:i])
            value = "".join(chunks).strip(" \t")
        params.append((attribute, value))


def _percent_encode(data: bytes) -> str:
    return "".join(chr(b) if b in _ATTRIBUTE_CHAR else f"%{b:02X}" for b in data)


def _charset_decode(data: bytes, charset: str) -> str | None:
    """``data`` decoded from ``charset``, errors replaced; None when the charset is unknown."""
    try:
        return data.decode(_charset_name(charset), "replace")
    except (LookupError, ValueError):
        return None


def _charset_name(charset: str) -> str:
    name = charset.strip().lower()
    # us-ascii text with 8-bit octets is nearly always UTF-8 in practice; UTF-8 decodes ASCII the same.
    if name in ("us-ascii", "ascii", "unknown-8bit", "x-unknown", ""):
        return "utf-8"
    return name


def _params(raw: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Upper-cased attribute names, RFC 2231 continuations joined and charsets decoded."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    # name -> segment number -> (encoded, value), in order of first appearance
    extended: dict[str, dict[int, tuple[bool, str]]] = {}
    slots: list[tuple[str, str] | str] = []
    for attribute, value in raw:
        name = _upper(attribute)
        m = _EXTENDED.fullmatch(name) if "*" in name else None
        if m is None:
            slots.append((name, value))
            continue
        base = m.group(1)
        number = int(m.group(2)) if m.group(2) is not None else 0
        encoded = m.group(3) is not None or m.group(4) is not None
        if m.group(2) is None and m.group(4) is None:  # "name*" alone
            encoded = True
        segments = extended.get(base)
        if segments is None:
            segments = extended[base] = {}
            slots.append(base)
        segments.setdefault(number, (encoded, value))
    for slot in slots:
        if isinstance(slot, tuple):
            name, value = slot
        else:
            name, value = _join_2231(slot, extended[slot])
        if name not in seen:
            seen.add(name)
            out.append((name, value))
    return out


def _join_2231(base: str, segments: dict[int, tuple[bool, str]]) -> tuple[str, str]:
    ordered = [segments[k] for k in sorted(segments)]
    if not any(encoded for encoded, _ in ordered):
        return base, "".join(v for _, v in ordered)
    charset = language = ""
    chunks: list[bytes] = []
    for index, (encoded, value) in enumerate(ordered):
        if index == 0 and encoded and value.count("'") >= 2:
            charset, language, value = value.split("'", 2)
        if encoded:
            chunks.append(
                _PERCENT.sub(lambda m: chr(int(m.group(1), 16)), value).encode("latin-1", "replace")
            )
        else:
            chunks.append(value.encode("latin-1", "replace"))
    data = b"".join(chunks)
    text = _charset_decode(data, charset) if charset else None
    if text is None:
        return base + "*", f"{charset}'{language}'{_percent_encode(data)}"
    return base + "*", f"utf-8'{language}'{_percent_encode(text.encode('utf-8'))}"


@dataclass(frozen=True, slots=True)
class _ContentType:
    type: str
    subtype: str
    params: tuple[tuple[str, str], ...]

    def param(self, name: str) -> str | None:
        for key, value in self.params:
            if key == name:
                return value
        return None


_TEXT_PLAIN = _ContentType("TEXT", "PLAIN", (("CHARSET", "US-ASCII"),))
_MESSAGE_RFC822 = _ContentType("MESSAGE", "RFC822", ())


def _content_type(value: str | None, in_digest: bool) -> _ContentType:
    if value is None:
        return _MESSAGE_RFC822 if in_digest else _TEXT_PLAIN  # RFC 2046 5.1.5, RFC 2045 5.2
    i = _skip_cfws(value, 0)
    m = _TOKEN.match(value, i)
    if m is None:
        return _TEXT_PLAIN  # RFC 2045 5.2: an invalid Content-Type is taken as text/plain
    i = _skip_cfws(value, m.end())
    if i >= len(value) or value[i] != "/":
        return _TEXT_PLAIN
    j = _skip_cfws(value, i + 1)
    s = _TOKEN.match(value, j)
    if s is None:
        return _TEXT_PLAIN
    type_, subtype = _upper(m.group()), _upper(s.group())
    params = _params(_raw_params(value, s.end()))
    if type_ == "TEXT" and not any(k == "CHARSET" for k, _ in params):
        params.insert(0, ("CHARSET", "US-ASCII"))  # RFC 2046 4.1.2: the default charset
    return _ContentType(type_, subtype, tuple(params))


def _param_list(params: tuple[tuple[str, str], ...] | list[tuple[str, str]]) -> Value:
    if not params:
        return None
    flat: list[Value] = []
    for key, value in params:
        flat.append(_out(key))
        flat.append(_out(value))
    return flat


def _disposition(value: str | None) -> Value:
    if value is None:
        return None
    i = _skip_cfws(value, 0)
    m = _TOKEN.match(value, i)
    if m is None:
        return None
    return [_out(_upper(m.group())), _param_list(_params(_raw_params(value, m.end())))]


def _language(value: str | None) -> Value:
    if value is None:
        return None
    tags: list[Value] = []
    for item in value.split(","):
        i = _skip_cfws(item, 0)
        m = _TOKEN.match(item, i)
        if m is not None:
            tags.append(_out(m.group()))
    if not tags:
        return None
    return tags[0] if len(tags) == 1 else tags


def _location(value: str | None) -> Value:
    if value is None:
        return None
    # RFC 2557 4.4.3 (folding per RFC 2017 3.1): a URI holds no whitespace; folding is removed.
    return _out("".join(value.split()))


def _encoding(value: str | None) -> str:
    if value is None:
        return "7BIT"  # RFC 2045 6.1
    m = _TOKEN.match(value, _skip_cfws(value, 0))
    return "7BIT" if m is None else _upper(m.group())


# -- addresses (RFC 5322 3.4, for ENVELOPE) ----------------------------------------------------

_ADDRESS_TOKEN = re.compile(
    r"""(?P<ws>[ \t\r\n]+)
    |(?P<atom>[^\x00-\x20()<>\[\]:;@\\,."\x7f]+)
    |"(?P<qs>(?:[^"\\]|\\.)*)(?:"|\Z)
    |(?P<dl>\[(?:[^\]\\]|\\.)*(?:\]|\Z))
    |(?P<other>.)""",
    re.S | re.X,
)
_QUOTED_PAIR = re.compile(r"\\(.)", re.S)
_WORD = ("atom", "qs")


@dataclass(slots=True)
class _Tok:
    kind: str  # atom, qs, dl, cmt, or the special character itself
    text: str
    space: bool  # whitespace (or a comment) came before it


def _address_tokens(value: str) -> list[_Tok]:
    tokens: list[_Tok] = []
    space = False
    pos = 0
    n = len(value)
    while pos < n:
        m = _ADDRESS_TOKEN.match(value, pos)
        assert m is not None  # the last alternative matches any character
        kind = m.lastgroup
        if kind == "ws":
            space = True
        elif kind == "other" and m.group() == "(":
            end = _comment_end(value, pos)
            inner = value[pos + 1 : end - 1 if value[end - 1 : end] == ")" else end]
            tokens.append(_Tok("cmt", " ".join(_QUOTED_PAIR.sub(r"\1", inner).split()), space))
            space = True
            pos = end
            continue
        elif kind == "atom":
            tokens.append(_Tok("atom", m.group(), space))
            space = False
        elif kind == "qs":
            tokens.append(_Tok("qs", _QUOTED_PAIR.sub(r"\1", m.group("qs")), space))
            space = False
        elif kind == "dl":
            tokens.append(_Tok("dl", m.group(), space))
            space = False
        else:
            tokens.append(_Tok(m.group(), m.group(), space))
            space = False
        pos = m.end()
    return tokens


def _phrase(tokens: list[_Tok]) -> str:
    """A display name: words with one space where the message had whitespace."""
    out: list[str] = []
    for t in tokens:
        if t.kind == "cmt":
            continue
        if out and t.space:
            out.append(" ")
        out.append(t.text)
    return "".join(out)


def _local_part(tokens: list[_Tok]) -> str:
    """A local part with RFC 5322 quoting removed; CFWS around dots dropped."""
    out: list[str] = []
    previous = ""
    for t in tokens:
        if t.kind == "cmt":
            continue
        if out and t.space and t.kind in _WORD and previous in _WORD:
            out.append(" ")
        out.append(t.text)
        previous = t.kind
    return "".join(out)


def _domain(tokens: list[_Tok]) -> str:
    return "".join(t.text for t in tokens if t.kind != "cmt")


def _address(chunk: list[_Tok]) -> Value | None:
    """One address structure from the tokens of one mailbox; None when there is nothing."""
    if not any(t.kind != "cmt" for t in chunk):
        return None
    comments = [t.text for t in chunk if t.kind == "cmt" and t.text]
    kinds = [t.kind for t in chunk]
    route: str | None = None
    if "<" in kinds:
        open_ = kinds.index("<")
        name = _phrase(chunk[:open_])
        inner = chunk[open_ + 1 :]
        inner_kinds = [t.kind for t in inner]
        if ">" in inner_kinds:
            inner = inner[: inner_kinds.index(">")]
        inner = [t for t in inner if t.kind != "cmt"]
        if inner and inner[0].kind == "@" and any(t.kind == ":" for t in inner):
            colon = [t.kind for t in inner].index(":")
            route = "".join(t.text for t in inner[:colon])
            inner = inner[colon + 1 :]
        spec = inner
    else:
        name = ""
        spec = chunk
    if not name and comments:
        name = comments[-1]
    spec_kinds = [t.kind for t in spec]
    if "@" in spec_kinds:
        at = spec_kinds.index("@")
        local, domain = _local_part(spec[:at]), _domain(spec[at + 1 :])
    else:
        local, domain = _local_part(spec), ""
    return [
        _out(name) if name else None,
        _out(route) if route else None,
        _out(local) if local else MISSING_MAILBOX,
        _out(domain) if domain else MISSING_DOMAIN,
    ]


# One mailbox as nearly every message writes it: a dot-atom address, bare or in angle brackets
# after a display name of plain atoms. Read by this expression, it gives what the tokens give.
_SIMPLE_MAILBOX = re.compile(
    rf"[ \t\r\n]*(?:(?:((?:{ATEXT}[ \t\r\n]+)*{ATEXT})[ \t\r\n]*)?<({DOT_ATOM})@({DOT_ATOM})>"
    rf"|({DOT_ATOM})@({DOT_ATOM}))[ \t\r\n]*"
)


def _addresses(value: str | None) -> Value:
    """The ENVELOPE address list of a header value; None when absent or empty (RFC 9051 7.5.2)."""
    if value is None:
        return None
    simple = _SIMPLE_MAILBOX.fullmatch(value)
    if simple is not None:
        name, local, domain, bare_local, bare_domain = simple.groups()
        if local is None:
            local, domain = bare_local, bare_domain
        words = " ".join(name.split()) if name else None  # one space where there was any
        return [Adjacent(([words, None, local, domain],))]
    out: list[Value] = []
    chunk: list[_Tok] = []
    in_group = angle = False

    def flush() -> None:
        address = _address(chunk)
        if address is not None:
            out.append(address)
        chunk.clear()

    for t in _address_tokens(value):
        k = t.kind
        if angle:
            chunk.append(t)
            angle = k != ">"
        elif k == "<":
            angle = True
            chunk.append(t)
        elif k == ",":
            flush()
        elif (
            k == ":"
            and not in_group
            and any(c.kind in _WORD for c in chunk)
            and all(c.kind in ("atom", "qs", ".", "cmt") for c in chunk)
        ):
            # RFC 9051 7.5.2: a group starts with (NIL NIL name NIL) and ends with (NIL NIL NIL NIL).
            out.append([None, None, _out(_phrase(chunk)), None])
            chunk.clear()
            in_group = True
        elif k == ";" and in_group:
            flush()
            out.append([None, None, None, None])
            in_group = False
        else:
            chunk.append(t)
    flush()
    if in_group:
        out.append([None, None, None, None])
    # RFC 9051 9: "(" 1*address ")": no space between the addresses.
    return [Adjacent(tuple(out))] if out else None


def _envelope(header: _Header) -> Value:
    """RFC 9051 7.5.2 ENVELOPE of a header."""
    get = header.get
    from_ = _addresses(get("FROM"))
    return [
        _nstring(get("DATE")),
        _nstring(get("SUBJECT")),
        from_,
        _addresses(get("SENDER")) or from_,  # RFC 9051 7.5.2: sender and reply-to default to from
        _addresses(get("REPLY-TO")) or from_,
        _addresses(get("TO")),
        _addresses(get("CC")),
        _addresses(get("BCC")),
        _nstring(get("IN-REPLY-TO")),
        _nstring(get("MESSAGE-ID")),
    ]


# -- transfer encodings and charsets -------------------------------------------------------------

_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]+")
_LINE_END = re.compile(rb"\r?\n|\r")


def _base64(data: bytes) -> bytes:
    """Lenient base64: junk and padding ignored, a dangling last character dropped."""
    try:
        return binascii.a2b_base64(data)  # skips line ends and junk; fails on bad padding
    except binascii.Error:
        pass
    clean = _NOT_BASE64.sub(b"", data)
    extra = len(clean) % 4
    if extra == 1:
        clean = clean[:-1]
    elif extra:
        clean += b"=" * (4 - extra)
    return binascii.a2b_base64(clean)


def _decode_transfer(data: bytes, encoding: str) -> bytes:
    if encoding in _IDENTITY:
        return data
    if encoding == "BASE64":
        return _base64(data)
    if encoding == "QUOTED-PRINTABLE":
        return binascii.a2b_qp(data)
    raise UnknownTransferEncodingError(f"unknown Content-Transfer-Encoding {encoding!r}")


def _text_of(data: bytes, charset: str | None) -> str:
    """Octets as text: from ``charset`` when known, else UTF-8; errors replaced."""
    text = _charset_decode(data, charset) if charset else None
    return data.decode("utf-8", "replace") if text is None else text


def _header_text(value: str) -> str:
    """A raw header value (latin-1 str) as Unicode: 8-bit octets read as UTF-8, else latin-1."""
    if value.isascii():
        return value
    raw = value.encode("latin-1")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return value


_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")


def _decode_words(value: str) -> str:
    """RFC 2047 encoded words decoded; whitespace between adjacent ones dropped (RFC 2047 6.2).

    Adjacent words in one charset are joined before decoding, so a character split across
    two words (a common encoder bug) survives. Unknown charsets decode as UTF-8, errors replaced.
    """
    if "=?" not in value:
        return value
    out: list[str] = []
    pending: tuple[str, bytearray] | None = None
    pos = 0
    for m in _ENCODED_WORD.finditer(value):
        gap = value[pos : m.start()]
        charset = m.group(1).split("*", 1)[0]  # RFC 2231 5: charset*language
        text = m.group(3).encode("latin-1", "replace")
        data = _base64(text) if m.group(2) in "bB" else binascii.a2b_qp(text, header=True)
        if pending is not None and not gap.strip(" \t"):
            if pending[0].lower() == charset.lower():
                pending[1].extend(data)
            else:
                out.append(_text_of(bytes(pending[1]), pending[0]))
                pending = (charset, bytearray(data))
        else:
            if pending is not None:
                out.append(_text_of(bytes(pending[1]), pending[0]))
            out.append(gap)
            pending = (charset, bytearray(data))
        pos = m.end()
    if pending is not None:
        out.append(_text_of(bytes(pending[1]), pending[0]))
    out.append(value[pos:])
    return "".join(out)


# -- the MIME tree -------------------------------------------------------------------------------


class _Entity:
    """A header and a body: the message, a part of a multipart, or an enclosed message.

    ``children`` are the parts of a multipart (None for anything else); ``message`` is the
    enclosed message of a message/rfc822 or message/global part; ``opaque`` marks a multipart
    or message not looked into (too deep, too many parts, unusable encoding).
    """

    __slots__ = (
        "buf",
        "children",
        "content_type",
        "encoding",
        "end",
        "header",
        "message",
        "opaque",
    )

    def __init__(self, buf: bytes, header: _Header, end: int, content_type: _ContentType) -> None:
        self.buf = buf
        self.header = header
        self.end = end
        self.content_type = content_type
        self.encoding = _encoding(header.get("CONTENT-TRANSFER-ENCODING"))
        self.children: list[_Entity] | None = None
        self.message: _Entity | None = None
        self.opaque = False

    def body(self) -> bytes:
        return self.buf[self.header.end : self.end]

    def header_bytes(self) -> bytes:
        return self.buf[self.header.start : self.header.end]

    def lines(self) -> int:
        return self.buf.count(b"\n", self.header.end, self.end)

    def is_text(self) -> bool:
        return self.content_type.type == "TEXT"

    def walk(self) -> Iterator[_Entity]:
        yield self
        if self.children is not None:
            for child in self.children:
                yield from child.walk()
        elif self.message is not None:
            yield from self.message.walk()


class _Parser:
    """Builds the entity tree of one message, within MAX_DEPTH and MAX_PARTS."""

    def __init__(self) -> None:
        self.count = 0

    def entity(
        self,
        buf: bytes,
        start: int,
        end: int,
        depth: int,
        in_digest: bool = False,
        header: _Header | None = None,
        content_type: _ContentType | None = None,
    ) -> _Entity:
        self.count += 1
        if header is None:
            header = _Header(buf, start, end)
        if content_type is None:
            content_type = _content_type(header.get("CONTENT-TYPE"), in_digest)
        e = _Entity(buf, header, end, content_type)
        kind = content_type.type
        container = kind == "MULTIPART" or (
            kind == "MESSAGE" and content_type.subtype in ("RFC822", "GLOBAL")
        )
        if not container:
            return e
        if depth >= MAX_DEPTH or self.count >= MAX_PARTS:
            e.opaque = True
        elif kind == "MULTIPART":
            self._split(e, depth)
        elif e.encoding in _IDENTITY:
            e.message = self.entity(buf, header.end, end, depth + 1)
        elif e.encoding in ("BASE64", "QUOTED-PRINTABLE"):
            inner = _decode_transfer(e.body(), e.encoding)
            e.message = self.entity(inner, 0, len(inner), depth + 1)
        else:
            e.opaque = True
        return e

    def _split(self, e: _Entity, depth: int) -> None:
        """RFC 2046 5.1.1: the parts between the delimiter lines of a multipart body."""
        buf, body, end = e.buf, e.header.end, e.end
        boundary = e.content_type.param("BOUNDARY")
        ranges = _part_ranges(buf, body, end, boundary) if boundary else []
        digest = e.content_type.subtype == "DIGEST"
        if not ranges:
            # No boundary, or it never appears: the whole body is one headerless text part.
            e.children = [
                self.entity(
                    buf,
                    body,
                    end,
                    depth + 1,
                    header=_Header.empty(buf, body),
                    content_type=_TEXT_PLAIN,
                )
            ]
            return
        room = max(1, MAX_PARTS - self.count)
        if len(ranges) > room:  # past the budget, the rest of the body stays in the last part
            ranges = [*ranges[: room - 1], (ranges[room - 1][0], ranges[-1][1])]
        e.children = [self.entity(buf, s, t, depth + 1, digest) for s, t in ranges]


def _part_ranges(buf: bytes, body: int, end: int, boundary: str) -> list[tuple[int, int]]:
    delimiter = b"--" + boundary.encode("latin-1", "replace")
    ranges: list[tuple[int, int]] = []
    part_start = -1
    pos = body
    while True:
        i = buf.find(delimiter, pos, end)
        if i < 0:
            break
        pos = i + 1
        if i != body and buf[i - 1] != 0x0A:
            continue  # not at the start of a line
        j = i + len(delimiter)
        close = buf.startswith(b"--", j, end)
        k = j + 2 if close else j
        while k < end and buf[k] in b" \t":  # transport padding
            k += 1
        if k < end and buf[k] not in b"\r\n":
            continue  # a longer line that merely starts with the delimiter
        # The line end before the delimiter belongs to the delimiter (RFC 2046 5.1.1).
        previous = i
        if i > body:
            previous = i - 2 if i - 2 >= body and buf[i - 2] == 0x0D else i - 1
        if part_start >= 0:
            ranges.append((part_start, max(part_start, previous)))
        if close:
            return ranges
        nl = buf.find(b"\n", k, end)
        part_start = end if nl < 0 else nl + 1
        pos = part_start
    if part_start >= 0:
        ranges.append((part_start, end))  # no close delimiter: the last part runs to the end
    return ranges


def _structure(e: _Entity, extended: bool) -> Value:
    """BODYSTRUCTURE (``extended``) or BODY of an entity (RFC 9051 7.5.2, 9 body)."""
    get = e.header.get
    if e.children is not None:
        # RFC 9051 9: body-type-mpart = 1*body SP media-subtype: no space between the bodies.
        multi: list[Value] = [Adjacent(tuple(_structure(child, extended) for child in e.children))]
        multi.append(_out(e.content_type.subtype))
        if extended:
            multi += [
                _param_list(e.content_type.params),
                _disposition(get("CONTENT-DISPOSITION")),
                _language(get("CONTENT-LANGUAGE")),
                _location(get("CONTENT-LOCATION")),
            ]
        return multi
    ct = e.content_type
    if e.opaque:
        type_, subtype = "APPLICATION", "OCTET-STREAM"
    else:
        type_, subtype = ct.type, ct.subtype
    part: list[Value] = [
        _out(type_),
        _out(subtype),
        _param_list(ct.params),
        _nstring(get("CONTENT-ID")),
        _nstring(get("CONTENT-DESCRIPTION")),
        _out(e.encoding),
        e.end - e.header.end,
    ]
    if e.message is not None:
        part += [_envelope(e.message.header), _structure(e.message, extended), e.lines()]
    elif type_ == "TEXT":
        part.append(e.lines())
    if extended:
        part += [
            _nstring(get("CONTENT-MD5")),
            _disposition(get("CONTENT-DISPOSITION")),
            _language(get("CONTENT-LANGUAGE")),
            _location(get("CONTENT-LOCATION")),
        ]
    return part


def _sub(e: _Entity, n: int) -> _Entity | None:
    """Part ``n`` inside entity ``e`` (RFC 9051 6.4.5.1)."""
    if e.children is not None:
        return e.children[n - 1] if 0 < n <= len(e.children) else None
    if e.message is not None:
        return _sub_of_message(e.message, n)
    return None


def _sub_of_message(m: _Entity, n: int) -> _Entity | None:
    """Part ``n`` of a message: a multipart's parts, else part 1 is the message's own body."""
    if m.children is not None:
        return _sub(m, n)
    return m if n == 1 else None


def _header_section(buf: bytes, header: _Header, end: int, section: Section) -> bytes | None:
    """HEADER, HEADER.FIELDS (.NOT) or TEXT of the message whose header is ``header``."""
    kind = section.text
    if kind == "HEADER":
        return buf[header.start : header.end]
    if kind == "TEXT":
        return buf[header.end : end]
    if kind in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
        wanted = frozenset(_upper(name) for name in section.fields)
        keep = kind == "HEADER.FIELDS"
        base = header.start
        out: list[bytes] = []
        for name, fstart, fend, _ in header.fields:
            if (name in wanted) == keep:
                chunk = buf[base + fstart : base + fend]
                out.append(chunk if chunk.endswith(b"\n") else chunk + b"\r\n")
        # RFC 9051 6.4.5.1: subsetting does not exclude the delimiting blank line.
        out.append(buf[header.fields_end : header.end])
        return b"".join(out)
    return None


# -- dates (RFC 5322 3.3 and 4.3) ------------------------------------------------------------------
# Our own parser: email.utils imports socket, and this module stays sans-IO.

_DATE = re.compile(
    r"""^\s*(?:[A-Za-z]+\s*,?\s*)?                          # day of week (obs: no comma)
    (\d{1,2})\s*[-\s]?\s*([A-Za-z]{3,9})\.?\s*[-\s]?\s*(\d{2,4})  # day month year
    \s+(\d{1,2})\s*:\s*(\d{2})(?:\s*:\s*(\d{2}))?                 # time
    \s*([+-]\d{4}|[A-Za-z]{1,5})?""",
    re.X,
)
_ASCTIME = re.compile(
    r"^\s*[A-Za-z]+\s+([A-Za-z]{3})\s+(\d{1,2})\s+(\d{1,2}):(\d{2})(?::(\d{2}))?\s+(\d{4})"
)
_MONTHS = {
    m: i
    for i, m in enumerate(
        ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], 1
    )
}
_ZONES = {"UT": 0, "GMT": 0, "Z": 0, "EST": -5, "EDT": -4, "CST": -6, "CDT": -5, "MST": -7}
_ZONES |= {"MDT": -6, "PST": -8, "PDT": -7}


def _parse_date(value: str) -> datetime | None:
    """An RFC 5322 date-time (obsolete forms too) as an aware datetime in its own zone.

    ``-0000``, unknown and military zones are taken as UTC (RFC 5322 4.3); None if unparseable.
    """
    zone = ""
    m = _DATE.match(value)
    if m is not None:
        day, month_name, year_text, hour, minute, second, zone = m.groups(default="")
    else:
        a = _ASCTIME.match(value)
        if a is None:
            return None
        month_name, day, hour, minute, second, year_text = a.groups(default="")
    month = _MONTHS.get(month_name[:3].lower())
    if month is None:
        return None
    year = int(year_text)
    if len(year_text) == 2:
        year += 2000 if year < 50 else 1900  # RFC 5322 4.3
    elif len(year_text) == 3:
        year += 1900
    offset = 0
    if zone[:1] in ("+", "-"):
        minutes = int(zone[1:3]) * 60 + int(zone[3:5])
        offset = -minutes if zone[0] == "-" else minutes
    elif zone:
        offset = _ZONES.get(zone.upper(), 0) * 60
    try:
        tz = timezone(timedelta(minutes=offset)) if offset else UTC
        return datetime(
            year, month, int(day), int(hour), int(minute), min(int(second or 0), 59), tzinfo=tz
        )
    except ValueError:
        return None


# -- the message -----------------------------------------------------------------------------------


class Message:
    """One message's MIME structure, parsed lazily and once; see the module docstring."""

    __slots__ = ("_body", "_date", "_envelope", "_header", "_raw", "_root", "_structure")

    def __init__(self, raw: bytes) -> None:
        self._raw = raw
        self._header: _Header | None = None
        self._root: _Entity | None = None
        self._envelope: Value = None
        self._structure: Value = None
        self._body: Value = None
        self._date: tuple[datetime | None] | None = None

    def _top(self) -> _Header:
        if self._header is None:
            self._header = _Header(self._raw, 0, len(self._raw))
        return self._header

    def _tree(self) -> _Entity:
        if self._root is None:
            self._root = _Parser().entity(self._raw, 0, len(self._raw), 0, header=self._top())
        return self._root

    def _resolve(self, part: tuple[int, ...]) -> _Entity | None:
        e = _sub_of_message(self._tree(), part[0])
        for n in part[1:]:
            if e is None:
                return None
            e = _sub(e, n)
        return e

    def envelope(self) -> Value:
        """ENVELOPE (RFC 9051 7.5.2)."""
        if self._envelope is None:
            self._envelope = _envelope(self._top())
        return self._envelope

    def bodystructure(self) -> Value:
        """BODYSTRUCTURE with extension data (RFC 9051 7.5.2)."""
        if self._structure is None:
            self._structure = _structure(self._tree(), True)
        return self._structure

    def body(self) -> Value:
        """BODY: BODYSTRUCTURE without extension data."""
        if self._body is None:
            self._body = _structure(self._tree(), False)
        return self._body

    def section(self, section: Section) -> bytes | None:
        """The octets of BODY[section] (RFC 9051 6.4.5.1); None when there is no such part."""
        if not section.part:
            if section.text == "":
                return self._raw
            return _header_section(self._raw, self._top(), len(self._raw), section)
        e = self._resolve(section.part)
        if e is None:
            return None
        if section.text == "":
            return e.body()
        if section.text == "MIME":
            return e.header_bytes()
        # HEADER and TEXT after a part number need a message/rfc822 (or global) part.
        m = e.message
        if m is None:
            return None
        return _header_section(m.buf, m.header, m.end, section)

    def binary(self, part: tuple[int, ...]) -> bytes | None:
        """BINARY[part] (RFC 9051 6.4.5, RFC 3516): the content with its transfer encoding removed.

        ``()`` is the whole message as it is; a multipart's body is returned as it is (its
        encoding can only be an identity one, RFC 2045 6.4). Text is sent with CRLF line ends
        (RFC 9051 7.5.2). Raises UnknownTransferEncodingError for an encoding other than 7bit,
        8bit, binary, base64 and quoted-printable.
        """
        if not part:
            return self._raw
        e = self._resolve(part)
        if e is None:
            return None
        data = e.body()
        if e.children is not None:
            return data
        decoded = _decode_transfer(data, e.encoding)
        if e.is_text() and not e.opaque and e.encoding not in _IDENTITY:
            decoded = _LINE_END.sub(b"\r\n", decoded)
        return decoded

    def binary_size(self, part: tuple[int, ...]) -> int | None:
        """BINARY.SIZE[part]: the length of ``binary(part)``."""
        if not part:
            return len(self._raw)
        e = self._resolve(part)
        if e is None:
            return None
        if e.children is not None or e.encoding in _IDENTITY:
            return e.end - e.header.end
        data = self.binary(part)
        return None if data is None else len(data)

    def header_values(self, name: str) -> list[str]:
        """Every value of the top-level field ``name``: unfolded, 8-bit read as UTF-8 (else
        latin-1), RFC 2047 encoded words decoded (for SEARCH HEADER/FROM/TO/SUBJECT...)."""
        return [_decode_words(_header_text(v)) for v in self._top().all(_upper(name))]

    def text(self) -> str:
        """The decoded text of every text/* part, enclosed messages included (SEARCH BODY)."""
        out: list[str] = []
        for e in self._tree().walk():
            if e.children is not None or e.message is not None or e.opaque or not e.is_text():
                continue
            try:
                data = _decode_transfer(e.body(), e.encoding)
            except UnknownTransferEncodingError:
                data = e.body()
            out.append(_text_of(data, e.content_type.param("CHARSET")))
        return "\n".join(out)

    def date(self) -> datetime | None:
        """The Date: header as an aware datetime (its own zone; -0000 taken as UTC), or None."""
        if self._date is None:
            value = self._top().get("DATE")
            self._date = (None if value is None else _parse_date(value),)
        return self._date[0]
