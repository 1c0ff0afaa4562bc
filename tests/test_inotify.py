"""The inotify watcher: deliveries, renames and unlinks wake the interested keys only."""

from __future__ import annotations

import os
import select
from pathlib import Path

from mailroom.inotify import Watcher


def _wait(watcher: Watcher) -> set[object]:
    ready, _, _ = select.select([watcher.fd], [], [], 2)
    assert ready, "no inotify event within 2 s"
    return set(watcher.read())


def test_events_reach_their_keys(tmp_path: Path) -> None:
    new, cur = tmp_path / "new", tmp_path / "cur"
    new.mkdir()
    cur.mkdir()
    watcher = Watcher()
    try:
        watcher.watch(new, "a")
        watcher.watch(cur, "b")
        (tmp_path / "x").write_bytes(b"m")
        os.link(tmp_path / "x", new / "x")
        assert _wait(watcher) == {"a"}
        os.rename(new / "x", cur / "x:2,")
        assert _wait(watcher) == {"a", "b"}
        watcher.forget("b")
        os.unlink(cur / "x:2,")
        assert select.select([watcher.fd], [], [], 0.3)[0] == [] or watcher.read() == set()
    finally:
        watcher.close()
