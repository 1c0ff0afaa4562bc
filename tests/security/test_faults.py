"""Faults the disk can throw: fsync failing with EIO (strace fault injection into the real
mailroom-smtpd, mailroom-imapd and mailroom-pop3d, and an injected fsync under the IMAP and
POP3 sessions) and a full disk (a small tmpfs as the data directory, for SMTP and IMAP). Each
time the client gets a temporary error (4xx, NO, -ERR), nothing partial is visible in the
Maildir or its index, and the same command works again once the fault is gone.

The servers fork workers (``[smtp]``/``[imap] workers``): strace follows forks (``-f``) when it
starts the server, and attaches to the service process and every worker when it joins a
running one."""

from __future__ import annotations

import contextlib
import errno
import imaplib
import os
import poplib
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

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
from tests.security.wire import client_context
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


needs_strace = pytest.mark.skipif(
    STRACE is None, reason="strace is not installed (bin/test installs it)"
)


@needs_strace
@pytest.mark.parametrize("when", ["1+", "1", "2"], ids=["every", "file", "directory"])
def test_smtpd_answers_451_when_fsync_fails(mail_env: MailEnv, when: str) -> None:
    """strace makes fsync(2) of mailroom-smtpd fail with EIO (a dying disk); ``-f``: of the
    workers it forks too, one of which takes the connection. Alice's Maildir exists, so a
    delivery thread's first fsync is the message file's, its second that of ``new/``:
    ``when=1+`` fails both, ``when=1`` only the file's, ``when=2`` only the directory's
    (strace counts per thread)."""
    Maildir(mail_env.mailbox(ALICE), HOSTNAME).create()
    wrapper = mail_env.root / "smtpd-under-strace"
    # strace runs the server as its child: the child sets LISTEN_PID to its own pid, then execs.
    wrapper.write_text(
        "#!/bin/sh\n"
        f"exec {STRACE} -f --seccomp-bpf -qq -o /dev/null -e trace=fsync -e inject=fsync:error=EIO:when={when} "
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


def _configure(env: MailEnv, section: str, **keys: int) -> None:
    """Add ``[section]`` with ``keys`` to ``env``'s configuration file."""
    with env.config.open("a") as config:
        config.write(f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()))


def _wait_until(done: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _service_pids(server: Server, workers: int = 0) -> list[int]:
    """The service process behind ``server``'s activator and, once all run, its ``workers``."""
    found: list[int] = []

    def started() -> bool:
        nonlocal found
        pids = server.child_pids()
        found = [pids[-1], *_descendants(pids[-1])] if pids else []
        return len(found) == 1 + workers

    _wait_until(started, f"the service and its {workers} workers")
    return found


def _tracers(pids: list[int]) -> set[int]:
    """The TracerPid of every thread of ``pids`` (0: not traced)."""
    tracers = set()
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(FileNotFoundError):
                    status = Path(f"/proc/{pid}/task/{task}/status").read_text()
                    tracers.add(int(status.split("TracerPid:", 1)[1].split()[0]))
    return tracers


@contextlib.contextmanager
def dying_disk(pids: list[int], calls: str = "fsync,fdatasync") -> Iterator[None]:
    """While the block runs, the ``calls`` of ``pids`` fail with EIO, as on a dying disk:
    strace attached to every thread of each (``-f``: and to what they start meanwhile, such
    as the executor's threads and the workers' forks), detached again at the end.

    By default both flushes: the Maildir code fsyncs, SQLite's commits of the index fdatasync.
    """
    assert STRACE is not None
    command = [STRACE, "-f", "-qq", "-o", "/dev/null", "-e", f"trace={calls}",
               "-e", f"inject={calls}:error=EIO"]  # fmt: skip
    for pid in pids:
        command += ["-p", str(pid)]
    strace = subprocess.Popen(command, stderr=subprocess.PIPE)
    try:
        _wait_until(lambda: _tracers(pids) == {strace.pid} or strace.poll() is not None, "strace")
        if strace.poll() is not None:
            error = strace.communicate()[1].decode(errors="replace").strip()
            if "Operation not permitted" in error:
                pytest.skip(f"strace cannot attach here: {error}")
            raise AssertionError(f"strace failed: {error}")
        yield
    finally:
        strace.send_signal(signal.SIGINT)  # strace detaches from every thread, then exits
        try:
            strace.wait(20)
        except subprocess.TimeoutExpired:
            strace.kill()
            strace.wait()
    assert _tracers(pids) <= {0}, "strace is still attached"


def _imap_login(server: Server, select: bool = True) -> imaplib.IMAP4_SSL:
    client = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=client_context())
    client.login(ALICE, PASSWORD)
    if select:
        assert client.select("INBOX")[0] == "OK"
    return client


