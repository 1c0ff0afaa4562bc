"""The textual application of ``mailroomctl config edit``.

A menu leads to one screen per configuration section (every field an input, validated on each
keystroke by ``Settings``, the problem written under the field), to the domains, users and
aliases (the ``Accounts`` methods and ``mailroomctl`` helpers the CLI commands use), and to
read-only views: TLS status, the DNS records with the live check, the outbound queue and the
services. Ctrl+S shows the diff and saves on ``y``. Every screen fits 80x24 and has a footer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar, cast

from rich.text import Text
from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.dom import DOMNode
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Header, Input, Label, OptionList, Static
from textual.widgets.option_list import Option

from mailroom import ctl
from mailroom.config import Settings, load_settings
from mailroom.errors import MailroomError
from mailroom.resolver import Resolver
from mailroom.tui import probes
from mailroom.tui.document import ConfigDocument, Field, Section, sections

ResolverFactory = Callable[[Settings], Resolver]

HELP = """\
mailroomctl config edit: the configuration of mailroom, and its accounts.

Everywhere
  Ctrl+S   show the changes to the configuration file and save them (y)
  F1       this help          Escape  back          Ctrl+Q  quit
Menu
  Up/Down, Enter: open a section or a view; q quits
Configuration sections
  Tab / Shift+Tab: next / previous field. An empty field means the default
  (shown greyed). Lists are comma-separated. A problem is written under
  its field, and nothing is saved while there is one.
Domains, users, aliases
  a add, d delete; users: x disable/enable, p new password, q quota (2G, 0 =
  none). Changes take effect at once, as with the mailroomctl commands.
TLS, DNS, queue, services
  Read-only; r reloads (DNS: asks the DNS again).

