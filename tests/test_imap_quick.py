"""Commands the IMAP server runs on its event loop: ``IMAPSession.quick`` and
``MailStore.hold_if_current`` decide, and a quick command never waits for another thread."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from mailroom.imap.session import IMAPSession
from mailroom.maildir import Maildir
from mailroom.mailstore import MailStore
from tests.imap_transcript import conversation, message


@pytest.fixture
def store(tmp_path: Path) -> MailStore:
    maildir = Maildir(tmp_path / "mail", "mail.example.test")
    maildir.create()
    maildir.deliver(message("one"))
    return MailStore(maildir)


def selected(store: MailStore) -> IMAPSession:
    session = conversation(store).session
    assert b"S1 OK [READ-WRITE]" in session.feed(b"S1 SELECT INBOX\r\n").data
    return session


def test_a_current_mailbox_is_held_until_released(store: MailStore) -> None:
    store.sync("INBOX")
    assert store.hold_if_current("INBOX")
    got: list[bool] = []
    other = threading.Thread(target=lambda: got.append(store.hold_if_current("INBOX")))
    other.start()
    other.join()
    assert got == [False]  # another thread never gets it meanwhile, and never waits
    store.release_hold()
    other = threading.Thread(target=lambda: got.append(store.hold_if_current("INBOX")))
    other.start()
    other.join()
    assert got == [False, True]


def test_new_mail_or_a_busy_store_means_not_current(store: MailStore) -> None:
    assert not store.hold_if_current("INBOX")  # never synced: nothing in memory
    store.sync("INBOX")
    store.maildir.deliver(message("two"))
    assert not store.hold_if_current("INBOX")
    store.sync("INBOX")
    busy = threading.Event()
    done = threading.Event()

    def occupy() -> None:
        with store._lock:  # another session in the middle of a store call
            busy.set()
            done.wait(5)

    thread = threading.Thread(target=occupy)
    thread.start()
    busy.wait(5)
    try:
        assert not store.hold_if_current("INBOX")
    finally:
        done.set()
        thread.join()


@pytest.mark.parametrize(
    ("line", "quick"),
    [
        (b"a NOOP\r\n", True),
        (b"a noop\r\n", True),
        (b"a IDLE\r\n", True),
        (b"a CAPABILITY\r\n", True),
        (b"a FETCH 1 FLAGS\r\n", False),  # reads the disk: a worker thread
        (b"a LOGIN x y\r\n", False),  # a password hash
        (b"a NOOP", False),  # not a whole line yet
        (b"a NOOP\r\nb NOOP\r\n", False),  # more than one command
        (b"a APPEND INBOX {3}\r\n", False),  # a literal follows
    ],
)
def test_quick_commands(store: MailStore, line: bytes, quick: bool) -> None:
    session = selected(store)
    assert session.quick(line) is quick
    if quick:  # the store is held for exactly the feed that follows
        assert not _other_thread_holds(store)
        session.feed(line)
    assert _other_thread_holds(store)


def test_done_is_quick_only_while_idling(store: MailStore) -> None:
    session = selected(store)
    assert not session.quick(b"DONE\r\n")
    assert session.quick(b"i IDLE\r\n")
    assert session.feed(b"i IDLE\r\n").data.endswith(b"+ idling\r\n")
    assert session.quick(b"DONE\r\n")
    assert session.feed(b"DONE\r\n").data == b"i OK IDLE terminated\r\n"


def _other_thread_holds(store: MailStore) -> bool:
    got: list[bool] = []

    def attempt() -> None:
        got.append(store.hold_if_current("INBOX"))
        if got[0]:
            store.release_hold()

    thread = threading.Thread(target=attempt)
    thread.start()
    thread.join()
    return got[0]
