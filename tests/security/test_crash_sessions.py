"""Crash safety of the mail store under the IMAP and POP3 sessions: kill -9 at random moments
during APPEND, EXPUNGE and POP3 UPDATE (DELE + QUIT), in forked sessions on a real Maildir.

Afterwards every message that got a success reply (APPEND's OK, or a message never deleted) is
there exactly once, or at worst twice, never missing; what an acknowledged EXPUNGE or QUIT
removed stays removed; no message is half-written; and the index agrees with the Maildir, also
after ``MailStore.rebuild`` (what ``mailroomctl index rebuild`` runs), which keeps every UID.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from mailroom.accounts import User
from mailroom.addresses import parse_address
from mailroom.imap.session import IMAPSession
from mailroom.maildir import Maildir
from mailroom.mailstore import INBOX, MailStore
from mailroom.pop3.maildrop import StoreMaildrop
from mailroom.pop3.session import POP3Session
from mailroom.pop3.session import SessionConfig as POP3Config
from tests.imap_transcript import PASSWORD, make_config

HOST = "mail.example.test"
ALICE = "alice@example.test"
ITERATIONS = {"append": 70, "expunge": 50, "pop3": 50}  # 170 kills, with the 2 server tests 200+


def _store(root: Path) -> MailStore:
    return MailStore(Maildir(root, HOST))


def _message(label: str) -> bytes:
    return f"From: x@remote.test\r\nSubject: {label}\r\n\r\nbody of {label}\r\n".encode() * 1


def _forked(work: Callable[[int], None]) -> tuple[int, int]:
    """Run ``work(write_fd)`` in a forked child; the child's pid and the pipe's read end."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 0
        try:
            os.close(r)
            work(w)
        except BaseException:
            traceback.print_exc()
            status = 1
        os._exit(status)
    os.close(w)
    return pid, r


def _kill_after(pid: int, r: int, delay: float | None) -> bytes:
    """SIGKILL the child after ``delay`` (None: let it finish); everything it wrote."""
    if delay is not None:
        time.sleep(delay)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert not (os.WIFEXITED(status) and os.WEXITSTATUS(status)), "the child session failed"
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    return b"".join(chunks)


def _duration(work: Callable[[int], None]) -> float:
    """How long ``work`` takes in a child left alone: the kills land uniformly within it."""
    start = time.monotonic()
    _kill_after(*_forked(work), None)
    return time.monotonic() - start


def _labels(root: Path) -> Counter[str]:
    """Each stored message's label, counted, after checking the index against the Maildir."""
    with _store(root) as store:
        snapshot = store.sync(INBOX)
        before = {(m.uid, m.key) for m in snapshot.messages}
        found: Counter[str] = Counter()
        for m in snapshot.messages:
            data = store.read(INBOX, m.uid)
            label = data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
            assert data == _message(label), f"message {m.uid} is half-written"
            found[label] += 1
        on_disk = {
            name.split(":", 1)[0] for sub in ("new", "cur") for name in os.listdir(root / sub)
        }
        assert {key for _, key in before} == on_disk, "the index and the Maildir disagree"
        store.rebuild()
        after = {(m.uid, m.key) for m in store.sync(INBOX).messages}
        assert after == before, "rebuilding the index changed the UIDs"
    return found


def _uids(root: Path, prefix: str) -> dict[str, list[int]]:
    """The UIDs of the stored messages whose label starts with ``prefix``, by label."""
    with _store(root) as store:
        found: dict[str, list[int]] = {}
        for m in store.sync(INBOX).messages:
            data = store.read(INBOX, m.uid)
            label = data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
            if label.startswith(prefix):
                found.setdefault(label, []).append(m.uid)
    return found


def _imap(store: MailStore) -> IMAPSession:
    user = User(parse_address(ALICE), True, 0)
    check: Callable[[str, str], User | None] = lambda u, p: user if p == PASSWORD else None  # noqa: E731
    session = IMAPSession(make_config(store, authenticate=check))
    session.greeting()
    out = session.feed(f'L LOGIN {ALICE} "{PASSWORD}"\r\n'.encode()).data
    assert b"L OK" in out, out
    return session


def test_kill_during_append(tmp_path: Path) -> None:
    rng = random.Random(12)
    acknowledged: set[str] = set()
    _store(tmp_path).close()

    def appender(i: int) -> Callable[[int], None]:
        def work(w: int) -> None:
            session = _imap(_store(tmp_path))
            for k in range(4):
                msg = _message(f"append {i}.{k}")
                out = session.feed(b"a%d APPEND INBOX {%d+}\r\n%s\r\n" % (k, len(msg), msg))
                os.write(w, out.data)

        return work

    span = _duration(appender(-1))
    acknowledged |= {f"append -1.{k}" for k in range(4)}
    for i in range(ITERATIONS["append"]):
        out = _kill_after(*_forked(appender(i)), rng.uniform(0, span))
        for line in out.split(b"\r\n"):
            if line.startswith(b"a") and b" OK [APPENDUID" in line:
                acknowledged.add(f"append {i}.{int(line[1:].split()[0])}")
    found = _labels(tmp_path)
    print(
        f"append: {len(acknowledged)} of {4 * ITERATIONS['append']} acknowledged, {len(found)} stored"
    )
    assert acknowledged, "every kill came before the first APPEND: adjust the timing"
    assert len(acknowledged) < 4 * ITERATIONS["append"], "no kill hit an APPEND"
    assert acknowledged <= set(found), f"lost {acknowledged - set(found)}"
    assert max(found.values()) <= 2


