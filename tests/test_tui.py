"""``mailroomctl config edit``: the document layer, every screen through textual's pilot, and
the real command in tmux."""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import pytest
from textual.app import App
from textual.pilot import Pilot
from textual.screen import Screen
from textual.widgets import DataTable, Input, OptionList, Static

from mailroom.accounts import Accounts
from mailroom.config import Settings, load_settings
from mailroom.errors import ConfigError
from mailroom.queue import Queue
from mailroom.tui import probes
from mailroom.tui.app import (
    ConfigApp,
    ConfirmScreen,
    FormScreen,
    HelpScreen,
    MenuScreen,
    SectionScreen,
    TableScreen,
)
from mailroom.tui.document import ConfigDocument, sections
from tests.conftest import Certificate
from tests.dnsserver import DnsServer, dns_server  # noqa: F401 - the fixture

ORIGINAL = """\
# mailroom test configuration: this comment must survive
hostname = "mail.example.test"  # the MX host

[smtp]
# a hand-written comment about limits
max_recipients = 10  # small on purpose
"""
COMMENTS = (
    "# mailroom test configuration: this comment must survive",
    "# the MX host",
    "# a hand-written comment about limits",
)
PASSWORD = "correct horse battery staple"


def sync(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in its own event loop (the suite has no pytest-asyncio)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


def write_config(tmp_path: Path, extra: str = "") -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    path = tmp_path / "config.toml"
    head, tail = ORIGINAL.split("\n\n", 1)
    path.write_text(f'{head}\ndata_dir = "{tmp_path / "data"}"\n{extra}\n{tail}')
    return path


def lookup(settings: Settings, key: str) -> Any:
    value: Any = settings
    for part in key.split("."):
        value = getattr(value, part)
    return value


def make_app(path: Path, **kwargs: Any) -> ConfigApp:
    kwargs.setdefault("unit_states", lambda units: {})
    kwargs.setdefault("probe", lambda port: False)
    return ConfigApp(path, **kwargs)


async def open_menu(pilot: Pilot[None], option_id: str) -> None:
    menu = pilot.app.screen.query_one(OptionList)
    menu.focus()
    menu.highlighted = menu.get_option_index(option_id)
    await pilot.press("enter")
    await pilot.pause()


async def type_into(pilot: Pilot[None], widget: Input, text: str) -> None:
    """Replace ``widget``'s text with ``text``, its last character typed as a key press (the
    tmux test types everything; the pilot is slow at a key per character)."""
    widget.focus()
    await pilot.pause()  # focusing selects the text; the key below must not replace it
    widget.value = text[:-1]
    widget.cursor_position = len(widget.value)
    if text:
        await pilot.press(text[-1])
    await pilot.pause()
    assert widget.value == text


def showing(app: App[Any], kind: type[Screen[Any]]) -> bool:
    """Whether the screen on top is a ``kind`` (an isinstance() in the test would narrow
    ``app.screen`` for mypy past the next key press)."""
    return isinstance(app.screen, kind)


def screen_text(pilot: Pilot[None]) -> str:
    return "\n".join(
        str(w.render()) for w in pilot.app.screen.query(Static) if w.display and w.is_on_screen
    )


# -- the document ----------------------------------------------------------------------------------


def test_document_keeps_comments_and_layout(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    doc = ConfigDocument(path)
    doc.set("smtp.max_recipients", None)  # cleared while typing...
    doc.set("smtp.max_recipients", 50)  # ...and typed again: same place, same comment
    doc.set("dns.publish.zone", "example.test")
    expected = path.read_text().replace("max_recipients = 10", "max_recipients = 50")
    assert doc.text() == expected + '\n[dns.publish]\nzone = "example.test"\n'
    backup = doc.save()
    assert backup == tmp_path / "config.toml.bak"
    assert "max_recipients = 10" in backup.read_text()
    settings = load_settings(path)
    assert settings.smtp.max_recipients == 50
    assert settings.dns.publish.zone == "example.test"
    assert all(c in path.read_text() for c in COMMENTS)


def test_document_refuses_to_save_invalid(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    before = path.read_text()
    doc = ConfigDocument(path)
    doc.set("smtp.max_recipients", 0)
    assert doc.errors() == {"smtp.max_recipients": "Input should be greater than or equal to 1"}
    with pytest.raises(ConfigError, match="smtp.max_recipients"):
        doc.save()
    assert path.read_text() == before
    assert not (tmp_path / "config.toml.bak").exists()


def test_document_keeps_mode(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    path.chmod(0o600)
    doc = ConfigDocument(path)
    doc.set("log_level", "DEBUG")
    doc.save()
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "config.toml.bak").stat().st_mode & 0o777 == 0o600


# -- one pilot run per configuration section ------------------------------------------------------

# section: (key, bad value, words of the error, good value, what Settings then holds)
CASES: dict[str, tuple[str, str, str, str, Any]] = {
    "": ("hostname", "not a host", "fully qualified host name", "mx.example.test", "mx.example.test"),
    "tls": ("tls.smtp_min_version", "SSLv3", "Input should be", "TLSv1.3", "TLSv1.3"),
    "smtp": ("smtp.max_recipients", "0", "greater than or equal to 1", "50", 50),
    "imap": ("imap.autologout_seconds", "60", "greater than or equal to 1800", "3600", 3600),
    "pop3": ("pop3.allow_plaintext_loopback", "maybe", "valid boolean", "yes", True),
    "dns": ("dns.mta_sts_max_age", "10", "greater than or equal to 86400", "86400", 86400),
    "dns.publish": ("dns.publish.ttl", "10", "greater than or equal to 60", "600", 600),
    "submission": ("submission.workers", "65", "less than or equal to 64", "2", 2),
    "outbound": ("outbound.retry_schedule_seconds", "60, soon", "valid number", "60, 600", [60, 600]),
    "outbound.relay": ("outbound.relay.tls", "ssl", '"starttls" or "implicit"', "implicit", "implicit"),
    "inbound": ("inbound.dnsbl_zones", "nodot", "not a DNS zone name", "zen.spamhaus.org", ["zen.spamhaus.org"]),
    "certbot": ("certbot.method", "manual", "Input should be", "webroot", "webroot"),
}  # fmt: skip


def test_every_section_has_a_case() -> None:
    assert {s.name for s in sections()} == set(CASES)


@pytest.mark.parametrize("section", list(CASES), ids=lambda s: s or "general")
@sync
async def test_section_edit_validate_save(tmp_path: Path, section: str) -> None:
    key, bad, words, good, expected = CASES[section]
    path = write_config(tmp_path)
    original = path.read_text()
    app = make_app(path)
    async with app.run_test(size=(80, 24)) as pilot:
        await open_menu(pilot, f"section:{section}")
        assert showing(app, SectionScreen)
        field_id = key.replace(".", "--")
        field = app.screen.query_one(f"#f-{field_id}", Input)
        error = app.screen.query_one(f"#e-{field_id}", Static)
        await type_into(pilot, field, bad)
        assert error.display and words in str(error.render())
        await pilot.press("ctrl+s")  # refused while invalid
        await pilot.pause()
        assert showing(app, SectionScreen)
        await type_into(pilot, field, good)
        assert not error.display
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert showing(app, ConfirmScreen)
        diff = str(app.screen.query_one("#diff", Static).render())
        assert f"+{key.rsplit('.', 1)[-1]} = " in diff
        await pilot.press("y")
        await pilot.pause()
        assert showing(app, SectionScreen)
    assert lookup(load_settings(path), key) == expected
    saved = path.read_text()
    assert all(c in saved for c in COMMENTS), saved
    assert (tmp_path / "config.toml.bak").read_text() == original


@sync
async def test_quit_asks_before_dropping_changes(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    before = path.read_text()
    app = make_app(path)
    async with app.run_test(size=(80, 24)) as pilot:
        await open_menu(pilot, "section:smtp")
        await type_into(pilot, app.screen.query_one("#f-smtp--max_recipients", Input), "20")
        await pilot.press("ctrl+q")
        await pilot.pause()
        assert showing(app, ConfirmScreen)
        await pilot.press("n")
        await pilot.pause()
        assert showing(app, SectionScreen)
        await pilot.press("ctrl+q", "y")
        await pilot.pause()
    assert app.return_code == 0
    assert path.read_text() == before


@sync
async def test_help_screen(tmp_path: Path) -> None:
    app = make_app(write_config(tmp_path))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        await pilot.press("f1")
        await pilot.pause()
        assert showing(app, HelpScreen)
        assert "Ctrl+S" in screen_text(pilot)
        await pilot.press("escape")
        await pilot.pause()
        assert showing(app, MenuScreen)


# -- domains, users, aliases: the real accounts database -------------------------------------------


async def fill_form(pilot: Pilot[None], **values: str) -> None:
    assert showing(pilot.app, FormScreen)
    for name, text in values.items():
        await type_into(pilot, pilot.app.screen.query_one(f"#in-{name}", Input), text)
    await pilot.press("enter")
    await pilot.pause()


def form_error(pilot: Pilot[None]) -> str:
    return str(pilot.app.screen.query_one("#form-error", Static).render())


def status(pilot: Pilot[None]) -> str:
    return str(pilot.app.screen.query_one("#status", Static).render())


async def select_row(pilot: Pilot[None], key: str) -> None:
    table = pilot.app.screen.query_one(DataTable)
    table.focus()
    table.move_cursor(row=table.get_row_index(key))
    await pilot.pause()


@sync
async def test_domains_screen(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    app = make_app(path)
    async with app.run_test(size=(80, 24)) as pilot:
        await open_menu(pilot, "domains")
        await pilot.press("a")
        await fill_form(pilot, domain="bad..domain")
        assert showing(app, FormScreen) and form_error(pilot)  # said in words
        await fill_form(pilot, domain="example.test")
        assert showing(app, TableScreen)
        assert "added domain example.test" in status(pilot)
        assert app.screen.query_one(DataTable).row_count == 1
        with Accounts(tmp_path / "data" / "auth.sqlite3") as accounts:
            assert accounts.list_domains() == ["example.test"]
        await select_row(pilot, "example.test")
        await pilot.press("d", "y")
        await pilot.pause()
        assert "deleted domain example.test" in status(pilot)
    with Accounts(tmp_path / "data" / "auth.sqlite3") as accounts:
        assert accounts.list_domains() == []


@sync
async def test_users_screen(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    db = tmp_path / "data" / "auth.sqlite3"
    with Accounts(db) as accounts:
        accounts.add_domain("example.test")
    app = make_app(path)
    async with app.run_test(size=(80, 24)) as pilot:
        await open_menu(pilot, "users")
        await pilot.press("a", "enter")  # Enter on a field moves to the next one
        await pilot.pause()
        assert pilot.app.focused is pilot.app.screen.query_one("#in-password", Input)
        address = "alice@example.test"
        await fill_form(pilot, address=address, password=PASSWORD, again="other", quota="")
        assert "differ" in form_error(pilot)
        await fill_form(pilot, again=PASSWORD, quota="lots")
        assert "is not a size" in form_error(pilot)
        await fill_form(pilot, quota="1G")
        assert showing(app, TableScreen)
        assert f"added user {address}" in status(pilot)
        await select_row(pilot, address)
        await pilot.press("x")  # disable
        await pilot.pause()
        with Accounts(db) as accounts:
            user = accounts.get_user(address)
            assert user is not None and not user.enabled and user.quota_bytes == 1024**3
        await pilot.press("q")
        await fill_form(pilot, quota="2G")
        await pilot.press("p")
        await fill_form(pilot, password="new password 1", again="new password 1")
        assert f"changed the password of {address}" in status(pilot)
        await pilot.press("x")  # enable again
        await pilot.pause()
        cells = app.screen.query_one(DataTable).get_row(address)
        assert [str(c) for c in cells] == [address, "enabled", "2G"]
    with Accounts(db) as accounts:
        assert accounts.verify_password(address, "new password 1") is not None
        assert accounts.verify_password(address, PASSWORD) is None


@sync
async def test_aliases_screen(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    db = tmp_path / "data" / "auth.sqlite3"
    with Accounts(db) as accounts:
        accounts.add_domain("example.test")
        accounts.add_user("alice@example.test", PASSWORD)
    app = make_app(path)
    async with app.run_test(size=(80, 24)) as pilot:
        await open_menu(pilot, "aliases")
        await pilot.press("a")
        await fill_form(pilot, alias="team@example.test", targets="nobody@elsewhere..test")
        assert form_error(pilot)
        await fill_form(pilot, targets="alice@example.test")
        assert "added alias team@example.test" in status(pilot)
        with Accounts(db) as accounts:
            assert accounts.list_aliases() == [("team@example.test", ["alice@example.test"])]
        await select_row(pilot, "team@example.test")
        await pilot.press("d", "y")
        await pilot.pause()
    with Accounts(db) as accounts:
        assert accounts.list_aliases() == []


# -- read-only views ---------------------------------------------------------------------------------


@sync
async def test_tls_view(tmp_path: Path, certificate: Certificate) -> None:
    cert, key = certificate
    path = write_config(tmp_path, f'[tls]\ncert = "{cert}"\nkey = "{key}"\n')
    app = make_app(path)
    async with app.run_test(size=(80, 24)) as pilot:
        await open_menu(pilot, "tls")
        text = str(app.screen.query_one("#tls", Static).render())
    assert f"certificate: {cert} (self-signed)" in text
    assert "names:       mail.example.test" in text


@sync
async def test_queue_view(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    queue = Queue(tmp_path / "data" / "queue")
    msg_id = queue.enqueue(
        "alice@example.test", ["bob@example.org"], b"Subject: hi\n\nhi\n", time.time()
    )
    app = make_app(path)
    async with app.run_test(size=(80, 24)) as pilot:
        await open_menu(pilot, "queue")
        cells = [str(c) for c in app.screen.query_one(DataTable).get_row(f"{msg_id}:0")]
        assert cells[:4] == [msg_id, "alice@example.test", "bob@example.org", "pending"]
        assert "1 recipient(s) queued" in status(pilot)


@sync
async def test_services_view(tmp_path: Path) -> None:
    def unit_states(units: Sequence[str]) -> dict[str, str]:
        assert "mailroom-imap.socket" in units
        return {"mailroom-imap.socket": "active", "mailroom-imapd.service": "inactive"}

    app = make_app(write_config(tmp_path), unit_states=unit_states, probe=lambda port: port == 25)
    async with app.run_test(size=(80, 24)) as pilot:
        await open_menu(pilot, "services")
        await pilot.pause(0.2)
        table = app.screen.query_one(DataTable)
        rows = {str(table.get_row(k)[0]): [str(c) for c in table.get_row(k)] for k in table.rows}
    assert rows["mailroom-imap.socket"] == [
        "mailroom-imap.socket",
        "143",
        "yes",
        "inactive",
        "systemd",
    ]
    assert rows["mailroom-smtpd.socket"] == [
        "mailroom-smtpd.socket",
        "25",
        "yes",
        "unknown",
        "tcp probe",
    ]
    assert rows["mailroom-pop3s.socket"][2] == "no"


def test_systemd_states_without_systemd() -> None:
    """On this machine systemd may or may not run; the answer is a dict either way, and a unit
    systemd does not know is left out (so the TCP probe answers for it)."""
    states = probes.systemd_states(["mailroom-no-such-unit.socket"])
    assert "mailroom-no-such-unit.socket" not in states


@sync
async def test_dns_view(tmp_path: Path, dns_server: DnsServer) -> None:  # noqa: F811
    domain = "tui.example.test"
    dns_server.set_zone(domain, [("@", "MX", "10 mail.example.test.")])
    path = write_config(
        tmp_path, f'[dns]\nnameservers = ["{dns_server.address}"]\nipv4 = "192.0.2.25"\n'
    )
    with Accounts(tmp_path / "data" / "auth.sqlite3") as accounts:
        accounts.add_domain(domain)
    app = make_app(path)
    async with app.run_test(size=(80, 24)) as pilot:
        await open_menu(pilot, "dns")
        table = app.screen.query_one(DataTable)
        for _ in range(100):
            await pilot.pause(0.1)
            if status(pilot) != "asking the DNS...":
                break
        rows = [[str(c) for c in table.get_row(k)] for k in table.rows]
    by_record = {row[1]: row[2] for row in rows}
    assert by_record["MX"] == "ok"
    assert by_record["SPF"] == "missing"
    assert all(row[0] == domain for row in rows)


# -- the real command in a terminal -------------------------------------------------------------


def test_mailroomctl_config_edit_in_tmux(tmp_path: Path) -> None:
    if shutil.which("tmux") is None:
        pytest.fail("tmux is not installed (Debian package tmux; bin/test installs it)")
    path = write_config(tmp_path)
    session = f"mailroom-tui-{uuid.uuid4().hex[:8]}"
    ctl = Path(sys.executable).with_name("mailroomctl")
    env = {**os.environ, "CONFIG_PATH": str(path), "TERM": "xterm-256color"}
    subprocess.run(
        ["tmux", "-L", session, "new-session", "-d", "-s", session, "-x", "80", "-y", "24",
         f"{ctl} config edit; sleep 30"],
        check=True, env=env,
    )  # fmt: skip

    def screen() -> str:
        return subprocess.run(
            ["tmux", "-L", session, "capture-pane", "-p", "-t", session],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip

    def keys(*names: str) -> None:
        for name in names:  # one at a time, as typed
            subprocess.run(["tmux", "-L", session, "send-keys", "-t", session, name], check=True)
            time.sleep(0.05)

    def wait_for(text: str) -> str:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            shown = screen()
            if text in shown:
                return shown
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not on the screen:\n{screen()}")

    try:
        wait_for("Settings: smtp")
        keys("Down", "Down", "Enter")  # general, tls, smtp
        wait_for("max_recipients")
        keys("BSpace", "BSpace", "0")
        wait_for("greater than or equal to 1")
        keys("BSpace", "4", "2")
        keys("C-s")
        wait_for("+max_recipients = 42")
        keys("y")
        wait_for("saved")
        keys("C-q")
        deadline = time.monotonic() + 10
        while "max_recipients" in screen() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "max_recipients" not in screen(), "the app did not exit on Ctrl+Q"
    finally:
        subprocess.run(["tmux", "-L", session, "kill-server"], capture_output=True)
    assert load_settings(path).smtp.max_recipients == 42
    assert all(c in path.read_text() for c in COMMENTS)


def test_mailroomctl_loads_textual_only_for_config_edit(tmp_path: Path) -> None:
    code = "import sys, mailroom.ctl; print(sorted(m for m in ('textual', 'tomlkit') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    ctl = Path(sys.executable).with_name("mailroomctl")
    env = {**os.environ, "CONFIG_PATH": str(write_config(tmp_path))}
    done = subprocess.run(
        [ctl, "config", "edit"], stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env
    )
    assert done.returncode == 2 and "config edit needs a terminal" in done.stderr
