"""An in-memory store with ``mailstore.MailStore``'s interface, for the POP3 session tests."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from types import TracebackType

from mailroom.errors import MailboxNotFoundError, MessageGoneError
from mailroom.mailstore import MessageInfo, Snapshot


class FakeStore:
    """The INBOX only; ``data`` holds each message with CRLF line ends."""

    def __init__(self) -> None:
        self.infos: dict[int, MessageInfo] = {}
        self.data: dict[int, bytes] = {}
        self.uidnext = 1
        self.modseq = 1
        self.closed = False
        self.removed: list[int] = []

    def add(self, message: bytes, key: str | None = None, flags: Iterable[str] = ()) -> int:
        uid = self.uidnext
        self.uidnext += 1
        self.modseq += 1
        self.infos[uid] = MessageInfo(
            uid,
            frozenset(flags),
            self.modseq,
            len(message),
            datetime(2026, 11, 2, 10, 0, tzinfo=UTC),
            key or f"1764000000.M{uid}P1R{uid:016x}.mail.example.test",
        )
        self.data[uid] = message
        return uid

    def _check(self, name: str) -> None:
        if name.upper() != "INBOX":
            raise MailboxNotFoundError(f"no mailbox {name}")

    def sync(self, name: str) -> Snapshot:
        self._check(name)
        messages = tuple(self.infos[uid] for uid in sorted(self.infos))
        return Snapshot(name, 1, self.uidnext, self.modseq, messages)

    def read(self, name: str, uid: int) -> bytes:
        self._check(name)
        if uid not in self.data:
            raise MessageGoneError(f"message {uid} was expunged")
        return self.data[uid]

    def store(
        self,
        name: str,
        uids: Iterable[int],
        mode: str,
        flags: Iterable[str],
        unchangedsince: int | None = None,
    ) -> tuple[list[int], list[int]]:
        self._check(name)
        changed, failed = [], []
        for uid in uids:
            info = self.infos.get(uid)
            if info is None:
                continue
            if unchangedsince is not None and info.modseq > unchangedsince:
                failed.append(uid)
                continue
            new = {"+": info.flags | set(flags), "-": info.flags - set(flags)}.get(
                mode, frozenset(flags)
            )
            self.modseq += 1
            self.infos[uid] = info._replace(flags=frozenset(new), modseq=self.modseq)
            changed.append(uid)
        return changed, failed

    def expunge(self, name: str, uids: Iterable[int] | None = None) -> list[int]:
        self._check(name)
        wanted = set(self.infos) if uids is None else set(uids)
        gone = [u for u in sorted(wanted & set(self.infos)) if "\\Deleted" in self.infos[u].flags]
        return self.remove(name, gone)

    def remove(self, name: str, uids: Iterable[int]) -> list[int]:
        self._check(name)
        gone = [u for u in sorted(set(uids)) if u in self.infos]
        for uid in gone:
            del self.infos[uid]
            del self.data[uid]
        self.removed += gone
        return gone

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> FakeStore:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class FakeMaildrop:
    """``pop3.session.Maildrop`` on a ``FakeStore``, as ``StoreMaildrop`` but without a lock."""

    def __init__(self, store: FakeStore) -> None:
        self.store = store
        self.messages = store.sync("INBOX").messages
        self.closed = False

    def read(self, uid: int) -> bytes:
        return self.store.read("INBOX", uid)

    def remove(self, uids: Iterable[int]) -> list[int]:
        return self.store.remove("INBOX", uids)

    def close(self) -> None:
        self.closed = True
