"""`mailroomctl` end to end: the installed console script, run as a subprocess."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailroom import __version__
from mailroom.accounts import Accounts
from mailroom.maildir import Maildir
from mailroom.mailstore import INDEX_NAME, MailStore

MAILROOMCTL = Path(sys.executable).parent / "mailroomctl"
PASSWORD = "correct horse"


@dataclass
class Ctl:
    """Runs mailroomctl against a config in a temporary directory."""

    root: Path

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    def environ(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILROOM_")}
        env["CONFIG_PATH"] = str(self.config)
        return env

    def __call__(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(MAILROOMCTL), *args],
            input=stdin,
            env=self.environ(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "Traceback" not in result.stderr, result.stderr
        return result

    def ok(self, *args: str, stdin: str = "") -> str:
        result = self(*args, stdin=stdin)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def fails(self, *args: str, stdin: str = "") -> str:
        """The one-line error of a command that must fail with status 1."""
        result = self(*args, stdin=stdin)
        assert result.returncode == 1, (result.stdout, result.stderr)
        assert result.stderr.startswith("mailroomctl: ")
        assert result.stderr.count("\n") == 1, result.stderr
        return result.stderr

    def accounts(self) -> Accounts:
        return Accounts(self.data_dir / "auth.sqlite3")

    def maildir(self, address: str) -> Path:
        localpart, _, domain = address.partition("@")
        return self.data_dir / "mail" / domain / localpart

    def interactive(self, args: list[str], answers: list[tuple[str, str]]) -> tuple[int, str]:
        """Run with a terminal as stdin/stdout; send each answer once its prompt appears."""
        leader, follower = pty.openpty()
        proc = subprocess.Popen(
            [str(MAILROOMCTL), *args],
            stdin=follower,
            stdout=follower,
            stderr=follower,
            env=self.environ(),
            start_new_session=True,
        )
        os.close(follower)
        output = b""
        pending = list(answers)
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                if pending and pending[0][0].encode() in output:
                    prompt, answer = pending.pop(0)
                    output = output.replace(prompt.encode(), b"<" + prompt.encode() + b">", 1)
                    os.write(leader, answer.encode() + b"\n")
                ready, _, _ = select.select([leader], [], [], 0.1)
                if ready:
                    try:
                        chunk = os.read(leader, 4096)
                    except OSError:  # EIO: the program exited and closed the terminal
                        break
                    if not chunk:
                        break
                    output += chunk
                elif proc.poll() is not None:
                    break
            returncode = proc.wait(timeout=30)
        finally:
            os.close(leader)
            if proc.poll() is None:
                proc.kill()
        text = output.decode(errors="replace").replace("\r\n", "\n")
        assert not pending, f"never prompted for {pending}: {text}"
        assert "Traceback" not in text, text
        return returncode, text


@pytest.fixture
def ctl(tmp_path: Path) -> Iterator[Ctl]:
    runner = Ctl(tmp_path)
    runner.config.write_text(f'hostname = "mail.example.test"\ndata_dir = "{runner.data_dir}"\n')
    yield runner


@pytest.fixture
def alice(ctl: Ctl) -> Ctl:
    """example.test with alice, whose Maildir holds one message; bob's Maildir too."""
    ctl.ok("domain", "add", "example.test")
    ctl.ok("user", "add", "alice@example.test", "--password-stdin", stdin=PASSWORD + "\n")
    ctl.ok("user", "add", "bob@example.test", "--password-stdin", stdin=PASSWORD + "\n")
    for who in ("alice", "bob"):
        new = ctl.maildir(f"{who}@example.test") / "new"
        new.mkdir(parents=True)
        (new / "1.msg").write_text("Subject: hi\r\n\r\nhello\r\n")
    return ctl


def test_version(ctl: Ctl) -> None:
    assert ctl.ok("--version").strip() == f"mailroomctl, version {__version__}"


def test_help_lists_the_command_groups(ctl: Ctl) -> None:
    out = ctl.ok("--help")
    for group in ("config", "domain", "user", "alias"):
        assert group in out


def test_unknown_command_is_a_usage_error(ctl: Ctl) -> None:
    result = ctl("frobnicate")
    assert result.returncode == 2
    assert "No such command" in result.stderr


