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

import collections
import itertools
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from mailroom.inotify import (
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_ONLYDIR,
    IN_Q_OVERFLOW,
    Inotify,
)

log = logging.getLogger(__name__)

JOURNAL_LENGTH = 1024  # changes remembered per directory, for Listings.changes
_MASK = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF


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
    # The latest changes, (generation, name) oldest first; every change after generation
    # ``journal_floor`` is in it.
    journal: collections.deque[tuple[int, str]] = field(default_factory=collections.deque)
    journal_floor: int = 0

    def changed(self, name: str) -> None:
        """Count a change to ``names`` (``name`` added or removed) and remember it."""
        self.generation += 1
        self.journal.append((self.generation, name))
        if len(self.journal) > JOURNAL_LENGTH:
            self.journal_floor = self.journal.popleft()[0]


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
        self._inotify: Inotify | None = None
        self._dirs: dict[str, _Dir] = {}
        self._by_wd: dict[int, _Dir] = {}

    def _instance(self) -> Inotify | None:
        """The inotify instance of this process (None if none can be had)."""
        if self._pid != os.getpid():  # first use, or a forked child: start afresh
            self._pid = os.getpid()
            self._dirs.clear()
            self._by_wd.clear()
            try:
                self._inotify = Inotify()
            except OSError as err:
                self._inotify = None
                log.warning("%s; listing directories", err)
        return self._inotify

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
        if self._inotify is None:
            return None
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        try:
            wd = self._inotify.add_watch(path, _MASK | IN_ONLYDIR)
        except OSError as err:
            log.info("%s", err)
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

    def suspend(self, path: str) -> None:
        """Stop watching ``path`` until its next ``names``, which lists it afresh: for a
        caller about to change thousands of names at once (reading their events back one
        by one costs more than one listing)."""
        with self._lock:
            entry = self._dirs.get(path) if self._pid == os.getpid() else None
            if entry is None or entry.broken:
                return
            self._drain()  # events of other directories stay in order
            entry.broken = True
            if self._by_wd.get(entry.wd) is entry and self._inotify is not None:
                del self._by_wd[entry.wd]
                self._inotify.rm_watch(entry.wd)

    def _forget_locked(self, entry: _Dir) -> None:
        if self._dirs.get(entry.path) is entry:
            del self._dirs[entry.path]
        if self._by_wd.get(entry.wd) is entry:
            del self._by_wd[entry.wd]
            if self._inotify is not None:
                self._inotify.rm_watch(entry.wd)

    def names(self, path: str) -> tuple[tuple[int, int] | None, frozenset[str]]:
        """(a token equal to an earlier one only while the names are equal, or None when
        not watched; the names now)."""
        with self._lock:
            entry = self._dirs.get(path) if self._pid == os.getpid() else None
            if entry is None:
                return None, frozenset(_listdir(path))
            if self._stale(entry):
                users = entry.users
                self._forget_locked(entry)
                replaced = self._watch_locked(path, users)
                if replaced is None:
                    return None, frozenset(_listdir(path))
                entry = replaced
            if entry.frozen is None or entry.frozen[0] != entry.generation:
                entry.frozen = (entry.generation, frozenset(entry.names))
            return (entry.serial, entry.generation), entry.frozen[1]

    def changes(
        self, path: str, token: tuple[int, int], names: Iterable[str] = ()
    ) -> tuple[tuple[int, int], dict[str, bool]] | None:
        """What ``names(path)`` would tell about the names that matter, without a copy of all
        of them: (the token now, whether each name added or removed since ``token`` and each of
        ``names`` is there now); None when that cannot be told (the directory is not watched
        as it was at ``token``, or ``token`` is older than the changes remembered)."""
        with self._lock:
            entry = self._dirs.get(path) if self._pid == os.getpid() else None
            if entry is None or entry.serial != token[0] or self._stale(entry):
                return None
            if token[1] < entry.journal_floor or token[1] > entry.generation:
                return None
            since: set[str] = set(names)
            for generation, name in reversed(entry.journal):
                if generation <= token[1]:
                    break
                since.add(name)
            return (entry.serial, entry.generation), {n: n in entry.names for n in since}

    def _stale(self, entry: _Dir) -> bool:
        """Apply the queued events; whether ``entry`` no longer tells the truth about its
        path (the watch broke, or another directory is there now). Call with the lock held."""
        self._drain()
        try:
            st = os.stat(entry.path)
            ident = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            ident = (-1, -1)
        return entry.broken or ident != entry.ident

    def _drain(self) -> None:
        """Apply every queued event (call with the lock held)."""
        if self._inotify is None:
            return
        for event in self._inotify.read():
            if event.mask & IN_Q_OVERFLOW:
                for watched in self._dirs.values():
                    watched.broken = True
                continue
            entry = self._by_wd.get(event.wd)
            if entry is None:
                continue
            if event.mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF):
                entry.broken = True
                continue
            name = event.name
            if not name or name.startswith("."):
                continue
            if event.mask & (IN_CREATE | IN_MOVED_TO):
                if name not in entry.names:
                    entry.names.add(name)
                    entry.changed(name)
            elif event.mask & (IN_DELETE | IN_MOVED_FROM) and name in entry.names:
                entry.names.discard(name)
                entry.changed(name)


LISTINGS = Listings()  # the one of this process
