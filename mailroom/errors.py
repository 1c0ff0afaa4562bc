"""The one exception hierarchy of mailroom.

Every error mailroom raises on purpose is a ``MailroomError``; anything else is a bug.

    MailroomError                 base; ``str(err)`` is a sentence fit for a user or admin
    ├── ConfigError               the configuration file or environment is invalid
    ├── AccountError              accounts database: domains, users, aliases
    │   ├── InvalidNameError      an address, localpart or domain that is not allowed
    │   ├── NotFoundError         the domain, user or alias does not exist
    │   └── ExistsError           the domain, user or alias already exists
    ├── ActivationError           no usable sockets were passed by systemd (or bin/dev)
    ├── ConnectionLimitError      a user already has as many sessions as allowed (IMAP [LIMIT])
    ├── UnknownTransferEncodingError  a body part's Content-Transfer-Encoding cannot be decoded
    │                             (IMAP answers NO [UNKNOWN-CTE], RFC 9051 7.5.2)
    ├── DeliveryError             a message could not be stored; ``permanent`` says whether
    │   │                         a retry can help (False: temporary, 4xx; True: 5xx)
    │   └── QuotaExceededError    the mailbox is over its quota (permanent)
    └── StoreError                a mail store operation (the IMAP/POP3 view of a Maildir) failed,
        │                         or is not allowed (IMAP [CANNOT])
        ├── MailboxNotFoundError      no such mailbox (IMAP [NONEXISTENT] / [TRYCREATE])
        ├── MailboxExistsError        the mailbox exists already (IMAP [ALREADYEXISTS])
        ├── InvalidMailboxNameError   a name that is not allowed (.., /x, a//b, NUL, ...)
        ├── MessageGoneError          the message was expunged meanwhile
        ├── InvalidFlagError          not a valid flag or keyword, or \\Recent (IMAP BAD)
        ├── KeywordLimitError         the folder already has the 26 keywords Maildir can name
        │                             (IMAP [LIMIT])
        ├── SpecialUseError           a special-use attribute mailroom does not support
        │                             (IMAP [USEATTR])
        └── MailboxInUseError         another POP3 session holds the mailbox (POP3 [IN-USE])

The store raises ``QuotaExceededError`` too, for an APPEND or COPY over the user's quota.

Sending defines its errors beside the code that raises them, in the same tree:

    MailroomError
    ├── QueueError (mailroom.queue)       the outbound queue
    │   ├── InvalidQueueIdError           an id that is not a queue id (never a path)
    │   ├── MessageNotFoundError          no such queued message
    │   └── CorruptMessageError           its state file was unreadable and moved aside
    ├── DkimError (mailroom.dkim)         keys cannot be made, read or used
    ├── DnsTemporaryError (mailroom.resolver)  SERVFAIL, timeout: try again later
    ├── DnsPermanentError (mailroom.resolver)  a malformed name
    └── PolicyError (mailroom.mtasts)     an MTA-STS policy that cannot be fetched or parsed
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


class UnknownTransferEncodingError(MailroomError):
    """A body part's Content-Transfer-Encoding is not one mailroom can decode (BINARY fetch)."""


class ConnectionLimitError(MailroomError):
    """A user already has as many open sessions as the configuration allows."""


class DeliveryError(MailroomError):
    """A message could not be stored durably."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class QuotaExceededError(DeliveryError):
    """The mailbox has no room for the message."""

    def __init__(self, message: str) -> None:
        super().__init__(message, permanent=True)


class StoreError(MailroomError):
    """A mail store operation failed or is not allowed."""


class MailboxNotFoundError(StoreError):
    """The folder does not exist."""


class MailboxExistsError(StoreError):
    """The folder exists already."""


class InvalidMailboxNameError(StoreError):
    """A folder name that is not allowed (it could escape the user's directory, or is malformed)."""


class MessageGoneError(StoreError):
    """The message was expunged (by another session) before it could be read."""


class InvalidFlagError(StoreError):
    """A flag that is not a valid keyword, or one a client cannot set (\\Recent)."""


class KeywordLimitError(StoreError):
    """The folder has no keyword letter left: Maildir names at most 26 keywords."""


class SpecialUseError(StoreError):
    """The special-use attribute is not one mailroom supports."""


class MailboxInUseError(StoreError):
    """Another POP3 session has the mailbox open (RFC 2449 8.1.1: ``[IN-USE]``)."""
