"""An in-memory mail store with the interface of ``mailroom.mailstore.MailStore``, for IMAP tests.

It keeps what the real store promises (ascending UIDs never reused, a mod-sequence per change,
\\Recent claimed by one session, expunge only of \\Deleted messages) and nothing on disk.
Several sessions may share one ``FakeStore`` to see each other's changes.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from mailroom.errors import (
    MailboxExistsError,
    MailboxNotFoundError,
    QuotaExceededError,
)
from mailroom.mailstore import MailboxEntry, MailboxStatus, MessageInfo, Snapshot

DEFAULTS = {
    "Sent": "\\Sent",
    "Drafts": "\\Drafts",
    "Trash": "\\Trash",
    "Junk": "\\Junk",
    "Archive": "\\Archive",
}


@dataclass
class Folder:
    uidvalidity: int
    special_use: str | None = None
    subscribed: bool = False
    uidnext: int = 1
    highestmodseq: int = 1
    messages: dict[int, MessageInfo] = field(default_factory=dict)
    bodies: dict[int, bytes] = field(default_factory=dict)
    vanished: dict[int, int] = field(default_factory=dict)  # uid -> modseq of its expunge
    unclaimed: set[int] = field(default_factory=set)  # \Recent not yet given to a session


class FakeStore:
    """One user's folders in memory."""

    def __init__(self, quota_bytes: int = 0) -> None:
        self.quota_bytes = quota_bytes
        self.folders: dict[str, Folder] = {"INBOX": Folder(uidvalidity=1000, subscribed=True)}
        self.closed = False
        self.reads = 0  # how many times read() was called (tests check caching)
        self.derived: dict[str, dict[tuple[int, str], bytes]] = {}  # save_items, by mailbox
        self.next_validity = 1001

    # -- management ---------------------------------------------------------------------------

    def usage_bytes(self) -> int:
        return sum(m.size for f in self.folders.values() for m in f.messages.values())

    def ensure_defaults(self) -> None:
        for name, use in DEFAULTS.items():
            if name not in self.folders:
                self.create_mailbox(name, use)
                self.subscribe(name)

    def close(self) -> None:
        self.closed = True

    def _folder(self, name: str) -> Folder:
        try:
            return self.folders[name]
        except KeyError:
            raise MailboxNotFoundError(f"no mailbox {name}") from None

    def list_mailboxes(self) -> list[MailboxEntry]:
        names = sorted(self.folders)
        return [
            MailboxEntry(
                name=n,
                special_use=f.special_use,
                has_children=any(o.startswith(n + "/") for o in names),
                subscribed=f.subscribed,
                selectable=True,
            )
            for n, f in sorted(self.folders.items())
        ]

    def create_mailbox(self, name: str, special_use: str | None = None) -> None:
        # Deliberately no name checks here: the tests check that the session refuses bad names.
        if name in self.folders:
            raise MailboxExistsError(f"{name} exists")
        self.folders[name] = Folder(uidvalidity=self.next_validity, special_use=special_use)
        self.next_validity += 1

    def delete_mailbox(self, name: str) -> None:
        self._folder(name)
        del self.folders[name]

    def rename_mailbox(self, old: str, new: str) -> None:
        folder = self._folder(old)
        if new in self.folders:
            raise MailboxExistsError(f"{new} exists")
        self.folders[new] = folder
        del self.folders[old]

    def subscribe(self, name: str) -> None:
        self._folder(name).subscribed = True

    def unsubscribe(self, name: str) -> None:
        if name in self.folders:
            self.folders[name].subscribed = False

    # -- messages -----------------------------------------------------------------------------

    def sync(self, name: str) -> Snapshot:
        f = self._folder(name)
        return Snapshot(
            name,
            f.uidvalidity,
            f.uidnext,
            f.highestmodseq,
            tuple(f.messages[u] for u in sorted(f.messages)),
        )

    def select(self, name: str) -> tuple[Snapshot, frozenset[int]]:
        return self.sync(name), self.claim_recent(name)

    def status(self, name: str) -> MailboxStatus:
        f = self._folder(name)
        ms = list(f.messages.values())
        return MailboxStatus(
            name=name,
            uidvalidity=f.uidvalidity,
            uidnext=f.uidnext,
            highestmodseq=f.highestmodseq,
            messages=len(ms),
            unseen=sum("\\Seen" not in m.flags for m in ms),
            deleted=sum("\\Deleted" in m.flags for m in ms),
            size=sum(m.size for m in ms),
            recent=len(f.unclaimed),
        )

    def read(self, name: str, uid: int) -> bytes:
        from mailroom.errors import MessageGoneError

        f = self._folder(name)
        self.reads += 1
        if uid not in f.bodies:
            raise MessageGoneError(f"message {uid} is gone")
        return f.bodies[uid]

    def path(self, name: str, uid: int) -> Path:
        return Path("/nonexistent") / name / str(uid)

    def store(
        self,
        name: str,
        uids: Sequence[int],
        mode: Literal["+", "-", ""],
        flags: Iterable[str],
        unchangedsince: int | None = None,
    ) -> tuple[list[MessageInfo], list[int]]:
        f = self._folder(name)
        wanted = frozenset(flags)
        changed: list[MessageInfo] = []
        failed: list[int] = []
        for uid in uids:
            info = f.messages.get(uid)
            if info is None:
                continue
            if unchangedsince is not None and info.modseq > unchangedsince:
                failed.append(uid)
                continue
            new = (
                info.flags | wanted
                if mode == "+"
                else info.flags - wanted
                if mode == "-"
                else wanted
            )
            if new == info.flags:
                continue
            f.highestmodseq += 1
            info = info._replace(flags=new, modseq=f.highestmodseq)
            f.messages[uid] = info
            changed.append(info)
        return changed, failed

    def append(
        self,
        name: str,
        message: bytes,
        flags: Iterable[str] = (),
        internaldate: datetime | None = None,
    ) -> tuple[int, int]:
        f = self._folder(name)
        if self.quota_bytes and self.usage_bytes() + len(message) > self.quota_bytes:
            raise QuotaExceededError("over quota")
        uid = f.uidnext
        f.uidnext += 1
        f.highestmodseq += 1
        when = internaldate or datetime(2026, 11, 24, 10, 0, 0, tzinfo=UTC)
        f.messages[uid] = MessageInfo(
            uid, frozenset(flags), f.highestmodseq, len(message), when, f"k{uid}"
        )
        f.bodies[uid] = message
        f.unclaimed.add(uid)
        return f.uidvalidity, uid

    def copy(self, src: str, uids: Sequence[int], dst: str) -> tuple[int, list[tuple[int, int]]]:
        s, d = self._folder(src), self._folder(dst)
        pairs = []
        for uid in uids:
            if uid in s.messages:
                info = s.messages[uid]
                _, new = self.append(dst, s.bodies[uid], info.flags, info.internaldate)
                pairs.append((uid, new))
        return d.uidvalidity, pairs

    def move(self, src: str, uids: Sequence[int], dst: str) -> tuple[int, list[tuple[int, int]]]:
        validity, pairs = self.copy(src, uids, dst)
        self._remove(src, [s for s, _ in pairs])
        return validity, pairs

    def _remove(self, name: str, uids: Iterable[int]) -> list[int]:
        f = self._folder(name)
        removed = []
        for uid in uids:
            if uid in f.messages:
                f.highestmodseq += 1
                del f.messages[uid]
                del f.bodies[uid]
                f.unclaimed.discard(uid)
                f.vanished[uid] = f.highestmodseq
                removed.append(uid)
        return removed

    def expunge(self, name: str, uids: Sequence[int] | None = None) -> list[int]:
        f = self._folder(name)
        candidates = sorted(f.messages) if uids is None else uids
        return self._remove(
            name, [u for u in candidates if u in f.messages and "\\Deleted" in f.messages[u].flags]
        )

    def changes_since(self, name: str, modseq: int) -> tuple[list[MessageInfo], list[int]]:
        f = self._folder(name)
        changed = [m for u, m in sorted(f.messages.items()) if m.modseq > modseq]
        vanished = sorted(u for u, ms in f.vanished.items() if ms > modseq)
        return changed, vanished

    def claim_recent(self, name: str) -> frozenset[int]:
        f = self._folder(name)
        claimed = frozenset(f.unclaimed)
        f.unclaimed.clear()
        return claimed

    def cached_items(
        self, name: str, uids: Collection[int], items: Collection[str]
    ) -> dict[tuple[int, str], bytes]:
        saved = self.derived.get(name, {})
        return {(u, i): v for (u, i), v in saved.items() if u in uids and i in items}

    def save_items(self, name: str, values: Mapping[tuple[int, str], bytes]) -> None:
        self.derived.setdefault(name, {}).update(values)

    def watch_dirs(self, name: str) -> list[Path]:
        self._folder(name)
        return [Path("/nonexistent") / name / "new", Path("/nonexistent") / name / "cur"]

    def hold_if_current(self, name: str) -> bool:
        return False  # the transcripts run every command the ordinary way

    def release_hold(self) -> None:
        raise AssertionError("never held")
