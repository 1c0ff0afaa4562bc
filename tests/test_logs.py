"""Logging: journal under systemd, stderr otherwise; credentials never reach a log line."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from mailroom.logs import RedactFilter, setup_logging, under_journal
from tests.conftest import Certificate, MailEnv, Server, write_config
from tests.smtpclient import SMTPConversation


@pytest.mark.parametrize(
    ("message", "secret"),
    [
        ("C: AUTH PLAIN AGFsaWNlAHNlY3JldA==", "AGFsaWNlAHNlY3JldA=="),
        ("C: PASS hunter2hunter2", "hunter2hunter2"),
        ("C: a1 LOGIN alice hunter2hunter2", "hunter2hunter2"),
        ("C: a1 AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==", "AGFsaWNlAHNlY3JldA=="),
    ],
)
def test_redact_filter_masks_credentials(message: str, secret: str) -> None:
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "%s", (message,), None)
    assert RedactFilter().filter(record)
    assert secret not in record.getMessage()
    assert "<redacted>" in record.getMessage()


def test_journal_only_when_stderr_is_the_journal() -> None:
    script = (
        "import logging, os, sys\n"
        "from mailroom.logs import setup_logging, under_journal\n"
        "st = os.fstat(2)\n"
        "os.environ['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}'\n"
        "setup_logging('mailroom-test')\n"
        "print(under_journal(), type(logging.getLogger().handlers[0]).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "JournalHandler"]
    os.environ.pop("JOURNAL_STREAM", None)
    assert not under_journal()
    setup_logging("mailroom-test")
    assert type(logging.getLogger().handlers[0]).__name__ == "StreamHandler"


def test_server_log_has_no_credentials(mail_env: MailEnv, certificate: Certificate) -> None:
    write_config(mail_env.root, certificate, log_level="DEBUG")
    smtpd = Server(mail_env)
    with SMTPConversation(smtpd.port) as conv:
        assert conv.last().startswith("220")
        conv.line("EHLO client.test")
        conv.reply()
        conv.line("AUTH PLAIN AGFsaWNlAHNlY3JldHNlY3JldA==")
        conv.last()
        conv.line("MAIL FROM:<x@elsewhere.test>")
        conv.last()
        conv.line("RCPT TO:<alice@example.test>")
        conv.last()
    smtpd.stop()
    assert "DEBUG" in smtpd.output()
    assert "AGFsaWNlAHNlY3JldHNlY3JldA==" not in smtpd.output()


def test_delivery_log_names_client_queue_id_and_message_id(
    smtpd: Server, mail_env: MailEnv
) -> None:
    with SMTPConversation(smtpd.port) as conv:
        assert conv.last().startswith("220")
        conv.send(
            b"EHLO c.test\r\nMAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
        )
        assert [conv.last()[:3] for _ in range(4)] == ["250", "250", "250", "354"]
        conv.send(b"Message-ID: <abc.123@elsewhere.test>\r\nSubject: s\r\n\r\nhi\r\n.\r\n")
        queue_id = conv.last().split()[-1]
    smtpd.stop()
    line = next(x for x in smtpd.output().splitlines() if " delivered " in x)
    assert queue_id in line and "message-id=<abc.123@elsewhere.test>" in line
