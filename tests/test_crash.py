"""Crash safety: kill -9 at any point may duplicate a message, never lose or half-write one."""

from __future__ import annotations

import os
import random
import signal
import time

from tests.conftest import MailEnv, Server
from tests.smtpclient import SMTPConversation


def _open_session(server: Server) -> tuple[SMTPConversation, int]:
    conv = SMTPConversation(server.port)
    conv.hello()
    [pid] = server.child_pids()
    conv.transaction(["alice@example.test"])
    return conv, pid


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.01)


def _body(i: int) -> bytes:
    return (
        f"Subject: crash {i}\r\n\r\n".encode()
        + (f"line of message {i} ".encode() * 3 + b"\r\n") * 3000
    )


def test_kill_during_data_leaves_nothing(smtpd: Server, mail_env: MailEnv) -> None:
    conv, pid = _open_session(smtpd)
    conv.send(_body(0)[:20000])  # half a message, no end-of-data
    time.sleep(0.2)
    _kill(pid)
    conv.close()
    assert mail_env.new_messages("alice@example.test") == []


def test_kill_right_after_250_keeps_message(smtpd: Server, mail_env: MailEnv) -> None:
    conv, pid = _open_session(smtpd)
    conv.send(_body(1) + b".\r\n")
    assert conv.last().startswith("250 2.0.0")
    _kill(pid)
    conv.close()
    [path] = mail_env.new_messages("alice@example.test")
    assert path.read_bytes().endswith(_body(1).replace(b"\r\n", b"\n"))


def test_kill_at_random_moments_never_loses_acknowledged_mail(
    smtpd: Server, mail_env: MailEnv
) -> None:
    rng = random.Random(1234)
    acknowledged = set()
    for i in range(12):
        conv, pid = _open_session(smtpd)
        conv.send(_body(i) + b".\r\n")
        # The first message of a fresh process also loads the authentication checks (~45 ms).
        time.sleep(rng.uniform(0, 0.12))
        _kill(pid)
        try:
            if conv.last().startswith("250 2.0.0"):
                acknowledged.add(i)
        except (ConnectionError, OSError):
            pass
        conv.close()
    stored = {}
    for path in mail_env.new_messages("alice@example.test"):
        data = path.read_bytes()
        i = int(data.split(b"Subject: crash ", 1)[1].split(b"\n", 1)[0])
        # never half-written: every file in new/ is the whole message
        assert data.endswith(_body(i).replace(b"\r\n", b"\n")), path
        stored[i] = path
    assert acknowledged <= set(stored), f"lost acknowledged messages {acknowledged - set(stored)}"
    assert acknowledged, "the kills all came too early to test anything; adjust the timing"
