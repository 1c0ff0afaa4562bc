"""mailroom.mailstore: names, flags on disk, UIDs and mod-sequences, crash safety, rebuilds,
several processes at once, and the speed of sync on 10,000 messages."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import queue
import re
import sqlite3
import time
import unicodedata
from collections.abc import Iterator
from datetime import UTC, datetime
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

import pytest

from mailroom import mailstore
from mailroom.errors import (
    InvalidFlagError,
    InvalidMailboxNameError,
    KeywordLimitError,
    MailboxExistsError,
    MailboxNotFoundError,
    MessageGoneError,
    QuotaExceededError,
    SpecialUseError,
    StoreError,
)
from mailroom.listings import Listings
from mailroom.maildir import Maildir
from mailroom.mailstore import (
    INDEX_NAME,
    SCHEMA_VERSION,
    UIDLIST_NAME,
    MailStore,
    Snapshot,
    canonical_name,
    folder_name,
    mailbox_name,
)

HOST = "mail.example.test"
FORK = multiprocessing.get_context("fork")


def message(n: int) -> bytes:
    return b"From: a@example.test\r\nSubject: n=%d\r\n\r\nbody %d\r\n" % (n, n)


def number(data: bytes) -> int:
    match = re.search(rb"Subject: n=(\d+)", data)
    assert match is not None
    return int(match[1])


def no_fsync(fd: int) -> None:
    pass


@pytest.fixture
def maildir(tmp_path: Path) -> Maildir:
    return Maildir(tmp_path / "box", HOST, fsync=no_fsync)


@pytest.fixture
def store(maildir: Maildir) -> Iterator[MailStore]:
    with MailStore(maildir) as opened:
        yield opened


def cur_names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder / "cur"))


def state(snapshot: Snapshot) -> list[tuple[int, str, frozenset[str], int]]:
    """What must survive a rebuild: UID, key, flags, size of each message."""
    return [(m.uid, m.key, m.flags, m.size) for m in snapshot.messages]


# --- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "",
        "/",
        "/etc",
        "a//b",
        "a/",
        "..",
        "../x",
        "a/../../b",
        ".",
        "a/./b",
        "x\x00y",
        "tab\tname",
        "bell\x07",
        "del\x7f",
        "c1\x85",
        "x" * 256,
        " lead",
        "trail ",
        "a/ b",
    ],
)
def test_names_that_could_escape_or_are_malformed_are_refused(
    store: MailStore, maildir: Maildir, name: str
) -> None:
    before = sorted(os.listdir(maildir.root.parent))
    before_root = sorted(os.listdir(maildir.root))
    for attempt in (
        lambda: canonical_name(name),
        lambda: store.sync(name),
        lambda: store.append(name, message(1)),
        lambda: store.subscribe(name),
        lambda: store.rename_mailbox("INBOX", name),
    ):
        with pytest.raises(InvalidMailboxNameError):
            attempt()
    if name != "a/":  # CREATE "a/" declares a parent and creates "a" (RFC 9051 6.3.4)
        with pytest.raises(InvalidMailboxNameError):
            store.create_mailbox(name)
    assert sorted(os.listdir(maildir.root.parent)) == before
    if name != "a/":
        assert sorted(os.listdir(maildir.root)) == before_root


def test_create_with_a_trailing_delimiter_creates_the_parent(store: MailStore) -> None:
    store.create_mailbox("Lists/")
    assert [(e.name, e.selectable) for e in store.list_mailboxes()] == [
        ("INBOX", True),
        ("Lists", True),
    ]


def test_case_and_normalisation_never_merge(store: MailStore, maildir: Maildir) -> None:
    nfc = unicodedata.normalize("NFC", "Café")
    nfd = unicodedata.normalize("NFD", "Café")
    assert nfc != nfd
    names = ["Foo", "foo", "FOO", nfc, nfd]
    for n, name in enumerate(names):
        store.create_mailbox(name)
        store.append(name, message(n))
    with pytest.raises(MailboxExistsError):
        store.create_mailbox("foo")
    listed = [e.name for e in store.list_mailboxes()]
    assert sorted(listed) == sorted(["INBOX", *names])
    for n, name in enumerate(names):
        (only,) = store.sync(name).messages
        assert number(store.read(name, only.uid)) == n
    folders = [d for d in os.listdir(maildir.root) if d.startswith(".")]
    assert len(folders) == len(names)


def test_inbox_is_the_root_in_any_case(store: MailStore, maildir: Maildir) -> None:
    store.append("inbox", message(1))
    assert [m.uid for m in store.sync("InBoX").messages] == [1]
    assert store.sync("INBOX").name == "INBOX"
    assert len(os.listdir(maildir.root / "cur")) == 1
    with pytest.raises(MailboxExistsError):
        store.create_mailbox("Inbox")
    store.create_mailbox("inbox/Sub")
    assert (maildir.root / ".INBOX.Sub" / "cur").is_dir()
    entries = {e.name: e for e in store.list_mailboxes()}
    assert entries["INBOX"].has_children and "INBOX/Sub" in entries


def test_names_on_disk_are_maildirpp_in_modified_utf7(store: MailStore, maildir: Maildir) -> None:
    store.create_mailbox("Entwürfe")
    store.create_mailbox("a.b/c")
    store.create_mailbox("R&D")
    on_disk = sorted(d for d in os.listdir(maildir.root) if d.startswith("."))
    assert on_disk == [".Entw&APw-rfe", ".R&-D", ".a&AC4-b.c"]
    assert folder_name("a.b/c") == "a&AC4-b.c"
    assert mailbox_name("a&AC4-b.c") == "a.b/c"
    assert mailbox_name("Entw&APw-rfe") == "Entwürfe"
    assert mailbox_name("a..b") is None and mailbox_name("Entw&AOk") is None
    entries = {e.name: e for e in store.list_mailboxes()}
    assert not entries["a.b"].selectable and entries["a.b"].has_children
    assert entries["a.b/c"].selectable and not entries["a.b/c"].has_children


def test_folders_delivered_to_by_smtp_are_mailboxes(store: MailStore, maildir: Maildir) -> None:
    maildir.deliver(message(1), "Junk")
    maildir.deliver(message(2), "Lists.mailroom")
    entries = {e.name: e for e in store.list_mailboxes()}
    assert entries["Lists"].selectable is False and entries["Lists"].has_children
    assert [
        number(store.read("Lists/mailroom", m.uid)) for m in store.sync("Lists/mailroom").messages
    ] == [2]
    assert len(store.sync("Junk").messages) == 1
    assert store.watch_dirs("Lists/mailroom") == [
        maildir.root / ".Lists.mailroom" / "new",
        maildir.root / ".Lists.mailroom" / "cur",
    ]


def test_missing_mailbox(store: MailStore) -> None:
    for attempt in (
        lambda: store.sync("Nope"),
        lambda: store.append("Nope", message(1)),
        lambda: store.delete_mailbox("Nope"),
        lambda: store.rename_mailbox("Nope", "Other"),
        lambda: store.copy("INBOX", [1], "Nope"),
    ):
        with pytest.raises(MailboxNotFoundError):
            attempt()


# --- flags on disk --------------------------------------------------------------------------


def test_flag_letters_and_keywords_are_written_as_dovecot_writes_them(
    store: MailStore, maildir: Maildir
) -> None:
    maildir.deliver(message(1))
    (first,) = store.sync("INBOX").messages
    changed, _ = store.store(
        "INBOX",
        [first.uid],
        "+",
        ["\\seen", "\\Deleted", "$Forwarded", "\\Draft", "\\ANSWERED", "Work", "\\Flagged"],
    )
    assert changed[0].flags == {
        "\\Seen", "\\Deleted", "\\Draft", "\\Answered", "\\Flagged", "$Forwarded", "Work"
    }  # fmt: skip
    (name,) = cur_names(maildir.root)
    assert name == f"{first.key}:2,DFRSTab"
    assert (maildir.root / "dovecot-keywords").read_text() == "0 $Forwarded\n1 Work\n"
    store.store("INBOX", [first.uid], "-", ["$Forwarded", "\\Deleted"])
    assert cur_names(maildir.root) == [f"{first.key}:2,DFRSb"]
    store.store("INBOX", [first.uid], "", ["work"])  # keywords match case-insensitively
    assert cur_names(maildir.root) == [f"{first.key}:2,b"]
    assert store.sync("INBOX").messages[0].flags == {"Work"}


def test_flags_other_programs_wrote_are_read_and_unknown_letters_kept(
    store: MailStore, maildir: Maildir
) -> None:
    (maildir.root / "dovecot-keywords").write_text("0 $Junk\n2 Later\n")
    cur = maildir.root / "cur"
    (cur / "1.M1P1.host,S=3,W=4:2,FPScd").write_bytes(b"hi\n")
    (info,) = store.sync("INBOX").messages
    assert info.flags == {"\\Flagged", "\\Seen", "Later"}  # P and the unmapped d mean nothing
    assert info.key == "1.M1P1.host,S=3,W=4" and info.size == 4
    store.store("INBOX", [info.uid], "-", ["\\Seen"])
    assert cur_names(maildir.root) == ["1.M1P1.host,S=3,W=4:2,FPcd"]


def test_recent_and_unknown_system_flags_are_refused(store: MailStore, maildir: Maildir) -> None:
    maildir.deliver(message(1))
    store.sync("INBOX")
    for flag in ("\\Recent", "\\Important", "has space", "par(en", "", "ünï"):
        with pytest.raises(InvalidFlagError):
            store.store("INBOX", [1], "+", [flag])
        with pytest.raises(InvalidFlagError):
            store.append("INBOX", message(2), [flag])
    assert len(store.sync("INBOX").messages) == 1


def test_more_than_26_keywords_are_refused(store: MailStore, maildir: Maildir) -> None:
    maildir.deliver(message(1))
    store.sync("INBOX")
    store.store("INBOX", [1], "+", [f"k{n}" for n in range(26)])
    keywords = (maildir.root / "dovecot-keywords").read_text()
    assert keywords.splitlines()[-1].startswith("25 ")
    with pytest.raises(KeywordLimitError, match="26 keywords"):
        store.store("INBOX", [1], "+", ["one-too-many"])
    with pytest.raises(KeywordLimitError):
        store.append("INBOX", message(2), ["one-too-many"])
    assert (maildir.root / "dovecot-keywords").read_text() == keywords
    assert cur_names(maildir.root)[0].endswith(":2," + "abcdefghijklmnopqrstuvwxyz")
    assert len(store.sync("INBOX").messages) == 1


def test_a_flag_change_by_another_program_bumps_the_modseq(
    store: MailStore, maildir: Maildir
) -> None:
    maildir.deliver(message(1))
    maildir.deliver(message(2))
    before = store.sync("INBOX")
    first = before.messages[0]
    (name,) = [n for n in cur_names(maildir.root) if n.startswith(first.key)]
    os.rename(maildir.root / "cur" / name, maildir.root / "cur" / f"{first.key}:2,RS")  # mutt
    after = store.sync("INBOX")
    assert after.messages[0].flags == {"\\Answered", "\\Seen"}
    assert after.messages[0].modseq > before.highestmodseq
    assert after.highestmodseq == after.messages[0].modseq
    assert after.messages[1] == before.messages[1]


def test_store_finds_a_file_another_program_renamed(store: MailStore, maildir: Maildir) -> None:
    """No lost update: the flag the other program set stays, and ours is added."""
    maildir.deliver(message(1))
    (info,) = store.sync("INBOX").messages
    (name,) = cur_names(maildir.root)
    os.rename(maildir.root / "cur" / name, maildir.root / "cur" / f"{info.key}:2,F")
    changed, _ = store.store("INBOX", [info.uid], "+", ["\\Seen"])
    assert cur_names(maildir.root) == [f"{info.key}:2,FS"]
    assert changed[0].flags == {"\\Flagged", "\\Seen"}
    assert store.sync("INBOX").messages[0].flags == {"\\Flagged", "\\Seen"}


def test_store_unchangedsince_and_one_modseq_per_changed_message(
    store: MailStore, maildir: Maildir
) -> None:
    for n in range(3):
        maildir.deliver(message(n))
    snap = store.sync("INBOX")
    store.store("INBOX", [2], "+", ["\\Flagged"])
    changed, failed = store.store(
        "INBOX", [1, 2, 3], "+", ["\\Seen"], unchangedsince=snap.highestmodseq
    )
    assert failed == [2]  # RFC 7162 3.1.3: changed since the client's modseq
    assert [m.uid for m in changed] == [1, 3]
    assert len({m.modseq for m in changed}) == 2
    assert all(m.modseq > snap.highestmodseq for m in changed)
    unchanged, _ = store.store("INBOX", [1], "+", ["\\Seen"])
    assert unchanged == []  # nothing to change, no modseq spent
    assert store.sync("INBOX").highestmodseq == max(m.modseq for m in changed)


# --- UIDs, UIDVALIDITY, MODSEQ --------------------------------------------------------------


def test_uids_follow_delivery_order_not_name_order(tmp_path: Path) -> None:
    names = iter(["9.M000900P1R1.host", "10.M000001P1R2.host", "10.M000002P1R3.host"])
    box = Maildir(tmp_path / "box", HOST, fsync=no_fsync, unique=lambda: next(names))
    for n in range(3):
        box.deliver(message(n))
    with MailStore(box) as store:
        snap = store.sync("INBOX")
        assert [number(store.read("INBOX", m.uid)) for m in snap.messages] == [0, 1, 2]
        assert [m.uid for m in snap.messages] == [1, 2, 3]
        assert not os.listdir(box.root / "new")
        assert all(":2," in n for n in cur_names(box.root))


def test_uids_are_never_reused_and_uidvalidity_stays(maildir: Maildir) -> None:
    for n in range(3):
        maildir.deliver(message(n))
    with MailStore(maildir) as store:
        snap = store.sync("INBOX")
        store.store("INBOX", [3], "+", ["\\Deleted"])
        assert store.expunge("INBOX") == [3]  # the highest UID
        assert store.sync("INBOX").uidnext == 4
    with MailStore(maildir) as store:  # reopened
        maildir.deliver(message(3))
        again = store.sync("INBOX")
        assert [m.uid for m in again.messages] == [1, 2, 4]
        assert again.uidvalidity == snap.uidvalidity
        assert again.messages[:2] == snap.messages[:2]
    for suffix in ("", "-wal", "-shm"):  # the index is lost too
        Path(f"{maildir.root / INDEX_NAME}{suffix}").unlink(missing_ok=True)
    with MailStore(maildir) as store:
        store.expunge("INBOX")
        maildir.deliver(message(4))
        lost = store.sync("INBOX")
        assert [m.uid for m in lost.messages] == [1, 2, 4, 5]
        assert lost.uidvalidity == snap.uidvalidity


def test_modseqs_only_grow(store: MailStore, maildir: Maildir) -> None:
    seen: list[int] = []

    def highest() -> int:
        value = store.sync("INBOX").highestmodseq
        seen.append(value)
        return value

    highest()
    maildir.deliver(message(1))
    highest()
    store.append("INBOX", message(2), ["\\Seen"])
    highest()
    store.store("INBOX", [1], "+", ["\\Flagged"])
    highest()
    store.store("INBOX", [1, 2], "+", ["\\Deleted"])
    highest()
    store.expunge("INBOX", [2])
    highest()
    store.rebuild()
    highest()
    store.store("INBOX", [1], "-", ["\\Deleted"])
    highest()
    assert all(a < b for a, b in itertools.pairwise(seen)), seen
    messages = store.sync("INBOX").messages
    assert messages[-1].modseq == seen[-1]


def test_a_recreated_mailbox_gets_a_greater_uidvalidity(store: MailStore) -> None:
    store.create_mailbox("Box")
    first = store.status("Box").uidvalidity
    store.delete_mailbox("Box")
    store.create_mailbox("Box")
    assert store.status("Box").uidvalidity > first


def test_changes_since_reports_changes_and_expunges(store: MailStore, maildir: Maildir) -> None:
    for n in range(4):
        maildir.deliver(message(n))
    base = store.sync("INBOX").highestmodseq
    store.store("INBOX", [2, 3], "+", ["\\Deleted"])
    store.store("INBOX", [1], "+", ["\\Seen"])
    store.expunge("INBOX", [2])
    changed, expunged = store.changes_since("INBOX", base)
    assert [m.uid for m in changed] == [1, 3] and expunged == [2]
    after = store.sync("INBOX").highestmodseq
    assert store.changes_since("INBOX", after) == ([], [])
    os.unlink(store.path("INBOX", 4))  # removed by another program
    _, expunged = store.changes_since("INBOX", store.sync("INBOX").highestmodseq - 1)
    assert expunged == [4]
    store.rebuild()  # tombstones are gone: everything missing below UIDNEXT counts
    assert store.changes_since("INBOX", after)[1] == [2, 4]


def test_recent_is_claimed_by_one_session(maildir: Maildir) -> None:
    maildir.deliver(message(1))
    with MailStore(maildir) as one, MailStore(maildir) as two:
        one.sync("INBOX")
        assert one.status("INBOX").recent == 1
        assert one.claim_recent("INBOX") == {1}
        assert two.claim_recent("INBOX") == frozenset()
        assert two.status("INBOX").recent == 0
        maildir.deliver(message(2))
        two.sync("INBOX")
        assert two.claim_recent("INBOX") == {2}
        assert one.claim_recent("INBOX") == frozenset()
        assert all("\\Recent" not in m.flags for m in one.sync("INBOX").messages)


def test_select_claims_what_it_indexes_and_what_others_left(maildir: Maildir) -> None:
    for n in range(3):
        maildir.deliver(message(n))
    with MailStore(maildir) as one, MailStore(maildir) as two:
        snapshot, recent = one.select("INBOX")  # indexes the three, written claimed
        assert [m.uid for m in snapshot.messages] == [1, 2, 3]
        assert recent == {1, 2, 3}
        assert two.status("INBOX").recent == 0
        assert two.claim_recent("INBOX") == frozenset()
        maildir.deliver(message(3))
        assert two.sync("INBOX").uidnext == 5  # indexed by a sync: left for a SELECT
        maildir.deliver(message(4))
        # one's sync writes (message 5 is new to the index) and claims 4 in the same write
        assert one.select("INBOX")[1] == {4, 5}
        assert two.claim_recent("INBOX") == frozenset()
        maildir.deliver(message(5))
        two.sync("INBOX")
        # nothing new on disk for one: answered from the index, then 6 claimed
        assert one.select("INBOX") == (one.sync("INBOX"), frozenset({6}))
        assert one.select("INBOX")[1] == frozenset()
        assert one.status("INBOX").recent == 0


def test_a_first_sync_of_many_messages_is_what_the_index_reads_back(maildir: Maildir) -> None:
    """Hundreds at once (listings read afresh, rows inserted many per statement, the snapshot
    made as they are written): the same as another store loads from the index."""
    count = 321  # above BULK_RENAMES, and not a whole number of rows per INSERT
    for n in range(count):
        maildir.deliver(message(n))
    (maildir.root / "cur" / "1.M1P1.elsewhere:2,S").write_bytes(b"Subject: n=999\n\nold\n")
    with MailStore(maildir) as one, MailStore(maildir) as two:
        snapshot, recent = one.select("INBOX")
        loaded = two.sync("INBOX")
        assert snapshot.messages == loaded.messages
        assert snapshot.uids == loaded.uids == tuple(range(1, count + 2))
        assert recent == set(snapshot.uids)
        assert not os.listdir(maildir.root / "new")
        # delivery order: the file from 1970 first, then as delivered
        assert [number(one.read("INBOX", uid)) for uid in snapshot.uids] == [999, *range(count)]
        first = snapshot.messages[0]
        assert first.size == len(b"Subject: n=999\r\n\r\nold\r\n")  # no W=: read for it
        assert first.flags == {"\\Seen"}
        path = one.path("INBOX", 2)
        assert snapshot.messages[1].internaldate == datetime.fromtimestamp(
            int(path.stat().st_mtime), UTC
        )
        maildir.deliver(message(count))
        assert one.sync("INBOX").uids == (*snapshot.uids, count + 2)
        assert two.sync("INBOX").messages == one.sync("INBOX").messages


def test_a_big_delivery_beside_other_programs_changes(maildir: Maildir) -> None:
    """The watched listings a sync works from see what others did since the last one: a
    flag set by a mail reader, a file removed, hundreds delivered."""
    for n in range(3):
        maildir.deliver(message(n))
    with MailStore(maildir) as one:
        before = one.sync("INBOX")
        cur = maildir.root / "cur"
        flagged, removed = (one.path("INBOX", uid) for uid in (1, 2))
        os.rename(flagged, cur / f"{before.messages[0].key}:2,F")
        os.unlink(removed)
        for n in range(3, 303):
            maildir.deliver(message(n))
        snapshot, recent = one.select("INBOX")
        assert snapshot.uids == (1, 3, *range(4, 304))
        assert snapshot.messages[0].flags == {"\\Flagged"}
        assert snapshot.messages[0].modseq > before.highestmodseq
        assert recent == set(snapshot.uids)  # nobody had claimed the first ones either
        assert one.changes_since("INBOX", before.highestmodseq)[1] == [2]
        with MailStore(maildir) as two:
            assert two.sync("INBOX").messages == snapshot.messages


def test_status_counts(store: MailStore, maildir: Maildir) -> None:
    for n in range(3):
        maildir.deliver(message(n))
    store.sync("INBOX")
    store.store("INBOX", [1], "+", ["\\Seen"])
    store.store("INBOX", [2], "+", ["\\Deleted"])
    status = store.status("INBOX")
    assert (status.messages, status.unseen, status.deleted, status.recent) == (3, 2, 1, 3)
    assert status.size == sum(len(store.read("INBOX", uid)) for uid in (1, 2, 3))
    assert status.uidnext == 4


# --- reading --------------------------------------------------------------------------------


def test_read_gives_crlf_and_the_size_matches(store: MailStore, maildir: Maildir) -> None:
    body = b"Subject: x\r\n\r\nline\r\nbare\rcr\r\r\nend"
    maildir.deliver(body)
    cur = maildir.root / "cur"
    (cur / "4000000000.M1P1.mutt:2,S").write_bytes(b"Subject: y\n\nfrom\nmutt\n")  # no W=
    (cur / "4000000001.M1P1.crlf:2,").write_bytes(b"Subject: z\r\n\r\nalready crlf\r\n")
    snap = store.sync("INBOX")
    assert store.read("INBOX", 1) == body
    assert store.read("INBOX", 2) == b"Subject: y\r\n\r\nfrom\r\nmutt\r\n"
    assert store.read("INBOX", 3) == b"Subject: z\r\n\r\nalready crlf\r\n"
    for info in snap.messages:
        assert info.size == len(store.read("INBOX", info.uid))
        assert info.internaldate.tzinfo is not None


def test_read_follows_renames_and_reports_expunged_messages(
    maildir: Maildir, store: MailStore
) -> None:
    maildir.deliver(message(1))
    maildir.deliver(message(2))
    store.sync("INBOX")
    with MailStore(maildir) as other:
        other.store("INBOX", [1], "+", ["\\Seen"])  # renames the file behind our back
        other.store("INBOX", [2], "+", ["\\Deleted"])
        other.expunge("INBOX")
    assert number(store.read("INBOX", 1)) == 1
    with pytest.raises(MessageGoneError):
        store.read("INBOX", 2)
    with pytest.raises(MessageGoneError):
        store.path("INBOX", 99)


def test_two_files_with_one_key_become_two_messages(store: MailStore, maildir: Maildir) -> None:
    maildir.deliver(message(1))
    (info,) = store.sync("INBOX").messages
    (name,) = cur_names(maildir.root)
    (maildir.root / "cur" / f"{info.key}:2,S").write_bytes(
        (maildir.root / "cur" / name).read_bytes()
    )
    snap = store.sync("INBOX")
    assert [m.uid for m in snap.messages] == [1, 2]
    assert snap.messages[0] == info
    assert snap.messages[1].flags == {"\\Seen"} and snap.messages[1].size == info.size
    assert store.sync("INBOX") is store.sync("INBOX")  # settled: the fast path again


def test_files_removed_by_another_program_are_expunged(store: MailStore, maildir: Maildir) -> None:
    maildir.deliver(message(1))
    maildir.deliver(message(2))
    before = store.sync("INBOX")
    os.unlink(store.path("INBOX", 1))
    after = store.sync("INBOX")
    assert [m.uid for m in after.messages] == [2]
    assert after.highestmodseq > before.highestmodseq


def test_another_store_sees_changes_through_the_index(maildir: Maildir) -> None:
    maildir.deliver(message(1))
    with MailStore(maildir) as one, MailStore(maildir) as two:
        one.sync("INBOX")
        cached = two.sync("INBOX")
        one.store("INBOX", [1], "+", ["\\Seen"])
        assert two.sync("INBOX").messages[0].flags == {"\\Seen"}
        assert two.sync("INBOX").highestmodseq > cached.highestmodseq


def _age_dirs(root: Path, seconds: float) -> tuple[int, int]:
    """Set the mtimes of new/ and cur/ ``seconds`` back; returns the new (new, cur) mtimes."""
    stamps = []
    for sub in ("new", "cur"):
        then = time.time_ns() - int(seconds * 1e9)
        os.utime(root / sub, ns=(then, then))
        stamps.append(then)
    return stamps[0], stamps[1]


def test_a_change_in_the_same_mtime_tick_as_the_listing_is_seen(
    store: MailStore, maildir: Maildir
) -> None:
    """The directory mtimes alone cannot tell a change made in the same tick as the listing."""
    maildir.deliver(message(1))
    maildir.deliver(message(2))
    store.sync("INBOX")
    cur = maildir.root / "cur"
    before = os.stat(cur).st_mtime_ns
    (first,) = [
        n for n in cur_names(maildir.root) if n.startswith(store.sync("INBOX").messages[0].key)
    ]
    os.rename(cur / first, cur / f"{first.partition(':')[0]}:2,S")  # mutt, in the same tick
    os.utime(cur, ns=(before, before))
    assert store.sync("INBOX").messages[0].flags == {"\\Seen"}


def test_a_change_after_an_old_listing_is_seen(store: MailStore, maildir: Maildir) -> None:
    """With directories unchanged for a while the listing is skipped, and then a change is
    still seen: it gives the directory a new mtime."""
    maildir.deliver(message(1))
    maildir.deliver(message(2))
    store.sync("INBOX")
    _age_dirs(maildir.root, 10)
    first = store.sync("INBOX")
    assert store.sync("INBOX") is first  # nothing changed: the very same snapshot
    (name,) = [n for n in cur_names(maildir.root) if n.startswith(first.messages[0].key)]
    os.rename(maildir.root / "cur" / name, maildir.root / "cur" / f"{first.messages[0].key}:2,F")
    assert store.sync("INBOX").messages[0].flags == {"\\Flagged"}
    maildir.deliver(message(3))
    assert [m.uid for m in store.sync("INBOX").messages] == [1, 2, 3]
    os.unlink(store.path("INBOX", 2))
    assert [m.uid for m in store.sync("INBOX").messages] == [1, 3]


def test_another_store_changes_are_loaded_incrementally_and_exactly(maildir: Maildir) -> None:
    """Flag changes, expunges and arrivals by another process, read as rows changed since the
    last HIGHESTMODSEQ plus tombstones, give what a full load gives."""
    for n in range(1, 6):
        maildir.deliver(message(n))
    with MailStore(maildir) as one, MailStore(maildir) as two:
        one.sync("INBOX")
        _age_dirs(maildir.root, 10)
        cached = two.sync("INBOX")
        one.claim_recent("INBOX")  # the index changed, the messages did not
        assert two.sync("INBOX") is cached
        one.store("INBOX", [2, 4], "+", ["\\Seen", "$Work"])
        flagged = two.sync("INBOX")  # flag changes alone: replaced in place
        with MailStore(maildir) as fresh:
            assert flagged == fresh.sync("INBOX")
        assert two.read("INBOX", 4).endswith(b"body 4\r\n")
        one.store("INBOX", [3], "+", ["\\Deleted"])
        one.expunge("INBOX")
        one.append("INBOX", message(6), ["\\Flagged"])
        seen = two.sync("INBOX")
        with MailStore(maildir) as fresh:
            assert seen == fresh.sync("INBOX")
        assert [m.uid for m in seen.messages] == [1, 2, 4, 5, 6]
        assert seen.messages[1].flags == {"\\Seen", "$Work"}
        assert seen.highestmodseq > cached.highestmodseq
        assert two.read("INBOX", 6).endswith(b"body 6\r\n")


# --- APPEND, COPY, MOVE ---------------------------------------------------------------------


class FsyncLog:
    """An fsync that records the path of each file or directory it makes durable."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def __call__(self, fd: int) -> None:
        self.paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        os.fsync(fd)

    def index(self, path: Path | str, after: int = -1) -> int:
        return self.paths.index(str(path), after + 1)


