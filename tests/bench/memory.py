"""Benchmark ``memory``: resident memory of mailroom's processes against Dovecot's and Postfix's.

Three states, the same for both sides: *idle* (nobody connected for longer than
``idle_exit_seconds``: mailroom's socket-activated services have exited, so no process at all;
Dovecot and Postfix keep their daemons), *100 IMAP clients in IDLE* (logged in over TLS,
INBOX selected), and *during SMTP load* (10 connections delivering 10 KiB messages; the
highest sum seen while sampling every 50 ms). A side's figure is the sum of VmRSS over all
its processes (the activator, which plays systemd's part, is not counted; Dovecot's and
Postfix's master processes are). Target (issue "Performance"): idle 0, and at most 60 MB per
mailroom protocol process under load.
"""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.bench.cold_start import children
from tests.bench.fsync_limit import make_message
from tests.bench.side_by_side import mailroom_install, start_dovecot, wait_port
from tests.bench.smtp_inbound import Row, _free_port, _load

CLIENTS = 100
USER, PASSWORD = "u@bench.test", "bench password 1"
IDLE_EXIT = 2.0


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def tree(root: int) -> list[int]:
    """``root``'s descendants (not ``root`` itself)."""
    found, todo = [], [root]
    while todo:
        kids = children(todo.pop())
        found += kids
        todo += kids
    return found


def named(*names: str) -> list[int]:
    out = subprocess.run(["pgrep", "-x", "|".join(names)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


class Peak:
    """The highest value of ``measure()`` while the block runs, sampled every 50 ms."""

    def __init__(self, measure: Callable[[], float]) -> None:
        self.measure, self.value = measure, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.value = max(self.value, self.measure())

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def idle_clients(port: int, context: ssl.SSLContext) -> list[imaplib.IMAP4_SSL]:
    clients = []
    for _ in range(CLIENTS):
        client = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=context)
        client.login(USER, PASSWORD)
        client.select("INBOX")
        tag = client._new_tag()
        client.send(tag + b" IDLE\r\n")
        if not client.readline().startswith(b"+"):
            raise RuntimeError("IDLE refused")
        clients.append(client)
    return clients


def close_all(clients: list[imaplib.IMAP4_SSL]) -> None:
    for client in clients:
        with contextlib.suppress(OSError):
            client.shutdown()


@contextmanager
def activator(work: Path, service: str) -> Iterator[int]:
    bindir = Path(sys.executable).parent
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailroom.activator", "--service", f"{bindir}/{service}"],
        env={"CONFIG_PATH": str(work / "config.toml"), "PATH": f"{bindir}:/usr/bin:/bin"},
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


def _ours(work: Path, context: ssl.SSLContext, message: bytes, count: int) -> dict[str, float]:
    imaps, smtp = _free_port(), _free_port()
    figures = {}
    with (
        activator(work, f"mailroom-imapd:imaps=127.0.0.1:{imaps}") as imapd,
        activator(work, f"mailroom-smtpd:smtp=127.0.0.1:{smtp}") as smtpd,
    ):
        wait_port(imaps)
        wait_port(smtp)
        time.sleep(IDLE_EXIT + 3)  # the probes above started nothing that is still running
        figures["idle (MB)"] = rss_mb(tree(imapd) + tree(smtpd))
        figures["idle: processes"] = float(len(tree(imapd) + tree(smtpd)))
        clients = idle_clients(imaps, context)
        try:
            figures[f"{CLIENTS} IMAP clients in IDLE (MB)"] = rss_mb(tree(imapd))
            # The target's figure; no anchor (Dovecot runs one small process per client).
            figures["  per mailroom-imapd process, target <= 60 (MB)"] = figures[
                f"{CLIENTS} IMAP clients in IDLE (MB)"
            ] / max(len(tree(imapd)), 1)
        finally:
            close_all(clients)
        with Peak(lambda: rss_mb(tree(smtpd))) as peak:
            asyncio.run(_load(smtp, message, count, 10))
        figures["during SMTP load (MB)"] = peak.value
    return figures


def _theirs(
    work: Path, cert: Path, key: Path, context: ssl.SSLContext, message: bytes, count: int
) -> dict[str, float]:
    from tests.postfix_peer import PostfixPeer

    figures = {}
    home = work / "dovecot"
    home.mkdir()
    maildir = home / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    imaps, smtp = _free_port(), _free_port()
    dovecot = start_dovecot(
        home, maildir, cert, key, imaps, PASSWORD, "imap", max_connections=CLIENTS + 10
    )
    try:
        with PostfixPeer(port=smtp, domains=["bench.test"], mailboxes=[USER], cert=cert, key=key):
            wait_port(imaps)
            time.sleep(1)

            def postfix() -> list[int]:
                return named("master", "qmgr", "pickup", "smtpd", "cleanup", "virtual", "tlsmgr",
                             "anvil", "trivial-rewrite", "proxymap", "bounce", "scache")  # fmt: skip

            dovecot_pids = [dovecot.pid, *tree(dovecot.pid)]
            figures["idle (MB)"] = rss_mb(dovecot_pids + postfix())
            figures["idle: processes"] = float(len(dovecot_pids + postfix()))
            clients = idle_clients(imaps, context)
            try:
                pids = [dovecot.pid, *tree(dovecot.pid)]
                figures[f"{CLIENTS} IMAP clients in IDLE (MB)"] = rss_mb(pids)
            finally:
                close_all(clients)
            with Peak(lambda: rss_mb(postfix())) as peak:
                asyncio.run(_load(smtp, message, count, 10))
            figures["during SMTP load (MB)"] = peak.value
    finally:
        dovecot.terminate()
        dovecot.wait(30)
    return figures


def run(count: int = 1000) -> list[Row]:
    work = Path(tempfile.mkdtemp(prefix="mailroom-bench-memory-", dir="/var/tmp"))
    try:
        cert, key = mailroom_install(
            work,
            USER,
            PASSWORD,
            top=f"idle_exit_seconds = {IDLE_EXIT}\n",
            extra=f"[imap]\nmax_connections_per_ip = {CLIENTS + 10}\n"
            f"max_connections_per_user = {CLIENTS + 10}\n"
            "[inbound]\nchecks = false\n",  # no DNS here: memory, not authentication
        )
        context = ssl.create_default_context(cafile=str(cert))
        context.check_hostname = False
        message = make_message(10 * 1024)
        ours = _ours(work, context, message, count)
        theirs = _theirs(work, cert, key, context, message, count)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return [
        Row(
            f"memory: {figure}",
            value,
            theirs.get(figure, 0.0),
            "Dovecot + Postfix",
            "count" if figure.endswith("processes") else "MB",
        )
        for figure, value in ours.items()
    ]
