"""Benchmark ``smtp-inbound``: 10 KiB messages from concurrent SMTP sessions, until durable.

mailroom-smtpd runs behind mailroom's activator exactly as in ``bin/dev``; every ``250`` it
sends means the message is fsync'd in the Maildir, so the time until the last ``250`` is
the time until all are durable. The anchor is what users would otherwise run: a private
Postfix handing each message by LMTP to a private Dovecot that stores it in a Maildir, timed
from the first connection until the last message is in the Maildir. The same count and size
are also made durable the plain maildir(5) way, each file and each fsync of new/ on its own,
from as many threads, in the same Maildir (``fsync_limit``): the disk's limit.

Every message is authenticated as on a real MX (SPF, DKIM, DMARC): a knotd on loopback
serves the sender domain's SPF (127.0.0.1 allowed) and DMARC (p=reject) records: every
message passes SPF and DMARC, each session asks DNS once per name, and nothing waits on the
machine's resolver.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mailroom.accounts import Accounts
from tests.bench.fsync_limit import bench_fsync_limit, make_message
from tests.dnsserver import DnsServer


@dataclass(frozen=True)
class Row:
    figure: str
    mailroom: float
    anchor: float
    anchor_name: str
    unit: str

    @property
    def ratio(self) -> float:
        """How mailroom compares, higher is better: rates divide, durations, memory and process
        counts divide the other way (none of it where the anchor has some: infinitely better)."""
        if self.unit in ("ms", "MB", "count"):
            if not self.mailroom:
                return float("inf") if self.anchor else 0.0
            return self.anchor / self.mailroom
        return self.mailroom / self.anchor if self.anchor else 0.0


def side_by_side_rows(
    scenario: str, ours: dict[str, float], theirs: dict[str, float], rate: str
) -> list[Row]:
    """One Row per figure of a mailroom-vs-Dovecot scenario; figures named "... (ms)" are durations."""
    return [
        Row(
            f"{scenario}: {figure}",
            value,
            theirs[figure],
            "Dovecot",
            "ms" if figure.endswith("(ms)") else rate,
        )
        for figure, value in ours.items()
    ]


async def _session(port: int, message: bytes, count: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> bytes:
        while True:
            line = await reader.readline()
            if len(line) < 4 or line[3:4] != b"-":
                if not line.startswith((b"2", b"3")):
                    raise RuntimeError(f"unexpected reply {line!r}")
                return line

    await reply()
    writer.write(b"EHLO bench.test\r\n")
    await reply()
    for _ in range(count):
        writer.write(b"MAIL FROM:<load@example.org>\r\nRCPT TO:<u@bench.test>\r\nDATA\r\n")
        for _ in range(3):
            await reply()
        writer.write(message + b".\r\n")
        await reply()
    writer.write(b"QUIT\r\n")
    await reply()
    writer.close()


async def _load(port: int, message: bytes, total: int, connections: int) -> float:
    share = [
        total // connections + (1 if i < total % connections else 0) for i in range(connections)
    ]
    start = time.perf_counter()
    await asyncio.gather(*(_session(port, message, n) for n in share))
    return time.perf_counter() - start


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostfixDovecot:
    """The anchor: a private Postfix whose mail for u@bench.test goes by LMTP to a private
    Dovecot, which stores it in a Maildir (both fsync before they acknowledge)."""

    def __init__(self, work: Path) -> None:
        from tests.bench.side_by_side import certificate, start_dovecot_lmtp
        from tests.postfix_peer import PostfixPeer

        work.mkdir()
        work.parent.chmod(0o711)  # Dovecot's LMTP runs as the dovecot user
        cert, key = certificate(work)
        self.maildir = work / "Maildir"
        lmtp = _free_port()
        self.dovecot = start_dovecot_lmtp(work, self.maildir, lmtp)
        self.port = _free_port()
        self.postfix = PostfixPeer(
            port=self.port, domains=["bench.test"], mailboxes=["u@bench.test"], cert=cert,
            key=key, transport=f"lmtp:inet:127.0.0.1:{lmtp}",
        )  # fmt: skip

    def stored(self) -> int:
        return len(list((self.maildir / "new").iterdir()))

    def rate(self, message: bytes, count: int, connections: int) -> float:
        """Messages per second from the first connection until the last one is in the Maildir."""
        before = self.stored()
        start = time.perf_counter()
        asyncio.run(_load(self.port, message, count, connections))
        deadline = time.monotonic() + 120
        while self.stored() < before + count:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Postfix -> Dovecot delivered {self.stored() - before} of {count}"
                )
            time.sleep(0.01)
        return count / (time.perf_counter() - start)

    def stop(self) -> None:
        self.postfix.stop()
        self.dovecot.terminate()
        self.dovecot.wait(30)


def run(
    count: int = 2000, size: int = 10 * 1024, connections: int = 10, rounds: int = 3
) -> list[Row]:
    """Alternate rounds of mailroom, of Postfix -> Dovecot LMTP, and of the bare disk limit;
    report the medians.

    The disk of a shared machine varies from minute to minute, so the figures are taken in
    turns and the ratios are of their medians.
    """
    work = Path(tempfile.mkdtemp(prefix="mailroom-bench-", dir="/var/tmp"))
    smtp_rates, limit_rates, anchor_rates = [], [], []
    dns = DnsServer()
    anchor: PostfixDovecot | None = None
    try:
        anchor = PostfixDovecot(work / "anchor")
        dns.start()
        dns.set_zone(
            "example.org",  # the bench message's MAIL FROM and From: domain
            ['@ 300 IN TXT "v=spf1 ip4:127.0.0.1 -all"', '_dmarc 300 IN TXT "v=DMARC1; p=reject"'],
        )
        data = work / "data"
        data.mkdir()
        config = work / "config.toml"
        config.write_text(
            f'hostname = "mail.bench.test"\ndata_dir = "{data}"\nlog_level = "WARNING"\n'
            f'[dns]\nnameservers = ["{dns.address}"]\n'
        )
        with Accounts(data / "auth.sqlite3") as accounts:
            accounts.add_domain("bench.test")
            accounts.add_user("u@bench.test", "bench password 1")
        # The limit writes into the same Maildir: where on the disk a file system puts new
        # files (ext4: the directory's block group) changes what creating one costs.
        mailbox = data / "mail" / "bench.test" / "u"
        port = _free_port()
        bindir = Path(sys.executable).parent
        activator = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mailroom.activator",
                "--service",
                f"{bindir / 'mailroom-smtpd'}:smtp=127.0.0.1:{port}",
            ],
            env={"CONFIG_PATH": str(config), "PATH": f"{bindir}:/usr/bin:/bin"},
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(0.5)
            message = make_message(size)
            asyncio.run(_load(port, message, connections, connections))  # start and warm up
            anchor.rate(message, connections, connections)
            for _ in range(rounds):
                # The limit right after mailroom: what the disk could do in the same moment.
                smtp_rates.append(count / asyncio.run(_load(port, message, count, connections)))
                limit_rates.append(bench_fsync_limit(mailbox, count, size, workers=connections))
                anchor_rates.append(anchor.rate(message, count, connections))
        finally:
            activator.terminate()
            activator.wait(30)
        stored = sum(".M" in p.name for p in (mailbox / "new").iterdir())  # not the limit's
        if stored != count * rounds + connections:
            raise RuntimeError(f"{stored} messages stored, expected {count * rounds + connections}")
    finally:
        dns.stop()
        if anchor is not None:
            anchor.stop()
        shutil.rmtree(work, ignore_errors=True)
    figure = f"smtp-inbound: {size // 1024} KiB messages, {connections} connections, until durable"
    return [
        Row(
            figure,
            statistics.median(smtp_rates),
            statistics.median(anchor_rates),
            f"Postfix -> Dovecot LMTP -> Maildir; medians of {rounds} alternating rounds",
            "msg/s",
        ),
        Row(
            figure + " (vs the disk)",
            statistics.median(smtp_rates),
            statistics.median(limit_rates),
            f"disk limit (write+fsync+link+fsync dir, {connections} threads); medians of {rounds} alternating rounds",
            "msg/s",
        ),
    ]