def test_append_is_durable_before_it_returns(tmp_path: Path) -> None:
    log = FsyncLog()
    box = Maildir(tmp_path / "box", HOST, fsync=log)
    when = datetime(2024, 2, 29, 12, 30, 15, tzinfo=UTC)
    with MailStore(box) as store:
        store.ensure_defaults()
        log.paths.clear()
        uidvalidity, uid = store.append("Drafts", message(7), ["\\Draft", "$Label1"], when)
        folder = box.root / ".Drafts"
        path = store.path("Drafts", uid)
        assert path.parent == folder / "cur" and path.name.endswith(":2,Da")
        file = log.index(folder / "tmp" / path.name.partition(":")[0])
        new = log.index(folder / "new", after=file)
        cur = log.index(folder / "cur", after=new)
        assert file < new < cur
        (info,) = store.sync("Drafts").messages
        assert (info.uid, info.flags, info.internaldate) == (
            uid,
            frozenset({"\\Draft", "$Label1"}),
            when,
        )
        assert uidvalidity == store.status("Drafts").uidvalidity
        assert store.read("Drafts", uid) == message(7)


def test_append_and_copy_over_quota_are_refused(maildir: Maildir) -> None:
    size = len(message(1))
    with MailStore(maildir, quota_bytes=2 * size + 10) as store:
        store.append("INBOX", message(1))
        with pytest.raises(QuotaExceededError):
            store.append("INBOX", b"x" * (size + 20))
        store.append("INBOX", message(2))
        with pytest.raises(QuotaExceededError):
            store.copy("INBOX", [1], "INBOX")
        assert len(store.sync("INBOX").messages) == 2
        assert len(cur_names(maildir.root)) == 2
        assert not os.listdir(maildir.root / "tmp")