def test_domains(ctl: Ctl) -> None:
    assert ctl.ok("domain", "add", "Example.TEST") == "added domain example.test\n"
    assert ctl.ok("domain", "add", "bücher.de") == "added domain xn--bcher-kva.de (bücher.de)\n"
    assert ctl.ok("domain", "list") == "example.test\nxn--bcher-kva.de (bücher.de)\n"
    assert "already exists" in ctl.fails("domain", "add", "example.test")
    assert ctl.ok("domain", "del", "BÜCHER.de") == "deleted domain xn--bcher-kva.de (bücher.de)\n"
    assert ctl.ok("domain", "list") == "example.test\n"
    assert "does not exist" in ctl.fails("domain", "del", "example.net")


def test_a_domain_with_users_is_not_deleted(alice: Ctl) -> None:
    assert "still has 2 user(s)" in alice.fails("domain", "del", "example.test")


def test_user_add_with_password_stdin(alice: Ctl) -> None:
    alice.ok("user", "add", "carol@example.test", "--password-stdin", "--quota", "1.5G", stdin=
             "pass word with spaces\r\n")  # fmt: skip
    with alice.accounts() as accounts:
        carol = accounts.verify_password("carol@example.test", "pass word with spaces")
    assert carol is not None
    assert carol.quota_bytes == 1536 * 1024**2
    assert alice.ok("user", "list") == (
        "alice@example.test\tenabled\tquota unlimited\n"
        "bob@example.test\tenabled\tquota unlimited\n"
        "carol@example.test\tenabled\tquota 1536M\n"
    )


def test_user_add_errors(alice: Ctl) -> None:
    assert "already exists" in alice.fails(
        "user", "add", "ALICE@example.test", "--password-stdin", stdin=PASSWORD + "\n"
    )
    assert "domain example.net does not exist" in alice.fails(
        "user", "add", "x@example.net", "--password-stdin", stdin=PASSWORD + "\n"
    )
    assert "at least 8 characters" in alice.fails(
        "user", "add", "carol@example.test", "--password-stdin", stdin="short\n"
    )
    assert "forbidden character '/'" in alice.fails(
        "user", "add", "../carol@example.test", "--password-stdin", stdin=PASSWORD + "\n"
    )
    assert "may not contain '+'" in alice.fails(
        "user", "add", "carol+x@example.test", "--password-stdin", stdin=PASSWORD + "\n"
    )
    with alice.accounts() as accounts:
        assert len(accounts.list_users()) == 2


def test_user_add_without_a_terminal_needs_password_stdin(alice: Ctl) -> None:
    result = alice("user", "add", "carol@example.test")
    assert result.returncode == 2
    assert "--password-stdin" in result.stderr
    with alice.accounts() as accounts:
        assert accounts.get_user("carol@example.test") is None


def test_user_add_asks_for_the_password_twice_on_a_terminal(alice: Ctl) -> None:
    code, out = alice.interactive(
        ["user", "add", "carol@example.test"],
        # The trailing space comes from getpass after it turned echo off (and flushed input).
        [("Password: ", "typed password"), ("Repeat for confirmation: ", "typed password")],
    )
    assert code == 0, out
    assert "typed password" not in out  # hidden input is not echoed
    assert "added user carol@example.test" in out
    with alice.accounts() as accounts:
        assert accounts.verify_password("carol@example.test", "typed password") is not None


def test_user_passwd(alice: Ctl) -> None:
    alice.ok("user", "passwd", "Alice@Example.test", "--password-stdin", stdin="new password\n")
    with alice.accounts() as accounts:
        assert accounts.verify_password("alice@example.test", PASSWORD) is None
        assert accounts.verify_password("alice@example.test", "new password") is not None
    assert "user nobody@example.test does not exist" in alice.fails(
        "user", "passwd", "nobody@example.test", "--password-stdin", stdin="new password\n"
    )


def test_user_disable_enable_and_quota(alice: Ctl) -> None:
    assert alice.ok("user", "disable", "alice@example.test") == "disabled user alice@example.test\n"
    assert alice.ok("user", "quota", "alice@example.test", "2G").endswith("to 2G\n")
    assert alice.ok("user", "list", "example.test").splitlines()[0] == (
        "alice@example.test\tdisabled\tquota 2G"
    )
    with alice.accounts() as accounts:
        assert accounts.verify_password("alice@example.test", PASSWORD) is None
    alice.ok("user", "enable", "alice@example.test")
    with alice.accounts() as accounts:
        found = accounts.verify_password("alice@example.test", PASSWORD)
    assert found is not None
    assert found.quota_bytes == 2 * 1024**3
    assert alice("user", "quota", "alice@example.test", "lots").returncode == 2
    assert "does not exist" in alice.fails("user", "disable", "nobody@example.test")


