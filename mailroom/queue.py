"""The durable outbound queue in ``{data_dir}/queue/``: messages waiting for remote delivery.

What this module owns: the on-disk layout of the queue, the state of every queued message and
recipient, and the retry arithmetic. The runner (``mailroom-deliver``) and ``mailroomctl queue``
work through ``Queue``; nothing else touches the directory. What it promises:

* **Layout.** One file set per message, named by its id: ``{id}.eml`` (the message bytes,
  exactly as given to ``enqueue``) and ``{id}.json`` (envelope and per-recipient state). Files
  are written in ``tmp/`` first and lock files live in ``lock/{id}``, so the queue directory
  itself (which ``mailroom-deliver.path`` watches) changes only when a message is committed,
  changes state or leaves. Directories are mode 0700, files 0600.
* **Ids** are ``[0-9A-Za-z]`` only: 14 hex digits of the enqueue time in microseconds, then 10
  random hex digits. They sort by enqueue time and are unique across processes (the ``.eml``
  is hard-linked, never renamed over an existing name). Ids that come from outside (``mailroomctl
  queue delete ID``) go through ``validate_id``, so none can name a path outside the queue.
* **Durability.** ``enqueue`` writes the ``.eml`` (tmp, fsync, link), then the ``.json`` (tmp,
  fsync, rename), then fsyncs the directory, and only then returns: the ``.json``'s presence is
  the commit. On any error it removes what it wrote and raises ``DeliveryError`` (temporary),
  so a failed enqueue leaves nothing the runner would send. ``save`` rewrites the ``.json``
  atomically (tmp, fsync, rename, fsync the directory): after a crash at any point a reader
  sees the old state or the new one, never a mix. ``remove`` deletes the ``.json`` first, then
  the ``.eml``. An ``.eml`` without its ``.json`` is the leftover of a crashed enqueue;
  ``clean`` removes it once it is an hour old (``ORPHAN_SECONDS``).
* **Corruption** never stops the runner: a ``.json`` that cannot be read or parsed is renamed
  to ``{id}.json.corrupt`` (kept for the admin, with its ``.eml``) and logged; ``list`` and
  ``due`` skip it, ``load`` raises ``CorruptMessageError``.
* **Locking.** ``lock(id)`` takes an exclusive, non-blocking ``flock`` on ``lock/{id}`` and
  yields whether it got it; two runners (or a runner and ``mailroomctl``) never work on one
  message at once. Whoever calls ``save`` or ``remove`` holds the lock, and reloads the message
  after taking it (another holder may have changed or removed it meanwhile). ``flush`` takes
  it itself and skips messages that are busy.

The outside world is injected: ``fsync`` (to count or fail it in tests); the clock is the ``now``
argument of each call.

Errors: ``enqueue`` raises ``DeliveryError``; everything else raises ``QueueError`` subclasses::

    QueueError                  a queue operation failed (an OSError, named by step)
    ├── InvalidQueueIdError     an id that is not [0-9A-Za-z]{1,64}
    ├── MessageNotFoundError    no such message (never queued, or removed meanwhile)
    └── CorruptMessageError     its .json was unreadable and has been moved aside
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from mailroom.config import OutboundSettings
from mailroom.errors import DeliveryError, MailroomError
from mailroom.maildir import FsyncFunc, fsync_dir, make_dir

log = logging.getLogger(__name__)


FILE_MODE = 0o600
ORPHAN_SECONDS = 3600.0  # an .eml without .json, or a tmp/ file, older than this is garbage
FORMAT_VERSION = 1
ID_ATTEMPTS = 5

_T = TypeVar("_T")
_ID_RE = re.compile(r"[0-9A-Za-z]{1,64}")  # used with fullmatch
_TMP_FLAGS = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_LOCK_FLAGS = os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC


class QueueError(MailroomError):
    """A queue operation failed; the message names the message id and the step."""


class InvalidQueueIdError(QueueError):
    """An id that could not have come from ``enqueue`` (and might name another path)."""


class MessageNotFoundError(QueueError):
    """No such message in the queue: never queued, or removed meanwhile."""


class CorruptMessageError(QueueError):
    """The message's ``.json`` could not be read; it is now ``{id}.json.corrupt``."""


class RecipientState(StrEnum):
    """Where one recipient stands. ``pending`` and ``deferred`` are still to be tried."""

    PENDING = "pending"  # not tried yet
    DEFERRED = "deferred"  # tried, failed temporarily (4xx, no answer): tried again later
    DELIVERED = "delivered"  # a remote server accepted it (250)
    FAILED = "failed"  # failed permanently (5xx) or given up: bounced to the sender


