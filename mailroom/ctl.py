"""``mailroomctl``: the administrator's command line for domains, users, aliases, config and
the users' mail indexes.

Each command loads the settings (``$CONFIG_PATH``), opens the accounts database, does one
thing and says what it did. ``main`` turns every ``MailroomError`` into one message on stderr
and exit status 1, never a traceback. Mail is deleted only when the admin says so.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import click

from mailroom import __version__, dnsctl
from mailroom.accounts import Accounts, User
from mailroom.addresses import Address, normalise_domain, parse_address
from mailroom.config import ENV_PREFIX, Settings, config_path, load_settings
from mailroom.errors import ExistsError, MailroomError, NotFoundError
from mailroom.maildir import Maildir
from mailroom.mailstore import MailStore

PROG = "mailroomctl"
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([kmgt])(?:i?b)?|b)?", re.IGNORECASE)


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit status is 0 on success, 1 on error, 2 on a usage error."""
    try:
        result = cli.main(args=argv, prog_name=PROG, standalone_mode=False)
    except click.ClickException as err:
        err.show()
        return err.exit_code
    except click.Abort:
        click.echo("Aborted.", err=True)
        return 1
    except MailroomError as err:
        click.echo(f"{PROG}: {err}", err=True)
        return 1
    return result if isinstance(result, int) else 0


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name=PROG)
def cli() -> None:
    """Administer mailroom: domains, users, aliases and the configuration.

    The configuration file is $CONFIG_PATH (default /etc/mailroom/config.toml).
    """


# One @cli.group() per noun. The later groups of design.md (setup, dkim, dns, tls, queue)
# join as groups of their own in the same shape; `config edit` joins `config`.

# dns records|check|publish and client-config live in mailroom/dnsctl.py.
cli.add_command(dnsctl.dns_group)
cli.add_command(dnsctl.client_config)


# -- config ----------------------------------------------------------------------------------


@cli.group()
def config() -> None:
    """Check or edit the configuration."""


@config.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of TOML.")
def config_check(as_json: bool) -> None:
    """Validate the configuration and print the effective settings (secrets masked)."""
    path = config_path()
    settings = load_settings(path)
    data = settings.redacted()
    if as_json:
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    click.echo(f"# {path}: configuration is valid")
    overrides = sorted(name for name in os.environ if name.startswith(ENV_PREFIX))
    if overrides:
        click.echo(f"# overridden from the environment: {', '.join(overrides)}")
    click.echo("# effective settings, defaults included:")
    click.echo("\n".join(_toml(data)))


@config.command("edit")
def config_edit() -> None:
    """Edit the configuration, domains, users and aliases in a terminal UI (textual).

    Every change is checked as you type; Ctrl+S shows the diff and saves, keeping comments and
    the previous file as config.toml.bak. Also shows TLS, DNS, queue and service status.
    """
    try:  # textual loads only here: the other commands start fast without it
        from mailroom.tui import app
    except ImportError as err:
        raise MailroomError(
            f"config edit needs textual and tomlkit ({err.name} is missing):"
            " apt install python3-textual python3-tomlkit"
        ) from None
    if not sys.stdin.isatty() or not sys.stdout.isatty():
        raise click.UsageError("config edit needs a terminal")
    app.run(config_path())


# -- domain ----------------------------------------------------------------------------------


@cli.group()
def domain() -> None:
    """Add, delete and list the local mail domains."""


@domain.command("add")
@click.argument("name")
def domain_add(name: str) -> None:
    """Add a local domain (mail for it is accepted and stored here)."""
    with _accounts(load_settings()) as accounts:
        added = accounts.add_domain(name)
    click.echo(f"added domain {_show_domain(added)}")


@domain.command("del")
@click.argument("name")
def domain_del(name: str) -> None:
    """Delete a domain that has no users and no aliases left."""
    with _accounts(load_settings()) as accounts:
        accounts.del_domain(name)
    click.echo(f"deleted domain {_show_domain(normalise_domain(name))}")


@domain.command("list")
def domain_list() -> None:
    """List the local domains."""
    with _accounts(load_settings()) as accounts:
        for name in accounts.list_domains():
            click.echo(_show_domain(name))


