"""mailroom.imapd.SharedStores: one MailStore per user in a process, and a limit on a user's
sessions that holds across the service's worker processes (an flock per session slot).

Two SharedStores in this process stand for two workers: flocks taken through separate
opens of a file exclude each other exactly as they do between processes.
"""

from __future__ import annotations

import os
import signal
import time
import traceback
from pathlib import Path

import pytest

from mailroom.errors import ConnectionLimitError, StoreError
from mailroom.imapd import SharedStores
from mailroom.maildir import Maildir

ALICE = "alice@example.test"
DEADLINE = 8.0


def alice(tmp_path: Path) -> Maildir:
    return Maildir(tmp_path / "example.test" / "alice", "host")


def test_the_session_limit_holds_across_workers(tmp_path: Path) -> None:
    maildir = alice(tmp_path)
    first, second = SharedStores(2), SharedStores(2)
    one = first.open(maildir, ALICE, 0)
    two = second.open(maildir, ALICE, 0)
    for stores in (first, second):
        with pytest.raises(ConnectionLimitError):
            stores.open(maildir, ALICE, 0)
    bob = first.open(Maildir(tmp_path / "example.test" / "bob", "host"), "bob@example.test", 0)
    one.close()  # frees its slot for either worker
    three = second.open(maildir, ALICE, 0)
    assert three is two
    with pytest.raises(ConnectionLimitError):
        first.open(maildir, ALICE, 0)
    for store in (two, three, bob):
        store.close()
    first.open(maildir, ALICE, 0).close()


def test_a_killed_process_gives_its_slot_back(tmp_path: Path) -> None:
    maildir = alice(tmp_path)
    ready = tmp_path / "ready"
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            SharedStores(1).open(maildir, ALICE, 0)
            ready.touch()
            time.sleep(DEADLINE)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    stores = SharedStores(1)
    try:
        deadline = time.monotonic() + DEADLINE
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ready.exists()
        with pytest.raises(ConnectionLimitError):
            stores.open(maildir, ALICE, 0)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    stores.open(maildir, ALICE, 0).close()  # the kernel dropped the dead process's flock


def test_a_shared_store_closes_with_its_last_session(tmp_path: Path) -> None:
    maildir = alice(tmp_path)
    stores = SharedStores(3)
    first = stores.open(maildir, ALICE, 0)
    second = stores.open(maildir, ALICE, 0)
    assert second is first
    first.close()
    assert second.status("INBOX").messages == 0  # still open for the other session
    assert stores.open(maildir, ALICE, 0) is first  # and still the one given out
    second.close()
    first.close()
    with pytest.raises(StoreError, match="closed"):
        first.status("INBOX")
    again = stores.open(maildir, ALICE, 0)
    assert again is not first
    assert again.status("INBOX").messages == 0
    again.close()
