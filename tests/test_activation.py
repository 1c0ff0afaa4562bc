"""Socket activation: the systemd protocol, idle exit and restart, SIGTERM, no sockets."""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mailroom.activation import inherited_sockets
from mailroom.errors import ActivationError
from tests.conftest import BIN, Certificate, MailEnv, Server, free_port, wait_for_port, write_config


def test_inherited_sockets_reads_the_protocol() -> None:
    script = (
        "from mailroom.activation import inherited_sockets; import os\n"
        "got = inherited_sockets()\n"
        "print(sorted((n, [s.fileno() for s in v]) for n, v in got.items()), 'LISTEN_FDS' in os.environ)"
    )
    ports = [free_port(), free_port()]
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-E", "CONFIG_PATH", "-l", f"127.0.0.1:{ports[0]}", "-l", f"127.0.0.1:{ports[1]}",
         "--fdname=imap:imaps", sys.executable, "-c", script],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for_port(ports[0])
    out, _ = proc.communicate(timeout=30)
    assert out.strip() == "[('imap', [3]), ('imaps', [4])] False"


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"LISTEN_PID": "1", "LISTEN_FDS": "1"},
        {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"},
    ],
)
def test_inherited_sockets_refuses_foreign_or_missing(env: dict[str, str]) -> None:
    with pytest.raises(ActivationError):
        inherited_sockets(env)


def test_started_without_sockets_says_why(mail_env: MailEnv) -> None:
    out = subprocess.run(
        [BIN / "mailroom-smtpd"], env=mail_env.environ(), capture_output=True, text=True, timeout=30
    )
    assert out.returncode != 0
    assert "no sockets were passed" in out.stderr and "Traceback" not in out.stderr


def test_bad_config_no_traceback(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('hostname = "not a host"\n')
    env = dict(os.environ, CONFIG_PATH=str(config))
    out = subprocess.run(
        [BIN / "mailroom-smtpd"], env=env, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 78
    assert "hostname" in out.stderr and str(config) in out.stderr and "Traceback" not in out.stderr


def test_wrong_fd_name_refused(mail_env: MailEnv) -> None:
    port = free_port()
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-E", "CONFIG_PATH", "-l", f"127.0.0.1:{port}", "--fdname=imap", BIN / "mailroom-smtpd"],
        env=mail_env.environ(), stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for_port(port)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "fd names imap" in err and "Traceback" not in err


def send(port: int, to: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
        client.sendmail("x@elsewhere.test", [to], b"Subject: t\r\n\r\nhello\r\n")


def test_activator_idle_exit_and_restart(mail_env: MailEnv, certificate: Certificate) -> None:
    write_config(mail_env.root, certificate, idle_exit_seconds=1)
    server = Server(mail_env)
    try:
        send(server.port, "alice@example.test")
        _wait(lambda: "exited with status 0" in server.output(), 15)
        assert server.child_pids() == []
        send(server.port, "alice@example.test")  # the next connection starts it again
        assert server.output().count("started mailroom-smtpd") == 2
    finally:
        server.stop()
    assert len(mail_env.new_messages("alice@example.test")) == 2


def test_systemd_socket_activate(mail_env: MailEnv, certificate: Certificate) -> None:
    write_config(mail_env.root, certificate, idle_exit_seconds=1)
    port = free_port()
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-E", "CONFIG_PATH", "-l", f"127.0.0.1:{port}", "--fdname=smtp", BIN / "mailroom-smtpd"],
        env=mail_env.environ(), stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for_port(port)
    try:
        send(port, "bob@example.test")
        _, err = proc.communicate(timeout=30)  # idle exit after one second with nothing open
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "exiting (idle)" in err
    [path] = mail_env.new_messages("bob@example.test")
    assert path.read_bytes().endswith(b"\nSubject: t\n\nhello\n")


def test_sigterm_finishes_open_session(mail_env: MailEnv, certificate: Certificate) -> None:
    server = Server(mail_env)
    try:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=15) as client:
            client.ehlo("client.test")
            [pid] = server.child_pids()
            os.kill(pid, signal.SIGTERM)
            time.sleep(0.3)
            # the open session still completes its transaction
            client.sendmail("x@elsewhere.test", ["carol@example.test"], b"Subject: t\r\n\r\nhi\r\n")
        _wait(lambda: "exited with status 0" in server.output(), 15)
    finally:
        server.stop()
    assert len(mail_env.new_messages("carol@example.test")) == 1


def _wait(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.1)
