"""mailroom.maildir: bytes on disk, names, modes, folders, concurrency, durability order, errors."""

from __future__ import annotations

import errno
import importlib.util
import multiprocessing
import os
import re
import resource
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing.synchronize import Barrier as BarrierType
from pathlib import Path
from types import ModuleType

import pytest

from mailroom.addresses import Address
from mailroom.errors import DeliveryError, QuotaExceededError
from mailroom.maildir import Maildir, check_quota, deliver_all, escape_hostname

HOST = "mx.example.org"
MESSAGE = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nline one\r\n\r\n.dot\r\n"
NAME_RE = re.compile(
    r"^(?P<sec>\d+)\.M(?P<usec>\d+)P(?P<pid>\d+)Q(?P<n>\d+)R(?P<tag>[0-9a-f]{8})\.(?P<host>[^/]+)"
    r",S=(?P<s>\d+),W=(?P<w>\d+)$"
)


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def numbered(i: int, size: int = 200) -> bytes:
    """A distinct CRLF message whose whole content follows from ``i``."""
    head = f"Subject: {i}\r\n\r\n".encode()
    line = f"{i:08d}".encode() * 9 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def seq_of(stored: bytes) -> int:
    return int(stored.split(b"\n", 1)[0].removeprefix(b"Subject: "))


def expected_lf(i: int, size: int = 200) -> bytes:
    return numbered(i, size).replace(b"\r\n", b"\n")


class FsyncRecorder:
    """An injectable fsync that records what it synced (and can fail on demand)."""

    def __init__(self, fail: Callable[[int], OSError | None] = lambda fd: None) -> None:
        self.paths: list[str] = []
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(self, fd: int) -> None:
        with self.lock:
            self.paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        error = self.fail(fd)
        if error is not None:
            raise error
        os.fsync(fd)


def is_dir_fd(fd: int) -> bool:
    return stat.S_ISDIR(os.fstat(fd).st_mode)


# --- format --------------------------------------------------------------------------


def test_stores_lf_bytes_in_new_with_maildirpp_sizes(tmp_path: Path) -> None:
    before = time.time()
    path = Maildir(tmp_path / "box", HOST).deliver(MESSAGE)
    stored = MESSAGE.replace(b"\r\n", b"\n")
    assert path.parent == tmp_path / "box" / "new"
    assert path.read_bytes() == stored
    match = NAME_RE.match(path.name)
    assert match, path.name
    assert int(match["s"]) == len(stored) == path.stat().st_size
    assert int(match["w"]) == len(MESSAGE)
    assert before - 1 <= int(match["sec"]) <= time.time() + 1
    assert int(match["usec"]) < 1_000_000
    assert int(match["pid"]) == os.getpid()
    assert match["host"] == HOST
    assert ":" not in path.name  # no :2, info in new/
    assert listing(tmp_path / "box" / "tmp") == []


def test_hostname_is_escaped_in_names(tmp_path: Path) -> None:
    assert escape_hostname("a/b:c,d") == "a\\057b\\072c\\054d"
    path = Maildir(tmp_path / "box", "odd/host:name").deliver(MESSAGE)
    assert ".odd\\057host\\072name,S=" in path.name
    assert ":" not in path.name


def test_empty_message_and_message_without_final_newline(tmp_path: Path) -> None:
    box = Maildir(tmp_path / "box", HOST)
    empty = box.deliver(b"")
    assert empty.read_bytes() == b""
    assert empty.name.endswith(",S=0,W=0")
    partial = box.deliver(b"a\r\nb")
    assert partial.read_bytes() == b"a\nb"
    assert partial.name.endswith(",S=3,W=4")


def test_modes_are_0700_and_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        box = Maildir.for_address(tmp_path / "mail", Address("bob", "example.org"), HOST)
        path = box.deliver(MESSAGE, "Junk")
    finally:
        os.umask(old)
    dirs = [tmp_path / "mail", tmp_path / "mail" / "example.org", box.root, box.root / ".Junk"]
    dirs += [d / sub for d in (box.root, box.root / ".Junk") for sub in ("cur", "new", "tmp")]
    for directory in dirs:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    for file in (path, box.root / ".Junk" / "maildirfolder"):
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file


# --- folders -------------------------------------------------------------------------


