"""mailroom.queue: round trips, durability order, crashes at every step, corruption, locks, ids."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from mailroom.config import OutboundSettings
from mailroom.errors import DeliveryError
from mailroom.queue import (
    ORPHAN_SECONDS,
    CorruptMessageError,
    InvalidQueueIdError,
    MessageNotFoundError,
    Queue,
    QueuedMessage,
    QueueError,
    RecipientState,
    expired,
    needs_delay_warning,
    next_attempt,
    validate_id,
)

NOW = 1_700_000_000.0
DATA = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n.\r\nbare\nlf \x00 \xff\r\n"
RCPTS = ["b@example.net", "c@example.com"]
ID_RE = re.compile(r"^[0-9A-F]{24}$")


class FsyncRecorder:
    """An injectable fsync that records what it synced and can fail or crash at a call."""

    def __init__(self, on_call: Callable[[int, int], None] = lambda n, fd: None) -> None:
        self.paths: list[str] = []
        self.on_call = on_call

    def __call__(self, fd: int) -> None:
        self.paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        self.on_call(len(self.paths), fd)
        os.fsync(fd)


def files(queue: Queue) -> list[str]:
    return sorted(os.listdir(queue.directory))


def leftovers(queue: Queue) -> list[str]:
    return sorted(os.listdir(queue.directory / "tmp"))


# --- round trips ---------------------------------------------------------------------------


def test_enqueue_load_read_round_trip(tmp_path: Path) -> None:
    queue = Queue(tmp_path / "queue")
    msg_id = queue.enqueue("a@example.org", RCPTS, DATA, NOW)
    assert ID_RE.match(msg_id)
    assert files(queue) == [f"{msg_id}.eml", f"{msg_id}.json", "lock", "tmp"]
    assert leftovers(queue) == []
    assert queue.read(msg_id) == DATA  # exactly as given: no line-end changes
    msg = queue.load(msg_id)
    assert msg.id == msg_id and msg.sender == "a@example.org"
    assert msg.created == NOW and msg.size == len(DATA) and not msg.delay_warned
    assert [r.address for r in msg.recipients] == RCPTS
    for r in msg.recipients:
        assert (r.state, r.attempts, r.next_attempt) == (RecipientState.PENDING, 0, NOW)
        assert (r.last_error, r.remote_mta, r.status) == ("", "", "")
    assert queue.list() == [msg]
    assert queue.ids() == [msg_id]


def test_modes(tmp_path: Path) -> None:
    queue = Queue(tmp_path / "queue")
    msg_id = queue.enqueue("a@example.org", RCPTS, DATA, NOW)
    for name in ("", "tmp", "lock"):
        assert stat.S_IMODE((queue.directory / name).stat().st_mode) == 0o700
    for name in (f"{msg_id}.eml", f"{msg_id}.json"):
        assert stat.S_IMODE((queue.directory / name).stat().st_mode) == 0o600


def test_save_persists_state(tmp_path: Path) -> None:
    queue = Queue(tmp_path / "queue")
    msg = queue.load(queue.enqueue("", RCPTS, DATA, NOW, envid="ENV1"))
    b, c = msg.recipients
    new = replace(
        msg,
        delay_warned=True,
        recipients=(
            replace(b, state=RecipientState.DELIVERED, attempts=1, remote_mta="mx.example.net"),
            replace(
                c,
                state=RecipientState.DEFERRED,
                attempts=1,
                next_attempt=NOW + 60,
                last_attempt=NOW,
                last_error="451 4.7.1 greylisted, try later",
                remote_mta="mx.example.com",
                status="4.7.1",
            ),
        ),
    )
    queue.save(new)
    assert queue.load(msg.id) == new
    assert Queue(queue.directory).list() == [new]  # another instance (process) sees it
    assert new.envid == "ENV1" and new.sender == ""
    assert leftovers(queue) == []


def test_remove_deletes_json_eml_and_lock(tmp_path: Path) -> None:
    queue = Queue(tmp_path / "queue")
    msg_id = queue.enqueue("a@example.org", RCPTS, DATA, NOW)
    with queue.lock(msg_id) as held:
        assert held
        queue.remove(msg_id)
    assert files(queue) == ["lock", "tmp"]
    assert os.listdir(queue.directory / "lock") == []
    assert queue.list() == []
    with pytest.raises(MessageNotFoundError):
        queue.load(msg_id)
    with pytest.raises(MessageNotFoundError):
        queue.read(msg_id)
    with pytest.raises(MessageNotFoundError):
        queue.remove(msg_id)


def test_save_after_remove_does_not_bring_it_back(tmp_path: Path) -> None:
    queue = Queue(tmp_path / "queue")
    msg = queue.load(queue.enqueue("a@example.org", RCPTS, DATA, NOW))
    queue.remove(msg.id)
    with pytest.raises(MessageNotFoundError):
        queue.save(replace(msg, delay_warned=True))
    assert files(queue) == ["lock", "tmp"] and leftovers(queue) == []


def test_list_is_oldest_first_and_ids_unique(tmp_path: Path) -> None:
    queue = Queue(tmp_path / "queue")
    ids = [queue.enqueue("a@example.org", ["b@example.net"], DATA, NOW + i) for i in range(20)]
    ids += [queue.enqueue("a@example.org", ["b@example.net"], DATA, NOW + 100) for _ in range(50)]
    assert len(set(ids)) == len(ids)
    assert [m.id for m in queue.list()][:20] == ids[:20] == sorted(ids[:20])
    assert all(ID_RE.match(i) for i in ids)


def test_enqueue_refuses_no_recipients(tmp_path: Path) -> None:
    queue = Queue(tmp_path / "queue")
    with pytest.raises(ValueError):
        queue.enqueue("a@example.org", [], DATA, NOW)
    with pytest.raises(ValueError):
        queue.enqueue("a@example.org", "b@example.net", DATA, NOW)


def test_missing_directory_is_an_empty_queue(tmp_path: Path) -> None:
    queue = Queue(tmp_path / "nothing")
    assert queue.list() == [] and queue.due(NOW) == [] and queue.clean(NOW) == 0
    assert queue.flush() == 0


# --- due, flush, retry arithmetic -----------------------------------------------------------


def _defer(queue: Queue, msg_id: str, until: float) -> QueuedMessage:
    msg = queue.load(msg_id)
    msg = replace(
        msg,
        recipients=tuple(
            replace(r, state=RecipientState.DEFERRED, attempts=1, next_attempt=until)
            for r in msg.recipients
        ),
    )
    queue.save(msg)
    return msg


def test_due_and_done(tmp_path: Path) -> None:
    queue = Queue(tmp_path / "queue")
    fresh = queue.enqueue("a@example.org", RCPTS, DATA, NOW)
    later = queue.enqueue("a@example.org", RCPTS, DATA, NOW + 1)
    _defer(queue, later, NOW + 300)
    finished = queue.load(queue.enqueue("a@example.org", RCPTS, DATA, NOW))
    states = (RecipientState.DELIVERED, RecipientState.FAILED)
    finished = replace(
        finished,
        recipients=tuple(
            replace(r, state=s) for r, s in zip(finished.recipients, states, strict=True)
        ),
    )
    queue.save(finished)
    assert finished.done and not finished.due(NOW + 10**9) and finished.active == ()
    assert [m.id for m in queue.due(NOW)] == [fresh]
    assert [m.id for m in queue.due(NOW + 300)] == [fresh, later]
    assert not queue.load(fresh).done


def test_flush_makes_deferred_due_and_skips_locked(tmp_path: Path) -> None:
    queue = Queue(tmp_path / "queue")
    a = queue.enqueue("a@example.org", RCPTS, DATA, NOW)
    b = queue.enqueue("a@example.org", RCPTS, DATA, NOW + 1)
    _defer(queue, a, NOW + 3600)
    _defer(queue, b, NOW + 3600)
    assert queue.due(NOW) == []
    with queue.lock(b) as held:
        assert held
        assert queue.flush() == 1
    assert [m.id for m in queue.due(NOW)] == [a]
    assert all(r.next_attempt == 0 for r in queue.load(a).recipients)
    assert queue.flush() == 1  # b now; a is already due
    assert [m.id for m in queue.due(NOW)] == [a, b]


def test_next_attempt_follows_schedule_then_interval() -> None:
    settings = OutboundSettings(retry_schedule_seconds=[60, 300, 1800], retry_interval_seconds=7200)
    assert next_attempt(0, NOW, settings) == NOW
    assert next_attempt(1, NOW, settings) == NOW + 60
    assert next_attempt(2, NOW, settings) == NOW + 300
    assert next_attempt(3, NOW, settings) == NOW + 1800
    assert next_attempt(4, NOW, settings) == NOW + 7200
    assert next_attempt(40, NOW, settings) == NOW + 7200
    assert next_attempt(1, NOW, OutboundSettings(retry_schedule_seconds=[])) == NOW + 3600


def test_expired_and_delay_warning(tmp_path: Path) -> None:
    settings = OutboundSettings(give_up_seconds=86400, delay_warning_seconds=4 * 3600)
    queue = Queue(tmp_path / "queue")
    msg = queue.load(queue.enqueue("a@example.org", RCPTS, DATA, NOW))
    assert not expired(msg, NOW + 86399, settings)
    assert expired(msg, NOW + 86400, settings)
    assert not needs_delay_warning(msg, NOW + 4 * 3600 - 1, settings)
    assert needs_delay_warning(msg, NOW + 4 * 3600, settings)
    assert not needs_delay_warning(replace(msg, delay_warned=True), NOW + 5 * 3600, settings)
    assert not needs_delay_warning(msg, NOW + 86400, settings)  # a bounce is due instead
    off = OutboundSettings(delay_warning_seconds=0)
    assert not needs_delay_warning(msg, NOW + 5 * 3600, off)


# --- durability: order of fsyncs, failures, crashes -----------------------------------------


def test_enqueue_fsyncs_eml_then_json_then_directory(tmp_path: Path) -> None:
    recorder = FsyncRecorder()
    queue = Queue(tmp_path / "queue", fsync=recorder)
    queue.enqueue("a@example.org", RCPTS, DATA, NOW)  # creates the directories
    recorder.paths.clear()
    msg_id = queue.enqueue("a@example.org", RCPTS, DATA, NOW)
    qdir = str(queue.directory)
    assert len(recorder.paths) == 3
    eml_tmp, json_tmp, directory = recorder.paths
    assert eml_tmp.startswith(f"{qdir}/tmp/{msg_id}.eml.")
    assert json_tmp.startswith(f"{qdir}/tmp/{msg_id}.json.")
    assert directory == qdir


def test_save_fsyncs_tmp_then_directory(tmp_path: Path) -> None:
    recorder = FsyncRecorder()
    queue = Queue(tmp_path / "queue", fsync=recorder)
    msg = queue.load(queue.enqueue("a@example.org", RCPTS, DATA, NOW))
    recorder.paths.clear()
    queue.save(replace(msg, delay_warned=True))
    qdir = str(queue.directory)
    assert len(recorder.paths) == 2
    assert recorder.paths[0].startswith(f"{qdir}/tmp/{msg.id}.json.")
    assert recorder.paths[1] == qdir


def _failing_at(call: int) -> FsyncRecorder:
    def fail(n: int, fd: int) -> None:
        if n == call:
            raise OSError(28, "No space left on device")

    return FsyncRecorder(fail)


@pytest.mark.parametrize("call", [1, 2, 3])
def test_enqueue_fsync_failure_leaves_nothing(tmp_path: Path, call: int) -> None:
    queue = Queue(tmp_path / "queue")
    queue.enqueue("a@example.org", RCPTS, b"first", NOW)  # directories exist
    [first] = queue.ids()
    queue.fsync = _failing_at(call)
    with pytest.raises(DeliveryError) as info:
        queue.enqueue("a@example.org", RCPTS, DATA, NOW)
    assert not info.value.permanent
    assert "ENOSPC" in str(info.value)
    assert files(queue) == [f"{first}.eml", f"{first}.json", "lock", "tmp"]
    assert leftovers(queue) == []


@pytest.mark.parametrize("call", [1, 2])
def test_save_fsync_failure_keeps_old_or_new_state(tmp_path: Path, call: int) -> None:
    queue = Queue(tmp_path / "queue")
    old = queue.load(queue.enqueue("a@example.org", RCPTS, DATA, NOW))
    new = replace(old, delay_warned=True)
    queue.fsync = _failing_at(call)
    with pytest.raises(QueueError):
        queue.save(new)
    assert queue.load(old.id) == (old if call == 1 else new)
    assert leftovers(queue) == []


def _in_child(work: Callable[[], None]) -> int:
    """Run ``work`` in a forked child; return its exit status (what ``os._exit`` said)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            work()
            os._exit(0)
        except BaseException:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _crash_at(call: int, after: bool) -> FsyncRecorder:
    """An fsync that kills the process at its ``call``-th use, before or after syncing."""

    def crash(n: int, fd: int) -> None:
        if n == call:
            if after:
                os.fsync(fd)
            os._exit(42)

    return FsyncRecorder(crash)