ACTIVE_STATES = frozenset({RecipientState.PENDING, RecipientState.DEFERRED})


@dataclass(frozen=True, slots=True)
class Recipient:
    """One envelope recipient and its delivery state.

    ``next_attempt`` is a Unix time; ``last_error`` the last reply or error text (for the
    DSN's Diagnostic-Code); ``remote_mta`` the host that gave it; ``status`` its RFC 3463 code
    (``"5.1.1"``); ``last_attempt`` the Unix time of the last attempt (0: none yet).
    """

    address: str
    state: RecipientState
    attempts: int
    next_attempt: float
    last_error: str = ""
    remote_mta: str = ""
    status: str = ""
    last_attempt: float = 0.0

    @property
    def active(self) -> bool:
        """Still to be tried (pending or deferred)."""
        return self.state in ACTIVE_STATES

    def due(self, now: float) -> bool:
        """Still to be tried, and its time has come."""
        return self.active and self.next_attempt <= now


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """A queued message's envelope and state (the contents of ``{id}.json``).

    ``created`` is the enqueue time (the DSN's Arrival-Date and the base of the give-up
    time), ``size`` the length of ``{id}.eml``, ``delay_warned`` whether the sender has had
    the delay warning, ``envid`` the RFC 3461 ENVID (``""``: none given).
    """

    id: str
    sender: str
    recipients: tuple[Recipient, ...]
    created: float
    size: int
    delay_warned: bool = False
    envid: str = ""

    def due(self, now: float) -> bool:
        """Some recipient is to be tried at ``now``."""
        return any(r.due(now) for r in self.recipients)

    @property
    def done(self) -> bool:
        """No recipient is left to try: the message can be removed."""
        return not any(r.active for r in self.recipients)

    @property
    def active(self) -> tuple[Recipient, ...]:
        """The recipients still to be tried."""
        return tuple(r for r in self.recipients if r.active)


def next_attempt(attempts: int, now: float, settings: OutboundSettings) -> float:
    """When to try again after ``attempts`` attempts (the last one at ``now``) have failed.

    The n-th retry waits ``retry_schedule_seconds[n-1]``; once the schedule is used up, every
    retry waits ``retry_interval_seconds``. ``attempts`` 0 (never tried) means now.
    """
    if attempts <= 0:
        return now
    schedule = settings.retry_schedule_seconds
    wait = schedule[attempts - 1] if attempts <= len(schedule) else settings.retry_interval_seconds
    return now + wait


def expired(msg: QueuedMessage, now: float, settings: OutboundSettings) -> bool:
    """The give-up time has come: what is still pending or deferred fails and is bounced."""
    return now >= msg.created + settings.give_up_seconds


def needs_delay_warning(msg: QueuedMessage, now: float, settings: OutboundSettings) -> bool:
    """The sender should now be told that the message is delayed (once, if configured)."""
    return (
        settings.delay_warning_seconds > 0
        and not msg.delay_warned
        and not msg.done
        and now >= msg.created + settings.delay_warning_seconds
        and not expired(msg, now, settings)
    )


def validate_id(msg_id: str) -> str:
    """Return ``msg_id`` if it is a well-formed queue id, else raise ``InvalidQueueIdError``.

    Only ``[0-9A-Za-z]``: no ``/``, no ``.``, so ``{id}.json`` is always a file in the queue.
    """
    if not isinstance(msg_id, str) or not _ID_RE.fullmatch(msg_id):
        raise InvalidQueueIdError(f"invalid queue id {msg_id!r}: letters and digits only")
    return msg_id


def new_id(now: float) -> str:
    """A fresh id: enqueue time in microseconds (14 hex digits, sortable), 10 random hex."""
    micros = max(0, int(now * 1_000_000))
    return f"{micros:014X}{secrets.token_hex(5).upper()}"


