"""Linux inotify(7) through libc: know within milliseconds when a Maildir directory changes.

One ``Watcher`` per process; its file descriptor goes into the asyncio loop with
``add_reader``. ``watch(path, key)`` asks for events in a directory on behalf of ``key``
(an IMAP connection), ``forget(key)`` drops them, and ``read()`` returns the keys whose
directories changed since the last call. No polling anywhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from collections.abc import Hashable
from pathlib import Path

IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
# Deliveries link into new/, flag changes rename in cur/, expunges unlink.
IN_MASK = (
    0x00000100  # IN_CREATE
    | 0x00000200  # IN_DELETE
    | 0x00000040  # IN_MOVED_FROM
    | 0x00000080  # IN_MOVED_TO
    | 0x00000008  # IN_CLOSE_WRITE
)
IN_IGNORED = 0x00008000
_EVENT = struct.Struct("iIII")


class Watcher:
    """An inotify instance mapping watched directories to interested keys."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._rm = libc.inotify_rm_watch
        self._rm.argtypes = [ctypes.c_int, ctypes.c_int]
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd: int = fd
        self._keys: dict[int, set[Hashable]] = {}  # watch descriptor -> keys
        self._wds: dict[Hashable, set[int]] = {}  # key -> watch descriptors

    def watch(self, path: Path, key: Hashable) -> None:
        wd = self._add(self.fd, os.fsencode(path), IN_MASK)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
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
                self._rm(self.fd, wd)

    def read(self) -> set[Hashable]:
        """Keys whose directories saw an event since the last call (drains the queue)."""
        changed: set[Hashable] = set()
        while True:
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                return changed
            except OSError as err:
                if err.errno == errno.EINTR:
                    continue
                raise
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size + length
                changed |= self._keys.get(wd, set())
                if mask & IN_IGNORED:  # the directory went away
                    for key in self._keys.pop(wd, set()):
                        self._wds.get(key, set()).discard(wd)

    def close(self) -> None:
        os.close(self.fd)
