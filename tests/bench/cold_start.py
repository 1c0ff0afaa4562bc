"""Benchmark ``cold-start``: connect-to-greeting of each mailroom service, started by its socket.

Each service runs behind mailroom's activator exactly as under systemd (``Accept=no``, the
sockets passed on the first connection) with ``idle_exit_seconds = 1``. *Cold*: the service
has exited (no process), a client connects, and the time until the greeting's first line is
process start, imports, configuration (validated at the first start, then read from the
cache directory the units give, as under systemd) and the greeting. *Warm*: the service
runs. Both on the plain ports (25, 587, 143, 110), medians of several connections. The anchors are the
programs users would otherwise run, warm (they never exit): Postfix's smtpd (a private
instance, ``tests/postfix_peer.py``) for SMTP and submission, Dovecot for IMAP and POP3.
Targets (issue "Performance"): cold ≤ 150 ms, warm ≤ 5 ms.
"""

from __future__ import annotations

import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.bench.side_by_side import Protocol, mailroom_install, start_dovecot, wait_port
from tests.bench.smtp_inbound import Row, _free_port

ROUNDS = 7  # cold starts per service
WARM = 30  # connections per warm figure
IDLE_EXIT = 1.0
USER, PASSWORD = "u@bench.test", "bench password 1"
# (figure name, program, its fd names, the greeting's first bytes)
SERVICES = [
    ("smtp", "mailroom-smtpd", ("smtp",), b"220 "),
    ("submission", "mailroom-submission", ("submission",), b"220 "),
    ("imap", "mailroom-imapd", ("imap",), b"* OK"),
    ("pop3", "mailroom-pop3d", ("pop3",), b"+OK"),
]


def greeting_ms(port: int, expect: bytes) -> float:
    """Milliseconds from connect() to the end of the greeting's first line."""
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        elapsed = (time.perf_counter() - start) * 1000
        if not data.startswith(expect):
            raise RuntimeError(f"unexpected greeting {data[:80]!r}")
        # Leave politely, so that the server sees an ordinary client (and a quick exit).
        sock.sendall(b"QUIT\r\n" if expect != b"* OK" else b"a LOGOUT\r\n")
    return elapsed


def children(parent: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            found.append(int(stat.parent.name))
    return found


def wait_gone(parent: int, timeout: float = 30) -> None:
    """Until the activator's service has exited (idle exit)."""
    deadline = time.monotonic() + timeout
    while children(parent):
        if time.monotonic() > deadline:
            raise RuntimeError("the service did not exit when idle")
        time.sleep(0.05)


@contextmanager
def activated(work: Path, program: str, names: tuple[str, ...]) -> Iterator[tuple[int, int]]:
    """(the activator's pid, the first socket's port) for ``program`` behind the activator."""
    ports = {name: _free_port() for name in names}
    binds = ",".join(f"{n}=127.0.0.1:{p}" for n, p in ports.items())
    cache = work / "cache"
    cache.mkdir(mode=0o700, exist_ok=True)
    bindir = Path(sys.executable).parent
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailroom.activator", "--service", f"{bindir / program}:{binds}"],
        env={
            "CONFIG_PATH": str(work / "config.toml"),
            "CACHE_DIRECTORY": str(cache),  # as the units' CacheDirectory=
            "PATH": f"{bindir}:/usr/bin:/bin",
        },
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(ports[names[0]])
        yield proc.pid, ports[names[0]]
    finally:
        proc.terminate()
        proc.wait(30)


def _ours(work: Path) -> dict[str, tuple[float, float]]:
    figures = {}
    for name, program, names, expect in SERVICES:
        with activated(work, program, names) as (pid, port):
            cold = []
            for _ in range(ROUNDS):
                wait_gone(pid)
                cold.append(greeting_ms(port, expect))
            warm = [greeting_ms(port, expect) for _ in range(WARM)]
        figures[name] = (statistics.median(cold), statistics.median(warm))
    return figures


def _anchors(work: Path, cert: Path, key: Path) -> dict[str, float]:
    from tests.postfix_peer import PostfixPeer

    figures = {}
    port = _free_port()
    with PostfixPeer(port=port, domains=["peer.test"], mailboxes=[], cert=cert, key=key):
        greeting_ms(port, b"220 ")  # master starts smtpd; later connections find it running
        figures["smtp"] = figures["submission"] = statistics.median(
            greeting_ms(port, b"220 ") for _ in range(WARM)
        )
    protocols: list[tuple[Protocol, bytes]] = [("imap", b"* OK"), ("pop3", b"+OK")]
    for protocol, expect in protocols:
        home = work / f"dovecot-{protocol}"
        home.mkdir()
        maildir = home / "Maildir"
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True)
        plain = _free_port()
        dovecot = start_dovecot(
            home, maildir, cert, key, _free_port(), PASSWORD, protocol, plain_port=plain
        )
        try:
            wait_port(plain)
            greeting_ms(plain, expect)
            figures[protocol] = statistics.median(greeting_ms(plain, expect) for _ in range(WARM))
        finally:
            dovecot.terminate()
            dovecot.wait(30)
    return figures


def run(count: int = 0) -> list[Row]:
    """``count`` is unused (the scenario has no messages); accepted like the others'."""
    work = Path(tempfile.mkdtemp(prefix="mailroom-bench-cold-", dir="/var/tmp"))
    try:
        cert, key = mailroom_install(work, USER, PASSWORD, top=f"idle_exit_seconds = {IDLE_EXIT}\n")
        ours = _ours(work)
        theirs = _anchors(work, cert, key)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for name, _, _, _ in SERVICES:
        anchor = "Postfix (warm)" if name in ("smtp", "submission") else "Dovecot (warm)"
        cold, warm = ours[name]
        rows.append(Row(f"cold-start: {name}, service not running (ms)", cold, theirs[name],
                        anchor, "ms"))  # fmt: skip
        rows.append(Row(f"cold-start: {name}, service running (ms)", warm, theirs[name],
                        anchor, "ms"))  # fmt: skip
    return rows
