"""One user's mail store as IMAP and POP3 see it: mailboxes, UIDs, flags and mod-sequences
over the Maildir++ tree of ``mailroom.maildir``.

What this module owns
---------------------
* The mapping of IMAP mailbox names to Maildir++ folders. Names are Unicode with the hierarchy
  delimiter ``/``; ``INBOX`` (any case) is the Maildir root. On disk a folder is
  ``.{levels joined by "."}``, each level in modified UTF-7 (RFC 3501 5.1.3) with a ``.``
  inside a level written ``&AC4-``. Names that could leave the user's directory or are
  malformed are refused (``InvalidMailboxNameError``): empty levels (``a//b``, ``/x``, ``x/``),
  ``.`` and ``..`` levels, control characters, NUL, a space at either end of a level, more than
  255 characters or a folder name over the 255-byte file-name limit. Names are never
  normalised: ``Foo`` and ``foo``, NFC and NFD spellings, are different mailboxes.
* Flags in file names exactly as Dovecot writes them: ``{key}:2,{letters}`` with the letters
  sorted, ``D`` \\Draft, ``F`` \\Flagged, ``R`` \\Answered, ``S`` \\Seen, ``T`` \\Deleted, and
  keywords as ``a``-``z`` through the folder's ``dovecot-keywords`` file (``0 $Forwarded``
  lines). Letters mailroom does not know (``P``, unmapped keywords) are kept when it renames.
  \\Recent is not stored in files: the index records which messages no session has claimed.
* The durable UID record: ``mailroom-uidlist`` in each folder (``mailroom-uidlist 1
  V{uidvalidity} N{uidnext} M{highestmodseq}``, then ``{uid} {key}`` lines), rewritten
  atomically (tmp, fsync, rename, fsync the directory) before any UID it names is committed
  to the index. Special-use attributes are in ``mailroom-special-use`` and subscriptions in the
  Maildir++ ``subscriptions`` file (one UTF-8 name a line) at the root, written the same way.
* The index ``{root}/mailroom-index.sqlite3``: SQLite (WAL, busy_timeout), one per user for all
  folders, schema-versioned with ``PRAGMA user_version``. It is a cache of what the Maildir
  says plus what the Maildir cannot say (mod-sequences, expunge tombstones, \\Recent), and of
  what the IMAP server derived from a message's contents (its ENVELOPE, BODYSTRUCTURE and BODY
  as sent, ``cached_items``/``save_items``), so that no process parses a message twice.

What it promises
----------------
* The Maildir stays the truth and a valid Maildir++ tree that mutt and Dovecot read as it is.
  A missing, corrupt or outdated index is rebuilt automatically, and ``rebuild()`` (``mailroomctl
  index rebuild``) recreates it on demand, keeping every message, every flag, and every UID
  (and UIDVALIDITY) that a ``mailroom-uidlist`` still names; HIGHESTMODSEQ never goes back
  (a rebuilt mailbox starts at the current time in microseconds).
* RFC 9051 2.3.1.1: UIDs are strictly ascending in delivery order and never reused (UIDNEXT is
  persisted in the uidlist, also past an expunge of the highest UID); a message's UID never
  changes while UIDVALIDITY stays; a new mailbox gets a UIDVALIDITY greater than any before.
  RFC 7162: every change gets its own MODSEQ, HIGHESTMODSEQ only grows, and expunges leave
  tombstones with their MODSEQ for QRESYNC (beyond the oldest kept one, ``changes_since``
  reports every UID below UIDNEXT that is not there, as RFC 7162 3.2.10 allows).
* Several processes at once (delivery, IMAP, POP3, ``mailroomctl``): every index writer holds
  an exclusive ``flock`` on ``mailroom-index.lock`` and a ``BEGIN IMMEDIATE`` transaction, and
  re-reads the rows it changes inside it; a file renamed by someone else is found again by its
  key. No update is lost, no UID is given twice, no message gets two UIDs.
* STORE commits the index without waiting for the disk (the flags are in the renamed file
  names; a commit lost to a power cut is read back from them by the next sync, with new
  MODSEQs). Everything that assigns or removes a UID is fsync'd before it returns.
* APPEND, COPY and MOVE are durable before they return (``maildir.deliver_all``: tmp, fsync,
  link, fsync the directory; then the directory the file was renamed or linked into).
* EXPUNGE marks the messages in the index (commit), then unlinks the files and fsyncs the
  directory, then drops the rows. A crash in between loses nothing that was not expunged, and
  the next sync finishes the job: an expunged message never comes back under a new UID.
* ``sync`` with nothing new lists ``new/`` and ``cur/`` and compares the names with the index
  (cached in memory while SQLite's ``data_version`` says no other process wrote): no message
  file is opened or stat'ed. The listing itself is skipped while the mtimes of ``new/`` and
  ``cur/`` are those seen before a listing begun more than a second after them. When another
  process wrote the index, only the rows with a MODSEQ above the cached HIGHESTMODSEQ and the
  tombstones since are read. New files are stat'ed (their mtime is the internal date) but
  never read when their names carry the Maildir++ ``W=`` size. A sync that writes takes the
  names in ``new/`` and ``cur/`` from the process's inotify listings too, rather than listing
  them again, and a first sync makes its snapshot from the rows it writes, without reading
  them back. ``select`` (a read-write SELECT) writes the messages its sync indexes as claimed
  (\\Recent) in the same transaction, rather than in a second one.

Instances are safe to use from several threads; they are not meant to be shared across a fork.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import errno
import fcntl
import functools
import itertools
import logging
import os
import re
import secrets
import shutil
import sqlite3
import threading
import time
import unicodedata
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import itemgetter
from pathlib import Path
from types import TracebackType
from typing import Literal, NamedTuple, ParamSpec, TypeVar

from mailroom.errors import (
    InvalidFlagError,
    InvalidMailboxNameError,
    KeywordLimitError,
    MailboxExistsError,
    MailboxNotFoundError,
    MessageGoneError,
    SpecialUseError,
    StoreError,
)
from mailroom.imap.wire import MailboxNameError, decode_mailbox, encode_mailbox
from mailroom.listings import LISTINGS, Listings
from mailroom.maildir import FILE_MODE, Maildir, check_quota, deliver_all, fsync_dir

log = logging.getLogger(__name__)

INBOX = "INBOX"
DELIMITER = "/"
INDEX_NAME = "mailroom-index.sqlite3"
LOCK_NAME = "mailroom-index.lock"
UIDLIST_NAME = "mailroom-uidlist"
KEYWORDS_NAME = "dovecot-keywords"
SUBSCRIPTIONS_NAME = "subscriptions"
SPECIAL_USE_NAME = "mailroom-special-use"
TRASH_PREFIX = "mailroom-deleted."  # a deleted folder, renamed out of sight before removal
SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 10_000
LOCK_TIMEOUT = 30.0
MAX_NAME = 255
MAX_KEYWORDS = 26  # Dovecot's letters a-z
MAX_KEYWORD_LENGTH = 100
DIR_MTIME_SLACK_NS = 1_000_000_000  # see MailStore.sync: mtimes are trusted this long after
BULK_RENAMES = 256  # new/ -> cur/ moves above which the listings are read afresh after
MAX_TOMBSTONES = 10_000  # per mailbox; older expunges are then reported as "anything missing"
CHANGE_LOG_LENGTH = 1024  # changes a snapshot remembers (Snapshot.changed_since)

# Dovecot's maildir flag letters (maildir-util.c); "P" (passed) has no IMAP flag and is kept.
SYSTEM_FLAGS = {
    "\\Draft": "D",
    "\\Flagged": "F",
    "\\Answered": "R",
    "\\Seen": "S",
    "\\Deleted": "T",
}
_LETTER_FLAG = {letter: flag for flag, letter in SYSTEM_FLAGS.items()}
_SYSTEM_BY_LOWER = {flag.lower(): flag for flag in SYSTEM_FLAGS}
SEEN, DELETED = "\\Seen", "\\Deleted"
RECENT = "\\Recent"

DEFAULT_MAILBOXES = (
    ("Sent", "\\Sent"),
    ("Drafts", "\\Drafts"),
    ("Trash", "\\Trash"),
    ("Junk", "\\Junk"),
    ("Archive", "\\Archive"),
)
# RFC 6154 attributes of real folders; \All and \Flagged would be virtual mailboxes.
SPECIAL_USES = frozenset(attr for _, attr in DEFAULT_MAILBOXES)

_DOT = "&AC4-"  # "." inside a name level, in modified UTF-7
_SIZE_S = re.compile(r",S=(\d+)")
_SIZE_W = re.compile(r",W=(\d+)")
_ORDER = re.compile(r"^(\d+)\.(?:M(\d+))?")
_KEYWORD_SPECIALS = frozenset('(){ %*"\\]')
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26

P = ParamSpec("P")
R = TypeVar("R")
Unlink = Callable[[Path], None]


# -- the values the store hands out ----------------------------------------------------------


class MessageInfo(NamedTuple):
    """One message as IMAP sees it (a named tuple: a mailbox makes thousands at once)."""

    uid: int
    flags: frozenset[str]  # system flags and keywords; never \Recent
    modseq: int
    size: int  # octets with CRLF line ends (RFC822.SIZE; from W= when present)
    internaldate: datetime  # timezone-aware (UTC): the file's mtime
    key: str  # the stable Maildir base name (before ":2,"); POP3 UIDL uses it


@dataclass(frozen=True, slots=True)
class MailboxEntry:
    """One line of LIST."""

    name: str
    special_use: str | None
    has_children: bool
    subscribed: bool
    selectable: bool


@dataclass(frozen=True, slots=True)
class MailboxStatus:
    """What STATUS (and LIST-STATUS) report."""

    name: str
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    messages: int
    unseen: int
    deleted: int
    size: int
    recent: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A mailbox after a sync: its messages in ascending UID order.

    A snapshot is shared: every IMAP session of the user in the process keeps the one it last
    told its client about, and looks messages up in it by UID (``uids``, for bisect) rather
    than keeping a copy of its own.
    """

    name: str
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    messages: tuple[MessageInfo, ...]
    uids: tuple[int, ...] = ()  # of ``messages``, in order; made from them if not given
    # The latest changes, oldest first: (MODSEQ, UID) of every message here whose MODSEQ is
    # above ``log_floor`` (None: the HIGHESTMODSEQ, an empty log), so that ``changed_since``
    # need not look at every message.
    log: tuple[tuple[int, int], ...] = field(default=(), compare=False)
    log_floor: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if len(self.uids) != len(self.messages):
            object.__setattr__(self, "uids", tuple(m.uid for m in self.messages))

    @property
    def logged_above(self) -> int:
        """The MODSEQ above which every change is in ``log``."""
        return self.highestmodseq if self.log_floor is None else self.log_floor

    def changed_since(self, modseq: int) -> list[MessageInfo]:
        """The messages whose MODSEQ is above ``modseq``, in UID order: every flag change and
        arrival since a snapshot whose HIGHESTMODSEQ was ``modseq`` (RFC 7162 3.1.1)."""
        if modseq < self.logged_above:
            return [m for m in self.messages if m.modseq > modseq]
        start = bisect.bisect_left(self.log, (modseq + 1,))
        found = []
        for uid in sorted({uid for _, uid in self.log[start:]}):
            i = bisect.bisect_left(self.uids, uid)
            if i < len(self.uids) and self.uids[i] == uid and self.messages[i].modseq > modseq:
                found.append(self.messages[i])
        return found


def _carried_log(
    old: Snapshot, changed: Iterable[MessageInfo]
) -> tuple[tuple[tuple[int, int], ...], int]:
    """``old``'s change log and floor with ``changed`` (each above its HIGHESTMODSEQ) added,
    for the snapshot after them: the last ``CHANGE_LOG_LENGTH`` changes."""
    log = old.log + tuple(sorted((m.modseq, m.uid) for m in changed))
    floor = old.logged_above
    if len(log) > CHANGE_LOG_LENGTH:
        floor = log[-CHANGE_LOG_LENGTH - 1][0]
        log = log[-CHANGE_LOG_LENGTH:]
    return log, floor


# -- mailbox names ---------------------------------------------------------------------------


def canonical_name(name: str) -> str:
    """``name`` checked, with a first level spelled INBOX in any case written ``INBOX``.

    Raises ``InvalidMailboxNameError`` for a name that is malformed or could leave the user's
    directory (see the module docstring). Nothing else is normalised.
    """
    if not name:
        raise InvalidMailboxNameError("the mailbox name is empty")
    if len(name) > MAX_NAME:
        raise InvalidMailboxNameError(f"mailbox names are at most {MAX_NAME} characters")
    for char in name:
        if unicodedata.category(char) in ("Cc", "Cs"):
            raise InvalidMailboxNameError(
                f"mailbox name {name!r} contains the control character U+{ord(char):04X}"
            )
    levels = name.split(DELIMITER)
    for level in levels:
        if level in ("", ".", ".."):
            raise InvalidMailboxNameError(
                f"mailbox name {name!r}: empty, '.' and '..' levels are not allowed"
            )
        if level != level.strip():
            raise InvalidMailboxNameError(
                f"mailbox name {name!r}: a level may not begin or end with a space"
            )
    if levels[0].upper() == INBOX:
        levels[0] = INBOX
    canonical = DELIMITER.join(levels)
    if canonical != INBOX and len(folder_name(canonical)) + 1 > 255:
        raise InvalidMailboxNameError(f"mailbox name {name!r} is too long for a folder on disk")
    return canonical