# -- user ------------------------------------------------------------------------------------

_password_stdin = click.option(
    "--password-stdin",
    is_flag=True,
    help="Read the password from the first line of standard input instead of asking.",
)


class ByteSize(click.ParamType):
    """A number of bytes: ``1048576``, ``500M``, ``2G``, ``1.5GiB`` (powers of 1024); 0 = none."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        match = _SIZE_RE.fullmatch(str(value).strip())
        if match is None:
            self.fail(f"{value!r} is not a size such as 500M, 2G or 1048576", param, ctx)
        return int(Decimal(match[1]) * _UNITS[(match[2] or "").lower()])


@cli.group()
def user() -> None:
    """Add, delete, list and change mail users."""


@user.command("add")
@click.argument("address")
@_password_stdin
@click.option("--quota", type=ByteSize(), default=0, help="Mailbox size limit, e.g. 2G (0 = none).")
def user_add(address: str, password_stdin: bool, quota: int) -> None:
    """Add a user (mailbox) in a local domain."""
    with _accounts(load_settings()) as accounts:
        addr = parse_address(address, allow_plus=False)
        # Say what is wrong before asking for a password, not after.
        if not accounts.is_local_domain(addr.domain):
            raise NotFoundError(f"domain {addr.domain} does not exist; add it first")
        if accounts.get_user(addr) is not None:
            raise ExistsError(f"user {addr} already exists")
        password = _read_password(password_stdin)
        added = accounts.add_user(str(addr), password, quota)
    click.echo(f"added user {added.address}")


@user.command("del")
@click.argument("address")
@click.option("--delete-mail", is_flag=True, help="Also delete the user's mail, without asking.")
def user_del(address: str, delete_mail: bool) -> None:
    """Delete a user; the mail is kept unless you confirm or pass --delete-mail."""
    settings = load_settings()
    with _accounts(settings) as accounts:
        existing = _existing_user(accounts, address)
        maildir = _maildir(settings, existing.address)
        remove = delete_mail
        if not remove and maildir.exists() and sys.stdin.isatty():
            remove = click.confirm(f"Also delete the mail in {maildir}?", default=False)
        if remove:
            _check_removable(settings, maildir)  # before anything is deleted
        deleted = accounts.del_user(str(existing.address))
        pointing = [
            source
            for source, targets in accounts.list_aliases()
            if any(parse_address(t).base == deleted.address for t in targets)
        ]
    click.echo(f"deleted user {deleted.address}")
    if pointing:
        click.echo(f"note: these aliases still point to {deleted.address}: {', '.join(pointing)}")
    if not maildir.exists():
        return
    if remove:
        try:
            shutil.rmtree(maildir)
        except OSError as err:
            raise MailroomError(f"could not delete the mail in {maildir}: {err}") from None
        click.echo(f"deleted the mail in {maildir}")
    else:
        click.echo(f"kept the mail in {maildir}")


@user.command("passwd")
@click.argument("address")
@_password_stdin
def user_passwd(address: str, password_stdin: bool) -> None:
    """Set a user's password."""
    with _accounts(load_settings()) as accounts:
        existing = _existing_user(accounts, address)
        accounts.set_password(str(existing.address), _read_password(password_stdin))
    click.echo(f"changed the password of {existing.address}")


@user.command("list")
@click.argument("domain", required=False)
def user_list(domain: str | None) -> None:
    """List the users, of all domains or of DOMAIN."""
    with _accounts(load_settings()) as accounts:
        users = accounts.list_users(domain)
    for entry in users:
        state = "enabled" if entry.enabled else "disabled"
        click.echo(f"{entry.address}\t{state}\tquota {_show_size(entry.quota_bytes)}")


@user.command("disable")
@click.argument("address")
def user_disable(address: str) -> None:
    """Suspend a user: no logins, and new mail is refused (550 5.2.1); stored mail is kept."""
    with _accounts(load_settings()) as accounts:
        accounts.set_enabled(address, False)
    click.echo(f"disabled user {parse_address(address)}")


