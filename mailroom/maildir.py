"""The Maildir++ message store: crash-safe delivery into ``{mail_root}/{domain}/{localpart}/``.

What this module owns: the on-disk layout of a mailbox and the one code path that puts a
message into it. What it promises:

* **Layout.** A mailbox is a Maildir++ root (``cur/ new/ tmp/``); a folder ``Name`` is the
  subdirectory ``.Name/`` with its own ``cur/ new/ tmp/`` and an empty ``maildirfolder`` marker,
  so mutt and Dovecot read the tree as it is. Folder names are Maildir++ names as they are on
  disk: ``.`` separates hierarchy levels (``a.b`` is ``a/b``), and non-ASCII names arrive here
  already in modified UTF-7 (``mailroom.mailstore`` maps IMAP names to these). Directories are created mode 0700 and files mode
  0600 (the umask can only narrow these). Everything is created on demand and ``create`` is
  idempotent and safe to race against itself.
* **Format.** Messages arrive with CRLF line ends and are stored with LF (the Maildir
  convention and Dovecot's default). The file name is
  ``{sec}.M{usec}P{pid}R{16 hex}.{host},S={bytes on disk},W={bytes with CRLF}`` (Maildir++
  sizes, so POP3/IMAP can report wire sizes without reading the file). Files in ``new/`` carry
  no ``:2,`` info.
* **Durability.** ``deliver``/``deliver_all`` return only after the message is on stable
  storage: written to ``tmp/`` with ``O_EXCL``, fsynced, hard-linked into ``new/`` (never over
  an existing name), and ``new/`` fsynced (qmail maildir(5); OpenSMTPD ``mail.maildir``);
  deliveries into one ``new/`` at the same time share its fsyncs (``fsync_dir_shared``). A
  reader never sees a partial file in ``new/``. Any ``OSError`` becomes
  ``DeliveryError(permanent=False)`` naming the step that failed, and this call's ``tmp/``
  files are removed. A crash or error after a link may leave a copy that the retry duplicates;
  nothing acknowledged is ever lost.
* **Quota** is not checked on delivery; ``check_quota`` is for the SMTP server to call
  before it accepts a message.

The outside world is injected: ``fsync`` (to count or fail it in tests) and ``unique``
(the generator of unique names).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from mailroom.addresses import Address
from mailroom.errors import DeliveryError, QuotaExceededError

log = logging.getLogger(__name__)

SUBDIRS = ("cur", "new", "tmp")  # tmp last: a maildir with tmp/ is complete
FOLDER_MARKER = "maildirfolder"  # Maildir++: marks a folder for Courier/Dovecot
DIR_MODE = 0o700
FILE_MODE = 0o600
MAX_FOLDER_NAME = 254  # ".{folder}" is one file-name component: at most 255 bytes
LINK_ATTEMPTS = 5

# One level of a Maildir++ folder name: printable ASCII without "/" and ".", no space at the ends.
_LEVEL_RE = re.compile(r"^[!-\-0-~](?:[ -\-0-~]*[!-\-0-~])?$")
_SIZE_RE = re.compile(r",S=(\d+)")
_TMP_FLAGS = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC

FsyncFunc = Callable[[int], None]
UniqueFunc = Callable[[], str]


def escape_hostname(hostname: str) -> str:
    """The hostname as a file-name component.

    maildir(5): "/" becomes "\\057" and ":" becomes "\\072". "," also becomes "\\054" so that
    the Maildir++ ``,S=`` field that follows can always be found.
    """
    return hostname.replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")


class _ThisProcess:
    """This process's pid, a random tag and a count of names made; a forked child makes its
    own (read once, not on every delivery: both were system calls)."""

    def __init__(self) -> None:
        self.forked()

    def forked(self) -> None:
        self.pid = os.getpid()
        self.tag = secrets.token_hex(4)
        self.serial = itertools.count(1)


_this_process = _ThisProcess()
os.register_at_fork(after_in_child=_this_process.forked)


def unique_name_generator(hostname: str) -> UniqueFunc:
    """A function returning ``{sec}.M{usec}P{pid}Q{n}R{tag}.{host}`` on every call.

    maildir(5) and Dovecot: time, microseconds and pid; ``Q{n}``, the process's count of
    names made (Dovecot's delivery counter), keeps names from threads of one process in the
    same microsecond distinct; ``R{tag}``, 32 random bits drawn once per process, a later
    process that got the same pid. A forked child has its own pid, count and tag.
    """
    host = escape_hostname(hostname)
    this = _this_process

    def unique() -> str:
        now = time.time_ns()
        sec, usec = now // 1_000_000_000, now // 1_000 % 1_000_000
        return f"{sec}.M{usec}P{this.pid}Q{next(this.serial)}R{this.tag}.{host}"

    return unique


def to_lf(message: bytes) -> bytes:
    """The message with CRLF line ends turned into LF, as stored on disk."""
    return message.replace(b"\r\n", b"\n")


def wire_size(stored: bytes) -> int:
    """Size of a stored (LF) message with CRLF line ends: Maildir++ ``W=``."""
    return len(stored) + stored.count(b"\n")


def validate_folder(folder: str) -> None:
    """Refuse a Maildir++ folder name that could leave the mailbox or is malformed.

    A name is levels separated by ``.`` (``Lists.mailroom`` is ``Lists/mailroom``); each level
    is printable ASCII without ``/`` or ``.`` and without a space at either end, so no level
    is empty, ``.`` or ``..``. Non-ASCII names are stored in modified UTF-7 (RFC 3501 5.1.3),
    as Dovecot does. ``INBOX`` itself is refused (IMAP reserves it for the root), its
    sub-folders (``INBOX.x``) are not. ``""`` is INBOX, the root.
    """
    if folder == "":
        return
    if (
        len(folder) > MAX_FOLDER_NAME
        or folder.upper() == "INBOX"
        or not all(_LEVEL_RE.match(level) for level in folder.split("."))
    ):
        raise DeliveryError(
            f"invalid folder name {folder!r}: levels separated by '.', each printable ASCII"
            " without '/' and without a space at either end",
            permanent=True,
        )


def fsync_dir(path: str | Path, fsync: FsyncFunc = os.fsync) -> None:
    """fsync a directory: the names created, renamed or removed in it are on disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fsync(fd)
    finally:
        os.close(fd)


class _SharedSync:
    """The fsyncs of one directory, shared by the deliveries that need one at the same time.

    A delivery that has linked its file needs an fsync of the directory that *starts* after
    its link. While one runs, the deliveries that arrive wait for it to end and then share the
    next one (group commit): concurrent deliveries into one ``new/`` cost about two directory
    fsyncs, not one each. A failed fsync fails every delivery it or a later one was to cover.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._started = 0  # how many have started: the number of the running one
        self._finished = 0  # the number of the last one that finished
        self._running = False
        self._failed = 0  # the number of the last one that failed, and why
        self._error: tuple[int, str] = (0, "")

    def sync(self, directory: str | Path, fsync: FsyncFunc) -> None:
        """Return once an fsync of ``directory`` that started after this call has succeeded."""
        with self._changed:
            needed = self._started + 1
            while self._finished < needed:
                if not self._running:
                    self._running = True
                    self._started += 1
                    number = self._started
                    break
                self._changed.wait()
            else:
                if self._failed >= needed:
                    raise OSError(*self._error, str(directory))
                return
        error: tuple[int, str] | None = (errno.EINTR, "interrupted")
        try:
            fsync_dir(directory, fsync)
            error = None
        except OSError as exc:
            error = (exc.errno or errno.EIO, exc.strerror or str(exc))
            raise
        finally:
            with self._changed:
                self._running = False
                self._finished = number
                if error is not None:
                    self._failed, self._error = number, error
                self._changed.notify_all()


_shared_syncs: dict[str, _SharedSync] = {}
_shared_syncs_lock = threading.Lock()
os.register_at_fork(after_in_child=_shared_syncs.clear)  # a child's locks start free


def fsync_dir_shared(path: str | Path, fsync: FsyncFunc = os.fsync) -> None:
    """``fsync_dir`` for a directory that many threads of this process write to at once."""
    key = os.fspath(path)
    shared = _shared_syncs.get(key)
    if shared is None:
        with _shared_syncs_lock:
            shared = _shared_syncs.setdefault(key, _SharedSync())
    shared.sync(path, fsync)


def write_file(
    path: Path,
    data: bytes,
    mode: int,
    *,
    replace: bool = True,
    owner: tuple[int, int] | None = None,
    fsync: FsyncFunc = os.fsync,
) -> None:
    """Put ``data`` at ``path`` crash-safe: a tmp file with its final mode (and ``owner``,
    when root) from the start, fsync, rename over ``path`` (or, with ``replace=False``,
    link: ``FileExistsError`` if ``path`` exists), fsync the directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            if owner is not None and os.geteuid() == 0:
                os.fchown(fd, *owner)
            os.fchmod(fd, mode)
            _write_all(fd, data)
            fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(path.parent, fsync)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _failed(root: Path, step: str, exc: OSError) -> DeliveryError:
    """A temporary ``DeliveryError`` that says which step failed and why (ENOSPC, EDQUOT...)."""
    reason = exc.strerror or str(exc)
    code = errno.errorcode.get(exc.errno or 0, "")
    detail = f"{reason} ({code})" if code else reason
    return DeliveryError(f"cannot store message in {root}: {step} failed: {detail}")


class Maildir:
    """One mailbox: a Maildir++ root and its folders."""

    def __init__(
        self,
        root: Path,
        hostname: str,
        *,
        fsync: FsyncFunc = os.fsync,
        unique: UniqueFunc | None = None,
    ) -> None:
        self.root = root
        self.hostname = hostname
        self.fsync = fsync
        self.unique = unique or unique_name_generator(hostname)

    def __repr__(self) -> str:
        return f"Maildir({str(self.root)!r})"

    @classmethod
    def for_address(
        cls,
        mail_root: Path,
        address: Address,
        hostname: str,
        *,
        fsync: FsyncFunc = os.fsync,
    ) -> Maildir:
        """The mailbox of ``address``: ``{mail_root}/{domain}/{localpart}``.

        Refuses (permanently) a path that does not resolve to exactly two levels below
        ``mail_root``; ``Address`` already guarantees safe components, this is the backstop.
        """
        root = mail_root / address.domain / address.localpart
        base = mail_root.resolve()
        resolved = root.resolve()
        if not resolved.is_relative_to(base) or len(resolved.relative_to(base).parts) != 2:
            raise DeliveryError(f"mailbox path for {address} leaves {mail_root}", permanent=True)
        return cls(root, hostname, fsync=fsync)

    def folder_path(self, folder: str = "") -> Path:
        """The Maildir++ directory of ``folder`` (``""`` is INBOX, the root)."""
        validate_folder(folder)
        return self.root / f".{folder}" if folder else self.root

    def create(self, folder: str = "") -> None:
        """Create the mailbox and ``folder`` if missing, durably; idempotent."""
        path = self.folder_path(folder)
        if folder:
            self.create()
        try:
            changed = self._make_dirs(path)
            for sub in SUBDIRS:
                if make_dir(path / sub):
                    changed.add(path)
            if folder and _create_empty(path / FOLDER_MARKER):
                changed.add(path)
            # A new directory entry is durable only once its parent is fsynced.
            for directory in sorted(changed, key=lambda p: len(p.parts), reverse=True):
                fsync_dir(directory, self.fsync)
        except OSError as exc:
            raise _failed(self.root, f"creating {path}", exc) from exc

    def _make_dirs(self, path: Path) -> set[Path]:
        """mkdir ``path`` and missing ancestors; return the parents whose entries changed."""
        missing: list[Path] = []
        probe = path
        while not probe.is_dir():
            missing.append(probe)
            if probe.parent == probe:
                break
            probe = probe.parent
        changed: set[Path] = set()
        for directory in reversed(missing):
            if make_dir(directory):
                changed.add(directory.parent)
        return changed

    def usage_bytes(self) -> int:
        """Bytes used by messages in ``cur/`` and ``new/`` of the root and every folder.

        Reads the Maildir++ ``S=`` from each name and stats only files without one. Not
        atomic: a message moved from ``new/`` to ``cur/`` meanwhile may count twice, never
        zero times (``new/`` is listed first).
        """
        total = 0
        for directory in self._message_dirs():
            try:
                entries = list(os.scandir(directory))
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                match = _SIZE_RE.search(entry.name.partition(":")[0])
                if match:
                    total += int(match.group(1))
                    continue
                with contextlib.suppress(FileNotFoundError):  # moved or expunged meanwhile
                    total += entry.stat(follow_symlinks=False).st_size
        return total

    def _message_dirs(self) -> Iterator[Path]:
        folders = [self.root]
        try:
            with os.scandir(self.root) as it:
                folders += [Path(e.path) for e in it if e.name.startswith(".") and e.is_dir()]
        except FileNotFoundError:
            return
        for folder in folders:
            yield folder / "new"
            yield folder / "cur"

    def deliver(self, message: bytes, folder: str = "") -> Path:
        """Store ``message`` (CRLF line ends) durably in ``folder``; return its path in new/."""
        return deliver_all([(self, folder)], message)[0]


def make_dir(path: Path) -> bool:
    """mkdir mode 0700; False if a directory is already there (races are fine)."""
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        if not path.is_dir():
            raise NotADirectoryError(
                errno.ENOTDIR, "exists and is not a directory", str(path)
            ) from None
        return False
    return True


def _create_empty(path: Path) -> bool:
    """Create an empty file mode 0600 unless it exists; True if created."""
    try:
        fd = os.open(path, _TMP_FLAGS, FILE_MODE)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def _write_tmp(
    maildir: Maildir, folder_dir: str, name: str, data: bytes, mtime: float | None = None
) -> str:
    """Write ``data`` to ``tmp/name`` (mtime set if given), fsync and close; removed on failure."""
    tmp = f"{folder_dir}/tmp/{name}"
    fd = os.open(tmp, _TMP_FLAGS, FILE_MODE)
    try:
        _write_all(fd, data)
        if mtime is not None:
            os.utime(fd, (mtime, mtime))
        maildir.fsync(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        _unlink_quietly(tmp)
        raise
    try:
        os.close(fd)  # NFS and some FUSE file systems report write errors only here
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def _link_new(maildir: Maildir, folder_dir: str, tmp: str, suffix: str) -> str:
    """Hard-link ``tmp`` into ``new/`` under a name not yet taken; never overwrite."""
    name = tmp.rpartition("/")[2]
    for _ in range(LINK_ATTEMPTS):
        target = f"{folder_dir}/new/{name}"
        try:
            os.link(tmp, target, follow_symlinks=False)
        except FileExistsError:
            name = maildir.unique() + suffix
            continue
        return target
    raise FileExistsError(errno.EEXIST, f"no unused name after {LINK_ATTEMPTS} attempts", tmp)


def _unlink_quietly(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)


def deliver_all(
    targets: Sequence[tuple[Maildir, str]],
    message: bytes,
    *,
    mtime: float | None = None,
    stored: bytes | None = None,
) -> list[Path]:
    """Store one message (CRLF line ends) in every ``(maildir, folder)``; paths in new/.

    ``mtime`` (seconds since the epoch) becomes the files' modification time before they are
    fsynced: IMAP APPEND's internal date, which Maildir readers take from the mtime.
    ``stored`` is ``to_lf(message)`` when the caller has made it already (the SMTP servers,
    which know there is no bare CR: deleting every CR is then a quarter of the work).

    Each target gets its own file (no inode shared between mailboxes). All files are written
    and fsynced before the first link, so an error while writing leaves no copy anywhere; then
    each is linked into ``new/`` and each distinct ``new/`` directory is fsynced once (that
    fsync shared with other threads delivering there at the same time). On error
    the ``tmp/`` files of this call are removed and ``DeliveryError(permanent=False)`` raised;
    copies already linked are removed again, so that the error means what it says (nothing
    stored) and a retry leaves no second copy (a crash in between may: duplicated, never
    lost). Duplicate recipients are the caller's to remove.
    """
    for _, folder in targets:
        validate_folder(folder)
    if stored is None:
        stored = to_lf(message)
    suffix = f",S={len(stored)},W={wire_size(stored)}"  # Maildir++ sizes
    # Paths are strings here: pathlib's joins were a fifth of a delivery's Python.
    pending: list[tuple[Maildir, str, str]] = []  # (maildir, folder dir, tmp file)
    try:
        for maildir, folder in targets:
            folder_dir = os.fspath(maildir.folder_path(folder))
            tmp = _write_tmp_on_demand(maildir, folder, folder_dir, suffix, stored, mtime)
            pending.append((maildir, folder_dir, tmp))
        delivered: list[str] = []
        to_sync: dict[str, Maildir] = {}
        while pending:
            maildir, folder_dir, tmp = pending[0]
            try:
                delivered.append(_link_new(maildir, folder_dir, tmp, suffix))
            except OSError as exc:
                _take_back(delivered)
                name = tmp.rpartition("/")[2]
                raise _failed(maildir.root, f"linking tmp/{name} into new/", exc) from exc
            pending.pop(0)
            _unlink_quietly(tmp)
            to_sync.setdefault(f"{folder_dir}/new", maildir)
        for directory, maildir in to_sync.items():
            try:
                fsync_dir_shared(directory, maildir.fsync)
            except OSError as exc:
                _take_back(delivered)
                raise _failed(maildir.root, f"fsync of {directory}", exc) from exc
    finally:
        for _, _, tmp in pending:
            _unlink_quietly(tmp)
    return [Path(path) for path in delivered]


def _take_back(linked: list[str]) -> None:
    """Remove the copies a failed delivery had linked into ``new/`` (best effort)."""
    for path in linked:
        _unlink_quietly(path)


def _write_tmp_on_demand(
    maildir: Maildir,
    folder: str,
    folder_dir: str,
    suffix: str,
    data: bytes,
    mtime: float | None = None,
) -> str:
    """``_write_tmp`` under a fresh unique name, creating the mailbox or folder if missing."""
    name = maildir.unique() + suffix
    try:
        for _ in range(LINK_ATTEMPTS):
            try:
                return _write_tmp(maildir, folder_dir, name, data, mtime)
            except FileNotFoundError:
                maildir.create(folder)
                return _write_tmp(maildir, folder_dir, name, data, mtime)
            except FileExistsError:  # maildir(5): a name in use means try another
                name = maildir.unique() + suffix
        raise FileExistsError(errno.EEXIST, f"no unused name after {LINK_ATTEMPTS} attempts")
    except OSError as exc:
        raise _failed(maildir.root, f"writing tmp/{name}", exc) from exc


def check_quota(maildir: Maildir, quota_bytes: int, incoming_size: int) -> None:
    """Raise ``QuotaExceededError`` if ``incoming_size`` more bytes would exceed the quota.

    ``quota_bytes`` 0 means unlimited. ``incoming_size`` may be the wire (CRLF) size: it is
    an upper bound of the stored size. RFC 3463 5.2.2: mailbox full.
    """
    if quota_bytes <= 0:
        return
    used = maildir.usage_bytes()
    if used + incoming_size > quota_bytes:
        raise QuotaExceededError(
            f"mailbox is full: {used} of {quota_bytes} bytes used, message is {incoming_size} bytes"
        )