def test_create_folder_makes_a_maildirpp_folder_and_is_idempotent(tmp_path: Path) -> None:
    box = Maildir(tmp_path / "box", HOST)
    box.create("Sent Items")
    box.create("Sent Items")
    box.create()
    assert listing(box.root) == [".Sent Items", "cur", "new", "tmp"]
    assert listing(box.root / ".Sent Items") == ["cur", "maildirfolder", "new", "tmp"]
    assert (box.root / ".Sent Items" / "maildirfolder").read_bytes() == b""
    assert not (box.root / "maildirfolder").exists()  # the root is not a folder


def test_deliver_to_a_folder_creates_it_on_demand(tmp_path: Path) -> None:
    box = Maildir(tmp_path / "box", HOST)
    path = box.deliver(MESSAGE, "Junk")
    assert path.parent == box.root / ".Junk" / "new"
    assert (box.root / ".Junk" / "maildirfolder").is_file()
    assert listing(box.root / "new") == []


@pytest.mark.parametrize(
    "folder",
    [
        ".",
        "..",
        "a..b",
        "a.",
        "a. b",
        ".Junk",
        "a/b",
        "../x",
        " lead",
        "trail ",
        "INBOX",
        "inbox",
        "Entwürfe",
        "a\x00b",
        "tab\there",
        "x" * 255,
    ],
)
def test_invalid_folder_names_are_refused_permanently(tmp_path: Path, folder: str) -> None:
    box = Maildir(tmp_path / "box", HOST)
    for attempt in (lambda: box.create(folder), lambda: box.deliver(MESSAGE, folder)):
        with pytest.raises(DeliveryError) as info:
            attempt()
        assert info.value.permanent
    assert not (tmp_path / "box").exists()


@pytest.mark.parametrize(
    "folder",
    ["Junk", "Sent Items", "a-b_c", "2024", "x" * 254, "a.b", "INBOX.x", "Entw&APw-rfe", "a&AC4-b"],
)
def test_valid_folder_names(tmp_path: Path, folder: str) -> None:
    box = Maildir(tmp_path / "box", HOST)
    assert box.deliver(MESSAGE, folder).parent == box.root / f".{folder}" / "new"


def test_a_sub_folder_is_its_own_maildirpp_folder(tmp_path: Path) -> None:
    """Maildir++: a/b is .a.b beside the root's other folders; .a need not exist."""
    box = Maildir(tmp_path / "box", HOST)
    box.deliver(MESSAGE, "a.b")
    assert listing(box.root) == [".a.b", "cur", "new", "tmp"]
    assert (box.root / ".a.b" / "maildirfolder").is_file()


def test_deliver_all_sets_the_mtime_before_the_fsync(tmp_path: Path) -> None:
    seen: list[float] = []

    def fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            seen.append(os.fstat(fd).st_mtime)

    box = Maildir(tmp_path / "box", HOST, fsync=fsync)
    (path,) = deliver_all([(box, "")], MESSAGE, mtime=1_000_000_000.0)
    assert path.stat().st_mtime == 1_000_000_000.0
    assert seen == [1_000_000_000.0]


# --- for_address ---------------------------------------------------------------------


def test_for_address_is_mail_root_domain_localpart(tmp_path: Path) -> None:
    box = Maildir.for_address(tmp_path, Address("alice", "example.org"), HOST)
    assert box.root == tmp_path / "example.org" / "alice"


@pytest.mark.parametrize(
    "address",
    [
        Address("..", "example.org"),
        Address("a/b", "example.org"),
        Address("x", "../../etc"),
        Address("x", ".."),
        Address(".", "example.org"),
        Address("/etc", "example.org"),
    ],
)
def test_for_address_refuses_paths_outside_mail_root(tmp_path: Path, address: Address) -> None:
    with pytest.raises(DeliveryError) as info:
        Maildir.for_address(tmp_path / "mail", address, HOST)
    assert info.value.permanent


def test_for_address_through_a_symlinked_mail_root(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "mail").symlink_to(tmp_path / "real")
    box = Maildir.for_address(tmp_path / "mail", Address("alice", "example.org"), HOST)
    box.deliver(MESSAGE)
    assert len(listing(tmp_path / "real" / "example.org" / "alice" / "new")) == 1


# --- concurrency ---------------------------------------------------------------------