def test_copy_keeps_flags_and_date_and_is_durable(tmp_path: Path) -> None:
    log = FsyncLog()
    box = Maildir(tmp_path / "box", HOST, fsync=log)
    when = datetime(2020, 1, 1, tzinfo=UTC)
    with MailStore(box) as store:
        store.ensure_defaults()
        store.append("INBOX", message(1), ["\\Seen", "Work"], when)
        store.append("INBOX", message(2), ["\\Flagged"], when)
        store.append("Archive", message(3))
        log.paths.clear()
        uidvalidity, mapping = store.copy("INBOX", [2, 1, 99], "Archive")
        assert mapping == [(1, 2), (2, 3)]
        assert uidvalidity == store.status("Archive").uidvalidity
        assert str(box.root / ".Archive" / "cur") in log.paths
        copies = store.sync("Archive").messages[1:]
        assert [c.flags for c in copies] == [{"\\Seen", "Work"}, {"\\Flagged"}]
        assert all(c.internaldate == when for c in copies)
        assert [number(store.read("Archive", c.uid)) for c in copies] == [1, 2]
        assert len(store.sync("INBOX").messages) == 2  # the source is untouched
        originals = {m.key for m in store.sync("INBOX").messages}
        assert originals.isdisjoint(c.key for c in copies)  # a copy is its own message
        assert (box.root / ".Archive" / "dovecot-keywords").read_text() == "0 Work\n"


