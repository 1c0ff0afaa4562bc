"""The IMAP session: one connection's state machine and every command handler, sans-IO.

``IMAPSession.feed`` takes whatever bytes the client sent and returns the bytes to send back
(and, for STARTTLS, COMPRESS and LOGOUT, what the transport must do next). It owns:

- the states of RFC 9051 3 (``State``), changed only by ``_set_state``, which logs old -> new;
- a dispatch table per state, from command name to a handler named for the wire verb
  (``LOGIN``, ``UID_FETCH``...) that returns the complete response bytes;
- the session's view of the selected mailbox: sequence numbers <-> UIDs, flags and mod-sequences
  last reported, so that untagged EXISTS / EXPUNGE / VANISHED / FETCH updates keep the client's
  sequence numbers consistent (RFC 9051 7, 7.5.1: no EXPUNGE during FETCH, STORE or SEARCH);
- the limits on hostile input (literal sizes before "+", line length, nesting, list lengths).

The mail store and password checking are injected through ``SessionConfig``; handlers may
block on them (the server runs ``feed`` in a worker thread).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import contextlib
import enum
import errno
import functools
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from mailroom.errors import (
    ConnectionLimitError,
    DeliveryError,
    InvalidFlagError,
    InvalidMailboxNameError,
    KeywordLimitError,
    MailboxExistsError,
    MailboxNotFoundError,
    MailroomError,
    MessageGoneError,
    QuotaExceededError,
    SpecialUseError,
    StoreError,
    UnknownTransferEncodingError,
)
from mailroom.imap.parser import (
    MAX_LIST,
    MAX_NONSYNC,
    MAX_NUMBER64,
    Args,
    Command,
    Continue,
    Framer,
    LiteralRequest,
    ParseError,
    Rejected,
    SequenceSet,
    format_date_time,
    format_set,
)
from mailroom.imap.search import (
    BadCharsetError,
    Candidate,
    flag_test,
    header_fields,
    matches,
    parse_search,
    uses_modseq,
)
from mailroom.imap.wire import Atom, Value, encode, encode_mailbox, quoted_or_literal
from mailroom.mime import Message, Section
from mailroom.throttle import TooManyFailures

if TYPE_CHECKING:  # mailroom.accounts imports sqlite3; the session only passes a User along
    from mailroom.accounts import User

log = logging.getLogger(__name__)

Action = Literal[None, "starttls", "compress", "close"]

SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
SPECIAL_USES = ("\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash")
DELIMITER = "/"
MAX_FAILED_LOGINS = 3
MAX_BAD_COMMANDS = 10  # in a row, before authentication: then "* BYE"
MAX_MAILBOX_NAME = 512  # characters
MESSAGE_CACHE = 32  # parsed messages kept per session
MESSAGE_CACHE_BYTES = 16 * 1024 * 1024  # ... and their octets; the newest one is always kept
# Commands cheap enough for the event loop when the selected mailbox is current (``quick``).
_QUICK = frozenset({b"NOOP", b"CHECK", b"IDLE", b"CAPABILITY", b"NAMESPACE"})
_HTTP = re.compile(rb"^[A-Z]{3,7} \S+ HTTP/\d")


# -- what the session needs from the outside world ---------------------------------------------


class _Flight:
    """One key being computed: its waiters sleep on ``done``; ``value`` stays None if it failed."""

    __slots__ = ("done", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: bytes | None = None


class SharedCache:
    """FETCH items computed from a message's contents (ENVELOPE, BODYSTRUCTURE, BODY), encoded,
    for all the sessions of a process: a user's phone and desktop fetch the same envelopes.

    Entries are keyed by user, mailbox, UIDVALIDITY, UID and Maildir key: within one
    UIDVALIDITY a UID names one message, and a Maildir file's contents never change. The
    least recently used entries go beyond ``entries`` or ``octets``; safe to use from several
    threads. ``get_or_compute`` computes each missing key once however many threads ask for it
    at the same moment (ten clients fetching the same envelopes parse each message once).
    """

    def __init__(self, entries: int = 100_000, octets: int = 64 * 1024 * 1024) -> None:
        self.entries = entries
        self.octets = octets
        self._size = 0
        self._items: OrderedDict[tuple[object, ...], bytes] = OrderedDict()
        self._flights: dict[tuple[object, ...], _Flight] = {}
        self._lock = threading.Lock()

    def get_or_compute(self, key: tuple[object, ...], compute: Callable[[], bytes]) -> bytes:
        """The cached value of ``key``, else ``compute()``'s, stored. While one thread computes
        a key, the others asking for it wait for its value instead of computing it too; if
        ``compute`` raises, the exception reaches that thread only and a waiter computes in its
        place. ``compute`` runs without the lock held and must not ask for ``key`` itself."""
        value = self._get_or_compute(key, compute, wait=True)
        assert value is not None
        return value

    def fill(self, key: tuple[object, ...], compute: Callable[[], bytes]) -> None:
        """Compute and store ``key`` unless it is cached or another thread is computing it:
        never waits. Threads warming the same keys in the same order so spread out over them
        instead of queueing behind one another."""
        self._get_or_compute(key, compute, wait=False)

    def _get_or_compute(
        self, key: tuple[object, ...], compute: Callable[[], bytes], *, wait: bool
    ) -> bytes | None:
        while True:
            with self._lock:
                hit = self._get(key)
                if hit is not None:
                    return hit
                flight = self._flights.get(key)
                if flight is None:
                    flight = self._flights[key] = _Flight()
                    break
                if not wait:
                    return None
            flight.done.wait()
            if flight.value is not None:  # handed over even if the LRU already dropped it
                return flight.value
        try:
            value = compute()
            flight.value = value
        finally:
            with self._lock:
                del self._flights[key]
                if flight.value is not None:
                    self._put(key, flight.value)
            flight.done.set()
        return value

    def has(self, key: tuple[object, ...]) -> bool:
        with self._lock:
            return key in self._items

    def put(self, key: tuple[object, ...], value: bytes) -> None:
        with self._lock:
            self._put(key, value)

    def _get(self, key: tuple[object, ...]) -> bytes | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def _put(self, key: tuple[object, ...], value: bytes) -> None:
        old = self._items.pop(key, None)
        self._size += len(value) - (len(old) if old is not None else 0)
        self._items[key] = value
        while self._items and (len(self._items) > self.entries or self._size > self.octets):
            self._size -= len(self._items.popitem(last=False)[1])


def _encode_values(values: list[str]) -> bytes:
    return "".join("\0" + v for v in values).encode("utf-8", "surrogateescape")


class _SearchView:
    """A message as SEARCH reads it: header values from the process's cache, the rest parsed."""

    __slots__ = ("box", "session", "uid")

    def __init__(self, session: IMAPSession, box: Mailbox, uid: int) -> None:
        self.session, self.box, self.uid = session, box, uid

    def header_values(self, name: str) -> list[str]:
        return self.session._header_values(self.box, self.uid, name)

    def text(self) -> str:
        return self.session._parsed(self.uid).text()

    def date(self) -> datetime | None:
        return self.session._parsed(self.uid).date()


