"""mailroom-imapd with real clients over real sockets: imaplib, mbsync, getmail6, mutt.

Each client must see exactly the messages and flags that are in the Maildir.
"""

from __future__ import annotations

import imaplib
import os
import re
import select
import shutil
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailroom.addresses import parse_address
from mailroom.maildir import Maildir
from tests.conftest import HOSTNAME, PASSWORD, Certificate, MailEnv, Server

ALICE = "alice@example.test"


def message(i: int) -> bytes:
    return (
        f"From: Sender {i} <s{i}@elsewhere.test>\r\nTo: {ALICE}\r\nSubject: message {i}\r\n"
        f"Message-ID: <{i}@elsewhere.test>\r\nDate: Mon, 2 Nov 2026 10:00:0{i % 10} +0000\r\n\r\n"
        f"Body of message {i}.\r\n"
    ).encode()


def deliver(env: MailEnv, address: str, data: bytes) -> Path:
    maildir = Maildir.for_address(env.data_dir / "mail", parse_address(address), HOSTNAME)
    return maildir.deliver(data)


@pytest.fixture
def imapd(mail_env: MailEnv) -> Iterator[Server]:
    server = Server(mail_env, "mailroom-imapd", ("imap", "imaps"))
    yield server
    server.stop()


def tls_context(certificate: Certificate) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certificate[0]))
    context.check_hostname = False
    return context


