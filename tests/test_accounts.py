"""The accounts database: schema, domains, users, aliases, resolve and password checks."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher  # type: ignore[import-untyped]

from mailroom import accounts as accounts_module
from mailroom.accounts import (
    MAX_ALIAS_DEPTH,
    MIGRATIONS,
    RECIPIENT_CACHE,
    Accounts,
    User,
    default_hasher,
)
from mailroom.addresses import Address, parse_address
from mailroom.errors import AccountError, ExistsError, InvalidNameError, NotFoundError

PASSWORD = "correct horse"


def cheap_hasher(time_cost: int = 1) -> PasswordHasher:
    """argon2id with tiny parameters, so the tests run fast."""
    return PasswordHasher(time_cost=time_cost, memory_cost=8, parallelism=1)


class CountingHasher(PasswordHasher):  # type: ignore[misc]
    """Counts argon2 verifications: one per attempt means the same cost for every outcome."""

    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=8, parallelism=1)
        self.verifications = 0

    def verify(self, hash: str, password: str) -> bool:
        self.verifications += 1
        return bool(super().verify(hash, password))


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "auth.sqlite3"


@pytest.fixture
def accounts(db_path: Path) -> Iterator[Accounts]:
    with Accounts(db_path, hasher=cheap_hasher()) as db:
        db.add_domain("example.org")
        yield db


def user(address: str, *, enabled: bool = True, quota_bytes: int = 0) -> User:
    return User(parse_address(address), enabled, quota_bytes)


def addresses(users: list[User]) -> list[str]:
    return [str(u.address) for u in users]


def resolve(accounts: Accounts, address: str) -> list[str]:
    return addresses(accounts.resolve(parse_address(address)))


# -- the file and its schema -------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_file_is_0600_in_a_new_0750_directory(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "new" / "auth.sqlite3"
    old = os.umask(umask)  # the modes must come from the code, not from the umask
    try:
        Accounts(path, hasher=cheap_hasher()).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750


def test_existing_directory_mode_is_left_alone(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    Accounts(tmp_path / "auth.sqlite3", hasher=cheap_hasher()).close()
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create files for another owner")
def test_root_creates_the_file_for_the_owner_of_its_directory(tmp_path: Path) -> None:
    directory = tmp_path / "data"
    directory.mkdir()
    os.chown(directory, 65534, 65534)
    Accounts(directory / "auth.sqlite3", hasher=cheap_hasher()).close()
    st = (directory / "auth.sqlite3").stat()
    assert (st.st_uid, st.st_gid) == (65534, 65534)


def test_wal_mode_and_schema_version(accounts: Accounts, db_path: Path) -> None:
    with sqlite3.connect(db_path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert other.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


def test_reopening_keeps_data_and_migrates_nothing(db_path: Path) -> None:
    with Accounts(db_path, hasher=cheap_hasher()) as db:
        db.add_domain("example.org")
        db.add_user("alice@example.org", PASSWORD)
    for _ in range(2):
        with Accounts(db_path, hasher=cheap_hasher()) as db:
            assert db.list_domains() == ["example.org"]
            assert db.get_user("alice@example.org") == user("alice@example.org")
    with sqlite3.connect(db_path) as other:
        assert other.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


def test_a_failing_migration_step_is_rolled_back(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Accounts(db_path, hasher=cheap_hasher()).close()
    broken = (*MIGRATIONS, ("CREATE TABLE half_done (x TEXT)", "THIS IS NOT SQL"))
    monkeypatch.setattr(accounts_module, "MIGRATIONS", broken)
    with pytest.raises(AccountError, match="syntax error"):
        Accounts(db_path, hasher=cheap_hasher())
    with sqlite3.connect(db_path) as other:
        assert other.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        tables = {name for (name,) in other.execute("SELECT name FROM sqlite_master")}
    assert "half_done" not in tables


def test_a_newer_schema_is_refused(db_path: Path) -> None:
    Accounts(db_path, hasher=cheap_hasher()).close()
    with sqlite3.connect(db_path) as other:
        other.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(AccountError, match="newer than this mailroom"):
        Accounts(db_path, hasher=cheap_hasher())


def test_a_file_that_is_not_a_database_is_an_account_error(db_path: Path) -> None:
    db_path.parent.mkdir()
    db_path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(AccountError, match="cannot open the accounts database"):
        Accounts(db_path, hasher=cheap_hasher())


def test_two_connections_see_each_others_changes(accounts: Accounts, db_path: Path) -> None:
    with Accounts(db_path, hasher=cheap_hasher()) as other:
        other.add_domain("example.net")
        assert accounts.is_local_domain("example.net")
        accounts.add_user("alice@example.org", PASSWORD)
        assert other.get_user("alice@example.org") is not None


# -- domains -----------------------------------------------------------------------------------


def test_domains_add_list_del(accounts: Accounts) -> None:
    assert accounts.add_domain("Example.NET.") == "example.net"
    assert accounts.add_domain("bücher.de") == "xn--bcher-kva.de"
    assert accounts.list_domains() == ["example.net", "example.org", "xn--bcher-kva.de"]
    accounts.del_domain("EXAMPLE.net")
    accounts.del_domain("BÜCHER.de")
    assert accounts.list_domains() == ["example.org"]


@pytest.mark.parametrize("spelling", ["example.org", "EXAMPLE.ORG", "example.org."])
def test_adding_a_domain_twice_is_exists_error(accounts: Accounts, spelling: str) -> None:
    with pytest.raises(ExistsError):
        accounts.add_domain(spelling)


def test_deleting_an_unknown_domain_is_not_found(accounts: Accounts) -> None:
    with pytest.raises(NotFoundError):
        accounts.del_domain("example.net")


def test_a_domain_with_users_or_aliases_cannot_be_deleted(accounts: Accounts) -> None:
    accounts.add_user("alice@example.org", PASSWORD)
    with pytest.raises(AccountError, match="1 user"):
        accounts.del_domain("example.org")
    accounts.add_domain("example.net")
    accounts.add_alias("@example.net", ["alice@example.org"])
    with pytest.raises(AccountError, match="1 alias"):
        accounts.del_domain("example.net")
    accounts.del_alias("@example.net")
    accounts.add_user("bob@example.net", PASSWORD)
    accounts.add_alias("team@example.org", ["bob@example.net"])
    accounts.del_user("bob@example.net")
    with pytest.raises(AccountError, match="team@example.org -> bob@example.net"):
        accounts.del_domain("example.net")
    accounts.del_alias("team@example.org")
    accounts.del_domain("example.net")
    assert accounts.list_domains() == ["example.org"]


@pytest.mark.parametrize(
    ("name", "local"),
    [
        ("example.org", True),
        ("EXAMPLE.org", True),
        ("example.org.", True),
        ("example.net", False),
        ("../example.org", False),
        ("example.org/..", False),
        ("exa\x00mple.org", False),
        ("", False),
    ],
)
def test_is_local_domain(accounts: Accounts, name: str, local: bool) -> None:
    assert accounts.is_local_domain(name) is local


# -- users -------------------------------------------------------------------------------------


def test_users_add_get_list_del(accounts: Accounts) -> None:
    accounts.add_domain("example.net")
    assert accounts.add_user("Alice@Example.org", PASSWORD, 1000) == user(
        "alice@example.org", quota_bytes=1000
    )
    accounts.add_user("bob@example.net", PASSWORD)
    accounts.add_user("carol@example.org", PASSWORD)
    assert addresses(accounts.list_users()) == [
        "bob@example.net",
        "alice@example.org",
        "carol@example.org",
    ]
    assert addresses(accounts.list_users("EXAMPLE.org")) == [
        "alice@example.org",
        "carol@example.org",
    ]
    assert accounts.get_user(Address("alice", "example.org")) == user(
        "alice@example.org", quota_bytes=1000
    )
    assert accounts.del_user("ALICE@example.org") == user("alice@example.org", quota_bytes=1000)
    assert accounts.get_user("alice@example.org") is None
    with pytest.raises(NotFoundError):
        accounts.del_user("alice@example.org")


def test_list_users_of_an_unknown_domain_is_not_found(accounts: Accounts) -> None:
    with pytest.raises(NotFoundError):
        accounts.list_users("example.net")


def test_a_user_needs_a_local_domain(accounts: Accounts) -> None:
    with pytest.raises(NotFoundError, match="example.net"):
        accounts.add_user("alice@example.net", PASSWORD)


def test_get_user_is_exact(accounts: Accounts) -> None:
    accounts.add_user("alice@example.org", PASSWORD)
    assert accounts.get_user("alice+tag@example.org") is None


@pytest.mark.parametrize("password", ["", "short", "1234567", "tab\there1", "nul\x00here1"])
def test_bad_passwords_are_refused(accounts: Accounts, password: str) -> None:
    with pytest.raises(AccountError, match="password"):
        accounts.add_user("alice@example.org", password)
    assert accounts.get_user("alice@example.org") is None


def test_a_user_cannot_shadow_an_alias(accounts: Accounts) -> None:
    accounts.add_user("alice@example.org", PASSWORD)
    accounts.add_alias("postmaster@example.org", ["alice@example.org"])
    with pytest.raises(ExistsError, match="alias"):
        accounts.add_user("postmaster@example.org", PASSWORD)


def test_set_enabled_quota_and_password(accounts: Accounts) -> None:
    accounts.add_user("alice@example.org", PASSWORD)
    accounts.set_enabled("alice@example.org", False)
    accounts.set_quota("alice@example.org", 5 * 1024**3)
    assert accounts.get_user("alice@example.org") == user(
        "alice@example.org", enabled=False, quota_bytes=5 * 1024**3
    )
    accounts.set_enabled("alice@example.org", True)
    accounts.set_password("alice@example.org", "another password")
    assert accounts.verify_password("alice@example.org", PASSWORD) is None
    assert accounts.verify_password("alice@example.org", "another password") is not None


@pytest.mark.parametrize("quota", [-1, True])
def test_bad_quotas_are_refused(accounts: Accounts, quota: int) -> None:
    with pytest.raises(AccountError, match="quota"):
        accounts.add_user("alice@example.org", PASSWORD, quota)


@pytest.mark.parametrize(
    "change",
    [
        lambda db: db.set_password("nobody@example.org", PASSWORD),
        lambda db: db.set_enabled("nobody@example.org", False),
        lambda db: db.set_quota("nobody@example.org", 1),
    ],
)
def test_changing_an_unknown_user_is_not_found(
    accounts: Accounts, change: Callable[[Accounts], None]
) -> None:
    with pytest.raises(NotFoundError, match="nobody@example.org"):
        change(accounts)


# -- names: one account per spelling, nothing that escapes a directory --------------------------

NFC_E = "\u00e9"  # é, one code point
NFD_E = "e\u0301"  # e + combining acute accent


@pytest.mark.parametrize(
    "spelling",
    [
        f"{NFC_E}lodie@example.org",
        f"{NFD_E}lodie@example.org",
        f"{NFC_E.upper()}LODIE@example.org",
        "E\u0301LODIE@EXAMPLE.ORG",
        f"{NFD_E}lodie@example.org.",
    ],
)
def test_nfc_nfd_and_case_spellings_are_one_account(accounts: Accounts, spelling: str) -> None:
    accounts.add_user(f"{NFC_E}lodie@example.org", PASSWORD)
    with pytest.raises(ExistsError):
        accounts.add_user(spelling, PASSWORD)
    expected = user(f"{NFC_E}lodie@example.org")
    assert accounts.get_user(spelling) == expected
    assert accounts.verify_password(spelling, PASSWORD) == expected
    assert addresses(accounts.resolve(parse_address(spelling))) == [str(expected.address)]
    assert len(accounts.list_users()) == 1


@pytest.mark.parametrize("spelling", ["anna@bücher.de", "anna@BÜCHER.DE", "anna@xn--bcher-kva.de"])
def test_idna_domain_spellings_are_one_account(accounts: Accounts, spelling: str) -> None:
    accounts.add_domain("bücher.de")
    accounts.add_user("anna@xn--bcher-kva.de", PASSWORD)
    assert accounts.get_user(spelling) == user("anna@xn--bcher-kva.de")
    assert accounts.is_local_domain(spelling.partition("@")[2])


@pytest.mark.parametrize(
    "address",
    [
        "../etc@example.org",
        "..@example.org",
        ".hidden@example.org",
        "a/b@example.org",
        "a\\b@example.org",
        "a\x00b@example.org",
        "a\x07b@example.org",
        "a\nb@example.org",
        "a\u200bb@example.org",
        "alice@../example.org",
        "alice@example.org/..",
        "alice@exa\\mple.org",
        "alice@exa\x00mple.org",
        "alice@",
        "@example.org",
        "alice",
        "",
    ],
)
def test_unsafe_names_are_invalid(accounts: Accounts, address: str) -> None:
    with pytest.raises(InvalidNameError):
        accounts.add_user(address, PASSWORD)
    with pytest.raises(InvalidNameError):
        accounts.get_user(address)
    with pytest.raises(InvalidNameError):
        accounts.add_alias("team@example.org", [address])
    assert accounts.verify_password(address, PASSWORD) is None
    assert accounts.list_users() == []


@pytest.mark.parametrize("name", ["../etc", "a/b.org", "a\\b.org", "exa\x00mple.org", "local", ""])
def test_unsafe_domains_are_invalid(accounts: Accounts, name: str) -> None:
    with pytest.raises(InvalidNameError):
        accounts.add_domain(name)
    assert accounts.list_domains() == ["example.org"]


def test_a_localpart_may_not_contain_plus(accounts: Accounts) -> None:
    with pytest.raises(InvalidNameError, match=r"\+"):
        accounts.add_user("alice+tag@example.org", PASSWORD)


def test_resolve_renormalises_a_hand_built_address(accounts: Accounts) -> None:
    accounts.add_user("alice@example.org", PASSWORD)
    assert addresses(accounts.resolve(Address("ALICE", "Example.ORG"))) == ["alice@example.org"]
    with pytest.raises(InvalidNameError):
        accounts.resolve(Address("../alice", "example.org"))


# -- aliases -----------------------------------------------------------------------------------


@pytest.fixture
def team(accounts: Accounts) -> Accounts:
    """alice, bob and a disabled carol in example.org."""
    accounts.add_user("alice@example.org", PASSWORD)
    accounts.add_user("bob@example.org", PASSWORD)
    accounts.add_user("carol@example.org", PASSWORD)
    accounts.set_enabled("carol@example.org", False)
    return accounts


def test_aliases_add_list_del(team: Accounts) -> None:
    team.add_alias("Team@Example.org", ["bob@example.org", "ALICE@example.org"])
    team.add_alias("@example.org", ["alice@example.org"])
    team.add_alias("team@example.org", ["carol@example.org"])
    assert team.list_aliases() == [
        ("@example.org", ["alice@example.org"]),
        ("team@example.org", ["bob@example.org", "alice@example.org", "carol@example.org"]),
    ]
    team.del_alias("team@example.org", "Bob@example.org")
    assert team.list_aliases()[1] == (
        "team@example.org",
        ["alice@example.org", "carol@example.org"],
    )
    team.del_alias("TEAM@example.org")
    team.del_alias("@EXAMPLE.org")
    assert team.list_aliases() == []


def test_deleting_an_unknown_alias_is_not_found(team: Accounts) -> None:
    with pytest.raises(NotFoundError):
        team.del_alias("team@example.org")
    team.add_alias("team@example.org", ["alice@example.org"])
    with pytest.raises(NotFoundError):
        team.del_alias("team@example.org", "bob@example.org")


def test_adding_an_existing_pair_adds_nothing(team: Accounts) -> None:
    team.add_alias("team@example.org", ["alice@example.org"])
    with pytest.raises(ExistsError):
        team.add_alias("team@example.org", ["bob@example.org", "alice@example.org"])
    assert team.list_aliases() == [("team@example.org", ["alice@example.org"])]


def test_remote_targets_are_refused_until_there_is_an_outbound_queue(team: Accounts) -> None:
    with pytest.raises(AccountError, match="outbound queue"):
        team.add_alias("team@example.org", ["alice@example.org", "someone@elsewhere.net"])
    assert team.list_aliases() == []


@pytest.mark.parametrize(
    ("source", "targets", "error"),
    [
        ("team@example.net", ["alice@example.org"], NotFoundError),
        ("@example.net", ["alice@example.org"], NotFoundError),
        ("team@example.org", ["nobody@example.org"], NotFoundError),
        ("team@example.org", [], AccountError),
        ("team@example.org", ["team@example.org"], AccountError),
        ("alice@example.org", ["bob@example.org"], ExistsError),
        ("team@example.org", ["@example.org"], InvalidNameError),
        ("@../example.org", ["alice@example.org"], InvalidNameError),
        ("../team@example.org", ["alice@example.org"], InvalidNameError),
    ],
)
def test_bad_aliases_are_refused(
    team: Accounts, source: str, targets: list[str], error: type[Exception]
) -> None:
    with pytest.raises(error):
        team.add_alias(source, targets)
    assert team.list_aliases() == []


# -- resolve -----------------------------------------------------------------------------------


def test_resolve_users_and_unknowns(team: Accounts) -> None:
    assert resolve(team, "alice@example.org") == ["alice@example.org"]
    assert resolve(team, "nobody@example.org") == []
    assert resolve(team, "alice@example.net") == []


def test_resolve_includes_disabled_users(team: Accounts) -> None:
    assert team.resolve(parse_address("carol@example.org")) == [
        user("carol@example.org", enabled=False)
    ]


def test_recipient_is_the_domain_check_and_resolve_in_one(team: Accounts) -> None:
    team.add_alias("team@example.org", ["alice@example.org", "carol@example.org"])
    for address in ("alice@example.org", "team@example.org", "nobody@example.org"):
        addr = parse_address(address)
        assert team.recipient("EXAMPLE.org", addr) == (True, team.resolve(addr))
    assert team.recipient("example.org", None) == (True, [])  # ours, but no such local part
    assert team.recipient("example.net", parse_address("alice@example.net")) == (False, [])
    assert team.recipient("bad..name", None) == (False, [])


def test_recipient_answers_are_kept_until_the_database_changes(team: Accounts) -> None:
    """RCPT's answer is remembered while the accounts are unchanged (one PRAGMA, no
    transaction); a change by another process or by this connection is seen at once."""
    statements: list[str] = []
    team._conn.set_trace_callback(statements.append)
    alice, dave = parse_address("alice@example.org"), parse_address("dave@example.org")

    def recipient(address: Address) -> tuple[bool, list[str]]:
        local, users = team.recipient("example.org", address)
        return local, [str(u.address) for u in users if u.enabled]

    assert recipient(alice) == (True, ["alice@example.org"])
    statements.clear()
    for _ in range(3):
        assert recipient(alice) == (True, ["alice@example.org"])
    assert statements == ["PRAGMA data_version"] * 3  # nothing else asked

    with Accounts(team.path) as other:  # mailroom-ctl, say
        other.set_enabled("alice@example.org", False)
        assert recipient(alice) == (True, [])
        other.add_user("dave@example.org", PASSWORD)
        assert recipient(dave) == (True, ["dave@example.org"])
        team_ = parse_address("team@example.org")
        assert recipient(team_) == (True, [])
        other.add_alias("team@example.org", ["dave@example.org"])
        assert recipient(team_) == (True, ["dave@example.org"])
        assert team.recipient("example.net", None) == (False, [])
        other.add_domain("example.net")
        assert team.recipient("example.net", None) == (True, [])
    assert recipient(alice) == (True, [])  # kept again
    team.set_enabled("alice@example.org", True)  # this connection's own write
    assert recipient(alice) == (True, ["alice@example.org"])


def test_recipient_answers_kept_are_bounded(team: Accounts) -> None:
    for i in range(RECIPIENT_CACHE + 10):
        assert team.recipient("example.org", parse_address(f"x{i}@example.org")) == (True, [])
        assert len(team._recipients) <= RECIPIENT_CACHE


def test_plus_addressing(team: Accounts) -> None:
    team.add_alias("team@example.org", ["alice@example.org", "bob@example.org"])
    assert resolve(team, "alice+lists@example.org") == ["alice@example.org"]
    assert resolve(team, "team+x@example.org") == ["alice@example.org", "bob@example.org"]
    assert resolve(team, "nobody+x@example.org") == []


def test_an_exact_plus_alias_wins_over_the_base(team: Accounts) -> None:
    team.add_alias("alice+spam@example.org", ["bob@example.org"])
    assert resolve(team, "alice+spam@example.org") == ["bob@example.org"]
    assert resolve(team, "alice+other@example.org") == ["alice@example.org"]


def test_catch_all_only_when_nothing_else_matches(team: Accounts) -> None:
    team.add_alias("team@example.org", ["bob@example.org"])
    team.add_alias("@example.org", ["alice@example.org"])
    assert resolve(team, "anything@example.org") == ["alice@example.org"]
    assert resolve(team, "anything+tag@example.org") == ["alice@example.org"]
    assert resolve(team, "bob@example.org") == ["bob@example.org"]
    assert resolve(team, "team@example.org") == ["bob@example.org"]
    assert resolve(team, "bob+tag@example.org") == ["bob@example.org"]


def test_alias_chains_and_tagged_targets(team: Accounts) -> None:
    team.add_alias("admins@example.org", ["alice+admin@example.org"])
    team.add_alias("root@example.org", ["admins@example.org"])
    team.add_alias("postmaster@example.org", ["root@example.org", "bob@example.org"])
    assert resolve(team, "postmaster@example.org") == ["alice@example.org", "bob@example.org"]


def test_resolve_deduplicates_in_a_stable_order(team: Accounts) -> None:
    team.add_alias("devs@example.org", ["bob@example.org", "alice@example.org"])
    team.add_alias(
        "all@example.org",
        ["alice@example.org", "devs@example.org", "alice+x@example.org", "carol@example.org"],
    )
    assert resolve(team, "all@example.org") == [
        "alice@example.org",
        "bob@example.org",
        "carol@example.org",
    ]


def test_alias_loops_terminate(team: Accounts, caplog: pytest.LogCaptureFixture) -> None:
    team.add_alias("a@example.org", ["alice@example.org"])
    team.add_alias("b@example.org", ["a@example.org", "bob@example.org"])
    team.add_alias("a@example.org", ["b@example.org"])  # a -> b -> a
    team.add_alias("@example.org", ["a@example.org"])
    assert resolve(team, "a@example.org") == ["alice@example.org", "bob@example.org"]
    assert resolve(team, "b@example.org") == ["alice@example.org", "bob@example.org"]
    assert resolve(team, "zzz@example.org") == ["alice@example.org", "bob@example.org"]
    assert "deeper than" not in caplog.text  # stopped by loop detection, not the depth limit


def test_a_dangling_catch_all_target_terminates(team: Accounts) -> None:
    team.add_alias("@example.org", ["bob@example.org"])
    team.del_user("bob@example.org")  # now the catch-all points to a name it catches itself
    assert resolve(team, "nobody@example.org") == []


@pytest.mark.parametrize(
    ("hops", "delivered"), [(MAX_ALIAS_DEPTH, True), (MAX_ALIAS_DEPTH + 1, False)]
)
def test_alias_depth_limit(
    team: Accounts, hops: int, delivered: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # a0 -> a1 -> ... -> a{hops-1} -> alice: `hops` alias hops to reach alice.
    previous = "alice@example.org"
    for n in reversed(range(hops)):
        team.add_alias(f"a{n}@example.org", [previous])
        previous = f"a{n}@example.org"
    assert resolve(team, "a0@example.org") == (["alice@example.org"] if delivered else [])
    assert ("deeper than" in caplog.text) is not delivered


# -- passwords ---------------------------------------------------------------------------------


def test_verify_password(team: Accounts) -> None:
    assert team.verify_password("alice@example.org", PASSWORD) == user("alice@example.org")
    assert team.verify_password("alice@example.org", PASSWORD + "x") is None
    assert team.verify_password("alice@example.org", "") is None
    assert team.verify_password("nobody@example.org", PASSWORD) is None
    assert team.verify_password("carol@example.org", PASSWORD) is None  # disabled
    assert team.verify_password("alice+tag@example.org", PASSWORD) is None


def test_passwords_compare_in_nfc(accounts: Accounts) -> None:
    accounts.add_user("alice@example.org", f"caf{NFC_E} au lait")
    assert accounts.verify_password("alice@example.org", f"caf{NFD_E} au lait") is not None


@pytest.mark.parametrize(
    "address",
    ["alice@example.org", "nobody@example.org", "carol@example.org", "../x@example.org", "x"],
)
def test_every_attempt_costs_one_verification(db_path: Path, address: str) -> None:
    hasher = CountingHasher()
    with Accounts(db_path, hasher=hasher) as db:
        db.add_domain("example.org")
        db.add_user("alice@example.org", PASSWORD)
        db.add_user("carol@example.org", PASSWORD)
        db.set_enabled("carol@example.org", False)
        db.verify_password(address, "wrong password")
        assert hasher.verifications == 1


def test_a_hash_with_old_parameters_is_upgraded_on_login(db_path: Path) -> None:
    with Accounts(db_path, hasher=cheap_hasher(time_cost=1)) as db:
        db.add_domain("example.org")
        db.add_user("alice@example.org", PASSWORD)

    def stored() -> str:
        with sqlite3.connect(db_path) as other:
            return str(
                other.execute(
                    "SELECT password_hash FROM users WHERE address = 'alice@example.org'"
                ).fetchone()[0]
            )

    assert ",t=1," in stored()
    with Accounts(db_path, hasher=cheap_hasher(time_cost=2)) as db:
        assert db.verify_password("alice@example.org", "wrong password") is None
        assert ",t=1," in stored()
        assert db.verify_password("alice@example.org", PASSWORD) is not None
        assert ",t=2," in stored()
        assert db.verify_password("alice@example.org", PASSWORD) is not None


def test_default_hasher_is_argon2id_rfc9106_low_memory() -> None:
    assert default_hasher().hash(PASSWORD).startswith("$argon2id$v=19$m=65536,t=3,p=4$")


def test_password_hash_is_not_the_password(accounts: Accounts, db_path: Path) -> None:
    accounts.add_user("alice@example.org", PASSWORD)
    assert PASSWORD.encode() not in db_path.read_bytes() + Path(f"{db_path}-wal").read_bytes()


class HashCounter(PasswordHasher):  # type: ignore[misc]
    """Counts the hashes made (not verified)."""

    def __init__(self, time_cost: int = 1) -> None:
        super().__init__(time_cost=time_cost, memory_cost=8, parallelism=1)
        self.made = 0

    def hash(self, password: str | bytes) -> str:
        self.made += 1
        return str(super().hash(password))


def test_the_dummy_hash_is_made_once_for_every_later_process(db_path: Path) -> None:
    first = HashCounter()
    with Accounts(db_path, hasher=first) as db:  # mailroomctl adding the first user
        db.add_domain("example.test")
        db.add_user("alice@example.test", PASSWORD)
        db.add_user("bob@example.test", PASSWORD)
    assert first.made == 3  # two passwords, one dummy
    later = HashCounter()
    with Accounts(db_path, hasher=later) as db:  # a service: known and unknown names alike
        assert db.verify_password("alice@example.test", PASSWORD) is not None
        assert db.verify_password("nobody@example.test", PASSWORD) is None
    assert later.made == 0
    stronger = HashCounter(time_cost=2)  # new parameters: a new dummy, kept again
    with Accounts(db_path, hasher=stronger) as db:
        assert db.verify_password("nobody@example.test", PASSWORD) is None
    assert stronger.made == 1
    again = HashCounter(time_cost=2)
    with Accounts(db_path, hasher=again) as db:
        assert db.verify_password("nobody@example.test", PASSWORD) is None
    assert again.made == 0