class Queue:
    """The outbound queue in ``directory`` (``settings.queue_dir``)."""

    def __init__(self, directory: Path, fsync: FsyncFunc = os.fsync) -> None:
        self.directory = directory
        self.fsync = fsync

    def __repr__(self) -> str:
        return f"Queue({str(self.directory)!r})"

    # -- paths ----------------------------------------------------------------------------

    def _eml(self, msg_id: str) -> Path:
        return self.directory / f"{validate_id(msg_id)}.eml"

    def _json(self, msg_id: str) -> Path:
        return self.directory / f"{validate_id(msg_id)}.json"

    def _lockfile(self, msg_id: str) -> Path:
        return self.directory / "lock" / validate_id(msg_id)

    @property
    def _tmp(self) -> Path:
        return self.directory / "tmp"

    # -- writing ----------------------------------------------------------------------------

    def enqueue(
        self, sender: str, recipients: Sequence[str], data: bytes, now: float, *, envid: str = ""
    ) -> str:
        """Queue ``data`` for ``recipients`` durably; return the new message's id.

        Returns only once ``{id}.eml`` and ``{id}.json`` are on stable storage. Raises
        ``DeliveryError`` (temporary) naming the failed step; nothing is left behind then.
        """
        if isinstance(recipients, str) or not recipients:
            raise ValueError("enqueue needs a sequence of at least one recipient")
        created: list[Path] = []
        step = "creating the queue directory"
        try:
            self._create_dirs()
            step = "writing the message"
            msg_id, eml = self._write_new_eml(data, now)
            created.append(eml)
            msg = QueuedMessage(
                id=msg_id,
                sender=sender,
                recipients=tuple(
                    Recipient(address=r, state=RecipientState.PENDING, attempts=0, next_attempt=now)
                    for r in recipients
                ),
                created=now,
                size=len(data),
                envid=envid,
            )
            step = "writing the envelope"
            tmp = self._write_tmp(f"{msg_id}.json", _encode(msg))
            try:
                created.insert(0, self._json(msg_id))
                os.rename(tmp, self._json(msg_id))
            except BaseException:
                _unlink_quietly(tmp)
                raise
            step = "syncing the queue directory"
            fsync_dir(self.directory, self.fsync)
        except OSError as exc:
            for path in created:  # .json first: an .eml alone is never sent
                _unlink_quietly(path)
            raise DeliveryError(
                f"cannot queue message in {self.directory}: {step} failed: {_reason(exc)}"
            ) from exc
        log.debug(
            "%s queued: from=<%s> rcpts=%d size=%d", msg_id, sender, len(recipients), len(data)
        )
        return msg_id

    def _create_dirs(self) -> None:
        changed: set[Path] = set()
        if not self.directory.is_dir():
            missing = [p for p in [self.directory, *self.directory.parents] if not p.exists()]
            for path in reversed(missing):
                if make_dir(path):
                    changed.add(path.parent)
        for sub in ("tmp", "lock"):
            if make_dir(self.directory / sub):
                changed.add(self.directory)
        for directory in sorted(changed, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(directory, self.fsync)

    def _write_new_eml(self, data: bytes, now: float) -> tuple[str, Path]:
        """Write ``data`` to tmp/, fsync, hard-link it as ``{id}.eml`` under an unused id."""
        msg_id = new_id(now)
        tmp = self._write_tmp(f"{msg_id}.eml", data)
        try:
            for _ in range(ID_ATTEMPTS):
                try:
                    os.link(tmp, self._eml(msg_id), follow_symlinks=False)
                except FileExistsError:
                    msg_id = new_id(now)
                    continue
                return msg_id, self._eml(msg_id)
            raise FileExistsError(errno.EEXIST, f"no unused id after {ID_ATTEMPTS} attempts")
        finally:
            _unlink_quietly(tmp)

    def _write_tmp(self, name: str, data: bytes) -> Path:
        """Write ``data`` to a new file in tmp/, fsync and close it; removed on failure."""
        path = self._tmp / f"{name}.{secrets.token_hex(4)}"
        fd = os.open(path, _TMP_FLAGS, FILE_MODE)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            self.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            _unlink_quietly(path)
            raise
        try:
            os.close(fd)  # NFS reports some write errors only here
        except BaseException:
            _unlink_quietly(path)
            raise
        return path

    def save(self, msg: QueuedMessage) -> None:
        """Persist ``msg``'s new state: atomically, durably. The caller holds ``lock(msg.id)``.

        Raises ``MessageNotFoundError`` if the message was removed meanwhile (its state is not
        brought back), ``QueueError`` if the write failed (the old or the new state is in
        place then, never a mix).
        """
        target = self._json(msg.id)
        step = "writing the new state"
        try:
            tmp = self._write_tmp(target.name, _encode(msg))
            try:
                if not target.exists():
                    raise MessageNotFoundError(f"{msg.id}: no such message in the queue")
                step = "replacing the state"
                os.rename(tmp, target)
            except BaseException:
                _unlink_quietly(tmp)
                raise
            step = "syncing the queue directory"
            fsync_dir(self.directory, self.fsync)
        except OSError as exc:
            raise QueueError(f"{msg.id}: {step} failed: {_reason(exc)}") from exc

    def remove(self, msg_id: str) -> None:
        """Remove the message: ``.json`` first (the commit), then ``.eml`` and its lock file.

        The caller holds ``lock(msg_id)``. Raises ``MessageNotFoundError`` if it was not there.
        """
        json_path, eml, lockfile = self._json(msg_id), self._eml(msg_id), self._lockfile(msg_id)
        try:
            try:
                os.unlink(json_path)
            except FileNotFoundError:
                raise MessageNotFoundError(f"{msg_id}: no such message in the queue") from None
            fsync_dir(self.directory, self.fsync)
            _unlink_quietly(eml)
            # A process that opened this lock file before the unlink and locks it later finds
            # the message gone; a new lock file would belong to a message that no longer exists.
            _unlink_quietly(lockfile)
        except OSError as exc:
            raise QueueError(f"{msg_id}: removing failed: {_reason(exc)}") from exc
        log.debug("%s removed from the queue", msg_id)

    # -- reading ----------------------------------------------------------------------------

    def ids(self) -> list[str]:
        """Ids of the committed messages (those with a ``.json``), oldest first."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        found = [n.removesuffix(".json") for n in names if n.endswith(".json")]
        return sorted(i for i in found if _ID_RE.fullmatch(i))

    def list(self) -> list[QueuedMessage]:
        """Every queued message, oldest first; corrupt ones are moved aside and skipped."""
        messages: list[QueuedMessage] = []
        for msg_id in self.ids():
            with contextlib.suppress(MessageNotFoundError, CorruptMessageError):
                messages.append(self.load(msg_id))
        return messages

    def load(self, msg_id: str) -> QueuedMessage:
        """The message's envelope and state.

        Raises ``MessageNotFoundError`` or, after moving an unreadable ``.json`` aside,
        ``CorruptMessageError``.
        """
        path = self._json(msg_id)
        try:
            raw = path.read_bytes()
            return _decode(msg_id, raw)
        except FileNotFoundError:
            raise MessageNotFoundError(f"{msg_id}: no such message in the queue") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problem = _reason(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
            aside = path.with_name(path.name + ".corrupt")
            try:
                os.rename(path, aside)
            except FileNotFoundError:  # another process moved it first
                pass
            except OSError as err:
                log.error(
                    "%s: unreadable state (%s), cannot move it aside: %s",
                    msg_id,
                    problem,
                    _reason(err),
                )
            else:
                log.error("%s: unreadable state (%s), moved aside to %s", msg_id, problem, aside)
            raise CorruptMessageError(f"{msg_id}: unreadable queue state: {problem}") from exc

    def read(self, msg_id: str) -> bytes:
        """The message's bytes, exactly as they were enqueued."""
        try:
            return self._eml(msg_id).read_bytes()
        except FileNotFoundError:
            raise MessageNotFoundError(f"{msg_id}: no such message in the queue") from None
        except OSError as exc:
            raise QueueError(f"{msg_id}: reading the message failed: {_reason(exc)}") from exc

    def due(self, now: float) -> builtins.list[QueuedMessage]:
        """The messages with a recipient to try at ``now``, oldest first."""
        return [m for m in self.list() if m.due(now)]

    # -- concurrency and maintenance --------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, msg_id: str) -> Iterator[bool]:
        """Hold ``msg_id`` exclusively for the ``with`` block; yields False if another holds it.

        A non-blocking ``flock`` on ``lock/{id}``: released when the block ends or the process
        dies. It is per open file, so it excludes other processes and other calls in this one.
        Reload the message after taking the lock.
        """
        path = self._lockfile(msg_id)
        try:
            fd = os.open(path, _LOCK_FLAGS, FILE_MODE)
        except FileNotFoundError:
            self._create_dirs()
            fd = os.open(path, _LOCK_FLAGS, FILE_MODE)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
            except BlockingIOError:
                held = False
            yield held
        finally:
            os.close(fd)

    def flush(self) -> int:
        """Make every pending or deferred recipient due now (``mailroomctl queue flush``).

        Messages locked by a runner are skipped (it is working on them). Returns how many
        messages were changed.
        """
        changed = 0
        for msg_id in self.ids():
            with self.lock(msg_id) as held:
                if not held:
                    continue
                try:
                    msg = self.load(msg_id)
                except (MessageNotFoundError, CorruptMessageError):
                    continue
                if not any(r.active and r.next_attempt > 0 for r in msg.recipients):
                    continue
                recipients = tuple(
                    replace(r, next_attempt=0.0) if r.active else r for r in msg.recipients
                )
                with contextlib.suppress(MessageNotFoundError):
                    self.save(replace(msg, recipients=recipients))
                    changed += 1
        return changed

    def clean(self, now: float) -> int:
        """Remove garbage older than ``ORPHAN_SECONDS``: ``.eml`` files without a ``.json``
        (a crashed enqueue; not those beside a ``.json.corrupt``), ``tmp/`` files, and lock
        files of messages that are gone. Returns how many files were removed."""
        cutoff = now - ORPHAN_SECONDS
        removed = 0
        try:
            names = set(os.listdir(self.directory))
        except FileNotFoundError:
            return 0
        for name in sorted(names):
            msg_id = name.removesuffix(".eml")
            if (
                name.endswith(".eml")
                and _ID_RE.fullmatch(msg_id)
                and f"{msg_id}.json" not in names
                and f"{msg_id}.json.corrupt" not in names
                and _older(self.directory / name, cutoff)
                and not self._json(msg_id).exists()  # committed since the listing
            ):
                removed += _remove_garbage(self.directory / name)
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self._tmp):
                if _older(self._tmp / name, cutoff):
                    removed += _remove_garbage(self._tmp / name)
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.directory / "lock"):
                if not _ID_RE.fullmatch(name) or self._json(name).exists():
                    continue
                with self.lock(name) as held:
                    if held and not self._json(name).exists():
                        removed += _remove_garbage(self._lockfile(name))
        return removed