def test_user_del_keeps_the_mail_by_default(alice: Ctl) -> None:
    maildir = alice.maildir("alice@example.test")
    out = alice.ok("user", "del", "alice@example.test")
    assert out == f"deleted user alice@example.test\nkept the mail in {maildir}\n"
    assert (maildir / "new" / "1.msg").exists()
    with alice.accounts() as accounts:
        assert accounts.get_user("alice@example.test") is None


def test_user_del_delete_mail(alice: Ctl) -> None:
    maildir = alice.maildir("alice@example.test")
    out = alice.ok("user", "del", "alice@example.test", "--delete-mail")
    assert out == f"deleted user alice@example.test\ndeleted the mail in {maildir}\n"
    assert not maildir.exists()
    assert (alice.maildir("bob@example.test") / "new" / "1.msg").exists()
    assert maildir.parent.exists()


def test_user_del_without_mail(ctl: Ctl) -> None:
    ctl.ok("domain", "add", "example.test")
    ctl.ok("user", "add", "carol@example.test", "--password-stdin", stdin=PASSWORD + "\n")
    assert ctl.ok("user", "del", "carol@example.test", "--delete-mail") == (
        "deleted user carol@example.test\n"
    )


def test_user_del_never_follows_a_symlink_out_of_the_mail_root(alice: Ctl, tmp_path: Path) -> None:
    outside = tmp_path / "precious"
    (outside / "new").mkdir(parents=True)
    (outside / "new" / "keep.msg").write_text("keep me")
    alice.ok("domain", "add", "example.org")
    alice.ok("user", "add", "eve@example.org", "--password-stdin", stdin=PASSWORD + "\n")
    alice.maildir("eve@example.org").parent.mkdir(parents=True)
    alice.maildir("eve@example.org").symlink_to(outside)
    assert "not deleting it" in alice.fails("user", "del", "eve@example.org", "--delete-mail")
    assert (outside / "new" / "keep.msg").exists()
    with alice.accounts() as accounts:
        assert accounts.get_user("eve@example.org") is not None  # nothing done


@pytest.mark.parametrize(("answer", "kept"), [("y", False), ("n", True), ("", True)])
def test_user_del_asks_about_the_mail_on_a_terminal(alice: Ctl, answer: str, kept: bool) -> None:
    maildir = alice.maildir("alice@example.test")
    code, out = alice.interactive(
        ["user", "del", "alice@example.test"],
        [(f"Also delete the mail in {maildir}? [y/N]:", answer)],
    )
    assert code == 0, out
    assert maildir.exists() is kept
    assert ("kept the mail in" in out) is kept
    with alice.accounts() as accounts:
        assert accounts.get_user("alice@example.test") is None


def test_user_del_mentions_aliases_left_pointing_at_the_user(alice: Ctl) -> None:
    alice.ok("alias", "add", "team@example.test", "alice+team@example.test", "bob@example.test")
    out = alice.ok("user", "del", "alice@example.test")
    assert "these aliases still point to alice@example.test: team@example.test" in out


def test_aliases(alice: Ctl) -> None:
    assert alice.ok("alias", "add", "team@example.test", "alice@example.test", "bob@example.test")
    assert alice.ok("alias", "add", "@example.test", "team@example.test")
    assert alice.ok("alias", "list") == (
        "@example.test -> team@example.test\n"
        "team@example.test -> alice@example.test, bob@example.test\n"
    )
    assert alice.ok("alias", "del", "team@example.test", "bob@example.test") == (
        "deleted alias team@example.test -> bob@example.test\n"
    )
    assert alice.ok("alias", "del", "@example.test") == "deleted alias @example.test\n"
    assert alice.ok("alias", "list") == "team@example.test -> alice@example.test\n"