The file is written in place (comments and layout kept), the previous one
kept as config.toml.bak. Keys set by MAILROOM_* environment variables
override the file."""


def _config_app(node: DOMNode) -> ConfigApp:
    """The application of a screen of this module (textual types ``node.app`` loosely)."""
    return cast("ConfigApp", node.app)


def _field_id(field: Field) -> str:
    return "f-" + field.key.replace(".", "--")


def _error_id(field: Field) -> str:
    return "e-" + field.key.replace(".", "--")


# -- modal screens -------------------------------------------------------------------------------


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,f1,q", "dismiss", "Close"),
    ]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Static(Text(HELP))
        yield Footer()

    async def action_dismiss(self, result: None = None) -> None:
        self.dismiss(None)


class ConfirmScreen(ModalScreen[bool]):
    """A question answered with y or n (Escape: n); ``body``: shown above it, e.g. a diff."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str, body: Text | None = None) -> None:
        super().__init__()
        self.question = question
        self.body = body

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            if self.body is not None:
                with VerticalScroll(id="body"):
                    yield Static(self.body, id="diff")
            yield Label(Text(self.question), id="question")
        yield Footer()

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class FormScreen(ModalScreen[bool]):
    """A few inputs; Enter submits them to ``submit``, which returns a problem in words (the
    form stays open and shows it) or ``None`` (done, the form closes)."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(
        self,
        title: str,
        inputs: Sequence[tuple[str, str, bool]],  # (name, placeholder, password)
        submit: Callable[[dict[str, str]], str | None],
    ) -> None:
        super().__init__()
        self.title_text = title
        self.inputs = inputs
        self.submit = submit

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(Text(self.title_text), id="form-title")
            for name, placeholder, password in self.inputs:
                yield Input(placeholder=placeholder, password=password, id=f"in-{name}")
            yield Static("", id="form-error", classes="error")
        yield Footer()

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        inputs = list(self.query(Input))
        if event.input is not inputs[-1]:  # Enter moves on; on the last field it submits
            inputs[inputs.index(event.input) + 1].focus()
            return
        values = {name: self.query_one(f"#in-{name}", Input).value for name, _, _ in self.inputs}
        problem = self.submit(values)
        if problem is None:
            self.dismiss(True)
        else:
            self.query_one("#form-error", Static).update(Text(problem))

    def action_cancel(self) -> None:
        self.dismiss(False)


# -- the menu ------------------------------------------------------------------------------------


class MenuScreen(Screen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("q", "app.leave", "Quit")]

    def compose(self) -> ComposeResult:
        yield Header()
        app = _config_app(self)
        options = [Option(f"Settings: {s.title}", id=f"section:{s.name}") for s in app.sections]
        options += [
            Option("Domains", id="domains"),
            Option("Users", id="users"),
            Option("Aliases", id="aliases"),
            Option("TLS status", id="tls"),
            Option("DNS records (live check)", id="dns"),
            Option("Outbound queue", id="queue"),
            Option("Services", id="services"),
        ]
        yield OptionList(*options, id="menu")
        yield Footer()

    @on(OptionList.OptionSelected)
    def _open(self, event: OptionList.OptionSelected) -> None:
        app = _config_app(self)
        app.open(event.option.id or "")


# -- configuration sections ----------------------------------------------------------------------


class SectionScreen(Screen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "app.pop_screen", "Back")]

    def __init__(self, section: Section, document: ConfigDocument) -> None:
        super().__init__()
        self.section = section
        self.document = document

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="fields"):
            yield Static(Text(f"[{self.section.title}]", style="bold"), id="section-title")
            for field in self.section.fields:
                with Horizontal(classes="row"):
                    yield Label(Text(field.name), classes="name")
                    yield Input(
                        value=self.document.display(field),
                        placeholder=self._placeholder(field),
                        id=_field_id(field),
                    )
                yield Static("", id=_error_id(field), classes="error")
            for key in self.section.not_editable:
                yield Static(Text(f"{key}: edit this list of tables in the file itself"))
            yield Static("", id="other-errors", classes="error")
        yield Footer()

    @staticmethod
    def _placeholder(field: Field) -> str:
        if field.required:
            return "required"
        if field.choices:
            return f"default {field.default or 'none'}; one of {', '.join(field.choices)}"
        return f"default: {field.default}" if field.default else "default: not set"

    def on_mount(self) -> None:
        self.show_errors()
        self.title = f"mailroom configuration: {self.section.title}"
        inputs = self.query(Input)
        if inputs:
            inputs.first().focus()

    @on(Input.Changed)
    def _changed(self, event: Input.Changed) -> None:
        by_id = {_field_id(f): f for f in self.section.fields}
        field = by_id.get(event.input.id or "")
        if field is None:
            return
        self.document.set_text(field, event.value)
        self.show_errors()

    def show_errors(self) -> None:
        errors = self.document.errors()
        for field in self.section.fields:
            problem = errors.pop(field.key, "")
            error = self.query_one(f"#{_error_id(field)}", Static)
            error.update(Text(f"  ^ {problem}" if problem else ""))
            error.display = bool(problem)
        others = self.query_one("#other-errors", Static)
        listed = [f"{k or '(top level)'}: {m}" for k, m in errors.items()]
        others.update(Text("elsewhere: " + "; ".join(listed) if listed else ""))
        others.display = bool(listed)


# -- accounts ------------------------------------------------------------------------------------


class TableScreen(Screen[None]):
    """A table with a status line: the base of the accounts screens and read-only views."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("r", "reload", "Reload"),
    ]
    heading = ""
    columns: tuple[str, ...] = ()

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(Text(self.heading, style="bold"), id="heading")
        yield DataTable(id="table", cursor_type="row", zebra_stripes=True)
        yield Static("", id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.title = f"mailroom: {self.heading}"
        self.query_one(DataTable).add_columns(*self.columns)
        self.action_reload()

    def action_reload(self) -> None:
        table = self.query_one(DataTable)
        table.clear()
        try:
            for key, row in self.rows():
                table.add_row(*row, key=key)
        except (MailroomError, OSError) as err:
            self.say(f"error: {err}")

    def rows(self) -> list[tuple[str, Sequence[str | Text]]]:
        return []

    def say(self, message: str) -> None:
        self.query_one("#status", Static).update(Text(message))

    def selected(self) -> str | None:
        table = self.query_one(DataTable)
        if table.row_count == 0:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
        return key.value

    def settings(self) -> Settings:
        app = _config_app(self)
        return app.settings()

    def change(self, work: Callable[[], str]) -> str | None:
        """Run an accounts change; say what it did, or return the problem in words."""
        try:
            done = work()
        except (MailroomError, OSError, ValueError) as err:
            return str(err)
        self.action_reload()
        self.say(done)
        return None

    def form(
        self,
        title: str,
        inputs: Sequence[tuple[str, str, bool]],
        submit: Callable[[dict[str, str]], str],
    ) -> None:
        self.app.push_screen(FormScreen(title, inputs, lambda v: self.change(lambda: submit(v))))

    def confirm(self, question: str, work: Callable[[], str]) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                problem = self.change(work)
                if problem:
                    self.say(f"error: {problem}")

        self.app.push_screen(ConfirmScreen(question), answered)


class DomainsScreen(TableScreen):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("a", "add", "Add"),
        Binding("d", "delete", "Delete"),
    ]
    heading = "Local domains"
    columns = ("domain",)

    def rows(self) -> list[tuple[str, Sequence[str | Text]]]:
        with ctl._accounts(self.settings()) as accounts:
            return [(name, (ctl._show_domain(name),)) for name in accounts.list_domains()]

    def action_add(self) -> None:
        def add(values: dict[str, str]) -> str:
            with ctl._accounts(self.settings()) as accounts:
                added = accounts.add_domain(values["domain"])
            return f"added domain {ctl._show_domain(added)}"

        self.form("Add a domain", [("domain", "example.org", False)], add)

    def action_delete(self) -> None:
        name = self.selected()
        if name is None:
            return

        def delete() -> str:
            with ctl._accounts(self.settings()) as accounts:
                accounts.del_domain(name)
            return f"deleted domain {ctl._show_domain(name)}"

        self.confirm(f"Delete the domain {name} (it must have no users or aliases)? y/n", delete)