@user.command("enable")
@click.argument("address")
def user_enable(address: str) -> None:
    """Let a suspended user log in and receive mail again."""
    with _accounts(load_settings()) as accounts:
        accounts.set_enabled(address, True)
    click.echo(f"enabled user {parse_address(address)}")


@user.command("quota")
@click.argument("address")
@click.argument("size", type=ByteSize())
def user_quota(address: str, size: int) -> None:
    """Set a user's mailbox size limit, e.g. 2G (0 = none)."""
    with _accounts(load_settings()) as accounts:
        accounts.set_quota(address, size)
    click.echo(f"set the quota of {parse_address(address)} to {_show_size(size)}")


# -- setup ---------------------------------------------------------------------------------


@cli.command("setup")
@click.option(
    "--non-interactive", is_flag=True, help="Ask nothing; take every answer from options."
)
@click.option("--hostname", help="The mail host's fully qualified name (MX target, TLS name).")
@click.option(
    "--domain", "domain_name", help="The mail domain (default: hostname minus its first label)."
)
@click.option("--user", "user_address", help="The first user, user@domain.")
@click.option(
    "--data-dir", help="Where all state lives (default: the config's, or /var/lib/mailroom)."
)
@click.option(
    "--certbot/--no-certbot",
    default=None,
    help="Get a Let's Encrypt certificate with `tls issue` (the self-signed one stays if it"
    " fails). Interactive default: ask.",
)
@click.option(
    "--publish-dns",
    type=click.Choice(["rfc2136", "cloudflare"]),
    help="Publish the domain's records with `dns publish` through this provider.",
)
@_password_stdin
def setup_command(
    non_interactive: bool,
    hostname: str | None,
    domain_name: str | None,
    user_address: str | None,
    data_dir: str | None,
    certbot: bool | None,
    publish_dns: str | None,
    password_stdin: bool,
) -> int:
    """First-run wizard: config, directories, domain and first user, DKIM, TLS, DNS records.

    Safe to run again: whatever is done already is left as it is.
    """
    from dataclasses import replace

    from mailroom import setup

    path = config_path()
    current = setup.current_config(path)
    known_host = str(current.get("hostname") or "")
    if known_host == setup.PLACEHOLDER_HOSTNAME:
        known_host = ""
    data_dir = data_dir or str(current.get("data_dir") or setup.DEFAULT_DATA_DIR)
    if non_interactive:
        if not hostname:
            raise click.UsageError("--non-interactive needs --hostname")
        if not user_address:
            raise click.UsageError("--non-interactive needs --user")
        host = setup.check_hostname(hostname)
        answers = setup.checked(host, domain_name or setup.domain_of(host), user_address, data_dir)
        exists = setup.user_exists(answers.data_dir, answers.user)
        password = _read_password(True) if password_stdin else None
        if password is None and not exists:
            raise click.UsageError(f"--password-stdin is needed to add the user {answers.user}")
        answers = replace(answers, password=password)
    else:
        if not sys.stdin.isatty():
            raise click.UsageError("no terminal to ask questions on; use --non-interactive")
        host = setup.check_hostname(
            click.prompt(
                "Host name", default=hostname or known_host or setup.default_hostname() or None
            )
        )
        dom = click.prompt("Mail domain", default=domain_name or setup.domain_of(host))
        dom = normalise_domain(dom)
        login = os.environ.get("SUDO_USER") or os.environ.get("USER") or ""
        local = login if login and login != "root" else "postmaster"
        address = click.prompt("First user", default=user_address or f"{local}@{dom}")
        answers = setup.checked(host, dom, address, data_dir)
        change = False
        if setup.user_exists(answers.data_dir, answers.user):
            change = click.confirm(f"{answers.user} exists; set a new password?", default=False)
            password = _read_password(password_stdin) if change else None
        else:
            password = _read_password(password_stdin)
        answers = replace(answers, password=password, change_password=change)
        if certbot is None:
            certbot = click.confirm(
                "Get a Let's Encrypt certificate now with certbot (needs DNS pointing here,"
                " and port 80 free or DNS API credentials)?",
                default=False,
            )
    _, logged_in = setup.run(answers, path, echo=click.echo, become_owner=_become_owner)
    if certbot:
        _setup_step("Let's Encrypt certificate", "the self-signed certificate stays", tls_issue)
    if publish_dns:
        _setup_step(
            f"publishing the DNS records of {answers.domain} ({publish_dns})",
            "publish them by hand (above), or run `dns publish` again",
            dnsctl.dns_publish,
            domain_name=answers.domain,
            provider=publish_dns,
        )
    if not logged_in:
        raise MailroomError(f"{answers.user} cannot log in with the password given")
    return 0


