"""The IMAP session on the real store (``mailroom.mailstore`` over a Maildir in tmp_path).

Values the real store chooses (UIDVALIDITY, mod-sequences, dates) are matched with ``*``.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailroom.accounts import User
from mailroom.addresses import Address
from mailroom.imap.session import SharedCache, State
from mailroom.maildir import Maildir
from mailroom.mailstore import MailStore
from mailroom.mime import Message
from tests.imap_transcript import Conversation, conversation, message


@pytest.fixture
def store(tmp_path: Path) -> MailStore:
    maildir = Maildir(
        tmp_path / "mail" / "example.test" / "alice", "mail.example.test", fsync=lambda fd: None
    )
    return MailStore(maildir, quota_bytes=1024 * 1024)


def fill(store: MailStore, count: int) -> None:
    store.ensure_defaults()
    for i in range(1, count + 1):
        store.append(
            "INBOX",
            message(f"Message {i}", f"Body number {i}."),
            (),
            datetime(2026, 11, i, 12, tzinfo=UTC),
        )


def selected(store: MailStore, count: int = 3) -> Conversation:
    fill(store, count)
    conv = conversation(store)
    conv.send(b"a SELECT INBOX\r\n")
    conv.pending.clear()
    return conv


def test_login_creates_default_mailboxes(store: MailStore) -> None:
    conv = conversation(store)
    conv.run("""
        C: a1 LIST "" *
        S: * LIST (\\HasNoChildren *) "/" "INBOX"
        S: * LIST (\\HasNoChildren \\Subscribed \\Archive) "/" "Archive"
        S: * LIST (\\HasNoChildren \\Subscribed \\Drafts) "/" "Drafts"
        S: * LIST (\\HasNoChildren \\Subscribed \\Junk) "/" "Junk"
        S: * LIST (\\HasNoChildren \\Subscribed \\Sent) "/" "Sent"
        S: * LIST (\\HasNoChildren \\Subscribed \\Trash) "/" "Trash"
        S: a1 OK LIST completed
    """)


def test_select_fetch_store_search_expunge(store: MailStore) -> None:
    fill(store, 3)
    conv = conversation(store)
    conv.run("""
        C: a1 SELECT INBOX
        S: * 3 EXISTS
        S: * 3 RECENT
        S: * OK [UNSEEN 1] First unseen
        S: * FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)
        S: * OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] Flags that can be stored
        S: * OK [UIDVALIDITY *] UIDs valid
        S: * OK [UIDNEXT 4] Predicted next UID
        S: * OK [HIGHESTMODSEQ *] Highest
        S: a1 OK [READ-WRITE] SELECT completed
        C: a2 FETCH 1:* (UID FLAGS RFC822.SIZE INTERNALDATE)
        S: * 1 FETCH (UID 1 FLAGS (\\Recent) RFC822.SIZE 158 INTERNALDATE " 1-Nov-2026 12:00:00 +0000")
        S: * 2 FETCH (UID 2 FLAGS (\\Recent) RFC822.SIZE 158 INTERNALDATE " 2-Nov-2026 12:00:00 +0000")
        S: * 3 FETCH (UID 3 FLAGS (\\Recent) RFC822.SIZE 158 INTERNALDATE " 3-Nov-2026 12:00:00 +0000")
        S: a2 OK FETCH completed
        C: a3 FETCH 2 BODY[TEXT]
        S: * 2 FETCH (BODY[TEXT] {16}
        S: Body number 2.
        S:  FLAGS (\\Seen \\Recent))
        S: a3 OK FETCH completed
        C: a4 STORE 1,3 +FLAGS (\\Deleted $Work)
        S: * FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Work)
        S: * OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Work \\*)] Flags that can be stored
        S: * 1 FETCH (FLAGS (\\Deleted $Work \\Recent))
        S: * 3 FETCH (FLAGS (\\Deleted $Work \\Recent))
        S: a4 OK STORE completed
        C: a5 SEARCH DELETED KEYWORD $Work
        S: * SEARCH 1 3
        S: a5 OK SEARCH completed
        C: a6 UID SEARCH RETURN (COUNT ALL) SEEN
        S: * ESEARCH (TAG "a6") UID COUNT 1 ALL 2
        S: a6 OK SEARCH completed
        C: a7 EXPUNGE
        S: * 3 EXPUNGE
        S: * 1 EXPUNGE
        S: a7 OK EXPUNGE completed
        C: a8 FETCH 1 (UID FLAGS)
        S: * 1 FETCH (UID 2 FLAGS (\\Seen \\Recent))
        S: a8 OK FETCH completed
    """)


def test_recent_goes_to_the_first_read_write_select(store: MailStore) -> None:
    """RFC 3501 2.3.2: the session whose SELECT first sees a delivery is told it is \\Recent;
    EXAMINE claims nothing, and no later session gets it."""
    for n in range(3):
        store.maildir.deliver(message(f"Delivered {n}"))
    other = MailStore(store.maildir)
    examining, first, later = conversation(other), conversation(store), conversation(other)
    examining.send(b"e EXAMINE INBOX\r\n")
    assert examining.pending[:2] == ["* 3 EXISTS", "* 0 RECENT"]
    first.send(b"s SELECT INBOX\r\n")
    assert first.pending[:2] == ["* 3 EXISTS", "* 3 RECENT"]
    later.send(b"s SELECT INBOX\r\n")
    assert later.pending[:2] == ["* 3 EXISTS", "* 0 RECENT"]
    other.close()


def test_append_copy_move_with_uids(store: MailStore) -> None:
    conv = selected(store, 2)
    raw = message("Appended")
    conv.run(f"""
        C: a1 APPEND Drafts (\\Draft) "05-Nov-2026 10:11:12 +0100" {{{len(raw)}}}
        S: + Ready for literal data
    """)
    conv.send(raw + b"\r\n")
    conv.run("""
        S: a1 OK [APPENDUID * 1] APPEND completed
        C: a2 UID COPY 1:2 Archive
        S: a2 OK [COPYUID * 1,2 1,2] COPY completed
        C: a3 UID MOVE 1 Trash
        S: * OK [COPYUID * 1 1] Moved
        S: * 1 EXPUNGE
        S: a3 OK MOVE completed
        C: a4 STATUS Archive (MESSAGES UIDNEXT)
        S: * STATUS "Archive" (MESSAGES 2 UIDNEXT 3)
        S: a4 OK STATUS completed
        C: a5 APPEND Nope {3+}
        C: abc
        S: a5 NO [TRYCREATE] No mailbox Nope
    """)
    assert store.read("Drafts", 1) == raw


def test_two_sessions_see_each_other(store: MailStore, tmp_path: Path) -> None:
    fill(store, 2)
    other = MailStore(store.maildir, quota_bytes=store.quota_bytes)
    one, two = conversation(store), conversation(other)
    one.send(b"a SELECT INBOX\r\n")
    two.send(b"a SELECT INBOX\r\n")
    one.pending.clear()
    two.pending.clear()
    two.run("""
        C: b1 STORE 1 +FLAGS (\\Flagged)
        S: * 1 FETCH (FLAGS (\\Flagged))
        S: b1 OK STORE completed
    """)
    one.run("""
        C: c1 NOOP
        S: * 1 FETCH (FLAGS (\\Flagged \\Recent))
        S: c1 OK NOOP completed
        C: c2 IDLE
        S: + idling
    """)
    other.append("INBOX", message("Late"))
    assert one.session.idle_poll() == b"* 3 EXISTS\r\n* 3 RECENT\r\n"
    one.run("""
        C: DONE
        S: c2 OK IDLE terminated
    """)
    assert one.session.watch_dirs()
    other.close()


def test_other_programs_changes_reach_idle_and_noop_after_quiet_commands(
    store: MailStore,
) -> None:
    """The fast paths (the same snapshot, no listing) never hide a change made elsewhere."""
    conv = selected(store, 3)
    root = store.maildir.root
    for sub in ("new", "cur"):  # the mailbox has been quiet for a while
        os.utime(root / sub, ns=(time.time_ns() - 10**10,) * 2)
    for n in range(3):
        conv.run(f"""
            C: q{n} NOOP
            S: q{n} OK NOOP completed
        """)
    first = store.sync("INBOX").messages[0]
    (name,) = [n for n in os.listdir(root / "cur") if n.startswith(first.key)]
    os.rename(root / "cur" / name, root / "cur" / f"{first.key}:2,F")  # mutt flags it
    conv.run("""
        C: a1 NOOP
        S: * 1 FETCH (FLAGS (\\Flagged \\Recent))
        S: a1 OK NOOP completed
        C: a2 IDLE
        S: + idling
    """)
    assert conv.session.idle_poll() == b""
    other = MailStore(store.maildir)
    try:
        other.store("INBOX", [2], "+", ["\\Seen"])  # another process, through the index
        assert conv.session.idle_poll() == b"* 2 FETCH (FLAGS (\\Seen \\Recent))\r\n"
        store.maildir.deliver(message("Late", "by another program"))
        assert conv.session.idle_poll() == b"* 4 EXISTS\r\n* 4 RECENT\r\n"
        os.unlink(store.path("INBOX", first.uid))  # and another program removes it
        assert conv.session.idle_poll() == b"* 1 EXPUNGE\r\n"
    finally:
        other.close()


def test_the_process_cache_of_envelopes_keeps_users_apart(store: MailStore, tmp_path: Path) -> None:
    """Sessions share computed ENVELOPEs, never across users, whatever their UIDs."""
    carol_store = MailStore(Maildir(tmp_path / "carol", "mail.example.test", fsync=lambda fd: None))
    carol_store.append("INBOX", message("For Carol"), (), datetime(2026, 11, 1, tzinfo=UTC))
    store.append("INBOX", message("For Alice"), (), datetime(2026, 11, 1, tzinfo=UTC))
    cache = SharedCache()
    carol = User(Address("carol", "example.test"), True, 0)
    sessions = [
        conversation(store, shared_cache=cache),
        conversation(store, shared_cache=cache),
        conversation(carol_store, shared_cache=cache, authenticate=lambda u, p: carol),
    ]
    for conv, who in zip(sessions, ("Alice", "Alice", "Carol"), strict=True):
        conv.send(b"a SELECT INBOX\r\n")
        conv.pending.clear()
        conv.run(f"""
            C: b FETCH 1 (ENVELOPE)
            S: * 1 FETCH (ENVELOPE ("Mon, 23 Nov 2026 09:00:00 +0100" "For {who}" *))
            S: b OK FETCH completed
        """)
    carol_store.close()


def test_bad_names_refused_by_session_and_store(store: MailStore) -> None:
    conv = conversation(store)
    conv.run("""
        C: a1 CREATE "../escape"
        S: a1 NO [CANNOT] Invalid mailbox name '../escape'
        C: a2 CREATE "a//b"
        S: a2 NO [CANNOT] Invalid mailbox name 'a//b'
        C: a3 CREATE "Projects/2026"
        S: a3 OK CREATE completed
        C: a4 RENAME "Projects/2026" "Projects/Done"
        S: a4 OK RENAME completed
        C: a5 LIST "" "Projects*"
        S: * LIST (\\Noselect \\HasChildren) "/" "Projects"
        S: * LIST (\\HasNoChildren) "/" "Projects/Done"
        S: a5 OK LIST completed
        C: a6 CREATE Other (USE (\\Flagged))
        S: a6 NO [USEATTR] *
    """)
    assert not (store.maildir.root.parent / "escape").exists()


def test_qresync_on_the_real_store(store: MailStore) -> None:
    fill(store, 3)
    status = store.status("INBOX")
    store.store("INBOX", [2], "+", ["\\Deleted"])
    store.expunge("INBOX")
    conv = conversation(store)
    conv.run(f"""
        C: e ENABLE QRESYNC
        S: * ENABLED QRESYNC
        S: e OK ENABLE completed
        C: s SELECT INBOX (QRESYNC ({status.uidvalidity} {status.highestmodseq} 1:3))
        S: * 2 EXISTS
        S: * 2 RECENT
        S: * OK [UNSEEN 1] First unseen
        S: * FLAGS (*)
        S: * OK [PERMANENTFLAGS (*)] Flags that can be stored
        S: * OK [UIDVALIDITY {status.uidvalidity}] UIDs valid
        S: * OK [UIDNEXT 4] Predicted next UID
        S: * OK [HIGHESTMODSEQ *] Highest
        S: * VANISHED (EARLIER) 2
        S: s OK [READ-WRITE] SELECT completed
    """)
    assert conv.session.state is State.SELECTED


def test_quota_from_the_store(store: MailStore) -> None:
    fill(store, 2)
    conv = conversation(store)
    conv.run("""
        C: q1 GETQUOTAROOT INBOX
        S: * QUOTAROOT "INBOX" ""
        S: * QUOTA "" (STORAGE 1 1024)
        S: q1 OK GETQUOTAROOT completed
    """)


def test_search_header_values_are_parsed_once_per_process(store: MailStore, tmp_path: Path) -> None:
    """Ten clients searching one mailbox parse each message once; users never share answers."""
    for subject in ("alpha", "beta", "gamma"):
        store.append("INBOX", message(subject), (), datetime(2026, 11, 1, tzinfo=UTC))
    carol_store = MailStore(Maildir(tmp_path / "carol", "mail.example.test", fsync=lambda fd: None))
    carol_store.append("INBOX", message("beta"), (), datetime(2026, 11, 1, tzinfo=UTC))
    carol = User(Address("carol", "example.test"), True, 0)
    parses: list[bytes] = []

    def counting_parse(raw: bytes) -> Message:
        parses.append(raw)
        return Message(raw)

    cache = SharedCache()
    first, second = (
        conversation(store, shared_cache=cache, parse_message=counting_parse) for _ in range(2)
    )
    other = conversation(
        carol_store,
        shared_cache=cache,
        parse_message=counting_parse,
        authenticate=lambda u, p: carol,
    )
    for conv in (first, second, other):
        conv.send(b"a SELECT INBOX\r\n")
        conv.pending.clear()
    first.run('C: s SEARCH SUBJECT "beta"\n S: * SEARCH 2\n S: s OK SEARCH completed')
    assert len(parses) == 3
    second.run('C: s SEARCH SUBJECT "beta"\n S: * SEARCH 2\n S: s OK SEARCH completed')
    second.run(
        'C: t SEARCH OR SUBJECT "gamma" SUBJECT "alpha"\n S: * SEARCH 1 3\n S: t OK SEARCH completed'
    )
    assert len(parses) == 3  # the second session parsed nothing: the values came from the cache
    other.run('C: s SEARCH SUBJECT "gamma"\n S: * SEARCH\n S: s OK SEARCH completed')
    assert len(parses) == 4  # Carol's message is hers: parsed, never answered from Alice's
    carol_store.close()


def test_parsed_items_are_kept_in_the_index_for_the_next_process(
    store: MailStore, tmp_path: Path
) -> None:
    """ENVELOPE and BODYSTRUCTURE parsed by one process are read from the index by the next
    (a new process after idle exit, or another worker): not parsed again, the same bytes."""
    fill(store, 3)
    parses: list[bytes] = []

    def counting_parse(raw: bytes) -> Message:
        parses.append(raw)
        return Message(raw)

    first = conversation(store, shared_cache=SharedCache(), parse_message=counting_parse)
    first.send(b"a SELECT INBOX\r\n")
    first.pending.clear()
    answer = first.send(b"f FETCH 1:3 (ENVELOPE BODYSTRUCTURE)\r\n").data
    assert answer.startswith(b"* 1 FETCH (ENVELOPE (") and len(parses) == 3
    root = store.maildir.root
    # Another process: its own store and its own (empty) process cache.
    again = MailStore(Maildir(root, "mail.example.test", fsync=lambda fd: None))
    second = conversation(again, shared_cache=SharedCache(), parse_message=counting_parse)
    second.send(b"a SELECT INBOX\r\n")
    second.pending.clear()
    assert second.send(b"f FETCH 1:3 (ENVELOPE BODYSTRUCTURE)\r\n").data == answer
    assert len(parses) == 3  # nothing parsed again
    # After ENABLE UTF8=ACCEPT the items are encoded otherwise: parsed once more.
    third = conversation(again, shared_cache=SharedCache(), parse_message=counting_parse)
    assert third.send(b"e ENABLE UTF8=ACCEPT\r\n").data.startswith(b"* ENABLED UTF8=ACCEPT")
    third.send(b"a SELECT INBOX\r\n")
    third.send(b"f FETCH 1 (ENVELOPE)\r\n")
    assert len(parses) == 4
    assert store._index.conn.execute(
        "SELECT item FROM derived WHERE uid = 1 ORDER BY item"
    ).fetchall() == [("BODYSTRUCTURE",), ("ENVELOPE",), ("ENVELOPE+UTF8",)]
    again.close()


def test_parsed_items_go_with_their_message(store: MailStore) -> None:
    fill(store, 2)
    store.sync("INBOX")
    store.save_items("INBOX", {(1, "ENVELOPE"): b"ENVELOPE (1)", (2, "ENVELOPE"): b"ENVELOPE (2)"})
    store.save_items("INBOX", {(9, "ENVELOPE"): b"ENVELOPE (9)"})  # no such message: skipped
    assert store.cached_items("INBOX", [1, 2, 9], ["ENVELOPE"]) == {
        (1, "ENVELOPE"): b"ENVELOPE (1)",
        (2, "ENVELOPE"): b"ENVELOPE (2)",
    }
    assert store.cached_items("INBOX", [2], ["BODYSTRUCTURE"]) == {}
    store.store("INBOX", [1], "+", ["\\Deleted"])
    store.expunge("INBOX")
    assert store.cached_items("INBOX", [1, 2], ["ENVELOPE"]) == {(2, "ENVELOPE"): b"ENVELOPE (2)"}
    assert store._index.conn.execute("SELECT count(*) FROM derived").fetchone() == (1,)


def test_sessions_fetching_the_same_envelopes_share_the_parsing_without_waiting(
    store: MailStore,
) -> None:
    """While one session parses message 1 (held here), another fetching 1:5 parses 2 to 5
    first instead of waiting on message 1 (``_warm_derived``), then takes message 1's
    envelope from the first: every message is parsed once, and nothing waits in step."""
    fill(store, 5)
    held = threading.Event()
    holding = threading.Event()
    parsed: list[bytes] = []

    def parse(raw: bytes) -> Message:
        if b"Subject: Message 1\r\n" in raw and not holding.is_set():
            holding.set()
            assert held.wait(5)
        parsed.append(raw)
        return Message(raw)

    cache = SharedCache()
    first, second = (conversation(store, shared_cache=cache, parse_message=parse) for _ in "ab")
    for conv in (first, second):
        conv.send(b"a SELECT INBOX\r\n")
        conv.pending.clear()
    with ThreadPoolExecutor(2) as pool:
        one = pool.submit(first.send, b"f FETCH 1 (ENVELOPE)\r\n")
        assert holding.wait(5)
        five = pool.submit(second.send, b"f FETCH 1:5 (ENVELOPE)\r\n")
        deadline = time.monotonic() + 5
        while len(parsed) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(parsed) == 4 and not five.done()  # 2 to 5 parsed, message 1 still held
        held.set()
        one.result(5)
        five.result(5)
    assert len(parsed) == 5
    for conv, count in ((first, 1), (second, 5)):
        assert sum(" FETCH (ENVELOPE (" in line for line in conv.pending) == count
        assert conv.pending[-1] == "f OK FETCH completed"
