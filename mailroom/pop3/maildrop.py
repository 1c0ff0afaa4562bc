"""One user's INBOX as a POP3 session sees it: locked, fixed at login, emptied only at UPDATE.

What this module owns, and what it promises:

- **The POP3 lock.** One POP3 session per mailbox at a time (RFC 1939 8): an exclusive
  ``flock`` on ``mailroom-pop3.lock`` in the Maildir root, taken without waiting. Another
  session gets ``MailboxInUseError`` (``-ERR [IN-USE]``). The kernel releases the lock when
  the process dies, so a crash never leaves a mailbox locked. IMAP and delivery do not take
  this lock: they work on the mailbox meanwhile, through the store's own locking.
- **The snapshot.** The message list is the store's ``sync("INBOX")`` at open; mail that
  arrives later is not shown until the next session (RFC 1939 8: the maildrop as it was).
- **Removal.** ``remove(uids)`` asks the store to remove exactly those messages, whatever
  their flags (an IMAP client's ``\\Deleted`` marks are left alone), with the store's
  crash-safe mark-unlink-drop sequence.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from mailroom.errors import MailboxInUseError
from mailroom.pop3.session import Message

LOCK_NAME = "mailroom-pop3.lock"
INBOX = "INBOX"


class _Snapshot(Protocol):
    @property
    def messages(self) -> Sequence[Message]: ...


class Store(Protocol):
    """What the maildrop needs of ``mailstore.MailStore``."""

    def sync(self, name: str) -> _Snapshot: ...

    def read(self, name: str, uid: int) -> bytes: ...

    def remove(self, name: str, uids: Sequence[int]) -> list[int]: ...

    def close(self) -> None: ...


def lock_mailbox(root: Path) -> int:
    """Take the POP3 lock of the Maildir at ``root``; returns the lock's file descriptor."""
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise MailboxInUseError(f"{root} is open in another POP3 session") from None
        raise
    return fd


class StoreMaildrop:
    """The INBOX of ``store`` for one POP3 session; ``lock_fd`` is released by ``close``."""

    def __init__(self, store: Store, lock_fd: int) -> None:
        self.store = store
        self.lock_fd: int | None = lock_fd
        try:
            self.messages: Sequence[Message] = tuple(store.sync(INBOX).messages)
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, root: Path, open_store: Callable[[], Store]) -> StoreMaildrop:
        """Lock the Maildir at ``root``, then open the store and take the snapshot."""
        fd = lock_mailbox(root)
        try:
            store = open_store()
        except BaseException:
            os.close(fd)
            raise
        return cls(store, fd)

    def read(self, uid: int) -> bytes:
        return self.store.read(INBOX, uid)

    def remove(self, uids: Sequence[int]) -> list[int]:
        return self.store.remove(INBOX, uids)

    def close(self) -> None:
        fd, self.lock_fd = self.lock_fd, None
        try:
            self.store.close()
        finally:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)  # closing the last descriptor releases the flock