# -- the .json format ---------------------------------------------------------------------


def _encode(msg: QueuedMessage) -> bytes:
    doc = {
        "version": FORMAT_VERSION,
        "id": msg.id,
        "sender": msg.sender,
        "created": msg.created,
        "size": msg.size,
        "delay_warned": msg.delay_warned,
        "envid": msg.envid,
        "recipients": [
            {
                "address": r.address,
                "state": r.state.value,
                "attempts": r.attempts,
                "next_attempt": r.next_attempt,
                "last_attempt": r.last_attempt,
                "last_error": r.last_error,
                "remote_mta": r.remote_mta,
                "status": r.status,
            }
            for r in msg.recipients
        ],
    }
    return (json.dumps(doc, indent=1) + "\n").encode()


def _decode(msg_id: str, raw: bytes) -> QueuedMessage:
    """Parse a ``.json``; ``ValueError``/``KeyError``/``TypeError`` if it is not one of ours."""
    doc = json.loads(raw)
    if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION:
        raise ValueError("not a version 1 queue file")
    if doc["id"] != msg_id:
        raise ValueError(f"file of message {doc['id']!r}")
    recipients = tuple(_decode_recipient(r) for r in _typed(doc["recipients"], list))
    if not recipients:
        raise ValueError("no recipients")
    return QueuedMessage(
        id=msg_id,
        sender=_typed(doc["sender"], str),
        recipients=recipients,
        created=_number(doc["created"]),
        size=_typed(doc["size"], int),
        delay_warned=_typed(doc.get("delay_warned", False), bool),
        envid=_typed(doc.get("envid", ""), str),
    )


def _decode_recipient(doc: Any) -> Recipient:
    doc = _typed(doc, dict)
    return Recipient(
        address=_typed(doc["address"], str),
        state=RecipientState(doc["state"]),
        attempts=_typed(doc["attempts"], int),
        next_attempt=_number(doc["next_attempt"]),
        last_error=_typed(doc.get("last_error", ""), str),
        remote_mta=_typed(doc.get("remote_mta", ""), str),
        status=_typed(doc.get("status", ""), str),
        last_attempt=_number(doc.get("last_attempt", 0.0)),
    )


def _typed(value: Any, kind: type[_T]) -> _T:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


# -- file system helpers ------------------------------------------------------------------


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _older(path: Path, cutoff: float) -> bool:
    try:
        return path.stat(follow_symlinks=False).st_mtime < cutoff
    except FileNotFoundError:
        return False


def _remove_garbage(path: Path) -> int:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log.warning("cannot remove queue garbage %s: %s", path, _reason(exc))
        return 0
    log.info("removed queue garbage %s", path)
    return 1


def _reason(exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    code = errno.errorcode.get(exc.errno or 0, "")
    return f"{reason} ({code})" if code else reason
