"""Directory listings kept by inotify: always what os.listdir says, without listing."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

from mailroom.listings import JOURNAL_LENGTH, Listings


def _listdir(path: Path) -> frozenset[str]:
    return frozenset(n for n in os.listdir(path) if not n.startswith("."))


def _watched(tmp_path: Path, *names: str) -> tuple[Path, Listings]:
    """A cur/ directory holding empty files ``names``, held by listings of its own."""
    cur = tmp_path / "cur"
    cur.mkdir()
    for name in names:
        (cur / name).write_bytes(b"")
    listings = Listings()
    listings.hold(str(cur))
    return cur, listings


def test_names_follow_creates_renames_and_unlinks(tmp_path: Path) -> None:
    cur, listings = _watched(tmp_path, "a:2,")
    token, names = listings.names(str(cur))
    assert token is not None and names == {"a:2,"}
    assert listings.names(str(cur))[0] == token  # nothing changed: the same token
    os.rename(cur / "a:2,", cur / "a:2,S")
    (cur / "b:2,").write_bytes(b"")
    (cur / ".hidden").write_bytes(b"")
    os.link(cur / "b:2,", cur / "c:2,")
    os.unlink(cur / "b:2,")
    later, names = listings.names(str(cur))
    assert later != token
    assert names == _listdir(cur) == {"a:2,S", "c:2,"}
    listings.release(str(cur))
    assert listings.names(str(cur)) == (None, _listdir(cur))  # no longer watched: listed


def test_a_directory_replaced_at_the_path_is_listed_again(tmp_path: Path) -> None:
    cur = tmp_path / "cur"
    cur.mkdir()
    (cur / "a").write_bytes(b"")
    listings = Listings()
    listings.hold(str(cur))
    first, _ = listings.names(str(cur))
    os.rename(cur, tmp_path / "old")
    cur.mkdir()
    (cur / "b").write_bytes(b"")
    token, names = listings.names(str(cur))
    assert names == {"b"} and token != first
    (cur / "c").write_bytes(b"")  # and the new directory is watched
    assert listings.names(str(cur))[1] == {"b", "c"}
    (tmp_path / "old" / "d").write_bytes(b"")  # the old one no longer counts
    assert listings.names(str(cur))[1] == {"b", "c"}


def test_a_queue_overflow_lists_again(tmp_path: Path) -> None:
    cur = tmp_path / "cur"
    cur.mkdir()
    listings = Listings()
    listings.hold(str(cur))
    listings.names(str(cur))
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    (cur / "x").write_bytes(b"")
    for i in range(limit // 2 + 10):  # two events per rename
        os.rename(cur / ("x" if i % 2 == 0 else "y"), cur / ("y" if i % 2 == 0 else "x"))
    (cur / "z").write_bytes(b"")  # lost in the overflow
    assert listings.names(str(cur))[1] == _listdir(cur)


def _child(path: str, listings: Listings, out: multiprocessing.SimpleQueue[object]) -> None:
    (Path(path) / "from-child").write_bytes(b"")
    out.put(sorted(listings.names(path)[1]))


def test_a_forked_child_never_reads_the_parents_queue(tmp_path: Path) -> None:
    cur = tmp_path / "cur"
    cur.mkdir()
    listings = Listings()
    listings.hold(str(cur))
    listings.names(str(cur))
    fork = multiprocessing.get_context("fork")
    out: multiprocessing.SimpleQueue[object] = fork.SimpleQueue()
    child = fork.Process(target=_child, args=(str(cur), listings, out))
    child.start()
    assert out.get() == ["from-child"]
    child.join(10)
    assert listings.names(str(cur))[1] == {"from-child"}  # the parent got its event


def test_a_suspended_directory_queues_no_events_and_is_listed_again(tmp_path: Path) -> None:
    cur, other = tmp_path / "cur", tmp_path / "other"
    cur.mkdir()
    other.mkdir()
    listings = Listings()
    listings.hold(str(cur))
    listings.hold(str(other))
    token, _ = listings.names(str(cur))
    (other / "x").write_bytes(b"")  # an event of another directory, queued before
    listings.suspend(str(cur))
    for n in range(300):
        (cur / f"m{n}").write_bytes(b"")
    inotify = listings._instance()
    assert inotify is not None
    # The 300 creations made no events to read back (only the watch's removal: IN_IGNORED).
    assert [e.name for e in inotify.read()] == [""]
    later, names = listings.names(str(cur))
    assert names == _listdir(cur) and len(names) == 300
    assert later != token
    assert listings.names(str(other))[1] == {"x"}  # the other directory kept its event
    (cur / "m0").unlink()
    assert listings.names(str(cur))[1] == _listdir(cur)  # watched again


def test_changes_since_a_token_name_what_moved_and_whether_it_is_there(tmp_path: Path) -> None:
    cur, listings = _watched(tmp_path, "a")
    token, _ = listings.names(str(cur))
    assert token is not None
    assert listings.changes(str(cur), token, ["a", "zz"]) == (token, {"a": True, "zz": False})
    os.rename(cur / "a", cur / "b")
    (cur / "c").write_bytes(b"")
    os.unlink(cur / "c")  # there and gone again: still named
    told = listings.changes(str(cur), token)
    assert told is not None
    later, there = told
    assert there == {"a": False, "b": True, "c": False}
    assert later == listings.names(str(cur))[0]
    assert listings.changes(str(cur), later) == (later, {})
    # Beyond what is remembered, from another watch, or a directory replaced: cannot tell.
    for i in range(JOURNAL_LENGTH + 1):
        os.rename(cur / ("b" if i % 2 == 0 else "d"), cur / ("d" if i % 2 == 0 else "b"))
    assert listings.changes(str(cur), token) is None
    assert listings.changes(str(cur), (token[0] + 1000, token[1])) is None
    now, _ = listings.names(str(cur))
    assert now is not None and listings.changes(str(cur), now) == (now, {})
    os.rename(cur, tmp_path / "old")
    cur.mkdir()
    assert listings.changes(str(cur), now) is None