def _size(text: str) -> int:
    import click

    try:
        return ctl.ByteSize().convert(text.strip() or "0", None, None)
    except click.BadParameter as err:
        raise ValueError(err.message) from None


class UsersScreen(TableScreen):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("a", "add", "Add"),
        Binding("x", "toggle_enabled", "Disable/enable"),
        Binding("p", "password", "Password"),
        Binding("q", "quota", "Quota"),
    ]
    heading = "Users (mailboxes)"
    columns = ("address", "state", "quota")

    def rows(self) -> list[tuple[str, Sequence[str | Text]]]:
        with ctl._accounts(self.settings()) as accounts:
            users = accounts.list_users()
        return [
            (
                str(u.address),
                (
                    str(u.address),
                    "enabled" if u.enabled else "disabled",
                    ctl._show_size(u.quota_bytes),
                ),
            )
            for u in users
        ]

    def action_add(self) -> None:
        def add(values: dict[str, str]) -> str:
            password = _new_password(values)
            quota = _size(values["quota"])
            with ctl._accounts(self.settings()) as accounts:
                added = accounts.add_user(values["address"].strip(), password, quota)
            return f"added user {added.address}"

        self.form(
            "Add a user",
            [
                ("address", "user@example.org", False),
                ("password", "password", True),
                ("again", "password again", True),
                ("quota", "quota, e.g. 2G (empty: none)", False),
            ],
            add,
        )

    def action_toggle_enabled(self) -> None:
        address = self.selected()
        if address is None:
            return

        def toggle() -> str:
            with ctl._accounts(self.settings()) as accounts:
                user = ctl._existing_user(accounts, address)
                accounts.set_enabled(address, not user.enabled)
            return f"{'disabled' if user.enabled else 'enabled'} user {user.address}"

        self.say(self.change(toggle) or "")

    def action_password(self) -> None:
        address = self.selected()
        if address is None:
            return

        def passwd(values: dict[str, str]) -> str:
            with ctl._accounts(self.settings()) as accounts:
                user = ctl._existing_user(accounts, address)
                accounts.set_password(str(user.address), _new_password(values))
            return f"changed the password of {user.address}"

        self.form(
            f"New password for {address}",
            [("password", "password", True), ("again", "password again", True)],
            passwd,
        )

    def action_quota(self) -> None:
        address = self.selected()
        if address is None:
            return

        def quota(values: dict[str, str]) -> str:
            size = _size(values["quota"])
            with ctl._accounts(self.settings()) as accounts:
                accounts.set_quota(address, size)
            return f"set the quota of {address} to {ctl._show_size(size)}"

        self.form(f"Quota of {address}", [("quota", "e.g. 2G, 500M; 0: none", False)], quota)


