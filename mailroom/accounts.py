"""The accounts database: local domains, users with their password hashes, and aliases.

Owns ``{data_dir}/auth.sqlite3`` (SQLite in WAL mode, file mode 0600) and its schema, which
migrations keyed on ``PRAGMA user_version`` bring up to date on open. What it promises:

- every name stored went through ``mailroom.addresses``, so the NFC/NFD and upper/lower-case
  spellings of an address are one account, and no stored name can escape a directory;
- ``resolve`` answers "which mailboxes does this recipient deliver to" (exact user, exact alias,
  the same for the address without its ``+tag``, then the domain's catch-all ``@domain``),
  following alias chains with loop detection and a depth limit;
- ``verify_password`` costs one argon2id verification whether or not the account exists or is
  enabled, and never raises for bad input;
- nothing here touches the Maildir: deleting a user never deletes mail.

All methods may be called from several threads (e.g. ``asyncio.to_thread``); writes are
serialised by SQLite (``BEGIN IMMEDIATE``), so several processes may share the file.
"""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
import threading
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

# argon2-cffi 21.1.0 (Debian 13) ships no type information.
from argon2 import PasswordHasher  # type: ignore[import-untyped]
from argon2.exceptions import InvalidHash, VerificationError  # type: ignore[import-untyped]

from mailroom.addresses import Address, normalise_domain, parse_address
from mailroom.errors import AccountError, ExistsError, InvalidNameError, NotFoundError

log = logging.getLogger(__name__)

MIN_PASSWORD = 8
MAX_PASSWORD = 1024
MAX_ALIAS_DEPTH = 10
BUSY_TIMEOUT_MS = 5000
CATCH_ALL = "@"  # a catch-all alias source is written "@domain"

_NOW = "strftime('%Y-%m-%dT%H:%M:%SZ', 'now')"

# Each step runs in its own transaction and leaves PRAGMA user_version at its 1-based index.
# Append new steps; never edit a step that has shipped.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        f"""CREATE TABLE domains (
            name    TEXT PRIMARY KEY NOT NULL,
            created TEXT NOT NULL DEFAULT ({_NOW})
        ) STRICT""",
        f"""CREATE TABLE users (
            address       TEXT PRIMARY KEY NOT NULL,
            domain        TEXT NOT NULL REFERENCES domains (name),
            localpart     TEXT NOT NULL,
            password_hash TEXT NOT NULL,
            enabled       INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
            quota_bytes   INTEGER NOT NULL DEFAULT 0 CHECK (quota_bytes >= 0),
            created       TEXT NOT NULL DEFAULT ({_NOW}),
            CHECK (address = localpart || '@' || domain)
        ) STRICT""",
        "CREATE INDEX users_domain ON users (domain)",
        # domain: the source's domain, so a domain cannot be deleted under its aliases.
        """CREATE TABLE aliases (
            source TEXT NOT NULL,
            target TEXT NOT NULL,
            domain TEXT NOT NULL REFERENCES domains (name),
            PRIMARY KEY (source, target),
            CHECK (source = '@' || domain OR source LIKE '%_@' || domain)
        ) STRICT""",
        "CREATE INDEX aliases_domain ON aliases (domain)",
        "CREATE INDEX aliases_target ON aliases (target)",
    ),
    (
        # Failed logins per client address, shared by every protocol and process
        # (mailroom.throttle); ``last`` is a Unix time.
        """CREATE TABLE login_failures (
            peer     TEXT PRIMARY KEY NOT NULL,
            failures INTEGER NOT NULL,
            last     REAL NOT NULL
        ) STRICT""",
        "CREATE INDEX login_failures_last ON login_failures (last)",
    ),
    (
        # The hash an unknown name's password is checked against (``Accounts._dummy``): made
        # once and kept here, so that a fresh process's first login does not make it again.
        """CREATE TABLE dummy_hash (
            id   INTEGER PRIMARY KEY CHECK (id = 1),
            hash TEXT NOT NULL
        ) STRICT""",
    ),
)

RECIPIENT_CACHE = 1024  # recipient() answers kept while the database is unchanged


@dataclass(frozen=True, slots=True)
class User:
    """A mailbox account."""

    address: Address
    enabled: bool
    quota_bytes: int  # 0 = unlimited


# Each argon2id computation holds its 64 MiB while it runs: without a bound, the 32 threads of a
# server's executor logging in at once took 2 GiB (tests/security/test_load.py). Every hash a
# server makes goes under it: verifications, rehashes and the dummy hash (made by the first
# logins of a fresh process, 40 at once reached 1.6 GB while it was unbounded). Waiting here
# costs a wrong password and a right one the same, so it keeps the timing equal.
MAX_CONCURRENT_HASHES = 2
_HASHING = threading.BoundedSemaphore(MAX_CONCURRENT_HASHES)


def default_hasher() -> PasswordHasher:
    """argon2id with RFC 9106 4's second recommended option (64 MiB, t=3, p=4)."""
    return PasswordHasher(time_cost=3, memory_cost=64 * 1024, parallelism=4)


