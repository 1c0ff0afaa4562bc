"""Benchmark ``imap``: one workload against mailroom-imapd and against Dovecot, side by side.

Both servers get the same 10,000-message Maildir (mailroom writes it; Dovecot reads a copy),
both over implicit TLS with the same certificate, and the same 10 concurrent imaplib clients.
Each phase runs on all clients at once, long enough (about a second or more) for a stable
figure; the figure is operations per second over the phase.
Dovecot is Debian's dovecot-imapd, run by this benchmark as root in a private directory on a
loopback port, never touching the system's own configuration.
"""

from __future__ import annotations

import imaplib
import ssl
import threading
import time
from collections.abc import Callable, Sequence

from mailroom.maildir import Maildir
from tests.bench.side_by_side import side_by_side
from tests.bench.smtp_inbound import Row, side_by_side_rows

USER = "u@bench.test"
PASSWORD = "bench-password-1"
CLIENTS = 10


def make_message(i: int) -> bytes:
    body = "".join(
        f"Line {n} of message {i}, some text to make it a realistic size.\r\n" for n in range(120)
    )
    return (
        f"From: Sender {i % 97} <sender{i % 97}@elsewhere.test>\r\nTo: {USER}\r\n"
        f"Subject: message {i}\r\nDate: Mon, 2 Nov 2026 10:{i // 60 % 60:02d}:{i % 60:02d} +0000\r\n"
        f"Message-ID: <{i}@elsewhere.test>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        + body
    ).encode()


def _phase(
    clients: list[imaplib.IMAP4_SSL], repeat: int, op: Callable[[imaplib.IMAP4_SSL, int], None]
) -> float:
    """Run ``op`` ``repeat`` times on every client at once; operations per second."""
    barrier = threading.Barrier(len(clients) + 1)
    errors: list[BaseException] = []

    def work(client: imaplib.IMAP4_SSL) -> None:
        barrier.wait()
        try:
            for i in range(repeat):
                op(client, i)
        except BaseException as err:  # reported below, after the phase
            errors.append(err)

    threads = [threading.Thread(target=work, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"benchmark operation failed: {errors[0]!r}")
    return len(clients) * repeat / elapsed


def _check(result: tuple[str, Sequence[object]]) -> None:
    if result[0] != "OK":
        raise RuntimeError(f"server said {result}")


def _workload(port: int, context: ssl.SSLContext, count: int) -> dict[str, float]:
    figures: dict[str, float] = {}

    def login() -> imaplib.IMAP4_SSL:
        client = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=context)
        client.login(USER, PASSWORD)
        return client

    start = time.perf_counter()
    clients = [login() for _ in range(CLIENTS)]
    figures["login (TLS handshake + LOGIN)"] = CLIENTS / (time.perf_counter() - start)
    start = time.perf_counter()
    _check(clients[0].select("INBOX"))  # the first SELECT of this server (index build)
    figures[f"first SELECT of {count} messages (ms)"] = (time.perf_counter() - start) * 1000
    lone = login()  # one client alone, on its own connection: what opening the mailbox feels like
    start = time.perf_counter()
    _check(lone.select("INBOX"))
    figures[f"SELECT of {count} messages, one client (ms)"] = (time.perf_counter() - start) * 1000
    lone.logout()
    figures["SELECT"] = _phase(clients, 5, lambda c, i: _check(c.select("INBOX")))
    figures["FETCH 1:* (FLAGS)"] = _phase(
        clients, 2, lambda c, i: _check(c.fetch("1:*", "(FLAGS)"))
    )

    def envelopes(c: imaplib.IMAP4_SSL, i: int) -> None:
        first = 1 + (i * 997) % (count - 100)
        _check(c.fetch(f"{first}:{first + 99}", "(ENVELOPE)"))

    figures["FETCH 100 (ENVELOPE)"] = _phase(clients, 15, envelopes)
    figures["FETCH BODY.PEEK[] (one message)"] = _phase(
        clients, 60, lambda c, i: _check(c.fetch(str(1 + (i * 7919) % count), "(BODY.PEEK[])"))
    )
    figures["SEARCH UNSEEN"] = _phase(clients, 20, lambda c, i: _check(c.search(None, "UNSEEN")))
    figures["SEARCH SUBJECT (all messages)"] = _phase(
        clients, 1, lambda c, i: _check(c.search(None, "SUBJECT", f'"message {i}99"'))
    )

    def store(c: imaplib.IMAP4_SSL, i: int) -> None:
        first = 1 + (i * 101) % (count - 20)
        _check(
            c.store(f"{first}:{first + 19}", "+FLAGS" if i % 2 == 0 else "-FLAGS", "(\\Flagged)")
        )

    figures["STORE 20 messages"] = _phase(clients, 30, store)

    def idle(c: imaplib.IMAP4_SSL, i: int) -> None:
        tag = c._new_tag()
        c.send(tag + b" IDLE\r\n")
        if not c.readline().startswith(b"+"):
            raise RuntimeError("IDLE refused")
        c.send(b"DONE\r\n")
        while not c.readline().startswith(tag):
            pass

    figures["IDLE + DONE"] = _phase(clients, 50, idle)
    for client in clients:
        client.logout()
    return figures


def run(count: int = 10000) -> list[Row]:
    def fill(maildir: Maildir) -> None:
        for i in range(count):
            maildir.deliver(make_message(i))

    with side_by_side("mailroom-imapd", ("imap", "imaps"), "imap", USER, PASSWORD, fill) as servers:
        ours = _workload(servers.mailroom_port, servers.context, count)
        theirs = _workload(servers.dovecot_port, servers.context, count)
    return side_by_side_rows("imap", ours, theirs, "ops/s")
