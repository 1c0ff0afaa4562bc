"""Benchmark ``outbound``: 10 KiB messages submitted by 10 clients, queued, then delivered.

mailroom's side is the real path of outgoing mail. mailroom-submission runs behind mailroom's
activator on loopback; 10 aiosmtplib clients each do STARTTLS and AUTH once, wait for each
other, and then send their share of the messages to recipients at ``remote.test``. Every
``250`` means the message is DKIM-signed (RSA-2048 and Ed25519) and fsync'd in the queue, so
figure 1 runs from the moment all clients are logged in to the last ``250``. Then
``mailroom-deliver``, the real program, empties the queue: it finds ``remote.test``'s MX in a
knotd zone (``tests.dnsserver``) pointing at 127.0.0.1, and hands every message to Postfix's
``smtp-sink`` (which takes and discards them, without STARTTLS); figure 2 runs until the
program exits, the queue empty. Figure 3 is the DKIM signing of the same message, timed
directly with ``dkim.sign`` and both keys.

The anchor is a private Postfix (its own configuration and queue, as in
``tests.postfix_peer``; the system's ``/etc/postfix`` is never read) that relays anything
from 127.0.0.0/8 to the same smtp-sink (``relayhost``). It does less work than mailroom:
no AUTH (Postfix's SASL needs a Dovecot or Cyrus auth server), no DKIM signing, and no DNS
lookup (the relayhost is an IP literal); TLS it does, the clients use STARTTLS with it too.
So that figure 2 measures delivery alone, Postfix puts every message on hold as it accepts
it (``smtpd_end_of_data_restrictions``: ``HOLD``); the run releases them all at once
(``postsuper -H ALL``, ``postqueue -f``) and waits until the sink has them all and the queue
directories are empty. Postfix delivers with the parallelism of mailroom's runner (10
connections), and reuses its connections to the sink, as it does by default. Signing has
no anchor: its row prints ``-``.

Everything is set up in one work directory under ``/var/tmp`` (the same disk for both
queues), and every process and file is gone afterwards, also after an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiosmtplib

from mailroom import deliver, dkim
from mailroom.accounts import Accounts
from tests import postfix_peer
from tests.bench.side_by_side import certificate, wait_port
from tests.bench.smtp_inbound import Row, _free_port
from tests.dnsserver import DnsServer

USER = "u@bench.test"
PASSWORD = "bench-password-1"
REMOTE = "remote.test"
SIZE = 10 * 1024
CLIENTS = 10
SIGNINGS = 200  # dkim.sign calls timed for figure 3
SMTP_SINK = "/usr/sbin/smtp-sink"
POSTQUEUE = "/usr/sbin/postqueue"
POSTSUPER = "/usr/sbin/postsuper"
TIMEOUT = 120  # seconds any one phase may take

POSTFIX_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mail.bench.test
mydomain = bench.test
myorigin = $myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_domains =
alias_maps =
alias_database =
local_recipient_maps =
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
smtpd_tls_security_level = may
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_end_of_data_restrictions = check_client_access static:HOLD
relayhost = [127.0.0.1]:{sink_port}
smtp_tls_security_level = none
smtp_destination_concurrency_limit = {parallel}
smtp_initial_destination_concurrency = {parallel}
smtputf8_enable = no
biff = no
"""