def test_imaplib_plain_starttls_and_imaps(
    imapd: Server, mail_env: MailEnv, certificate: Certificate
) -> None:
    for i in range(3):
        deliver(mail_env, ALICE, message(i))
    with imaplib.IMAP4("127.0.0.1", imapd.ports["imap"]) as client:
        assert "LOGINDISABLED" in client.capabilities and "STARTTLS" in client.capabilities
        typ, data = client._simple_command(
            "LOGIN", ALICE, PASSWORD
        )  # imaplib.login() would refuse itself
        assert typ == "NO" and b"[PRIVACYREQUIRED]" in data[0]
        client.starttls(tls_context(certificate))
        assert "LOGINDISABLED" not in client.capabilities and "AUTH=PLAIN" in client.capabilities
        client.login(ALICE, PASSWORD)
        typ, data = client.select("INBOX")
        assert typ == "OK" and data == [b"3"]
        typ, data = client.fetch("1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        subjects = [part[1] for part in data if isinstance(part, tuple)]
        assert subjects == [f"Subject: message {i}\r\n\r\n".encode() for i in range(3)]
        client.store("2", "+FLAGS", "(\\Flagged \\Seen)")
    with imaplib.IMAP4_SSL(
        "127.0.0.1", imapd.ports["imaps"], ssl_context=tls_context(certificate)
    ) as client:
        client.login(ALICE, PASSWORD)
        typ, data = client.list()
        names = {
            re.sub(rb'.* "/" ', b"", line).strip(b'"') for line in data if isinstance(line, bytes)
        }
        assert {b"INBOX", b"Sent", b"Drafts", b"Trash", b"Junk", b"Archive"} <= names
        client.select("INBOX", readonly=True)
        typ, data = client.fetch("2", "(FLAGS)")
        assert b"\\Flagged" in data[0] and b"\\Seen" in data[0]  # type: ignore[operator]
    cur = sorted((mail_env.mailbox(ALICE) / "cur").iterdir())
    assert [p.name.rsplit(":2,", 1)[1] for p in cur] == ["", "FS", ""]


def test_idle_announces_delivery_within_a_second(
    imapd: Server, mail_env: MailEnv, certificate: Certificate
) -> None:
    with imaplib.IMAP4_SSL(
        "127.0.0.1", imapd.ports["imaps"], ssl_context=tls_context(certificate)
    ) as client:
        client.login(ALICE, PASSWORD)
        client.select("INBOX")
        tag = client._new_tag().decode()
        client.send(f"{tag} IDLE\r\n".encode())
        assert client.readline().startswith(b"+")
        start = time.monotonic()
        deliver(mail_env, ALICE, message(7))
        sock = client.socket()
        ready, _, _ = select.select([sock], [], [], 1.0)
        assert ready, "no IDLE update within 1 s"
        line = client.readline()
        assert line == b"* 1 EXISTS\r\n", line
        assert time.monotonic() - start < 1.0
        client.send(b"DONE\r\n")
        while not client.readline().startswith(tag.encode()):
            pass


def _as_sent(stored: bytes) -> bytes:
    """A message mbsync stored (LF line ends, its own X-TUID header added) as the server sent it."""
    return re.sub(rb"(?m)^X-TUID: .*\n", b"", stored).replace(b"\n", b"\r\n")


def _mbsync(rc: Path) -> str:
    out = subprocess.run(
        ["mbsync", "-c", str(rc), "-a"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def test_mbsync_both_ways(
    imapd: Server, mail_env: MailEnv, certificate: Certificate, tmp_path: Path
) -> None:
    if shutil.which("mbsync") is None:
        pytest.fail("mbsync missing: bin/test installs isync")
    for i in range(5):
        deliver(mail_env, ALICE, message(i))
    local = tmp_path / "local"
    local.mkdir()
    rc = tmp_path / "mbsyncrc"
    rc.write_text(
        f'IMAPAccount remote\nHost localhost\nPort {imapd.ports["imaps"]}\nUser {ALICE}\nPass "{PASSWORD}"\n'
        f"SSLType IMAPS\nCertificateFile {certificate[0]}\n\n"
        "IMAPStore remote-store\nAccount remote\n\n"
        f"MaildirStore local-store\nPath {local}/\nInbox {local}/INBOX\nSubFolders Verbatim\n\n"
        "Channel sync\nFar :remote-store:\nNear :local-store:\nPatterns *\nCreate Both\nExpunge Both\n"
        "SyncState *\n"
    )
    _mbsync(rc)
    inbox = [p for sub in ("new", "cur") for p in (local / "INBOX" / sub).iterdir()]
    assert sorted(_as_sent(p.read_bytes()) for p in inbox) == sorted(message(i) for i in range(5))
    assert {p.name for p in local.iterdir()} >= {
        "INBOX",
        "Sent",
        "Drafts",
        "Trash",
        "Junk",
        "Archive",
    }
    # near side: flag one message seen, write a draft; mbsync carries both to the server
    first = min(inbox)
    first.rename(local / "INBOX" / "cur" / (first.name.split(":2,")[0] + ":2,S"))
    draft = b"From: alice@example.test\r\nSubject: draft\r\n\r\nunfinished\r\n"
    (local / "Drafts" / "cur" / "1.1.local:2,D").write_bytes(draft)
    _mbsync(rc)
    server_cur = mail_env.mailbox(ALICE) / "cur"
    flags = sorted(p.name.rsplit(":2,", 1)[1] for p in server_cur.iterdir())
    assert flags == ["", "", "", "", "S"]
    drafts = list((mail_env.mailbox(ALICE, "Drafts") / "cur").iterdir())
    assert [_as_sent(p.read_bytes()) for p in drafts] == [draft]
    assert drafts[0].name.endswith(":2,D")
    # a second run changes nothing on either side
    before = sorted(
        str(p.relative_to(tmp_path))
        for p in local.rglob("*")
        if p.is_file() and "mbsync" not in p.name
    )

    def server_messages() -> list[str]:  # message files with their flags; not the index's own files
        return sorted(
            p.name for p in mail_env.mailbox(ALICE).rglob("*") if p.parent.name in ("cur", "new")
        )

    server_before = server_messages()
    out = _mbsync(rc)
    after = sorted(
        str(p.relative_to(tmp_path))
        for p in local.rglob("*")
        if p.is_file() and "mbsync" not in p.name
    )
    assert before == after
    assert server_before == server_messages()
    assert "error" not in out.lower()


def test_getmail6_retrieves_exact_bytes(
    imapd: Server,
    mail_env: MailEnv,
    certificate: Certificate,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    stored = [deliver(mail_env, ALICE, message(i)).read_bytes() for i in range(4)]
    # getmail refuses to deliver as root; it switches to `user` for the delivery, who must
    # reach the Maildir (pytest's own temporary directory is private to root).
    dest = Path(tempfile.mkdtemp(prefix="mailroom-getmail-", dir="/var/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(dest, ignore_errors=True))
    dest.chmod(0o755)
    for sub in ("", "cur", "new", "tmp"):
        (dest / sub).mkdir(exist_ok=True)
        shutil.chown(dest / sub, "nobody")
    rc = tmp_path / "getmailrc"
    rc.write_text(
        "[retriever]\ntype = SimpleIMAPSSLRetriever\nserver = 127.0.0.1\n"
        f"port = {imapd.ports['imaps']}\nusername = {ALICE}\npassword = {PASSWORD}\n"
        f'ca_certs = {certificate[0]}\nmailboxes = ("INBOX",)\n\n'
        f"[destination]\ntype = Maildir\npath = {dest}/\nuser = nobody\n\n[options]\nread_all = true\ndelete = false\n"
        "delivered_to = false\nreceived = false\n"
    )
    out = subprocess.run(
        ["getmail", "--rcfile", str(rc), "--getmaildir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # getmail adds Return-Path: and X-getmail-retrieved-from-mailbox: at the top; the rest is ours
    added = rb"(?m)\A(Return-Path: .*\n)|^X-getmail-retrieved-from-mailbox: .*\n"
    got = sorted(re.sub(added, b"", p.read_bytes()) for p in (dest / "new").iterdir())
    assert got == sorted(stored)
    assert os.listdir(dest / "tmp") == []


def test_mutt_reads_and_flags(
    imapd: Server, mail_env: MailEnv, certificate: Certificate, tmp_path: Path
) -> None:
    """mutt in a terminal (tmux), driven by `push` from its rc: open, read message 1, flag it, quit."""
    for i in range(2):
        deliver(mail_env, ALICE, message(i))
    rc = tmp_path / "muttrc"
    rc.write_text(
        f'set folder="imaps://alice%40example.test@127.0.0.1:{imapd.ports["imaps"]}/"\n'
        f'set spoolfile="+INBOX"\nset imap_pass="{PASSWORD}"\n'
        f'set certificate_file="{certificate[0]}"\nset ssl_verify_host=no\nset ssl_starttls=no\n'
        'set header_cache=""\nset message_cachedir=""\nset wait_key=no\nset quit=yes\n'
        "set mark_old=no\nset move=no\nset sort=date\nset pager_stop=yes\nset confirmappend=no\n"
        'push "<display-message><exit><flag-message><sync-mailbox><quit>"\n'
    )
    session = f"mutt{os.getpid()}"
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "40", f"mutt -n -F {rc}; sleep 30"],
        check=True, env=dict(os.environ, TERM="xterm", HOME=str(tmp_path)),
    )  # fmt: skip
    try:
        cur = mail_env.mailbox(ALICE) / "cur"
        deadline = time.monotonic() + 30
        flags: list[str] = []
        while time.monotonic() < deadline:
            flags = (
                sorted(p.name.rsplit(":2,", 1)[1] for p in cur.iterdir()) if cur.exists() else []
            )
            if "FS" in flags:
                break
            time.sleep(0.2)
        screen = subprocess.run(
            ["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True
        ).stdout
        assert flags == ["", "FS"], (
            screen
        )  # message 1 read (\Seen) and flagged; message 2 untouched
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def test_sessions_per_user_are_limited(mail_env: MailEnv, certificate: Certificate) -> None:
    with open(mail_env.config, "a") as f:
        f.write("[imap]\nmax_connections_per_user = 2\n")
    server = Server(mail_env, "mailroom-imapd", ("imap", "imaps"))
    context = tls_context(certificate)
    try:
        clients = [
            imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=context)
            for _ in range(3)
        ]
        for client in clients[:2]:
            client.login(ALICE, PASSWORD)
        with pytest.raises(imaplib.IMAP4.error, match="LIMIT"):
            clients[2].login(ALICE, PASSWORD)
        clients[2].login("bob@example.test", PASSWORD)  # the limit is per user
        clients[0].logout()
        time.sleep(0.3)
        again = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=context)
        again.login(ALICE, PASSWORD)
        for client in (clients[1], clients[2], again):
            client.logout()
    finally:
        server.stop()