def _new_password(values: dict[str, str]) -> str:
    if values["password"] != values["again"]:
        raise ValueError("the two passwords differ")
    return values["password"]


class AliasesScreen(TableScreen):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("a", "add", "Add"),
        Binding("d", "delete", "Delete"),
    ]
    heading = "Aliases (@domain: catch-all)"
    columns = ("alias", "targets")

    def rows(self) -> list[tuple[str, Sequence[str | Text]]]:
        with ctl._accounts(self.settings()) as accounts:
            return [(src, (src, ", ".join(targets))) for src, targets in accounts.list_aliases()]

    def action_add(self) -> None:
        def add(values: dict[str, str]) -> str:
            targets = [t.strip() for t in values["targets"].split(",") if t.strip()]
            with ctl._accounts(self.settings()) as accounts:
                accounts.add_alias(values["alias"].strip(), targets)
            return f"added alias {values['alias'].strip()}"

        self.form(
            "Add an alias",
            [
                ("alias", "alias@example.org or @example.org", False),
                ("targets", "targets, comma-separated", False),
            ],
            add,
        )

    def action_delete(self) -> None:
        source = self.selected()
        if source is None:
            return

        def delete() -> str:
            with ctl._accounts(self.settings()) as accounts:
                accounts.del_alias(source)
            return f"deleted alias {source}"

        self.confirm(f"Delete the alias {source}? y/n", delete)


# -- read-only views -----------------------------------------------------------------------------