class MessageInfo(Protocol):
    """``mailroom.mailstore.MessageInfo``: flags never include \\Recent."""

    @property
    def uid(self) -> int: ...
    @property
    def flags(self) -> frozenset[str]: ...
    @property
    def modseq(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def internaldate(self) -> datetime: ...
    @property
    def key(self) -> str: ...  # the Maildir key: one file, whose contents never change


class MailboxEntry(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def special_use(self) -> str | None: ...
    @property
    def has_children(self) -> bool: ...
    @property
    def subscribed(self) -> bool: ...
    @property
    def selectable(self) -> bool: ...


class MailboxStatus(Protocol):
    @property
    def uidvalidity(self) -> int: ...
    @property
    def uidnext(self) -> int: ...
    @property
    def highestmodseq(self) -> int: ...
    @property
    def messages(self) -> int: ...
    @property
    def unseen(self) -> int: ...
    @property
    def deleted(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def recent(self) -> int: ...


class Snapshot(Protocol):
    @property
    def uidvalidity(self) -> int: ...
    @property
    def uidnext(self) -> int: ...
    @property
    def highestmodseq(self) -> int: ...
    @property
    def messages(self) -> Sequence[MessageInfo]: ...
    @property
    def uids(self) -> Sequence[int]: ...  # of ``messages``, in order
    def changed_since(self, modseq: int, /) -> Sequence[MessageInfo]: ...  # in UID order


class MailStore(Protocol):
    """The part of ``mailroom.mailstore.MailStore`` the session uses (see that module).

    Parameters are positional-only so that only their types, not their names, must match.
    """

    @property
    def quota_bytes(self) -> int: ...
    def usage_bytes(self) -> int: ...
    def ensure_defaults(self) -> None: ...
    def close(self) -> None: ...
    def list_mailboxes(self) -> Sequence[MailboxEntry]: ...
    def create_mailbox(self, name: str, special_use: str | None = None, /) -> None: ...
    def delete_mailbox(self, name: str, /) -> None: ...
    def rename_mailbox(self, old: str, new: str, /) -> None: ...
    def subscribe(self, name: str, /) -> None: ...
    def unsubscribe(self, name: str, /) -> None: ...
    def sync(self, name: str, /) -> Snapshot: ...
    def select(self, name: str, /) -> tuple[Snapshot, frozenset[int]]: ...
    def status(self, name: str, /) -> MailboxStatus: ...
    def read(self, name: str, uid: int, /) -> bytes: ...
    def store(
        self,
        name: str,
        uids: list[int],
        mode: Literal["+", "-", ""],
        flags: list[str],
        unchangedsince: int | None = None,
        /,
    ) -> tuple[Sequence[MessageInfo], Sequence[int]]: ...
    def append(
        self,
        name: str,
        message: bytes,
        flags: list[str] = ...,
        internaldate: datetime | None = None,
        /,
    ) -> tuple[int, int]: ...
    def copy(
        self, src: str, uids: list[int], dst: str, /
    ) -> tuple[int, Sequence[tuple[int, int]]]: ...
    def move(
        self, src: str, uids: list[int], dst: str, /
    ) -> tuple[int, Sequence[tuple[int, int]]]: ...
    def expunge(self, name: str, uids: list[int] | None = None, /) -> Sequence[int]: ...
    def changes_since(
        self, name: str, modseq: int, /
    ) -> tuple[Sequence[MessageInfo], Sequence[int]]: ...
    def claim_recent(self, name: str, /) -> frozenset[int]: ...
    def cached_items(
        self, name: str, uids: Collection[int], items: Collection[str], /
    ) -> Mapping[tuple[int, str], bytes]: ...
    def save_items(self, name: str, values: Mapping[tuple[int, str], bytes], /) -> None: ...
    def watch_dirs(self, name: str, /) -> Sequence[Path]: ...
    def hold_if_current(self, name: str, /) -> bool: ...
    def release_hold(self) -> None: ...


class ParsedMessage(Protocol):
    """``mailroom.mime.Message``."""

    def envelope(self) -> Value: ...
    def bodystructure(self) -> Value: ...
    def body(self) -> Value: ...
    def section(self, section: Section) -> bytes | None: ...
    def binary(self, part: tuple[int, ...]) -> bytes | None: ...
    def binary_size(self, part: tuple[int, ...]) -> int | None: ...
    def header_values(self, name: str) -> list[str]: ...
    def text(self) -> str: ...
    def date(self) -> datetime | None: ...


def parse_message(raw: bytes) -> ParsedMessage:
    """The MIME view of ``raw`` (``mailroom.mime.Message``); SessionConfig can replace it."""
    return Message(raw)


@dataclass(frozen=True)
class SessionConfig:
    hostname: str
    implicit_tls: bool  # port 993: TLS from the start
    starttls_available: bool  # port 143 with a certificate
    authenticate: Callable[[str, str], User | None]  # slow (argon2), may sleep for throttling
    open_store: Callable[[User], MailStore]
    max_literal: int = 64 * 1024 * 1024  # APPEND size limit (APPENDLIMIT)
    max_preauth_literal: int = 1024
    max_line: int = 64 * 1024  # a command line, without its literals
    max_nesting: int = 100  # parenthesis depth
    preauth_timeout: float = 60
    autologout: float = 30 * 60  # RFC 9051 5.4: at least 30 minutes
    compress_available: bool = True
    max_fetch_response: int = 256 * 1024 * 1024  # octets of one FETCH answer before NO [LIMIT]
    parse_message: Callable[[bytes], ParsedMessage] = parse_message
    shared_cache: SharedCache | None = None  # the process's (mailroom-imapd makes one)


@dataclass(frozen=True)
class Output:
    data: bytes  # bytes to send now (may be b"")
    action: Action = None


class State(enum.Enum):
    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATED = "authenticated"
    SELECTED = "selected"
    LOGOUT = "logout"


class Failure(Exception):
    """A handler's tagged NO (``status="NO"``) or BAD, with an optional response code."""

    def __init__(self, text: str, code: str | None = None, status: str = "NO") -> None:
        super().__init__(text)
        self.text = text
        self.code = code
        self.status = status


@dataclass
class Mailbox:
    """The session's view of the selected mailbox (what the client has been told).

    The view is ``snapshot``, the store's snapshot the client was last brought to, plus the
    few ways this session's view differs from it: ``own_infos`` holds the infos it learnt since
    (its own STOREs) and those of messages expunged but not yet reported (``gone``), which
    are then also in ``own_uids``. The snapshot is shared with the user's other sessions, so
    the view costs a session a few hundred bytes however big the mailbox is; a copy of its
    own cost about 50 bytes a message (100 IDLE sessions on a mailbox of 3,000: 17 MB).
    """

    name: str
    readonly: bool
    uidvalidity: int
    snapshot: Snapshot
    own_infos: dict[int, MessageInfo] = field(default_factory=dict)
    own_uids: list[int] | None = None  # the client's UIDs while they are not snapshot.uids
    recent: set[int] = field(default_factory=set)
    highestmodseq: int = 0
    uidnext: int = 1
    gone: set[int] = field(default_factory=set)  # expunged, not yet reported
    keywords: set[str] = field(default_factory=set)  # announced in FLAGS

    @property
    def uids(self) -> Sequence[int]:
        """The client's UIDs, ascending: sequence number n is uids[n - 1]."""
        return self.snapshot.uids if self.own_uids is None else self.own_uids

    def seq(self, uid: int) -> int:
        uids = self.uids
        i = bisect.bisect_left(uids, uid)
        return i + 1 if i < len(uids) and uids[i] == uid else 0

    def info(self, uid: int) -> MessageInfo | None:
        """The message ``uid`` as the client was last told, None if not in the view."""
        found = self.own_infos.get(uid)
        if found is not None:
            return found
        snap = self.snapshot
        i = bisect.bisect_left(snap.uids, uid)
        return snap.messages[i] if i < len(snap.uids) and snap.uids[i] == uid else None

    def __getitem__(self, uid: int) -> MessageInfo:
        """The message ``uid`` of the view (KeyError if it is not in it)."""
        found = self.info(uid)
        if found is None:
            raise KeyError(uid)
        return found

    def messages(self) -> Iterator[MessageInfo]:
        """The view's messages in sequence-number order."""
        if self.own_uids is not None:
            yield from (self[u] for u in self.own_uids)
        elif self.own_infos:
            yield from (self.own_infos.get(m.uid, m) for m in self.snapshot.messages)
        else:
            yield from self.snapshot.messages

    def learn(self, info: MessageInfo) -> None:
        """The client was told ``info`` (e.g. its own STORE), ahead of the snapshot."""
        self.own_infos[info.uid] = info

    def bring_to(self, snap: Snapshot) -> None:
        """Make ``snap`` the view: messages in ``gone`` stay in it, and what ``own_infos`` has
        newer than ``snap`` (every change since the last snapshot has a MODSEQ above its
        HIGHESTMODSEQ, so an older MODSEQ means ``snap`` has not seen it yet)."""
        floor = self.snapshot.highestmodseq
        keep = {u: self[u] for u in self.gone}
        for uid, info in self.own_infos.items():
            if uid not in keep:
                i = bisect.bisect_left(snap.uids, uid)
                if i < len(snap.uids) and snap.uids[i] == uid and snap.messages[i].modseq <= floor:
                    keep[uid] = info
        self.snapshot = snap
        self.own_infos = keep
        self.own_uids = sorted([*snap.uids, *self.gone]) if self.gone else None

    def forget_gone(self) -> None:
        """Take the messages in ``gone`` out of the view: their expunge was reported."""
        self.own_uids = [u for u in self.uids if u not in self.gone]
        for uid in self.gone:
            self.own_infos.pop(uid, None)
            self.recent.discard(uid)
        self.gone.clear()


@dataclass
class Sasl:
    """An AUTHENTICATE exchange waiting for the client's next line."""

    tag: str
    mechanism: str
    step: int = 0
    username: str = ""


@dataclass(frozen=True, slots=True)
class FetchItem:
    name: str  # FLAGS, UID, BODY, BINARY, BINARY.SIZE, RFC822.SIZE, ...
    section: Section | None = None
    section_text: str = ""  # the section as the response names it
    peek: bool = False
    partial: tuple[int, int] | None = None


Handler = Callable[["IMAPSession", str, Args], bytes]


class IMAPSession:
    """One IMAP connection, sans-IO (see the module docstring)."""

    def __init__(self, config: SessionConfig) -> None:
        self.config = config
        self.state = State.NOT_AUTHENTICATED
        self.tls = config.implicit_tls
        self.compressed = False
        self.user: User | None = None
        self.store: MailStore | None = None
        self.selected: Mailbox | None = None
        self.enabled: set[str] = set()
        self.condstore = False
        self.saved: list[int] = []  # RFC 5182 SEARCHRES: UIDs of "$"
        self.idle_tag: str | None = None
        self.sasl: Sasl | None = None
        self.held: MailStore | None = None  # held for the next feed, by ``quick``
        self.failed_logins = 0
        self.bad_commands = 0
        self.commands = 0
        self.action: Action = None
        self.framer = Framer(self._check_literal, config.max_line)
        self.cache: OrderedDict[tuple[str, int, int], tuple[bytes, ParsedMessage | None]] = (
            OrderedDict()
        )
        self.cache_bytes = 0
        self.computed: dict[tuple[int, str], bytes] = {}  # derived items parsed by this FETCH

    # -- the API the server calls ----------------------------------------------------------

    def greeting(self) -> bytes:
        return f"* OK [CAPABILITY {self._capabilities()}] {self.config.hostname} IMAP ready\r\n".encode()

    def quick(self, data: bytes) -> bool:
        """Whether ``feed(data)`` may run on the event loop: one whole command line, of a
        verb that does no more than report changes (NOOP, IDLE, DONE, ...), while the
        selected mailbox is current in memory. The store is then held for this thread
        (``MailStore.hold_if_current``) until that ``feed`` returns."""
        if (
            self.state is State.LOGOUT
            or self.sasl is not None
            or self.framer.pending
            or not data.endswith(b"\n")
            or data.count(b"\n") != 1
            or data.rstrip().endswith(b"}")
        ):
            return False
        if self.idle_tag is not None:
            if data.rstrip().upper() != b"DONE":
                return False
        else:
            words = data.split(None, 2)
            if len(words) < 2 or words[1].upper() not in _QUICK:
                return False
        if self.store is None or self.selected is None:
            return True
        if not self.store.hold_if_current(self.selected.name):
            return False
        self.held = self.store
        return True

    def feed(self, data: bytes) -> Output:
        held, self.held = self.held, None
        try:
            return self._feed(data)
        finally:
            if held is not None:
                held.release_hold()

    def _feed(self, data: bytes) -> Output:
        if self.state is State.LOGOUT:
            return Output(b"", "close")
        self.framer.feed(data)
        out = bytearray()
        for event in self.framer.events():
            if isinstance(event, Continue):
                out += b"+ Ready for literal data\r\n"
            elif isinstance(event, Rejected):
                out += event.response
                if event.close:
                    out += b"* BYE [TOOBIG] Cannot continue after a refused non-synchronizing literal\r\n"
                    self._set_state(State.LOGOUT)
                    self.action = "close"
            elif isinstance(event, Command):
                out += self._line(event.data)
            if self.action is not None:
                break
        action, self.action = self.action, None
        if action in ("starttls", "compress"):
            # RFC 9051 6.2.1 / RFC 4978 4: nothing sent behind the command in the clear is used.
            self.framer.discard()
        return Output(bytes(out), action)

    def tls_started(self) -> None:
        self.tls = True

    def compress_started(self) -> None:
        self.compressed = True

    @property
    def idling(self) -> bool:
        return self.idle_tag is not None

    def idle_poll(self) -> bytes:
        if self.idle_tag is None:
            return b""
        return self._updates(expunge=True)

    def watch_dirs(self) -> list[Path]:
        if self.store is None or self.selected is None:
            return []
        return list(self.store.watch_dirs(self.selected.name))

    @property
    def timeout(self) -> float:
        if self.state is State.NOT_AUTHENTICATED:
            return self.config.preauth_timeout
        return self.config.autologout

    def timed_out(self) -> bytes:
        self._set_state(State.LOGOUT)
        return b"* BYE Autologout; idle for too long\r\n"

    def close(self) -> None:
        if self.store is not None:
            store, self.store = self.store, None
            store.close()

    # -- state -----------------------------------------------------------------------------

    def _set_state(self, new: State) -> None:
        if new is not self.state:
            log.info("imap session %s -> %s", self.state.value, new.value)
            self.state = new
        if new is not State.SELECTED:
            self.selected = None
            self.saved = []  # RFC 5182 2.1: "$" is empty again after a mailbox is closed

    @property
    def utf8(self) -> bool:
        """UTF-8 mailbox names and strings: RFC 6855 UTF8=ACCEPT, or RFC 9051 (Appendix E 16)."""
        return "UTF8=ACCEPT" in self.enabled or "IMAP4REV2" in self.enabled

    @property
    def rev2(self) -> bool:
        return "IMAP4REV2" in self.enabled

    @property
    def qresync(self) -> bool:
        return "QRESYNC" in self.enabled

    def _capabilities(self) -> str:
        caps = ["IMAP4rev1", "IMAP4rev2"]
        if self.state is State.NOT_AUTHENTICATED:
            if self.config.starttls_available and not self.tls:
                caps.append("STARTTLS")
            if self.tls:
                caps += ["AUTH=PLAIN", "AUTH=LOGIN"]
            else:
                caps.append("LOGINDISABLED")  # RFC 9051 6.2.3: no LOGIN without TLS
        caps += ["SASL-IR", "LITERAL-", "ID", "ENABLE", "IDLE", "NAMESPACE", "UNSELECT"]
        caps += ["UIDPLUS", "MOVE", "SPECIAL-USE", "CREATE-SPECIAL-USE", "CHILDREN"]
        caps += ["LIST-EXTENDED", "LIST-STATUS", "STATUS=SIZE", "ESEARCH", "SEARCHRES"]
        caps += ["CONDSTORE", "QRESYNC"]
        caps += ["BINARY", "QUOTA", "QUOTA=RES-STORAGE", f"APPENDLIMIT={self.config.max_literal}"]
        caps.append("UTF8=ACCEPT")
        if (
            self.config.compress_available
            and not self.compressed
            and self.state is not State.NOT_AUTHENTICATED
        ):
            caps.append("COMPRESS=DEFLATE")
        return " ".join(caps)

    # -- framing limits ---------------------------------------------------------------------

    def _check_literal(self, request: LiteralRequest) -> Rejected | None:
        """Whether a literal may be sent; decided before "+" (RFC 7888, RFC 7889)."""
        tag = request.tag
        if self.state is State.NOT_AUTHENTICATED:
            limit = self.config.max_preauth_literal
        elif request.words[:1] == ("APPEND",):
            limit = self.config.max_literal
        else:
            limit = self.config.max_line
        if not request.synchronizing:
            # RFC 7888 4: LITERAL- non-synchronizing literals are at most 4096 octets.
            if request.size > min(limit, MAX_NONSYNC):
                return Rejected(
                    f"{tag} BAD [TOOBIG] Non-synchronizing literal larger than {min(limit, MAX_NONSYNC)}"
                    " octets\r\n".encode(),
                    close=True,
                )
            return self._check_command_size(request, limit)
        if request.size > limit:
            if request.words[:1] == ("APPEND",) and self.state is not State.NOT_AUTHENTICATED:
                # RFC 7889 4 / RFC 9051 7.1: APPEND over the limit gets NO [TOOBIG].
                return Rejected(
                    f"{tag} NO [TOOBIG] Message larger than {limit} octets\r\n".encode()
                )
            return Rejected(f"{tag} BAD [TOOBIG] Literal larger than {limit} octets\r\n".encode())
        return self._check_command_size(request, limit)

    def _check_command_size(self, request: LiteralRequest, limit: int) -> Rejected | None:
        """Many small literals must not add up to more than two big ones and a line."""
        total = 2 * limit + self.config.max_line
        if request.command_size + request.size > total:
            return Rejected(
                f"{request.tag} BAD [TOOBIG] Command larger than {total} octets\r\n".encode(),
                close=not request.synchronizing,
            )
        return None

    # -- one command -------------------------------------------------------------------------

    def _line(self, data: bytes) -> bytes:
        self.commands += 1
        if self.sasl is not None:
            sasl = self.sasl
            return self._answer(sasl.tag, "AUTHENTICATE", lambda: self._sasl_step(data))
        if self.idle_tag is not None:
            tag = self.idle_tag
            return self._answer(tag, "IDLE", lambda: self._idle_end(data))
        if self.commands == 1 and _HTTP.match(data):
            self._set_state(State.LOGOUT)
            self.action = "close"
            return b"* BYE This is an IMAP server\r\n"
        args = Args(data, utf8=self.utf8, max_nesting=self.config.max_nesting)
        tag = "*"
        try:
            tag = args.atom(extra=b"]")  # RFC 9051 9: tag is ASTRING-CHARs except "+"
            if "+" in tag:
                raise ParseError("bad tag")
            args.sp()
            name = args.word()
            if name == "UID":
                args.sp()
                name = "UID " + args.word()
        except ParseError:
            return self._bad(
                "*" if tag == "*" or "+" in tag else tag,
                "Syntax error: expected a tag and a command",
            )
        handler = _TABLES[self.state].get(name)
        if handler is None:
            if any(name in table for table in _TABLES.values()):
                return self._bad(tag, f"{name} is not valid in the {self.state.value} state")
            return self._bad(tag, f"Unknown command {name[:40]}")
        if not name.startswith("UID ") and not args.at_end():
            try:
                args.sp()
            except ParseError:
                return self._bad(tag, "Syntax error: expected a space after the command")
        return self._answer(tag, name, lambda: handler(self, tag, args))

    def _answer(self, tag: str, name: str, run: Callable[[], bytes]) -> bytes:
        """The response of one command: its own, or a tagged NO/BAD for what it raised."""
        try:
            response = run()
        except ParseError as err:
            return self._bad(tag, f"Syntax error: {err}")
        except BadCharsetError:
            return self._tagged(
                tag, "NO", "Unsupported charset", code="BADCHARSET (UTF-8 US-ASCII)"
            )
        except Failure as err:
            if err.status == "BAD":
                return self._bad(tag, err.text, code=err.code)
            return self._tagged(tag, err.status, err.text, code=err.code)
        except MailroomError as err:
            if isinstance(err, DeliveryError) and not err.permanent:  # APPEND, COPY, MOVE
                failure = _not_stored(name, err)
                return self._tagged(tag, "NO", failure.text, code=failure.code)
            log.info("imap %s: %s", name, err)
            status, code = next((s, c) for kind, s, c in _ERRORS if isinstance(err, kind))
            if status == "BAD":
                return self._bad(tag, str(err), code=code)
            return self._tagged(tag, status, str(err) or "Failed", code=code)
        except Exception:
            log.exception("imap %s failed", name)
            return self._tagged(tag, "NO", "Internal server error", code="SERVERBUG")
        self.bad_commands = 0
        return response

    def _bad(self, tag: str, text: str, code: str | None = None) -> bytes:
        self.bad_commands += 1
        out = self._tagged(tag, "BAD", text, code=code)
        if self.state is State.NOT_AUTHENTICATED and self.bad_commands >= MAX_BAD_COMMANDS:
            self._set_state(State.LOGOUT)
            self.action = "close"
            out += b"* BYE Too many invalid commands\r\n"
        return out

    def _tagged(self, tag: str, status: str, text: str, *, code: str | None = None) -> bytes:
        # Texts may quote client input (a mailbox name): never a line break, and UTF-8 only
        # where RFC 9051 9 "text" allows it (after ENABLE IMAP4rev2 or UTF8=ACCEPT).
        text = _CONTROL.sub("?", text)
        if not (self.rev2 or self.utf8):
            text = text.encode("ascii", "replace").decode("ascii")
        code_text = f"[{code}] " if code else ""
        return f"{tag} {status} {code_text}{text}\r\n".encode()

    def _done(self, tag: str, text: str, *, code: str | None = None, expunge: bool = True) -> bytes:
        """Untagged mailbox updates (RFC 9051 7), then the tagged OK."""
        return self._updates(expunge) + self._tagged(tag, "OK", text, code=code)

    # -- mailbox view and updates ---------------------------------------------------------------

    def _store(self) -> MailStore:
        assert self.store is not None
        return self.store

    def _mailbox(self) -> Mailbox:
        assert self.selected is not None
        return self.selected

    def _updates(self, expunge: bool) -> bytes:
        """What changed in the selected mailbox since the client was last told."""
        box = self.selected
        if box is None or self.store is None:
            return b""
        try:
            snap = self.store.sync(box.name)
        except MailboxNotFoundError:
            self._set_state(State.AUTHENTICATED)
            return b"* OK [CLOSED] The selected mailbox was deleted\r\n"
        if snap.uidvalidity != box.uidvalidity:
            # The index was rebuilt under us: none of the client's UIDs means anything now.
            self._set_state(State.LOGOUT)
            self.action = "close"
            return b"* BYE [UNAVAILABLE] Mailbox UIDVALIDITY changed; please reconnect\r\n"
        prev = box.snapshot
        if snap is prev and not (box.gone and expunge):
            return b""  # the store saw no change since the last time
        # Every flag change and every arrival gets a MODSEQ above the last snapshot's
        # HIGHESTMODSEQ (RFC 7162 3.1.1): only those messages need a look.
        changed = snap.changed_since(prev.highestmodseq)
        out = bytearray(self._new_keywords(box, changed))
        new: list[MessageInfo] = []
        flagged: list[MessageInfo] = []  # flags (or with CONDSTORE the MODSEQ) to report
        for info in changed:
            old = box.info(info.uid)  # as the client knows it (before bring_to below)
            if old is None:
                new.append(info)
            elif old.flags != info.flags or (self.condstore and old.modseq != info.modseq):
                flagged.append(info)
        if len(snap.messages) - len(new) != len(box.uids) - len(box.gone):
            present = set(snap.uids)
            box.gone.update(u for u in box.uids if u not in present)
        if box.gone and expunge:
            if self.qresync:
                out += f"* VANISHED {format_set(sorted(box.gone))}\r\n".encode()
            else:
                # Highest first: each EXPUNGE leaves the numbers of the ones before it valid.
                for uid in sorted(box.gone, reverse=True):
                    out += b"* %d EXPUNGE\r\n" % box.seq(uid)
            box.forget_gone()
        box.bring_to(snap)
        for info in flagged:
            out += self._fetch_flags(box, info.uid, info)
        if new:
            out += b"* %d EXISTS\r\n" % len(box.uids)
            if not box.readonly:
                box.recent |= set(self.store.claim_recent(box.name))
            if not self.rev2:
                out += b"* %d RECENT\r\n" % len(box.recent)
        box.highestmodseq = max(box.highestmodseq, snap.highestmodseq)
        box.uidnext = snap.uidnext
        return bytes(out)

    def _flags_lines(self, box: Mailbox) -> bytes:
        """FLAGS and PERMANENTFLAGS (RFC 9051 7.3.5, 7.1): the system flags and the keywords in use."""
        flags = " ".join([*SYSTEM_FLAGS, *sorted(box.keywords)])
        permanent = "" if box.readonly else f"{flags} \\*"
        return (
            f"* FLAGS ({flags})\r\n* OK [PERMANENTFLAGS ({permanent})] Flags that can be stored\r\n"
        ).encode()

    def _new_keywords(self, box: Mailbox, infos: Iterable[MessageInfo]) -> bytes:
        """RFC 9051 7.3.5: a new FLAGS response when a keyword comes into use."""
        used = _keywords(infos)
        if used <= box.keywords:
            return b""
        box.keywords |= used
        return self._flags_lines(box)

    def _flags(self, box: Mailbox, uid: int, info: MessageInfo) -> Value:
        flags = sorted(info.flags, key=lambda f: (not f.startswith("\\"), f))
        values: list[Value] = [Atom(f) for f in flags]
        if uid in box.recent and not self.rev2:
            values.append(Atom("\\Recent"))
        return values

    def _fetch_flags(
        self, box: Mailbox, uid: int, info: MessageInfo, *, with_uid: bool = False
    ) -> bytes:
        items: list[Value] = []
        # RFC 7162 3.2.4 (QRESYNC) and RFC 9051 (Appendix E 21): unsolicited FETCH carries the UID.
        if with_uid or self.qresync or self.rev2:
            items += [Atom("UID"), uid]
        items += [Atom("FLAGS"), self._flags(box, uid, info)]
        if self.condstore:
            items += [Atom("MODSEQ"), [info.modseq]]
        return b"* %d FETCH %s\r\n" % (box.seq(uid), encode(items))

    def _set_uids(self, numbers: SequenceSet, uid: bool) -> list[int]:
        """The UIDs a sequence set names; invalid sequence numbers are a BAD (RFC 9051 9)."""
        box = self._mailbox()
        if numbers.saved:
            return [u for u in self.saved if box.seq(u)]
        if uid:
            return numbers.members(list(box.uids))
        count = len(box.uids)
        for low, high in numbers.ranges:
            for n in (low, high):
                if n is not None and n > count:
                    raise Failure(f"Invalid message sequence number {n}", status="BAD")
        if not count:
            raise Failure("No messages in the mailbox", status="BAD")
        return [box.uids[n - 1] for n in numbers.numbers(count)]

    def _name(self, name: str) -> Value:
        """A mailbox name as the client reads it (RFC 9051 5.1: modified UTF-7 unless UTF8=ACCEPT)."""
        return name if self.utf8 else encode_mailbox(name)

    def _enc(self, value: Value) -> bytes:
        return encode(value, utf8=self.utf8)

    # -- any state: CAPABILITY, NOOP, LOGOUT, ID (RFC 9051 6.1, RFC 2971) -----------------------

    def CAPABILITY(self, tag: str, args: Args) -> bytes:
        args.end()
        return f"* CAPABILITY {self._capabilities()}\r\n".encode() + self._done(
            tag, "CAPABILITY completed"
        )

    def NOOP(self, tag: str, args: Args) -> bytes:
        args.end()
        return self._done(tag, "NOOP completed")

    def CHECK(self, tag: str, args: Args) -> bytes:
        args.end()
        return self._done(tag, "CHECK completed")

    def LOGOUT(self, tag: str, args: Args) -> bytes:
        args.end()
        self._set_state(State.LOGOUT)
        self.action = "close"
        return b"* BYE Logging out\r\n" + self._tagged(tag, "OK", "LOGOUT completed")

    def ID(self, tag: str, args: Args) -> bytes:
        if args.peek_ci("NIL"):
            args.atom()
        else:
            values = args.list_of(args.nstring)
            # RFC 2971 3.3: at most 30 field-value pairs; fields at most 30 octets, values 1024.
            if len(values) % 2 or len(values) > 60:
                raise ParseError("ID takes up to 30 field-value pairs")
            for i, value in enumerate(values):
                if value is None and i % 2 == 0:
                    raise ParseError("ID field names cannot be NIL")
                if value is not None and len(value) > (30 if i % 2 == 0 else 1024):
                    raise ParseError("ID field or value too long")
        args.end()
        return b'* ID ("name" "mailroom")\r\n' + self._done(tag, "ID completed")

    # -- not authenticated: STARTTLS, LOGIN, AUTHENTICATE (RFC 9051 6.2) -------------------------

    def STARTTLS(self, tag: str, args: Args) -> bytes:
        args.end()
        if self.tls or not self.config.starttls_available:
            raise Failure(
                "TLS is not available" if not self.tls else "TLS is already active", status="BAD"
            )
        self.action = "starttls"
        return self._tagged(tag, "OK", "Begin TLS negotiation now")

    def LOGIN(self, tag: str, args: Args) -> bytes:
        self._require_privacy()  # before reading the credentials at all
        username = args.astring()
        args.sp()
        password = args.astring()
        args.end()
        return self._login(tag, username, password)

    def AUTHENTICATE(self, tag: str, args: Args) -> bytes:
        self._require_privacy()
        mechanism = args.word()
        initial: bytes | None = None
        if not args.at_end():
            args.sp()
            # RFC 4959 3: SASL-IR initial response; "=" is an empty one.
            initial = args.atom(extra=b"=").encode("ascii", "replace")
            args.end()
        if mechanism not in ("PLAIN", "LOGIN"):
            raise Failure(f"Unsupported mechanism {mechanism[:20]}")
        self._require_privacy()
        self.sasl = Sasl(tag, mechanism)
        if initial is not None:
            return self._sasl_step(initial)
        if mechanism == "PLAIN":
            return b"+ \r\n"
        return b"+ " + base64.b64encode(b"Username:") + b"\r\n"

    def _require_privacy(self) -> None:
        if not self.tls:
            # RFC 9051 6.2.3: LOGIN and AUTHENTICATE are refused before TLS.
            raise Failure("Use STARTTLS or port 993 first", code="PRIVACYREQUIRED")

    def _sasl_step(self, line: bytes) -> bytes:
        sasl = self.sasl
        assert sasl is not None
        if line.strip() == b"*":
            self.sasl = None
            return self._bad(sasl.tag, "Authentication cancelled")
        try:
            decoded = b"" if line == b"=" else base64.b64decode(line, validate=True)
            text = decoded.decode("utf-8")
        except (binascii.Error, ValueError):
            self.sasl = None
            return self._bad(sasl.tag, "Invalid base64 in the SASL response")
        if sasl.mechanism == "PLAIN":
            self.sasl = None
            parts = text.split("\x00")
            if len(parts) != 3:
                return self._bad(sasl.tag, "Malformed PLAIN response")
            authzid, username, password = parts
            if authzid and authzid != username:
                return self._tagged(
                    sasl.tag, "NO", "Cannot act as another user", code="AUTHORIZATIONFAILED"
                )
            return self._login(sasl.tag, username, password)
        if sasl.step == 0:
            sasl.username = text
            sasl.step = 1
            return b"+ " + base64.b64encode(b"Password:") + b"\r\n"
        self.sasl = None
        return self._login(sasl.tag, sasl.username, text)

    def _login(self, tag: str, username: str, password: str) -> bytes:
        self._require_privacy()
        try:
            user = self.config.authenticate(username, password)
        except TooManyFailures:
            user, refused = None, True
        else:
            refused = False
        if user is None:
            self.failed_logins += 1
            out = (
                # RFC 5530 3: UNAVAILABLE, a temporary failure; try again later.
                self._tagged(tag, "NO", "Too many failed logins; try later", code="UNAVAILABLE")
                if refused
                else self._tagged(tag, "NO", "Authentication failed", code="AUTHENTICATIONFAILED")
            )
            if self.failed_logins >= MAX_FAILED_LOGINS:
                self._set_state(State.LOGOUT)
                self.action = "close"
                out += b"* BYE Too many failed logins\r\n"
            return out
        store = self.config.open_store(user)
        store.ensure_defaults()
        self.user, self.store = user, store
        self._set_state(State.AUTHENTICATED)
        log.info("imap login %s", user.address)
        return self._tagged(tag, "OK", "Logged in", code=f"CAPABILITY {self._capabilities()}")

    # -- authenticated: ENABLE, SELECT, mailbox management (RFC 9051 6.3) ------------------------

    def ENABLE(self, tag: str, args: Args) -> bytes:
        asked = [args.atom().upper()]
        while not args.at_end():
            args.sp()
            asked.append(args.atom().upper())
        done: list[str] = []
        for cap in asked:
            if (
                cap in ("IMAP4REV2", "CONDSTORE", "QRESYNC", "UTF8=ACCEPT")
                and cap not in self.enabled
            ):
                self.enabled.add(cap)
                done.append(cap)
        if "QRESYNC" in self.enabled:  # RFC 7162 3.2.3: QRESYNC implies CONDSTORE
            self.enabled.add("CONDSTORE")
        self.condstore = self.condstore or "CONDSTORE" in self.enabled
        names = {"IMAP4REV2": "IMAP4rev2"}
        out = ("* ENABLED" + "".join(" " + names.get(c, c) for c in done) + "\r\n").encode()
        return out + self._done(tag, "ENABLE completed")

    def SELECT(self, tag: str, args: Args) -> bytes:
        return self._select(tag, args, readonly=False)

    def EXAMINE(self, tag: str, args: Args) -> bytes:
        return self._select(tag, args, readonly=True)

    def _select(self, tag: str, args: Args, *, readonly: bool) -> bytes:
        name = args.mailbox()
        qresync: tuple[int, int, SequenceSet | None] | None = None
        if not args.at_end():
            args.sp()
            args.open()
            while True:
                param = args.word()
                if param == "CONDSTORE":
                    self.condstore = True
                elif param == "QRESYNC":
                    if not self.qresync:
                        raise Failure("ENABLE QRESYNC first", status="BAD")  # RFC 7162 3.2.5
                    args.sp()
                    args.open()
                    validity = args.number(nonzero=True)
                    args.sp()
                    modseq = args.number(limit=MAX_NUMBER64, nonzero=True)
                    known: SequenceSet | None = None
                    if args.take(b" "):
                        if not args.peek(b"("):
                            known = args.sequence_set()
                            args.take(b" ")
                        if args.peek(b"("):
                            args.open()
                            args.sequence_set()
                            args.sp()
                            args.sequence_set()
                            args.close()
                    args.close()
                    qresync = (validity, modseq, known)
                else:
                    raise ParseError(f"unknown SELECT parameter {param}")
                if args.take(b")"):
                    args.depth -= 1
                    break
                args.sp()
        args.end()
        store = self._store()
        out = bytearray()
        if self.selected is not None:
            # RFC 9051 6.3.2: a SELECT, even a failing one, closes the selected mailbox.
            out += b"* OK [CLOSED] Previous mailbox closed\r\n"  # RFC 9051 7.1, RFC 7162 3.2.11
            self._set_state(State.AUTHENTICATED)
        try:
            if readonly:
                snap, recent = store.sync(name), frozenset[int]()
            else:  # RFC 3501 2.3.2: this session is the first told of these messages
                snap, recent = store.select(name)
        except MailboxNotFoundError:
            return bytes(out) + self._tagged(tag, "NO", f"No mailbox {name}", code="NONEXISTENT")
        box = Mailbox(
            name=name,
            readonly=readonly,
            uidvalidity=snap.uidvalidity,
            snapshot=snap,
            highestmodseq=snap.highestmodseq,
            uidnext=snap.uidnext,
        )
        box.recent = set(recent)
        box.keywords = _keywords(snap.messages)
        out += b"* %d EXISTS\r\n" % len(box.uids)
        if not self.rev2:
            out += b"* %d RECENT\r\n" % len(box.recent)
            unseen = next(
                (i + 1 for i, m in enumerate(snap.messages) if "\\Seen" not in m.flags), 0
            )
            if unseen:
                out += b"* OK [UNSEEN %d] First unseen\r\n" % unseen
        out += self._flags_lines(box)
        out += b"* OK [UIDVALIDITY %d] UIDs valid\r\n" % box.uidvalidity
        out += b"* OK [UIDNEXT %d] Predicted next UID\r\n" % box.uidnext
        out += b"* OK [HIGHESTMODSEQ %d] Highest\r\n" % box.highestmodseq  # RFC 7162 3.1.2.1
        if self.rev2:
            out += b'* LIST () "/" ' + self._enc(self._name(name)) + b"\r\n"  # RFC 9051 6.3.2
        self.selected = box
        self._set_state(State.SELECTED)
        if qresync is not None and qresync[0] == box.uidvalidity:
            out += self._qresync(box, qresync[1], qresync[2])
        code = "READ-ONLY" if readonly else "READ-WRITE"
        return bytes(out) + self._tagged(
            tag, "OK", f"{'EXAMINE' if readonly else 'SELECT'} completed", code=code
        )

    def _qresync(self, box: Mailbox, modseq: int, known: SequenceSet | None) -> bytes:
        """RFC 7162 3.2.5.1: what changed since ``modseq``: VANISHED (EARLIER), then FETCH."""
        changed, vanished = self._store().changes_since(box.name, modseq)
        out = bytearray()
        gone = sorted(u for u in vanished if known is None or known.contains(u, box.uidnext))
        if gone:
            out += f"* VANISHED (EARLIER) {format_set(gone)}\r\n".encode()
        for info in sorted(changed, key=lambda m: m.uid):
            if box.seq(info.uid):
                out += self._fetch_flags(box, info.uid, box.info(info.uid) or info, with_uid=True)
        return bytes(out)

    def CREATE(self, tag: str, args: Args) -> bytes:
        name = args.mailbox()
        special: str | None = None
        if not args.at_end():
            # RFC 6154 3: CREATE name (USE (\Sent))
            args.sp()
            args.open()
            if args.word() != "USE":
                raise ParseError("expected USE")
            args.sp()
            uses = args.list_of(lambda: "\\" + args.atom() if args.take(b"\\") else args.atom())
            args.close()
            known = {u.upper(): u for u in SPECIAL_USES}
            for use in uses:
                if use.upper() not in known:
                    raise Failure(f"Unknown special use {use}", code="USEATTR")
            if len(uses) > 1:
                raise Failure("One special use per mailbox", code="USEATTR")
            special = known[uses[0].upper()] if uses else None
        args.end()
        if name.endswith(DELIMITER):  # RFC 9051 6.3.4: a trailing delimiter is dropped
            name = name[:-1]
        _check_name(name)
        if name == "INBOX":
            raise Failure("INBOX exists", code="ALREADYEXISTS")
        try:
            self._store().create_mailbox(name, special)
        except MailboxExistsError:
            raise Failure(f"{name} exists", code="ALREADYEXISTS") from None
        except InvalidMailboxNameError as err:
            raise Failure(str(err), code="CANNOT") from None
        return self._done(tag, "CREATE completed")

    def DELETE(self, tag: str, args: Args) -> bytes:
        name = args.mailbox()
        args.end()
        if name == "INBOX":
            raise Failure("INBOX cannot be deleted", code="CANNOT")  # RFC 9051 6.3.5
        if self.selected is not None and self.selected.name == name:
            raise Failure("Mailbox is selected; close it first", code="INUSE")
        _check_name(name)
        try:
            self._store().delete_mailbox(name)
        except MailboxNotFoundError:
            raise Failure(f"No mailbox {name}", code="NONEXISTENT") from None
        except InvalidMailboxNameError as err:
            raise Failure(str(err), code="CANNOT") from None
        return self._done(tag, "DELETE completed")

    def RENAME(self, tag: str, args: Args) -> bytes:
        old = args.mailbox()
        args.sp()
        new = args.mailbox()
        args.end()
        if new.endswith(DELIMITER):
            new = new[:-1]
        _check_name(old)
        _check_name(new)
        if new == "INBOX":
            raise Failure("INBOX exists", code="ALREADYEXISTS")
        if self.selected is not None and self.selected.name == old:
            raise Failure("Mailbox is selected; close it first", code="INUSE")
        try:
            self._store().rename_mailbox(old, new)
        except MailboxNotFoundError:
            raise Failure(f"No mailbox {old}", code="NONEXISTENT") from None
        except MailboxExistsError:
            raise Failure(f"{new} exists", code="ALREADYEXISTS") from None
        except InvalidMailboxNameError as err:
            raise Failure(str(err), code="CANNOT") from None
        return self._done(tag, "RENAME completed")

    def SUBSCRIBE(self, tag: str, args: Args) -> bytes:
        name = args.mailbox()
        args.end()
        _check_name(name)
        try:
            self._store().subscribe(name)
        except MailboxNotFoundError:
            raise Failure(f"No mailbox {name}", code="NONEXISTENT") from None
        return self._done(tag, "SUBSCRIBE completed")

    def UNSUBSCRIBE(self, tag: str, args: Args) -> bytes:
        name = args.mailbox()
        args.end()
        self._store().unsubscribe(name)
        return self._done(tag, "UNSUBSCRIBE completed")

    def NAMESPACE(self, tag: str, args: Args) -> bytes:
        args.end()
        return b'* NAMESPACE (("" "/")) NIL NIL\r\n' + self._done(tag, "NAMESPACE completed")

    # LIST (RFC 9051 6.3.9, RFC 5258 LIST-EXTENDED, RFC 5819 LIST-STATUS, RFC 6154 SPECIAL-USE)

    def LIST(self, tag: str, args: Args) -> bytes:
        selection: list[str] = []
        if args.peek(b"("):
            selection = args.list_of(args.word)
            for option in selection:
                if option not in ("SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"):
                    raise ParseError(f"unknown LIST selection option {option}")
            if "RECURSIVEMATCH" in selection and not {"SUBSCRIBED", "SPECIAL-USE"} & set(selection):
                raise ParseError("RECURSIVEMATCH needs another selection option")  # RFC 5258 3
            args.sp()
        reference = args.list_mailbox()
        args.sp()
        if args.peek(b"("):
            patterns = args.list_of(args.list_mailbox, allow_empty=False)
        else:
            patterns = [args.list_mailbox()]
        returns: list[str] = []
        status_items: list[str] = []
        if not args.at_end():
            args.sp()
            if args.word() != "RETURN":
                raise ParseError("expected RETURN")
            args.sp()
            args.open()
            while not args.take(b")"):
                option = args.word()
                if option == "STATUS":
                    args.sp()
                    status_items = args.list_of(args.word, allow_empty=False)
                    for item in status_items:
                        if item not in _STATUS_ITEMS:
                            raise ParseError(f"unknown STATUS item {item}")
                elif option not in ("SUBSCRIBED", "CHILDREN", "SPECIAL-USE"):
                    raise ParseError(f"unknown LIST return option {option}")
                returns.append(option)
                if not args.peek(b")"):
                    args.sp()
            args.depth -= 1
        args.end()
        if patterns == [""]:
            # RFC 9051 6.3.9: an empty pattern asks for the delimiter and the root.
            return b'* LIST (\\Noselect) "/" ""\r\n' + self._done(tag, "LIST completed")
        return self._list(tag, "LIST", reference, patterns, selection, returns, status_items)

    def LSUB(self, tag: str, args: Args) -> bytes:
        reference = args.list_mailbox()
        args.sp()
        pattern = args.list_mailbox()
        args.end()
        return self._list(tag, "LSUB", reference, [pattern], ["SUBSCRIBED"], [], [])

    def _list(
        self,
        tag: str,
        verb: str,
        reference: str,
        patterns: list[str],
        selection: list[str],
        returns: list[str],
        status_items: list[str],
    ) -> bytes:
        store = self._store()
        entries = {e.name: e for e in store.list_mailboxes()}
        regexes = [_pattern(reference, p) for p in patterns]
        subscribed_only = "SUBSCRIBED" in selection
        special_only = "SPECIAL-USE" in selection
        out = bytearray()
        listed: set[str] = set()
        names = sorted(entries, key=lambda n: (n != "INBOX", n))
        for name in names:
            entry = entries[name]
            if not any(r.fullmatch(name) for r in regexes):
                continue
            if subscribed_only and not entry.subscribed:
                continue
            if special_only and not entry.special_use:
                continue
            listed.add(name)
            attrs = self._attributes(entry, verb)
            out += b'* %s (%s) "/" %s\r\n' % (
                verb.encode(),
                " ".join(attrs).encode(),
                self._enc(self._name(name)),
            )
            if status_items and entry.selectable:
                with contextlib.suppress(MailboxNotFoundError):
                    out += self._status_line(name, status_items)
        # Parents with matching children: RFC 3501 6.3.8 "%" lists them \Noselect; RFC 5258 RECURSIVEMATCH.
        parents: set[str] = set()
        for name, entry in entries.items():
            if subscribed_only and not entry.subscribed:
                continue
            if special_only and not entry.special_use:
                continue
            parts = name.split(DELIMITER)
            for i in range(1, len(parts)):
                parent = DELIMITER.join(parts[:i])
                if parent not in listed and any(r.fullmatch(parent) for r in regexes):
                    if parent in entries and not (subscribed_only or special_only):
                        continue
                    parents.add(parent)
        for parent in sorted(parents):
            # With "*" a child is listed itself; "%" stops above it and lists the parent.
            child_listed = any(name.startswith(parent + DELIMITER) for name in listed)
            name_bytes = self._enc(self._name(parent))
            if verb == "LSUB":
                # RFC 3501 6.3.9: "%" returns the unsubscribed parent, flagged \Noselect.
                if not child_listed:
                    out += b'* LSUB (\\Noselect) "/" %s\r\n' % name_bytes
            elif parent in entries:
                # RFC 5258 3: RECURSIVEMATCH reports a parent whose children match, whatever
                # the pattern did with the children.
                if "RECURSIVEMATCH" in selection:
                    attrs = self._attributes(entries[parent], verb)
                    child = b' ("CHILDINFO" ("SUBSCRIBED"))' if subscribed_only else b""
                    out += b'* LIST (%s) "/" %s%s\r\n' % (
                        " ".join(attrs).encode(),
                        name_bytes,
                        child,
                    )
            elif not child_listed:
                out += b'* LIST (\\Noselect \\HasChildren) "/" %s\r\n' % name_bytes
        return bytes(out) + self._done(tag, f"{verb} completed")

    def _attributes(self, entry: MailboxEntry, verb: str) -> list[str]:
        attrs: list[str] = []
        if not entry.selectable:
            attrs.append("\\Noselect")
        if verb == "LIST":
            attrs.append("\\HasChildren" if entry.has_children else "\\HasNoChildren")
            if entry.subscribed:
                attrs.append("\\Subscribed")
            if entry.special_use:
                attrs.append(entry.special_use)
        return attrs

    # STATUS (RFC 9051 6.3.11, RFC 8438 SIZE, RFC 7162 HIGHESTMODSEQ, RFC 7889 APPENDLIMIT)

    def STATUS(self, tag: str, args: Args) -> bytes:
        name = args.mailbox()
        args.sp()
        items = args.list_of(args.word, allow_empty=False)
        args.end()
        for item in items:
            if item not in _STATUS_ITEMS:
                raise ParseError(f"unknown STATUS item {item}")
        if "HIGHESTMODSEQ" in items:
            self.condstore = True  # RFC 7162 3.1: a CONDSTORE enabling command
        try:
            line = self._status_line(name, items)
        except MailboxNotFoundError:
            raise Failure(f"No mailbox {name}", code="NONEXISTENT") from None
        return line + self._done(tag, "STATUS completed")

    def _status_line(self, name: str, items: list[str]) -> bytes:
        status = self._store().status(name)
        values: list[Value] = []
        for item in items:
            values.append(Atom(item))
            if item == "MESSAGES":
                values.append(status.messages)
            elif item == "UIDNEXT":
                values.append(status.uidnext)
            elif item == "UIDVALIDITY":
                values.append(status.uidvalidity)
            elif item == "UNSEEN":
                values.append(status.unseen)
            elif item == "DELETED":
                values.append(status.deleted)
            elif item == "SIZE":
                values.append(status.size)
            elif item == "HIGHESTMODSEQ":
                values.append(status.highestmodseq)
            elif item == "RECENT":
                values.append(status.recent)
            elif item == "APPENDLIMIT":
                values.append(self.config.max_literal)
        return b"* STATUS " + self._enc(self._name(name)) + b" " + self._enc(values) + b"\r\n"

    # APPEND (RFC 9051 6.3.12, RFC 4315 APPENDUID, RFC 7889, RFC 6855 UTF8, RFC 3516 literal8)

    def APPEND(self, tag: str, args: Args) -> bytes:
        name = args.mailbox()
        args.sp()
        flags: list[str] = []
        when: datetime | None = None
        if args.peek(b"("):
            flags = [f for f in args.flag_list() if f != "\\Recent"]
            args.sp()
        if args.peek(b'"'):
            when = args.date_time()
            args.sp()
        if args.peek_ci("UTF8 "):
            if not self.utf8:
                raise ParseError("UTF8 APPEND needs ENABLE UTF8=ACCEPT")  # RFC 6855 4
            args.word()
            args.sp()
            args.open()
            message = args.literal(binary=True)
            args.close()
        else:
            message = args.literal(binary=True)
        args.end()
        if len(message) > self.config.max_literal:
            raise Failure("Message too large", code="TOOBIG")
        if not message:
            raise Failure("Empty message")
        message = _crlf(message)
        try:
            validity, uid = self._store().append(name, message, flags, when)
        except MailboxNotFoundError:
            raise Failure(f"No mailbox {name}", code="TRYCREATE") from None  # RFC 9051 6.3.12
        except QuotaExceededError:
            raise Failure("Quota exceeded", code="OVERQUOTA") from None
        return self._done(tag, "APPEND completed", code=f"APPENDUID {validity} {uid}")

    # IDLE (RFC 2177)

    def IDLE(self, tag: str, args: Args) -> bytes:
        args.end()
        updates = self._updates(expunge=True)
        self.idle_tag = tag
        return updates + b"+ idling\r\n"

    def _idle_end(self, data: bytes) -> bytes:
        tag, self.idle_tag = self.idle_tag, None
        assert tag is not None
        if data.upper() != b"DONE":
            return self._bad(tag, "Expected DONE")
        return self._done(tag, "IDLE terminated")

    # COMPRESS (RFC 4978), QUOTA (RFC 9208)

    def COMPRESS(self, tag: str, args: Args) -> bytes:
        mechanism = args.word()
        args.end()
        if self.compressed:
            raise Failure("Compression is already active", code="COMPRESSIONACTIVE")
        if mechanism != "DEFLATE" or not self.config.compress_available:
            raise Failure(f"Unsupported compression {mechanism[:20]}", status="BAD")
        self.action = "compress"
        return self._tagged(tag, "OK", "DEFLATE active")

    def GETQUOTAROOT(self, tag: str, args: Args) -> bytes:
        name = args.mailbox()
        args.end()
        store = self._store()
        try:
            store.status(name)
        except MailboxNotFoundError:
            raise Failure(f"No mailbox {name}", code="NONEXISTENT") from None
        if not store.quota_bytes:
            return (
                b"* QUOTAROOT "
                + self._enc(self._name(name))
                + b"\r\n"
                + self._done(tag, "GETQUOTAROOT completed")
            )
        out = b"* QUOTAROOT " + self._enc(self._name(name)) + b' ""\r\n' + self._quota_line()
        return out + self._done(tag, "GETQUOTAROOT completed")

    def GETQUOTA(self, tag: str, args: Args) -> bytes:
        root = args.astring()
        args.end()
        if root != "" or not self._store().quota_bytes:
            raise Failure(f"No quota root {root[:40]}", code="NONEXISTENT")
        return self._quota_line() + self._done(tag, "GETQUOTA completed")

    def SETQUOTA(self, tag: str, args: Args) -> bytes:
        raise Failure("Quotas are set by the administrator", code="NOPERM")

    def _quota_line(self) -> bytes:
        store = self._store()
        used = -(-store.usage_bytes() // 1024)  # RFC 9208 5.1: STORAGE in units of 1024 octets
        limit = store.quota_bytes // 1024
        return b'* QUOTA "" (STORAGE %d %d)\r\n' % (used, limit)

    # -- selected: CLOSE, UNSELECT, EXPUNGE (RFC 9051 6.4) ----------------------------------------

    def CLOSE(self, tag: str, args: Args) -> bytes:
        args.end()
        box = self._mailbox()
        if not box.readonly:
            self._store().expunge(box.name)  # RFC 9051 6.4.1: silently, no EXPUNGE responses
        self._set_state(State.AUTHENTICATED)
        return self._tagged(tag, "OK", "CLOSE completed")

    def UNSELECT(self, tag: str, args: Args) -> bytes:
        args.end()
        self._set_state(State.AUTHENTICATED)
        return self._tagged(tag, "OK", "UNSELECT completed")

    def EXPUNGE(self, tag: str, args: Args) -> bytes:
        args.end()
        return self._expunge(tag, None)

    def UID_EXPUNGE(self, tag: str, args: Args) -> bytes:
        args.sp()
        uids = self._set_uids(args.sequence_set(), uid=True)
        args.end()
        return self._expunge(tag, uids)

    def _expunge(self, tag: str, uids: list[int] | None) -> bytes:
        box = self._mailbox()
        if box.readonly:
            raise Failure("Mailbox is read-only", code="READ-ONLY")
        if uids is not None and not uids:
            return self._done(tag, "EXPUNGE completed")
        self._store().expunge(box.name, uids)
        code = None
        out = self._updates(expunge=True)
        if self.condstore:
            code = f"HIGHESTMODSEQ {box.highestmodseq}"
        return out + self._tagged(tag, "OK", "EXPUNGE completed", code=code)

    # SEARCH (RFC 9051 6.4.4, RFC 4731 ESEARCH, RFC 7162 MODSEQ)

    def SEARCH(self, tag: str, args: Args) -> bytes:
        return self._search(tag, args, uid=False)

    def UID_SEARCH(self, tag: str, args: Args) -> bytes:
        args.sp()
        return self._search(tag, args, uid=True)

    def _search(self, tag: str, args: Args, *, uid: bool) -> bytes:
        try:
            request = parse_search(args)
            args.end()
        except (ParseError, BadCharsetError):
            if b"SAVE" in args.data.upper():
                self.saved = []  # RFC 5182 2.1: a failed SEARCH ... SAVE empties "$"
            raise
        box = self._mailbox()
        modseq_key = uses_modseq(request.key)
        if modseq_key:
            self.condstore = True
        found: list[int] = []  # UIDs
        found_seqs: list[int] = []
        highest = 0
        candidate = Candidate(
            seq=0,
            uid=0,
            flags=frozenset(),
            size=0,
            modseq=0,
            internaldate=datetime.now(UTC),
            largest_seq=len(box.uids),
            largest_uid=box.uids[-1] if box.uids else 0,
            load=lambda: _SearchView(self, box, candidate.uid),
            load_header_text=lambda: self._header_text(candidate.uid),
            saved=frozenset(self.saved),
        )
        recent, key = box.recent, request.key
        with_recent = frozenset({"\\Recent"})
        test = flag_test(key)
        fields = header_fields(key)
        if fields:
            self._warm_headers(box, fields)
        for seq, info in enumerate(box.messages(), 1):
            u = info.uid
            flags = info.flags | with_recent if u in recent else info.flags
            if test is not None:
                hit = test(flags)
            else:
                candidate.become(seq, u, flags, info.size, info.modseq, info.internaldate)
                try:
                    hit = matches(key, candidate)
                except MessageGoneError:
                    continue
            if hit:
                found.append(u)
                found_seqs.append(seq)
                highest = max(highest, info.modseq)
        numbers = found if uid else found_seqs
        returns = request.returns
        if returns is not None and "SAVE" in returns:
            # RFC 5182 2.4: with only MIN and/or MAX beside SAVE, only those are saved.
            if found and not {"ALL", "COUNT"} & set(returns) and {"MIN", "MAX"} & set(returns):
                ends = {found[0]} if "MIN" in returns else set()
                self.saved = sorted(ends | ({found[-1]} if "MAX" in returns else set()))
            else:
                self.saved = found
            returns = tuple(r for r in returns if r != "SAVE")
            if not returns:  # RFC 5182 2.1: SAVE alone returns no ESEARCH response
                return self._done(tag, "SEARCH completed, result saved", expunge=uid)
        if returns is None and not self.rev2:
            line = "* SEARCH" + "".join(f" {n}" for n in numbers)
            if modseq_key and numbers:
                line += f" (MODSEQ {highest})"
            out = (line + "\r\n").encode()
        else:
            returns = returns or ("ALL",)
            parts = [f'* ESEARCH (TAG "{tag}")']
            if uid:
                parts.append("UID")
            if numbers and "MIN" in returns:
                parts.append(f"MIN {min(numbers)}")
            if numbers and "MAX" in returns:
                parts.append(f"MAX {max(numbers)}")
            if "COUNT" in returns:
                parts.append(f"COUNT {len(numbers)}")
            if numbers and "ALL" in returns:
                parts.append(f"ALL {format_set(sorted(numbers))}")
            if modseq_key and numbers:
                parts.append(f"MODSEQ {highest}")
            out = (" ".join(parts) + "\r\n").encode()
        # RFC 9051 7.5.1: no EXPUNGE while answering SEARCH (UID SEARCH may).
        return out + self._done(tag, "SEARCH completed", expunge=uid)

    # FETCH (RFC 9051 6.4.5, RFC 7162 CHANGEDSINCE / VANISHED, RFC 3516 BINARY)

    def FETCH(self, tag: str, args: Args) -> bytes:
        return self._fetch(tag, args, uid=False)

    def UID_FETCH(self, tag: str, args: Args) -> bytes:
        args.sp()
        return self._fetch(tag, args, uid=True)

    def _fetch(self, tag: str, args: Args, *, uid: bool) -> bytes:
        numbers = args.sequence_set()
        args.sp()
        items = _fetch_items(args)
        changedsince: int | None = None
        vanished = False
        if not args.at_end():
            args.sp()
            args.open()
            while True:
                modifier = args.word()
                if modifier == "CHANGEDSINCE":
                    args.sp()
                    changedsince = args.number(limit=MAX_NUMBER64)
                elif modifier == "VANISHED":
                    vanished = True
                else:
                    raise ParseError(f"unknown FETCH modifier {modifier}")
                if args.take(b")"):
                    args.depth -= 1
                    break
                args.sp()
        args.end()
        if vanished and (not uid or not self.qresync or changedsince is None):
            raise Failure(
                "VANISHED needs UID FETCH, QRESYNC and CHANGEDSINCE", status="BAD"
            )  # RFC 7162 3.2.6
        box = self._mailbox()
        uids = self._set_uids(numbers, uid)
        names = [i.name for i in items]
        if changedsince is not None or "MODSEQ" in names:
            self.condstore = True
            if "MODSEQ" not in names:
                items.append(FetchItem("MODSEQ"))
        if uid and "UID" not in names:
            items.insert(0, FetchItem("UID"))  # RFC 9051 6.4.9: UID FETCH always returns UID
        out = bytearray()
        if vanished and changedsince is not None:
            _, gone = self._store().changes_since(box.name, changedsince)
            gone_in = sorted(u for u in gone if numbers.contains(u, box.uidnext - 1))
            if gone_in:
                out += f"* VANISHED (EARLIER) {format_set(gone_in)}\r\n".encode()
        if changedsince is not None:
            uids = [u for u in uids if box[u].modseq > changedsince]
        # RFC 9051 6.4.5: BODY[...] (not PEEK) sets \Seen; FLAGS are then reported.
        marks = not box.readonly and any(
            (i.name in ("BODY", "BINARY") and i.section is not None and not i.peek)
            or i.name in ("RFC822", "RFC822.TEXT")
            for i in items
        )
        seen_now: set[int] = set()
        if marks:
            unseen = [u for u in uids if u not in box.gone and "\\Seen" not in box[u].flags]
            if unseen:
                changed, _ = self._store().store(box.name, unseen, "+", ["\\Seen"])
                for info in changed:
                    box.learn(info)
                    seen_now.add(info.uid)
        gone_seen = False
        derived = [i.name for i in items if _is_derived(i)]
        if derived:
            self._load_derived(box, uids, derived)
            self._warm_derived(box, uids, derived)
        try:
            for u in uids:
                if len(out) > self.config.max_fetch_response:
                    # Output is one bytes object: a FETCH of everything must not exhaust memory.
                    return bytes(out) + self._tagged(
                        tag,
                        "NO",
                        "Response too large; fetch fewer messages at a time",
                        code="LIMIT",
                    )
                try:
                    out += self._fetch_one(box, u, items, u in seen_now)
                except MessageGoneError:
                    gone_seen = True
        finally:
            self._save_derived(box)
        if gone_seen:
            return (
                bytes(out)
                + self._updates(expunge=uid)
                + self._tagged(tag, "NO", "Some messages were expunged", code="EXPUNGEISSUED")
            )
        # RFC 9051 7.5.1: no EXPUNGE while answering FETCH (UID FETCH may).
        return bytes(out) + self._done(tag, "FETCH completed", expunge=uid)

    def _fetch_one(self, box: Mailbox, uid: int, items: list[FetchItem], seen_now: bool) -> bytes:
        info = box[uid]
        parts: list[bytes] = []
        names = {i.name for i in items}
        for item in items:
            parts.append(self._fetch_item(box, uid, info, item))
        if seen_now and "FLAGS" not in names:
            parts.append(b"FLAGS " + encode(self._flags(box, uid, info)))
        return b"* %d FETCH (%s)\r\n" % (box.seq(uid), b" ".join(parts))

    def _fetch_item(self, box: Mailbox, uid: int, info: MessageInfo, item: FetchItem) -> bytes:
        name = item.name
        if name == "UID":
            return b"UID %d" % uid
        if name == "FLAGS":
            return b"FLAGS " + encode(self._flags(box, uid, info))
        if name == "MODSEQ":
            return b"MODSEQ (%d)" % info.modseq
        if name == "RFC822.SIZE":
            return b"RFC822.SIZE %d" % info.size
        if name == "INTERNALDATE":
            return b'INTERNALDATE "' + format_date_time(info.internaldate).encode() + b'"'
        if _is_derived(item):
            return self._derived(box, uid, info, name)
        if name in ("RFC822", "RFC822.HEADER", "RFC822.TEXT"):
            text = {"RFC822": "", "RFC822.HEADER": "HEADER", "RFC822.TEXT": "TEXT"}[name]
            data = self._section(uid, Section((), text))
            return name.encode() + b" " + _string(data or b"")
        if name == "BINARY.SIZE":
            assert item.section is not None
            size = self._binary_size(uid, item.section.part)
            return f"BINARY.SIZE[{item.section_text}] ".encode() + (
                b"NIL" if size is None else b"%d" % size
            )
        assert item.section is not None
        if name == "BINARY":
            data = self._binary(uid, item.section.part)
        else:
            data = self._section(uid, item.section)
        label = f"{name}[{item.section_text}]"
        if item.partial is not None and data is not None:
            start, length = item.partial
            data = data[start : start + length]
            label += f"<{start}>"
        if data is None:
            return label.encode() + b" NIL"
        if name == "BINARY" and b"\x00" in data:
            return label.encode() + b" ~{%d}\r\n" % len(data) + data  # RFC 3516 4.3: literal8
        return label.encode() + b" " + _string(data)

    def _header_key(self, box: Mailbox, uid: int, field: str) -> tuple[object, ...]:
        assert self.user is not None
        info = box[uid]
        user = str(self.user.address)
        return (user, box.name, box.uidvalidity, uid, info.key, "HEADER", field.upper())

    def _warm_headers(self, box: Mailbox, fields: set[str]) -> None:
        """Put the header fields a SEARCH will test into the process's cache first, skipping
        messages another session is parsing right now (see ``SharedCache.fill``)."""
        shared = self.config.shared_cache
        if shared is None or self.user is None:
            return
        for uid in box.uids:
            for name in fields:
                try:
                    shared.fill(
                        self._header_key(box, uid, name),
                        functools.partial(self._encoded_header, uid, name),
                    )
                except MessageGoneError:
                    break

    def _encoded_header(self, uid: int, name: str) -> bytes:
        return _encode_values(self._parsed(uid).header_values(name))

    def _header_values(self, box: Mailbox, uid: int, field: str) -> list[str]:
        """A header field's decoded values, through the process's cache (SEARCH FROM/SUBJECT/...:
        ten clients searching one mailbox parse each message once, not ten times)."""
        shared = self.config.shared_cache
        if shared is None or self.user is None:
            return self._parsed(uid).header_values(field)
        computed: list[list[str]] = []  # this thread's own parse, if it was the one to parse

        def compute() -> bytes:
            values = self._parsed(uid).header_values(field)
            computed.append(values)
            return _encode_values(values)

        encoded = shared.get_or_compute(self._header_key(box, uid, field), compute)
        if computed:
            return computed[0]
        return encoded.decode("utf-8", "surrogateescape").split("\0")[1:]

    def _derived(self, box: Mailbox, uid: int, info: MessageInfo, name: str) -> bytes:
        """ENVELOPE, BODYSTRUCTURE or BODY of a message, through the process's cache (filled
        from the index by ``_load_derived``; what this thread computes goes to the index)."""
        shared = self.config.shared_cache
        if shared is None or self.user is None:
            return self._compute_derived(uid, name)
        return shared.get_or_compute(
            self._derived_key(box, uid, info, name),
            functools.partial(self._compute_derived, uid, name),
        )

    def _compute_derived(self, uid: int, name: str) -> bytes:
        """ENVELOPE, BODYSTRUCTURE or BODY of a message, parsed here and encoded as sent; also
        kept in ``computed``, for the index."""
        parsed = self._parsed(uid)
        value = (
            parsed.envelope()
            if name == "ENVELOPE"
            else parsed.bodystructure()
            if name == "BODYSTRUCTURE"
            else parsed.body()
        )
        encoded = name.encode() + b" " + self._enc(value)
        self.computed[(uid, self._item_name(name))] = encoded
        return encoded

    def _warm_derived(self, box: Mailbox, uids: Sequence[int], names: list[str]) -> None:
        """Compute the derived items of ``uids`` that no other session is computing right now,
        waiting for none (``SharedCache.fill``). Ten clients fetching the same envelopes at
        once then each parse a tenth of the messages, instead of walking them in step, nine
        waiting on the one that parses each message and woken together when it is done."""
        shared = self.config.shared_cache
        if shared is None or self.user is None:
            return
        for uid in uids:
            info = box.info(uid)
            if info is None:
                continue
            for name in names:
                try:
                    shared.fill(
                        self._derived_key(box, uid, info, name),
                        functools.partial(self._compute_derived, uid, name),
                    )
                except MessageGoneError:  # the FETCH itself says so
                    break

    def _derived_key(
        self, box: Mailbox, uid: int, info: MessageInfo, name: str
    ) -> tuple[object, ...]:
        assert self.user is not None
        user = str(self.user.address)
        return (user, box.name, box.uidvalidity, uid, info.key, name, self.utf8)

    def _item_name(self, name: str) -> str:
        """How the index names a derived item: its encoding differs after UTF8=ACCEPT."""
        return f"{name}+UTF8" if self.utf8 else name

    def _load_derived(self, box: Mailbox, uids: Sequence[int], names: list[str]) -> None:
        """Put the derived items the process's cache lacks and the index has into the cache:
        another process (or one before this, gone idle) parsed those messages already."""
        shared = self.config.shared_cache
        if shared is None or self.user is None:
            return
        missing: dict[tuple[int, str], tuple[object, ...]] = {}
        for uid in uids:
            info = box.info(uid)
            if info is None:
                continue
            for name in names:
                key = self._derived_key(box, uid, info, name)
                if not shared.has(key):
                    missing[(uid, self._item_name(name))] = key
        if not missing:
            return
        found = self._store().cached_items(
            box.name, {uid for uid, _ in missing}, {item for _, item in missing}
        )
        for wanted, key in missing.items():
            value = found.get(wanted)
            if value is not None:
                shared.put(key, value)

    def _save_derived(self, box: Mailbox) -> None:
        """Keep what this FETCH parsed in the index, for the other processes; a failure
        costs only a parse later, so it never fails the FETCH."""
        computed, self.computed = self.computed, {}
        if computed and self.config.shared_cache is not None:
            try:
                self._store().save_items(box.name, computed)
            except StoreError as err:
                log.warning("cannot keep parsed items in the index: %s", err)

    # message contents, cached (a FETCH of many items reads and parses each message once)

    def _raw(self, uid: int) -> tuple[bytes, ParsedMessage | None]:
        box = self._mailbox()
        key = (box.name, box.uidvalidity, uid)
        hit = self.cache.get(key)
        if hit is not None:
            self.cache.move_to_end(key)
            return hit
        raw = self._store().read(box.name, uid)
        entry: tuple[bytes, ParsedMessage | None] = (raw, None)
        self.cache[key] = entry
        self.cache_bytes += len(raw)
        while len(self.cache) > 1 and (
            len(self.cache) > MESSAGE_CACHE or self.cache_bytes > MESSAGE_CACHE_BYTES
        ):
            _, (old, _) = self.cache.popitem(last=False)
            self.cache_bytes -= len(old)
        return entry

    def _parsed(self, uid: int) -> ParsedMessage:
        raw, parsed = self._raw(uid)
        if parsed is None:
            parsed = self.config.parse_message(raw)
            box = self._mailbox()
            self.cache[(box.name, box.uidvalidity, uid)] = (raw, parsed)
        return parsed

    def _header_text(self, uid: int) -> str:
        raw, _ = self._raw(uid)
        return _split(raw)[0].decode("utf-8", "replace")

    def _section(self, uid: int, section: Section) -> bytes | None:
        if section.part:
            return self._parsed(uid).section(section)
        # The top level needs no MIME parse: header and text are split at the first empty line.
        raw, _ = self._raw(uid)
        header, text = _split(raw)
        if section.text == "":
            return raw
        if section.text == "HEADER":
            return header
        if section.text == "TEXT":
            return text
        if section.text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
            return _header_fields(header, section.fields, section.text == "HEADER.FIELDS.NOT")
        return None

    def _binary(self, uid: int, part: tuple[int, ...]) -> bytes | None:
        try:
            return self._parsed(uid).binary(part)
        except UnknownTransferEncodingError as err:  # RFC 3516 4.3
            raise Failure(str(err), code="UNKNOWN-CTE") from None

    def _binary_size(self, uid: int, part: tuple[int, ...]) -> int | None:
        try:
            return self._parsed(uid).binary_size(part)
        except UnknownTransferEncodingError as err:
            raise Failure(str(err), code="UNKNOWN-CTE") from None

    # STORE (RFC 9051 6.4.6, RFC 7162 3.1.3 UNCHANGEDSINCE)

    def STORE(self, tag: str, args: Args) -> bytes:
        return self._store_flags(tag, args, uid=False)

    def UID_STORE(self, tag: str, args: Args) -> bytes:
        args.sp()
        return self._store_flags(tag, args, uid=True)

    def _store_flags(self, tag: str, args: Args, *, uid: bool) -> bytes:
        numbers = args.sequence_set()
        args.sp()
        unchangedsince: int | None = None
        if args.peek(b"("):
            args.open()
            if args.word() != "UNCHANGEDSINCE":
                raise ParseError("expected UNCHANGEDSINCE")
            args.sp()
            unchangedsince = args.number(limit=MAX_NUMBER64)
            args.close()
            args.sp()
            self.condstore = True
        what = args.atom().upper()
        mode: Literal["+", "-", ""] = (
            "+" if what.startswith("+") else "-" if what.startswith("-") else ""
        )
        base = what.lstrip("+-")
        if base not in ("FLAGS", "FLAGS.SILENT"):
            raise ParseError(f"expected FLAGS, +FLAGS or -FLAGS, not {what[:20]}")
        silent = base.endswith(".SILENT")
        args.sp()
        if args.peek(b"("):
            flags = args.flag_list()
        else:
            flags = [args.flag()]
            while not args.at_end():
                args.sp()
                flags.append(args.flag())
                if len(flags) > MAX_LIST:
                    raise ParseError("too many flags")
        args.end()
        flags = [f for f in flags if f != "\\Recent"]  # RFC 9051 2.3.2: \Recent cannot be stored
        box = self._mailbox()
        if box.readonly:
            raise Failure("Mailbox is read-only", code="READ-ONLY")
        uids = [u for u in self._set_uids(numbers, uid) if u not in box.gone]
        out = bytearray()
        failed: list[int] = []
        if uids:
            changed, failed_uids = self._store().store(box.name, uids, mode, flags, unchangedsince)
            failed = list(failed_uids)
            out += self._new_keywords(box, changed)
            for info in changed:
                if box.info(info.uid) is None:
                    continue
                box.learn(info)
                box.highestmodseq = max(box.highestmodseq, info.modseq)
                if not silent or unchangedsince is not None:
                    # RFC 7162 3.1.3: with UNCHANGEDSINCE, changed messages are reported (MODSEQ).
                    items: list[Value] = []
                    if uid or self.qresync or self.rev2:
                        items += [Atom("UID"), info.uid]
                    if not silent:
                        items += [Atom("FLAGS"), self._flags(box, info.uid, info)]
                    if self.condstore:
                        items += [Atom("MODSEQ"), [info.modseq]]
                    if items:
                        out += b"* %d FETCH %s\r\n" % (box.seq(info.uid), encode(items))
        code = None
        if failed:
            shown = sorted(failed) if uid else sorted(box.seq(u) for u in failed)
            code = f"MODIFIED {format_set(shown)}"
        # RFC 9051 7.5.1: no EXPUNGE while answering STORE (UID STORE may).
        return bytes(out) + self._done(tag, "STORE completed", code=code, expunge=uid)

    # COPY, MOVE (RFC 9051 6.4.7, 6.4.8; RFC 4315 COPYUID; RFC 6851)

    def COPY(self, tag: str, args: Args) -> bytes:
        return self._copy(tag, args, uid=False, move=False)

    def UID_COPY(self, tag: str, args: Args) -> bytes:
        args.sp()
        return self._copy(tag, args, uid=True, move=False)

    def MOVE(self, tag: str, args: Args) -> bytes:
        return self._copy(tag, args, uid=False, move=True)

    def UID_MOVE(self, tag: str, args: Args) -> bytes:
        args.sp()
        return self._copy(tag, args, uid=True, move=True)

    def _copy(self, tag: str, args: Args, *, uid: bool, move: bool) -> bytes:
        numbers = args.sequence_set()
        args.sp()
        dst = args.mailbox()
        args.end()
        box = self._mailbox()
        if move and box.readonly:
            raise Failure("Mailbox is read-only", code="READ-ONLY")
        uids = [u for u in self._set_uids(numbers, uid) if u not in box.gone]
        verb = "MOVE" if move else "COPY"
        if not uids:
            return self._done(tag, f"{verb} completed")
        store = self._store()
        try:
            if move:
                validity, pairs = store.move(box.name, uids, dst)
            else:
                validity, pairs = store.copy(box.name, uids, dst)
        except MailboxNotFoundError:
            raise Failure(f"No mailbox {dst}", code="TRYCREATE") from None  # RFC 9051 6.4.7
        except QuotaExceededError:
            raise Failure("Quota exceeded", code="OVERQUOTA") from None
        code = None
        if pairs:
            ordered = sorted(pairs)
            src_set = ",".join(str(s) for s, _ in ordered)
            dst_set = ",".join(str(d) for _, d in ordered)
            code = f"COPYUID {validity} {src_set} {dst_set}"
        if move:
            # RFC 6851 3.3: COPYUID in an untagged OK before the expunges.
            head = f"* OK [{code}] Moved\r\n".encode() if code else b""
            return head + self._updates(expunge=True) + self._tagged(tag, "OK", "MOVE completed")
        return self._done(tag, "COPY completed", code=code)


# -- helpers ------------------------------------------------------------------------------------

_STATUS_ITEMS = (
    "MESSAGES", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "DELETED", "SIZE", "HIGHESTMODSEQ", "RECENT",
    "APPENDLIMIT",
)  # fmt: skip

# How store errors a handler did not catch itself are answered (RFC 9051 7.1 response codes).
_ERRORS: tuple[tuple[type[MailroomError], str, str | None], ...] = (
    (MailboxNotFoundError, "NO", "NONEXISTENT"),
    (MailboxExistsError, "NO", "ALREADYEXISTS"),
    (InvalidMailboxNameError, "NO", "CANNOT"),
    (MessageGoneError, "NO", "EXPUNGEISSUED"),
    (InvalidFlagError, "BAD", None),
    (KeywordLimitError, "NO", "LIMIT"),
    (SpecialUseError, "NO", "USEATTR"),
    (QuotaExceededError, "NO", "OVERQUOTA"),
    (StoreError, "NO", "CANNOT"),
    (ConnectionLimitError, "NO", "LIMIT"),
    (MailroomError, "NO", None),
)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BAD_NAME = re.compile(r"[\x00-\x1f\x7f]")


def _not_stored(command: str, err: DeliveryError) -> Failure:
    """The NO for messages the disk did not take durably: a full disk is [OVERQUOTA], as
    Dovecot answers ENOSPC and EDQUOT; any other failure (EIO) [UNAVAILABLE], RFC 5530's
    temporary failure. The reason, which names the server's files, goes to the log only."""
    log.warning("imap %s: %s", command, err)
    cause = err.__cause__  # maildir._failed chains the OSError
    if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
        return Failure("Not enough disk space", code="OVERQUOTA")
    return Failure("Cannot store the message now; try again later", code="UNAVAILABLE")


def _is_derived(item: FetchItem) -> bool:
    """ENVELOPE, BODYSTRUCTURE, BODY: computed from the message's contents, cached."""
    return item.name in ("ENVELOPE", "BODYSTRUCTURE") or (
        item.name == "BODY" and item.section is None
    )


def _keywords(infos: Iterable[MessageInfo]) -> set[str]:
    return {f for m in infos for f in m.flags if not f.startswith("\\")}


def _check_name(name: str) -> None:
    """Refuse names that could escape the user's directory or confuse the Maildir++ layout."""
    if not name or len(name) > MAX_MAILBOX_NAME:
        raise Failure("Invalid mailbox name length", code="CANNOT")
    if _BAD_NAME.search(name):
        raise Failure("Control characters are not allowed in mailbox names", code="CANNOT")
    if "*" in name or "%" in name:
        raise Failure("Wildcards are not allowed in mailbox names", code="CANNOT")
    for part in name.split(DELIMITER):
        if part in ("", ".", "..") or part.startswith("."):
            raise Failure(f"Invalid mailbox name {name!r}", code="CANNOT")


def _pattern(reference: str, pattern: str) -> re.Pattern[str]:
    """RFC 9051 6.3.9: reference and pattern concatenated (an absolute pattern stands alone);
    ``*`` matches anything, ``%`` anything but the delimiter; INBOX is case-insensitive."""
    if reference and not pattern.startswith(DELIMITER):
        pattern = reference + pattern
    regex = "".join(".*" if c == "*" else "[^/]*" if c == "%" else re.escape(c) for c in pattern)
    if pattern[:5].upper() == "INBOX":
        regex = "(?i:INBOX)" + "".join(
            ".*" if c == "*" else "[^/]*" if c == "%" else re.escape(c) for c in pattern[5:]
        )
    return re.compile(regex, re.DOTALL)


def _split(raw: bytes) -> tuple[bytes, bytes]:
    """Header (with its final empty line) and text of a message."""
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        if raw.startswith(b"\r\n"):
            return b"\r\n", raw[2:]
        return raw, b""
    return raw[: end + 4], raw[end + 4 :]


def _header_fields(header: bytes, fields: tuple[str, ...], negate: bool) -> bytes:
    """RFC 9051 6.4.5 HEADER.FIELDS (.NOT): the named fields, and the empty line."""
    wanted = {f.upper() for f in fields}
    out: list[bytes] = []
    keep = False
    for line in header.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            if keep:
                out.append(line)
            continue
        name = line.split(b":", 1)[0].strip().decode("ascii", "replace").upper()
        keep = (name in wanted) != negate
        if keep:
            out.append(line)
    return b"".join(line + b"\r\n" for line in out) + b"\r\n"


def _string(data: bytes) -> bytes:
    return quoted_or_literal(data) if len(data) < 100 else b"{%d}\r\n" % len(data) + data


def _crlf(message: bytes) -> bytes:
    """Bare LF line ends made CRLF (the store keeps messages in CRLF form)."""
    if b"\n" not in message.replace(b"\r\n", b""):
        return message
    return re.sub(rb"\r?\n", b"\r\n", message)


def _fetch_items(args: Args) -> list[FetchItem]:
    """RFC 9051 6.4.5: a macro, one item, or a parenthesized list of items."""
    if args.peek(b"("):
        return args.list_of(lambda: _fetch_item(args), allow_empty=False)
    word_start = args.pos
    word = _item_name(args)
    macros = {
        "ALL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"],
        "FAST": ["FLAGS", "INTERNALDATE", "RFC822.SIZE"],
        "FULL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"],
    }
    if word in macros and not args.peek(b"["):
        return [FetchItem(n) for n in macros[word]]
    args.pos = word_start
    return [_fetch_item(args)]


_SIMPLE_ITEMS = {
    "ENVELOPE", "FLAGS", "INTERNALDATE", "RFC822.SIZE", "RFC822", "RFC822.HEADER", "RFC822.TEXT",
    "BODY", "BODYSTRUCTURE", "UID", "MODSEQ",
}  # fmt: skip


_FIELD_NAME = re.compile(r'[^\x00-\x20(){%*"\\\]\x7f-\U0010ffff]+')  # can be written as an atom
_ITEM_NAME = re.compile(rb"[A-Za-z0-9.]+")


def _item_name(args: Args) -> str:
    match = _ITEM_NAME.match(args.data, args.pos)
    if match is None:
        raise ParseError("expected a FETCH item")
    args.pos = match.end()
    return match.group().decode().upper()


def _fetch_item(args: Args) -> FetchItem:
    name = _item_name(args)
    if name in _SIMPLE_ITEMS and not args.peek(b"["):
        return FetchItem(name)
    if name in ("BODY", "BODY.PEEK"):
        args.expect(b"[")
        section, text = _section(args)
        return FetchItem("BODY", section, text, peek=name == "BODY.PEEK", partial=_partial(args))
    if name in ("BINARY", "BINARY.PEEK", "BINARY.SIZE"):
        args.expect(b"[")
        part = _part(args)
        args.expect(b"]")
        text = ".".join(str(p) for p in part)
        section = Section(part)
        if name == "BINARY.SIZE":
            return FetchItem("BINARY.SIZE", section, text)
        return FetchItem(
            "BINARY", section, text, peek=name == "BINARY.PEEK", partial=_partial(args)
        )
    raise ParseError(f"unknown FETCH item {name[:30]}")


def _part(args: Args) -> tuple[int, ...]:
    part: list[int] = []
    while args.pos < len(args.data) and 0x30 <= args.data[args.pos] <= 0x39:
        part.append(args.number(nonzero=True))
        if len(part) > 100:
            raise ParseError("section part nested too deep")
        if not args.take(b"."):
            break
        if not (args.pos < len(args.data) and 0x30 <= args.data[args.pos] <= 0x39):
            args.pos -= 1  # the "." belongs to the text after the part
            break
    return tuple(part)


def _section(args: Args) -> tuple[Section, str]:
    """RFC 9051 9 section-spec, after "[", up to and including "]"."""
    part = _part(args)
    text = ""
    fields: tuple[str, ...] = ()
    if part and args.take(b"."):
        text = args.atom().upper()
        if text not in ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME"):
            raise ParseError(f"bad section text {text[:30]}")
    elif not part and not args.peek(b"]"):
        text = args.atom().upper()
        if text not in ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT"):
            raise ParseError(f"bad section text {text[:30]}")
    asked: list[str] = []
    if text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
        args.sp()
        asked = args.list_of(args.astring, allow_empty=False)
        fields = tuple(f.upper() for f in asked)
    args.expect(b"]")
    label = ".".join(str(p) for p in part)
    if text:
        label = f"{label}.{text}" if label else text
    if asked:  # echoed as the client spelled them, which is what clients match on
        label += " " + encode(
            [Atom(f) if _FIELD_NAME.fullmatch(f) else f.encode() for f in asked]
        ).decode("utf-8", "replace")
    return Section(part, text, fields), label


def _partial(args: Args) -> tuple[int, int] | None:
    """RFC 9051 9 partial: "<" number64 "." nz-number64 ">"."""
    if not args.take(b"<"):
        return None
    start = args.number(limit=MAX_NUMBER64)
    args.expect(b".")
    length = args.number(limit=MAX_NUMBER64, nonzero=True)
    args.expect(b">")
    return start, length


def _table(*names: str) -> dict[str, Handler]:
    return {name: getattr(IMAPSession, name.replace(" ", "_")) for name in names}


_ANY = ("CAPABILITY", "NOOP", "LOGOUT", "ID")
_AUTH = (
    *_ANY, "SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "LIST",
    "LSUB", "NAMESPACE", "STATUS", "APPEND", "IDLE", "COMPRESS", "GETQUOTA", "GETQUOTAROOT",
    "SETQUOTA",
)  # fmt: skip
_SELECTED = (
    *_AUTH, "CHECK", "CLOSE", "UNSELECT", "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY", "MOVE",
    "UID FETCH", "UID SEARCH", "UID STORE", "UID COPY", "UID MOVE", "UID EXPUNGE",
)  # fmt: skip
_TABLES: dict[State, dict[str, Handler]] = {
    State.NOT_AUTHENTICATED: _table(*_ANY, "STARTTLS", "AUTHENTICATE", "LOGIN"),
    State.AUTHENTICATED: _table(*_AUTH, "ENABLE"),  # RFC 5161 3.1: ENABLE only when authenticated
    State.SELECTED: _table(*_SELECTED),
    State.LOGOUT: {},
}