def folder_name(canonical: str) -> str:
    """The Maildir++ folder (without its leading dot) of a canonical name; ``""`` for INBOX."""
    if canonical == INBOX:
        return ""
    return ".".join(encode_mailbox(level).replace(".", _DOT) for level in canonical.split("/"))


def mailbox_name(folder: str) -> str | None:
    """The IMAP name of a Maildir++ folder, or None if the folder is not one mailroom writes."""
    if not folder:
        return INBOX
    try:
        levels = [
            ".".join(decode_mailbox(part) for part in level.split(_DOT))
            for level in folder.split(".")
        ]
        name = canonical_name(DELIMITER.join(levels))
    except (MailboxNameError, InvalidMailboxNameError):
        return None
    if name == INBOX or folder_name(name) != folder:
        return None
    return name


def _is_inferior(name: str, parent: str) -> bool:
    return name.startswith(parent + DELIMITER)


# -- flags -----------------------------------------------------------------------------------


def normalise_flags(flags: Iterable[str]) -> frozenset[str]:
    """System flags in their canonical spelling plus keywords; ``InvalidFlagError`` otherwise.

    RFC 9051 2.3.2: \\Recent cannot be set by a client; other ``\\`` names are not flags.
    """
    result: set[str] = set()
    for flag in flags:
        if flag.startswith("\\"):
            canonical = _SYSTEM_BY_LOWER.get(flag.lower())
            if canonical is None:
                what = "\\Recent cannot be set" if flag.lower() == "\\recent" else "no such flag"
                raise InvalidFlagError(f"{flag}: {what}")
            result.add(canonical)
            continue
        if (
            not flag
            or len(flag) > MAX_KEYWORD_LENGTH
            or any(c in _KEYWORD_SPECIALS or not "\x20" < c < "\x7f" for c in flag)
        ):
            raise InvalidFlagError(f"{flag!r} is not a valid keyword")
        result.add(flag)
    return frozenset(result)


def _split_name(filename: str) -> tuple[str, str]:
    """(key, flag letters) of a Maildir file name ``{key}:2,{letters}``."""
    key, _, info = filename.partition(":")
    return key, info[2:] if info.startswith("2,") else ""


class Keywords:
    """A folder's ``dovecot-keywords``: keyword ``n`` is the flag letter ``chr(ord('a') + n)``."""

    def __init__(self, folder_dir: Path) -> None:
        self.path = folder_dir / KEYWORDS_NAME
        self.names: dict[int, str] = {}
        self._stamp: tuple[int, int, int] | None = None
        self.reload()

    def reload(self) -> None:
        """Read the file again if it changed."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self.names, self._stamp = {}, None
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        names: dict[int, str] = {}
        try:
            text = self.path.read_text("utf-8", errors="replace")
        except FileNotFoundError:
            text = ""
        for line in text.splitlines():
            number, _, name = line.partition(" ")
            if number.isdigit() and int(number) < MAX_KEYWORDS and name:
                names[int(number)] = name
        self.names, self._stamp = names, stamp

    def flags(self, letters: str) -> frozenset[str]:
        """The IMAP flags of the letters after ``:2,`` (unknown letters are skipped)."""
        out: set[str] = set()
        for letter in letters:
            if letter in _LETTER_FLAG:
                out.add(_LETTER_FLAG[letter])
            elif "a" <= letter <= "z":
                name = self.names.get(ord(letter) - ord("a"))
                if name is not None:
                    out.add(name)
        return frozenset(out)

    def letters(self, flags: Iterable[str], keep: str = "") -> str:
        """The sorted letters for ``flags``, plus the letters of ``keep`` that name no flag.

        Every keyword must already have a letter (``allocate``).
        """
        by_name = {name.lower(): n for n, name in self.names.items()}
        out = {c for c in keep if c not in _LETTER_FLAG and not self._mapped(c)}
        for flag in flags:
            if flag in SYSTEM_FLAGS:
                out.add(SYSTEM_FLAGS[flag])
            else:
                out.add(chr(ord("a") + by_name[flag.lower()]))
        return "".join(sorted(out))

    def _mapped(self, letter: str) -> bool:
        return "a" <= letter <= "z" and ord(letter) - ord("a") in self.names

    def canonical(self, flags: frozenset[str]) -> frozenset[str]:
        """``flags`` with each keyword spelled as this folder already spells it."""
        by_name = {name.lower(): name for name in self.names.values()}
        return frozenset(by_name.get(f.lower(), f) if f not in SYSTEM_FLAGS else f for f in flags)

    def allocate(self, flags: Iterable[str], fsync: Callable[[int], None]) -> None:
        """Give every keyword in ``flags`` a letter, writing the file if one is new.

        Call with the index lock held. ``KeywordLimitError`` when the 26 letters run out.
        """
        self.reload()
        known = {name.lower() for name in self.names.values()}
        wanted: list[str] = []
        for f in sorted(flags):
            if f not in SYSTEM_FLAGS and f.lower() not in known:
                wanted.append(f)
                known.add(f.lower())
        if not wanted:
            return
        names = dict(self.names)
        free = (n for n in range(MAX_KEYWORDS) if n not in names)
        for flag in wanted:
            number = next(free, None)
            if number is None:
                raise KeywordLimitError(
                    f"cannot add keyword {flag}: this mailbox already has {MAX_KEYWORDS}"
                    " keywords, the most a Maildir can name"
                )
            names[number] = flag
        text = "".join(f"{n} {name}\n" for n, name in sorted(names.items()))
        _write_atomic(self.path, text.encode(), fsync)
        self.reload()


# -- small files written atomically ----------------------------------------------------------


def _write_atomic(path: Path, data: bytes, fsync: Callable[[int], None]) -> None:
    """Replace ``path`` with ``data``: write a temporary file, fsync, rename, fsync the dir."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent, fsync)