def _setup_step(what: str, otherwise: str, command: click.Command, **values: object) -> None:
    """Run another mailroomctl command as a step of setup, with its defaults and ``values``;
    a failure is reported and setup goes on (what it made already works)."""
    click.echo(f"setup: {what}")
    ctx = click.get_current_context()
    params: dict[str, object] = {}
    for param in command.params:
        if param.name is not None:
            value = param.get_default(ctx)
            many = param.nargs == -1 or getattr(param, "multiple", False)
            params[param.name] = () if value is None and many else value
    try:
        ctx.invoke(command, **{**params, **values})
    except MailroomError as err:
        click.echo(f"setup: {what} failed: {err}; {otherwise}")


# -- alias -----------------------------------------------------------------------------------


@cli.group()
def alias() -> None:
    """Add, delete and list aliases (ALIAS is user@domain, or @domain for a catch-all)."""


@alias.command("add")
@click.argument("source", metavar="ALIAS")
@click.argument("targets", metavar="TARGET...", nargs=-1, required=True)
def alias_add(source: str, targets: tuple[str, ...]) -> None:
    """Deliver mail for ALIAS to each TARGET (local users or aliases)."""
    with _accounts(load_settings()) as accounts:
        accounts.add_alias(source, list(targets))
    click.echo(f"added alias {source} -> {', '.join(targets)}")


@alias.command("del")
@click.argument("source", metavar="ALIAS")
@click.argument("targets", metavar="[TARGET]...", nargs=-1)
def alias_del(source: str, targets: tuple[str, ...]) -> None:
    """Delete the given TARGETs of ALIAS, or the whole alias when none are given."""
    with _accounts(load_settings()) as accounts:
        if not targets:
            accounts.del_alias(source)
            click.echo(f"deleted alias {source}")
        for target in targets:
            accounts.del_alias(source, target)
            click.echo(f"deleted alias {source} -> {target}")


@alias.command("list")
def alias_list() -> None:
    """List the aliases and where they deliver."""
    with _accounts(load_settings()) as accounts:
        for source, targets in accounts.list_aliases():
            click.echo(f"{source} -> {', '.join(targets)}")


# -- index -----------------------------------------------------------------------------------


@cli.group()
def index() -> None:
    """Rebuild a user's mail index (the UIDs, flags and mod-sequences IMAP and POP3 serve)."""


@index.command("rebuild")
@click.argument("address")
def index_rebuild(address: str) -> None:
    """Recreate the mail index of ADDRESS from the Maildir.

    Every message and flag is kept, and so are the UIDs the Maildir still records, so IMAP
    clients need not download anything again. Safe while mail arrives and clients are
    connected.
    """
    settings = load_settings()
    with _accounts(settings) as accounts:
        existing = _existing_user(accounts, address)
    path = _maildir(settings, existing.address)
    if not path.is_dir():
        raise MailroomError(f"{existing.address} has no mail yet ({path} does not exist)")
    _become_owner(path)
    maildir = Maildir.for_address(settings.mail_root, existing.address, settings.hostname)
    with MailStore(maildir) as store:
        mailboxes, messages = store.rebuild()
    click.echo(
        f"rebuilt the mail index of {existing.address}: {mailboxes} mailbox(es),"
        f" {messages} message(s)"
    )


# -- dkim ------------------------------------------------------------------------------------


@cli.group("dkim")
def dkim_group() -> None:
    """Create and show the DKIM keys that sign the mail a domain sends."""