def test_alias_errors(alice: Ctl) -> None:
    assert "outbound queue" in alice.fails("alias", "add", "fwd@example.test", "me@elsewhere.net")
    assert "neither a user nor an alias" in alice.fails(
        "alias", "add", "team@example.test", "nobody@example.test"
    )
    assert "does not exist" in alice.fails("alias", "del", "team@example.test")
    assert alice("alias", "add", "team@example.test").returncode == 2  # TARGET is required
    assert alice.ok("alias", "list") == ""


def test_a_broken_config_is_one_clear_error(ctl: Ctl) -> None:
    ctl.config.write_text('hostname = "mail.example.test"\nbogus = 1\n')
    result = ctl("domain", "list")
    assert result.returncode == 1
    assert result.stderr.startswith(f"mailroomctl: {ctl.config}: invalid configuration")
    assert "bogus: unknown key" in result.stderr


def test_an_unreadable_database_is_one_clear_error(ctl: Ctl) -> None:
    ctl.data_dir.mkdir()
    (ctl.data_dir / "auth.sqlite3").write_bytes(b"not a database" * 100)
    assert "cannot open the accounts database" in ctl.fails("domain", "list")


def test_index_rebuild_keeps_messages_flags_and_uids(alice: Ctl) -> None:
    maildir = Maildir(alice.maildir("alice@example.test"), "mail.example.test")
    for n in range(3):
        maildir.deliver(b"Subject: %d\r\n\r\nhello\r\n" % n)
    with MailStore(maildir) as store:
        store.ensure_defaults()
        store.sync("INBOX")
        store.store("INBOX", [2, 4], "+", ["\\Seen", "$Forwarded"])
        store.store("INBOX", [3], "+", ["\\Deleted"])
        store.expunge("INBOX")
        store.append("Sent", b"Subject: sent\r\n\r\nbye\r\n", ["\\Seen"])
        before = {
            name: (s.uidvalidity, [(m.uid, m.key, m.flags) for m in s.messages])
            for name in ("INBOX", "Sent")
            for s in [store.sync(name)]
        }
    assert [uid for uid, _, _ in before["INBOX"][1]] == [1, 2, 4]  # 1.msg came first
    expected = "rebuilt the mail index of alice@example.test: 6 mailbox(es), 4 message(s)\n"
    assert alice.ok("index", "rebuild", "ALICE@example.test") == expected
    (maildir.root / INDEX_NAME).write_bytes(os.urandom(20000))  # garbage: rebuilt as well
    assert alice.ok("index", "rebuild", "alice@example.test") == expected
    with MailStore(maildir) as store:
        after = {
            name: (s.uidvalidity, [(m.uid, m.key, m.flags) for m in s.messages])
            for name in ("INBOX", "Sent")
            for s in [store.sync(name)]
        }
    assert after == before


def test_index_rebuild_errors(alice: Ctl) -> None:
    assert "user nobody@example.test does not exist" in alice.fails(
        "index", "rebuild", "nobody@example.test"
    )
    alice.ok("user", "add", "carol@example.test", "--password-stdin", stdin=PASSWORD + "\n")
    assert "carol@example.test has no mail yet" in alice.fails(
        "index", "rebuild", "carol@example.test"
    )
    assert not alice.maildir("carol@example.test").exists()


def test_bash_completion_is_shipped_current_and_completes_commands() -> None:
    """packaging/bash-completion/mailroomctl is what click generates for this mailroomctl,
    and the protocol it speaks completes command names and their subcommands."""
    script = Path(sys.executable).parent / "mailroomctl"
    shipped = Path(__file__).parent.parent / "packaging" / "bash-completion" / "mailroomctl"

    def run(**env: str) -> str:
        out = subprocess.run(
            [script], env={**os.environ, **env}, capture_output=True, text=True, check=True
        )
        return out.stdout

    assert run(_MAILROOMCTL_COMPLETE="bash_source") == shipped.read_text()
    words = run(_MAILROOMCTL_COMPLETE="bash_complete", COMP_WORDS="mailroomctl qu", COMP_CWORD="1")
    assert words.split() == ["plain,queue"]
    words = run(
        _MAILROOMCTL_COMPLETE="bash_complete", COMP_WORDS="mailroomctl queue ", COMP_CWORD="2"
    )
    assert {"plain,list", "plain,flush", "plain,delete", "plain,bounce"} <= set(words.split())
