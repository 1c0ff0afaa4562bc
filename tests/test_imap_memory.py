"""What an IMAP session costs in memory (tests/security/test_load.py measures a whole worker).

Three costs that grew an imapd worker holding 100 IDLE clients to 200-730 MB in that test: a
session's own copy of the selected mailbox (about 50 bytes a message), the first logins of a
fresh process each making the dummy argon2 hash at once (64 MiB each, unbounded), and the
256 KiB read buffer asyncio gives every TLS connection.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import threading
import time
import tracemalloc
from pathlib import Path

from argon2 import PasswordHasher  # type: ignore[import-untyped]

from mailroom import accounts as accounts_module
from mailroom.accounts import Accounts
from mailroom.maildir import Maildir
from mailroom.mailstore import MailStore
from tests.conftest import MailEnv, Server
from tests.imap_transcript import Conversation, conversation, message

SESSIONS = 50
MESSAGES = 2000


def test_idle_sessions_share_the_selected_mailbox(tmp_path: Path) -> None:
    """Sessions on one store keep its snapshot, not a copy each: a session's memory does not
    grow with the mailbox, also while deliveries arrive during IDLE."""
    maildir = Maildir(tmp_path / "alice", "mail.example.test", fsync=lambda fd: None)
    store = MailStore(maildir)
    store.ensure_defaults()
    for i in range(MESSAGES):
        maildir.deliver(message(f"Message {i}"))
    store.sync("INBOX")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        sessions: list[Conversation] = []
        for _ in range(SESSIONS):
            conv = conversation(store)
            conv.send(b"a SELECT INBOX\r\nb IDLE\r\n")
            conv.pending.clear()
            conv.outputs.clear()
            sessions.append(conv)
        for i in range(10):  # a storm, each session brought up to date after each delivery
            maildir.deliver(message(f"Storm {i}"))
            for conv in sessions:
                assert conv.session.idle_poll().startswith(b"* %d EXISTS" % (MESSAGES + i + 1))
        per_session = (tracemalloc.get_traced_memory()[0] - before) / SESSIONS
    finally:
        tracemalloc.stop()
        store.close()
    # A copy of its own was 45 bytes a message (90 KB here); a session itself is about 14 KB.
    assert per_session < 20_000, f"{per_session:.0f} bytes a session"


class SlowHasher(PasswordHasher):  # type: ignore[misc]
    """Cheap argon2 that takes a while and records how many hashes ran at once."""

    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=8, parallelism=1)
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0

    def _timed(self, work: object) -> object:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(0.1)
            return work
        finally:
            with self.lock:
                self.running -= 1

    def hash(self, password: str) -> str:
        return str(self._timed(super().hash(password)))

    def verify(self, hash: str, password: str) -> bool:
        return bool(self._timed(super().verify(hash, password)))


def test_first_logins_of_a_fresh_process_hash_within_the_bound(tmp_path: Path) -> None:
    """The dummy hash (made on first use) counts against MAX_CONCURRENT_HASHES too: 40 first
    logins at once took a fresh imapd worker to 1.6 GB."""
    hasher = SlowHasher()
    with Accounts(tmp_path / "auth.sqlite3", hasher=hasher) as accounts:
        accounts.add_domain("example.test")
        accounts.add_user("alice@example.test", "correct horse")
        hasher.most = 0
        threads = [
            threading.Thread(
                target=accounts.verify_password, args=("alice@example.test", "correct horse")
            )
            for _ in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert hasher.most <= accounts_module.MAX_CONCURRENT_HASHES


def _rss_kb(pid: int) -> int:
    m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    assert m is not None
    return int(m.group(1))


async def _greeted(port: int, count: int) -> list[asyncio.StreamWriter]:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    writers = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        assert (await reader.readline()).startswith(b"* OK")
        writers.append(writer)
    return writers


def test_tls_connections_cost_little(mail_env: MailEnv) -> None:
    """100 TLS connections in one imapd worker: asyncio's 256 KiB read buffer each was 25 MB."""
    with mail_env.config.open("a") as f:
        f.write("[imap]\nworkers = 1\nmax_connections = 500\nmax_connections_per_ip = 500\n")
    server = Server(mail_env, "mailroom-imapd", ("imap", "imaps"))
    try:

        async def run() -> int:
            first = await _greeted(server.ports["imaps"], 1)
            [worker] = server.child_pids()  # one worker: the service process serves itself
            await asyncio.sleep(0.5)
            before = _rss_kb(worker)
            writers = await _greeted(server.ports["imaps"], 100)
            await asyncio.sleep(0.5)
            grown = _rss_kb(worker) - before
            for writer in first + writers:
                writer.close()
            return grown

        grown_kb = asyncio.run(run())
    finally:
        server.stop()
    assert grown_kb < 100 * 100, f"100 TLS connections took {grown_kb} kB"  # 256 KiB each before