class Accounts:
    """The accounts database at ``path``, opened (created and migrated if needed)."""

    def __init__(self, path: Path, *, hasher: PasswordHasher | None = None) -> None:
        self.path = path
        self._hasher = hasher if hasher is not None else default_hasher()
        self._dummy_hash: str | None = None
        self._dummy_lock = threading.Lock()  # the dummy is made once, not by each first login
        self._lock = threading.RLock()
        # recipient()'s answers while the database is unchanged: PRAGMA data_version says when
        # another connection committed; this one's own writes clear them.
        self._recipients: dict[tuple[str, Address | None], tuple[bool, tuple[User, ...]]] = {}
        self._data_version = -1
        self._conn = _connect(path)
        try:
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Accounts:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- domains ---------------------------------------------------------------------------

    def add_domain(self, name: str) -> str:
        domain = normalise_domain(name)
        with self._write() as db:
            if _domain_exists(db, domain):
                raise ExistsError(f"domain {domain} already exists")
            db.execute("INSERT INTO domains (name) VALUES (?)", (domain,))
        log.info("added domain %s", domain)
        return domain

    def del_domain(self, name: str) -> None:
        domain = normalise_domain(name)
        with self._write() as db:
            if not _domain_exists(db, domain):
                raise NotFoundError(f"domain {domain} does not exist")
            (users,) = db.execute(
                "SELECT count(*) FROM users WHERE domain = ?", (domain,)
            ).fetchone()
            if users:
                raise AccountError(f"domain {domain} still has {users} user(s); delete them first")
            (aliases,) = db.execute(
                "SELECT count(DISTINCT source) FROM aliases WHERE domain = ?", (domain,)
            ).fetchone()
            if aliases:
                raise AccountError(
                    f"domain {domain} still has {aliases} alias(es); delete them first"
                )
            pointing = [
                f"{source} -> {target}"
                for source, target in db.execute(
                    "SELECT source, target FROM aliases WHERE target LIKE ? ORDER BY source",
                    ("%@" + domain,),
                )
            ]
            if pointing:
                raise AccountError(
                    f"aliases in other domains still point into {domain}: {', '.join(pointing)}"
                )
            db.execute("DELETE FROM domains WHERE name = ?", (domain,))
        log.info("deleted domain %s", domain)

    def list_domains(self) -> list[str]:
        with self._read() as db:
            return [name for (name,) in db.execute("SELECT name FROM domains ORDER BY name")]

    def is_local_domain(self, domain: str) -> bool:
        """Whether ``domain`` is one of ours; a malformed name never is."""
        try:
            name = normalise_domain(domain)
        except InvalidNameError:
            return False
        with self._read() as db:
            return _domain_exists(db, name)

    # -- users -----------------------------------------------------------------------------

    def add_user(self, address: str, password: str, quota_bytes: int = 0) -> User:
        # '+' separates the tag (plus-addressing), so it cannot be part of a mailbox name.
        addr = parse_address(address, allow_plus=False)
        _check_quota(quota_bytes)
        password_hash = self._hasher.hash(_checked_password(password))
        with self._write() as db:
            if not _domain_exists(db, addr.domain):
                raise NotFoundError(f"domain {addr.domain} does not exist; add it first")
            if _fetch_user(db, str(addr)) is not None:
                raise ExistsError(f"user {addr} already exists")
            if _fetch_targets(db, str(addr)):
                raise ExistsError(f"{addr} already exists as an alias; delete the alias first")
            db.execute(
                "INSERT INTO users (address, domain, localpart, password_hash, quota_bytes)"
                " VALUES (?, ?, ?, ?, ?)",
                (str(addr), addr.domain, addr.localpart, password_hash, quota_bytes),
            )
        log.info("added user %s", addr)
        self._dummy()  # made now if the database has none, not by a service's first login
        return User(addr, True, quota_bytes)

    def del_user(self, address: str) -> User:
        addr = parse_address(address)
        with self._write() as db:
            user = _fetch_user(db, str(addr))
            if user is None:
                raise NotFoundError(f"user {addr} does not exist")
            db.execute("DELETE FROM users WHERE address = ?", (str(addr),))
        log.info("deleted user %s", addr)
        return user

    def set_password(self, address: str, password: str) -> None:
        addr = parse_address(address)
        password_hash = self._hasher.hash(_checked_password(password))
        self._update_user(addr, "password_hash", password_hash)
        log.info("changed the password of %s", addr)

    def set_enabled(self, address: str, enabled: bool) -> None:
        addr = parse_address(address)
        self._update_user(addr, "enabled", int(enabled))
        log.info("%s user %s", "enabled" if enabled else "disabled", addr)

    def set_quota(self, address: str, quota_bytes: int) -> None:
        addr = parse_address(address)
        _check_quota(quota_bytes)
        self._update_user(addr, "quota_bytes", quota_bytes)
        log.info("set the quota of %s to %d bytes", addr, quota_bytes)

    def get_user(self, address: str | Address) -> User | None:
        """The user with exactly this address (no plus-addressing, no aliases), or None."""
        addr = _address(address)
        with self._read() as db:
            return _fetch_user(db, str(addr))

    def list_users(self, domain: str | None = None) -> list[User]:
        with self._read() as db:
            if domain is None:
                rows = db.execute(
                    "SELECT localpart, domain, enabled, quota_bytes FROM users"
                    " ORDER BY domain, localpart"
                )
            else:
                name = normalise_domain(domain)
                if not _domain_exists(db, name):
                    raise NotFoundError(f"domain {name} does not exist")
                rows = db.execute(
                    "SELECT localpart, domain, enabled, quota_bytes FROM users"
                    " WHERE domain = ? ORDER BY localpart",
                    (name,),
                )
            return [_user(row) for row in rows]

    # -- aliases ---------------------------------------------------------------------------

    def add_alias(self, source: str, targets: list[str]) -> None:
        """Add ``targets`` to the alias ``source`` (``x@domain``, or ``@domain`` for catch-all).

        Targets must already be users or aliases in local domains. Adding any pair that
        already exists adds nothing (ExistsError).
        """
        src, domain = _alias_source(source)
        if not targets:
            raise AccountError(f"alias {src} needs at least one target")
        wanted = list(dict.fromkeys(str(parse_address(t)) for t in targets))
        with self._write() as db:
            if not _domain_exists(db, domain):
                raise NotFoundError(f"domain {domain} does not exist; add it first")
            if _fetch_user(db, src) is not None:
                raise ExistsError(f"{src} is a user; an alias with the same address is not allowed")
            for target in wanted:
                _check_target(db, src, target)
            db.executemany(
                "INSERT INTO aliases (source, target, domain) VALUES (?, ?, ?)",
                [(src, target, domain) for target in wanted],
            )
        log.info("added alias %s -> %s", src, ", ".join(wanted))

    def del_alias(self, source: str, target: str | None = None) -> None:
        """Remove one target of ``source``, or the whole alias when ``target`` is None."""
        src, _ = _alias_source(source)
        with self._write() as db:
            if target is None:
                deleted = db.execute("DELETE FROM aliases WHERE source = ?", (src,)).rowcount
                if not deleted:
                    raise NotFoundError(f"alias {src} does not exist")
                log.info("deleted alias %s", src)
                return
            dest = str(parse_address(target))
            deleted = db.execute(
                "DELETE FROM aliases WHERE source = ? AND target = ?", (src, dest)
            ).rowcount
            if not deleted:
                raise NotFoundError(f"alias {src} -> {dest} does not exist")
        log.info("deleted alias %s -> %s", src, dest)

    def list_aliases(self) -> list[tuple[str, list[str]]]:
        result: dict[str, list[str]] = {}
        with self._read() as db:
            for source, target in db.execute(
                "SELECT source, target FROM aliases ORDER BY domain, source, rowid"
            ):
                result.setdefault(source, []).append(target)
        return list(result.items())

    # -- lookups ---------------------------------------------------------------------------

    def resolve(self, address: Address) -> list[User]:
        """The mailboxes mail to ``address`` is delivered to, deduplicated, in a stable order.

        Disabled users are included (the caller decides); [] means no such recipient.
        """
        addr = _address(address)
        found: dict[str, User] = {}
        with self._read() as db:
            self._expand(db, addr, found, set(), 0)
        return list(found.values())

    def recipient(self, domain: str, address: Address | None) -> tuple[bool, list[User]]:
        """For RCPT, in one transaction: whether ``domain`` is ours and, if it is, what
        ``resolve(address)`` gives (nothing for an address that cannot be a local user: None).
        The answer is kept while the database is unchanged: then asking costs one statement."""
        try:
            name = normalise_domain(domain)
        except InvalidNameError:
            return False, []
        with self._lock:
            known = self._recipients.get((name, address)) if self._unchanged() else None
            if known is None:
                with self._read() as db:
                    found: dict[str, User] = {}
                    local = _domain_exists(db, name)
                    if local and address is not None:
                        self._expand(db, _address(address), found, set(), 0)
                if len(self._recipients) >= RECIPIENT_CACHE:
                    self._recipients.clear()
                known = self._recipients[(name, address)] = (local, tuple(found.values()))
        return known[0], list(known[1])

    def _unchanged(self) -> bool:
        """Whether no other connection has committed since the last call (one statement)."""
        try:
            (version,) = self._conn.execute("PRAGMA data_version").fetchone()
        except sqlite3.Error as err:
            raise AccountError(f"accounts database {self.path}: {err}") from None
        if version == self._data_version:
            return True
        self._recipients.clear()
        self._data_version = version
        return False

    # Failed-login records (the storage of mailroom.throttle.AuthThrottle).

    def get_failures(self, peer: str) -> tuple[int, float] | None:
        with self._read() as db:
            row = db.execute(
                "SELECT failures, last FROM login_failures WHERE peer = ?", (peer,)
            ).fetchone()
        return (int(row[0]), float(row[1])) if row else None

    def put_failures(self, peer: str, failures: int, last: float, *, forget_before: float) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO login_failures (peer, failures, last) VALUES (?, ?, ?)"
                " ON CONFLICT (peer) DO UPDATE SET failures = excluded.failures, last = excluded.last",
                (peer, failures, last),
            )
            db.execute("DELETE FROM login_failures WHERE last < ?", (forget_before,))

    def clear_failures(self, peer: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM login_failures WHERE peer = ?", (peer,))

    def verify_password(self, address: str, password: str) -> User | None:
        """The enabled user ``address`` if ``password`` is right, else None (same time either way)."""
        dummy = self._dummy()
        candidate = _prepare_password(password)
        try:
            addr: Address | None = parse_address(address, allow_plus=False)
        except InvalidNameError:
            addr = None
        row = None
        if addr is not None:
            with self._read() as db:
                row = db.execute(
                    "SELECT localpart, domain, enabled, quota_bytes, password_hash FROM users"
                    " WHERE address = ?",
                    (str(addr),),
                ).fetchone()
        if row is None or not row[2]:
            self._verify(dummy, candidate)
            return None
        user, stored = _user(row[:4]), str(row[4])
        if not self._verify(stored, candidate):
            return None
        if self._hasher.check_needs_rehash(stored):
            self._rehash(user.address, stored, candidate)
        return user

    def _rehash(self, address: Address, stored: str, password: str) -> None:
        with _HASHING:
            fresh = self._hasher.hash(password)
        try:
            with self._write() as db:
                db.execute(
                    "UPDATE users SET password_hash = ? WHERE address = ? AND password_hash = ?",
                    (fresh, str(address), stored),
                )
        except AccountError as err:  # e.g. a read-only database: the login still succeeds
            log.warning("could not rehash the password of %s: %s", address, err)
            return
        log.info("rehashed the password of %s with the current parameters", address)

    # -- internals -------------------------------------------------------------------------

    def _expand(
        self,
        db: sqlite3.Connection,
        addr: Address,
        found: dict[str, User],
        seen: set[str],
        depth: int,
    ) -> None:
        key = str(addr)
        if key in seen:
            return  # a loop, or reached already by another path
        seen.add(key)
        if depth > MAX_ALIAS_DEPTH:
            log.warning("alias expansion stopped at %s: deeper than %d", key, MAX_ALIAS_DEPTH)
            return
        for candidate in dict.fromkeys((key, str(addr.base))):
            user = _fetch_user(db, candidate)
            if user is not None:
                found.setdefault(str(user.address), user)
                return
            targets = _fetch_targets(db, candidate)
            if targets:
                for target in targets:
                    self._expand(db, parse_address(target), found, seen, depth + 1)
                return
        for target in _fetch_targets(db, CATCH_ALL + addr.domain):
            self._expand(db, parse_address(target), found, seen, depth + 1)

    def _update_user(self, addr: Address, column: str, value: str | int) -> None:
        assert column in {"password_hash", "enabled", "quota_bytes"}
        with self._write() as db:
            updated = db.execute(
                f"UPDATE users SET {column} = ? WHERE address = ?", (value, str(addr))
            ).rowcount
            if not updated:
                raise NotFoundError(f"user {addr} does not exist")

    def _verify(self, stored: str, password: str) -> bool:
        try:
            with _HASHING:
                return bool(self._hasher.verify(stored, password))
        except (VerificationError, InvalidHash):
            return False

    def _dummy(self) -> str:
        """The hash a password for an unknown or disabled name is verified against.

        Fetched before any lookup, so that a first attempt costs the same either way. Read from
        the database; made (one argon2 run) only when it has none with the current parameters,
        and then kept there for every later process (a read-only database: for this one).
        ``add_user`` makes it, so a service's first login finds it.
        """
        with self._dummy_lock:
            if self._dummy_hash is None:
                with self._read() as db:
                    row = db.execute("SELECT hash FROM dummy_hash WHERE id = 1").fetchone()
                if row is not None and not self._hasher.check_needs_rehash(str(row[0])):
                    self._dummy_hash = str(row[0])
                else:
                    with _HASHING:
                        self._dummy_hash = str(self._hasher.hash(secrets.token_urlsafe(24)))
                    self._keep_dummy(self._dummy_hash)
            return self._dummy_hash

    def _keep_dummy(self, made: str) -> None:
        try:
            with self._write() as db:
                db.execute("INSERT OR REPLACE INTO dummy_hash (id, hash) VALUES (1, ?)", (made,))
        except AccountError as err:  # e.g. a read-only database: made again by the next process
            log.warning("could not keep the dummy password hash: %s", err)

    def _migrate(self) -> None:
        while True:
            with self._write() as db:
                (version,) = db.execute("PRAGMA user_version").fetchone()
                if version > len(MIGRATIONS):
                    raise AccountError(
                        f"{self.path}: schema version {version} is newer than this mailroom"
                        f" understands ({len(MIGRATIONS)}); upgrade mailroom"
                    )
                if version == len(MIGRATIONS):
                    return
                for statement in MIGRATIONS[version]:
                    db.execute(statement)
                # PRAGMA takes no parameters; version is an int we computed.
                db.execute(f"PRAGMA user_version = {version + 1}")
            log.info("%s: schema version %d -> %d", self.path, version, version + 1)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._recipients.clear()  # data_version does not count this connection's commits
            with self._transaction("BEGIN IMMEDIATE") as db:
                yield db

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._transaction("BEGIN") as db:
            yield db

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._conn.execute(begin)
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except sqlite3.Error as err:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise AccountError(f"accounts database {self.path}: {err}") from None


def _connect(path: Path) -> sqlite3.Connection:
    try:
        _create_private(path)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except (OSError, sqlite3.Error) as err:
        raise AccountError(f"cannot open the accounts database {path}: {err}") from None
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys = ON")
        (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode != "wal":
            raise AccountError(f"{path}: cannot switch the accounts database to WAL mode")
        conn.execute("PRAGMA synchronous = FULL")
    except sqlite3.Error as err:
        conn.close()
        raise AccountError(f"cannot open the accounts database {path}: {err}") from None
    except BaseException:
        conn.close()
        raise
    return conn


def _create_private(path: Path) -> None:
    """Create ``path`` empty with mode 0600 (its directory 0750) unless it exists.

    When root creates it, it goes to the owner of its directory, so the services running as
    that user can open it (SQLite then gives its -wal and -shm files the same owner).
    """
    try:
        path.parent.mkdir(mode=0o750, parents=True)
        os.chmod(path.parent, 0o750)  # mkdir's mode is filtered through the umask
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    try:
        if os.geteuid() == 0:
            parent = os.stat(path.parent)
            os.fchown(fd, parent.st_uid, parent.st_gid)
    finally:
        os.close(fd)


def _address(address: str | Address) -> Address:
    """Parse, or re-normalise an ``Address`` that may have been built by hand."""
    return parse_address(str(address))


def _alias_source(source: str) -> tuple[str, str]:
    """``(source, domain)`` of an alias source: ``x@domain`` or ``@domain`` (catch-all)."""
    text = source.strip()
    if text.startswith(CATCH_ALL):
        domain = normalise_domain(text[1:])
        return CATCH_ALL + domain, domain
    addr = parse_address(text)
    return str(addr), addr.domain


def _check_target(db: sqlite3.Connection, source: str, target: str) -> None:
    addr = parse_address(target)
    if not _domain_exists(db, addr.domain):
        raise AccountError(
            f"cannot forward {source} to {target}: {addr.domain} is not a local domain, and"
            " forwarding to remote addresses needs the outbound queue, which mailroom does"
            " not have yet"
        )
    if target == source:
        raise AccountError(f"alias {source} cannot point to itself")
    known = any(
        _fetch_user(db, name) is not None or _fetch_targets(db, name)
        for name in (target, str(addr.base))
    )
    if not known:
        raise NotFoundError(f"alias target {target} is neither a user nor an alias")
    if db.execute(
        "SELECT 1 FROM aliases WHERE source = ? AND target = ?", (source, target)
    ).fetchone():
        raise ExistsError(f"alias {source} -> {target} already exists")


def _domain_exists(db: sqlite3.Connection, domain: str) -> bool:
    return db.execute("SELECT 1 FROM domains WHERE name = ?", (domain,)).fetchone() is not None


def _fetch_user(db: sqlite3.Connection, address: str) -> User | None:
    row = db.execute(
        "SELECT localpart, domain, enabled, quota_bytes FROM users WHERE address = ?", (address,)
    ).fetchone()
    return None if row is None else _user(row)


def _fetch_targets(db: sqlite3.Connection, source: str) -> list[str]:
    rows = db.execute("SELECT target FROM aliases WHERE source = ? ORDER BY rowid", (source,))
    return [target for (target,) in rows]


def _user(row: tuple[str, str, int, int]) -> User:
    localpart, domain, enabled, quota_bytes = row
    return User(Address(localpart, domain), bool(enabled), quota_bytes)


def _prepare_password(password: str) -> str:
    # RFC 8265 4.2: OpaqueString passwords are compared in NFC.
    return unicodedata.normalize("NFC", password)


def _checked_password(password: str) -> str:
    prepared = _prepare_password(password)
    if len(prepared) < MIN_PASSWORD:
        raise AccountError(f"the password must be at least {MIN_PASSWORD} characters long")
    if len(prepared) > MAX_PASSWORD:
        raise AccountError(f"the password must be at most {MAX_PASSWORD} characters long")
    # RFC 8265 4.2.1: control characters are not allowed in an OpaqueString.
    if any(unicodedata.category(c) == "Cc" for c in prepared):
        raise AccountError("the password may not contain control characters")
    return prepared


def _check_quota(quota_bytes: int) -> None:
    if isinstance(quota_bytes, bool) or not isinstance(quota_bytes, int) or quota_bytes < 0:
        raise AccountError(f"quota must be a whole number of bytes >= 0, not {quota_bytes!r}")
