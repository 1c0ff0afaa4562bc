"""A private Postfix instance on loopback: the real MTA that mailroom's queue runner sends to.

``PostfixPeer(domains, mailboxes)`` writes a ``main.cf``/``master.cf`` into its own directory
(own queue and data directories, one ``smtpd`` on ``127.0.0.1:PORT``, opportunistic STARTTLS
with the given certificate), delivers the listed addresses into Maildirs through the
``virtual(8)`` agent and refuses every other address of its domains with ``550 5.1.1``.
Debian's ``postfix`` package, run as root (Postfix's master insists); ``available()`` tells.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

POSTFIX = Path("/usr/sbin/postfix")
MAIL_USER = "nobody"  # virtual(8) delivers as this uid; it refuses uids below 100

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = {hostname}
mydomain = peer.test
myorigin = $myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_domains =
alias_maps =
alias_database =
local_recipient_maps =
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
smtpd_banner = $myhostname ESMTP peer
smtpd_tls_security_level = may
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_tls_received_header = yes
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_recipient_restrictions = {recipient_restrictions}
virtual_mailbox_domains = {domains}
virtual_mailbox_base = {root}/mail
virtual_mailbox_maps = texthash:{root}/vmailbox
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
smtputf8_enable = no
biff = no
{transport}"""

MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def available() -> str | None:
    """Why a private Postfix cannot run here, or None when it can."""
    if not POSTFIX.exists():
        return "postfix is not installed (apt-get install postfix)"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "no postfix user"
    return None


class PostfixPeer:
    """A running private Postfix; ``stop()`` (or the context manager) ends it."""

    def __init__(
        self,
        *,
        port: int,
        domains: Iterable[str],
        mailboxes: Iterable[str],
        cert: Path,
        key: Path,
        hostname: str = "mx.peer.test",
        recipient_restrictions: str = "permit_mynetworks, reject_unauth_destination",
        transport: str = "",
    ) -> None:
        """``transport``: where the mailboxes' mail goes instead of virtual(8)'s Maildirs, e.g.
        ``lmtp:inet:127.0.0.1:PORT`` (Dovecot LMTP, for the benchmark)."""
        self.port = port
        # Outside pytest's 0700 tmp tree: virtual(8) runs as an unprivileged uid.
        self.root = Path(tempfile.mkdtemp(prefix="mailroom-postfix-"))
        self.root.chmod(0o755)
        self.config = self.root / "etc"
        self.config.mkdir()
        (self.root / "queue").mkdir(mode=0o755)
        user = pwd.getpwnam(MAIL_USER)
        (self.root / "mail").mkdir()
        os.chown(self.root / "mail", user.pw_uid, user.pw_gid)
        self.mailboxes = list(mailboxes)
        (self.root / "vmailbox").write_text(
            "".join(f"{a} {self.maildir_name(a)}/\n" for a in self.mailboxes)
        )
        (self.config / "main.cf").write_text(
            MAIN_CF.format(
                root=self.root,
                hostname=hostname,
                cert=cert,
                key=key,
                domains=", ".join(domains),
                uid=user.pw_uid,
                gid=user.pw_gid,
                recipient_restrictions=recipient_restrictions,
                transport=f"virtual_transport = {transport}\n" if transport else "",
            )
        )
        (self.config / "master.cf").write_text(MASTER_CF.format(port=port))
        self._postfix("start")
        self._wait_ready()

    @staticmethod
    def maildir_name(address: str) -> str:
        local, _, domain = address.partition("@")
        return f"{domain}/{local}"

    def _postfix(self, *args: str) -> None:
        done = subprocess.run(
            [str(POSTFIX), "-c", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:  # postfix(1) tells why only on a terminal or in the log
            raise RuntimeError(f"postfix {' '.join(args)} failed:\n{done.stderr}{self.log()}")

    def _wait_ready(self, timeout: float = 20) -> None:
        import socket

        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    if s.recv(100).startswith(b"220"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"postfix does not answer on port {self.port}:\n{self.log()}")
            time.sleep(0.1)

    def messages(self, address: str, timeout: float = 20) -> list[bytes]:
        """The messages in ``address``'s Maildir new/, waiting up to ``timeout`` for one."""
        new = self.root / "mail" / self.maildir_name(address) / "new"
        deadline = time.monotonic() + timeout
        while True:
            files = sorted(new.iterdir()) if new.is_dir() else []
            if files or time.monotonic() > deadline:
                return [f.read_bytes() for f in files]
            time.sleep(0.1)

    def log(self) -> str:
        path = self.root / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError, RuntimeError):
            self._postfix("stop")
        # master waits for its children; give it a moment before the files go.
        pid_file = self.root / "queue" / "pid" / "master.pid"
        deadline = time.monotonic() + 10
        while pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostfixPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