def special_uses(root: Path) -> dict[str, str]:
    """Mailbox name -> special-use attribute, from the Maildir root's ``mailroom-special-use``."""
    result: dict[str, str] = {}
    for line in _read_lines(root / SPECIAL_USE_NAME):
        attr, _, name = line.partition("\t")
        if attr in SPECIAL_USES and name:
            result[name] = attr
    return result


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text("utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []


@dataclass
class UidList:
    """The contents of a folder's ``mailroom-uidlist``."""

    uidvalidity: int
    uidnext: int
    highestmodseq: int
    uids: dict[str, int] = field(default_factory=dict)  # key -> uid

    def dump(self) -> bytes:
        lines = [f"mailroom-uidlist 1 V{self.uidvalidity} N{self.uidnext} M{self.highestmodseq}\n"]
        lines += [f"{uid} {key}\n" for key, uid in sorted(self.uids.items(), key=itemgetter(1))]
        return "".join(lines).encode("utf-8", errors="surrogateescape")

    @staticmethod
    def header_uidvalidity(folder_dir: Path) -> int:
        """The UIDVALIDITY a uidlist's first line names, however damaged the rest; else 0."""
        try:
            with open(folder_dir / UIDLIST_NAME, "rb") as f:
                first = f.readline(200)
        except FileNotFoundError:
            return 0
        match = re.match(rb"mailroom-uidlist 1 V(\d{1,10}) ", first)
        return int(match[1]) if match and int(match[1]) < 2**32 - 1 else 0

    @classmethod
    def read(cls, folder_dir: Path) -> UidList | None:
        """The uidlist, or None if it is missing or not entirely well-formed."""
        try:
            text = (folder_dir / UIDLIST_NAME).read_bytes().decode("utf-8", "surrogateescape")
        except FileNotFoundError:
            return None
        lines = text.split("\n")
        match = re.fullmatch(r"mailroom-uidlist 1 V(\d+) N(\d+) M(\d+)", lines[0])
        if match is None or lines[-1] != "":
            log.warning("%s: malformed %s; UIDs start over", folder_dir, UIDLIST_NAME)
            return None
        result = cls(int(match[1]), int(match[2]), int(match[3]))
        seen: set[int] = set()
        for line in lines[1:-1]:
            number, _, key = line.partition(" ")
            if not number.isdigit() or not key or int(number) in seen or key in result.uids:
                log.warning("%s: malformed %s; UIDs start over", folder_dir, UIDLIST_NAME)
                return None
            seen.add(int(number))
            result.uids[key] = int(number)
        if not 0 < result.uidvalidity < 2**32 or any(not 0 < uid < result.uidnext for uid in seen):
            log.warning("%s: inconsistent %s; UIDs start over", folder_dir, UIDLIST_NAME)
            return None
        return result


# -- the index -------------------------------------------------------------------------------

# Added in version 2: FETCH items derived from a message's contents, encoded as sent.
_DERIVED_TABLE = """CREATE TABLE derived (
        mailbox INTEGER NOT NULL,
        uid     INTEGER NOT NULL,
        item    TEXT NOT NULL,  -- ENVELOPE, BODYSTRUCTURE or BODY, +UTF8 after UTF8=ACCEPT
        value   BLOB NOT NULL,
        PRIMARY KEY (mailbox, uid, item),
        FOREIGN KEY (mailbox, uid) REFERENCES messages (mailbox, uid) ON DELETE CASCADE
    ) STRICT, WITHOUT ROWID"""
_SCHEMA = (
    """CREATE TABLE mailboxes (
        id             INTEGER PRIMARY KEY,
        name           TEXT NOT NULL UNIQUE,
        uidvalidity    INTEGER NOT NULL,
        uidnext        INTEGER NOT NULL,
        highestmodseq  INTEGER NOT NULL,
        vanished_floor INTEGER NOT NULL  -- expunges up to this modseq have no tombstone
    ) STRICT""",
    """CREATE TABLE messages (
        mailbox      INTEGER NOT NULL REFERENCES mailboxes (id) ON DELETE CASCADE,
        uid          INTEGER NOT NULL,
        key          TEXT NOT NULL,
        filename     TEXT NOT NULL,     -- the name in cur/
        flags        TEXT NOT NULL,     -- IMAP flags, space-separated, sorted
        modseq       INTEGER NOT NULL,
        size         INTEGER NOT NULL,
        internaldate INTEGER NOT NULL,  -- seconds since the epoch
        recent       INTEGER NOT NULL,  -- 1: no session has claimed it yet
        expunging    INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (mailbox, uid),
        UNIQUE (mailbox, key)
    ) STRICT, WITHOUT ROWID""",
    "CREATE INDEX messages_modseq ON messages (mailbox, modseq)",
    # last_uidvalidity: the greatest UIDVALIDITY handed out, also of mailboxes deleted since
    "CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL) STRICT",
    """CREATE TABLE expunged (
        mailbox INTEGER NOT NULL REFERENCES mailboxes (id) ON DELETE CASCADE,
        uid     INTEGER NOT NULL,
        modseq  INTEGER NOT NULL,
        PRIMARY KEY (mailbox, uid)
    ) STRICT, WITHOUT ROWID""",
    _DERIVED_TABLE,
)


class _Corrupt(Exception):
    """The index file is damaged."""


_WRITER_LOCKS: dict[Path, threading.RLock] = {}
_WRITER_LOCKS_GUARD = threading.Lock()


def _writer_lock(index: Path) -> threading.RLock:
    """The lock this process's writers of one index take before its lock file."""
    with _WRITER_LOCKS_GUARD:
        return _WRITER_LOCKS.setdefault(index, threading.RLock())


def _is_corrupt(err: sqlite3.DatabaseError) -> bool:
    code = getattr(err, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    return not isinstance(err, sqlite3.OperationalError)


class _Index:
    """The SQLite connection, the writers' lock, and replacement of a damaged file."""

    def __init__(self, root: Path, fsync: Callable[[int], None]) -> None:
        self.path = root / INDEX_NAME
        self.fsync = fsync
        self._lock_fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        self._conn: sqlite3.Connection | None = None
        self._flock_depth = 0  # nesting of _flock in the thread holding it
        self.inode = 0
        self.resets = 0
        try:
            with self._flock():
                self._open_locked()
        except BaseException:
            os.close(self._lock_fd)
            raise

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"the mail index {self.path} is closed")
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    @contextlib.contextmanager
    def _flock(self) -> Iterator[None]:
        # Writers of this process queue on a thread lock first (woken at once, in order);
        # the flock, polled, is then only contended by other processes.
        with _writer_lock(self.path):
            if self._flock_depth:  # nested (a rebuild inside a write): the flock is ours
                self._flock_depth += 1
                try:
                    yield
                finally:
                    self._flock_depth -= 1
                return
            with self._flock_file():
                self._flock_depth = 1
                try:
                    yield
                finally:
                    self._flock_depth = 0

    def settle(self) -> None:
        """Return once no other writer is in the middle of a write."""
        with self._flock():
            pass

    @contextlib.contextmanager
    def _flock_file(self) -> Iterator[None]:
        deadline = time.monotonic() + LOCK_TIMEOUT
        delay = 0.0005
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"the mail index {self.path} stayed locked for {LOCK_TIMEOUT:.0f} s"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.01)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _open_locked(self) -> None:
        """Open the file, replacing it if it is damaged or of another schema version."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        for attempt in range(2):
            try:
                self._conn = self._connect()
                break
            except (sqlite3.DatabaseError, _Corrupt) as err:
                if attempt or (isinstance(err, sqlite3.DatabaseError) and not _is_corrupt(err)):
                    raise StoreError(f"cannot open the mail index {self.path}: {err}") from None
                log.warning("%s is damaged (%s); rebuilding it from the Maildir", self.path, err)
                self._remove_files()
                self.resets += 1
        self.inode = os.stat(self.path).st_ino

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode != "wal":
                raise StoreError(f"{self.path}: cannot switch the mail index to WAL mode")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            (check,) = conn.execute("PRAGMA quick_check(1)").fetchone()
            if check != "ok":
                raise _Corrupt(check)
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version != SCHEMA_VERSION:
                self._create_schema(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        """The index is a cache: any other version is dropped and rebuilt from the Maildir
        (version 1 only lacks a table, which is added)."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Read again inside the transaction: another process may have been first.
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version in (1, SCHEMA_VERSION):
                if version == 1:
                    conn.execute(_DERIVED_TABLE)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
                return
            if version:
                log.info(
                    "%s: schema version %d, rebuilding as %d", self.path, version, SCHEMA_VERSION
                )
            tables = [
                r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type='table'")
            ]
            for table in tables:
                conn.execute(f'DROP TABLE "{table}"')
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise

    def _remove_files(self) -> None:
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.path}{suffix}")
        fsync_dir(self.path.parent, self.fsync)

    def moved(self) -> bool:
        """True if the file is no longer the one open (another process replaced it)."""
        try:
            return os.stat(self.path).st_ino != self.inode
        except FileNotFoundError:
            return True

    def reopen_if_moved(self) -> None:
        if self.moved():
            with self._flock():
                self._open_locked()

    def recover(self) -> None:
        """After a corruption error: replace the file unless another process already did."""
        with self._flock():
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            try:
                conn = self._connect()
            except (sqlite3.DatabaseError, _Corrupt) as err:
                log.warning("%s is damaged (%s); rebuilding it from the Maildir", self.path, err)
                self._remove_files()
                self.resets += 1
            else:
                conn.close()
            self._open_locked()

    def data_version(self) -> int:
        (version,) = self.conn.execute("PRAGMA data_version").fetchone()
        return int(version)

    @contextlib.contextmanager
    def write(self, *, fsync: bool = True) -> Iterator[sqlite3.Connection]:
        """An exclusive write transaction: the lock file, then ``BEGIN IMMEDIATE``.

        ``fsync=False`` commits without waiting for the disk (SQLite ``synchronous=NORMAL``
        in WAL mode: safe against a crash of the process, not against a power loss, until
        the next commit that does fsync). Only for what the Maildir itself records, so that
        a lost commit is found again by the next sync: flag changes, which live in the
        file names; \\Recent claims, whose loss only makes messages \\Recent again; and the
        items derived from messages (``save_items``), a cache.
        """
        with self._flock():
            if self.moved():
                self._open_locked()
            conn = self.conn
            if not fsync:
                conn.execute("PRAGMA synchronous = NORMAL")
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    _rollback(conn)
                    raise
                conn.execute("COMMIT")
            finally:
                if not fsync:
                    conn.execute("PRAGMA synchronous = FULL")

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: one consistent view, never blocking writers (WAL)."""
        conn = self.conn
        conn.execute("BEGIN")
        try:
            yield conn
        except BaseException:
            _rollback(conn)
            raise
        conn.execute("COMMIT")


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back if SQLite has not already; never hide the error that got us here."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _guarded(method: Callable[P, R]) -> Callable[P, R]:
    """Run a public method under the instance lock; map SQLite errors, recover from damage.

    A damaged index is replaced and the call is run once more: the Maildir has what it needs.
    """

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        self = args[0]
        assert isinstance(self, MailStore)
        with self._lock:
            if self._depth:  # a nested call: the outer one handles errors
                self._depth += 1
                try:
                    return method(*args, **kwargs)
                finally:
                    self._depth -= 1
            for attempt in range(2):
                self._depth = 1
                try:
                    self._index.reopen_if_moved()
                    return method(*args, **kwargs)
                except OSError as err:
                    raise StoreError(f"mail store {self.maildir.root}: {err}") from None
                except sqlite3.DatabaseError as err:
                    if attempt or not _is_corrupt(err):
                        raise StoreError(f"mail index {self._index.path}: {err}") from None
                    log.warning("%s: %s; rebuilding the index", self._index.path, err)
                    self._cache.clear()
                    self._base.clear()
                    self._index.recover()
                finally:
                    self._depth = 0
            raise AssertionError("unreachable")

    return wrapper


# -- the store -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Row:
    uid: int
    key: str
    filename: str
    flags: frozenset[str]
    modseq: int
    size: int
    internaldate: int
    recent: bool
    expunging: bool

    def info(self) -> MessageInfo:
        return MessageInfo(
            self.uid,
            self.flags,
            self.modseq,
            self.size,
            datetime.fromtimestamp(self.internaldate, UTC),
            self.key,
        )


_ROW_COLUMNS = "uid, key, filename, flags, modseq, size, internaldate, recent, expunging"
_RowTuple = tuple[int, str, str, str, int, int, int, int, int]
# (mailbox, uid, key, filename, flags, modseq, size, internaldate, recent): a row to insert
_Insert = tuple[int, int, str, str, str, int, int, int, int]
_INSERT = (
    "INSERT INTO messages (mailbox, uid, key, filename, flags, modseq, size, internaldate,"
    " recent) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_ROWS = 100  # rows per INSERT of _insert: 900 parameters, under SQLite's oldest limit


def _insert(db: sqlite3.Connection, inserts: list[_Insert]) -> None:
    """Insert the rows, many per statement (a third faster than one each for thousands)."""
    whole = len(inserts) - len(inserts) % _INSERT_ROWS
    if whole:
        statement = _INSERT + ", (?, ?, ?, ?, ?, ?, ?, ?, ?)" * (_INSERT_ROWS - 1)
        for start in range(0, whole, _INSERT_ROWS):
            db.execute(
                statement,
                list(itertools.chain.from_iterable(inserts[start : start + _INSERT_ROWS])),
            )
    db.executemany(_INSERT, inserts[whole:])


def _row(values: _RowTuple) -> _Row:
    uid, key, filename, flags, modseq, size, internaldate, recent, expunging = values
    return _Row(
        uid,
        key,
        filename,
        frozenset(flags.split()),
        modseq,
        size,
        internaldate,
        bool(recent),
        bool(expunging),
    )


@dataclass(frozen=True, slots=True)
class _Box:
    id: int
    name: str
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    vanished_floor: int


@dataclass(frozen=True, slots=True)
class _Cached:
    """What the last sync saw: enough to answer the next one from a directory listing."""

    inode: int
    data_version: int
    snapshot: Snapshot
    files: dict[int, str]  # uid -> name in cur/
    box_id: int = 0
    # key -> uid of the messages in ``files``: the states of one mailbox that differ in flags
    # alone share it (a message's key never changes, its name does).
    by_key: dict[str, int] = field(default_factory=dict)
    # (mtime_ns of new/, of cur/) stat'ed just before a listing that matched ``filenames``,
    # and when that listing began (time.time_ns()); None until a listing confirmed it.
    dirs: tuple[int, int] | None = None
    listed_at: int = 0
    # (a Listings token of cur/ when it held the filenames of an earlier state, the names
    # added to or removed from ``filenames`` since): enough to tell whether cur/ holds
    # ``filenames`` now from the changes alone (``MailStore._holds_names``). None: list.
    since: tuple[tuple[int, int], frozenset[str]] | None = None
    names: list[frozenset[str]] = field(default_factory=list, repr=False)  # see filenames

    @property
    def cur_token(self) -> tuple[int, int] | None:
        """Listings' token of cur/ when it held exactly ``filenames`` (None: not known)."""
        return self.since[0] if self.since is not None and not self.since[1] else None

    @property
    def filenames(self) -> frozenset[str]:
        """The names of ``files`` (made on first use: a sync after a flag change needs none)."""
        if not self.names:
            self.names.append(frozenset(self.files.values()))
        return self.names[0]

    def has_file(self, name: str) -> bool:
        """``name in filenames``, without making it."""
        uid = self.by_key.get(_split_name(name)[0])
        return uid is not None and self.files.get(uid) == name


def _keyed(snapshot: Snapshot) -> dict[str, int]:
    """``_Cached.by_key`` of a snapshot."""
    return {m.key: m.uid for m in snapshot.messages}


@dataclass
class _Folder:
    name: str  # canonical IMAP name
    path: Path

    @property
    def cur(self) -> Path:
        return self.path / "cur"

    @property
    def new(self) -> Path:
        return self.path / "new"

    def exists(self) -> bool:
        return (self.path / "cur").is_dir()


def _listdir(path: Path) -> list[str]:
    try:
        return [name for name in os.listdir(path) if not name.startswith(".")]
    except FileNotFoundError:
        return []


@contextlib.contextmanager
def _opened_dir(path: str) -> Iterator[int]:
    """A descriptor of directory ``path``: names relative to it skip the path lookup."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def _dir_stamp(folder: _Folder) -> tuple[int, int] | None:
    """The mtimes (ns) of the folder's new/ and cur/, or None if one is missing."""
    try:
        return os.stat(f"{folder.path}/new").st_mtime_ns, os.stat(f"{folder.path}/cur").st_mtime_ns
    except (FileNotFoundError, NotADirectoryError):
        return None


def _unchanged(cached: _Cached, dirs: tuple[int, int] | None) -> bool:
    """Whether new/ and cur/ are as they were at the cached listing.

    Directory mtimes have a granularity (a clock tick, a second on some file systems): a
    change in the same tick as an earlier one leaves the mtime as it was. So the mtimes are
    trusted only for a listing begun more than DIR_MTIME_SLACK after them, when any later
    change must give the directory a different mtime.
    """
    return (
        dirs is not None
        and cached.dirs == dirs
        and cached.listed_at - max(dirs) > DIR_MTIME_SLACK_NS
    )


_FLAG_SETS: dict[str, frozenset[str]] = {}  # a flags column -> the one set for it
_FLAG_SETS_MAX = 1024


def _flag_set(flags: str) -> frozenset[str]:
    """The set of a flags column, shared: most messages have one of a few (an empty frozenset
    alone is 216 bytes, each arrival had one of its own)."""
    found = _FLAG_SETS.get(flags)
    if found is None:
        if len(_FLAG_SETS) >= _FLAG_SETS_MAX:
            _FLAG_SETS.clear()
        found = _FLAG_SETS[flags] = frozenset(flags.split())
    return found


class _Fresh:
    """The messages of a first sync as they are indexed, made into the snapshot ``_load``
    would read back."""

    def __init__(self) -> None:
        self.messages: list[MessageInfo] = []
        self.filenames: list[str] = []
        self._dates: dict[int, datetime] = {}  # many messages share a second

    def add(
        self, uid: int, key: str, filename: str, flags: str, modseq: int, size: int, date: int
    ) -> None:
        moment = self._dates.get(date)
        if moment is None:
            moment = self._dates[date] = datetime.fromtimestamp(date, UTC)
        self.messages.append(MessageInfo(uid, _flag_set(flags), modseq, size, moment, key))
        self.filenames.append(filename)

    def snapshot(self, box: _Box, uidnext: int, highest: int) -> Snapshot:
        """The snapshot, in UID order (``filenames`` then in the same order)."""
        if any(a.uid > b.uid for a, b in itertools.pairwise(self.messages)):  # a rebuild's
            order = sorted(range(len(self.messages)), key=lambda i: self.messages[i].uid)
            self.messages = [self.messages[i] for i in order]
            self.filenames = [self.filenames[i] for i in order]
        return Snapshot(box.name, box.uidvalidity, uidnext, highest, tuple(self.messages))


def _since_after(
    base: _Cached, touched: Collection[str]
) -> tuple[tuple[int, int], frozenset[str]] | None:
    """``base.since`` for a state with the names ``touched`` added or removed (None when
    there are too many to look at one by one)."""
    if base.since is None or len(base.since[1]) + len(touched) > CHANGE_LOG_LENGTH:
        return None
    return base.since[0], base.since[1].union(touched)


def _replace(cached: _Cached, **changes: object) -> _Cached:
    return dataclasses.replace(cached, **changes)  # type: ignore[arg-type]


