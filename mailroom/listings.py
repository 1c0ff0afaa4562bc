"""The names in Maildir directories, kept current by inotify(7) instead of listed again.

What this module owns: one inotify instance per process (made on first use, made again in a
forked child, which must never read its parent's queue), a watch per directory some store
holds, and for each such directory the set of its names (those not starting with ``.``).

What it promises: ``Listings.names(path)`` is what ``os.listdir`` would give now, without
listing when the directory is watched. The watch is added before the one listing, and every
event since is applied in order; each event fixes a name's presence outright (created or
moved in: there; deleted or moved out: gone), so the last event for a name decides, whatever
the listing saw. A queue overflow, a watch the kernel dropped, or a directory moved, removed
or replaced (another inode at the path) makes the directory listed again. Without inotify
(no instance or no watch left) it lists every time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import itertools
import logging
import os
import struct
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)

_IN_CREATE = 0x00000100
_IN_DELETE = 0x00000200
_IN_MOVED_FROM = 0x00000040
_IN_MOVED_TO = 0x00000080
_IN_DELETE_SELF = 0x00000400
_IN_MOVE_SELF = 0x00000800
_IN_Q_OVERFLOW = 0x00004000
_IN_IGNORED = 0x00008000
_IN_ONLYDIR = 0x01000000
_MASK = _IN_CREATE | _IN_DELETE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_DELETE_SELF | _IN_MOVE_SELF
_EVENT = struct.Struct("iIII")


_SERIALS = itertools.count(1)


@dataclass
class _Dir:
    path: str
    wd: int
    ident: tuple[int, int]  # (st_dev, st_ino) of the directory watched
    names: set[str]
    users: int
    serial: int  # never the same for two watches: tokens of different watches differ
    generation: int = 0  # grows with every change to ``names``
    frozen: tuple[int, frozenset[str]] | None = None  # ``names`` of one generation
    broken: bool = False  # the watch no longer tells the truth: list again


def _listdir(path: str) -> list[str]:
    try:
        return [name for name in os.listdir(path) if not name.startswith(".")]
    except FileNotFoundError:
        return []


class Listings:
    """Watched directory listings for the stores of one process (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = -1
        self._fd = -1
        self._dirs: dict[str, _Dir] = {}
        self._by_wd: dict[int, _Dir] = {}
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._init = libc.inotify_init1
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._rm = libc.inotify_rm_watch
        self._rm.argtypes = [ctypes.c_int, ctypes.c_int]

    def _instance(self) -> int:
        """The inotify fd of this process (-1 if none can be had)."""
        if self._pid != os.getpid():  # first use, or a forked child: start afresh
            self._pid = os.getpid()
            self._dirs.clear()
            self._by_wd.clear()
            self._fd = self._init(os.O_NONBLOCK | os.O_CLOEXEC)
            if self._fd < 0:
                log.warning(
                    "inotify_init1: %s; listing directories", os.strerror(ctypes.get_errno())
                )
        return self._fd

    def hold(self, path: str) -> None:
        """Watch ``path`` for a store until ``release``; no-op without inotify."""
        with self._lock:
            self._instance()
            entry = self._dirs.get(path)
            if entry is not None:
                entry.users += 1
            else:
                self._watch_locked(path, 1)

    def _watch_locked(self, path: str, users: int) -> _Dir | None:
        if self._fd < 0:
            return None
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        wd = self._add(self._fd, os.fsencode(path), _MASK | _IN_ONLYDIR)
        if wd < 0:
            log.info("inotify_add_watch %s: %s", path, os.strerror(ctypes.get_errno()))
            return None
        # Events from here on are queued: the listing comes after the watch.
        entry = _Dir(path, wd, (st.st_dev, st.st_ino), set(_listdir(path)), users, next(_SERIALS))
        old = self._by_wd.get(wd)
        if old is not None:  # the same directory under another path: one entry per watch
            old.broken = True
        self._dirs[path] = entry
        self._by_wd[wd] = entry
        return entry

    def release(self, path: str) -> None:
        with self._lock:
            entry = self._dirs.get(path) if self._pid == os.getpid() else None
            if entry is None:
                return
            entry.users -= 1
            if entry.users <= 0:
                self._forget_locked(entry)

    def _forget_locked(self, entry: _Dir) -> None:
        if self._dirs.get(entry.path) is entry:
            del self._dirs[entry.path]
        if self._by_wd.get(entry.wd) is entry:
            del self._by_wd[entry.wd]
            self._rm(self._fd, entry.wd)

    def names(self, path: str) -> tuple[tuple[int, int] | None, frozenset[str]]:
        """(a token equal to an earlier one only while the names are equal, or None when
        not watched; the names now)."""
        with self._lock:
            entry = self._dirs.get(path) if self._pid == os.getpid() else None
            if entry is None:
                return None, frozenset(_listdir(path))
            self._drain()
            try:
                st = os.stat(path)
                ident = (st.st_dev, st.st_ino)
            except FileNotFoundError:
                ident = (-1, -1)
            if entry.broken or ident != entry.ident:
                users = entry.users
                self._forget_locked(entry)
                replaced = self._watch_locked(path, users)
                if replaced is None:
                    return None, frozenset(_listdir(path))
                entry = replaced
            if entry.frozen is None or entry.frozen[0] != entry.generation:
                entry.frozen = (entry.generation, frozenset(entry.names))
            return (entry.serial, entry.generation), entry.frozen[1]

    def _drain(self) -> None:
        """Apply every queued event (call with the lock held)."""
        while True:
            try:
                data = os.read(self._fd, 256 * 1024)
            except BlockingIOError:
                return
            except OSError as err:
                if err.errno == errno.EINTR:
                    continue
                raise
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                raw = data[offset + _EVENT.size : offset + _EVENT.size + length]
                offset += _EVENT.size + length
                if mask & _IN_Q_OVERFLOW:
                    for watched in self._dirs.values():
                        watched.broken = True
                    continue
                entry = self._by_wd.get(wd)
                if entry is None:
                    continue
                if mask & (_IN_IGNORED | _IN_DELETE_SELF | _IN_MOVE_SELF):
                    entry.broken = True
                    continue
                name = os.fsdecode(raw.rstrip(b"\0"))
                if not name or name.startswith("."):
                    continue
                if mask & (_IN_CREATE | _IN_MOVED_TO):
                    if name not in entry.names:
                        entry.names.add(name)
                        entry.generation += 1
                elif mask & (_IN_DELETE | _IN_MOVED_FROM) and name in entry.names:
                    entry.names.discard(name)
                    entry.generation += 1


LISTINGS = Listings()  # the one of this process
