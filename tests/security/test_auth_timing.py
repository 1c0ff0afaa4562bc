"""Equal-time failures: a wrong password costs the same whether the account exists, is disabled or not.

Measured through the whole POP3 login path (the session, the throttle, the accounts
database, argon2id), in process: the accounts take an injected hasher with cheaper argon2id
parameters than the servers' (so 200 attempts of each kind take seconds, not a minute),
still costly enough that skipping the hash for an unknown name would show (the test checks
that). The limits are set out of the way; delays are 0. Over 200 attempts of each kind,
interleaved, the medians differ by less than 5 ms.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from argon2 import PasswordHasher  # type: ignore[import-untyped]

from mailroom.accounts import Accounts, User
from mailroom.config import Settings
from mailroom.pop3.server import session_factory
from mailroom.throttle import AuthThrottle
from tests.pop3_fake_store import FakeMaildrop, FakeStore

ATTEMPTS = 200
MAX_DIFFERENCE = 0.005  # seconds, between medians
CHEAP = {"time_cost": 2, "memory_cost": 16 * 1024, "parallelism": 1}  # ~13 ms here


def test_failed_logins_take_the_same_time_whether_the_user_exists(tmp_path: Path) -> None:
    settings = Settings(
        hostname="mail.example.test",
        data_dir=tmp_path,
        login_failures_per_ip=10**9,
        login_failures_per_account=10**9,
        login_failure_delay_seconds=0,
    )
    hasher = PasswordHasher(**CHEAP)
    with Accounts(tmp_path / "auth.sqlite3", hasher=hasher) as accounts:
        accounts.add_domain("example.test")
        accounts.add_user("alice@example.test", "correct horse battery")
        accounts.add_user("dan@example.test", "correct horse battery")
        accounts.set_enabled("dan@example.test", False)
        throttle = AuthThrottle.from_settings(settings, accounts)

        def open_maildrop(user: User) -> FakeMaildrop:
            return FakeMaildrop(FakeStore())

        make = session_factory(
            settings, accounts, throttle, open_maildrop, implicit_tls=True, starttls=False
        )

        def attempt(name: str) -> float:
            session = make("192.0.2.1")
            session.feed(f"USER {name}\r\n".encode())
            start = time.perf_counter()
            reply = session.feed(b"PASS wrong password\r\n").data
            elapsed = time.perf_counter() - start
            assert reply.startswith(b"-ERR [AUTH]"), reply
            return elapsed

        names = {
            "exists": "alice@example.test",
            "unknown": "nobody@example.test",
            "disabled": "dan@example.test",
            "malformed": "not-an-address",
        }
        for name in names.values():  # warm-up: the dummy hash, caches
            attempt(name)
        times: dict[str, list[float]] = {kind: [] for kind in names}
        for _ in range(ATTEMPTS):
            for kind, name in names.items():
                times[kind].append(attempt(name))
    medians = {kind: statistics.median(t) for kind, t in times.items()}
    # the measurement can see a skipped hash: one verification costs more than the margin
    assert medians["exists"] > 2 * MAX_DIFFERENCE, medians
    for kind, median in medians.items():
        assert abs(median - medians["exists"]) < MAX_DIFFERENCE, (kind, medians)
