"""Faults the disk can throw: fsync failing with EIO (strace fault injection into the real
mailroom-smtpd, and an injected fsync under the IMAP and POP3 sessions) and a full disk (a
small tmpfs as the data directory). Each time the client gets a temporary error (4xx, NO,
-ERR), nothing partial is visible in the Maildir, and delivery works again once the fault is
gone."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailroom.accounts import User
from mailroom.addresses import parse_address
from mailroom.imap.session import IMAPSession
from mailroom.maildir import Maildir
from mailroom.mailstore import INBOX, MailStore
from mailroom.pop3.maildrop import StoreMaildrop
from mailroom.pop3.session import POP3Session
from mailroom.pop3.session import SessionConfig as POP3Config
from tests.conftest import (
    BIN,
    HOSTNAME,
    PASSWORD,
    Certificate,
    MailEnv,
    Server,
    free_port,
    wait_for_port,
    write_config,
)  # fmt: skip
from tests.imap_transcript import make_config
from tests.smtpclient import SMTPConversation

STRACE = shutil.which("strace")
ALICE = "alice@example.test"
MESSAGE = b"From: x@remote.test\r\nSubject: fault\r\n\r\n" + b"some text\r\n" * 2000


def _visible(root: Path) -> list[str]:
    return [n for sub in ("new", "cur") if (root / sub).exists() for n in os.listdir(root / sub)]


def _send(port: int) -> str:
    conv = SMTPConversation(port)
    conv.hello()
    conv.transaction([ALICE])
    conv.send(MESSAGE + b".\r\n")
    reply = conv.last()
    conv.close()
    return reply


# -- fsync fails with EIO ------------------------------------------------------------------------


@pytest.mark.skipif(STRACE is None, reason="strace is not installed (bin/test installs it)")
def test_smtpd_answers_451_when_fsync_fails(mail_env: MailEnv) -> None:
    """strace makes every fsync(2) of mailroom-smtpd fail with EIO (a dying disk)."""
    wrapper = mail_env.root / "smtpd-under-strace"
    # strace runs the server as its child: the child sets LISTEN_PID to its own pid, then execs.
    wrapper.write_text(
        "#!/bin/sh\n"
        f"exec {STRACE} -f --seccomp-bpf -qq -o /dev/null -e trace=fsync -e inject=fsync:error=EIO:when=1+ "
        f"/bin/sh -c 'LISTEN_PID=$$ exec {BIN / 'mailroom-smtpd'}'\n"
    )
    wrapper.chmod(0o755)
    port = free_port()
    with (mail_env.root / "activator-strace.log").open("wb") as log:
        activator = subprocess.Popen(
            [sys.executable, "-m", "mailroom.activator", "--service", f"{wrapper}:smtp=127.0.0.1:{port}"],
            env=mail_env.environ(), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for_port(port)
        reply = _send(port)
    finally:  # strace would take the activator's SIGTERM slowly: kill its tree outright
        for pid in reversed(_descendants(activator.pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        activator.terminate()
        activator.wait(20)
    assert reply.startswith("451 "), reply
    root = mail_env.mailbox(ALICE)
    assert _visible(root) == []
    assert not (root / "tmp").exists() or os.listdir(root / "tmp") == []
    server = Server(mail_env)  # the disk healed: the same message goes through
    try:
        assert _send(server.port).startswith("250 ")
    finally:
        server.stop()
    assert len(_visible(root)) == 1


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid``, parents before their children."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            found += [int(child), *_descendants(int(child))]
    return found


class FlakyFsync:
    """An fsync that fails with EIO while ``failing``, as a dying disk's would."""

    def __init__(self) -> None:
        self.failing = False

    def __call__(self, fd: int) -> None:
        if self.failing:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        os.fsync(fd)


def _imap(store: MailStore) -> IMAPSession:
    user = User(parse_address(ALICE), True, 0)
    session = IMAPSession(make_config(store, authenticate=lambda u, p: user))
    session.greeting()
    assert b"L OK" in session.feed(b"L LOGIN alice x\r\n").data
    return session