def assert_delivered(root: Path, count: int, first: int = 0) -> None:
    names = listing(root / "new")
    assert len(names) == count
    assert listing(root / "tmp") == []
    seen = set()
    for name in names:
        data = (root / "new" / name).read_bytes()
        i = seq_of(data)
        assert data == expected_lf(i), name
        seen.add(i)
    assert seen == set(range(first, first + count))


def test_1000_concurrent_deliveries_from_threads(tmp_path: Path) -> None:
    box = Maildir(tmp_path / "box", HOST)  # not created yet: threads race to create it
    with ThreadPoolExecutor(32) as pool:
        paths = list(pool.map(lambda i: box.deliver(numbered(i)), range(1000)))
    assert len(set(paths)) == 1000
    assert_delivered(box.root, 1000)


def _deliver_range(root: str, start: int, stop: int, barrier: BarrierType) -> None:
    box = Maildir(Path(root), HOST)
    barrier.wait()  # all processes deliver at the same time
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: box.deliver(numbered(i)), range(start, stop)))


def test_1000_concurrent_deliveries_from_processes(tmp_path: Path) -> None:
    root = tmp_path / "box"
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(4)
    workers = [
        context.Process(target=_deliver_range, args=(str(root), n, n + 250, barrier))
        for n in range(0, 1000, 250)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    pids = {NAME_RE.match(name)["pid"] for name in listing(root / "new")}  # type: ignore[index]
    assert pids == {str(w.pid) for w in workers}
    assert_delivered(root, 1000)


def test_a_reader_never_sees_a_partial_message_in_new(tmp_path: Path) -> None:
    size, count = 1024 * 1024, 48
    box = Maildir(tmp_path / "box", HOST)
    box.create()
    new = box.root / "new"
    done = threading.Event()
    checked_while_running: list[str] = []
    bad: list[str] = []

    def watch() -> None:
        verified: set[str] = set()
        while not done.is_set():
            for name in os.listdir(new):
                if name in verified:
                    continue
                data = (new / name).read_bytes()
                if len(data) < 20 or data != expected_lf(seq_of(data), size):
                    bad.append(f"{name}: {len(data)} bytes")
                verified.add(name)
                checked_while_running.append(name)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: box.deliver(numbered(i, size)), range(count)))
    finally:
        done.set()
        watcher.join()
    assert bad == []
    assert len(checked_while_running) >= 5  # the watcher really raced the writers
    assert len(listing(new)) == count


# --- deliver_all and the fsync order -------------------------------------------------


def test_deliver_all_fsyncs_each_file_and_each_new_dir_once(tmp_path: Path) -> None:
    fsync = FsyncRecorder()
    boxes = [Maildir(tmp_path / name, HOST, fsync=fsync) for name in ("a", "b", "c")]
    for box in boxes:
        box.create()
    boxes[0].create("Junk")
    new_dirs = [b.root / "new" for b in boxes] + [boxes[0].root / ".Junk" / "new"]
    linked_at_file_fsync: list[int] = []

    def fail(fd: int) -> None:
        if not is_dir_fd(fd):
            linked_at_file_fsync.append(sum(len(os.listdir(d)) for d in new_dirs))

    fsync.fail = fail  # type: ignore[assignment]
    fsync.paths.clear()
    targets = [(boxes[0], ""), (boxes[1], ""), (boxes[2], ""), (boxes[0], "Junk"), (boxes[1], "")]
    paths = deliver_all(targets, MESSAGE)

    assert [p.parent for p in paths] == [
        new_dirs[0],
        new_dirs[1],
        new_dirs[2],
        new_dirs[3],
        new_dirs[1],
    ]
    assert len({p.stat().st_ino for p in paths}) == 5  # one file per target, no shared inode
    assert all(p.read_bytes() == MESSAGE.replace(b"\r\n", b"\n") for p in paths)
    files, dirs = fsync.paths[:5], fsync.paths[5:]
    assert all("/tmp/" in f for f in files)
    assert sorted(dirs) == sorted(str(d) for d in new_dirs)  # each distinct new/ exactly once
    assert linked_at_file_fsync == [0] * 5  # every file written and synced before any link
    for box in boxes:
        assert listing(box.root / "tmp") == []