def _uids(client: imaplib.IMAP4_SSL) -> list[int]:
    """The UIDs of INBOX as a fresh SELECT and FETCH see them."""
    typ, data = client.select("INBOX")
    assert typ == "OK", data
    exists = int(data[0] or b"0")
    if not exists:
        return []
    typ, data = client.uid("FETCH", "1:*", "(RFC822.SIZE)")
    assert typ == "OK", data
    fetched = b" ".join(d if isinstance(d, bytes) else d[0] for d in data if d)
    uids = [int(u) for u in re.findall(rb"UID (\d+)", fetched)]
    assert len(uids) == exists, (exists, data)
    return uids


def _append(client: imaplib.IMAP4, message: bytes) -> tuple[str, list[bytes | None]]:
    """APPEND to INBOX: (OK/NO, [the text]); typeshed wrongly has imaplib answer a str."""
    return cast(tuple[str, list[bytes | None]], client.append("INBOX", "", "", message))


def _appended(reply: tuple[str, list[bytes | None]]) -> None:
    typ, data = reply
    assert typ == "OK" and b"APPENDUID" in (data[0] or b""), reply


def _imap_with_a_message(
    server: Server, env: MailEnv
) -> tuple[imaplib.IMAP4_SSL, Path, list[str], list[int]]:
    """Alice logged in with one message appended (her mailbox and index exist): the client,
    her Maildir, its visible files and the UIDs the server reports."""
    client = _imap_login(server)
    _appended(_append(client, MESSAGE))
    root = env.mailbox(ALICE)
    return client, root, sorted(_visible(root)), _uids(client)


@needs_strace
def test_imapd_append_answers_no_when_fsync_fails(mail_env: MailEnv) -> None:
    """APPEND to a running mailroom-imapd (two workers) whose fsyncs fail: a tagged NO that
    says try later, no file in new/ or cur/, no UID in the index; then it works again."""
    _configure(mail_env, "imap", workers=2)
    server = Server(mail_env, "mailroom-imapd", ("imap", "imaps"))
    try:
        client, root, before, uids = _imap_with_a_message(server, mail_env)
        with dying_disk(_service_pids(server, workers=2)):
            typ, data = _append(client, MESSAGE)
        assert typ == "NO", (typ, data)
        text = (data[0] or b"").decode()
        assert text.startswith("[UNAVAILABLE] "), text  # RFC 5530: temporary, try again later
        assert str(mail_env.data_dir) not in text, "the reply names the server's files"
        assert sorted(_visible(root)) == before, "a partial message became visible"
        assert os.listdir(root / "tmp") == []
        assert _uids(client) == uids
        other = _imap_login(server, select=False)  # a session that did not see the failure
        assert _uids(other) == uids
        _appended(_append(client, MESSAGE))  # the disk healed
        assert len(_uids(other)) == len(uids) + 1
        assert len(_visible(root)) == len(before) + 1
        client.logout()
        other.logout()
    finally:
        server.stop()
    assert "Traceback" not in server.output()


@needs_strace
@pytest.mark.parametrize("calls", ["fsync,fdatasync", "fsync"])
def test_pop3d_quit_answers_err_when_fsync_fails(mail_env: MailEnv, calls: str) -> None:
    """DELE, then QUIT to a running mailroom-pop3d whose fsyncs fail: -ERR [SYS/TEMP].

    On a dying disk (every flush fails) the first to fail is the index commit that marks the
    message, before its file is touched: it stays, whole, for the next session. When only
    fsync(2) fails, the commit goes through and the directory's fsync after the unlink fails:
    the message is gone, as RFC 1939 6 allows ("some or none" removed), but gone entirely,
    never listed without its file or back under a new UID. Once the disk heals, QUIT works."""
    root = mail_env.mailbox(ALICE)
    with MailStore(Maildir(root, HOSTNAME)) as store:
        store.append(INBOX, MESSAGE, [])
    server = Server(mail_env, "mailroom-pop3d", ("pop3", "pop3s"))

    def login() -> poplib.POP3_SSL:
        client = poplib.POP3_SSL(
            "127.0.0.1", server.ports["pop3s"], context=client_context(), timeout=30
        )
        client.user(ALICE)
        client.pass_(PASSWORD)
        return client

    try:
        client = login()
        assert client.stat()[0] == 1
        client.dele(1)
        with dying_disk(_service_pids(server), calls), pytest.raises(poplib.error_proto) as failed:
            client.quit()
        reply = failed.value.args[0]
        assert reply.startswith(b"-ERR [SYS/TEMP] "), reply
        client.close()
        with MailStore(Maildir(root, HOSTNAME)) as store:  # whole, or gone: nothing half-done
            left = [store.read(INBOX, m.uid) for m in store.sync(INBOX).messages]
        assert left == [MESSAGE] or (calls == "fsync" and left == []), left
        assert len(_visible(root)) == len(left)
        client = login()
        assert client.stat()[0] == len(left)
        if left:
            assert b"\r\n".join(client.retr(1)[1]) + b"\r\n" == MESSAGE
            client.dele(1)
        assert client.quit().startswith(b"+OK")
    finally:
        server.stop()
    assert "Traceback" not in server.output()
    assert _visible(root) == []
    with MailStore(Maildir(root, HOSTNAME)) as store:
        assert store.sync(INBOX).messages == ()


