"""Logging set-up: the systemd journal under systemd, stderr otherwise.

Structured fields travel in ``extra`` with upper-case names (``CLIENT_ADDR``, ``QUEUE_ID``,
``MAIL_MESSAGE_ID``); the journal stores them as fields, stderr shows the message alone.
A filter masks anything that looks like credentials, as a last line of defence: code must
never pass passwords or AUTH payloads to a log call in the first place.
"""

from __future__ import annotations

import logging
import os
import re
import sys

_SECRET_RE = re.compile(r"(?i)\b(AUTH\s+\S+|PASS|LOGIN|AUTHENTICATE\s+\S+)\s+\S.*")


class RedactFilter(logging.Filter):
    """Masks AUTH/PASS/LOGIN arguments in a record's formatted message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = _SECRET_RE.sub(lambda m: f"{m.group(1)} <redacted>", message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def under_journal() -> bool:
    """True when stderr is connected to the journal (systemd sets ``JOURNAL_STREAM``)."""
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def setup_logging(program: str, level: str = "INFO") -> None:
    """Send the root logger to the journal or stderr, at ``level``."""
    handler: logging.Handler
    if under_journal():
        from systemd.journal import JournalHandler

        handler = JournalHandler(SYSLOG_IDENTIFIER=program)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter(f"{program}[%(process)d]: %(levelname)s %(message)s")
        )
    handler.addFilter(RedactFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiosmtpd logs every command line at INFO; keep only its warnings.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
