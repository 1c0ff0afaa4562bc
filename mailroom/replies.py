"""SMTP replies with their RFC 3463 enhanced status codes, defined once.

Handlers return one of these strings (or a ``reply()`` made with a specific code).
``with_enhanced_code`` adds a code to the replies aiosmtpd writes by itself, since we
advertise ENHANCEDSTATUSCODES (RFC 2034: every reply except the greeting and HELO/EHLO).
"""

from __future__ import annotations

import re

_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")
_CODE = re.compile(r"^(\d{3})([ -])(.*)$", re.S)

# Default enhanced code for a basic reply code (RFC 3463 classes and subjects).
_DEFAULTS = {
    "221": "2.0.0",
    "250": "2.0.0",
    "252": "2.5.0",
    "421": "4.3.0",
    "451": "4.3.0",
    "452": "4.3.1",
    "454": "4.7.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "550": "5.0.0",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.0.0",
    "555": "5.5.4",
}
_NO_ENHANCED = {"220", "334", "354"}


def reply(code: int, enhanced: str, text: str) -> str:
    return f"{code} {enhanced} {text}"


def with_enhanced_code(line: str) -> str:
    """``line`` with an enhanced status code inserted if it lacks one."""
    match = _CODE.match(line)
    if not match or _HAS_ENHANCED.match(line) or match.group(1) in _NO_ENHANCED:
        return line
    code, sep, text = match.groups()
    enhanced = _DEFAULTS.get(code, f"{code[0]}.0.0")
    text = text.removeprefix("Error: ")
    return f"{code}{sep}{enhanced} {text}"


OK = "250 2.0.0 OK"
SENDER_OK = "250 2.1.0 Sender OK"
RECIPIENT_OK = "250 2.1.5 Recipient OK"
BAD_SENDER = "553 5.1.7 Bad sender address syntax"
BAD_RECIPIENT = "501 5.1.3 Bad recipient address syntax"
NO_SUCH_USER = "550 5.1.1 No such user here"
MAILBOX_DISABLED = "550 5.2.1 Mailbox disabled"
RELAY_DENIED = "550 5.7.1 Relaying denied: this server accepts mail only for its own domains"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
MAILBOX_FULL = "452 4.2.2 Mailbox full, try again later"
MESSAGE_TOO_BIG_FOR_MAILBOX = "552 5.2.2 Mailbox full: the message does not fit in the quota"
BARE_LINE_END = (
    "554 5.6.0 Message contains a bare CR or LF or a NUL (RFC 5321 2.3.8); nothing was delivered"
)
TOO_MANY_HOPS = "554 5.4.6 Too many Received headers: mail loop?"
LOCAL_ERROR = "451 4.3.0 Local error; please try again later"
BAD_HELO = "501 5.5.4 Invalid HELO/EHLO host name"
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections from your address, try again later"
