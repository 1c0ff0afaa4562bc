"""Benchmark ``imap``: one workload against mailroom-imapd and against Dovecot, side by side.

Both servers get the same 10,000-message Maildir (mailroom writes it; Dovecot reads a copy),
both over implicit TLS with the same certificate, and the same 10 concurrent imaplib clients.
Each phase runs on all clients at once; the figure is operations per second over the phase.
Dovecot is Debian's dovecot-imapd, run by this benchmark as root in a private directory on a
loopback port, never touching the system's own configuration.
"""

from __future__ import annotations

import imaplib
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from mailroom.accounts import Accounts
from mailroom.addresses import parse_address
from mailroom.maildir import Maildir
from tests.bench.smtp_inbound import Row, _free_port

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


def _wait_port(port: int) -> None:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def _certificate(work: Path) -> tuple[Path, Path]:
    cert, key = work / "cert.pem", work / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=mail.bench.test",
         "-keyout", key, "-out", cert],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def _dovecot(
    work: Path, maildir: Path, cert: Path, key: Path, port: int
) -> subprocess.Popen[bytes]:
    conf = work / "dovecot.conf"
    for sub in ("run", "state", "home"):
        (work / sub).mkdir(exist_ok=True)
    # Dovecot will not read mail as root: the copy and the home belong to its own user.
    work.chmod(0o711)
    subprocess.run(["chown", "-R", "dovecot:dovecot", str(maildir), str(work / "home")], check=True)
    conf.write_text(
        f"""
base_dir = {work}/run
state_dir = {work}/state
log_path = {work}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = required
ssl_cert = <{cert}
ssl_key = <{key}
auth_mechanisms = plain
first_valid_uid = 100
mail_location = maildir:{maildir}
passdb {{
  driver = static
  args = password={PASSWORD}
}}
userdb {{
  driver = static
  args = uid=dovecot gid=dovecot home={work}/home
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {port}
  }}
}}
"""
    )
    proc = subprocess.Popen(["dovecot", "-F", "-c", str(conf)], stderr=subprocess.DEVNULL)
    _wait_port(port)
    return proc


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
    figures["SELECT"] = _phase(clients, 3, lambda c, i: _check(c.select("INBOX")))
    figures["FETCH 1:* (FLAGS)"] = _phase(
        clients, 2, lambda c, i: _check(c.fetch("1:*", "(FLAGS)"))
    )

    def envelopes(c: imaplib.IMAP4_SSL, i: int) -> None:
        first = 1 + (i * 997) % (count - 100)
        _check(c.fetch(f"{first}:{first + 99}", "(ENVELOPE)"))

    figures["FETCH 100 (ENVELOPE)"] = _phase(clients, 5, envelopes)
    figures["FETCH BODY.PEEK[] (one message)"] = _phase(
        clients, 20, lambda c, i: _check(c.fetch(str(1 + (i * 7919) % count), "(BODY.PEEK[])"))
    )
    figures["SEARCH UNSEEN"] = _phase(clients, 5, lambda c, i: _check(c.search(None, "UNSEEN")))
    figures["SEARCH SUBJECT (all messages)"] = _phase(
        clients, 1, lambda c, i: _check(c.search(None, "SUBJECT", f'"message {i}99"'))
    )

    def store(c: imaplib.IMAP4_SSL, i: int) -> None:
        first = 1 + (i * 101) % (count - 20)
        _check(
            c.store(f"{first}:{first + 19}", "+FLAGS" if i % 2 == 0 else "-FLAGS", "(\\Flagged)")
        )

    figures["STORE 20 messages"] = _phase(clients, 10, store)

    def idle(c: imaplib.IMAP4_SSL, i: int) -> None:
        tag = c._new_tag()
        c.send(tag + b" IDLE\r\n")
        if not c.readline().startswith(b"+"):
            raise RuntimeError("IDLE refused")
        c.send(b"DONE\r\n")
        while not c.readline().startswith(tag):
            pass

    figures["IDLE + DONE"] = _phase(clients, 10, idle)
    for client in clients:
        client.logout()
    return figures


def run(count: int = 10000) -> list[Row]:
    work = Path(tempfile.mkdtemp(prefix="mailroom-bench-imap-", dir="/var/tmp"))
    try:
        cert, key = _certificate(work)
        data = work / "data"
        data.mkdir()
        config = work / "config.toml"
        config.write_text(
            f'hostname = "mail.bench.test"\ndata_dir = "{data}"\nlog_level = "WARNING"\n'
            f'[tls]\ncert = "{cert}"\nkey = "{key}"\n'
        )
        with Accounts(data / "auth.sqlite3") as accounts:
            accounts.add_domain("bench.test")
            accounts.add_user(USER, PASSWORD)
        maildir = Maildir.for_address(data / "mail", parse_address(USER), "mail.bench.test")
        for i in range(count):
            maildir.deliver(make_message(i))
        dovecot_maildir = work / "dovecot-maildir"
        shutil.copytree(maildir.root, dovecot_maildir)
        context = ssl.create_default_context(cafile=str(cert))
        context.check_hostname = False

        ports = {"imap": _free_port(), "imaps": _free_port()}
        bindir = Path(sys.executable).parent
        binds = ",".join(f"{n}=127.0.0.1:{p}" for n, p in ports.items())
        mailroom = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mailroom.activator",
                "--service",
                f"{bindir / 'mailroom-imapd'}:{binds}",
            ],
            env={"CONFIG_PATH": str(config), "PATH": f"{bindir}:/usr/bin:/bin"},
            stderr=subprocess.DEVNULL,
        )
        dovecot_port = _free_port()
        dovecot = _dovecot(work, dovecot_maildir, cert, key, dovecot_port)
        try:
            _wait_port(ports["imaps"])
            ours = _workload(ports["imaps"], context, count)
            theirs = _workload(dovecot_port, context, count)
        finally:
            mailroom.terminate()
            dovecot.terminate()
            mailroom.wait(30)
            dovecot.wait(30)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for figure, value in ours.items():
        unit = "ms" if figure.endswith("(ms)") else "ops/s"
        rows.append(Row(f"imap: {figure}", value, theirs[figure], "Dovecot", unit))
    return rows
