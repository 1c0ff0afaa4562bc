"""mailroom.workers: connection counts shared by forked workers, and the parent that runs them.

Whatever calls ``run_workers`` runs in a forked child of its own (in its own process group),
so the signal handlers of the test process are never touched, and a test that fails kills
that group instead of hanging the suite. The last test drives mailroom-imapd with two
workers through mailroom's activator.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailroom import workers
from mailroom.workers import SharedCounts, run_workers
from tests.conftest import MailEnv, Server

DEADLINE = 8.0  # seconds a forked process gets before the test counts it as hung
BUSY = b"* BYE [UNAVAILABLE] Too many connections from your address\r\n"


def wait_for(condition: Callable[[], bool], timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"still waiting after {timeout}s")
        time.sleep(0.02)


class Forks:
    """Runs functions in forked children, each the leader of its own process group."""

    def __init__(self) -> None:
        self.running: set[int] = set()

    def start(self, body: Callable[[], int]) -> int:
        pid = os.fork()
        if pid == 0:
            code = 99
            try:
                os.setpgid(0, 0)
                code = body()
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.setpgid(pid, pid)  # also here: the group exists before start() returns
        self.running.add(pid)
        return pid

    def wait(self, pid: int, timeout: float = DEADLINE) -> int:
        """The exit code of ``pid``; kills its group and fails when it does not exit in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                self.running.discard(pid)
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.02)
        self.kill(pid)
        raise AssertionError(f"process {pid} still running after {timeout}s")

    def kill(self, pid: int) -> None:
        os.killpg(pid, signal.SIGKILL)  # the leader is not reaped yet: the group is ours
        os.waitpid(pid, 0)
        self.running.discard(pid)


@pytest.fixture
def forks() -> Iterator[Forks]:
    forks = Forks()
    yield forks
    for pid in list(forks.running):
        forks.kill(pid)


def files(directory: Path, prefix: str) -> list[Path]:
    return sorted(directory.glob(f"{prefix}-*"))


def serve_until(directory: Path, signum: int) -> Callable[[], int]:
    """A worker that says it is ready and serves until ``signum`` (status 5 if it never came)."""

    def child() -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signum})
        (directory / f"ready-{os.getpid()}").touch()
        if signal.sigtimedwait({signum}, DEADLINE) is None:
            return 5
        (directory / f"stopped-{os.getpid()}").touch()
        return 0

    return child


def supervised(count: int, child: Callable[[], int]) -> Callable[[], int]:
    """``run_workers(count, child)`` in a process that ignores stop signals outside it: a
    signal the test repeats after ``run_workers`` returned cannot kill the parent."""

    def body() -> int:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return run_workers(count, child)

    return body


def stop(parent: int, signum: int, directory: Path, workers: int) -> bool:
    """Send ``signum`` to the parent until ``workers`` workers said they stopped; whether
    they did within half the deadline.

    Repeated, because a worker is only known to the parent a moment after it is ready (see
    test_a_stop_signal_while_starting_the_workers_reaches_them_all).
    """
    deadline = time.monotonic() + DEADLINE / 2
    while len(files(directory, "stopped")) < workers:
        if time.monotonic() > deadline:
            return False
        os.kill(parent, signum)
        time.sleep(0.2)
    return True


