"""Linux inotify(7) through libc, for knowing within milliseconds when a Maildir changes.

``Inotify`` is one inotify instance: add and remove watches, read the queued events without
blocking. ``Watcher`` builds on it for the IMAP server: ``watch(path, key)`` asks for events
in a directory on behalf of ``key`` (a connection), ``forget(key)`` drops them, and ``read()``
returns the keys whose directories changed since the last call; its ``fd`` goes into the
asyncio loop with ``add_reader``. ``mailroom.listings`` builds on ``Inotify`` too. No polling.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
# Deliveries link into new/, flag changes rename in cur/, expunges unlink.
MAILDIR_CHANGES = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_CLOSE_WRITE
_EVENT = struct.Struct("iIII")


@dataclass(frozen=True, slots=True)
class Event:
    """One inotify event: the watch it belongs to, its mask, and the name in the directory."""

    wd: int
    mask: int
    name: str


class Inotify:
    """One inotify instance (non-blocking, close-on-exec); raises OSError if the kernel refuses."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._rm = libc.inotify_rm_watch
        self._rm.argtypes = [ctypes.c_int, ctypes.c_int]
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd: int = fd

    def add_watch(self, path: str | Path, mask: int) -> int:
        wd = int(self._add(self.fd, os.fsencode(path), mask))
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
        return wd

    def rm_watch(self, wd: int) -> None:
        self._rm(self.fd, wd)

    def read(self) -> list[Event]:
        """Every event queued now, in order (an empty list when there is none)."""
        events: list[Event] = []
        while True:
            try:
                data = os.read(self.fd, 256 * 1024)
            except BlockingIOError:
                return events
            except OSError as err:
                if err.errno == errno.EINTR:
                    continue
                raise
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                raw = data[offset + _EVENT.size : offset + _EVENT.size + length]
                offset += _EVENT.size + length
                events.append(Event(wd, mask, os.fsdecode(raw.rstrip(b"\0"))))

    def close(self) -> None:
        os.close(self.fd)


class Watcher:
    """An inotify instance mapping watched directories to interested keys."""

    def __init__(self) -> None:
        self._inotify = Inotify()
        self.fd = self._inotify.fd
        self._keys: dict[int, set[Hashable]] = {}  # watch descriptor -> keys
        self._wds: dict[Hashable, set[int]] = {}  # key -> watch descriptors

    def watch(self, path: Path, key: Hashable) -> None:
        wd = self._inotify.add_watch(path, MAILDIR_CHANGES)
        self._keys.setdefault(wd, set()).add(key)
        self._wds.setdefault(key, set()).add(wd)

    def forget(self, key: Hashable) -> None:
        for wd in self._wds.pop(key, set()):
            keys = self._keys.get(wd)
            if keys is None:
                continue
            keys.discard(key)
            if not keys:
                del self._keys[wd]
                self._inotify.rm_watch(wd)

    def read(self) -> set[Hashable]:
        """Keys whose directories saw an event since the last call (drains the queue)."""
        changed: set[Hashable] = set()
        for event in self._inotify.read():
            changed |= self._keys.get(event.wd, set())
            if event.mask & IN_IGNORED:  # the directory went away
                for key in self._keys.pop(event.wd, set()):
                    self._wds.get(key, set()).discard(event.wd)
        return changed

    def close(self) -> None:
        self._inotify.close()