class FlakyFsync:
    """An fsync that fails with EIO while ``failing``, as a dying disk's would; with
    ``directories_only``, only the fsync of a directory (after the message's own succeeded)."""

    def __init__(self, *, directories_only: bool = False) -> None:
        self.failing = False
        self.directories_only = directories_only

    def __call__(self, fd: int) -> None:
        if self.failing and (not self.directories_only or stat.S_ISDIR(os.fstat(fd).st_mode)):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        os.fsync(fd)


def _imap(store: MailStore) -> IMAPSession:
    user = User(parse_address(ALICE), True, 0)
    session = IMAPSession(make_config(store, authenticate=lambda u, p: user))
    session.greeting()
    assert b"L OK" in session.feed(b"L LOGIN alice x\r\n").data
    return session


@pytest.mark.parametrize("directories_only", [False, True], ids=["every", "directory"])
def test_imap_append_answers_no_when_fsync_fails(tmp_path: Path, directories_only: bool) -> None:
    fsync = FlakyFsync(directories_only=directories_only)
    store = MailStore(Maildir(tmp_path, HOSTNAME, fsync=fsync))
    session = _imap(store)
    small = MESSAGE[:3000]  # LITERAL-: a non-synchronizing literal is at most 4096 octets
    command = b"a APPEND INBOX {%d+}\r\n%s\r\n" % (len(small), small)
    fsync.failing = True
    out = session.feed(command).data
    assert out.startswith(b"a NO [UNAVAILABLE] "), out
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


def _fill(env: MailEnv, leave: int = 0) -> Path:
    """Fill the data directory's file system to the last octet, then free ``leave`` octets."""
    filler = env.data_dir / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as err:
        assert err.errno == errno.ENOSPC
    finally:
        os.close(fd)
    os.truncate(filler, filler.stat().st_size - leave)
    return filler


def test_full_disk_is_a_temporary_error_until_space_is_freed(tmpfs_env: MailEnv) -> None:
    server = Server(tmpfs_env)
    try:
        assert _send(server.port).startswith("250 ")  # the mailbox and its index exist
        filler = _fill(tmpfs_env)
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


def test_full_disk_imap_append_is_a_temporary_error_until_space_is_freed(
    tmpfs_env: MailEnv,
) -> None:
    """APPEND of a message bigger than the space left: NO [OVERQUOTA] (as Dovecot answers a
    full disk), the partly written tmp/ file is gone, the index unchanged; then it works."""
    server = Server(tmpfs_env, "mailroom-imapd", ("imap", "imaps"))
    try:
        client, root, before, uids = _imap_with_a_message(server, tmpfs_env)
        filler = _fill(tmpfs_env, leave=64 * 1024)
        big = MESSAGE * 10  # about 200 KB: the first 64 KiB of it are written
        typ, data = _append(client, big)
        assert typ == "NO", (typ, data)
        text = (data[0] or b"").decode()
        assert text.startswith("[OVERQUOTA] "), text
        assert str(tmpfs_env.data_dir) not in text, "the reply names the server's files"
        assert sorted(_visible(root)) == before, "a partial message became visible"
        assert os.listdir(root / "tmp") == []
        assert _uids(client) == uids
        filler.unlink()
        _appended(_append(client, big))
        assert len(_uids(client)) == len(uids) + 1
        assert len(_visible(root)) == len(before) + 1
        client.logout()
    finally:
        server.stop()
    assert "Traceback" not in server.output()