def test_move_renames_into_the_destination(store: MailStore, maildir: Maildir) -> None:
    store.ensure_defaults()
    for n in range(3):
        store.append("INBOX", message(n), ["\\Seen"] if n == 1 else [])
    before = store.sync("INBOX")
    keys = {m.uid: m.key for m in before.messages}
    _, mapping = store.move("INBOX", [1, 2], "Trash")
    assert mapping == [(1, 1), (2, 2)]
    assert [m.uid for m in store.sync("INBOX").messages] == [3]
    moved = store.sync("Trash").messages
    assert [m.key for m in moved] == [keys[1], keys[2]]  # the same file, renamed
    assert moved[1].flags == {"\\Seen"}
    _, expunged = store.changes_since("INBOX", before.highestmodseq)
    assert expunged == [1, 2]
    _, same = store.move("Trash", [1], "Trash")  # within one mailbox: a new UID
    assert same == [(1, 3)]
    assert [m.uid for m in store.sync("Trash").messages] == [2, 3]


# --- EXPUNGE and crashes --------------------------------------------------------------------


def test_expunge_removes_only_deleted_messages(store: MailStore, maildir: Maildir) -> None:
    for n in range(4):
        maildir.deliver(message(n))
    store.sync("INBOX")
    store.store("INBOX", [1, 2, 4], "+", ["\\Deleted"])
    assert store.expunge("INBOX", [2, 3]) == [2]  # UID EXPUNGE: only the given ones
    assert store.expunge("INBOX") == [1, 4]
    assert [m.uid for m in store.sync("INBOX").messages] == [3]
    assert len(cur_names(maildir.root)) == 1