def make_message(size: int) -> bytes:
    """A message of exactly ``size`` bytes from the benchmark's user, CRLF line ends."""
    header = (
        f"From: Bench <{USER}>\r\nTo: <rcpt@{REMOTE}>\r\nSubject: outbound bench\r\n"
        "Date: Mon, 2 Mar 2026 10:00:00 +0000\r\nMessage-ID: <outbound@bench.test>\r\n\r\n"
    ).encode()
    fill = size - len(header) - 2
    body = ((b"x" * 76 + b"\r\n") * (fill // 78 + 1))[:fill]
    if body.endswith(b"\r"):  # cut inside a CRLF: no bare CR
        body = body[:-1] + b"x"
    return header + body + b"\r\n"


# -- the clients -------------------------------------------------------------------------------


class _Start:
    """The moment the last client is ready; or that one failed, and all must stop.

    Clients stop by themselves rather than by cancellation: in Python 3.11 ``wait_for``
    (inside aiosmtplib) may swallow a cancellation, and ``asyncio.Barrier`` may then hang.
    """

    def __init__(self, parties: int) -> None:
        self.waiting = parties
        self.event = asyncio.Event()
        self.time = 0.0
        self.failed = False

    async def ready(self) -> None:
        self.waiting -= 1
        if self.waiting == 0:
            self.time = time.perf_counter()
            self.event.set()
        await self.event.wait()
        self.check()

    def fail(self) -> None:
        self.failed = True
        self.event.set()

    def check(self) -> None:
        if self.failed:
            raise RuntimeError("another client failed")


async def _client(
    port: int,
    context: ssl.SSLContext,
    login: bool,
    recipients: range,
    message: bytes,
    start: _Start,
) -> float:
    """STARTTLS (and AUTH), wait for the others, send one message per recipient number;
    returns when the last 250 came."""
    smtp = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=port, start_tls=True, tls_context=context, timeout=60
    )
    try:
        await smtp.connect()
        if login:
            await smtp.login(USER, PASSWORD)
        await start.ready()
        for n in recipients:
            start.check()
            refused, _ = await smtp.sendmail(USER, [f"r{n}@{REMOTE}"], message)  # 250 or raise
            if refused:
                raise RuntimeError(f"message {n} not accepted: {refused}")
        done = time.perf_counter()
        await smtp.quit()
        return done
    except BaseException:
        start.fail()
        raise
    finally:
        smtp.close()


async def _submit(port: int, context: ssl.SSLContext, login: bool, total: int) -> float:
    """Messages per second from the moment all clients are ready to the last 250."""
    message = make_message(SIZE)
    start = _Start(CLIENTS)
    clients = [
        asyncio.create_task(_client(port, context, login, range(i, total, CLIENTS), message, start))
        for i in range(CLIENTS)
    ]
    try:
        async with asyncio.timeout(TIMEOUT):
            ends = await asyncio.gather(*clients)  # the first error ends the run
    finally:
        start.fail()  # a no-op when all are done
        await asyncio.wait(clients)
    return total / (max(ends) - start.time)


# -- the parts ---------------------------------------------------------------------------------


class Sink:
    """Postfix's smtp-sink on 127.0.0.1:``port``: takes mail, throws it away, counts it."""

    def __init__(self, work: Path) -> None:
        self.port = _free_port()
        self.counters = work / "smtp-sink.out"
        with self.counters.open("wb") as out:
            self.proc = subprocess.Popen(
                [SMTP_SINK, "-a", "-c", "-u", "nobody", f"127.0.0.1:{self.port}", "1000"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_port(self.port)
        except BaseException:
            self.stop()
            raise

    def messages(self) -> int:
        """How many messages it has taken so far (its ``-c`` counter line: ``... mesg=N``)."""
        found = re.findall(rb"mesg=(\d+)", self.counters.read_bytes())
        return int(found[-1]) if found else 0

    def stop(self) -> None:
        _end(self.proc)


def _end(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def _submission(work: Path, config: Path) -> Iterator[int]:
    """mailroom-submission behind mailroom's activator; yields its STARTTLS port."""
    port = _free_port()
    bindir = Path(sys.executable).parent
    with (work / "activator.log").open("wb") as log:
        activator = subprocess.Popen(
            [sys.executable, "-m", "mailroom.activator", "--service",
             f"{bindir / 'mailroom-submission'}:submission=127.0.0.1:{port}"],
            env={"CONFIG_PATH": str(config), "PATH": f"{bindir}:/usr/bin:/bin"},
            stderr=log,
        )  # fmt: skip
    try:
        wait_port(port)
        yield port
    finally:
        _end(activator)


def _deliver(config: Path) -> float:
    """Run ``mailroom-deliver`` until it exits; its wall time in seconds."""
    bindir = Path(sys.executable).parent
    start = time.perf_counter()
    done = subprocess.run(
        [bindir / "mailroom-deliver"],
        env={"CONFIG_PATH": str(config), "PATH": f"{bindir}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"mailroom-deliver failed ({done.returncode}):\n{done.stderr}")
    return elapsed


def _per_call_ms(call: Callable[[], object]) -> float:
    """Milliseconds per ``call()``, over ``SIGNINGS`` calls after a few to warm up."""
    for _ in range(5):
        call()
    start = time.perf_counter()
    for _ in range(SIGNINGS):
        call()
    return (time.perf_counter() - start) / SIGNINGS * 1000


class Postfix:
    """A private Postfix relaying to ``sink_port``, holding what it accepts until released."""

    def __init__(self, root: Path, cert: Path, key: Path, sink_port: int) -> None:
        self.root = root
        self.port = _free_port()
        self.config = root / "etc"
        self.config.mkdir(parents=True)
        (root / "queue").mkdir(mode=0o755)
        (self.config / "main.cf").write_text(
            POSTFIX_MAIN_CF.format(
                root=root, cert=cert, key=key, sink_port=sink_port, parallel=deliver.PARALLEL
            )
        )
        (self.config / "master.cf").write_text(postfix_peer.MASTER_CF.format(port=self.port))
        try:
            self._run(str(postfix_peer.POSTFIX), "start")
            wait_port(self.port)
        except BaseException:
            self.stop()
            raise

    def _run(self, *command: str) -> str:
        done = subprocess.run(
            [command[0], "-c", str(self.config), *command[1:]],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            log = self.root / "maillog"
            why = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr}{why}")
        return done.stdout

    def queued(self, *queues: str) -> int:
        """Queue files in ``queues`` (default: all a message can be in)."""
        names = queues or ("maildrop", "incoming", "active", "deferred", "hold")
        return sum(len(files) for q in names for _, _, files in os.walk(self.root / "queue" / q))

    def release(self) -> None:
        """Every held message back into delivery, at once."""
        self._run(POSTSUPER, "-H", "ALL")
        self._run(POSTQUEUE, "-f")

    def is_empty(self) -> bool:
        return "Mail queue is empty" in self._run(POSTQUEUE, "-p")

    def version(self) -> str:
        return self._run("/usr/sbin/postconf", "-h", "mail_version").strip()

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError, RuntimeError):
            self._run(str(postfix_peer.POSTFIX), "stop")
        pid_file = self.root / "queue" / "pid" / "master.pid"
        deadline = time.monotonic() + 10
        while pid_file.exists() and time.monotonic() < deadline:  # master waits for its children
            time.sleep(0.05)


def _wait(done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {TIMEOUT} s for {what}")
        time.sleep(0.01)


# -- the scenario ------------------------------------------------------------------------------


def _mailroom(
    work: Path, client_tls: ssl.SSLContext, dns: DnsServer, sink: Sink, count: int
) -> dict[str, float]:
    """Figures 1 to 3 for mailroom, and what loading the DKIM keys costs."""
    cert, key = work / "cert.pem", work / "key.pem"
    data = work / "data"
    data.mkdir()
    config = work / "config.toml"
    config.write_text(
        f'hostname = "mail.bench.test"\ndata_dir = "{data}"\nlog_level = "WARNING"\n'
        f'[tls]\ncert = "{cert}"\nkey = "{key}"\n'
        f'[dns]\nnameservers = ["{dns.address}"]\n'
        f"[outbound]\nsmtp_port = {sink.port}\nmta_sts = false\n"
        # the 10 clients, and the probe of wait_port that may not have been noticed yet
        f"[submission]\nmax_connections_per_ip = {2 * CLIENTS}\n"
    )
    with Accounts(data / "auth.sqlite3") as accounts:
        accounts.add_domain("bench.test")
        accounts.add_user(USER, PASSWORD)
    keys = dkim.generate(data / "dkim", "bench.test")

    with _submission(work, config) as port:
        submitted = asyncio.run(_submit(port, client_tls, True, count))
    queued = len(list((data / "queue").glob("*.json")))
    if queued != count:
        raise RuntimeError(f"{queued} messages in mailroom's queue, expected {count}")
    delivered = count / _deliver(config)
    if list((data / "queue").glob("*.json")) or sink.messages() != count:
        raise RuntimeError(f"mailroom: the sink has {sink.messages()} of {count} messages")
    message = make_message(SIZE)
    return {
        "submitted": submitted,
        "delivered": delivered,
        "signing": _per_call_ms(lambda: dkim.sign(message, keys)),  # two signatures
        # what submission does before signing each message (mailroom.submission.sign)
        "loading": _per_call_ms(lambda: dkim.load_keys(data / "dkim", "bench.test")),
    }


def _postfix(
    work: Path, client_tls: ssl.SSLContext, sink: Sink, count: int
) -> tuple[float, float, str]:
    """Figures 1 and 2 for Postfix, and its version; ``sink`` has ``count`` messages already."""
    postfix = Postfix(work / "postfix", work / "cert.pem", work / "key.pem", sink.port)
    try:
        submitted = asyncio.run(_submit(postfix.port, client_tls, False, count))
        _wait(lambda: postfix.queued("hold") == count, f"{count} messages on hold in Postfix")
        start = time.perf_counter()
        postfix.release()
        _wait(lambda: sink.messages() == 2 * count, "Postfix to deliver to the sink")
        _wait(lambda: postfix.queued() == 0, "Postfix's queue to be empty")
        delivered = count / (time.perf_counter() - start)
        if not postfix.is_empty():
            raise RuntimeError("postqueue -p still lists messages")
        return submitted, delivered, postfix.version()
    finally:
        postfix.stop()


def run(count: int = 2000) -> list[Row]:
    why = postfix_peer.available()
    if why is not None:
        raise RuntimeError(f"the anchor cannot run: {why}")
    work = Path(tempfile.mkdtemp(prefix="mailroom-bench-outbound-", dir="/var/tmp"))
    work.chmod(0o711)  # Postfix's daemons run as postfix and must reach their queue
    try:
        cert, _ = certificate(work)
        client_tls = ssl.create_default_context(cafile=str(cert))
        client_tls.check_hostname = False
        with DnsServer() as dns:
            dns.set_zone(REMOTE, ["@ 300 IN MX 10 mx.remote.test.", "mx 300 IN A 127.0.0.1"])
            sink = Sink(work)
            try:
                ours = _mailroom(work, client_tls, dns, sink, count)
                anchor_submitted, anchor_delivered, version = _postfix(
                    work, client_tls, sink, count
                )
            finally:
                sink.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    kib = SIZE // 1024
    return [
        Row(
            f"outbound: submit {kib} KiB, {CLIENTS} clients, STARTTLS, until queued",
            ours["submitted"],
            anchor_submitted,
            f"Postfix {version} smtpd, STARTTLS too, but no AUTH and no DKIM signing",
            "msg/s",
        ),
        Row(
            "outbound: deliver from the queue to smtp-sink, until empty",
            ours["delivered"],
            anchor_delivered,
            f"Postfix {version} qmgr + smtp, held mail released, relayhost (no DNS)",
            "msg/s",
        ),
        Row(
            "outbound: DKIM-sign one message, RSA-2048 + Ed25519 (ms)",
            ours["signing"],
            0.0,
            "none for DKIM (dkim.sign and dkim.load_keys timed in-process)",
            "ms",
        ),
        Row(
            "outbound: DKIM load_keys (submission: once per domain) (ms)",
            ours["loading"],
            0.0,
            "none for DKIM (dkim.sign and dkim.load_keys timed in-process)",
            "ms",
        ),
    ]
