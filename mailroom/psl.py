"""The Public Suffix List: which part of a domain name is a public suffix, and the
organizational domain DMARC aligns on (RFC 7489 3.2).

What this module owns: reading the list Debian's ``publicsuffix`` package installs
(``/usr/share/publicsuffix/public_suffix_list.dat``, ICANN and private sections alike) and the
list's algorithm (https://publicsuffix.org/list/): normal rules, ``*.`` wildcards, ``!``
exceptions, and the implicit rule ``*`` for a name no rule matches. Names are compared in
lower case, ASCII (A-labels), without the final dot.

The list is read once per process, on first use (``default_list``); ``PublicSuffixList``
takes the text itself, so tests give it their own rules.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_PATH = Path("/usr/share/publicsuffix/public_suffix_list.dat")
ORG_CACHE = 4096  # organizational domains remembered per list (DMARC asks for each message)


class PublicSuffixList:
    """The rules of one list; ``public_suffix`` and ``organizational_domain`` apply them."""

    def __init__(self, text: str) -> None:
        self._rules: set[str] = set()
        self._wildcards: set[str] = set()  # "*.ck" stored as "ck"
        self._exceptions: set[str] = set()  # "!www.ck" stored as "www.ck"
        self._organizational: dict[str, str] = {}  # answers given, at most ORG_CACHE
        for line in text.splitlines():
            # A rule is the first whitespace-delimited word of a line; "//" starts a comment.
            words = line.split()
            if not words or words[0].startswith("//"):
                continue
            rule = _to_ascii(words[0].lower())
            if rule.startswith("!"):
                self._exceptions.add(rule[1:])
            elif rule.startswith("*."):
                self._wildcards.add(rule[2:])
            else:
                self._rules.add(rule)

    @classmethod
    def load(cls, path: Path = DEFAULT_PATH) -> PublicSuffixList:
        return cls(path.read_text(encoding="utf-8"))

    def public_suffix(self, domain: str) -> str:
        """The public suffix of ``domain`` (at least its last label)."""
        labels = _labels(domain)
        # Longest matching rule wins; an exception rule beats every other rule, and its
        # suffix is the exception minus its leftmost label.
        for i in range(len(labels)):
            candidate = ".".join(labels[i:])
            if candidate in self._exceptions:
                return ".".join(labels[i + 1 :])
            if candidate in self._rules:
                return candidate
            if i + 1 < len(labels) and ".".join(labels[i + 1 :]) in self._wildcards:
                return candidate
        return labels[-1] if labels else ""  # the implicit rule "*"

    def organizational_domain(self, domain: str) -> str:
        """RFC 7489 3.2: the public suffix plus one label; the name itself if it is a suffix."""
        known = self._organizational.get(domain)
        if known is None:
            if len(self._organizational) >= ORG_CACHE:
                self._organizational.clear()
            known = self._organizational[domain] = self._organizational_domain(domain)
        return known

    def _organizational_domain(self, domain: str) -> str:
        labels = _labels(domain)
        suffix = self.public_suffix(domain)
        count = len(suffix.split(".")) if suffix else 0
        if len(labels) <= count:
            return ".".join(labels)
        return ".".join(labels[-count - 1 :])


def _to_ascii(name: str) -> str:
    try:
        return name.encode("idna").decode("ascii") if not name.isascii() else name
    except UnicodeError:
        return name


def _labels(domain: str) -> list[str]:
    name = _to_ascii(domain.strip().rstrip(".").lower())
    return [label for label in name.split(".") if label]


@cache
def default_list() -> PublicSuffixList:
    """Debian's list, read on first use. Without it (package ``publicsuffix`` missing) only
    the implicit rule ``*`` is left: every organizational domain is the last two labels, wrong
    for ``co.uk`` and the like; this is logged once."""
    try:
        return PublicSuffixList.load()
    except OSError as err:
        log.warning(
            "cannot read the Public Suffix List (%s): install Debian's publicsuffix package;"
            " DMARC takes the last two labels of a name as its organizational domain meanwhile",
            err,
        )
        return PublicSuffixList("")


def organizational_domain(domain: str) -> str:
    """The organizational domain of ``domain`` by Debian's Public Suffix List."""
    return default_list().organizational_domain(domain)