def test_remove_takes_exactly_the_given_messages_whatever_their_flags(
    store: MailStore, maildir: Maildir
) -> None:
    for n in range(4):
        maildir.deliver(message(n))
    before = store.sync("INBOX")
    store.store("INBOX", [4], "+", ["\\Deleted"])  # an IMAP client's mark stays its own
    assert store.remove("INBOX", [1, 3, 99]) == [1, 3]
    after = store.sync("INBOX")
    assert [(m.uid, m.flags) for m in after.messages] == [
        (2, frozenset()),
        (4, frozenset({"\\Deleted"})),
    ]
    assert len(cur_names(maildir.root)) == 2
    assert store.changes_since("INBOX", before.highestmodseq)[1] == [1, 3]


def _crash_in_expunge(root: Path, after_unlink: bool) -> None:
    box = Maildir(root, HOST, fsync=no_fsync)

    def unlink(path: Path) -> None:
        if after_unlink:
            os.unlink(path)
        os._exit(3)  # killed between the steps

    store = MailStore(box, unlink=unlink)
    store.expunge("INBOX")


@pytest.mark.parametrize("after_unlink", [False, True], ids=["before-unlink", "before-row-drop"])
def test_a_crash_during_expunge_loses_nothing_and_leaves_no_ghost(
    maildir: Maildir, after_unlink: bool
) -> None:
    for n in range(3):
        maildir.deliver(message(n))
    with MailStore(maildir) as store:
        store.sync("INBOX")
        store.store("INBOX", [2], "+", ["\\Deleted"])
        before = store.sync("INBOX")
    child = FORK.Process(target=_crash_in_expunge, args=(maildir.root, after_unlink))
    child.start()
    child.join(30)
    assert child.exitcode == 3
    assert len(cur_names(maildir.root)) == (2 if after_unlink else 3)
    with MailStore(maildir) as store:
        after = store.sync("INBOX")  # finishes the expunge
        assert [m.uid for m in after.messages] == [1, 3]
        assert after.messages == (before.messages[0], before.messages[2])
        assert len(cur_names(maildir.root)) == 2
        assert store.changes_since("INBOX", before.highestmodseq)[1] == [2]
        maildir.deliver(message(9))
        assert [m.uid for m in store.sync("INBOX").messages] == [1, 3, 4]
        store.rebuild()
        assert [m.uid for m in store.sync("INBOX").messages] == [1, 3, 4]


