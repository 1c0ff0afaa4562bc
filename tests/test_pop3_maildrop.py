"""The POP3 view of a mailbox: the session lock, the snapshot, removal of exactly the DELE'd."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mailroom.errors import MailboxInUseError
from mailroom.mailstore import Snapshot
from mailroom.pop3.maildrop import LOCK_NAME, StoreMaildrop, lock_mailbox
from tests.pop3_fake_store import FakeStore


def filled(count: int = 3) -> FakeStore:
    store = FakeStore()
    for i in range(count):
        store.add(f"Subject: {i}\r\n\r\nbody {i}\r\n".encode())
    return store


def test_second_open_is_in_use_until_the_first_closes(tmp_path: Path) -> None:
    first_store = filled()
    first = StoreMaildrop.open(tmp_path, lambda: first_store)
    opened: list[FakeStore] = []

    def second() -> FakeStore:
        opened.append(filled())
        return opened[-1]

    with pytest.raises(MailboxInUseError):
        StoreMaildrop.open(tmp_path, second)
    assert opened == []  # refused before the store is even opened
    first.close()
    assert first_store.closed
    StoreMaildrop.open(tmp_path, filled).close()
    assert (tmp_path / LOCK_NAME).stat().st_mode & 0o777 == 0o600


def test_lock_is_held_against_other_processes_and_dies_with_them(tmp_path: Path) -> None:
    code = (
        "import sys, time; from pathlib import Path; from mailroom.pop3.maildrop import lock_mailbox;"
        f"lock_mailbox(Path({str(tmp_path)!r})); print('locked', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"locked\n"
        with pytest.raises(MailboxInUseError):
            lock_mailbox(tmp_path)
    finally:
        proc.kill()
        proc.wait()
    os.close(lock_mailbox(tmp_path))  # the kernel released the dead process's lock


def test_snapshot_is_fixed_at_open(tmp_path: Path) -> None:
    store = filled()
    maildrop = StoreMaildrop.open(tmp_path, lambda: store)
    store.add(b"Subject: late\r\n\r\n")
    assert [m.uid for m in maildrop.messages] == [1, 2, 3]
    assert maildrop.read(2) == b"Subject: 1\r\n\r\nbody 1\r\n"
    maildrop.close()


def test_remove_ignores_imap_deleted_flags(tmp_path: Path) -> None:
    store = filled(4)
    store.store("INBOX", [4], "+", {"\\Deleted"})
    maildrop = StoreMaildrop.open(tmp_path, lambda: store)
    assert maildrop.remove([1, 3]) == [1, 3]
    maildrop.close()
    assert [m.uid for m in store.sync("INBOX").messages] == [2, 4]


def test_failed_snapshot_releases_the_lock(tmp_path: Path) -> None:
    class Broken(FakeStore):
        def sync(self, name: str) -> Snapshot:
            raise OSError("index unreadable")

    broken = Broken()
    with pytest.raises(OSError):
        StoreMaildrop.open(tmp_path, lambda: broken)
    assert broken.closed
    StoreMaildrop.open(tmp_path, filled).close()

    def unopenable() -> FakeStore:
        raise OSError("permission denied")

    with pytest.raises(OSError):
        StoreMaildrop.open(tmp_path, unopenable)
    StoreMaildrop.open(tmp_path, filled).close()
