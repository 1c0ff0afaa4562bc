"""Mail addresses: parsing, validation and normalisation.

What this module promises: a ``Localpart``/``Domain`` that passes ``normalise_*`` is safe
to use as one path component under ``{data_dir}/mail`` (no ``/``, ``\\``, NUL, control
characters, ``.`` or ``..``, no leading dot), and two spellings of the same name map to
one string: domains are lower-case IDNA A-labels, localparts are NFC and lower-case.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

from mailroom.errors import InvalidNameError

PLUS = "+"
MAX_LOCALPART = 64  # RFC 5321 4.5.3.1.1
MAX_DOMAIN = 253
# RFC 5322 3.2.3: atext, and a dot-atom of it, as regular-expression text: the quick readers
# of the usual SMTP path, From: field and ENVELOPE mailbox are built on them.
ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
DOT_ATOM = rf"{ATEXT}(?:\.{ATEXT})*"
_LABEL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_LOCAL_PUNCT = frozenset("._-+")


@dataclass(frozen=True, slots=True)
class Address:
    """A normalised ``localpart@domain``; ``tag`` is the part after ``+`` (or empty)."""

    localpart: str
    domain: str

    def __str__(self) -> str:
        return f"{self.localpart}@{self.domain}"

    @property
    def base(self) -> Address:
        """The address without its ``+tag`` (plus-addressing)."""
        user, sep, _ = self.localpart.partition(PLUS)
        return Address(user, self.domain) if sep and user else self

    @property
    def tag(self) -> str:
        user, _, tag = self.localpart.partition(PLUS)
        return tag if user else ""


@lru_cache(maxsize=1024)  # every RCPT asks; a valid name's answer never changes
def normalise_domain(domain: str) -> str:
    """Lower-case IDNA A-label form of ``domain``, or ``InvalidNameError``."""
    name = domain.strip().rstrip(".")
    if not name:
        raise InvalidNameError("empty domain name")
    if any(ord(c) < 0x21 or c in "/\\" for c in name):
        raise InvalidNameError(f"domain {domain!r} contains a forbidden character")
    try:
        ascii_name = unicodedata.normalize("NFC", name).encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise InvalidNameError(f"domain {domain!r} is not a valid IDNA name") from None
    labels = ascii_name.split(".")
    if len(ascii_name) > MAX_DOMAIN or len(labels) < 2:
        raise InvalidNameError(f"domain {domain!r} must be a fully qualified name like example.org")
    for label in labels:
        if not _LABEL_RE.match(label):
            raise InvalidNameError(f"domain {domain!r} has an invalid label {label!r}")
    return ascii_name


def normalise_localpart(localpart: str, *, allow_plus: bool = True) -> str:
    """NFC, lower-case localpart made of letters, digits and ``. _ -`` (and ``+``)."""
    name = unicodedata.normalize("NFC", localpart).lower()
    if not name:
        raise InvalidNameError("empty local part")
    if len(name.encode("utf-8")) > MAX_LOCALPART:
        raise InvalidNameError(f"local part {localpart!r} is longer than {MAX_LOCALPART} octets")
    for c in name:
        if c == PLUS and not allow_plus:
            raise InvalidNameError(f"local part {localpart!r} may not contain '+'")
        if not (c.isalnum() or c in _LOCAL_PUNCT):
            raise InvalidNameError(f"local part {localpart!r} contains a forbidden character {c!r}")
    if name[0] in ".+-" or name[-1] == "." or ".." in name:
        raise InvalidNameError(f"local part {localpart!r} has a misplaced '.', '+' or '-'")
    return name


def parse_address(text: str, *, allow_plus: bool = True) -> Address:
    """Parse and normalise ``localpart@domain`` (no display name, no angle brackets)."""
    localpart, at, domain = text.strip().rpartition("@")
    if not at or not localpart:
        raise InvalidNameError(f"{text!r} is not an address of the form user@domain")
    return Address(normalise_localpart(localpart, allow_plus=allow_plus), normalise_domain(domain))