def claim(path: Path) -> bool:
    """True for the one process that creates ``path`` first."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


# SharedCounts


def test_admits_up_to_the_total_then_refuses() -> None:
    counts = SharedCounts(4)
    assert [counts.admit(f"192.0.2.{i}", 3, 10) for i in range(4)] == [True, True, True, False]
    assert counts.total == 3


def test_admits_up_to_the_limit_per_address() -> None:
    counts = SharedCounts(8)
    assert [counts.admit("192.0.2.1", 8, 2) for _ in range(3)] == [True, True, False]
    assert counts.admit("192.0.2.2", 8, 2)  # another address has its own count
    assert counts.total == 3


def test_release_frees_the_connection_in_all_and_for_its_address() -> None:
    counts = SharedCounts(2)
    assert counts.admit("192.0.2.1", 2, 2) and counts.admit("192.0.2.1", 2, 2)
    assert not counts.admit("192.0.2.2", 2, 2)
    counts.release("192.0.2.1")
    assert counts.total == 1
    assert counts.admit("192.0.2.2", 2, 2)
    counts.release("192.0.2.2")
    assert counts.admit("192.0.2.1", 2, 2)
    assert not counts.admit("192.0.2.1", 3, 2)


def test_counts_are_shared_with_forked_processes(forks: Forks) -> None:
    counts = SharedCounts(4)
    peer = "2001:db8::1"

    def admit_three() -> int:
        return sum(counts.admit(peer, 4, 2) for _ in range(3))  # exit status: how many admitted

    def release_one() -> int:
        counts.release(peer)
        return 0

    assert forks.wait(forks.start(admit_three)) == 2
    assert counts.total == 2
    assert not counts.admit(peer, 4, 2)  # the child's two count for its address ...
    assert counts.admit("2001:db8::2", 4, 2) and counts.admit("2001:db8::2", 4, 2)
    assert not counts.admit("2001:db8::3", 4, 2)  # ... and in all
    assert forks.wait(forks.start(release_one)) == 0
    assert counts.total == 3
    assert counts.admit(peer, 4, 2)


def test_concurrent_admits_from_several_processes_are_not_lost(forks: Forks) -> None:
    counts = SharedCounts(8)
    each = 3000

    def admit_many() -> int:
        return 0 if all(counts.admit("192.0.2.1", 10**9, 10**9) for _ in range(each)) else 1

    pids = [forks.start(admit_many) for _ in range(4)]
    assert [forks.wait(pid) for pid in pids] == [0] * 4
    assert counts.total == 4 * each
    assert counts.admit("192.0.2.1", 10**9, 4 * each + 1)
    assert not counts.admit("192.0.2.1", 10**9, 4 * each + 1)  # the address's count: no update lost


def test_slots_of_addresses_gone_are_used_again() -> None:
    counts = SharedCounts(50)  # 128 slots; 6 rounds of 50 new addresses need reuse
    for r in range(6):
        peers = [
            f"ffff:ffff:ffff:ffff:ffff:{r:04x}:255.255.{i}.255"  # 45 characters at most
            if i % 3 == 0
            else f"2001:db8:{r:x}::{i:x}"
            if i % 3 == 1
            else f"198.51.{r}.{i}"
            for i in range(50)
        ]
        assert all(counts.admit(peer, 50, 1) for peer in peers)  # each its own slot
        assert not counts.admit(f"203.0.113.{r}", 50, 1)
        assert counts.total == 50
        for peer in peers:
            counts.release(peer)
        assert counts.total == 0


def test_counts_follow_a_model_through_collisions_and_reuse() -> None:
    counts = SharedCounts(3)  # 8 slots for 12 addresses: probe paths cross and slots are reused
    model: Counter[str] = Counter()
    peers = [f"10.0.0.{i}" for i in range(12)]
    rng = random.Random(5)
    for _ in range(5000):
        peer = rng.choice(peers)
        if model[peer] and rng.random() < 0.5:
            counts.release(peer)
            model[peer] -= 1
        else:
            expected = model.total() < 3 and model[peer] < 2
            assert counts.admit(peer, 3, 2) == expected, (peer, dict(model))
            model[peer] += expected
        assert counts.total == model.total()


def test_the_connections_of_a_crashed_worker_are_not_counted_forever(
    forks: Forks, tmp_path: Path
) -> None:
    counts = SharedCounts(4)

    def child() -> int:
        if claim(tmp_path / "crashed"):
            counts.admit("192.0.2.1", 4, 4)
            os.kill(os.getpid(), signal.SIGKILL)  # dies mid-session (OOM killer, segfault)
        return 0

    forks.wait(forks.start(lambda: run_workers(2, child, counts)))
    assert counts.total == 0


def test_a_worker_is_busier_only_than_a_live_worker_with_fewer_connections(forks: Forks) -> None:
    counts = SharedCounts(8)
    counts.join(0)
    counts.admit("192.0.2.1", 8, 8)
    assert not counts.busier()  # no other worker running

    def second() -> int:  # worker 1 joins and takes two connections
        counts.join(1)
        counts.admit("192.0.2.2", 8, 8)
        counts.admit("192.0.2.2", 8, 8)
        return 0

    assert forks.wait(forks.start(second)) == 0
    assert not counts.busier()  # 1 against 2
    counts.admit("192.0.2.1", 8, 8)
    assert not counts.busier()  # 2 against 2: both take connections
    counts.admit("192.0.2.1", 8, 8)
    assert counts.busier()  # 3 against 2: worker 1 should take the next one
    counts.forget(1)  # it exited: nobody to leave connections to
    assert not counts.busier()


# run_workers


def test_every_worker_runs_the_child_and_clean_exits_give_0(forks: Forks, tmp_path: Path) -> None:
    def child() -> int:
        (tmp_path / f"ran-{os.getpid()}").touch()
        return 0

    parent = forks.start(lambda: run_workers(3, child))
    assert forks.wait(parent) == 0
    pids = {int(path.name.removeprefix("ran-")) for path in files(tmp_path, "ran")}
    assert len(pids) == 3 and parent not in pids


def test_each_worker_keeps_to_one_cpu_round_robin(forks: Forks, tmp_path: Path) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("one CPU: nothing to keep a worker to")
    count = len(allowed) + 1  # one more than there are CPUs: the first CPU takes two

    def child() -> int:
        cpus = ",".join(map(str, sorted(os.sched_getaffinity(0))))
        (tmp_path / f"cpus-{os.getpid()}").write_text(cpus)
        return 0

    parent = forks.start(lambda: run_workers(count, child, one_cpu_each=True))
    assert forks.wait(parent) == 0
    seen = Counter(path.read_text() for path in files(tmp_path, "cpus"))
    assert seen == Counter([str(allowed[0]), *map(str, allowed)])


def test_a_worker_refused_its_cpu_serves_unpinned(forks: Forks, tmp_path: Path) -> None:
    def child() -> int:
        workers._keep_to(4095, 0)  # no such CPU here: EINVAL, as EPERM from a seccomp filter
        (tmp_path / "cpus").write_text(repr(sorted(os.sched_getaffinity(0))))
        return 0

    assert forks.wait(forks.start(child)) == 0
    assert (tmp_path / "cpus").read_text() == repr(sorted(os.sched_getaffinity(0)))


@pytest.mark.parametrize(("count", "one_cpu_each"), [(1, True), (2, False)])
def test_workers_not_asked_or_alone_may_use_every_cpu(
    forks: Forks, tmp_path: Path, count: int, one_cpu_each: bool
) -> None:
    def child() -> int:
        (tmp_path / f"cpus-{os.getpid()}").write_text(repr(sorted(os.sched_getaffinity(0))))
        return 0

    parent = forks.start(lambda: run_workers(count, child, one_cpu_each=one_cpu_each))
    assert forks.wait(parent) == 0
    every = repr(sorted(os.sched_getaffinity(0)))
    assert [path.read_text() for path in files(tmp_path, "cpus")] == [every] * count


def test_a_worker_that_fails_while_the_others_serve_is_started_again(
    forks: Forks, tmp_path: Path
) -> None:
    serve = serve_until(tmp_path, signal.SIGTERM)

    def child() -> int:
        (tmp_path / f"started-{os.getpid()}").touch()
        return 3 if claim(tmp_path / "failed") else serve()

    parent = forks.start(supervised(2, child))
    wait_for(lambda: len(files(tmp_path, "ready")) == 2)  # the other one and the new one
    assert len(files(tmp_path, "started")) == 3
    assert stop(parent, signal.SIGTERM, tmp_path, 2)
    assert forks.wait(parent) == 0


def test_too_many_failures_stop_the_others_and_give_the_status(
    forks: Forks, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workers, "RESTARTS", 2)
    serve = serve_until(tmp_path, signal.SIGTERM)

    def child() -> int:
        (tmp_path / f"started-{os.getpid()}").touch()
        if claim(tmp_path / "server"):
            return serve()
        wait_for(lambda: bool(files(tmp_path, "ready")))  # fail while the other one serves
        return 3

    parent = forks.start(lambda: run_workers(2, child))
    assert forks.wait(parent) == 3
    assert len(files(tmp_path, "started")) == 2 + 2  # both, then RESTARTS new ones
    assert len(files(tmp_path, "stopped")) == 1  # the one serving was told to stop


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_a_stop_signal_to_the_parent_reaches_every_worker(
    forks: Forks, tmp_path: Path, signum: signal.Signals
) -> None:
    parent = forks.start(supervised(3, serve_until(tmp_path, signum)))
    wait_for(lambda: len(files(tmp_path, "ready")) == 3)
    assert stop(parent, signum, tmp_path, 3)
    assert forks.wait(parent) == 0


def test_a_stop_signal_while_starting_the_workers_reaches_them_all(
    forks: Forks, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fork = os.fork

    def fork_then_stop() -> int:  # SIGTERM arrives just as the first worker is forked
        pid = fork()
        if pid and claim(tmp_path / "signalled"):
            os.kill(os.getpid(), signal.SIGTERM)
        return pid

    def body() -> int:
        monkeypatch.setattr(os, "fork", fork_then_stop)  # in the forked parent only
        return run_workers(3, serve_until(tmp_path, signal.SIGTERM))

    parent = forks.start(body)
    assert forks.wait(parent, timeout=DEADLINE / 2) == 0  # not left waiting for a worker


# mailroom-imapd with two workers


def children_of(parent: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()  # state, ppid, ...
        except OSError:
            continue
        if int(fields[1]) == parent:
            found.append(int(stat.parent.name))
    return sorted(found)


def serving_worker(client: socket.socket, server_port: int, pids: list[int]) -> int:
    """The worker holding the server side of ``client`` (/proc/net/tcp, then its fds)."""
    client_port = client.getsockname()[1]
    inode = next(
        fields[9]
        for fields in (line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:])
        if fields[1].endswith(f":{server_port:04X}") and fields[2].endswith(f":{client_port:04X}")
    )
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    raise AssertionError(f"no worker holds the connection from port {client_port}")


def greeting(port: int) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1024)
        if not chunk:
            break
        data += chunk
    return sock, data


@dataclass
class TwoWorkers:
    port: int  # the plain IMAP port
    pids: list[int]  # the two workers
    held: list[socket.socket]  # client sockets, closed at the end


@contextlib.contextmanager
def two_imapd_workers(mail_env: MailEnv, config: str = "") -> Iterator[TwoWorkers]:
    """mailroom-imapd with two workers through mailroom's activator; stopped at the end, and
    the workers with it."""
    with mail_env.config.open("a") as f:
        f.write(f"[imap]\nworkers = 2\n{config}")
    server = Server(mail_env, "mailroom-imapd", ("imap", "imaps"))
    running = TwoWorkers(server.ports["imap"], [], [])
    try:
        wait_for(lambda: len(server.child_pids()) == 1)
        (imapd,) = server.child_pids()
        wait_for(lambda: len(children_of(imapd)) == 2)
        running.pids = children_of(imapd)
        for pid in running.pids:
            assert b"mailroom-imapd" in Path(f"/proc/{pid}/cmdline").read_bytes()
        yield running
    finally:
        for sock in running.held:
            sock.close()
        server.stop()
    assert not [pid for pid in running.pids if Path(f"/proc/{pid}").exists()]  # stopped too


def test_imapd_workers_share_the_limit_per_address(mail_env: MailEnv) -> None:
    with two_imapd_workers(mail_env, "max_connections_per_ip = 3\n") as imapd:
        port, held = imapd.port, imapd.held
        # Three connections, on both workers: each holds fewer than the limit by itself.
        on: Counter[int] = Counter()
        deadline = time.monotonic() + DEADLINE
        while len(held) < 3 and time.monotonic() < deadline:
            sock, data = greeting(port)
            if (
                data.startswith(b"* OK ")
                and on[worker := serving_worker(sock, port, imapd.pids)] < 2
            ):
                on[worker] += 1
                held.append(sock)
            else:  # a refusal (a connection closed here not yet released), or a third on one
                sock.close()
        assert sorted(on.values()) == [1, 2]

        for _ in range(4):
            sock, data = greeting(port)
            sock.close()
            assert data == BUSY

        for sock in held:
            sock.close()
        held.clear()
        deadline = time.monotonic() + DEADLINE
        while True:  # the workers release the closed connections in a moment
            sock, data = greeting(port)
            sock.close()
            if data.startswith(b"* OK ") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert data.startswith(b"* OK ")


def test_imapd_workers_share_the_connections(mail_env: MailEnv) -> None:
    # Every worker's loop is woken for a new connection; the busier one leaves it to the
    # other, so ten clients are served by both cores (without it, one worker took 6 to 9).
    with two_imapd_workers(mail_env) as imapd:
        on: Counter[int] = Counter()
        for _ in range(10):
            sock, data = greeting(imapd.port)
            assert data.startswith(b"* OK ")
            imapd.held.append(sock)
            on[serving_worker(sock, imapd.port, imapd.pids)] += 1
        assert sorted(on.values()) in ([5, 5], [4, 6]), on


def test_imapd_workers_share_a_burst_of_connections(mail_env: MailEnv) -> None:
    # Twenty clients connect at once, none waiting for its greeting. A worker's new
    # connection is counted only once it is set up, a moment after accept(): the worker that
    # woke first went on taking the others meanwhile (14 to 20 of them, and port 25 under
    # load ran on one core).
    with two_imapd_workers(mail_env, "max_connections_per_ip = 50\n") as imapd:
        for _ in range(20):
            imapd.held.append(socket.create_connection(("127.0.0.1", imapd.port), timeout=5))
        on: Counter[int] = Counter()
        for sock in imapd.held:
            data = sock.recv(1024)
            assert data.startswith(b"* OK "), data
            on[serving_worker(sock, imapd.port, imapd.pids)] += 1
        assert min(on[pid] for pid in imapd.pids) >= 5, on


def test_port_25_workers_keep_to_a_cpu_each_and_imapd_workers_do_not(mail_env: MailEnv) -> None:
    allowed = set(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("one CPU: nothing to keep a worker to")
    with two_imapd_workers(mail_env) as imapd:  # argon2's lanes want every CPU
        assert [os.sched_getaffinity(pid) for pid in imapd.pids] == [allowed, allowed]
    with mail_env.config.open("a") as f:
        f.write("[smtp]\nworkers = 2\n")
    server = Server(mail_env, "mailroom-smtpd", ("smtp",))
    try:
        wait_for(lambda: len(server.child_pids()) == 1)
        (smtpd,) = server.child_pids()
        wait_for(lambda: len(children_of(smtpd)) == 2)
        workers = children_of(smtpd)
        # Each keeps to its CPU right after the fork, before it serves.
        wait_for(lambda: all(len(os.sched_getaffinity(pid)) == 1 for pid in workers))
        cpus = [os.sched_getaffinity(pid) for pid in workers]
        assert cpus[0] != cpus[1] and cpus[0] | cpus[1] <= allowed
    finally:
        server.stop()
