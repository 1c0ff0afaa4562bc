"""The one exception hierarchy of mailroom.

Every error mailroom raises on purpose is a ``MailroomError``; anything else is a bug.

    MailroomError                 base; ``str(err)`` is a sentence fit for a user or admin
    ├── ConfigError               the configuration file or environment is invalid
    ├── AccountError              accounts database: domains, users, aliases
    │   ├── InvalidNameError      an address, localpart or domain that is not allowed
    │   ├── NotFoundError         the domain, user or alias does not exist
    │   └── ExistsError           the domain, user or alias already exists
    ├── ActivationError           no usable sockets were passed by systemd (or bin/dev)
    ├── DeliveryError             a message could not be stored; ``permanent`` says whether
    │   │                         a retry can help (False: temporary, 4xx; True: 5xx)
    │   └── QuotaExceededError    the mailbox is over its quota (permanent)
    └── MailStoreError            a mail store (folder) operation failed
        ├── MailboxNotFoundError      no such folder
        ├── MailboxExistsError        the folder exists already
        ├── InvalidMailboxNameError   a folder name that is not allowed (.., /x, a//b, NUL, ...)
        └── MessageGoneError          the message was expunged meanwhile
"""

from __future__ import annotations


class MailroomError(Exception):
    """Base of every error mailroom raises on purpose."""


class ConfigError(MailroomError):
    """The configuration is invalid; the message names the key and the file."""


class AccountError(MailroomError):
    """An operation on the accounts database failed."""


class InvalidNameError(AccountError):
    """A name (address, localpart, domain) is malformed or unsafe."""


class NotFoundError(AccountError):
    """The domain, user or alias does not exist."""


class ExistsError(AccountError):
    """The domain, user or alias already exists."""


class ActivationError(MailroomError):
    """The process was started without the sockets it needs."""


class DeliveryError(MailroomError):
    """A message could not be stored durably."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class QuotaExceededError(DeliveryError):
    """The mailbox has no room for the message."""

    def __init__(self, message: str) -> None:
        super().__init__(message, permanent=True)


class MailStoreError(MailroomError):
    """A mail store (folder) operation failed."""


class MailboxNotFoundError(MailStoreError):
    """The folder does not exist."""


class MailboxExistsError(MailStoreError):
    """The folder exists already."""


class InvalidMailboxNameError(MailStoreError):
    """A folder name that is not allowed (it could escape the user's directory, or is malformed)."""


class MessageGoneError(MailStoreError):
    """The message was expunged (by another session) before it could be read."""