def _by_key(names: Collection[str]) -> dict[str, str]:
    fast = {name.partition(":")[0]: name for name in names}
    if len(fast) == len(names):  # the rule: every key once
        return fast
    result: dict[str, str] = {}
    for name in sorted(names):
        key = _split_name(name)[0]
        if key in result:
            log.warning("two files for one message %s: %s and %s", key, result[key], name)
            continue
        result[key] = name
    return result


def _flags_text(flags: Iterable[str]) -> str:
    return " ".join(sorted(flags))


def _wire_size(data: bytes) -> int:
    return len(data.replace(b"\r\n", b"\n")) + data.replace(b"\r\n", b"\n").count(b"\n")


# (delivery order, mtime in seconds, size): what indexing a message file needs of it
_Facts = tuple[int, int, int]


def _facts(dir_fd: int, key: str, name: str) -> _Facts | None:
    """The facts of message file ``name`` (of ``key``) in the directory open as ``dir_fd``;
    None if it is not there. The order is the delivery time in the name (Maildir's
    ``{sec}.M{usec}``), else the mtime; the size is ``W=``, else the file is read for it."""
    try:
        st = os.stat(name, dir_fd=dir_fd)
        size_match = _SIZE_W.search(key)
        if size_match:
            size = int(size_match[1])
        else:  # a file some other program delivered, without the Maildir++ W= size
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
            with open(fd, "rb") as f:
                size = _wire_size(f.read())
    except FileNotFoundError:
        return None
    match = _ORDER.match(key)
    order = int(match[1]) * 1_000_000 + int(match[2] or 0) if match else st.st_mtime_ns // 1000
    return order, int(st.st_mtime), size


def _to_crlf(data: bytes, key: str) -> bytes:
    """The stored message with CRLF line ends, ``W=`` octets when the name says so."""
    match = _SIZE_W.search(key)
    if match and len(data) + data.count(b"\n") == int(match[1]):
        return data.replace(b"\n", b"\r\n")  # exactly how W= was computed on delivery
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _now_us() -> int:
    return time.time_ns() // 1000


