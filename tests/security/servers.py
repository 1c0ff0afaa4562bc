"""The attack suite's servers: one data directory and every protocol's server, per module.

Started once per test module (the cases are many, start-up costs a second per server); the
cases leave no state behind that another relies on. Login limits are out of the way here
(many cases fail a login on purpose); ``test_auth_abuse`` tests them with its own servers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import PASSWORD, Certificate, MailEnv, Server, write_config

MESSAGE_SIZE_LIMIT = 100_000
PROGRAMS = {
    "smtpd": ("mailroom-smtpd", ("smtp",)),
    "submission": ("mailroom-submission", ("submission", "submissions")),
    "imapd": ("mailroom-imapd", ("imap", "imaps")),
    "pop3d": ("mailroom-pop3d", ("pop3", "pop3s")),
}


@dataclass
class Attacked:
    """The running servers and their data directory."""

    env: MailEnv
    servers: dict[str, Server]

    @property
    def ports(self) -> dict[str, int]:
        return {name: port for s in self.servers.values() for name, port in s.ports.items()}

    def pid(self, program: str) -> int:
        """The pid of the service process behind the activator (one connection starts it)."""
        pids = self.servers[program].child_pids()
        assert pids, f"{program} has no running service process"
        return pids[-1]

    def all_files(self) -> Iterator[Path]:
        for root, _, files in os.walk(self.env.data_dir):
            for name in files:
                yield Path(root) / name


def rss(pid: int) -> int:
    """Resident memory of ``pid`` in bytes (/proc/PID/status VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.fixture(scope="module")
def attacked(
    tmp_path_factory: pytest.TempPathFactory, certificate: Certificate
) -> Iterator[Attacked]:
    root = tmp_path_factory.mktemp("attacked")
    (root / "data").mkdir(mode=0o750)
    config = write_config(
        root,
        certificate,
        idle_exit_seconds=300,
        shutdown_grace_seconds=1,
        message_size_limit=MESSAGE_SIZE_LIMIT,
        login_failures_per_ip=100_000,
        login_failures_per_account=100_000,
        login_failure_delay_seconds=0,
    )
    env = MailEnv(root, config)
    with env.accounts() as accounts:
        accounts.add_domain("example.test")
        for user in ("alice", "bob"):
            accounts.add_user(f"{user}@example.test", PASSWORD)
        accounts.add_user("zo\u00eb@example.test", PASSWORD)  # NFC; logins may spell it NFD
        # a loop with no mailbox in it, and one with alice at the end
        accounts.add_alias("loop1@example.test", ["alice@example.test"])
        accounts.add_alias("loop2@example.test", ["loop1@example.test"])
        accounts.add_alias("loop1@example.test", ["loop2@example.test"])
        accounts.add_alias("ring1@example.test", ["bob@example.test"])
        accounts.add_alias("ring2@example.test", ["ring1@example.test"])
        accounts.add_alias("ring1@example.test", ["ring2@example.test"])
        accounts.del_alias("ring1@example.test", "bob@example.test")
    servers = {}
    try:
        for program, (script, names) in PROGRAMS.items():
            servers[program] = Server(env, script, names)
        yield Attacked(env, servers)
    finally:
        for server in servers.values():
            server.stop()