@pytest.mark.parametrize("after", [False, True])
@pytest.mark.parametrize("call", [1, 2, 3, 4])
def test_crash_during_enqueue_leaves_all_or_nothing(tmp_path: Path, call: int, after: bool) -> None:
    queue = Queue(tmp_path / "queue")
    queue.enqueue("a@example.org", RCPTS, b"first", NOW)  # directories exist
    [first] = queue.ids()
    id_file = tmp_path / "returned"

    def work() -> None:
        child = Queue(queue.directory, fsync=_crash_at(call, after))
        id_file.write_text(child.enqueue("a@example.org", RCPTS, DATA, NOW))

    code = _in_child(work)
    assert code == (0 if call == 4 else 42)  # enqueue makes three fsyncs
    others = [m for m in queue.list() if m.id != first]
    if id_file.exists():  # enqueue returned: the message must be there, whole
        [msg] = others
        assert msg.id == id_file.read_text()
    if others:
        [msg] = others
        assert queue.read(msg.id) == DATA and msg.size == len(DATA)
        assert [r.address for r in msg.recipients] == RCPTS
    else:
        assert call <= 3
    assert not any(name.endswith(".corrupt") for name in files(queue))
    # Crash leftovers are garbage after an hour, and only then.
    queue.clean(NOW)
    late = NOW + ORPHAN_SECONDS + 3600
    for name in [*files(queue), *(f"tmp/{n}" for n in leftovers(queue))]:
        if name.endswith((".eml", ".json")) or name.startswith("tmp/"):
            os.utime(queue.directory / name, (NOW, NOW))
    queue.clean(late)
    expected = {f"{first}.eml", f"{first}.json", "lock", "tmp"}
    expected |= {f"{m.id}.{ext}" for m in others for ext in ("eml", "json")}
    assert set(files(queue)) == expected
    assert leftovers(queue) == []


