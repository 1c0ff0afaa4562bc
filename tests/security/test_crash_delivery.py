"""Crash safety of the delivery paths that run as real processes: kill -9 of mailroom-smtpd at
random moments around the end of DATA, and of mailroom-deliver at random moments of a queue run.

mailroom-smtpd: every message answered 250 is in the Maildir, whole, once or twice, never
missing, and the mailbox index agrees with the Maildir. mailroom-deliver: every queued message
is still in the queue (whole) or was received by the peer (possibly twice), never both missing;
a last run without a kill delivers everything and empties the queue.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from mailroom.maildir import Maildir
from mailroom.mailstore import INBOX, MailStore
from mailroom.queue import Queue
from tests.conftest import BIN, HOSTNAME, MailEnv, Server, free_port
from tests.dnsserver import DnsServer, dns_server  # noqa: F401 - the fixture
from tests.smtpclient import SMTPConversation

SMTP_KILLS = 20
QUEUE_KILLS = 15


def _kill(pid: int) -> None:
    """kill -9 the service process ``pid`` and the workers it forked (``[smtp] workers``).

    A worker serves the connection: killing only its supervisor would SIGTERM the workers
    (PR_SET_PDEATHSIG), which then finish their sessions and answer 250. So the supervisor
    is stopped first (it can start no worker meanwhile), then every worker and it are killed.
    """
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGSTOP)
    for victim in [*_children(pid), pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not _dead(victim) and time.monotonic() < deadline:
            time.sleep(0.005)


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def _dead(pid: int) -> bool:
    """Gone, or a zombie (a worker whose new parent does not reap it at once)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def _message(label: str) -> bytes:
    return f"From: x@remote.test\r\nSubject: {label}\r\n\r\nbody of {label}\r\n".encode()


def _send(server: Server, label: str) -> tuple[SMTPConversation, int]:
    conv = SMTPConversation(server.port)
    conv.hello()
    [pid] = server.child_pids()
    conv.transaction(["alice@example.test"])
    conv.send(_message(label) + b".\r\n")
    return conv, pid


def test_kill_smtpd_at_random_moments(smtpd: Server, mail_env: MailEnv) -> None:
    rng = random.Random(78)
    start = time.monotonic()
    conv, pid = _send(smtpd, "smtp first")  # a fresh process also loads its checks: the span
    assert conv.last().startswith("250 ")
    span = time.monotonic() - start
    conv.close()
    _kill(pid)
    acknowledged = {"smtp first"}
    for i in range(SMTP_KILLS):
        conv, pid = _send(smtpd, f"smtp {i}")
        time.sleep(rng.uniform(0, span))
        _kill(pid)
        with contextlib.suppress(ConnectionError, OSError):
            if conv.last().startswith("250 "):
                acknowledged.add(f"smtp {i}")
        conv.close()
    root = mail_env.mailbox("alice@example.test")
    found: Counter[str] = Counter()
    with MailStore(Maildir(root, HOSTNAME)) as store:
        snapshot = store.sync(INBOX)
        for m in snapshot.messages:
            data = store.read(INBOX, m.uid)
            label = data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
            assert data.endswith(_message(label).split(b"\r\n", 2)[2]), "half-written"
            found[label] += 1
        on_disk = {n.split(":", 1)[0] for sub in ("new", "cur") for n in os.listdir(root / sub)}
        assert {m.key for m in snapshot.messages} == on_disk
    print(f"smtpd: {len(acknowledged)} of {SMTP_KILLS + 1} acknowledged, {len(found)} stored")
    assert acknowledged <= set(found), f"lost {acknowledged - set(found)}"
    assert max(found.values()) <= 2
    assert len(acknowledged) < SMTP_KILLS + 1, "every kill came after the 250: adjust the timing"


class Sink:
    """The receiving peer: an SMTP server that keeps every message it is given."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.mail = threading.Event()

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:  # fmt: skip
        envelope.mail_from = address
        self.mail.set()
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append(bytes(envelope.content))
        return "250 OK"


@pytest.fixture
def sink() -> Iterator[tuple[Sink, int]]:
    handler = Sink()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield handler, controller.port
    finally:
        controller.stop()


def test_kill_queue_run_at_random_moments(
    mail_env: MailEnv,
    dns_server: DnsServer,  # noqa: F811 - the fixture of tests/dnsserver.py
    sink: tuple[Sink, int],
) -> None:
    handler, port = sink
    dns_server.set_zone("remote.test", ["@ 300 IN MX 10 mx.remote.test.", "mx 300 IN A 127.0.0.1"])
    mail_env.config.write_text(
        f'hostname = "{HOSTNAME}"\ndata_dir = "{mail_env.data_dir}"\n'
        f'[dns]\nnameservers = ["{dns_server.address}"]\n'
        f"[outbound]\nmta_sts = false\nsmtp_port = {port}\nconnect_timeout_seconds = 5\n"
    )
    queue = Queue(mail_env.data_dir / "queue")
    rng = random.Random(90)
    labels: list[str] = []
    tail = 0.04  # delivering four small messages to the peer takes about this long
    interrupted = 0  # runs that a kill left with work in the queue

    def run(kill_after: float | None, *, from_start: bool = False) -> float:
        """One queue run, killed ``kill_after`` seconds after the peer saw the first MAIL (or,
        ``from_start``, after the process started: while it reads the queue and connects);
        how long until the peer saw the first MAIL."""
        handler.mail.clear()
        start = time.monotonic()
        proc = subprocess.Popen([BIN / "mailroom-deliver"], env=mail_env.environ())
        if kill_after is not None and (from_start or handler.mail.wait(20)):
            time.sleep(kill_after)
            proc.kill()
        first_mail = time.monotonic() - start if handler.mail.wait(0 if from_start else 20) else 0
        proc.wait(60)
        return first_mail

    for i in range(QUEUE_KILLS + 1):
        for k in range(4):
            labels.append(f"queue {i}.{k}")
            queue.enqueue(
                "alice@example.test", [f"bob{k}@remote.test"], _message(labels[-1]), time.time()
            )
        if i == 0:
            startup = run(None)  # process start to the peer's first MAIL
            continue
        if i % 3 == 0:
            run(rng.uniform(0, startup), from_start=True)
        else:
            run(rng.uniform(0, tail))
        # never both: a message not in the queue any more was received
        queued = {
            queue.read(m.id).split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
            for m in queue.list()
        }
        received = {
            data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
            for data in handler.received
        }
        missing = set(labels) - queued - received
        assert not missing, f"lost from the queue without delivery: {missing}"
        interrupted += bool(queued)
    run(None)
    received_count = Counter(
        data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode() for data in handler.received
    )
    print(
        f"queue: {interrupted} of {QUEUE_KILLS} runs interrupted with work left; {sum(received_count.values())} received"
    )
    assert set(received_count) == set(labels)
    # at least once: each kill between the peer's 250 and the saved state costs one duplicate
    assert max(received_count.values()) <= 1 + QUEUE_KILLS
    assert queue.list() == []
    assert interrupted > 0, "no kill came before the end of a run: adjust the timing"
