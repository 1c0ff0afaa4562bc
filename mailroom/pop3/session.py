"""The POP3 session core, sans-IO: bytes from the client in, bytes to send (and an action) out.

What this module owns: the conversation of one POP3 connection, from the greeting to QUIT.

- **States** (RFC 1939 3): AUTHORIZATION -> TRANSACTION -> UPDATE, changed only by
  ``_enter``; each state has its table of verbs, and each verb a handler named for it that
  returns the reply.
- **Commands**: USER, PASS, QUIT, STAT, LIST, RETR, DELE, NOOP, RSET, TOP, UIDL (RFC 1939),
  CAPA and response codes (RFC 2449), STLS (RFC 2595), AUTH PLAIN with an initial response
  (RFC 5034, RFC 4616). No APOP: passwords are stored hashed.
- **Privacy**: before TLS no password is taken (USER, PASS and AUTH get a clear ``-ERR``)
  unless the configuration allows plaintext from this (loopback) client. Whatever the client
  sent behind STLS in plaintext is discarded (RFC 2595 4; STARTTLS injection).
- **Limits**: a line longer than ``MAX_LINE`` is refused and skipped up to its end, and after
  ``MAX_BAD_COMMANDS`` unknown or malformed commands, or ``MAX_AUTH_FAILURES`` failed logins,
  the session ends.
- **The maildrop** is injected (``open_maildrop``): the session sees a fixed snapshot of the
  INBOX taken at login (RFC 1939 8: mail delivered meanwhile shows in the next session),
  marks DELE'd messages itself, and asks the maildrop to remove exactly those in UPDATE.
  A session closed without QUIT removes nothing.

``feed`` may block (password hashing, reading messages): the server calls it from a worker
thread, one call at a time per connection.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Literal, Protocol

from mailroom.errors import MailboxInUseError, MailroomError, MessageGoneError
from mailroom.throttle import TooManyFailures

if TYPE_CHECKING:
    from mailroom.accounts import User

log = logging.getLogger(__name__)

MAX_LINE = 2048  # octets with CRLF; RFC 2449 4 says 255 for commands, but AUTH PLAIN needs more
MAX_BAD_COMMANDS = 10
MAX_AUTH_FAILURES = 3
_NUMBER = re.compile(rb"^[0-9]{1,9}$")
_UIDL_CHARS = re.compile(r"[\x21-\x7e]{1,70}")  # RFC 1939 7
_HTTP = re.compile(rb"^[A-Z]{3,7} \S+ HTTP/\d")  # a request line (cross-protocol attack)


class State(StrEnum):
    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"
    CLOSED = "CLOSED"


Action = Literal["starttls", "close"] | None


@dataclass(frozen=True, slots=True)
class Output:
    """What to send, and what the server must do after sending it."""

    data: bytes
    action: Action = None


class Message(Protocol):
    """One message of the snapshot (``mailstore.MessageInfo`` is one)."""

    @property
    def uid(self) -> int: ...

    @property
    def size(self) -> int: ...  # octets with CRLF line ends (RFC 1939 11)

    @property
    def key(self) -> str: ...  # stable Maildir base name


class Maildrop(Protocol):
    """One user's INBOX, locked for this session, with its message list fixed at open."""

    @property
    def messages(self) -> Sequence[Message]: ...

    def read(self, uid: int) -> bytes:
        """The message with CRLF line ends; ``MessageGoneError`` if expunged meanwhile."""
        ...

    def remove(self, uids: Sequence[int]) -> list[int]:
        """Remove these messages (whatever their flags), crash-safe; the UIDs removed."""
        ...

    def close(self) -> None:
        """Release the lock; removes nothing."""
        ...


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """What one connection's session needs from the outside world."""

    hostname: str
    authenticate: Callable[[str, str], User | None]  # slow (argon2id, throttling)
    open_maildrop: Callable[[User], Maildrop]  # raises MailboxInUseError, StoreError, ...
    implicit_tls: bool = False  # port 995
    starttls_available: bool = False  # port 110 with a certificate
    plaintext_auth: bool = False  # passwords accepted without TLS (allowed loopback client)
    timeout: float = 600.0  # RFC 1939 3: at least 10 minutes