@pytest.mark.parametrize("after", [False, True])
@pytest.mark.parametrize("call", [1, 2, 3])
def test_crash_during_save_leaves_old_or_new_state(tmp_path: Path, call: int, after: bool) -> None:
    queue = Queue(tmp_path / "queue")
    old = queue.load(queue.enqueue("a@example.org", RCPTS, DATA, NOW))
    first = old.recipients[0]
    new = replace(
        old,
        recipients=(
            replace(first, state=RecipientState.FAILED, attempts=1, last_error="550 5.1.1 no"),
            *old.recipients[1:],
        ),
    )

    def work() -> None:
        Queue(queue.directory, fsync=_crash_at(call, after)).save(new)

    code = _in_child(work)
    assert code == (0 if call == 3 else 42)  # save makes two fsyncs
    state = queue.load(old.id)
    # Before the first fsync (tmp written) the rename has not happened; after the rename it has.
    assert state == (old if call == 1 else new)
    assert queue.read(old.id) == DATA
    assert not any(name.endswith(".corrupt") for name in files(queue))


def test_message_survives_its_process_once_enqueue_returned(tmp_path: Path) -> None:
    queue = Queue(tmp_path / "queue")
    id_file = tmp_path / "returned"

    def work() -> None:
        id_file.write_text(queue.enqueue("", RCPTS, DATA, NOW))

    assert _in_child(work) == 0
    assert queue.read(id_file.read_text()) == DATA
    assert [m.id for m in queue.due(NOW)] == [id_file.read_text()]