def test_creating_a_mailbox_fsyncs_every_parent_of_a_new_directory(tmp_path: Path) -> None:
    fsync = FsyncRecorder()
    mail = tmp_path / "mail"
    box = Maildir.for_address(mail, Address("bob", "example.org"), HOST, fsync=fsync)
    box.deliver(MESSAGE, "Junk")
    synced = set(fsync.paths)
    for directory in (tmp_path, mail, mail / "example.org", box.root, box.root / ".Junk"):
        assert str(directory) in synced, directory
    fsync.paths.clear()
    box.deliver(MESSAGE, "Junk")  # steady state: one file, one directory
    assert len(fsync.paths) == 2
    assert fsync.paths[1] == str(box.root / ".Junk" / "new")


# --- errors --------------------------------------------------------------------------


def test_a_file_where_tmp_should_be_is_a_temporary_error(tmp_path: Path) -> None:
    root = tmp_path / "box"
    for sub in ("cur", "new"):
        (root / sub).mkdir(parents=True)
    (root / "tmp").write_bytes(b"not a directory")
    with pytest.raises(DeliveryError) as info:
        Maildir(root, HOST).deliver(MESSAGE)
    assert not info.value.permanent
    assert "Not a directory" in str(info.value)
    assert listing(root / "new") == []


@pytest.mark.parametrize(("code", "text"), [(errno.ENOSPC, "ENOSPC"), (errno.EDQUOT, "EDQUOT")])
def test_a_failing_file_fsync_removes_the_tmp_file(tmp_path: Path, code: int, text: str) -> None:
    fsync = FsyncRecorder(lambda fd: None if is_dir_fd(fd) else OSError(code, os.strerror(code)))
    box = Maildir(tmp_path / "box", HOST, fsync=fsync)
    with pytest.raises(DeliveryError) as info:
        box.deliver(MESSAGE)
    assert not info.value.permanent
    assert text in str(info.value) and os.strerror(code) in str(info.value)
    assert "writing tmp/" in str(info.value)
    assert listing(box.root / "tmp") == []
    assert listing(box.root / "new") == []


def _deliver_under_file_size_limit(root: str) -> tuple[bool, str]:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of the signal
    box = Maildir(Path(root), HOST)
    box.create()
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
    try:
        box.deliver(b"x" * 10_000 + b"\r\n")
    except DeliveryError as exc:
        return exc.permanent, str(exc)
    return True, "delivered"


def test_a_real_write_failure_removes_the_tmp_file(tmp_path: Path) -> None:
    root = tmp_path / "box"
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        permanent, text = pool.submit(_deliver_under_file_size_limit, str(root)).result()
    assert (permanent, "EFBIG" in text) == (False, True), text
    assert listing(root / "tmp") == []
    assert listing(root / "new") == []


def test_a_failing_link_removes_the_tmp_file(tmp_path: Path) -> None:
    root = tmp_path / "box"
    for sub in ("cur", "tmp"):
        (root / sub).mkdir(parents=True)
    (root / "new").write_bytes(b"")
    with pytest.raises(DeliveryError) as info:
        Maildir(root, HOST).deliver(MESSAGE)
    assert not info.value.permanent
    assert "linking" in str(info.value)
    assert listing(root / "tmp") == []


def test_a_failing_directory_fsync_is_a_temporary_error(tmp_path: Path) -> None:
    fsync = FsyncRecorder(lambda fd: OSError(errno.EIO, "I/O error") if is_dir_fd(fd) else None)
    box = Maildir(tmp_path / "box", HOST, fsync=fsync)
    for sub in ("cur", "new", "tmp"):
        (box.root / sub).mkdir(parents=True)
    with pytest.raises(DeliveryError) as info:
        box.deliver(MESSAGE)
    assert not info.value.permanent
    assert "fsync of" in str(info.value) and "EIO" in str(info.value)
    assert listing(box.root / "tmp") == []
    # The error means nothing was stored: the link is taken back, so the retry that follows
    # a temporary error leaves one copy, not two.
    assert listing(box.root / "new") == []


def _deliver_at_once(box: Maildir, count: int) -> list[tuple[Path | Exception, float]]:
    """``count`` threads deliver one message each, all at once: (path or error, time done)."""
    barrier = threading.Barrier(count)

    def deliver(i: int) -> tuple[Path | Exception, float]:
        barrier.wait()
        try:
            path: Path | Exception = box.deliver(numbered(i))
        except DeliveryError as err:
            path = err
        return path, time.monotonic()

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(deliver, range(count)))