def test_a_rebuild_finishes_an_interrupted_expunge(maildir: Maildir) -> None:
    for n in range(2):
        maildir.deliver(message(n))
    with MailStore(maildir) as store:
        store.sync("INBOX")
        store.store("INBOX", [1], "+", ["\\Deleted"])
    child = FORK.Process(target=_crash_in_expunge, args=(maildir.root, False))
    child.start()
    child.join(30)
    assert child.exitcode == 3
    with MailStore(maildir) as store:
        store.rebuild()  # the uidlist still names the marked message: it must not return
        assert [m.uid for m in store.sync("INBOX").messages] == [2]
        assert len(cur_names(maildir.root)) == 1


def test_a_crash_after_uids_were_assigned_but_not_committed(maildir: Maildir) -> None:
    """A file back in new/ whose key the index knows keeps its UID and flags."""
    maildir.deliver(message(1))
    with MailStore(maildir) as store:
        store.sync("INBOX")
        store.store("INBOX", [1], "+", ["\\Seen"])
        (name,) = cur_names(maildir.root)
        os.rename(maildir.root / "cur" / name, maildir.root / "new" / name.partition(":")[0])
        (info,) = store.sync("INBOX").messages
        assert (info.uid, info.flags) == (1, frozenset({"\\Seen"}))
        assert cur_names(maildir.root) == [name]


# --- rebuilds -------------------------------------------------------------------------------


def _populate(
    store: MailStore, maildir: Maildir
) -> dict[str, list[tuple[int, str, frozenset[str], int]]]:
    store.ensure_defaults()
    store.create_mailbox("Lists/Ünïcode")
    for n in range(6):
        maildir.deliver(message(n))
    store.sync("INBOX")
    store.store("INBOX", [1, 2], "+", ["\\Seen", "$Forwarded"])
    store.store("INBOX", [3], "+", ["\\Deleted"])
    store.expunge("INBOX")
    store.store("INBOX", [6], "+", ["\\Flagged", "Later"])
    store.append("Lists/Ünïcode", message(10), ["\\Answered"])
    store.copy("INBOX", [1, 6], "Archive")
    maildir.deliver(message(11))  # not yet synced: gets its UID in the rebuild
    return {e.name: state(store.sync(e.name)) for e in store.list_mailboxes() if e.selectable}


def test_rebuild_keeps_messages_flags_and_uids(store: MailStore, maildir: Maildir) -> None:
    uidvalidity = store.status("INBOX").uidvalidity
    before = _populate(store, maildir)
    highest = store.status("INBOX").highestmodseq
    assert store.rebuild() == (7, 9)
    after = {e.name: state(store.sync(e.name)) for e in store.list_mailboxes() if e.selectable}
    assert after == before
    assert store.status("INBOX").uidvalidity == uidvalidity
    assert store.status("INBOX").highestmodseq > highest


@pytest.mark.parametrize("damage", ["deleted", "header", "pages", "empty-wal"])
def test_a_lost_or_corrupt_index_is_rebuilt_automatically(maildir: Maildir, damage: str) -> None:
    with MailStore(maildir) as store:
        before = _populate(store, maildir)
        uidvalidities = {name: store.status(name).uidvalidity for name in before}
        highest = store.status("INBOX").highestmodseq
    index = maildir.root / INDEX_NAME
    assert not Path(f"{index}-wal").exists() or damage != "empty-wal"
    if damage == "deleted":
        index.unlink()
    elif damage == "header":
        index.write_bytes(os.urandom(8192))
    elif damage == "pages":
        with open(index, "r+b") as f:
            f.seek(4096)
            f.write(os.urandom(index.stat().st_size - 4096))
    else:
        index.write_bytes(b"")
        Path(f"{index}-wal").write_bytes(os.urandom(5000))
    with MailStore(maildir) as store:
        after = {e.name: state(store.sync(e.name)) for e in store.list_mailboxes() if e.selectable}
        assert after == before
        assert {name: store.status(name).uidvalidity for name in before} == uidvalidities
        assert store.status("INBOX").highestmodseq > highest


def test_garbage_in_an_open_index_is_rebuilt(maildir: Maildir) -> None:
    with MailStore(maildir) as store:
        before = _populate(store, maildir)
        index = maildir.root / INDEX_NAME
        store._index.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        with open(index, "r+b") as f:
            f.write(os.urandom(index.stat().st_size))
        store._cache.clear()
        after = {e.name: state(store.sync(e.name)) for e in store.list_mailboxes() if e.selectable}
        assert after == before


def test_another_process_sees_a_replaced_index(maildir: Maildir) -> None:
    maildir.deliver(message(1))
    with MailStore(maildir) as one, MailStore(maildir) as two:
        one.sync("INBOX")
        two.sync("INBOX")
        for suffix in ("", "-wal", "-shm"):
            Path(f"{maildir.root / INDEX_NAME}{suffix}").unlink()
        one.store("INBOX", [1], "+", ["\\Seen"])  # reopens: a new index, rebuilt
        assert two.sync("INBOX").messages[0].flags == {"\\Seen"}
        maildir.deliver(message(2))
        assert [m.uid for m in one.sync("INBOX").messages] == [1, 2]
        assert [m.uid for m in two.sync("INBOX").messages] == [1, 2]


def test_an_index_of_another_schema_version_is_rebuilt(maildir: Maildir) -> None:
    maildir.deliver(message(1))
    with MailStore(maildir) as store:
        before = state(store.sync("INBOX"))
    with sqlite3.connect(maildir.root / INDEX_NAME) as db:
        db.execute("PRAGMA user_version = 99")
    db.close()
    with MailStore(maildir) as store:
        assert state(store.sync("INBOX")) == before


def test_a_version_1_index_gains_the_derived_table_and_keeps_its_rows(maildir: Maildir) -> None:
    maildir.deliver(message(1))
    with MailStore(maildir) as store:
        store.sync("INBOX")
        store.store("INBOX", [1], "+", ["\\Flagged"])
        before = state(store.sync("INBOX"))
    with sqlite3.connect(maildir.root / INDEX_NAME) as db:
        db.execute("DROP TABLE derived")
        db.execute("PRAGMA user_version = 1")
        (modseqs_v1,) = db.execute("SELECT group_concat(modseq) FROM messages").fetchone()
    db.close()
    with MailStore(maildir) as store:
        assert state(store.sync("INBOX")) == before
        store.save_items("INBOX", {(1, "ENVELOPE"): b"ENVELOPE (x)"})
        assert store.cached_items("INBOX", [1], ["ENVELOPE"]) == {(1, "ENVELOPE"): b"ENVELOPE (x)"}
        conn = store._index.conn
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        # Not rebuilt: the rows are the same rows (a rebuild gives new MODSEQs).
        assert conn.execute("SELECT group_concat(modseq) FROM messages").fetchone() == (modseqs_v1,)


def test_a_damaged_uidlist_starts_over_with_a_greater_uidvalidity(maildir: Maildir) -> None:
    maildir.deliver(message(1))
    maildir.deliver(message(2))
    with MailStore(maildir) as store:
        old = store.sync("INBOX").uidvalidity
    uidlist = maildir.root / UIDLIST_NAME
    header, first, _ = uidlist.read_text().split("\n", 2)
    uidlist.write_text(f"{header}\n{first}\n{first}\n")  # one UID twice: cannot be trusted
    (maildir.root / INDEX_NAME).unlink()
    with MailStore(maildir) as store:
        snap = store.sync("INBOX")
        assert snap.uidvalidity > old  # RFC 9051 2.3.1.1: the UIDs may have changed
        assert [m.uid for m in snap.messages] == [1, 2]


