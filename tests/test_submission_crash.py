"""Crash safety of submission: kill -9 of mailroom-submission mid-DATA or at random moments
never loses a message it acknowledged, and never leaves a half-written one in the queue."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator

import pytest

from mailroom.queue import Queue
from tests.conftest import PASSWORD, MailEnv, Server
from tests.smtpclient import SMTPConversation


@pytest.fixture
def submission(mail_env: MailEnv) -> Iterator[Server]:
    server = Server(mail_env, "mailroom-submission", ("submission", "submissions"))
    yield server
    server.stop()


def _session(server: Server) -> tuple[SMTPConversation, int]:
    conv = SMTPConversation(server.ports["submission"])
    assert conv.last().startswith("220 ")
    conv.expect("EHLO client.test", "250 ")
    conv.expect("STARTTLS", "220")
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    conv.starttls(context)
    conv.expect("EHLO client.test", "250 ")
    login = base64.b64encode(f"\0alice@example.test\0{PASSWORD}".encode()).decode()
    conv.expect(f"AUTH PLAIN {login}", "235")
    conv.expect("MAIL FROM:<alice@example.test>", "250")
    conv.expect("RCPT TO:<someone@remote.test>", "250")
    conv.expect("DATA", "354")
    [pid] = server.child_pids()
    return conv, pid


def _kill(pid: int) -> None:
    """SIGKILL the service: its worker processes first, then the parent (nothing graceful)."""
    workers = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    pids = [int(p) for p in workers.split()] + [pid]
    for victim in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{p}") for p in pids) and time.monotonic() < deadline:
        time.sleep(0.01)


def _body(i: int) -> bytes:
    return (
        f"From: alice@example.test\r\nSubject: crash {i}\r\n\r\n".encode()
        + (f"line of message {i} ".encode() * 3 + b"\r\n") * 3000
    )


def _queued(env: MailEnv) -> dict[int, bytes]:
    queue = Queue(env.data_dir / "queue")
    found = {}
    for msg in queue.list():
        data = queue.read(msg.id)
        i = int(data.split(b"Subject: crash ", 1)[1].split(b"\r\n", 1)[0])
        assert data.endswith(_body(i).split(b"\r\n\r\n", 1)[1]), f"{msg.id} is half-written"
        found[i] = data
    return found


def test_kill_during_data_queues_nothing(submission: Server, mail_env: MailEnv) -> None:
    conv, pid = _session(submission)
    conv.send(_body(0)[:20000])  # half a message, no end of data
    time.sleep(0.2)
    _kill(pid)
    conv.close()
    assert _queued(mail_env) == {}
    leftovers = [p for p in (mail_env.data_dir / "queue").glob("*") if p.suffix == ".json"]
    assert leftovers == []


def test_kill_at_random_moments_never_loses_acknowledged_mail(
    submission: Server, mail_env: MailEnv
) -> None:
    rng = random.Random(4321)
    acknowledged = set()
    for i in range(10):
        conv, pid = _session(submission)
        conv.send(_body(i) + b".\r\n")
        time.sleep(rng.uniform(0, 0.03))
        _kill(pid)
        try:
            if conv.last().startswith("250 2.0.0"):
                acknowledged.add(i)
        except (ConnectionError, OSError):
            pass
        conv.close()
    queued = _queued(mail_env)
    assert acknowledged <= set(queued), f"lost acknowledged messages {acknowledged - set(queued)}"
    assert acknowledged, "the kills all came too early to test anything; adjust the timing"
    for path in (mail_env.data_dir / "queue").glob("*.json"):
        json.loads(path.read_text())  # every committed state is whole
