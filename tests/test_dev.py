"""bin/dev, the README's first command: demo domain, demo user, mail lands, Ctrl-C stops all."""

from __future__ import annotations

import imaplib
import os
import poplib
import re
import signal
import smtplib
import ssl
import subprocess
import time
from pathlib import Path

from tests.conftest import wait_for_port

ROOT = Path(__file__).parent.parent


def test_bin_dev_runs_and_delivers(tmp_path: Path) -> None:
    offset = 20000 + os.getpid() % 10000
    port = 2525 + offset
    log = (tmp_path / "dev.log").open("w+")
    env = dict(
        os.environ, MAILROOM_DEV_DIR=str(tmp_path / "dev"), MAILROOM_DEV_PORT_OFFSET=str(offset)
    )
    proc = subprocess.Popen(
        [ROOT / "bin" / "dev"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_port(port, timeout=120)
        password = (tmp_path / "dev" / "demo-password").read_text().strip()
        assert re.search(rf"password:\s+{re.escape(password)}", Path(log.name).read_text())
        with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
            client.starttls()
            client.sendmail(
                "you@elsewhere.test", ["demo@example.test"], b"Subject: dev\r\n\r\nhi\r\n"
            )
        new = tmp_path / "dev" / "data" / "mail" / "example.test" / "demo" / "new"
        [message] = list(new.iterdir())
        assert message.read_bytes().endswith(b"Subject: dev\n\nhi\n")
        context = ssl.create_default_context(
            cafile=str(tmp_path / "dev" / "data" / "tls" / "fullchain.pem")
        )
        with imaplib.IMAP4_SSL("127.0.0.1", 2993 + offset, ssl_context=context) as client:
            client.login("demo@example.test", password)
            assert client.select("INBOX") == ("OK", [b"1"])
        pop = poplib.POP3_SSL("127.0.0.1", 2995 + offset, context=context)
        pop.user("demo@example.test")
        pop.pass_(password)
        assert pop.stat()[0] == 1
        pop.quit()
        with smtplib.SMTP_SSL("127.0.0.1", 2465 + offset, context=context) as sender:
            sender.login("demo@example.test", password)
            sender.sendmail(
                "demo@example.test",
                ["demo@example.test"],
                b"From: demo@example.test\r\nSubject: to myself\r\n\r\nhi\r\n",
            )
        assert len([*new.iterdir(), *new.with_name("cur").iterdir()]) == 2  # one seen by IMAP
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
        proc.wait(30)
    time.sleep(0.2)
    out = Path(log.name).read_text()
    assert "mailroom-activator: stopped" in out, out
    assert subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True).stdout == b""