# --- mailboxes ------------------------------------------------------------------------------


def test_ensure_defaults_is_idempotent_and_cheap(store: MailStore, maildir: Maildir) -> None:
    store.ensure_defaults()
    entries = store.list_mailboxes()
    assert [(e.name, e.special_use, e.subscribed) for e in entries] == [
        ("INBOX", None, True),
        ("Archive", "\\Archive", True),
        ("Drafts", "\\Drafts", True),
        ("Junk", "\\Junk", True),
        ("Sent", "\\Sent", True),
        ("Trash", "\\Trash", True),
    ]
    files = {p: p.stat().st_mtime_ns for p in maildir.root.iterdir() if p.is_file()}
    started = time.perf_counter()
    for _ in range(20):
        store.ensure_defaults()
    assert (time.perf_counter() - started) / 20 < 0.01
    assert {p: p.stat().st_mtime_ns for p in maildir.root.iterdir() if p.is_file()} == files
    store.unsubscribe("Junk")
    store.rename_mailbox("Sent", "Sent Items")  # the special use moves along
    store.ensure_defaults()
    names = {e.name: e for e in store.list_mailboxes()}
    assert "Sent" not in names and names["Sent Items"].special_use == "\\Sent"
    assert not names["Junk"].subscribed
    assert (maildir.root / "subscriptions").read_text().splitlines() == [
        "INBOX", "Sent Items", "Drafts", "Trash", "Archive"
    ]  # fmt: skip


def test_create_special_use(store: MailStore) -> None:
    store.create_mailbox("Old mail", "\\Archive")
    assert {e.name: e.special_use for e in store.list_mailboxes()}["Old mail"] == "\\Archive"
    with pytest.raises(SpecialUseError):
        store.create_mailbox("All", "\\All")
    assert "All" not in {e.name for e in store.list_mailboxes()}


def test_delete_follows_rfc_9051(store: MailStore, maildir: Maildir) -> None:
    with pytest.raises(StoreError, match="INBOX"):
        store.delete_mailbox("inbox")
    store.create_mailbox("a")
    store.create_mailbox("a/b")
    store.append("a", message(1))
    store.subscribe("a")
    store.delete_mailbox("a")  # has children: messages go, "a" stays as a parent
    entries = {e.name: e for e in store.list_mailboxes()}
    assert not entries["a"].selectable and entries["a"].has_children and entries["a"].subscribed
    with pytest.raises(MailboxNotFoundError):
        store.sync("a")
    with pytest.raises(StoreError, match="children"):
        store.delete_mailbox("a")  # RFC 9051 6.3.5: \Noselect with children
    store.delete_mailbox("a/b")
    assert [e.name for e in store.list_mailboxes()] == ["INBOX"]
    assert not any(n.startswith(("mailroom-deleted", ".a")) for n in os.listdir(maildir.root))
    with pytest.raises(MailboxNotFoundError):
        store.delete_mailbox("a")


def test_rename_moves_children_subscriptions_and_keeps_uids(
    store: MailStore, maildir: Maildir
) -> None:
    store.create_mailbox("Work")
    store.create_mailbox("Work/2024")
    store.create_mailbox("Workshop")
    store.append("Work/2024", message(1), ["\\Seen"])
    store.subscribe("Work/2024")
    before = store.sync("Work/2024")
    store.rename_mailbox("Work", "Jobs/Old")
    names = [e.name for e in store.list_mailboxes()]
    assert names == ["INBOX", "Jobs", "Jobs/Old", "Jobs/Old/2024", "Workshop"]
    after = store.sync("Jobs/Old/2024")
    assert (after.uidvalidity, state(after)) == (before.uidvalidity, state(before))
    assert store.subscriptions() == ["Jobs/Old/2024"]
    with pytest.raises(MailboxExistsError):
        store.rename_mailbox("Workshop", "Jobs/Old")
    with pytest.raises(StoreError):
        store.rename_mailbox("Jobs", "Jobs/Inner")
    with pytest.raises(MailboxExistsError):
        store.rename_mailbox("Workshop", "inbox")


def test_rename_inbox_moves_its_messages(store: MailStore, maildir: Maildir) -> None:
    store.create_mailbox("INBOX/Child")
    for n in range(2):
        maildir.deliver(message(n))
    store.rename_mailbox("INBOX", "Old Inbox")
    assert store.sync("INBOX").messages == ()
    assert [number(store.read("Old Inbox", m.uid)) for m in store.sync("Old Inbox").messages] == [
        0,
        1,
    ]
    assert "INBOX/Child" in {e.name for e in store.list_mailboxes()}


# --- several processes ----------------------------------------------------------------------

MESSAGES = 120


def _deliverer(root: Path, done: EventType, rebuilds: Synchronized[int]) -> None:
    box = Maildir(root, HOST, fsync=no_fsync)
    for n in range(MESSAGES):
        box.deliver(message(n))
        time.sleep(0.003)
    deadline = time.monotonic() + 20
    while rebuilds.value < 3 and time.monotonic() < deadline:  # rebuilds among the others
        time.sleep(0.01)
    done.set()


Observed = tuple[dict[int, str], dict[str, int]]  # uid -> key, key -> number in the body


def _worker(
    root: Path, flag: str, expunger: bool, done: EventType, out: multiprocessing.Queue[Observed]
) -> None:
    box = Maildir(root, HOST, fsync=no_fsync)
    seen: dict[int, str] = {}
    numbers: dict[str, int] = {}
    deadline = time.monotonic() + 40
    with MailStore(box) as store:
        while time.monotonic() < deadline:
            finished = done.is_set()
            snap = store.sync("INBOX")
            for m in snap.messages:
                assert seen.setdefault(m.uid, m.key) == m.key, "a UID changed its message"
                if m.key not in numbers:
                    try:
                        numbers[m.key] = number(store.read("INBOX", m.uid))
                    except MessageGoneError:
                        continue
            todo = [m.uid for m in snap.messages if flag not in m.flags]
            store.store("INBOX", todo, "+", [flag])
            doomed = [
                m.uid
                for m in snap.messages
                if numbers.get(m.key, 1) % 5 == 0 and "\\Deleted" not in m.flags
            ]
            if expunger and doomed:
                store.store("INBOX", doomed, "+", ["\\Deleted"])
            if doomed or any("\\Deleted" in m.flags for m in snap.messages):
                store.expunge("INBOX")
            unread = [m for m in snap.messages if m.key not in numbers]
            if finished and not todo and not doomed and not unread:
                break
        else:
            raise AssertionError("the mailbox never settled")
    out.put((seen, numbers))


def _rebuilder(root: Path, done: EventType, rebuilds: Synchronized[int]) -> None:
    box = Maildir(root, HOST, fsync=no_fsync)
    with MailStore(box) as store:
        while not done.is_set():
            store.rebuild()
            rebuilds.value += 1
            time.sleep(0.02)