def test_imap_append_answers_no_when_fsync_fails(tmp_path: Path) -> None:
    fsync = FlakyFsync()
    store = MailStore(Maildir(tmp_path, HOSTNAME, fsync=fsync))
    session = _imap(store)
    small = MESSAGE[:3000]  # LITERAL-: a non-synchronizing literal is at most 4096 octets
    command = b"a APPEND INBOX {%d+}\r\n%s\r\n" % (len(small), small)
    fsync.failing = True
    out = session.feed(command).data
    assert out.startswith(b"a NO ") and b"SERVERBUG" not in out, out
    assert _visible(tmp_path) == []
    fsync.failing = False
    assert session.feed(command.replace(b"a ", b"b ", 1)).data.startswith(b"b OK")
    assert len(store.sync(INBOX).messages) == 1
    store.close()


def test_pop3_quit_answers_err_when_fsync_fails(tmp_path: Path) -> None:
    fsync = FlakyFsync()
    with MailStore(Maildir(tmp_path, HOSTNAME)) as store:
        store.append(INBOX, MESSAGE, [])
    user = User(parse_address(ALICE), True, 0)

    def session() -> POP3Session:
        s = POP3Session(
            POP3Config(
                hostname=HOSTNAME,
                authenticate=lambda u, p: user,
                open_maildrop=lambda u: StoreMaildrop.open(
                    tmp_path, lambda: MailStore(Maildir(tmp_path, HOSTNAME, fsync=fsync))
                ),
                implicit_tls=True,
            )
        )
        s.feed(b"USER alice\r\nPASS x\r\nDELE 1\r\n")
        return s

    s = session()
    fsync.failing = True
    out = s.feed(b"QUIT\r\n").data
    assert out.startswith(b"-ERR"), out
    fsync.failing = False
    with MailStore(Maildir(tmp_path, HOSTNAME)) as store:  # the message is whole, or gone
        for m in store.sync(INBOX).messages:
            assert store.read(INBOX, m.uid) == MESSAGE
    assert session().feed(b"QUIT\r\n").data.startswith(b"+OK")
    with MailStore(Maildir(tmp_path, HOSTNAME)) as store:
        assert store.sync(INBOX).messages == ()


# -- the disk is full ----------------------------------------------------------------------------


@pytest.fixture
def tmpfs_env(tmp_path: Path, certificate: Certificate) -> Iterator[MailEnv]:
    """A MailEnv whose data directory is a 3 MB tmpfs (root only)."""
    data = tmp_path / "data"
    data.mkdir(mode=0o750)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m,mode=0750", "tmpfs", str(data)],
        capture_output=True, text=True,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        env = MailEnv(
            tmp_path,
            write_config(tmp_path, certificate, idle_exit_seconds=30, shutdown_grace_seconds=2),
        )
        with env.accounts() as accounts:
            accounts.add_domain("example.test")
            accounts.add_user(ALICE, PASSWORD)
        yield env
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)


def test_full_disk_is_a_temporary_error_until_space_is_freed(tmpfs_env: MailEnv) -> None:
    server = Server(tmpfs_env)
    try:
        assert _send(server.port).startswith("250 ")  # the mailbox and its index exist
        filler = tmpfs_env.data_dir / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:  # fill the disk to the last octet
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as err:
            assert err.errno == errno.ENOSPC
        finally:
            os.close(fd)
        root = tmpfs_env.mailbox(ALICE)
        before = sorted(_visible(root))
        reply = _send(server.port)
        assert reply.startswith("452 ") or reply.startswith("451 "), reply
        assert sorted(_visible(root)) == before, "a partial message became visible"
        assert os.listdir(root / "tmp") == []
        filler.unlink()
        assert _send(server.port).startswith("250 ")
        assert len(_visible(root)) == len(before) + 1
    finally:
        server.stop()
