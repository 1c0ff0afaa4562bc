"""Shared fixtures: a data directory with accounts, a certificate, and servers on real sockets."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailroom.accounts import Accounts
from tests.dnsserver import refusing_dns_address

BIN = Path(sys.executable).parent
HOSTNAME = "mail.example.test"
Certificate = tuple[Path, Path]
PASSWORD = "correct horse battery"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """A self-signed certificate for mail.example.test (what bin/dev makes too)."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "fullchain.pem", d / "privkey.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={HOSTNAME}",
         "-addext", f"subjectAltName=DNS:{HOSTNAME},DNS:localhost,IP:127.0.0.1",
         "-keyout", key, "-out", cert],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@dataclass
class MailEnv:
    """A data directory with domain example.test, users alice/bob/carol and a few aliases."""

    root: Path
    config: Path

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def mailbox(self, address: str, folder: str = "") -> Path:
        local, _, domain = address.partition("@")
        base = self.data_dir / "mail" / domain / local
        return base / f".{folder}" if folder else base

    def new_messages(self, address: str) -> list[Path]:
        new = self.mailbox(address) / "new"
        return sorted(new.iterdir()) if new.exists() else []

    def environ(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ, CONFIG_PATH=str(self.config))
        env.update(extra)
        return env

    def accounts(self) -> Accounts:
        return Accounts(self.data_dir / "auth.sqlite3")


def write_config(
    root: Path, certificate: Certificate | None, inbound_dns: str | None = None, **keys: object
) -> Path:
    """``inbound_dns``: ``[inbound] nameservers`` (port 25's SPF/DKIM/DMARC lookups). By
    default a server that refuses every question at once: the checks give temperror and the
    mail is delivered without waiting on the machine's resolver; ``""`` leaves it unset."""
    if inbound_dns is None:
        inbound_dns = refusing_dns_address()
    lines = [f'hostname = "{HOSTNAME}"', f'data_dir = "{root / "data"}"']
    lines += [f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"' for k, v in keys.items()]
    if certificate:
        lines += ["[tls]", f'cert = "{certificate[0]}"', f'key = "{certificate[1]}"']
    if inbound_dns:
        lines += ["[inbound]", f'nameservers = ["{inbound_dns}"]']
    config = root / "config.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


@pytest.fixture
def mail_env(tmp_path: Path, certificate: Certificate) -> MailEnv:
    (tmp_path / "data").mkdir(mode=0o750)
    env = MailEnv(
        tmp_path,
        write_config(tmp_path, certificate, idle_exit_seconds=30, shutdown_grace_seconds=2),
    )
    with env.accounts() as accounts:
        accounts.add_domain("example.test")
        accounts.add_domain("example.org")
        for user in ("alice", "bob", "carol"):
            accounts.add_user(f"{user}@example.test", PASSWORD)
        accounts.add_user("dave@example.org", PASSWORD)
        accounts.add_alias("team@example.test", ["alice@example.test", "bob@example.test"])
        accounts.add_alias(
            "everyone@example.test",
            ["team@example.test", "carol@example.test", "alice@example.test"],
        )
    return env


class Server:
    """A mailroom program behind mailroom's own activator, on free ports (one per fd name)."""

    def __init__(
        self, env: MailEnv, program: str = "mailroom-smtpd", names: tuple[str, ...] = ("smtp",)
    ) -> None:
        self.ports = {name: free_port() for name in names}
        self.port = self.ports[names[0]]
        self.log_path = env.root / f"activator-{program}.log"
        self.log = self.log_path.open("wb")
        binds = ",".join(f"{name}=127.0.0.1:{port}" for name, port in self.ports.items())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mailroom.activator", "--service", f"{BIN / program}:{binds}"],
            env=env.environ(), stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_for_port(self.port)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def child_pids(self) -> list[int]:
        started = re.findall(r"started \S+ \(pid (\d+)\)", self.output())
        return [int(pid) for pid in started if Path(f"/proc/{pid}").exists()]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture
def smtpd(mail_env: MailEnv) -> Iterator[Server]:
    server = Server(mail_env)
    yield server
    server.stop()