def test_concurrent_deliveries_share_fsyncs_of_new_each_started_after_their_link(
    tmp_path: Path,
) -> None:
    syncs: list[tuple[set[str], float]] = []  # what new/ held when each began, when it ended

    def fsync(fd: int) -> None:
        if is_dir_fd(fd):
            listed = set(os.listdir(f"/proc/self/fd/{fd}"))
            time.sleep(0.03)  # a slow disk: deliveries pile up behind a running fsync
            os.fsync(fd)
            syncs.append((listed, time.monotonic()))
        else:
            os.fsync(fd)

    box = Maildir(tmp_path / "box", HOST, fsync=fsync)
    box.create()
    results = _deliver_at_once(box, 16)
    for path, done in results:
        assert isinstance(path, Path)
        # Durable: an fsync of new/ that began after the link ended before the delivery did.
        assert any(path.name in listed and ended <= done for listed, ended in syncs), path
    assert len(syncs) <= 6  # shared: 16 deliveries, not 16 fsyncs of new/
    assert_delivered(box.root, 16)


def test_a_failing_shared_fsync_of_new_fails_every_delivery_waiting_for_it(
    tmp_path: Path,
) -> None:
    def fsync(fd: int) -> None:
        if is_dir_fd(fd):
            time.sleep(0.03)
            raise OSError(errno.EIO, "I/O error")
        os.fsync(fd)

    Maildir(tmp_path / "box", HOST).create()
    box = Maildir(tmp_path / "box", HOST, fsync=fsync)
    for error, _ in _deliver_at_once(box, 8):
        assert isinstance(error, DeliveryError) and not error.permanent
        assert "fsync of" in str(error) and "EIO" in str(error)
    assert listing(box.root / "new") == [] and listing(box.root / "tmp") == []


def test_a_failing_link_takes_back_the_copies_already_linked(tmp_path: Path) -> None:
    boxes = [Maildir(tmp_path / name, HOST) for name in ("a", "b")]
    for box in boxes:
        box.create()
    (boxes[1].root / "new").chmod(0o500)  # the second link fails (EACCES; root: see below)
    try:
        if os.access(boxes[1].root / "new", os.W_OK):  # root ignores the mode: a file instead
            (boxes[1].root / "new").chmod(0o700)
            (boxes[1].root / "new").rmdir()
            (boxes[1].root / "new").write_bytes(b"")
        with pytest.raises(DeliveryError) as info:
            deliver_all([(boxes[0], ""), (boxes[1], "")], MESSAGE)
    finally:
        if (boxes[1].root / "new").is_dir():
            (boxes[1].root / "new").chmod(0o700)
    assert "linking" in str(info.value)
    assert listing(boxes[0].root / "new") == [] and listing(boxes[0].root / "tmp") == []


def test_deliver_all_writes_nothing_into_new_when_one_target_fails(tmp_path: Path) -> None:
    boxes = [Maildir(tmp_path / name, HOST) for name in ("a", "b", "c")]
    for box in boxes:
        box.create()
    (boxes[2].root / "tmp").rmdir()
    (boxes[2].root / "tmp").write_bytes(b"")
    with pytest.raises(DeliveryError) as info:
        deliver_all([(b, "") for b in boxes], MESSAGE)
    assert not info.value.permanent
    for box in boxes[:2]:
        assert listing(box.root / "tmp") == []
        assert listing(box.root / "new") == []


def _names(*names: str) -> Callable[[], str]:
    it: Iterator[str] = iter(names)
    return lambda: next(it)


def test_an_existing_name_in_new_is_never_overwritten(tmp_path: Path) -> None:
    box = Maildir(tmp_path / "box", HOST, unique=_names("1.M1P1R0.h", "1.M1P1R0.h", "2.M2P2R0.h"))
    first = box.deliver(MESSAGE)
    second = box.deliver(MESSAGE.replace(b"hi", b"ho"))
    assert first.name.startswith("1.M1P1R0.h,S=")
    assert second.name.startswith("2.M2P2R0.h,S=")
    assert b"Subject: hi" in first.read_bytes()
    assert b"Subject: ho" in second.read_bytes()
    assert listing(box.root / "tmp") == []