def test_several_processes_at_once(maildir: Maildir) -> None:
    """A deliverer, two stores flagging and expunging, and a rebuild, all at once: no lost
    update, no duplicate UID, no message lost, no message with two UIDs."""
    maildir.create()
    done = FORK.Event()
    out: multiprocessing.Queue[Observed] = FORK.Queue()
    rebuilds: Synchronized[int] = FORK.Value("i", 0)
    procs = [
        FORK.Process(target=_deliverer, args=(maildir.root, done, rebuilds)),
        FORK.Process(target=_worker, args=(maildir.root, "\\Flagged", True, done, out)),
        FORK.Process(target=_worker, args=(maildir.root, "\\Seen", False, done, out)),
        FORK.Process(target=_rebuilder, args=(maildir.root, done, rebuilds)),
    ]
    for proc in procs:
        proc.start()
    results: list[Observed] = []
    for _ in range(2):
        try:
            results.append(out.get(timeout=60))
        except queue.Empty:
            break
    for proc in procs:
        proc.join(30)
    assert [proc.exitcode for proc in procs] == [0, 0, 0, 0]
    assert len(results) == 2
    assert rebuilds.value >= 3  # the rebuilds really ran between the others
    with MailStore(maildir) as store:
        snap = store.sync("INBOX")
        final = {m.key: m for m in snap.messages}
        contents = {number(store.read("INBOX", m.uid)): m for m in snap.messages}
    assert sorted(contents) == [n for n in range(MESSAGES) if n % 5]  # none lost, none back
    assert all(m.flags == {"\\Flagged", "\\Seen"} for m in snap.messages)  # no lost update
    assert len(final) == len(snap.messages) == len(cur_names(maildir.root))
    assert not os.listdir(maildir.root / "new")
    uid_of: dict[str, int] = {m.key: m.uid for m in snap.messages}
    key_of: dict[int, str] = {m.uid: m.key for m in snap.messages}
    for seen, _numbers in results:
        for uid, key in seen.items():
            assert uid_of.setdefault(key, uid) == uid, "one message, two UIDs"
            assert key_of.setdefault(uid, key) == key, "one UID, two messages"
    assert len(uid_of) == MESSAGES


# --- speed ----------------------------------------------------------------------------------

COUNT = 10_000


Timings = tuple[float, float, list[int]]  # first sync, no-change sync, sizes


def _sync_fifos(root: Path, out: multiprocessing.Queue[Timings]) -> None:
    """Sync a folder of FIFOs named like deliveries: opening one would block for ever."""
    new = root / "new"
    for n in range(COUNT):
        os.mkfifo(new / f"{1700000000 + n // 1000}.M{n:06d}P1R{n:016x}.host,S={n},W={n + 7}")
    with MailStore(Maildir(root, HOST, fsync=no_fsync)) as store:
        started = time.perf_counter()
        first = store.sync("INBOX")
        first_time = time.perf_counter() - started
        times = []
        for _ in range(5):
            started = time.perf_counter()
            again = store.sync("INBOX")
            times.append(time.perf_counter() - started)
        assert again is first
        sizes = [m.size for m in first.messages]
    out.put((first_time, min(times), sizes))


def test_sync_of_10000_messages_reads_no_file_and_is_fast(maildir: Maildir) -> None:
    maildir.create()
    out: multiprocessing.Queue[Timings] = FORK.Queue()
    child = FORK.Process(target=_sync_fifos, args=(maildir.root, out))
    child.start()
    try:
        first_time, unchanged_time, sizes = out.get(timeout=45)
    except queue.Empty:
        child.kill()
        pytest.fail("sync opened a message file (or took far too long)")
    finally:
        child.join(10)
    assert child.exitcode == 0
    assert sizes == [n + 7 for n in range(COUNT)]  # from W=, in delivery order
    assert first_time < 5.0, first_time
    assert unchanged_time < 0.1, unchanged_time
    print(f"10,000 messages: first sync {first_time * 1000:.0f} ms, "
          f"no-change sync {unchanged_time * 1000:.1f} ms")  # fmt: skip


class CountingListings(Listings):
    """The process's listings, counting the full listings of cur/ asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.listed = 0

    def names(self, path: str) -> tuple[tuple[int, int] | None, frozenset[str]]:
        self.listed += path.endswith("/cur")
        return super().names(path)


def test_flag_changes_are_synced_from_the_changes_alone_and_exactly(maildir: Maildir) -> None:
    """Another process's STORE: the next sync checks cur/ from the names that changed, not a
    listing of all of them, and still sees a rename by another program at the same time."""
    for n in range(1, 6):
        maildir.deliver(message(n))
    listings = CountingListings()
    with MailStore(maildir) as one, MailStore(maildir, listings=listings) as two:
        one.sync("INBOX")
        two.sync("INBOX")
        for uids in ([2], [3, 4], [2, 5]):
            one.store("INBOX", uids, "+", ["\\Flagged"])
            listings.listed = 0
            snap = two.sync("INBOX")
            assert listings.listed == 0
            with MailStore(maildir) as fresh:
                assert snap == fresh.sync("INBOX")
        one.store("INBOX", [3], "+", ["\\Answered"])
        key = snap.messages[0].key
        (name,) = [n for n in os.listdir(maildir.root / "cur") if n.startswith(f"{key}:")]
        os.rename(maildir.root / "cur" / name, maildir.root / "cur" / f"{name}S")  # a MUA
        snap = two.sync("INBOX")
        assert snap.messages[0].flags == {"\\Seen"} and "\\Answered" in snap.messages[2].flags
        with MailStore(maildir) as fresh:
            assert snap == fresh.sync("INBOX")


def test_changed_since_is_the_messages_above_a_modseq(
    maildir: Maildir, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mailstore, "CHANGE_LOG_LENGTH", 4)  # also past the end of the log
    for n in range(1, 9):
        maildir.deliver(message(n))
    with MailStore(maildir) as one, MailStore(maildir) as two:
        snaps = [two.sync("INBOX")]
        for i in range(12):
            if i == 5:
                maildir.deliver(message(9))  # an arrival among the flag changes
            one.store("INBOX", [1 + i % 8, 1 + (i * 3) % 8], "-" if i % 2 else "+", ["\\Seen"])
            snaps.append(two.sync("INBOX"))
        for i, earlier in enumerate(snaps):
            for later in snaps[i:]:
                modseq = earlier.highestmodseq
                assert later.changed_since(modseq) == [
                    m for m in later.messages if m.modseq > modseq
                ]
        assert any(s.log for s in snaps)  # the log was used, not only the full look


def test_an_index_name_not_on_disk_is_caught_without_a_listing(maildir: Maildir) -> None:
    """The changes checked are those of cur/ and those of the index: an index that names a
    file cur/ never got (nothing changed on disk) is not taken for the truth."""
    for n in range(1, 4):
        maildir.deliver(message(n))
    with MailStore(maildir) as one, MailStore(maildir) as two:
        one.sync("INBOX")
        two.sync("INBOX")
        one.store("INBOX", [1], "+", ["\\Seen"])
        two.sync("INBOX")  # confirmed from the changes: the next check starts here
        with sqlite3.connect(maildir.root / INDEX_NAME) as db:  # another writer, gone wrong
            (name,) = db.execute("SELECT filename FROM messages WHERE uid = 2").fetchone()
            db.execute(
                "UPDATE messages SET filename = ?, flags = '\\Flagged', modseq = 100 WHERE uid = 2",
                (f"{name.partition(':')[0]}:2,F",),
            )
            db.execute("UPDATE mailboxes SET highestmodseq = 100")
        snap = two.sync("INBOX")
        assert snap.messages[1].flags == frozenset()  # what the file on disk says
        assert two.read("INBOX", 2).endswith(b"body 2\r\n")
        with MailStore(maildir) as fresh:
            assert snap == fresh.sync("INBOX")