def unique_id(key: str) -> str:
    """The UIDL of a message with this store key (RFC 1939 7: 1-70 chars in 0x21-0x7E).

    The key itself when it qualifies; otherwise (longer, e.g. with a long host name, or with
    other characters) a digest of it: either way a function of the key alone, so stable
    across sessions, restarts and index rebuilds, and the same as the store's name.
    """
    if _UIDL_CHARS.fullmatch(key):
        return key
    return "H" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def byte_stuff(data: bytes) -> bytes:
    """A multi-line body as sent: CRLF-terminated, lines starting with "." doubled, then ".".

    RFC 1939 3: byte-stuffing of the termination octet.
    """
    stuffed = data.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if stuffed and not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


def _ok(text: str = "") -> bytes:
    return f"+OK {text}\r\n".encode() if text else b"+OK\r\n"


def _err(text: str, code: str | None = None) -> bytes:
    """A negative reply; ``code`` is an RFC 2449 8 response code such as ``IN-USE``."""
    return (f"-ERR [{code}] {text}\r\n" if code else f"-ERR {text}\r\n").encode()


class _BadCommand(Exception):
    """Malformed arguments: answered with -ERR and counted as a bad command."""


Handler = Callable[["POP3Session", list[bytes]], bytes]


class POP3Session:
    """One POP3 conversation."""

    def __init__(self, config: SessionConfig) -> None:
        self.config = config
        self.state = State.AUTHORIZATION
        self.tls = config.implicit_tls
        self.buffer = bytearray()
        self.discarding = False  # inside an over-long line, skipping to its end
        self.bad_commands = 0
        self.auth_failures = 0
        self.username: str | None = None  # after USER
        self.sasl_pending = False  # after "AUTH PLAIN" without initial response: "+ " sent
        self.user: User | None = None
        self.maildrop: Maildrop | None = None
        self.messages: Sequence[Message] = ()
        self.deleted: set[int] = set()  # message numbers (1-based) marked by DELE
        self.action: Action = None

    # -- the outside ------------------------------------------------------------------------

    @property
    def timeout(self) -> float:
        return self.config.timeout

    def greeting(self) -> bytes:
        return _ok(f"{self.config.hostname} POP3 server ready")

    def timed_out(self) -> bytes:
        """RFC 1939 3: autologout after inactivity; nothing is removed (no UPDATE)."""
        self.close()
        return _err("Autologout: idle for too long")

    def tls_started(self) -> None:
        """STLS completed: forget what plaintext said (RFC 2595 4)."""
        self.tls = True
        self.action = None
        self.username = None
        self.buffer.clear()
        self.discarding = False

    def close(self) -> None:
        """The connection is gone: release the maildrop without removing anything."""
        maildrop, self.maildrop = self.maildrop, None
        if maildrop is not None:
            maildrop.close()
        if self.state is not State.CLOSED:
            self._enter(State.CLOSED)

    def quick(self, data: bytes) -> bool:
        """Whether ``feed(data)`` only reads: every whole line in it is a TRANSACTION command
        that waits on no lock, password hash or fsync (STAT, LIST, UIDL, RETR, TOP, DELE,
        NOOP, RSET, CAPA). RETR and TOP read one message file (the page cache, as a rule).
        The server runs such feeds on its event loop, saving two thread switches a command.
        """
        if self.state is not State.TRANSACTION or self.action is not None or self.discarding:
            return False
        pending = bytes(self.buffer) + data
        if len(pending) > MAX_LINE:
            return False
        lines = pending.split(b"\n")[:-1]  # the unfinished rest is only buffered
        return all(line.rstrip(b"\r").partition(b" ")[0].upper() in _QUICK for line in lines)

    def feed(self, data: bytes) -> Output:
        """Take bytes from the client; return the replies to them, and an action."""
        out: list[bytes] = []
        if self.action is not None or not self._open():
            return Output(b"", self.action)
        self.buffer += data
        while self.action is None and self._open():
            end = self.buffer.find(b"\n")
            if end < 0:
                if len(self.buffer) > MAX_LINE and not self.discarding:
                    self.discarding = True
                    out.append(self._bad(_err(f"Line too long (at most {MAX_LINE} octets)")))
                if self.discarding:
                    self.buffer.clear()
                break
            line = bytes(self.buffer[:end])
            del self.buffer[: end + 1]
            if self.discarding:  # the end of an over-long line: already answered
                self.discarding = False
                continue
            if end + 1 > MAX_LINE:
                out.append(self._bad(_err(f"Line too long (at most {MAX_LINE} octets)")))
                continue
            out.append(self._line(line.removesuffix(b"\r")))
        if self.action == "starttls":
            self.buffer.clear()  # RFC 2595 4: nothing sent behind STLS in plaintext is executed
        if self.action == "close" and self._open():
            self.close()
        return Output(b"".join(out), self.action)

    # -- dispatch ---------------------------------------------------------------------------

    def _open(self) -> bool:
        return self.state is not State.CLOSED

    def _enter(self, state: State) -> None:
        log.debug("POP3 state %s -> %s", self.state, state)
        self.state = state

    def _bad(self, reply: bytes) -> bytes:
        self.bad_commands += 1
        if self.bad_commands >= MAX_BAD_COMMANDS:
            self.action = "close"
            return reply + _err("Too many bad commands; closing")
        return reply

    def _line(self, line: bytes) -> bytes:
        if self.bad_commands == 0 and self.state is State.AUTHORIZATION and _HTTP.match(line):
            self.action = "close"  # a browser sent here: nothing of its request runs
            return _err("This is a POP3 server")
        if self.sasl_pending:
            self.sasl_pending = False
            return self._sasl_plain(line)
        verb, _, rest = line.partition(b" ")
        handler = _COMMANDS[self.state].get(verb.upper())
        if handler is None:
            if verb.upper() in _ALL_VERBS:
                return self._bad(
                    _err(f"{_printable(verb)} is not allowed in the {self.state} state")
                )
            return self._bad(_err(f"Unknown command {_printable(verb)}"))
        args = rest.split(b" ") if rest else []
        try:
            return handler(self, args)
        except _BadCommand as bad:
            return self._bad(_err(str(bad)))

    # -- AUTHORIZATION ----------------------------------------------------------------------

    def _password_allowed(self) -> bool:
        return self.tls or self.config.plaintext_auth

    def _privacy_required(self) -> bytes:
        return _err("Authentication requires TLS: send STLS first, or connect to port 995")

    def CAPA(self, args: list[bytes]) -> bytes:
        """RFC 2449 5: what this server offers now (STLS before TLS, logins once allowed)."""
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.state is State.AUTHORIZATION:
            if self._password_allowed():
                caps += ["USER", "SASL PLAIN"]
            if self.config.starttls_available and not self.tls:
                caps.append("STLS")
        caps += ["EXPIRE NEVER", "IMPLEMENTATION mailroom"]
        return (
            _ok("Capability list follows") + "".join(f"{c}\r\n" for c in caps).encode() + b".\r\n"
        )

    def STLS(self, args: list[bytes]) -> bytes:
        if args:
            raise _BadCommand("STLS takes no argument")
        if self.tls:
            return _err("TLS is already active")
        if not self.config.starttls_available:
            return _err("TLS is not available")
        self.action = "starttls"
        return _ok("Begin TLS negotiation")

    def USER(self, args: list[bytes]) -> bytes:
        if not self._password_allowed():
            return self._privacy_required()
        if len(args) != 1 or not args[0]:
            raise _BadCommand("Usage: USER name")
        self.username = _text(args[0])
        return _ok("Send PASS")

    def PASS(self, args: list[bytes]) -> bytes:
        if not self._password_allowed():
            return self._privacy_required()
        if self.username is None:
            return _err("Send USER first")
        username, self.username = self.username, None
        # RFC 1939 7: the password may contain spaces; it is the rest of the line.
        return self._login(username, _text(b" ".join(args)))

    def AUTH(self, args: list[bytes]) -> bytes:
        if not args:  # not in RFC 5034, but clients ask this way for the mechanism list
            return _ok("Mechanisms follow") + b"PLAIN\r\n.\r\n"
        if not self._password_allowed():
            return self._privacy_required()
        if args[0].upper() != b"PLAIN":
            return _err(f"Unsupported mechanism {_printable(args[0])} (PLAIN only)")
        if len(args) > 2:
            raise _BadCommand("Usage: AUTH PLAIN [initial-response]")
        if len(args) == 1:
            self.sasl_pending = True
            return b"+ \r\n"
        return self._sasl_plain(args[1])

    def _sasl_plain(self, response: bytes) -> bytes:
        """RFC 5034 4 and RFC 4616 2: authzid NUL authcid NUL passwd, base64; "=" is empty."""
        if response == b"*":
            return _err("Authentication cancelled")
        try:
            decoded = b"" if response == b"=" else base64.b64decode(response, validate=True)
        except (binascii.Error, ValueError):
            return _err("Invalid base64 in the SASL response")
        parts = decoded.split(b"\0")
        if len(parts) != 3:
            return _err("Malformed PLAIN response", "AUTH")
        authzid, authcid, password = (_text(p) for p in parts)
        if authzid and authzid != authcid:
            return self._failed_login(authcid, "Cannot log in as another user")
        return self._login(authcid, password)

    def _login(self, username: str, password: str) -> bytes:
        try:
            user = self.config.authenticate(username, password)
        except TooManyFailures:
            # RFC 3206 4: SYS/TEMP, a temporary failure; the same login may work later.
            return self._failed_login(username, "Too many failed logins; try later", "SYS/TEMP")
        if user is None:
            return self._failed_login(username, "Invalid user name or password")
        try:
            maildrop = self.config.open_maildrop(user)
        except MailboxInUseError:
            return _err("Mailbox is open in another POP3 session", "IN-USE")
        except MailroomError as err:
            log.error("cannot open the maildrop of %s: %s", user.address, err)
            return _err("Cannot open the mailbox now; try again later", "SYS/TEMP")
        self.user, self.maildrop = user, maildrop
        self.messages = tuple(maildrop.messages)
        self._enter(State.TRANSACTION)
        count, size = len(self.messages), sum(m.size for m in self.messages)
        return _ok(f"Logged in: {count} messages ({size} octets)")

    def _failed_login(self, username: str, text: str, code: str = "AUTH") -> bytes:
        self.auth_failures += 1
        reply = _err(text, code)
        if self.auth_failures >= MAX_AUTH_FAILURES:
            self.action = "close"
            reply += _err("Too many failed logins; closing")
        return reply

    def QUIT(self, args: list[bytes]) -> bytes:
        """RFC 1939 6: from TRANSACTION, the UPDATE state removes the DELE'd messages."""
        self.action = "close"
        if self.state is not State.TRANSACTION:
            return _ok(f"{self.config.hostname} signing off")
        self._enter(State.UPDATE)
        assert self.maildrop is not None
        uids = [self.messages[n - 1].uid for n in sorted(self.deleted)]
        try:
            removed = self.maildrop.remove(uids) if uids else []
        except MailroomError as err:
            log.error("UPDATE failed for %s: %s", self.user and self.user.address, err)
            return _err("Some deleted messages were not removed", "SYS/TEMP")
        finally:
            self.close()
        gone = len(uids) - len(removed)  # expunged by another client meanwhile: removed too
        text = f"{self.config.hostname} signing off ({len(uids)} messages deleted)"
        if gone:
            log.info("%d message(s) were already gone at UPDATE", gone)
        return _ok(text)

    # -- TRANSACTION ------------------------------------------------------------------------

    def _message(self, arg: bytes) -> int:
        """A message number that exists and is not marked deleted."""
        if not _NUMBER.match(arg):
            raise _BadCommand(f"Invalid message number {_printable(arg)}")
        number = int(arg)
        if not 1 <= number <= len(self.messages):
            raise _NoSuchMessage(number)
        if number in self.deleted:
            raise _NoSuchMessage(number, deleted=True)
        return number

    def _listing(self, args: list[bytes], what: Callable[[Message], str], title: str) -> bytes:
        if len(args) > 1:
            raise _BadCommand("At most one message number")
        if args:
            try:
                number = self._message(args[0])
            except _NoSuchMessage as missing:
                return missing.reply()
            return _ok(f"{number} {what(self.messages[number - 1])}")
        lines = [
            f"{n} {what(m)}\r\n" for n, m in enumerate(self.messages, 1) if n not in self.deleted
        ]
        return _ok(title) + "".join(lines).encode() + b".\r\n"

    def STAT(self, args: list[bytes]) -> bytes:
        if args:
            raise _BadCommand("STAT takes no argument")
        live = [m for n, m in enumerate(self.messages, 1) if n not in self.deleted]
        return _ok(f"{len(live)} {sum(m.size for m in live)}")

    def LIST(self, args: list[bytes]) -> bytes:
        live = [m for n, m in enumerate(self.messages, 1) if n not in self.deleted]
        title = f"{len(live)} messages ({sum(m.size for m in live)} octets)"
        return self._listing(args, lambda m: str(m.size), title)

    def UIDL(self, args: list[bytes]) -> bytes:
        return self._listing(args, lambda m: unique_id(m.key), "Unique-ID listing follows")

    def RETR(self, args: list[bytes]) -> bytes:
        if len(args) != 1:
            raise _BadCommand("Usage: RETR msg")
        return self._send(args[0], None)

    def TOP(self, args: list[bytes]) -> bytes:
        if len(args) != 2:
            raise _BadCommand("Usage: TOP msg n")
        if not _NUMBER.match(args[1]):
            raise _BadCommand(f"Invalid line count {_printable(args[1])}")
        return self._send(args[0], int(args[1]))

    def _send(self, arg: bytes, lines: int | None) -> bytes:
        """RETR (``lines`` None) or TOP: the message, or its header and ``lines`` body lines."""
        try:
            number = self._message(arg)
        except _NoSuchMessage as missing:
            return missing.reply()
        message = self.messages[number - 1]
        assert self.maildrop is not None
        try:
            data = self.maildrop.read(message.uid)
        except MessageGoneError:
            return _err(f"Message {number} was removed by another client")
        except MailroomError as err:
            log.error("cannot read message %d: %s", message.uid, err)
            return _err(f"Cannot read message {number} now", "SYS/TEMP")
        if lines is None:
            return _ok(f"{message.size} octets") + byte_stuff(data)
        return _ok("Top of message follows") + byte_stuff(_top(data, lines))

    def DELE(self, args: list[bytes]) -> bytes:
        if len(args) != 1:
            raise _BadCommand("Usage: DELE msg")
        try:
            number = self._message(args[0])
        except _NoSuchMessage as missing:
            return missing.reply()
        self.deleted.add(number)
        return _ok(f"Message {number} deleted")

    def NOOP(self, args: list[bytes]) -> bytes:
        if args:
            raise _BadCommand("NOOP takes no argument")
        return _ok()

    def RSET(self, args: list[bytes]) -> bytes:
        if args:
            raise _BadCommand("RSET takes no argument")
        self.deleted.clear()
        size = sum(m.size for m in self.messages)
        return _ok(f"Maildrop has {len(self.messages)} messages ({size} octets)")