def test_an_existing_name_in_tmp_is_skipped_and_left_alone(tmp_path: Path) -> None:
    box = Maildir(tmp_path / "box", HOST, unique=_names("stray", "mine"))
    box.create()
    stored_size = len(MESSAGE.replace(b"\r\n", b"\n"))
    suffix = f",S={stored_size},W={len(MESSAGE)}"
    (box.root / "tmp" / f"stray{suffix}").write_bytes(b"someone else's")
    assert box.deliver(MESSAGE).name == f"mine{suffix}"
    assert listing(box.root / "tmp") == [f"stray{suffix}"]


def test_giving_up_on_unique_names_is_a_temporary_error(tmp_path: Path) -> None:
    box = Maildir(tmp_path / "box", HOST, unique=lambda: "same")
    box.deliver(MESSAGE)
    with pytest.raises(DeliveryError) as info:
        box.deliver(MESSAGE)
    assert not info.value.permanent
    assert listing(box.root / "tmp") == []
    assert len(listing(box.root / "new")) == 1


# --- usage and quota -----------------------------------------------------------------


def test_usage_bytes_counts_cur_and_new_of_every_folder(tmp_path: Path) -> None:
    box = Maildir(tmp_path / "box", HOST)
    assert box.usage_bytes() == 0  # does not exist yet
    a = box.deliver(b"a" * 100 + b"\r\n")  # S=101
    b = box.deliver(b"b" * 50 + b"\r\n", "Junk")  # S=51
    a.rename(box.root / "cur" / f"{a.name}:2,S")  # read by a client: still counted
    (box.root / "cur" / "no-size-field:2,").write_bytes(b"z" * 7)  # counted by stat
    (box.root / ".Junk" / "cur" / ".hidden").write_bytes(b"h" * 1000)  # not a message
    (box.root / "tmp" / "in-flight").write_bytes(b"t" * 1000)  # not delivered yet
    assert box.usage_bytes() == 101 + 51 + 7
    assert b.exists()


def test_check_quota(tmp_path: Path) -> None:
    box = Maildir(tmp_path / "box", HOST)
    box.deliver(b"a" * 99 + b"\r\n")  # S=100
    check_quota(box, 0, 10**12)  # 0: unlimited
    check_quota(box, 1000, 900)  # exactly full is fine
    with pytest.raises(QuotaExceededError) as info:
        check_quota(box, 1000, 901)
    assert isinstance(info.value, DeliveryError) and info.value.permanent
    assert "100 of 1000" in str(info.value)


# --- the fsync-limit benchmark ------------------------------------------------------


def _load_bench() -> ModuleType:
    path = Path(__file__).parent / "bench" / "fsync_limit.py"
    spec = importlib.util.spec_from_file_location("fsync_limit", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("workers", [1, 4])
def test_bench_fsync_limit_delivers_count_messages_of_size(tmp_path: Path, workers: int) -> None:
    bench = _load_bench()
    for size in (68, 79, 80, 10_240):
        message = bench.make_message(size)
        assert len(message) == size
        assert message.count(b"\r") == message.count(b"\n") == message.count(b"\r\n")
    rate = bench.bench_fsync_limit(tmp_path / "bench", 40, 10_240, workers=workers)
    assert rate > 0
    names = listing(tmp_path / "bench" / "new")
    assert len(names) == 40
    assert all(names_match.endswith(",W=10240") for names_match in names)
    assert listing(tmp_path / "bench" / "tmp") == []


def test_unique_names_differ_across_threads_and_forked_children() -> None:
    """maildir(5) names: distinct from threads of one process in the same microsecond (the
    process's count), and a forked child has its own pid and random tag."""
    import threading

    from mailroom.maildir import unique_name_generator

    unique = unique_name_generator(HOST)
    names: list[list[str]] = [[] for _ in range(8)]

    def make(into: list[str]) -> None:
        into.extend(unique() for _ in range(2000))

    threads = [threading.Thread(target=make, args=(into,)) for into in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [name for into in names for name in into]
    assert len(set(every)) == len(every) == 16000
    parent = NAME_RE.match(every[0] + ",S=1,W=1")
    assert parent and parent["pid"] == str(os.getpid()) and parent["host"] == HOST

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, unique().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = NAME_RE.match(os.read(read, 1000).decode() + ",S=1,W=1")
    os.close(read)
    os.close(write)
    assert child and child["pid"] == str(pid) and child["n"] == "1"
    assert child["tag"] != parent["tag"]