@dkim_group.command("generate")
@click.argument("domain_name", metavar="DOMAIN")
def dkim_generate(domain_name: str) -> None:
    """Create an RSA-2048 and an Ed25519 key for DOMAIN and print their DNS records."""
    from mailroom import dkim, dnsrecords

    settings = load_settings()
    name = normalise_domain(domain_name)
    with _accounts(settings) as accounts:
        if name not in accounts.list_domains():
            raise NotFoundError(f"domain {_show_domain(name)} is not a local domain; add it first")
    settings.dkim_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _become_owner(settings.data_dir)
    keys = dkim.generate(settings.dkim_dir, name)
    click.echo(f"created {len(keys)} DKIM key(s) for {_show_domain(name)}; publish in DNS:")
    for record, value in dkim.dns_records(keys):
        click.echo(f"{record}. IN TXT {dnsrecords.txt(value)}")


@dkim_group.command("show")
@click.argument("domain_name", metavar="DOMAIN")
def dkim_show(domain_name: str) -> None:
    """Print the DNS TXT records of DOMAIN's DKIM keys."""
    from mailroom import dkim, dnsrecords

    settings = load_settings()
    name = normalise_domain(domain_name)
    keys = dkim.load_keys(settings.dkim_dir, name)
    if not keys:
        raise NotFoundError(
            f"{_show_domain(name)} has no DKIM keys; create them: {PROG} dkim generate {name}"
        )
    for record, value in dkim.dns_records(keys):
        click.echo(f"{record}. IN TXT {dnsrecords.txt(value)}")


# -- tls -------------------------------------------------------------------------------------


@cli.group("tls")
def tls_group() -> None:
    """Let's Encrypt certificates through certbot: issue, install, status."""


@tls_group.command("issue", context_settings={"ignore_unknown_options": True})
@click.option(
    "--method",
    type=click.Choice(["dns-cloudflare", "standalone", "webroot", "dns-rfc2136"]),
    help="How to prove the hostname (default: [certbot] method, else chosen: see below).",
)
@click.option(
    "--credentials",
    type=click.Path(path_type=Path),
    help="The DNS plugin's credentials file, mode 0600 (Cloudflare: dns_cloudflare_api_token).",
)
@click.option("--webroot-path", type=click.Path(path_type=Path), help="Web server document root.")
@click.option("--email", help="Address for Let's Encrypt's expiry mail.")
@click.option("--staging", is_flag=True, help="Use Let's Encrypt's staging server (a test).")
@click.option("--server", help="ACME directory URL (default: Let's Encrypt).")
@click.option("--http-01-port", type=int, help="Standalone: port to listen on (default 80).")
@click.option("--http-01-address", help="Standalone: address to listen on (default all).")
@click.option("--config-dir", type=click.Path(path_type=Path), help="certbot's config dir.")
@click.option("--work-dir", type=click.Path(path_type=Path), help="certbot's work dir.")
@click.option("--logs-dir", type=click.Path(path_type=Path), help="certbot's logs dir.")
@click.option("--dry-run", is_flag=True, help="Check and print the certbot command; run nothing.")
@click.argument("certbot_args", nargs=-1, type=click.UNPROCESSED)
def tls_issue(
    method: str | None,
    credentials: Path | None,
    webroot_path: Path | None,
    email: str | None,
    staging: bool,
    server: str | None,
    http_01_port: int | None,
    http_01_address: str | None,
    config_dir: Path | None,
    work_dir: Path | None,
    logs_dir: Path | None,
    dry_run: bool,
    certbot_args: tuple[str, ...],
) -> None:
    """Get a certificate for the mail hostname from Let's Encrypt with certbot and install it.

    \b
    Methods (options override the [certbot] section of the configuration):
      dns-cloudflare  DNS-01 through the Cloudflare API: no port 80 needed
      standalone      HTTP-01, certbot listens on port 80 (it must be free)
      webroot         HTTP-01 through the web server already on port 80
    Without --method: Cloudflare credentials configured -> dns-cloudflare; a webroot
    configured -> webroot; port 80 free -> standalone; else it says what to do.
    certbot's own timer renews the certificate and runs `mailroomctl tls deploy-hook`.
    Arguments after -- go to certbot unchanged.
    """
    from mailroom import certs

    settings = load_settings()
    cb = settings.certbot
    port = http_01_port or cb.http_01_port
    address = cb.http_01_address if http_01_address is None else http_01_address
    cloudflare, rfc2136 = cb.cloudflare_credentials, cb.rfc2136_credentials
    webroot = webroot_path or cb.webroot_path
    chosen = method or cb.method
    if chosen is None and credentials is not None:
        chosen = "dns-cloudflare"
    if chosen is None:
        chosen = certs.choose_method(
            cloudflare_credentials=cloudflare,
            rfc2136_credentials=rfc2136,
            webroot_path=webroot,
            http_01_port=port,
            http_01_address=address,
        )
    how = certs.Method(chosen)
    if credentials is None:
        credentials = cloudflare if how is certs.Method.DNS_CLOUDFLARE else rfc2136
    request = certs.IssueRequest(
        hostname=settings.hostname,
        method=how,
        deploy_hook=certs.deploy_hook_command(),
        cert_name=cb.cert_name,
        email=cb.email if email is None else email,
        credentials=credentials,
        webroot_path=webroot,
        http_01_port=port,
        http_01_address=address,
        server=cb.server if server is None else server,
        staging=staging,
        config_dir=config_dir or cb.config_dir,
        work_dir=work_dir or cb.work_dir,
        logs_dir=logs_dir or cb.logs_dir,
        extra_args=certbot_args,
    )
    certs.check_request(request)
    argv = certs.issue_command(request)
    click.echo(f"running: {shlex.join(argv)}", err=True)
    if dry_run:
        return
    certs.run_certbot(argv)
    # certbot has run the hook when it issued; when it kept a certificate not yet due for
    # renewal it has not: install the lineage (unchanged if the hook did).
    installed = certs.install(settings, certs.lineage_dir(request.config_dir, request.cert_name))
    click.echo(
        f"installed the certificate for {', '.join(installed.info.names)}"
        f" (valid until {installed.info.not_after:%Y-%m-%d}) as {settings.tls_cert}"
    )


