"""``mailroomctl dns records|check|publish`` and ``mailroomctl client-config``: the commands
(mailroom.ctl registers them). The records, the checks and the publishing live in
mailroom.dnsrecords and mailroom.dnspublish; this module parses options, loads settings and
prints. It imports only click at start-up, so that mailroomctl starts fast.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from mailroom.config import Settings, load_settings
from mailroom.errors import NotFoundError


def _local_domain(settings: Settings, name: str) -> str:
    from mailroom.accounts import Accounts
    from mailroom.addresses import normalise_domain

    domain = normalise_domain(name)
    with Accounts(settings.auth_db) as accounts:
        if not accounts.is_local_domain(domain):
            raise NotFoundError(f"domain {domain} is not a local domain; add it first")
    return domain


def _width() -> int:
    return max(120, shutil.get_terminal_size().columns)


@click.group("dns")
def dns_group() -> None:
    """The DNS records a mail domain needs: print them, check them, publish them."""


@dns_group.command("records")
@click.argument("domain_name", metavar="DOMAIN")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["zone", "json", "table"]),
    default="zone",
    show_default=True,
    help="Zone-file lines, JSON, or a table.",
)
def dns_records(domain_name: str, fmt: str) -> None:
    """Print every record DOMAIN needs: MX, A/AAAA, SPF, DKIM, DMARC, MTA-STS (and its
    policy file), TLS-RPT, SRV for mail clients, CAA; and the PTR to ask the ISP for."""
    from mailroom import dnsrecords

    settings = load_settings()
    wanted = dnsrecords.generate(settings, _local_domain(settings, domain_name))
    if fmt == "json":
        click.echo(dnsrecords.json_text(wanted), nl=False)
    elif fmt == "table":
        dnsrecords.print_table(wanted, _width())
    else:
        click.echo(dnsrecords.zone_text(wanted), nl=False)


@dns_group.command("check")
@click.argument("domain_name", metavar="DOMAIN")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON, not a table.")
def dns_check(domain_name: str, as_json: bool) -> int:
    """Ask DNS ([dns] nameservers) for each record and compare it with what DOMAIN needs.

    The exit status is 1 when a record is wrong or a required one (MX, address, SPF, DKIM,
    DMARC) is missing; a missing recommended one and a PTR that does not name the host are
    warnings.
    """
    import asyncio
    import dataclasses
    import json

    from mailroom import dnsrecords
    from mailroom.resolver import Resolver

    settings = load_settings()
    wanted = dnsrecords.generate(settings, _local_domain(settings, domain_name))
    resolver = Resolver.from_settings(settings)
    findings = asyncio.run(dnsrecords.check(settings, wanted, resolver))
    if as_json:
        rows = [{**dataclasses.asdict(f), "fails": f.fails} for f in findings]
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        dnsrecords.print_findings(findings, wanted.domain, _width())
    failing = [f for f in findings if f.fails]
    if failing:
        names = ", ".join(f"{f.record} ({f.status})" for f in failing)
        click.echo(f"dns check: {len(failing)} problem(s): {names}", err=True)
        return 1
    click.echo(f"dns check: {wanted.domain} has every required record")
    return 0


@dns_group.command("publish")
@click.argument("domain_name", metavar="DOMAIN")
@click.option(
    "--provider",
    type=click.Choice(["rfc2136", "cloudflare"]),
    required=True,
    help="RFC 2136 UPDATE with TSIG to the primary server, or Cloudflare's API.",
)
@click.option("--dry-run", is_flag=True, help="Print what would change; change nothing.")
def dns_publish(domain_name: str, provider: str, dry_run: bool) -> None:
    """Publish DOMAIN's records: only those that differ change, and records mailroom does not
    own (another TXT at the apex, another CAA issuer, ...) are never touched."""
    from mailroom import dnspublish, dnsrecords

    settings = load_settings()
    wanted = dnsrecords.generate(settings, _local_domain(settings, domain_name))
    conf = settings.dns.publish
    chosen = dnspublish.provider_for(
        provider,
        wanted,
        rfc2136_credentials=conf.rfc2136_credentials or settings.certbot.rfc2136_credentials,
        cloudflare_credentials=(
            conf.cloudflare_credentials or settings.certbot.cloudflare_credentials
        ),
        zone=conf.zone.strip().rstrip(".").lower(),
        api_url=conf.cloudflare_api_url,
    )
    plan = dnspublish.publish(wanted, chosen, conf.ttl, dry_run=dry_run)
    for line in plan.lines():
        click.echo(line)
    for kept in plan.kept:
        click.echo(f"  kept (not mailroom's): {kept.name} {kept.rdtype} {kept.rdata.to_text()}")
    if not plan.changes:
        click.echo(f"nothing to change: {plan.unchanged} record(s) already published")
    elif dry_run:
        click.echo(f"dry run: {len(plan.changes)} change(s) planned, none made")
    else:
        click.echo(f"published: {len(plan.changes)} change(s), {plan.unchanged} unchanged")
    for line in wanted.advice:
        click.echo(f"note: {line}")


@click.command("client-config")
@click.argument("address")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Directory to write config-v1.1.xml and ADDRESS.mobileconfig into.",
)
def client_config(address: str, out: Path) -> None:
    """Write mail client autoconfiguration for ADDRESS: Thunderbird's config-v1.1.xml (serve
    it at https://autoconfig.DOMAIN/mail/config-v1.1.xml) and an Apple .mobileconfig profile
    (no password in it)."""
    from mailroom import clientconfig
    from mailroom.addresses import parse_address

    settings = load_settings()
    addr = parse_address(address, allow_plus=False)
    _local_domain(settings, addr.domain)
    services = list(settings.dns.client_services)
    xml_path, profile_path = clientconfig.write(out, addr, settings.hostname, services)
    click.echo(
        f"wrote {xml_path}: serve it at https://autoconfig.{addr.domain}/mail/config-v1.1.xml"
    )
    click.echo(f"wrote {profile_path}: open it on an iPhone, iPad or Mac to add {addr}")