# --- corruption and garbage -----------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b"\xff\xfe",
        b"[]",
        b'{"version": 2}',
        b'{"version": 1, "id": "OTHER"}',
    ],
)
def test_corrupt_json_is_moved_aside_and_skipped(tmp_path: Path, content: bytes) -> None:
    queue = Queue(tmp_path / "queue")
    good = queue.enqueue("a@example.org", RCPTS, DATA, NOW)
    bad = queue.enqueue("a@example.org", RCPTS, DATA, NOW)
    (queue.directory / f"{bad}.json").write_bytes(content)
    assert [m.id for m in queue.list()] == [good]
    assert (queue.directory / f"{bad}.json.corrupt").read_bytes() == content
    assert queue.read(bad) == DATA  # the .eml is kept
    with pytest.raises(MessageNotFoundError):
        queue.load(bad)
    # clean never takes the .eml of a corrupt message.
    os.utime(queue.directory / f"{bad}.eml", (NOW, NOW))
    queue.clean(NOW + 10 * ORPHAN_SECONDS)
    assert (queue.directory / f"{bad}.eml").exists()


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["recipients"][0].update(state="lost"),
        lambda d: d["recipients"][0].update(attempts="1"),
        lambda d: d["recipients"][0].update(next_attempt=None),
        lambda d: d["recipients"][0].pop("address"),
        lambda d: d.update(recipients=[]),
        lambda d: d.update(size=True),
        lambda d: d.update(sender=None),
    ],
)
def test_wrong_fields_are_corrupt(
    tmp_path: Path, change: Callable[[dict[str, Any]], object]
) -> None:
    queue = Queue(tmp_path / "queue")
    msg_id = queue.enqueue("a@example.org", RCPTS, DATA, NOW)
    path = queue.directory / f"{msg_id}.json"
    doc = json.loads(path.read_bytes())
    change(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(CorruptMessageError):
        queue.load(msg_id)
    assert (queue.directory / f"{msg_id}.json.corrupt").exists()
    assert queue.due(NOW) == []


def test_unreadable_json_is_moved_aside(tmp_path: Path) -> None:
    queue = Queue(tmp_path / "queue")
    msg_id = queue.enqueue("a@example.org", RCPTS, DATA, NOW)
    path = queue.directory / f"{msg_id}.json"
    path.unlink()
    path.mkdir()  # reading it fails with EISDIR, as it would with EIO
    assert queue.list() == []
    assert (queue.directory / f"{msg_id}.json.corrupt").is_dir()


def test_clean_removes_only_old_garbage(tmp_path: Path) -> None:
    queue = Queue(tmp_path / "queue")
    kept = queue.enqueue("a@example.org", RCPTS, DATA, NOW)
    old_orphan, young_orphan = (queue.directory / f"{n}.eml" for n in ("AAAA1", "AAAA2"))
    old_orphan.write_bytes(DATA)
    young_orphan.write_bytes(DATA)
    old_tmp, young_tmp = queue.directory / "tmp" / "x.json.1", queue.directory / "tmp" / "y.eml.2"
    old_tmp.write_bytes(b"{")
    young_tmp.write_bytes(b"x")
    for path in (old_orphan, old_tmp, queue.directory / f"{kept}.eml"):
        os.utime(path, (NOW - ORPHAN_SECONDS - 1, NOW - ORPHAN_SECONDS - 1))
    for path in (young_orphan, young_tmp):
        os.utime(path, (NOW - 60, NOW - 60))
    with queue.lock("GONE"):
        pass
    with queue.lock(kept):
        pass
    assert queue.clean(NOW) == 3
    assert files(queue) == sorted(["AAAA2.eml", f"{kept}.eml", f"{kept}.json", "lock", "tmp"])
    assert leftovers(queue) == ["y.eml.2"]
    assert os.listdir(queue.directory / "lock") == [kept]
    assert queue.read(kept) == DATA


# --- locks ----------------------------------------------------------------------------------


def test_lock_excludes_other_processes(tmp_path: Path) -> None:
    queue = Queue(tmp_path / "queue")
    msg_id = queue.enqueue("a@example.org", RCPTS, DATA, NOW)

    def try_lock() -> None:
        with Queue(queue.directory).lock(msg_id) as held:
            os._exit(1 if held else 2)

    with queue.lock(msg_id) as held:
        assert held
        assert _in_child(try_lock) == 2
        with queue.lock(msg_id) as again:  # a second open file in this process: excluded too
            assert not again
        other = queue.enqueue("a@example.org", RCPTS, DATA, NOW)
        with queue.lock(other) as held_other:  # other messages are free
            assert held_other
    assert _in_child(try_lock) == 1


def test_lock_is_released_when_holder_dies(tmp_path: Path) -> None:
    queue = Queue(tmp_path / "queue")
    msg_id = queue.enqueue("a@example.org", RCPTS, DATA, NOW)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read_end)
        with queue.lock(msg_id):
            os.write(write_end, b"x")
            os.kill(os.getpid(), signal.SIGKILL)
    os.close(write_end)
    assert os.read(read_end, 1) == b"x"
    os.close(read_end)
    os.waitpid(pid, 0)
    with queue.lock(msg_id) as held:
        assert held