@tls_group.command("deploy-hook")
@click.option(
    "--lineage",
    type=click.Path(path_type=Path),
    help="certbot's live/NAME directory (default: $RENEWED_LINEAGE, set by certbot).",
)
def tls_deploy_hook(lineage: Path | None) -> None:
    """Install a certbot lineage's certificate and key (what certbot runs after issue and
    renewal). Checked first: the key matches, the certificate is valid now and names the
    hostname; on any problem the pair in use is kept and the exit status is 1."""
    from mailroom import certs

    if lineage is None:
        renewed = os.environ.get("RENEWED_LINEAGE")
        if not renewed:
            raise click.UsageError("no lineage: certbot sets $RENEWED_LINEAGE, or use --lineage")
        lineage = Path(renewed)
    settings = load_settings()
    try:
        installed = certs.install(settings, lineage)
    except certs.CertError as err:
        raise certs.CertError(f"tls deploy-hook: refused: {err}; kept the pair in use") from None
    info = installed.info
    what = "installed" if installed.changed else "unchanged:"
    click.echo(
        f"{what} certificate for {', '.join(info.names)}, valid until"
        f" {info.not_after:%Y-%m-%d}, in {settings.tls_cert}"
    )


@tls_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def tls_status(as_json: bool) -> None:
    """The certificate in use: names, issuer, days left, where it is served, renewal."""
    from mailroom import certs

    data = certs.status(load_settings())
    if as_json:
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    for line in certs.status_lines(data):
        click.echo(line)


# -- queue -----------------------------------------------------------------------------------


@cli.group("queue")
def queue_group() -> None:
    """Look at and act on the outbound queue (mail waiting to be sent)."""


@queue_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def queue_list(as_json: bool) -> None:
    """Every queued message: id, sender, recipients, attempts, next try, last error."""
    from mailroom import deliver

    rows = deliver.queue_rows(load_settings())
    if as_json:
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    if not rows:
        click.echo("the queue is empty")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for column in ("id", "sender", "recipient", "state", "attempts", "next try"):
        table.add_column(column, no_wrap=True)
    table.add_column("last error")
    for row in rows:
        for n, rcpt in enumerate(row["recipients"]):
            table.add_row(
                row["id"] if n == 0 else "",
                (row["sender"] or "<>") if n == 0 else "",
                rcpt["address"],
                rcpt["state"],
                str(rcpt["attempts"]),
                _when(rcpt["next_attempt"]) if rcpt["state"] in ("pending", "deferred") else "",
                rcpt["last_error"][:80],
            )
    Console(width=max(100, shutil.get_terminal_size().columns)).print(table)