class TLSScreen(Screen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("r", "reload", "Reload"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll():
            yield Static("", id="tls")
        yield Footer()

    def on_mount(self) -> None:
        self.title = "mailroom: TLS status"
        self.action_reload()

    def action_reload(self) -> None:
        from mailroom import certs

        app = _config_app(self)
        try:
            lines = certs.status_lines(certs.status(app.settings()))
        except (MailroomError, OSError) as err:
            lines = [f"error: {err}"]
        self.query_one("#tls", Static).update(Text("\n".join(lines)))


class DNSScreen(TableScreen):
    heading = "DNS records, as published (r: check again)"
    columns = ("domain", "record", "status", "to do")

    def action_reload(self) -> None:
        self.query_one(DataTable).clear()
        self.say("asking the DNS...")
        self.run_worker(self._check(), exclusive=True, group="dns")

    async def _check(self) -> None:
        from mailroom import dnsrecords

        app = _config_app(self)
        table = self.query_one(DataTable)
        try:
            settings = app.settings()
            with ctl._accounts(settings) as accounts:
                domains = accounts.list_domains()
            resolver = app.resolver_factory(settings)
            for domain in domains:
                found = dnsrecords.generate(settings, domain)
                for n, finding in enumerate(await dnsrecords.check(settings, found, resolver)):
                    style = {"ok": "green", "wrong": "red", "missing": "yellow"}
                    status = Text(str(finding.status), style=style.get(finding.status, ""))
                    table.add_row(
                        domain,
                        finding.record,
                        status,
                        finding.todo[:60],
                        key=f"{domain}:{n}",
                    )
        except (MailroomError, OSError) as err:
            self.say(f"error: {err}")
            return
        self.say("" if domains else "no local domains")


class QueueScreen(TableScreen):
    heading = "Outbound queue"
    columns = ("id", "sender", "recipient", "state", "tries", "next", "last error")

    def rows(self) -> list[tuple[str, Sequence[str | Text]]]:
        from mailroom import deliver

        found: list[tuple[str, Sequence[str | Text]]] = []
        for row in deliver.queue_rows(self.settings()):
            for n, rcpt in enumerate(row["recipients"]):
                due = rcpt["state"] in ("pending", "deferred")
                found.append(
                    (
                        f"{row['id']}:{n}",
                        (
                            row["id"] if n == 0 else "",
                            (row["sender"] or "<>") if n == 0 else "",
                            rcpt["address"],
                            rcpt["state"],
                            str(rcpt["attempts"]),
                            ctl._when(rcpt["next_attempt"]) if due else "",
                            rcpt["last_error"][:60],
                        ),
                    )
                )
        self.say(f"{len(found)} recipient(s) queued" if found else "the queue is empty")
        return found


class ServicesScreen(TableScreen):
    heading = "Services: listening (socket) and running (service)"
    columns = ("unit", "port", "listening", "running", "from")

    def action_reload(self) -> None:
        self.run_worker(self._probe(), exclusive=True, group="services")

    async def _probe(self) -> None:
        app = _config_app(self)
        states = await asyncio.to_thread(
            probes.service_states, probes.SERVICES, app.unit_states, app.probe
        )
        table = self.query_one(DataTable)
        table.clear()
        for s in states:
            listening = Text(s.listening, style="green" if s.listening == "yes" else "red")
            table.add_row(s.unit, str(s.port or ""), listening, s.running, s.source, key=s.unit)


# -- the application -----------------------------------------------------------------------------


class ConfigApp(App[None]):
    """The configuration TUI for the file at ``path``; the outside world injectable."""

    TITLE = "mailroom configuration"
    CSS = """
    .row { height: 1; }
    .row .name { width: 30; padding: 0 1; }
    .row Input { border: none; height: 1; padding: 0 1; width: 1fr; }
    .row Input:focus { background: $accent 30%; }
    .error { color: $error; padding: 0 1; }
    #dialog { width: 76; height: auto; max-height: 22; border: round $accent;
              padding: 0 1; background: $panel; }
    #dialog Input { margin: 0; }
    #body { height: auto; max-height: 16; }
    ModalScreen { align: center middle; }
    #help { width: 78; height: 22; border: round $accent; background: $panel; }
    #status { height: auto; padding: 0 1; }
    #heading { padding: 0 1; }
    DataTable { height: 1fr; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+s", "save", "Save"),
        Binding("f1", "help", "Help"),
        Binding("ctrl+q", "leave", "Quit", priority=True),
    ]

    def __init__(
        self,
        path: Path,
        *,
        unit_states: probes.UnitStates = probes.systemd_states,
        probe: probes.PortProbe = probes.tcp_listening,
        resolver_factory: ResolverFactory = Resolver.from_settings,
    ) -> None:
        super().__init__()
        self.path = path
        self.document = ConfigDocument(path)
        self.sections = sections()
        self.unit_states = unit_states
        self.probe = probe
        self.resolver_factory = resolver_factory
        self.sub_title = str(path)

    def on_mount(self) -> None:
        self.push_screen(MenuScreen())

    def settings(self) -> Settings:
        """The configuration saved in the file (what the services and mailroomctl use)."""
        return load_settings(self.path)

    def open(self, choice: str) -> None:
        if choice.startswith("section:"):
            name = choice.removeprefix("section:")
            section = next(s for s in self.sections if s.name == name)
            self.push_screen(SectionScreen(section, self.document))
            return
        views: dict[str, Callable[[], Screen[None]]] = {
            "domains": DomainsScreen,
            "users": UsersScreen,
            "aliases": AliasesScreen,
            "tls": TLSScreen,
            "dns": DNSScreen,
            "queue": QueueScreen,
            "services": ServicesScreen,
        }
        self.push_screen(views[choice]())

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_save(self) -> None:
        if isinstance(self.screen, ModalScreen):
            return
        if not self.document.changed:
            self.notify("nothing to save: the file has no changes", timeout=3)
            return
        problems = self.document.errors()
        if problems:
            listed = "; ".join(f"{k or '(top level)'}: {m}" for k, m in problems.items())
            self.notify(f"not saved, fix first: {listed}", severity="error", timeout=6)
            return
        diff = Text()
        for line in self.document.diff().splitlines():
            style = "green" if line.startswith("+") else "red" if line.startswith("-") else ""
            diff.append(line + "\n", style=style)
        self.push_screen(ConfirmScreen(f"Save to {self.path}? y/n", diff), self._save_answered)

    def _save_answered(self, yes: bool | None) -> None:
        if not yes:
            return
        try:
            backup = self.document.save()
        except MailroomError as err:
            self.notify(str(err), severity="error", timeout=8)
            return
        kept = f"; the previous file is {backup}" if backup else ""
        self.notify(f"saved {self.path}{kept}", timeout=5)

    def action_leave(self) -> None:
        if not self.document.changed:
            self.exit()
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.exit()

        self.push_screen(ConfirmScreen("Quit without saving the changes? y/n"), answered)


def run(path: Path) -> None:
    """Run the TUI on the terminal for the configuration file at ``path``."""
    ConfigApp(path).run()