def test_kill_during_expunge(tmp_path: Path) -> None:
    """Each kill is judged on its own: the messages its EXPUNGE was removing are, right after
    the kill, either gone or still there under the UID they had (a message coming back under a
    new UID would show as new mail, and twice in a client that kept the old one)."""
    rng = random.Random(34)
    keepers: dict[str, int] = {}  # label -> UID, which no crash may change
    gone: set[str] = set()  # expunges that were acknowledged
    survived = 0
    for i in range(ITERATIONS["expunge"]):
        doomed: dict[str, int] = {}
        with _store(tmp_path) as store:
            for k in range(3):
                doomed[f"doomed {i}.{k}"] = store.append(
                    INBOX, _message(f"doomed {i}.{k}"), ["\\Deleted"]
                )[1]
                keepers[f"keep {i}.{k}"] = store.append(INBOX, _message(f"keep {i}.{k}"), [])[1]

        def work(w: int) -> None:
            session = _imap(_store(tmp_path))
            session.feed(b"s SELECT INBOX\r\n")
            os.write(w, session.feed(b"e EXPUNGE\r\n").data)

        if i == 0:
            span = _duration(work)
            gone |= set(doomed)
            continue
        out = _kill_after(*_forked(work), rng.uniform(0, span))
        left = _uids(tmp_path, f"doomed {i}.")
        if b"e OK" in out:
            gone |= set(doomed)
            assert not left, f"acknowledged expunge, still there: {left}"
        for label, uids in left.items():
            assert uids == [doomed[label]], f"{label} came back as {uids}, was {doomed[label]}"
        survived += len(left)
    found = _labels(tmp_path)
    print(f"expunge: {len(gone) // 3} of {ITERATIONS['expunge']} acknowledged, {survived} kept")
    assert len(gone) > 3, "no EXPUNGE finished before its kill: adjust the timing"
    assert len(gone) < 3 * ITERATIONS["expunge"], "no kill hit an EXPUNGE"
    assert all(found[label] == 1 for label in keepers), "a kept message was lost or doubled"
    assert not gone & set(found), f"acknowledged expunges came back: {gone & set(found)}"
    kept = _uids(tmp_path, "keep ")
    assert {label: uids[0] for label, uids in kept.items()} == keepers, "a UID changed"


def test_kill_during_pop3_update(tmp_path: Path) -> None:
    """Each kill on its own: killed before QUIT was sent, nothing of the session's DELEs is
    done (RFC 1939: deletions happen in the UPDATE state only); after an acknowledged QUIT its
    messages are gone; in between either is fine, but a kept message never goes."""
    rng = random.Random(56)
    keepers: set[str] = set()
    gone: set[str] = set()
    before_quit = 0
    user = User(parse_address(ALICE), True, 0)
    for i in range(ITERATIONS["pop3"]):
        with _store(tmp_path) as store:
            for k in range(2):
                store.append(INBOX, _message(f"doomed {i}.{k}"), [])
                store.append(INBOX, _message(f"keep {i}.{k}"), [])
                keepers.add(f"keep {i}.{k}")
            order = [store.read(INBOX, m.uid) for m in store.sync(INBOX).messages]
        mine = b"Subject: doomed %d." % i
        doomed = [n + 1 for n, data in enumerate(order) if mine in data]

        def work(w: int, doomed: list[int] = doomed) -> None:
            config = POP3Config(
                hostname=HOST,
                authenticate=lambda u, p: user,
                open_maildrop=lambda u: StoreMaildrop.open(tmp_path, lambda: _store(tmp_path)),
                implicit_tls=True,
            )
            session = POP3Session(config)
            session.feed(f"USER {ALICE}\r\nPASS x\r\n".encode())
            session.feed(b"".join(b"DELE %d\r\n" % n for n in doomed))
            os.write(w, b"QUIT SENT\n")
            os.write(w, session.feed(b"QUIT\r\n").data)

        if i == 0:
            span = _duration(work)
            gone |= {f"doomed {i}.{k}" for k in range(2)}
            continue
        out = _kill_after(*_forked(work), rng.uniform(0, span))
        left = _uids(tmp_path, f"doomed {i}.")
        if b"QUIT SENT" not in out:
            before_quit += 1
            assert sorted(left) == [f"doomed {i}.0", f"doomed {i}.1"], (
                f"deleted before QUIT: {left}"
            )
            assert all(len(uids) == 1 for uids in left.values()), left
        elif b"+OK" in out.split(b"QUIT SENT\n", 1)[1] and b"deleted" in out:
            gone |= {f"doomed {i}.{k}" for k in range(2)}
            assert not left, f"acknowledged QUIT, still there: {left}"
    found = _labels(tmp_path)
    print(f"pop3: {len(gone) // 2} of {ITERATIONS['pop3']} acknowledged, {before_quit} before QUIT")
    assert len(gone) > 2, "no QUIT finished before its kill: adjust the timing"
    assert len(gone) < 2 * ITERATIONS["pop3"], "no kill hit a POP3 session"
    assert before_quit, "every kill came after QUIT was sent: adjust the timing"
    assert all(found[label] == 1 for label in keepers), "a kept message was lost or doubled"
    assert not gone & set(found), f"acknowledged deletions came back: {gone & set(found)}"