def test_lock_is_held_while_working_in_another_process(tmp_path: Path) -> None:
    queue = Queue(tmp_path / "queue")
    msg_id = queue.enqueue("a@example.org", RCPTS, DATA, NOW)
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child holds the lock until told to let go
        with queue.lock(msg_id) as held:
            os.write(ready_w, b"1" if held else b"0")
            os.read(done_r, 1)
        os._exit(0)
    assert os.read(ready_r, 1) == b"1"
    with queue.lock(msg_id) as held:
        assert not held
    assert queue.flush() == 0  # skips the busy message
    os.write(done_w, b"x")
    os.waitpid(pid, 0)
    with queue.lock(msg_id) as held:
        assert held
    for fd in (ready_r, ready_w, done_r, done_w):
        os.close(fd)


# --- ids from outside -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["", ".", "..", "../x", "a/b", "/etc/passwd", "a.json", "x\n", "a b", "é", "A" * 65]
)
def test_unsafe_ids_are_refused(tmp_path: Path, bad: str) -> None:
    queue = Queue(tmp_path / "queue")
    msg = queue.load(queue.enqueue("a@example.org", RCPTS, DATA, NOW))
    with pytest.raises(InvalidQueueIdError):
        validate_id(bad)
    for call in (queue.load, queue.read, queue.remove):
        with pytest.raises(InvalidQueueIdError):
            call(bad)
    with pytest.raises(InvalidQueueIdError), queue.lock(bad):
        pass
    with pytest.raises(InvalidQueueIdError):
        queue.save(replace(msg, id=bad))
    assert queue.list() == [msg]


def test_valid_ids_pass() -> None:
    assert validate_id("018BCF3E2A9C00AB12CD34EF") == "018BCF3E2A9C00AB12CD34EF"
    assert validate_id("abcXYZ09") == "abcXYZ09"