@queue_group.command("flush")
def queue_flush() -> None:
    """Retry every deferred message now."""
    from mailroom import deliver

    settings = load_settings()
    _become_owner(settings.data_dir)
    count = deliver.flush(settings)
    click.echo(f"{count} message(s) due now; mailroom-deliver sends them")


@queue_group.command("delete")
@click.argument("queue_id", metavar="ID")
def queue_delete(queue_id: str) -> None:
    """Remove message ID from the queue without a bounce."""
    from mailroom import deliver

    settings = load_settings()
    _become_owner(settings.data_dir)
    deliver.delete(settings, queue_id)
    click.echo(f"deleted {queue_id}")


@queue_group.command("bounce")
@click.argument("queue_id", metavar="ID")
def queue_bounce(queue_id: str) -> None:
    """Give up on message ID now and send the sender a bounce."""
    from mailroom import deliver

    settings = load_settings()
    _become_owner(settings.data_dir)  # the bounce may go into a local sender's Maildir
    deliver.bounce(settings, queue_id)
    click.echo(f"bounced {queue_id}")


def _when(timestamp: float) -> str:
    import time

    left = timestamp - time.time()
    if left <= 0:
        return "now"
    return f"in {int(left // 60)} min" if left < 3600 else f"in {left / 3600:.1f} h"


def _become_owner(path: Path) -> None:
    """Run as the owner of ``path`` when started as root, so that every file the command
    writes (index, uidlists) belongs to the user the mail services run as."""
    if os.geteuid() != 0:
        return
    owner = os.stat(path)
    if owner.st_uid == 0:
        return
    os.setgroups([])
    os.setgid(owner.st_gid)
    os.setuid(owner.st_uid)


# -- helpers shared by the commands above ----------------------------------------------------


def _accounts(settings: Settings) -> Accounts:
    return Accounts(settings.auth_db)


def _existing_user(accounts: Accounts, address: str) -> User:
    found = accounts.get_user(address)
    if found is None:
        raise NotFoundError(f"user {parse_address(address)} does not exist")
    return found


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        if not line:
            raise click.UsageError("--password-stdin: standard input is empty")
        return line.removesuffix("\n").removesuffix("\r")
    if not sys.stdin.isatty():
        raise click.UsageError("no terminal to ask for the password on; use --password-stdin")
    password: str = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    return password


def _maildir(settings: Settings, address: Address) -> Path:
    """``{mail_root}/{domain}/{localpart}`` (addresses.py makes both one safe component)."""
    return settings.mail_root / address.domain / address.localpart


def _check_removable(settings: Settings, maildir: Path) -> None:
    """Refuse unless ``maildir`` is absent or a real directory inside mail_root, no symlinks."""
    if not maildir.exists() and not maildir.is_symlink():
        return
    root = settings.mail_root.resolve()
    literal = root / maildir.relative_to(settings.mail_root)
    if maildir.is_symlink() or not maildir.is_dir() or maildir.resolve() != literal:
        raise MailroomError(f"{maildir} is not a plain directory inside {root}; not deleting it")


def _show_domain(name: str) -> str:
    try:
        unicode_name = name.encode("ascii").decode("idna")
    except UnicodeError:
        return name
    return name if unicode_name == name else f"{name} ({unicode_name})"


def _show_size(size: int) -> str:
    if size == 0:
        return "unlimited"
    for unit in "TGMK":
        factor = _UNITS[unit.lower()]
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def _toml(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``data`` as TOML lines: scalars first, then one ``[table]`` per nested mapping."""
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            tables.append((prefix + key, value))
        elif value is None:
            lines.append(f"# {key} is not set")
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for name, table in tables:
        lines += ["", f"[{name}]", *_toml(table, name + ".")]
    return lines


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value)
    escaped = "".join(
        "\\" + c if c in '"\\' else f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c
        for c in text
    )
    return f'"{escaped}"'
