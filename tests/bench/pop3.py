"""Benchmark ``pop3``: download 1,000 messages of 10 KiB with RETR, mailroom-pop3d against Dovecot.

Both servers serve the same Maildir (mailroom's, and a copy for Dovecot's dovecot-pop3d) over
implicit TLS on loopback, through ``side_by_side``. One poplib client logs in, then RETRs every
message in order and checks its size; the figure is messages per second over the RETRs, the
best of ``ROUNDS`` sessions. QUIT deletes nothing, so every round sees the same mailbox.

"first login + STAT" is the first session's: the password check plus the first look at the
new messages (mailroom builds its index, Dovecot its own). The service is already running
then: before it, one connection to each server only reads the greeting and QUITs, for both
alike, so that mailroom's process start (socket activation, measured by ``cold_start``) is
not in the figure (the dummy hash for unknown names is not either: adding the user made it, as
``mailroomctl user add`` does). "login + STAT" is the best of the later sessions.
"""

from __future__ import annotations

import poplib
import ssl
import time

from mailroom.maildir import Maildir
from tests.bench.fsync_limit import make_message
from tests.bench.side_by_side import side_by_side
from tests.bench.smtp_inbound import Row, side_by_side_rows

USER = "u@bench.test"
PASSWORD = "bench-password-1"
SIZE = 10 * 1024
ROUNDS = 3


def _session(port: int, context: ssl.SSLContext, count: int) -> tuple[float, float]:
    """(login in ms, RETR messages per second) of one session."""
    start = time.perf_counter()
    client = poplib.POP3_SSL("127.0.0.1", port, context=context, timeout=60)
    client.user(USER)
    client.pass_(PASSWORD)
    listed, _ = client.stat()
    login = (time.perf_counter() - start) * 1000
    if listed != count:
        raise RuntimeError(f"server lists {listed} messages, expected {count}")
    start = time.perf_counter()
    for n in range(1, count + 1):
        _, lines, _ = client.retr(n)
        if sum(len(line) + 2 for line in lines) != SIZE:
            raise RuntimeError(f"message {n} has the wrong size")
    rate = count / (time.perf_counter() - start)
    client.quit()
    return login, rate


def _warm_up(port: int, context: ssl.SSLContext) -> None:
    """Start the service without logging in: read the greeting, QUIT."""
    client = poplib.POP3_SSL("127.0.0.1", port, context=context, timeout=60)
    client.quit()


def _measure(port: int, context: ssl.SSLContext, count: int) -> dict[str, float]:
    _warm_up(port, context)
    sessions = [_session(port, context, count) for _ in range(ROUNDS)]
    return {
        "first login + STAT (ms)": sessions[0][0],
        "login + STAT (ms)": min(s[0] for s in sessions[1:]),
        f"RETR {count} x 10 KiB (messages/s)": max(s[1] for s in sessions),
    }


def run(count: int = 1000) -> list[Row]:
    def fill(maildir: Maildir) -> None:
        for _ in range(count):
            maildir.deliver(make_message(SIZE))

    with side_by_side("mailroom-pop3d", ("pop3", "pop3s"), "pop3", USER, PASSWORD, fill) as servers:
        ours = _measure(servers.mailroom_port, servers.context, count)
        theirs = _measure(servers.dovecot_port, servers.context, count)
    return side_by_side_rows("pop3", ours, theirs, "msg/s")