class _NoSuchMessage(Exception):
    def __init__(self, number: int, *, deleted: bool = False) -> None:
        super().__init__(number)
        self.number = number
        self.deleted = deleted

    def reply(self) -> bytes:
        if self.deleted:
            return _err(f"Message {self.number} already deleted")
        return _err(f"No such message {self.number}")


def _top(data: bytes, lines: int) -> bytes:
    """RFC 1939 7 TOP: the header, the blank line, then ``lines`` lines of the body."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data
    head, body = data[: end + 4], data[end + 4 :]
    if lines == 0 or not body:
        return head
    cut = -1
    for _ in range(lines):
        cut = body.find(b"\r\n", cut + 1)
        if cut < 0:
            return head + body
        cut += 1
    return head + body[: cut + 1]


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _printable(data: bytes) -> str:
    """A client's word fit to echo back: printable ASCII, at most 40 characters."""
    text = data[:40].decode("ascii", "replace")
    return "".join(c if " " < c < "\x7f" else "?" for c in text) or '""'


_AUTHORIZATION: dict[bytes, Handler] = {
    b"CAPA": POP3Session.CAPA,
    b"STLS": POP3Session.STLS,
    b"USER": POP3Session.USER,
    b"PASS": POP3Session.PASS,
    b"AUTH": POP3Session.AUTH,
    b"QUIT": POP3Session.QUIT,
}
_TRANSACTION: dict[bytes, Handler] = {
    b"CAPA": POP3Session.CAPA,
    b"STAT": POP3Session.STAT,
    b"LIST": POP3Session.LIST,
    b"RETR": POP3Session.RETR,
    b"TOP": POP3Session.TOP,
    b"DELE": POP3Session.DELE,
    b"NOOP": POP3Session.NOOP,
    b"RSET": POP3Session.RSET,
    b"UIDL": POP3Session.UIDL,
    b"QUIT": POP3Session.QUIT,
}
_COMMANDS: dict[State, dict[bytes, Handler]] = {
    State.AUTHORIZATION: _AUTHORIZATION,
    State.TRANSACTION: _TRANSACTION,
    State.UPDATE: {},
    State.CLOSED: {},
}
_ALL_VERBS = frozenset(_AUTHORIZATION) | frozenset(_TRANSACTION)
_QUICK = frozenset(_TRANSACTION) - {b"QUIT"}  # QUIT removes messages: fsyncs
