"""mailroom and Dovecot side by side, serving the same Maildir: the set-up of the mail benchmarks.

``side_by_side`` makes a private work directory with a certificate, a mailroom data directory
(config, one user), fills that user's Maildir, copies it for Dovecot, and starts both servers
on loopback with implicit TLS: mailroom's program behind ``mailroom.activator`` exactly as in
``bin/dev``, and Dovecot through ``start_dovecot``. Everything is removed afterwards.

``start_dovecot`` writes a configuration into a work directory (its own base, state and log
directories; the system's ``/etc/dovecot`` is never read), gives the Maildir copy to the
``dovecot`` user (Dovecot will not serve mail as root), and starts ``dovecot -F`` with
implicit TLS on one loopback port, for IMAP (``imaps``) or POP3 (``pop3s``). Any user name
logs in with ``password`` into that one Maildir.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mailroom.accounts import Accounts
from mailroom.addresses import parse_address
from mailroom.maildir import Maildir
from tests.bench.smtp_inbound import _free_port

Protocol = Literal["imap", "pop3"]


def wait_port(port: int) -> None:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def certificate(work: Path) -> tuple[Path, Path]:
    """A self-signed certificate for mail.bench.test in ``work``: (cert, key)."""
    cert, key = work / "cert.pem", work / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=mail.bench.test",
         "-keyout", key, "-out", cert],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def _argon2id(password: str) -> str:
    """The password as Dovecot's own argon2id hash (64 MiB, t=3), so both servers pay for a
    real password check at login, as mailroom does (its argon2id: 64 MiB, t=3, p=4)."""
    out = subprocess.run(
        ["doveadm", "pw", "-s", "ARGON2ID", "-p", password],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def start_dovecot(
    work: Path,
    maildir: Path,
    cert: Path,
    key: Path,
    port: int,
    password: str,
    protocol: Protocol = "imap",
    plain_port: int = 0,
    max_connections: int = 20,
) -> subprocess.Popen[bytes]:
    """Dovecot serving ``maildir`` over ``protocol`` with implicit TLS on 127.0.0.1:``port``
    (and on ``plain_port`` without TLS, if given: its greeting, no login without STARTTLS)."""
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
protocols = {protocol}
listen = 127.0.0.1
ssl = required
ssl_cert = <{cert}
ssl_key = <{key}
auth_mechanisms = plain
first_valid_uid = 100
mail_location = maildir:{maildir}
protocol imap {{
  mail_max_userip_connections = {max_connections}
}}
default_process_limit = {max(100, 2 * max_connections)}
passdb {{
  driver = static
  args = password={_argon2id(password)}
}}
userdb {{
  driver = static
  args = uid=dovecot gid=dovecot home={work}/home
}}
service {protocol}-login {{
  inet_listener {protocol} {{
    address = 127.0.0.1
    port = {plain_port}
  }}
  inet_listener {protocol}s {{
    address = 127.0.0.1
    port = {port}
  }}
}}
"""
    )
    proc = subprocess.Popen(["dovecot", "-F", "-c", str(conf)], stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc


def start_dovecot_lmtp(work: Path, maildir: Path, port: int) -> subprocess.Popen[bytes]:
    """Dovecot's LMTP server on 127.0.0.1:``port`` delivering every recipient into ``maildir``
    (the last hop of the Postfix -> Dovecot LMTP -> Maildir anchor)."""
    for sub in ("run", "state", "home"):
        (work / sub).mkdir(exist_ok=True)
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    work.chmod(0o711)
    subprocess.run(["chown", "-R", "dovecot:dovecot", str(maildir), str(work / "home")], check=True)
    conf = work / "dovecot-lmtp.conf"
    conf.write_text(
        f"""
base_dir = {work}/run
state_dir = {work}/state
log_path = {work}/dovecot-lmtp.log
protocols = lmtp
listen = 127.0.0.1
ssl = no
first_valid_uid = 100
mail_location = maildir:{maildir}
passdb {{
  driver = static
  args = nopassword=y
}}
userdb {{
  driver = static
  args = uid=dovecot gid=dovecot home={work}/home allow_all_users=yes
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
}}
"""
    )
    proc = subprocess.Popen(["dovecot", "-F", "-c", str(conf)], stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc


def mailroom_install(
    work: Path, user: str, password: str, *, top: str = "", extra: str = ""
) -> tuple[Path, Path]:
    """A mailroom installation in ``work`` (config.toml, data/, a certificate, ``user`` with
    ``password`` in its domain); ``top`` adds top-level keys to the config, ``extra`` sections
    after it. (cert, key)."""
    cert, key = certificate(work)
    data = work / "data"
    data.mkdir()
    (work / "config.toml").write_text(
        f'hostname = "mail.bench.test"\ndata_dir = "{data}"\nlog_level = "WARNING"\n{top}'
        f'[tls]\ncert = "{cert}"\nkey = "{key}"\n{extra}'
    )
    with Accounts(data / "auth.sqlite3") as accounts:
        accounts.add_domain(user.rpartition("@")[2])
        accounts.add_user(user, password)
    return cert, key


@dataclass(frozen=True)
class Servers:
    mailroom_port: int  # the implicit-TLS port of mailroom's program
    dovecot_port: int
    context: ssl.SSLContext  # trusts the benchmark's certificate


@contextmanager
def side_by_side(
    program: str,
    names: tuple[str, str],
    protocol: Protocol,
    user: str,
    password: str,
    fill: Callable[[Maildir], None],
) -> Iterator[Servers]:
    """mailroom's ``program`` (fd names ``names``, the second the TLS one) and Dovecot."""
    work = Path(tempfile.mkdtemp(prefix=f"mailroom-bench-{protocol}-", dir="/var/tmp"))
    try:
        cert, key = certificate(work)
        data = work / "data"
        data.mkdir()
        config = work / "config.toml"
        config.write_text(
            f'hostname = "mail.bench.test"\ndata_dir = "{data}"\nlog_level = "WARNING"\n'
            f'[tls]\ncert = "{cert}"\nkey = "{key}"\n'
        )
        with Accounts(data / "auth.sqlite3") as accounts:
            domain = user.rpartition("@")[2]
            accounts.add_domain(domain)
            accounts.add_user(user, password)
        maildir = Maildir.for_address(data / "mail", parse_address(user), "mail.bench.test")
        maildir.create()
        fill(maildir)
        dovecot_maildir = work / "dovecot-maildir"
        shutil.copytree(maildir.root, dovecot_maildir)
        context = ssl.create_default_context(cafile=str(cert))
        context.check_hostname = False
        ports = {name: _free_port() for name in names}
        bindir = Path(sys.executable).parent
        binds = ",".join(f"{n}=127.0.0.1:{p}" for n, p in ports.items())
        mailroom = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mailroom.activator",
                "--service",
                f"{bindir / program}:{binds}",
            ],
            env={"CONFIG_PATH": str(config), "PATH": f"{bindir}:/usr/bin:/bin"},
            stderr=subprocess.DEVNULL,
        )
        try:
            dovecot_port = _free_port()
            anchor = start_dovecot(
                work, dovecot_maildir, cert, key, dovecot_port, password, protocol
            )
            try:
                wait_port(ports[names[1]])
                yield Servers(ports[names[1]], dovecot_port, context)
            finally:
                anchor.terminate()
                anchor.wait(30)
        finally:
            mailroom.terminate()
            mailroom.wait(30)
    finally:
        shutil.rmtree(work, ignore_errors=True)