class MailStore:
    """One user's mailboxes over their Maildir (see the module docstring)."""

    def __init__(
        self,
        maildir: Maildir,
        *,
        quota_bytes: int = 0,
        unlink: Unlink = os.unlink,
        listings: Listings = LISTINGS,
    ) -> None:
        """Open (creating if needed) the Maildir root and its index.

        ``unlink`` removes an expunged message file; tests inject a failure between the steps
        of an expunge with it. ``listings`` keeps the names in new/ and cur/ of the mailboxes
        synced (the process's inotify listings).
        """
        self.maildir = maildir
        self._listings = listings
        self._held: set[str] = set()  # directories held in ``listings`` until close()
        self._named: dict[str, _Folder] = {}  # _folder() of names asked for before
        self.quota_bytes = quota_bytes
        self._unlink = unlink
        self._lock = threading.RLock()
        self._depth = 0
        self._cache: dict[str, _Cached] = {}
        self._base: dict[str, _Cached] = {}  # the last load of each mailbox, for _load to reuse
        self._keywords: dict[Path, Keywords] = {}
        try:
            maildir.create()
            self._index = _Index(maildir.root, maildir.fsync)
        except OSError as err:
            raise StoreError(f"cannot open the mail store {maildir.root}: {err}") from None

    def close(self) -> None:
        with self._lock:
            self._index.close()
            self._cache.clear()
            self._base.clear()
            for path in self._held:
                self._listings.release(path)
            self._held.clear()

    def __enter__(self) -> MailStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MailStore({str(self.maildir.root)!r})"

    @property
    def index_path(self) -> Path:
        return self._index.path

    def usage_bytes(self) -> int:
        """Bytes of all messages in all folders (the Maildir++ ``S=`` sizes)."""
        return self.maildir.usage_bytes()

    # -- mailboxes ---------------------------------------------------------------------------

    def _folder(self, name: str) -> _Folder:
        known = self._named.get(name)
        if known is not None:
            return _Folder(known.name, known.path)
        canonical = canonical_name(name)
        folder = folder_name(canonical)
        found = _Folder(
            canonical, self.maildir.root / f".{folder}" if folder else self.maildir.root
        )
        if len(self._named) < 1000:  # a pure function of the name: remembered
            self._named[name] = found
        return _Folder(found.name, found.path)

    def _existing(self, name: str) -> _Folder:
        folder = self._folder(name)
        if folder.exists():
            return folder
        if folder.name == INBOX:
            self.maildir.create()
            return folder
        raise MailboxNotFoundError(f"mailbox {folder.name} does not exist")

    def _folders(self) -> dict[str, Path]:
        """Every folder on disk by IMAP name, INBOX included; leftovers of deletes removed."""
        found = {INBOX: self.maildir.root}
        try:
            entries = list(os.scandir(self.maildir.root))
        except FileNotFoundError:
            return found
        for entry in entries:
            if entry.name.startswith(TRASH_PREFIX):
                shutil.rmtree(entry.path, ignore_errors=True)
                continue
            if not entry.name.startswith(".") or entry.name in (".", ".."):
                continue
            if not entry.is_dir(follow_symlinks=False):
                continue
            name = mailbox_name(entry.name[1:])
            if name is None:
                log.info("%s: not a folder mailroom can name; skipped", entry.path)
                continue
            found[name] = Path(entry.path)
        return found

    def _special_use(self) -> dict[str, str]:
        return special_uses(self.maildir.root)

    def _write_special_use(self, special: dict[str, str]) -> None:
        text = "".join(f"{attr}\t{name}\n" for name, attr in sorted(special.items()))
        _write_atomic(self.maildir.root / SPECIAL_USE_NAME, text.encode(), self.maildir.fsync)

    def subscriptions(self) -> list[str]:
        """The subscribed names (LSUB shows them even if the mailbox no longer exists)."""
        return list(dict.fromkeys(_read_lines(self.maildir.root / SUBSCRIPTIONS_NAME)))

    def _write_subscriptions(self, names: Iterable[str]) -> None:
        text = "".join(f"{name}\n" for name in dict.fromkeys(names))
        _write_atomic(self.maildir.root / SUBSCRIPTIONS_NAME, text.encode(), self.maildir.fsync)

    @_guarded
    def ensure_defaults(self) -> None:
        """INBOX, and Sent, Drafts, Trash, Junk, Archive with their special use, subscribed.

        Idempotent and cheap when nothing is missing (one small file read and a few stats).
        A default is not recreated under its name while another mailbox has its special use.
        """
        if self._defaults_missing() or not (self.maildir.root / SUBSCRIPTIONS_NAME).exists():
            with self._index.write() as db:
                self._ensure_defaults_locked(db)

    def _defaults_missing(self) -> list[tuple[str, str]]:
        special = self._special_use()
        holders = {attr: name for name, attr in special.items()}
        missing = []
        for name, attr in DEFAULT_MAILBOXES:
            holder = holders.get(attr)
            if holder is None or not self._folder(holder).exists():
                missing.append((name, attr))
        return missing

    def _ensure_defaults_locked(self, db: sqlite3.Connection) -> None:
        self.maildir.create()
        missing = self._defaults_missing()
        special = {n: a for n, a in self._special_use().items() if self._folder(n).exists()}
        first_time = not (self.maildir.root / SUBSCRIPTIONS_NAME).exists()
        subscribed = self.subscriptions() + ([INBOX] if first_time else [])
        for name, attr in missing:
            folder = self._folder(name)
            if not folder.exists():
                self._create_locked(db, folder)
            if name not in special:
                special[name] = attr
            subscribed.append(name)
        if first_time:
            subscribed += [name for name, _ in DEFAULT_MAILBOXES]
        self._write_special_use(special)
        self._write_subscriptions(subscribed)

    def _create_locked(self, db: sqlite3.Connection, folder: _Folder) -> None:
        """Make the Maildir++ folder, its uidlist (a new UIDVALIDITY) and its index row."""
        try:
            self.maildir.create(folder_name(folder.name))
        except OSError as err:
            raise StoreError(f"cannot create mailbox {folder.name}: {err}") from None
        db.execute("DELETE FROM mailboxes WHERE name = ?", (folder.name,))
        uidlist = UidList(self._new_uidvalidity(db), 1, 1)
        _write_atomic(folder.path / UIDLIST_NAME, uidlist.dump(), self.maildir.fsync)
        db.execute(
            "INSERT INTO mailboxes (name, uidvalidity, uidnext, highestmodseq, vanished_floor)"
            " VALUES (?, ?, 1, 1, 1)",
            (folder.name, uidlist.uidvalidity),
        )
        self._cache.pop(folder.name, None)

    def _new_uidvalidity(self, db: sqlite3.Connection, above: int = 0) -> int:
        """RFC 9051 2.3.1.1: greater than ``above`` and any this index handed out before, also
        for a name deleted and created again; the clock keeps it growing when the index is new."""
        (highest,) = db.execute(
            "SELECT max(value) FROM (SELECT max(uidvalidity) AS value FROM mailboxes"
            " UNION ALL SELECT value FROM meta WHERE key = 'last_uidvalidity')"
        ).fetchone()
        uidvalidity = max(int(time.time()), (highest or 0) + 1, above + 1)
        db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('last_uidvalidity', ?)",
            (uidvalidity,),
        )
        return uidvalidity

    @_guarded
    def list_mailboxes(self) -> list[MailboxEntry]:
        """Every mailbox, INBOX first; parents without a folder of their own are not selectable."""
        folders = self._folders()
        names = set(folders)
        for name in list(names):
            levels = name.split(DELIMITER)
            for depth in range(1, len(levels)):
                names.add(DELIMITER.join(levels[:depth]))
        special = self._special_use()
        subscribed = set(self.subscriptions())
        ordered = sorted(names - {INBOX})
        with_children = {parent for name in names for parent in _parents(name)}
        return [
            MailboxEntry(
                name=name,
                special_use=special.get(name),
                has_children=name in with_children,
                subscribed=name in subscribed,
                selectable=name in folders,
            )
            for name in [INBOX, *ordered]
        ]

    @_guarded
    def create_mailbox(self, name: str, special_use: str | None = None) -> None:
        """RFC 9051 6.3.4 CREATE (a trailing delimiter only declares the intent to add
        children: ``a/`` creates ``a``), RFC 6154 CREATE-SPECIAL-USE."""
        if name.endswith(DELIMITER) and len(name) > 1:
            name = name[:-1]
        folder = self._folder(name)
        if special_use is not None and special_use not in SPECIAL_USES:
            raise SpecialUseError(
                f"special use {special_use} is not supported; use one of"
                f" {', '.join(sorted(SPECIAL_USES))}"
            )
        with self._index.write() as db:
            if folder.name == INBOX or folder.exists():
                raise MailboxExistsError(f"mailbox {folder.name} already exists")
            self._create_locked(db, folder)
            if special_use is not None:
                special = self._special_use()
                special[folder.name] = special_use
                self._write_special_use(special)

    @_guarded
    def delete_mailbox(self, name: str) -> None:
        """RFC 9051 6.3.5 DELETE: never INBOX; a mailbox with children loses its messages and
        stays as a non-selectable parent; a non-selectable parent cannot be deleted.
        Subscriptions are kept (RFC 9051 6.3.7)."""
        folder = self._folder(name)
        if folder.name == INBOX:
            raise StoreError("INBOX cannot be deleted")
        with self._index.write() as db:
            if not folder.exists():
                if any(_is_inferior(n, folder.name) for n in self._folders()):
                    raise StoreError(
                        f"{folder.name} has children and holds no messages; delete them first"
                    )
                raise MailboxNotFoundError(f"mailbox {folder.name} does not exist")
            # Out of sight atomically (a name no Maildir reader takes for a folder), then gone.
            trash = self.maildir.root / f"{TRASH_PREFIX}{secrets.token_hex(8)}"
            os.rename(folder.path, trash)
            fsync_dir(self.maildir.root, self.maildir.fsync)
            db.execute("DELETE FROM mailboxes WHERE name = ?", (folder.name,))
            special = self._special_use()
            if special.pop(folder.name, None) is not None:
                self._write_special_use(special)
        self._cache.pop(folder.name, None)
        shutil.rmtree(trash, ignore_errors=True)

    @_guarded
    def rename_mailbox(self, old: str, new: str) -> None:
        """RFC 9051 6.3.6 RENAME: inferior names move too; renaming INBOX moves its messages
        into a new mailbox and leaves INBOX empty (its children stay)."""
        source, target = self._folder(old), self._folder(new)
        if target.name == INBOX:
            raise MailboxExistsError("INBOX already exists")
        if source.name == INBOX:
            self._rename_inbox(target)
            return
        if target.name == source.name or _is_inferior(target.name, source.name):
            raise StoreError(f"cannot rename {source.name} to {target.name}, inside itself")
        with self._index.write() as db:
            folders = self._folders()
            moving = [n for n in folders if n == source.name or _is_inferior(n, source.name)]
            if not moving:
                raise MailboxNotFoundError(f"mailbox {source.name} does not exist")
            renames = [(n, target.name + n[len(source.name) :]) for n in sorted(moving)]
            for _, to in renames:
                if to in folders or self._folder(to).exists():
                    raise MailboxExistsError(f"mailbox {to} already exists")
            for frm, to in renames:
                os.rename(folders[frm], self._folder(to).path)
                db.execute("DELETE FROM mailboxes WHERE name = ?", (to,))
                db.execute("UPDATE mailboxes SET name = ? WHERE name = ?", (to, frm))
                self._cache.pop(frm, None)
                self._cache.pop(to, None)
            fsync_dir(self.maildir.root, self.maildir.fsync)
            mapping = dict(renames)
            special = self._special_use()
            self._write_special_use({mapping.get(n, n): a for n, a in special.items()})
            subscribed = self.subscriptions()
            if any(n in mapping for n in subscribed):
                self._write_subscriptions(mapping.get(n, n) for n in subscribed)

    def _rename_inbox(self, target: _Folder) -> None:
        with self._index.write() as db:
            if target.exists():
                raise MailboxExistsError(f"mailbox {target.name} already exists")
            self._create_locked(db, target)
        uids = [m.uid for m in self.sync(INBOX).messages]
        if uids:
            self.move(INBOX, uids, target.name)

    @_guarded
    def subscribe(self, name: str) -> None:
        """RFC 9051 6.3.7 SUBSCRIBE (the mailbox need not exist)."""
        canonical = canonical_name(name)
        with self._index.write():
            names = self.subscriptions()
            if canonical not in names:
                self._write_subscriptions([*names, canonical])

    @_guarded
    def unsubscribe(self, name: str) -> None:
        """RFC 9051 6.3.8 UNSUBSCRIBE."""
        canonical = canonical_name(name)
        with self._index.write():
            names = self.subscriptions()
            if canonical in names:
                self._write_subscriptions(n for n in names if n != canonical)

    @_guarded
    def keywords(self, name: str) -> list[str]:
        """The keywords the mailbox's folder has letters for (for FLAGS/PERMANENTFLAGS)."""
        keywords = self._keywords_of(self._existing(name).path)
        keywords.reload()
        return [keywords.names[n] for n in sorted(keywords.names)]

    def _keywords_of(self, path: Path) -> Keywords:
        keywords = self._keywords.get(path)
        if keywords is None:
            keywords = self._keywords[path] = Keywords(path)
        return keywords

    # -- sync ----------------------------------------------------------------------------------

    def hold_if_current(self, name: str) -> bool:
        """Take the store for the calling thread, without waiting, if no other thread has it
        and ``sync(name)`` would answer from memory; the caller then ``release_hold()``s.

        For a caller that must not block (an event loop running a cheap command itself): it
        never waits for a lock, and while held no other thread of this process changes the
        store. Another process may still deliver in between; the next sync then does the
        (short) work of picking that up.
        """
        if not self._lock.acquire(blocking=False):
            return False
        try:
            folder = self._folder(name)
            cached = self._cache.get(folder.name)
            if (
                cached is not None
                and not self._depth
                and cached.inode == self._index.inode
                and cached.data_version == self._index.data_version()
                and (_unchanged(cached, _dir_stamp(folder)) or self._listed_as(folder, cached))
            ):
                return True
        except (OSError, sqlite3.Error, StoreError):
            pass
        self._lock.release()
        return False

    def _listed_as(self, folder: _Folder, cached: _Cached) -> bool:
        """Whether the watched listings say new/ is empty and cur/ is as cached."""
        new, cur = str(folder.new), str(folder.cur)
        if new not in self._held or cur not in self._held:
            return False
        _, in_new = self._listings.names(new)
        token, _ = self._listings.names(cur)
        return not in_new and token is not None and token == cached.cur_token

    def release_hold(self) -> None:
        self._lock.release()

    @_guarded
    def sync(self, name: str) -> Snapshot:
        """The mailbox now: deliveries picked up (new/ -> cur/, UIDs ascending in delivery
        order), flags changed by others (MODSEQ bumped), files removed by others expunged."""
        return self._sync(name, claim=False)[0]

    @_guarded
    def select(self, name: str) -> tuple[Snapshot, frozenset[int]]:
        """``sync`` then ``claim_recent`` (a read-write SELECT), in one write where the sync
        writes at all: the messages it indexes are written already claimed by the caller."""
        snapshot, claimed = self._sync(name, claim=True)
        if claimed is None:  # answered without writing: claim what others indexed
            claimed = self.claim_recent(name)
        return snapshot, claimed

    def _sync(self, name: str, *, claim: bool) -> tuple[Snapshot, frozenset[int] | None]:
        """``sync``; with ``claim``, and if it writes, also the UIDs it claimed (else None)."""
        folder = self._folder(name)
        dirs = _dir_stamp(folder)
        if dirs is None:  # not there: the error, or INBOX made
            folder = self._existing(name)
            dirs = _dir_stamp(folder)
        data_version = self._index.data_version()
        cached = self._cache.get(folder.name)
        valid = (
            cached is not None
            and cached.inode == self._index.inode
            and cached.data_version == data_version
        )
        if valid and cached is not None and _unchanged(cached, dirs):
            return cached.snapshot, None
        listed_at = time.time_ns()
        for directory in (str(folder.new), str(folder.cur)):
            if directory not in self._held:
                self._listings.hold(directory)
                self._held.add(directory)
        _, new = self._listings.names(str(folder.new))
        cur_dir = str(folder.cur)
        listing: tuple[tuple[int, int] | None, frozenset[str]] | None = None

        def listed_as(state: _Cached) -> tuple[tuple[int, int] | None, bool]:
            """(cur/'s token now, whether it holds ``state.filenames``): from the changes
            since ``state.since`` where they tell, else from one listing."""
            nonlocal listing
            told = self._holds_names(cur_dir, state)
            if told is not None:
                return told
            if listing is None:
                listing = self._listings.names(cur_dir)
            return listing[0], listing[1] == state.filenames

        if valid and cached is not None and not new:
            token, same = listed_as(cached)
            if same:
                self._confirm(folder.name, cached, token, dirs, listed_at)
                return cached.snapshot, None
        if not new:  # perhaps only the index changed (another process synced first)
            loaded = self._load(folder.name, incremental=True)
            token, same = listed_as(loaded) if loaded is not None else (None, False)
            if loaded is not None and not same:
                # Another process may have renamed files and not yet committed the index (a
                # STORE): once it has, they agree again, with no need to read every row.
                self._index.settle()
                listing = None
                loaded = self._load(folder.name, incremental=True)
                token, same = listed_as(loaded) if loaded is not None else (None, False)
            if loaded is not None and not same:
                # A row whose file was renamed without a flag change keeps its MODSEQ, so
                # only a full load can tell.
                loaded = self._load(folder.name)
                token, same = listed_as(loaded) if loaded is not None else (None, False)
            if loaded is not None and same:
                self._confirm(folder.name, loaded, token, dirs, listed_at)
                return loaded.snapshot, None
        claimed: set[int] | None = set() if claim else None
        with self._index.write() as db:
            fresh = self._sync_locked(db, folder, claimed=claimed)
        if fresh is not None:
            self._base[folder.name] = fresh
        loaded = self._load(folder.name, incremental=True)
        if loaded is None:  # pragma: no cover - the row was written just above
            raise StoreError(f"mailbox {folder.name} vanished from the index")
        token, cur = self._listings.names(str(folder.cur))
        if token is not None and cur == loaded.filenames:  # the listing after our own renames
            self._confirm(folder.name, loaded, token)
        else:
            self._cache[folder.name] = loaded
        return loaded.snapshot, None if claimed is None else frozenset(claimed)

    def _confirm(
        self,
        name: str,
        state: _Cached,
        token: tuple[int, int] | None,
        dirs: tuple[int, int] | None = None,
        listed_at: int = 0,
    ) -> None:
        """Cache ``state`` as what a listing of cur/ at ``token`` matched (``dirs`` and
        ``listed_at``: see ``_unchanged``). The base of the next incremental load learns the
        token too, so that the load after it can be checked from the changes alone."""
        since = None if token is None else (token, frozenset[str]())
        self._cache[name] = _replace(state, dirs=dirs, listed_at=listed_at, since=since)
        if self._base.get(name) is state:
            self._base[name] = _replace(state, since=since)

    def _holds_names(self, path: str, state: _Cached) -> tuple[tuple[int, int], bool] | None:
        """(the token now, whether cur/ at ``path`` holds ``state.filenames``), told from the
        names changed since ``state.since`` on either side; None if they cannot tell.

        At the token cur/ held the names of an earlier state; a name changed neither in cur/
        since then nor in the index is in both or in neither, so only the others are looked at.
        """
        if state.since is None:
            return None
        token, changed = state.since
        told = self._listings.changes(path, token, changed)
        if told is None:
            return None
        now, there = told
        return now, all(state.has_file(name) == present for name, present in there.items())

    def _load(self, name: str, *, incremental: bool = False) -> _Cached | None:
        """The mailbox as the index has it; None if unknown or an expunge is unfinished.

        With ``incremental``, and the last load of this mailbox still comparable (same index
        file, mailbox row and UIDVALIDITY, no tombstone dropped since), only the rows changed
        after its HIGHESTMODSEQ and the tombstones since are read: every flag change and every
        arrival gets a new MODSEQ, every expunge a tombstone with one.
        """
        base = self._base.get(name)
        with self._index.read() as db:
            data_version = self._index.data_version()
            box = self._box(db, name)
            if box is None:
                return None
            if (
                incremental
                and base is not None
                and base.inode == self._index.inode
                and base.box_id == box.id
                and base.snapshot.uidvalidity == box.uidvalidity
                and box.vanished_floor <= base.snapshot.highestmodseq
                and box.highestmodseq >= base.snapshot.highestmodseq
            ):
                since = base.snapshot.highestmodseq
                # No ORDER BY: SQLite would then walk every row in UID order rather than the
                # few above ``since`` through messages_modseq.
                changed = db.execute(
                    f"SELECT {_ROW_COLUMNS} FROM messages WHERE mailbox = ? AND modseq > ?",
                    (box.id, since),
                ).fetchall()
                gone = {
                    uid
                    for (uid,) in db.execute(
                        "SELECT uid FROM expunged WHERE mailbox = ? AND modseq > ?",
                        (box.id, since),
                    )
                }
                if gone:
                    # A tombstone beside its row is an expunge still under way.
                    (pending,) = db.execute(
                        "SELECT count(*) FROM expunged JOIN messages USING (mailbox, uid)"
                        " WHERE mailbox = ? AND expunged.modseq > ?",
                        (box.id, since),
                    ).fetchone()
                    if pending:
                        return None
                return self._apply_changes(base, box, data_version, changed, gone)
            rows = db.execute(
                f"SELECT {_ROW_COLUMNS} FROM messages WHERE mailbox = ? ORDER BY uid",
                (box.id,),
            ).fetchall()
        messages: list[MessageInfo] = []
        files: dict[int, str] = {}
        # Within one UIDVALIDITY a UID's key, size and date never change: a message whose
        # MODSEQ is the same as last time is the same MessageInfo.
        last: dict[int, MessageInfo] = {}
        if base is not None and base.snapshot.uidvalidity == box.uidvalidity:
            last = {m.uid: m for m in base.snapshot.messages}
        dates: dict[int, datetime] = {}  # many messages share a second
        for uid, key, filename, flags, modseq, size, date, _, expunging in rows:
            if expunging:
                return None
            info = last.get(uid)
            if info is None or info.modseq != modseq:
                moment = dates.get(date)
                if moment is None:
                    moment = dates[date] = datetime.fromtimestamp(date, UTC)
                info = MessageInfo(uid, _flag_set(flags), modseq, size, moment, key)
            messages.append(info)
            files[uid] = filename
        snapshot = Snapshot(
            name, box.uidvalidity, box.uidnext, box.highestmodseq, tuple(messages), tuple(files)
        )
        loaded = _Cached(self._index.inode, data_version, snapshot, files, box.id, _keyed(snapshot))
        self._base[name] = loaded
        return loaded

    def _apply_changes(
        self,
        base: _Cached,
        box: _Box,
        data_version: int,
        changed: list[_RowTuple],
        gone: set[int],
    ) -> _Cached | None:
        """``base`` with the rows changed since it and the UIDs expunged since it applied."""
        old = base.snapshot
        unchanged = box.uidnext == old.uidnext and box.highestmodseq == old.highestmodseq
        if not changed and not gone and unchanged:
            loaded = _replace(base, data_version=data_version)  # the very same snapshot
            self._base[old.name] = loaded
            return loaded
        updates: dict[int, tuple[MessageInfo, str]] = {}
        for uid, key, filename, flags, modseq, size, date, _, expunging in changed:
            if expunging:
                return None
            info = MessageInfo(
                uid, _flag_set(flags), modseq, size, datetime.fromtimestamp(date, UTC), key
            )
            updates[uid] = (info, filename)
        log, floor = _carried_log(old, [info for info, _ in updates.values()])
        files = dict(base.files)

        def applied(
            messages: tuple[MessageInfo, ...],
            uids: tuple[int, ...],
            by_key: dict[str, int] | None,
            touched: Collection[str],
        ) -> _Cached:
            """The new state (``by_key`` None: made afresh), the base of the next load."""
            snapshot = Snapshot(
                old.name,
                box.uidvalidity,
                box.uidnext,
                box.highestmodseq,
                messages,
                uids,
                log,
                floor,
            )
            loaded = _Cached(
                self._index.inode,
                data_version,
                snapshot,
                files,
                box.id,
                _keyed(snapshot) if by_key is None else by_key,
                since=_since_after(base, touched),
            )
            self._base[old.name] = loaded
            return loaded

        if not gone and all(uid in files for uid in updates):
            # Flag changes only (the common case): replace those messages in place.
            changed_list = list(old.messages)
            names = set()
            dropped = set()
            for uid, (info, filename) in updates.items():
                changed_list[bisect.bisect_left(old.uids, uid)] = info
                dropped.add(files[uid])
                names.add(filename)
                files[uid] = filename
            return applied(tuple(changed_list), old.uids, base.by_key, dropped | names)
        messages: list[MessageInfo] = []
        touched: set[str] = set()  # names that went or came
        for m in old.messages:
            if m.uid in gone:
                if m.uid in files:
                    touched.add(files.pop(m.uid))
                continue
            update = updates.pop(m.uid, None)
            if update is None:
                messages.append(m)
            else:
                messages.append(update[0])
                touched.update((files[m.uid], update[1]))
                files[m.uid] = update[1]
        if updates:  # arrivals: UIDs above all the others, unless a rebuild gave old ones
            last_uid = messages[-1].uid if messages else 0
            for uid, (info, filename) in sorted(updates.items()):
                messages.append(info)
                touched.add(filename)
                files[uid] = filename
            if sorted(updates)[0] <= last_uid:
                messages.sort(key=lambda m: m.uid)
        return applied(tuple(messages), (), None, touched)

    @staticmethod
    def _box(db: sqlite3.Connection, name: str) -> _Box | None:
        row = db.execute(
            "SELECT id, name, uidvalidity, uidnext, highestmodseq, vanished_floor"
            " FROM mailboxes WHERE name = ?",
            (name,),
        ).fetchone()
        return _Box(*row) if row is not None else None

    def _rows(self, db: sqlite3.Connection, box: _Box) -> dict[str, _Row]:
        return {
            r.key: r
            for r in map(
                _row,
                db.execute(f"SELECT {_ROW_COLUMNS} FROM messages WHERE mailbox = ?", (box.id,)),
            )
        }

    def _box_locked(self, db: sqlite3.Connection, folder: _Folder) -> _Box:
        """The mailbox's index row, made (from the uidlist, keeping UIDs) if missing."""
        box = self._box(db, folder.name)
        if box is None:
            self._sync_locked(db, folder)
            box = self._box(db, folder.name)
            assert box is not None
        return box

    def _start_box(
        self, db: sqlite3.Connection, folder: _Folder, fallback: UidList | None = None
    ) -> dict[str, int]:
        """Create the index row of a folder the index does not know; return the UIDs that
        the folder's uidlist (or ``fallback``, the old index's) still names."""
        recorded = UidList.read(folder.path)
        if recorded is not None and fallback is not None:
            if fallback.uidvalidity == recorded.uidvalidity:
                used = set(recorded.uids.values())
                for key, uid in fallback.uids.items():
                    if key not in recorded.uids and uid not in used:
                        recorded.uids[key] = uid
                        used.add(uid)
                recorded.uidnext = max(recorded.uidnext, fallback.uidnext)
            recorded.highestmodseq = max(recorded.highestmodseq, fallback.highestmodseq)
        source = recorded or fallback
        if source is None:
            above = UidList.header_uidvalidity(folder.path)  # of a damaged uidlist
            uidvalidity, uidnext, base, known = self._new_uidvalidity(db, above), 1, 1, {}
        else:
            uidvalidity, known = source.uidvalidity, dict(source.uids)
            uidnext = max([source.uidnext, *(uid + 1 for uid in known.values())])
            # RFC 7162 3.1: HIGHESTMODSEQ never goes back; the old values are unknown.
            base = max(source.highestmodseq + 1, _now_us())
        db.execute(
            "INSERT INTO mailboxes (name, uidvalidity, uidnext, highestmodseq, vanished_floor)"
            " VALUES (?, ?, ?, ?, ?)",
            (folder.name, uidvalidity, uidnext, base, base),
        )
        self._cache.pop(folder.name, None)
        return known

    def _sync_locked(
        self,
        db: sqlite3.Connection,
        folder: _Folder,
        flags_for: dict[str, frozenset[str]] | None = None,
        known: dict[str, int] | None = None,
        claimed: set[int] | None = None,
    ) -> _Cached | None:
        """Bring the index in line with the folder; call inside a write transaction.

        ``flags_for`` gives the flags of keys arriving in new/ (APPEND). ``known`` are UIDs
        the uidlist still names (when the row was just started). With ``claimed``, the
        messages that would be \\Recent are written claimed, their UIDs added to it (SELECT).
        Returns the mailbox as now indexed when that is known without reading it back (the
        index had no message of it before: a first sync), for ``_load`` to build on once the
        transaction has committed.
        """
        box = self._box(db, folder.name)
        if box is None:
            known = self._start_box(db, folder)
            box = self._box(db, folder.name)
            assert box is not None
        known = known or {}
        flags_for = flags_for or {}
        keywords = self._keywords_of(folder.path)
        keywords.reload()
        rows = self._rows(db, box)
        highest = box.highestmodseq
        removed_dir = False

        # 1. Finish expunges a crash interrupted (marked, maybe unlinked, row still there).
        pending = [r for r in rows.values() if r.expunging]
        if pending:
            on_disk = _by_key(_listdir(folder.cur))
            in_new = _by_key(_listdir(folder.new))
            for r in pending:
                for directory, names in ((folder.cur, on_disk), (folder.new, in_new)):
                    if r.key in names:
                        with contextlib.suppress(FileNotFoundError):
                            self._unlink(directory / names[r.key])
                        removed_dir = True
            if removed_dir:
                fsync_dir(folder.cur, self.maildir.fsync)
                fsync_dir(folder.new, self.maildir.fsync)
            db.executemany(
                "DELETE FROM messages WHERE mailbox = ? AND uid = ?",
                [(box.id, r.uid) for r in pending],
            )
            for r in pending:
                del rows[r.key]

        # 2. new/ -> cur/ with ":2," (a known key here is a rename a crash undid). The names
        #    are the listings' (what listing the directory would give now, mostly unlisted).
        new_dir, cur_dir = str(folder.new), str(folder.cur)  # strings: no Path per file
        from_new: set[str] = set()
        moves: list[tuple[str, str]] = []  # (name in new/, name in cur/)
        for name in self._listings.names(new_dir)[1]:
            key, letters = _split_name(name)
            if key in rows:
                target = rows[key].filename
            else:
                wanted = flags_for.get(key)
                if wanted is not None:
                    letters = keywords.letters(wanted)
                target = f"{key}:2,{letters}"
                from_new.add(key)
            moves.append((name, target))
        if len(moves) > BULK_RENAMES:
            self._listings.suspend(new_dir)
            self._listings.suspend(cur_dir)
        if moves:
            with _opened_dir(new_dir) as new_fd, _opened_dir(cur_dir) as cur_fd:
                for name, target in moves:
                    try:
                        os.rename(name, target, src_dir_fd=new_fd, dst_dir_fd=cur_fd)
                    except FileNotFoundError:  # another process moved it first
                        continue

        # 3. Compare cur/ with the index: renamed (flags) and vanished files.
        in_cur = self._listings.names(cur_dir)[1]
        on_disk = {name.partition(":")[0]: name for name in in_cur}
        if len(on_disk) != len(in_cur):  # files sharing a key
            if self._split_duplicates(folder, rows, list(in_cur)):
                log.info("%s: files sharing a key got keys of their own", folder.cur)
                in_cur = frozenset(_listdir(folder.cur))
            on_disk = _by_key(in_cur)
        if any(key not in on_disk for key in rows):
            # readdir may miss a file being renamed by a mail reader right now: look again.
            on_disk = _by_key(_listdir(folder.cur))
        updates: list[tuple[str, str, int, int, int]] = []
        gone: list[_Row] = []
        for key, r in rows.items():
            filename = on_disk.get(key)
            if filename is None:
                gone.append(r)
            elif filename != r.filename:
                flags = keywords.flags(_split_name(filename)[1])
                modseq = r.modseq
                if flags != r.flags:
                    highest += 1
                    modseq = highest
                updates.append((filename, _flags_text(flags), modseq, box.id, r.uid))
        db.executemany(
            "UPDATE messages SET filename = ?, flags = ?, modseq = ? WHERE mailbox = ? AND uid = ?",
            updates,
        )
        if claimed is not None:  # what others indexed and no session claimed yet
            unclaimed = [r.uid for key, r in rows.items() if r.recent and key in on_disk]
            db.executemany(
                "UPDATE messages SET recent = 0 WHERE mailbox = ? AND uid = ?",
                [(box.id, uid) for uid in unclaimed],
            )
            claimed.update(unclaimed)

        # 4. Files the index does not know: UIDs in delivery order (RFC 9051 2.3.1.1); the
        #    UIDs a uidlist still names (a rebuild) come first and stay what they were.
        #    (wanted UID, delivery order, key, file name, mtime in seconds, size)
        arrivals: list[tuple[int, int, str, str, int, int]] = []
        unknown = [(key, filename) for key, filename in on_disk.items() if key not in rows]
        if unknown:
            later = box.uidnext + 2**62
            with _opened_dir(cur_dir) as cur_fd:
                for key, filename in unknown:
                    facts = _facts(cur_fd, key, filename)
                    if facts is not None:
                        order, mtime, size = facts
                        arrivals.append((known.get(key, later), order, key, filename, mtime, size))
        arrivals.sort()  # keys are unique: the comparison never reaches the file name
        uidnext = box.uidnext
        used = {r.uid for r in rows.values()}
        inserts: list[_Insert] = []
        # A first sync (no rows before) also makes the mailbox as _load would read it back.
        fresh: _Fresh | None = _Fresh() if not rows else None
        flag_texts: dict[str, str] = {}  # ":2,{letters}" -> flags column; most share a few
        box_id = box.id
        for wanted_uid, _, key, filename, mtime, size in arrivals:
            if key not in known:
                uid, recent = uidnext, 1
            else:
                uid = wanted_uid if wanted_uid not in used else max(uidnext, *used, 0)
                recent = int(key in from_new)
            if uid >= uidnext:
                uidnext = uid + 1
            used.add(uid)
            highest += 1
            flags_text = flag_texts.get(filename[len(key) :])
            if flags_text is None:
                flags = keywords.flags(_split_name(filename)[1])
                flags_text = flag_texts[filename[len(key) :]] = _flags_text(flags)
            if recent and claimed is not None:
                claimed.add(uid)
                recent = 0
            inserts.append((box_id, uid, key, filename, flags_text, highest, size, mtime, recent))
            if fresh is not None:
                fresh.add(uid, key, filename, flags_text, highest, size, mtime)

        # 5. The durable record first: the uidlist names every UID before the index commits it.
        if inserts or known:
            recorded = {key: r.uid for key, r in rows.items() if key in on_disk}
            recorded.update({i[2]: i[1] for i in inserts})
            uidlist = UidList(box.uidvalidity, uidnext, highest, recorded)
            _write_atomic(folder.path / UIDLIST_NAME, uidlist.dump(), self.maildir.fsync)
        _insert(db, inserts)

        # 6. Removed by someone else: an expunge with a tombstone.
        if gone:
            highest += 1
            self._tombstones(db, box, [r.uid for r in gone], highest)
        db.execute(
            "UPDATE mailboxes SET uidnext = ?, highestmodseq = ? WHERE id = ?",
            (uidnext, highest, box.id),
        )
        self._cache.pop(folder.name, None)
        if fresh is None or not inserts:
            return None
        snapshot = fresh.snapshot(box, uidnext, highest)
        files = dict(zip(snapshot.uids, fresh.filenames, strict=True))
        return _Cached(
            self._index.inode,
            0,
            snapshot,
            files,
            box.id,
            _keyed(snapshot),
            names=[frozenset(fresh.filenames)],
        )

    def _split_duplicates(self, folder: _Folder, rows: dict[str, _Row], names: list[str]) -> bool:
        """Give a new key to each extra file sharing a key (a mail reader's crash can leave
        ``k:2,S`` beside ``k:2,``): it becomes a message of its own, as Dovecot does it."""
        keys = [name.partition(":")[0] for name in names]
        if len(set(keys)) == len(keys):
            return False
        groups: dict[str, list[str]] = {}
        for key, name in zip(keys, names, strict=True):
            groups.setdefault(key, []).append(name)
        split = False
        for key, names in groups.items():
            if len(names) < 2:
                continue
            known = rows.get(key)
            keep = known.filename if known is not None and known.filename in names else min(names)
            for extra in names:
                if extra == keep:
                    continue
                sizes = "".join(m[0] for m in (_SIZE_S.search(key), _SIZE_W.search(key)) if m)
                fresh = f"{self.maildir.unique()}{sizes}:2,{_split_name(extra)[1]}"
                with contextlib.suppress(FileNotFoundError):
                    os.rename(folder.cur / extra, folder.cur / fresh)
                    split = True
        return split

    def _tombstones(self, db: sqlite3.Connection, box: _Box, uids: list[int], modseq: int) -> None:
        """Drop the rows of expunged ``uids`` and remember them for QRESYNC."""
        db.executemany(
            "DELETE FROM messages WHERE mailbox = ? AND uid = ?", [(box.id, u) for u in uids]
        )
        db.executemany(
            "INSERT OR REPLACE INTO expunged (mailbox, uid, modseq) VALUES (?, ?, ?)",
            [(box.id, u, modseq) for u in uids],
        )
        (count,) = db.execute(
            "SELECT count(*) FROM expunged WHERE mailbox = ?", (box.id,)
        ).fetchone()
        if count > MAX_TOMBSTONES:
            (floor,) = db.execute(
                "SELECT modseq FROM expunged WHERE mailbox = ? ORDER BY modseq DESC"
                " LIMIT 1 OFFSET ?",
                (box.id, MAX_TOMBSTONES),
            ).fetchone()
            db.execute("DELETE FROM expunged WHERE mailbox = ? AND modseq <= ?", (box.id, floor))
            db.execute(
                "UPDATE mailboxes SET vanished_floor = max(vanished_floor, ?) WHERE id = ?",
                (floor, box.id),
            )

    # -- status, reading -----------------------------------------------------------------------

    @_guarded
    def status(self, name: str) -> MailboxStatus:
        """RFC 9051 6.3.11 STATUS, after a sync."""
        snapshot = self.sync(name)
        with self._index.read() as db:
            (recent,) = db.execute(
                "SELECT count(*) FROM messages JOIN mailboxes ON mailbox = id"
                " WHERE name = ? AND recent = 1 AND expunging = 0",
                (snapshot.name,),
            ).fetchone()
        messages = snapshot.messages
        return MailboxStatus(
            name=snapshot.name,
            uidvalidity=snapshot.uidvalidity,
            uidnext=snapshot.uidnext,
            highestmodseq=snapshot.highestmodseq,
            messages=len(messages),
            unseen=sum(1 for m in messages if SEEN not in m.flags),
            deleted=sum(1 for m in messages if DELETED in m.flags),
            size=sum(m.size for m in messages),
            recent=recent,
        )

    @_guarded
    def path(self, name: str, uid: int) -> Path:
        """Where the message is now; ``MessageGoneError`` if it was expunged."""
        folder = self._existing(name)
        cached = self._cache.get(folder.name)
        filename = cached.files.get(uid) if cached is not None else None
        if filename is None:
            with self._index.read() as db:
                row = db.execute(
                    "SELECT filename FROM messages JOIN mailboxes ON mailbox = id"
                    " WHERE name = ? AND uid = ? AND expunging = 0",
                    (folder.name, uid),
                ).fetchone()
            if row is None:
                raise MessageGoneError(f"message {uid} in {folder.name} no longer exists")
            filename = str(row[0])
        path = folder.cur / filename
        if not os.path.lexists(path):
            found = self._find(folder, _split_name(filename)[0])
            if found is None:
                raise MessageGoneError(f"message {uid} in {folder.name} no longer exists")
            path = found
        return path

    def _find(self, folder: _Folder, key: str) -> Path | None:
        """The file of ``key`` after someone renamed it (new flags), if it still exists."""
        for directory in (folder.cur, folder.new):
            name = _by_key(_listdir(directory)).get(key)
            if name is not None:
                return directory / name
        return None

    @_guarded
    def read(self, name: str, uid: int) -> bytes:
        """The message with CRLF line ends; ``MessageGoneError`` if expunged meanwhile."""
        folder = self._folder(name)
        cached = self._cache.get(folder.name)
        filename = cached.files.get(uid) if cached is not None else None
        if filename is not None:  # the common case: the file is where the last sync saw it
            try:
                with open(os.path.join(folder.path, "cur", filename), "rb") as f:
                    return _to_crlf(f.read(), _split_name(filename)[0])
            except FileNotFoundError:
                pass  # renamed or expunged since: look for it as path() does
        for _ in range(3):
            path = self.path(name, uid)
            try:
                data = path.read_bytes()
            except FileNotFoundError:  # renamed between path() and open(): look again
                continue
            return _to_crlf(data, _split_name(path.name)[0])
        raise MessageGoneError(f"message {uid} in {name} no longer exists")

    @_guarded
    def cached_items(
        self, name: str, uids: Collection[int], items: Collection[str]
    ) -> dict[tuple[int, str], bytes]:
        """The ``items`` of messages ``uids`` saved by ``save_items`` (in any process), by
        (UID, item); what was never saved is missing."""
        if not uids or not items:
            return {}
        folder = self._folder(name)
        with self._index.read() as db:
            box = self._box(db, folder.name)
            if box is None:
                return {}
            rows = db.execute(
                "SELECT uid, item, value FROM derived WHERE mailbox = ? AND uid BETWEEN ? AND ?",
                (box.id, min(uids), max(uids)),
            ).fetchall()
        wanted = uids if isinstance(uids, set | frozenset) else set(uids)
        return {(uid, item): value for uid, item, value in rows if uid in wanted and item in items}

    @_guarded
    def save_items(self, name: str, values: Mapping[tuple[int, str], bytes]) -> None:
        """Keep items derived from messages' contents (by UID and item name) for every process
        of this user; a message expunged meanwhile is skipped. A UID names one message for
        the life of its row, and a Maildir file's contents never change, so nothing goes stale.
        Committed without waiting for the disk: it is a cache."""
        if not values:
            return
        folder = self._folder(name)
        with self._index.write(fsync=False) as db:
            box = self._box(db, folder.name)
            if box is None:
                return
            db.executemany(
                "INSERT OR IGNORE INTO derived (mailbox, uid, item, value) SELECT ?, ?, ?, ?"
                " WHERE EXISTS (SELECT 1 FROM messages WHERE mailbox = ? AND uid = ?)",
                [(box.id, uid, item, value, box.id, uid) for (uid, item), value in values.items()],
            )

    def watch_dirs(self, name: str) -> list[Path]:
        """The directories whose changes mean "sync again" (for inotify)."""
        folder = self._folder(name)
        return [folder.new, folder.cur]

    # -- flags ---------------------------------------------------------------------------------

    @_guarded
    def store(
        self,
        name: str,
        uids: Iterable[int],
        mode: Literal["+", "-", ""],
        flags: Iterable[str],
        unchangedsince: int | None = None,
    ) -> tuple[list[MessageInfo], list[int]]:
        """RFC 9051 6.4.6 STORE (``+`` add, ``-`` remove, ``""`` replace) with RFC 7162
        UNCHANGEDSINCE; returns the changed messages (each with its own new MODSEQ) and the
        UIDs that failed the UNCHANGEDSINCE test. Unknown UIDs are skipped."""
        folder = self._existing(name)
        wanted = normalise_flags(flags)
        # The new flags are in the renamed file names: a commit lost to a power cut is
        # re-read from them by the next sync (with new MODSEQs), so no fsync waits here.
        with self._index.write(fsync=False) as db:
            box = self._box_locked(db, folder)
            if mode != "-":
                self._keywords_of(folder.path).allocate(wanted, self.maildir.fsync)
            return self._store_locked(db, box, folder, list(uids), mode, wanted, unchangedsince)

    def _store_locked(
        self,
        db: sqlite3.Connection,
        box: _Box,
        folder: _Folder,
        uids: list[int],
        mode: Literal["+", "-", ""],
        wanted: frozenset[str],
        unchangedsince: int | None = None,
    ) -> tuple[list[MessageInfo], list[int]]:
        keywords = self._keywords_of(folder.path)
        rows = self._rows_by_uid(db, box, uids)
        # Every flag a new name may carry needs its letter (also if dovecot-keywords was lost).
        keywords.allocate(
            (wanted if mode != "-" else frozenset()) | {f for r in rows for f in r.flags},
            self.maildir.fsync,
        )
        wanted = keywords.canonical(wanted)
        highest = box.highestmodseq
        changed: list[MessageInfo] = []
        failed: list[int] = []
        listing: dict[str, str] | None = None
        for r in rows:
            if unchangedsince is not None and r.modseq > unchangedsince:
                failed.append(r.uid)  # RFC 7162 3.1.3
                continue
            filename = r.filename
            current = r.flags
            for _ in range(2):
                new_flags = _apply(mode, current, wanted)
                key, letters = _split_name(filename)
                target = f"{key}:2,{keywords.letters(new_flags, keep=letters)}"
                try:
                    if target != filename:
                        os.rename(folder.cur / filename, folder.cur / target)
                    break
                except FileNotFoundError:
                    # Renamed by another program (flags changed): start from what it wrote.
                    if listing is None:
                        listing = _by_key(_listdir(folder.cur))
                    found = listing.get(r.key)
                    if found is None or found == filename:
                        target = ""
                        break
                    filename, current = found, keywords.flags(_split_name(found)[1])
            if not target:
                continue  # gone; the next sync expunges it
            if new_flags == r.flags and target == r.filename:
                continue
            modseq = r.modseq
            if new_flags != r.flags:
                highest += 1
                modseq = highest
            db.execute(
                "UPDATE messages SET filename = ?, flags = ?, modseq = ?"
                " WHERE mailbox = ? AND uid = ?",
                (target, _flags_text(new_flags), modseq, box.id, r.uid),
            )
            if new_flags != r.flags:
                changed.append(
                    MessageInfo(r.uid, new_flags, modseq, r.size, r.info().internaldate, r.key)
                )
        db.execute("UPDATE mailboxes SET highestmodseq = ? WHERE id = ?", (highest, box.id))
        self._cache.pop(folder.name, None)
        return changed, failed

    @staticmethod
    def _rows_by_uid(db: sqlite3.Connection, box: _Box, uids: Iterable[int]) -> list[_Row]:
        wanted = sorted(set(uids))
        if not wanted:
            return []
        rows = [
            _row(values)
            for values in db.execute(
                f"SELECT {_ROW_COLUMNS} FROM messages WHERE mailbox = ? AND expunging = 0"
                " AND uid BETWEEN ? AND ? ORDER BY uid",
                (box.id, wanted[0], wanted[-1]),
            )
        ]
        chosen = set(wanted)
        return [r for r in rows if r.uid in chosen]

    @_guarded
    def claim_recent(self, name: str) -> frozenset[int]:
        """RFC 3501 2.3.2 \\Recent: the UIDs no session has claimed; the caller gets them and
        no other session will. Only messages the index knows (the caller's last sync or later)."""
        folder = self._existing(name)
        with self._index.read() as db:
            box = self._box(db, folder.name)
            if (
                box is not None
                and not db.execute(
                    "SELECT 1 FROM messages WHERE mailbox = ? AND recent = 1 LIMIT 1", (box.id,)
                ).fetchone()
            ):
                return frozenset()  # the common case: nothing to claim, no write
        # A claim lost to a power cut only makes those messages \Recent once more.
        with self._index.write(fsync=False) as db:
            box = self._box_locked(db, folder)
            uids = frozenset(
                uid
                for (uid,) in db.execute(
                    "SELECT uid FROM messages WHERE mailbox = ? AND recent = 1 AND expunging = 0",
                    (box.id,),
                )
            )
            db.execute("UPDATE messages SET recent = 0 WHERE mailbox = ? AND recent = 1", (box.id,))
        return uids

    @_guarded
    def changes_since(self, name: str, modseq: int) -> tuple[list[MessageInfo], list[int]]:
        """RFC 7162 CHANGEDSINCE / QRESYNC: messages changed after ``modseq`` and UIDs
        expunged after it. Past the oldest tombstone kept, every UID below UIDNEXT that is not
        in the mailbox counts as expunged (RFC 7162 3.2.10 allows reporting more)."""
        folder = self._existing(name)
        with self._index.read() as db:
            box = self._box(db, folder.name)
        if box is None:
            self.sync(folder.name)
        with self._index.read() as db:
            box = self._box(db, folder.name)
            assert box is not None
            changed = [
                _row(values).info()
                for values in db.execute(
                    f"SELECT {_ROW_COLUMNS} FROM messages WHERE mailbox = ? AND modseq > ?"
                    " AND expunging = 0 ORDER BY uid",
                    (box.id, modseq),
                )
            ]
            if modseq >= box.vanished_floor:
                expunged = [
                    uid
                    for (uid,) in db.execute(
                        "SELECT uid FROM expunged WHERE mailbox = ? AND modseq > ? ORDER BY uid",
                        (box.id, modseq),
                    )
                ]
            else:
                present = {
                    uid
                    for (uid,) in db.execute(
                        "SELECT uid FROM messages WHERE mailbox = ? AND expunging = 0", (box.id,)
                    )
                }
                expunged = [uid for uid in range(1, box.uidnext) if uid not in present]
        return changed, expunged

    # -- new messages --------------------------------------------------------------------------

    @_guarded
    def append(
        self,
        name: str,
        message: bytes,
        flags: Iterable[str] = (),
        internaldate: datetime | None = None,
    ) -> tuple[int, int]:
        """RFC 9051 6.3.12 APPEND, RFC 4315 APPENDUID: (UIDVALIDITY, UID). Durable before it
        returns; ``QuotaExceededError`` over quota; the internal date becomes the mtime."""
        folder = self._existing(name)
        wanted = normalise_flags(flags)
        with self._index.write():
            self._keywords_of(folder.path).allocate(wanted, self.maildir.fsync)
        wanted = self._keywords_of(folder.path).canonical(wanted)
        check_quota(self.maildir, self.quota_bytes, len(message))
        mtime = (internaldate or datetime.now(UTC)).timestamp()
        (path,) = deliver_all([(self.maildir, folder_name(folder.name))], message, mtime=mtime)
        key = path.name
        with self._index.write() as db:
            self._sync_locked(db, folder, flags_for={key: wanted})
            box = self._box(db, folder.name)
            assert box is not None
            row = db.execute(
                f"SELECT {_ROW_COLUMNS} FROM messages WHERE mailbox = ? AND key = ?",
                (box.id, key),
            ).fetchone()
            if row is None:
                raise StoreError(f"the appended message {key} vanished from {folder.name}")
            appended = _row(row)
            if appended.flags != wanted:  # another process moved it to cur/ first
                self._store_locked(db, box, folder, [appended.uid], "", wanted)
            fsync_dir(folder.cur, self.maildir.fsync)  # the rename into cur/ is durable
            fsync_dir(folder.new, self.maildir.fsync)
        return box.uidvalidity, appended.uid

    @_guarded
    def copy(self, src: str, uids: Iterable[int], dst: str) -> tuple[int, list[tuple[int, int]]]:
        """RFC 9051 6.4.7 COPY, RFC 4315 COPYUID: (destination UIDVALIDITY, [(src, dst)]).

        Copies are hard links (as Dovecot makes them) with their own key, or byte copies where
        the file system refuses links; flags and internal date go along. Durable on return."""
        return self._transfer(src, uids, dst, move=False)

    @_guarded
    def move(self, src: str, uids: Iterable[int], dst: str) -> tuple[int, list[tuple[int, int]]]:
        """RFC 6851 MOVE: each file is renamed into the destination, so at every moment it is
        in one folder or the other, never lost and never in both."""
        return self._transfer(src, uids, dst, move=True)

    def _transfer(
        self, src: str, uids: Iterable[int], dst: str, *, move: bool
    ) -> tuple[int, list[tuple[int, int]]]:
        source, target = self._existing(src), self._existing(dst)
        same = source.name == target.name
        wanted = list(uids)
        with self._index.write() as db:
            src_box = self._box_locked(db, source)
            dst_box = self._box_locked(db, target)
            self._sync_locked(db, target)  # deliveries waiting there get their UIDs first
            dst_box = self._box(db, target.name) or dst_box
            rows = self._rows_by_uid(db, src_box, wanted)
            if not move or same:
                check_quota(self.maildir, self.quota_bytes, sum(r.size for r in rows))
            src_keywords = self._keywords_of(source.path)
            src_keywords.reload()
            dst_keywords = self._keywords_of(target.path)
            dst_keywords.allocate({f for r in rows for f in r.flags}, self.maildir.fsync)
            dst_keys = set(self._rows(db, dst_box)) if move and not same else set()
            placed: list[tuple[_Row, str, str]] = []  # (source row, key, name in dst cur/)
            moved: list[_Row] = []
            for r in rows:
                result = self._place(source, target, r, dst_keywords, move and not same, dst_keys)
                if result is None:
                    continue
                key, filename, renamed = result
                placed.append((r, key, filename))
                if renamed:
                    moved.append(r)
            fsync_dir(target.cur, self.maildir.fsync)
            if moved:
                fsync_dir(source.cur, self.maildir.fsync)
            mapping = self._register_locked(db, dst_box, target, placed)
            if moved:
                highest = self._bump(db, src_box)
                self._tombstones(db, src_box, [r.uid for r in moved], highest)
            self._cache.pop(source.name, None)
            self._cache.pop(target.name, None)
        if move and same:
            self._expunge_uids(source, [src_uid for src_uid, _ in mapping], only_deleted=False)
        return dst_box.uidvalidity, mapping

    def _place(
        self,
        source: _Folder,
        target: _Folder,
        r: _Row,
        dst_keywords: Keywords,
        rename: bool,
        dst_keys: set[str],
    ) -> tuple[str, str, bool] | None:
        """Put message ``r`` into ``target``'s cur/: (key, file name, renamed) or None if gone."""
        flags = dst_keywords.canonical(r.flags)
        for _ in range(2):
            src_path = source.cur / r.filename
            if not src_path.exists():
                found = self._find(source, r.key)
                if found is None:
                    return None
                src_path = found
            letters = dst_keywords.letters(flags)
            if rename and r.key not in dst_keys:
                filename = f"{r.key}:2,{letters}"
                try:
                    os.rename(src_path, target.cur / filename)
                except FileNotFoundError:
                    continue
                except OSError as err:
                    if err.errno != errno.EXDEV:
                        raise
                else:
                    return r.key, filename, True
            key = self.maildir.unique() + self._size_suffix(r, src_path)
            filename = f"{key}:2,{letters}"
            try:
                os.link(src_path, target.cur / filename, follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as err:
                if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
                self._copy_bytes(src_path, target, filename)
            if rename:  # a move whose key is taken in the destination, or across devices
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(src_path)
                return key, filename, True
            return key, filename, False
        return None

    @staticmethod
    def _size_suffix(r: _Row, path: Path) -> str:
        s, w = _SIZE_S.search(r.key), _SIZE_W.search(r.key)
        if s and w:
            return f",S={s[1]},W={w[1]}"
        return f",S={path.stat().st_size},W={r.size}"

    def _copy_bytes(self, src_path: Path, target: _Folder, filename: str) -> None:
        tmp = target.path / "tmp" / filename
        data = src_path.read_bytes()
        mtime = src_path.stat().st_mtime
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.utime(fd, (mtime, mtime))
            self.maildir.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, target.cur / filename)
        os.unlink(tmp)

    def _register_locked(
        self,
        db: sqlite3.Connection,
        box: _Box,
        folder: _Folder,
        placed: list[tuple[_Row, str, str]],
    ) -> list[tuple[int, int]]:
        """Give files just put into ``folder``'s cur/ their UIDs (uidlist first, then rows)."""
        if not placed:
            return []
        keywords = self._keywords_of(folder.path)
        uidnext, highest = box.uidnext, box.highestmodseq
        inserts: list[_Insert] = []
        mapping: list[tuple[int, int]] = []
        for r, key, filename in placed:
            highest += 1
            flags = keywords.flags(_split_name(filename)[1])
            inserts.append(
                (box.id, uidnext, key, filename, _flags_text(flags), highest, r.size,
                 r.internaldate, 1)
            )  # fmt: skip
            mapping.append((r.uid, uidnext))
            uidnext += 1
        recorded = {key: r.uid for key, r in self._rows(db, box).items()}
        recorded.update({i[2]: i[1] for i in inserts})
        uidlist = UidList(box.uidvalidity, uidnext, highest, recorded)
        _write_atomic(folder.path / UIDLIST_NAME, uidlist.dump(), self.maildir.fsync)
        _insert(db, inserts)
        db.execute(
            "UPDATE mailboxes SET uidnext = ?, highestmodseq = ? WHERE id = ?",
            (uidnext, highest, box.id),
        )
        return mapping

    @staticmethod
    def _bump(db: sqlite3.Connection, box: _Box) -> int:
        (highest,) = db.execute(
            "UPDATE mailboxes SET highestmodseq = highestmodseq + 1 WHERE id = ?"
            " RETURNING highestmodseq",
            (box.id,),
        ).fetchone()
        return int(highest)

    # -- expunge -------------------------------------------------------------------------------

    @_guarded
    def expunge(self, name: str, uids: Iterable[int] | None = None) -> list[int]:
        """RFC 9051 6.4.3 EXPUNGE (RFC 4315 UID EXPUNGE with ``uids``): removes the messages
        flagged \\Deleted and returns their UIDs."""
        folder = self._existing(name)
        return self._expunge_uids(folder, None if uids is None else list(uids), only_deleted=True)

    @_guarded
    def remove(self, name: str, uids: Iterable[int]) -> list[int]:
        """Expunge exactly ``uids``, whatever their flags (POP3 DELE then QUIT, RFC 1939 6),
        with the same crash-safe steps as ``expunge``; returns the UIDs removed."""
        folder = self._existing(name)
        return self._expunge_uids(folder, list(uids), only_deleted=False)

    def _expunge_uids(
        self, folder: _Folder, uids: list[int] | None, *, only_deleted: bool
    ) -> list[int]:
        # Step 1: mark in the index, with tombstones, and commit.
        with self._index.write() as db:
            self._sync_locked(db, folder)  # flags set by other programs count too
            box = self._box(db, folder.name)
            assert box is not None
            if uids is None:
                rows = [r for r in self._rows(db, box).values() if not r.expunging]
                rows.sort(key=lambda r: r.uid)
            else:
                rows = self._rows_by_uid(db, box, uids)
            doomed = [r for r in rows if DELETED in r.flags or not only_deleted]
            if not doomed:
                return []
            highest = self._bump(db, box)
            db.executemany(
                "UPDATE messages SET expunging = 1 WHERE mailbox = ? AND uid = ?",
                [(box.id, r.uid) for r in doomed],
            )
            db.executemany(
                "INSERT OR REPLACE INTO expunged (mailbox, uid, modseq) VALUES (?, ?, ?)",
                [(box.id, r.uid, highest) for r in doomed],
            )
            self._cache.pop(folder.name, None)
        # Step 2: unlink, then make the unlinks durable before the rows go.
        listing: dict[str, str] | None = None
        for r in doomed:
            try:
                self._unlink(folder.cur / r.filename)
            except FileNotFoundError:
                if listing is None:
                    listing = _by_key(_listdir(folder.cur))
                found = listing.get(r.key)
                if found is not None:
                    with contextlib.suppress(FileNotFoundError):
                        self._unlink(folder.cur / found)
        fsync_dir(folder.cur, self.maildir.fsync)
        # Step 3: drop the rows (a sync after a crash before this point does it instead).
        with self._index.write() as db:
            db.executemany(
                "DELETE FROM messages WHERE mailbox = ? AND uid = ? AND expunging = 1",
                [(box.id, r.uid) for r in doomed],
            )
            self._tombstones(db, box, [], highest)
        self._cache.pop(folder.name, None)
        return [r.uid for r in doomed]

    # -- rebuild -------------------------------------------------------------------------------

    @_guarded
    def rebuild(self) -> tuple[int, int]:
        """Recreate the index from the Maildir: every folder, message and flag, the UIDs and
        UIDVALIDITY each ``mailroom-uidlist`` (or the old index, if readable) still names.
        Unfinished expunges of the old index are finished first. Returns (mailboxes, messages).
        """
        with self._index.write() as db:
            old: dict[str, UidList] = {}
            for box in [_Box(*r) for r in db.execute("SELECT * FROM mailboxes")]:
                folder = self._folder(box.name) if _valid(box.name) else None
                rows = self._rows(db, box)
                if folder is not None and folder.exists():
                    on_disk = _by_key(_listdir(folder.cur))
                    for r in rows.values():
                        if r.expunging and r.key in on_disk:
                            with contextlib.suppress(FileNotFoundError):
                                self._unlink(folder.cur / on_disk[r.key])
                    fsync_dir(folder.cur, self.maildir.fsync)
                old[box.name] = UidList(
                    box.uidvalidity,
                    box.uidnext,
                    box.highestmodseq,
                    {k: r.uid for k, r in rows.items() if not r.expunging},
                )
            db.execute("DELETE FROM mailboxes")
            self._cache.clear()
            self._base.clear()
            count = 0
            for name, path in self._folders().items():
                folder = _Folder(name, path)
                known = self._start_box(db, folder, old.get(name))
                self._sync_locked(db, folder, known=known)
                (messages,) = db.execute(
                    "SELECT count(*) FROM messages JOIN mailboxes ON mailbox = id WHERE name = ?",
                    (name,),
                ).fetchone()
                count += messages
            mailboxes = len(self._folders())
        return mailboxes, count


def _valid(name: str) -> bool:
    try:
        canonical_name(name)
    except InvalidMailboxNameError:
        return False
    return True


def _parents(name: str) -> Iterator[str]:
    levels = name.split(DELIMITER)
    for depth in range(1, len(levels)):
        yield DELIMITER.join(levels[:depth])


def _apply(
    mode: Literal["+", "-", ""], current: frozenset[str], flags: frozenset[str]
) -> frozenset[str]:
    if mode == "+":
        return current | flags
    if mode == "-":
        return current - flags
    return flags
