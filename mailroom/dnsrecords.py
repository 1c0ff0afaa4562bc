"""The DNS records a mail domain needs: what ``mailroomctl dns records`` prints, what
``dns check`` compares with what is published, what ``dns publish`` writes, and what
``mailroomctl setup`` lists. This module is their one source of truth.

What it owns: the records themselves (``generate``), which published records mailroom
considers its own (``DomainRecords.owns``), and the rules by which a published record is
good enough (``check``). Generation reads only the configuration and the DKIM keys; checking
asks DNS through ``mailroom.resolver.Resolver`` (``[dns] nameservers``).

The records (``DOMAIN`` is the mail domain, ``HOST`` the configured ``hostname``):

- MX ``DOMAIN 10 HOST``; A/AAAA of ``HOST`` from ``[dns] ipv4``/``ipv6`` (when HOST is in
  DOMAIN's zone); SPF ``v=spf1 mx -all``, with the smarthost's ``include:`` where the relay
  is a well-known one (``RELAY_SPF``); one DKIM TXT per signing key (RSA and Ed25519); DMARC
  ``p=none`` with ``rua`` to postmaster (a start: raise it to quarantine/reject later);
- MTA-STS: ``_mta-sts`` TXT whose ``id`` is a hash of the policy text, so it changes exactly
  when the policy does, and the policy file for ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt``;
  TLS-RPT ``_smtp._tls``; SRV for client autoconfiguration (RFC 6186, RFC 8314), ``.`` as
  target for a service not in ``[dns] client_services``; CAA ``issue`` at HOST (not at the
  apex: it then governs only the mail host's certificate, never the web site's).
- PTR is advice only: the owner of the address block (the ISP) sets it.

Ownership, i.e. what ``dns publish`` may change or delete (everything else is never touched;
it looks only at the names and types below, so an old DKIM selector stays until removed by
hand): MX records whose exchange is HOST; the whole A/AAAA set of HOST (only when an address
is configured); at the apex only the TXT starting ``v=spf1``; at ``_dmarc`` only ``v=DMARC1``;
at ``_mta-sts`` only ``v=STSv1``; at ``_smtp._tls`` only ``v=TLSRPTv1``; every TXT at a
selector's ``_domainkey`` name; the whole SRV set of the six service names; CAA only the
``issue`` records naming a configured issuer.

What ``check`` calls ok, where admins legitimately differ:

- MX: HOST is among the MX hosts (other, backup, MX hosts are named but fine); A/AAAA: the
  set is exactly the configured addresses (a stray address sends mail to the wrong machine),
  or, with none configured, HOST has some address;
- SPF: exactly one ``v=spf1`` record (RFC 7208 3.2), which pyspf evaluates to ``pass`` for each
  address of the mail host, and which includes the smarthost's SPF when it is a known relay.
  ``~all``, ``ip4:``, extra includes: all fine;
- DKIM: a record at the selector with the same public key (``p=``), whatever else it says;
- DMARC: exactly one ``v=DMARC1`` record that is usable (RFC 7489 6.6.3), any policy;
- MTA-STS: the ``id`` is the one of the generated policy; TLS-RPT: one record with a ``rua``;
- SRV: an offered service points at some host on the right port (an alias name of this
  server is fine), a not offered one has no target;
- CAA: there is none (any CA may issue; reported as missing, recommended) or the set that
  applies to HOST (RFC 8659 3: HOST's, else the nearest parent's) allows a configured issuer.

``dns check`` fails (exit status 1) when any record is *wrong*, or a *required* one (MX,
address, SPF, DKIM, DMARC) is missing or could not be asked for. A missing recommended
record (MTA-STS, TLS-RPT, SRV, CAA) and a PTR that does not name HOST are warnings.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from mailroom import dkim
from mailroom.addresses import normalise_domain
from mailroom.config import Settings

if TYPE_CHECKING:
    import dns.rdata

    from mailroom.resolver import Resolver

#: Where mail clients find each service (RFC 6186 3.1, RFC 8314 5.1): name, port, priority.
#: Implicit TLS first (RFC 8314 3.3); IMAP before POP3 (RFC 6186 3.4: priority across both).
SRV_SERVICES: tuple[tuple[str, int, int], ...] = (
    ("submissions", 465, 0),
    ("submission", 587, 10),
    ("imaps", 993, 0),
    ("imap", 143, 10),
    ("pop3s", 995, 20),
    ("pop3", 110, 30),
)

#: The SPF include of well-known smarthosts: relay host (or its last labels) -> include.
RELAY_SPF: tuple[tuple[str, str], ...] = (
    ("amazonaws.com", "amazonses.com"),  # email-smtp.REGION.amazonaws.com
    ("sendgrid.net", "sendgrid.net"),
    ("mailgun.org", "mailgun.org"),
    ("smtp2go.com", "spf.smtp2go.com"),
    ("fastmail.com", "spf.messagingengine.com"),
    ("messagingengine.com", "spf.messagingengine.com"),
    ("gmail.com", "_spf.google.com"),
    ("google.com", "_spf.google.com"),
    ("office365.com", "spf.protection.outlook.com"),
    ("outlook.com", "spf.protection.outlook.com"),
    ("postmarkapp.com", "spf.mtasv.net"),
    ("brevo.com", "spf.brevo.com"),
    ("sendinblue.com", "spf.brevo.com"),
    ("mailjet.com", "spf.mailjet.com"),
)

MTA_STS_POLICY_PATH = "/.well-known/mta-sts.txt"


class Kind(StrEnum):
    """What a record is for; also how ``dns check`` names it."""

    MX = "MX"
    A = "A"
    AAAA = "AAAA"
    SPF = "SPF"
    DKIM = "DKIM"
    DMARC = "DMARC"
    MTA_STS = "MTA-STS"
    TLS_RPT = "TLS-RPT"
    SRV = "SRV"
    CAA = "CAA"


#: The TXT kinds mailroom owns by the record's first tag (RFC 7208 4.5, RFC 7489 6.4, ...).
_TXT_PREFIX = {
    Kind.SPF: "v=spf1",
    Kind.DMARC: "v=DMARC1",
    Kind.MTA_STS: "v=STSv1",
    Kind.TLS_RPT: "v=TLSRPTv1",
}
_REQUIRED = frozenset({Kind.MX, Kind.A, Kind.AAAA, Kind.SPF, Kind.DKIM, Kind.DMARC})


@dataclass(frozen=True, slots=True)
class Record:
    """One record to publish. ``value`` is zone-file syntax, except for TXT: the text itself
    (``rdata_text`` quotes and splits it)."""

    name: str  # fully qualified, lower case, no final dot
    rdtype: str  # "MX", "TXT", ...
    value: str
    kind: Kind
    label: str = ""  # e.g. the DKIM selector or the SRV service

    @property
    def required(self) -> bool:
        return self.kind in _REQUIRED

    @property
    def title(self) -> str:
        return f"{self.kind} {self.label}".strip()

    def rdata_text(self) -> str:
        return txt(self.value) if self.rdtype == "TXT" else self.value

    def zone_line(self) -> str:
        return f"{self.name}. IN {self.rdtype} {self.rdata_text()}"

    def rdata(self) -> dns.rdata.Rdata:
        return rdata_of(self.rdtype, self.rdata_text())


@dataclass(frozen=True, slots=True)
class DomainRecords:
    """Everything ``domain`` needs: the records, advice for what mailroom cannot publish, and
    the MTA-STS policy file (``""`` when MTA-STS is off)."""

    domain: str
    hostname: str
    records: tuple[Record, ...]
    advice: tuple[str, ...]
    mta_sts_policy: str
    mta_sts_url: str
    relay_include: str  # "include:..." the SPF record must have; "" without a known relay
    host_addresses: tuple[str, ...]  # configured public addresses of HOST
    caa_issuers: tuple[str, ...]

    def rrsets(self) -> dict[tuple[str, str], list[Record]]:
        """The records grouped by ``(name, type)``, in order."""
        groups: dict[tuple[str, str], list[Record]] = {}
        for record in self.records:
            groups.setdefault((record.name, record.rdtype), []).append(record)
        return groups

    def owns(self, name: str, rdtype: str, rdata: dns.rdata.Rdata) -> bool:
        """Whether a published record belongs to mailroom (see the module docstring)."""
        expected = self.rrsets().get((name, rdtype))
        if not expected:
            return False
        kind = expected[0].kind
        if rdtype == "TXT":
            text = txt_text(rdata)
            prefix = _TXT_PREFIX.get(kind)
            return prefix is None or _has_prefix(text, prefix)
        if rdtype == "MX":
            return _host(rdata.exchange) == self.hostname  # type: ignore[attr-defined]
        if rdtype == "CAA":
            tag = rdata.tag.decode("ascii", "replace").lower()  # type: ignore[attr-defined]
            return tag == "issue" and _caa_domain(rdata) in self.caa_issuers
        return True  # A/AAAA of HOST, SRV of the client services

    def as_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "hostname": self.hostname,
            "records": [
                {**asdict(r), "required": r.required, "zone": r.zone_line()} for r in self.records
            ],
            "advice": list(self.advice),
            "mta_sts_policy": self.mta_sts_policy,
            "mta_sts_url": self.mta_sts_url,
        }


# -- generation (no I/O but the DKIM key files) -------------------------------------------------


def generate(settings: Settings, domain: str) -> DomainRecords:
    """The records ``domain`` needs with this configuration."""
    domain = normalise_domain(domain)
    host = settings.hostname
    conf = settings.dns
    in_zone = host == domain or host.endswith("." + domain)
    records: list[Record] = [Record(domain, "MX", f"10 {host}.", Kind.MX)]
    advice: list[str] = []

    addresses = [str(a) for a in (conf.ipv4, conf.ipv6) if a is not None]
    if not in_zone:
        advice.append(f"{host} is not in {domain}: its A/AAAA and CAA records belong to its zone")
    elif addresses:
        for address in addresses:
            rdtype = "A" if ipaddress.ip_address(address).version == 4 else "AAAA"
            records.append(Record(host, rdtype, address, Kind(rdtype)))
    else:
        advice.append(
            f"{host} needs an A record (and AAAA with IPv6) with the server's public address;"
            " set [dns] ipv4 and ipv6 in the configuration and mailroom lists, checks and"
            " publishes them"
        )

    spf, include, spf_advice = spf_record(settings)
    records.append(Record(domain, "TXT", spf, Kind.SPF))
    advice += spf_advice

    keys = dkim.load_keys(settings.dkim_dir, domain)
    for key, (name, value) in zip(keys, dkim.dns_records(keys), strict=True):
        records.append(Record(name, "TXT", value, Kind.DKIM, key.selector))
    if not keys:
        advice.append(f"{domain} has no DKIM keys yet: mailroomctl dkim generate {domain}")

    rua = conf.dmarc_report_address or f"postmaster@{domain}"
    records.append(
        Record(f"_dmarc.{domain}", "TXT", f"v=DMARC1; p=none; rua=mailto:{rua}", Kind.DMARC)
    )
    advice.append(
        "DMARC starts at p=none (reports only); once the reports show your mail passing,"
        " raise it to p=quarantine, then p=reject (dns check accepts any policy)"
    )

    policy, url = "", ""
    if conf.mta_sts_mode != "off":
        policy = mta_sts_policy(host, conf.mta_sts_mode, conf.mta_sts_max_age)
        url = f"https://mta-sts.{domain}{MTA_STS_POLICY_PATH}"
        records.append(
            Record(f"_mta-sts.{domain}", "TXT", f"v=STSv1; id={policy_id(policy)}", Kind.MTA_STS)
        )
        advice.append(
            f"MTA-STS: serve the policy below at {url} (a web server with a valid certificate"
            f" for mta-sts.{domain}); its id changes whenever the policy does"
        )
    tls_rua = conf.tls_report_address or f"postmaster@{domain}"
    records.append(
        Record(f"_smtp._tls.{domain}", "TXT", f"v=TLSRPTv1; rua=mailto:{tls_rua}", Kind.TLS_RPT)
    )

    for service, port, priority in SRV_SERVICES:
        # RFC 6186 3.4 / RFC 2782: target "." says the service is not offered.
        value = f"{priority} 1 {port} {host}." if service in conf.client_services else "0 0 0 ."
        records.append(Record(f"_{service}._tcp.{domain}", "SRV", value, Kind.SRV, service))

    issuers = tuple(i.strip().lower().rstrip(".") for i in conf.caa_issuers if i.strip())
    if in_zone:
        for issuer in issuers:
            records.append(Record(host, "CAA", f'0 issue "{issuer}"', Kind.CAA, issuer))

    for address in addresses:
        advice.append(
            f"PTR: ask your ISP or hosting provider to set the reverse DNS of {address} to {host}"
        )
    if not addresses:
        advice.append(f"PTR: the reverse DNS of the server's public address must name {host}")
    return DomainRecords(
        domain=domain,
        hostname=host,
        records=tuple(records),
        advice=tuple(advice),
        mta_sts_policy=policy,
        mta_sts_url=url,
        relay_include=include,
        host_addresses=tuple(addresses),
        caa_issuers=issuers,
    )


def spf_record(settings: Settings) -> tuple[str, str, list[str]]:
    """The SPF record, the ``include:`` it has for the smarthost (or ``""``), and advice."""
    relay = settings.outbound.relay.host.strip().rstrip(".").lower()
    if not relay:
        return "v=spf1 mx -all", "", []
    include = relay_spf_include(relay)
    if include:
        term = f"include:{include}"
        return f"v=spf1 mx {term} -all", term, []
    return (
        "v=spf1 mx -all",
        "",
        [
            f"mail goes out through the smarthost {relay}: add the include: its documentation"
            " names to the SPF record (e.g. v=spf1 mx include:spf.relay.example -all), or"
            " receivers will see SPF fail"
        ],
    )


def relay_spf_include(relay_host: str) -> str:
    """The SPF include of a well-known smarthost, ``""`` if it is not one mailroom knows."""
    host = relay_host.strip().rstrip(".").lower()
    for suffix, include in RELAY_SPF:
        if host == suffix or host.endswith("." + suffix):
            return include
    return ""


def mta_sts_policy(hostname: str, mode: str, max_age: int) -> str:
    """The policy file (RFC 8461 3.2), CRLF line ends."""
    lines = ["version: STSv1", f"mode: {mode}", f"mx: {hostname}", f"max_age: {max_age}"]
    return "\r\n".join(lines) + "\r\n"


def policy_id(policy: str) -> str:
    """RFC 8461 3.1 ``id`` (1-32 letters and digits): the policy's hash, stable across runs."""
    return hashlib.sha256(policy.encode()).hexdigest()[:20]


def txt(value: str) -> str:
    """A TXT value in zone-file form: strings of at most 255 octets (RFC 1035 3.3.14)."""
    data = value.encode()
    chunks = [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]
    return " ".join('"' + _escape(chunk) + '"' for chunk in chunks)


def _escape(chunk: bytes) -> str:
    out = []
    for byte in chunk:
        char = chr(byte)
        if char in '"\\':
            out.append("\\" + char)
        elif 0x20 <= byte < 0x7F:
            out.append(char)
        else:
            out.append(f"\\{byte:03d}")
    return "".join(out)


# -- output of `dns records` ---------------------------------------------------------------------


def zone_text(found: DomainRecords) -> str:
    """Zone-file lines, advice and the MTA-STS policy as comments."""
    lines = [f"; DNS records for {found.domain} (mail host {found.hostname})"]
    lines += [r.zone_line() for r in found.records]
    lines += ["", *(f"; {a}" for a in found.advice)]
    if found.mta_sts_policy:
        lines += ["", f"; MTA-STS policy, to serve at {found.mta_sts_url}:"]
        lines += [f";   {line}" for line in found.mta_sts_policy.splitlines()]
    return "\n".join(lines) + "\n"


def json_text(found: DomainRecords) -> str:
    return json.dumps(found.as_json(), indent=2, ensure_ascii=False) + "\n"


def print_table(found: DomainRecords, width: int = 160) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"DNS records for {found.domain}")
    for column in ("record", "name", "type", "value", "required"):
        table.add_column(column, overflow="fold")
    for r in found.records:
        table.add_row(r.title, r.name, r.rdtype, r.value, "yes" if r.required else "recommended")
    console = Console(width=width)
    console.print(table)
    for line in found.advice:
        console.print(f"- {line}", highlight=False)
    if found.mta_sts_policy:
        console.print(f"MTA-STS policy for {found.mta_sts_url}:", highlight=False)
        console.print(found.mta_sts_policy.replace("\r\n", "\n"), highlight=False, end="")


# -- rdata helpers --------------------------------------------------------------------------------


def rdata_of(rdtype: str, text: str) -> dns.rdata.Rdata:
    import dns.name
    import dns.rdata
    import dns.rdataclass
    import dns.rdatatype

    return dns.rdata.from_text(
        dns.rdataclass.IN,
        dns.rdatatype.from_text(rdtype),
        text,
        origin=dns.name.root,
        relativize=False,
    )


def identity(rdata: dns.rdata.Rdata) -> tuple[str, bytes]:
    """What makes two records the same: TXT by their joined text (how a TXT is split into
    strings does not matter), others by canonical wire form (names in lower case)."""
    import dns.name
    import dns.rdatatype

    kind = dns.rdatatype.to_text(rdata.rdtype)
    if kind == "TXT":
        return kind, b"".join(rdata.strings)  # type: ignore[attr-defined]
    return kind, rdata.to_digestable(dns.name.root)


def txt_text(rdata: dns.rdata.Rdata) -> str:
    return b"".join(rdata.strings).decode("utf-8", "replace")  # type: ignore[attr-defined]


def show(rdata: dns.rdata.Rdata) -> str:
    """A record as the table shows it: TXT as its text, others in zone-file form."""
    import dns.rdatatype

    if rdata.rdtype == dns.rdatatype.TXT:
        return txt_text(rdata)
    return rdata.to_text()


def _host(name: Any) -> str:
    return str(name.to_text(omit_final_dot=True)).lower().rstrip(".")


def _caa_domain(rdata: dns.rdata.Rdata) -> str:
    value: str = rdata.value.decode("ascii", "replace")  # type: ignore[attr-defined]
    return value.split(";", 1)[0].strip().lower().rstrip(".")


def _has_prefix(text: str, prefix: str) -> bool:
    head = text.strip()
    return head[: len(prefix)].lower() == prefix.lower() and (
        len(head) == len(prefix) or head[len(prefix)] in " ;\t"
    )


# -- `dns check` ---------------------------------------------------------------------------------


class Status(StrEnum):
    OK = "ok"
    MISSING = "missing"
    WRONG = "wrong"
    WARN = "warning"
    UNKNOWN = "unknown"  # DNS gave no answer


@dataclass(frozen=True, slots=True)
class Finding:
    """One row of ``dns check``."""

    record: str  # e.g. "DKIM r202611" or "SPF"
    name: str
    expected: str
    found: str
    status: Status
    todo: str  # what to do; "" when nothing
    required: bool

    @property
    def fails(self) -> bool:
        if self.status is Status.WRONG:
            return True
        return self.required and self.status in (Status.MISSING, Status.UNKNOWN)


async def check(
    settings: Settings,
    found: DomainRecords,
    resolver: Resolver,
    *,
    policy_timeout: float = 5.0,
) -> list[Finding]:
    """Compare what DNS publishes with ``found``'s records; one ``Finding`` per record set."""
    from mailroom.resolver import DnsPermanentError, DnsTemporaryError

    findings: list[Finding] = []
    for (name, rdtype), expected in found.rrsets().items():
        kind = expected[0].kind
        try:
            published = list(await resolver.records(name, rdtype))
        except (DnsTemporaryError, DnsPermanentError) as err:
            for record in expected:
                findings.append(
                    _finding(record, "", Status.UNKNOWN, f"DNS gave no answer: {err}; try again")
                )
            continue
        if kind is Kind.SPF:
            findings.append(await _check_spf(settings, found, expected[0], published, resolver))
        elif kind is Kind.CAA:
            findings.append(await _check_caa(found, expected, resolver))
        else:
            for record in expected:
                findings.append(_check_one(found, record, published))
    if not found.host_addresses and any(r.kind is Kind.MX for r in found.records):
        findings.insert(1, await _check_host_address(found, resolver))
    mta_sts = next((r for r in found.records if r.kind is Kind.MTA_STS), None)
    if mta_sts is not None:
        findings.append(await _check_policy(settings, found, resolver, policy_timeout))
    findings += await _check_ptr(found, resolver)
    return findings


def _finding(record: Record, found: str, status: Status, todo: str = "") -> Finding:
    return Finding(record.title, record.name, record.value, found, status, todo, record.required)


def _check_one(found: DomainRecords, record: Record, published: list[Any]) -> Finding:
    shown = "\n".join(show(r) for r in published)
    publish = "publish the expected record (mailroomctl dns publish, or by hand)"
    if record.kind is Kind.MX:
        hosts = [_host(r.exchange) for r in published]
        if found.hostname in hosts:
            others = [h for h in hosts if h != found.hostname]
            note = f"other MX hosts: {', '.join(others)} (backups?)" if others else ""
            return _finding(record, shown, Status.OK, note)
        if not published:
            return _finding(record, shown, Status.MISSING, publish)
        return _finding(
            record, shown, Status.WRONG, f"mail goes elsewhere: replace the MX with {record.value}"
        )
    if record.kind in (Kind.A, Kind.AAAA):
        addresses = {ipaddress.ip_address(r.address) for r in published}
        want = ipaddress.ip_address(record.value)
        if addresses == {want}:
            return _finding(record, shown, Status.OK)
        if not addresses:
            return _finding(record, shown, Status.MISSING, publish)
        return _finding(
            record, shown, Status.WRONG, f"{record.name} must have exactly {record.rdtype} {want}"
        )
    if record.kind is Kind.DKIM:
        want_key = _dkim_key(record.value)
        keys = [_dkim_key(txt_text(r)) for r in published]
        if want_key and want_key in keys:
            return _finding(record, shown, Status.OK)
        if not published:
            return _finding(record, shown, Status.MISSING, publish)
        return _finding(record, shown, Status.WRONG, f"the key differs: {publish}")
    if record.kind is Kind.DMARC:
        from mailroom.authcheck import parse_dmarc

        texts = [txt_text(r) for r in published if _has_prefix(txt_text(r), "v=DMARC1")]
        if not texts:
            return _finding(record, shown, Status.MISSING, publish)
        if len(texts) > 1:
            return _finding(record, shown, Status.WRONG, "more than one DMARC record: keep one")
        tags = parse_dmarc(texts[0])
        if tags is None:
            return _finding(record, shown, Status.WRONG, f"not a usable DMARC record: {publish}")
        return _finding(record, shown, Status.OK, f"policy p={tags['p']}")
    if record.kind is Kind.MTA_STS:
        from mailroom.mtasts import parse_txt

        texts = [txt_text(r) for r in published]
        if not any(_has_prefix(t, "v=STSv1") for t in texts):
            return _finding(record, shown, Status.MISSING, publish)
        if parse_txt(texts) == record.value.rpartition("id=")[2]:
            return _finding(record, shown, Status.OK)
        return _finding(
            record,
            shown,
            Status.WRONG,
            f"the id is not the policy's: serve the policy at {found.mta_sts_url}, then {publish}",
        )
    if record.kind is Kind.TLS_RPT:
        texts = [txt_text(r) for r in published if _has_prefix(txt_text(r), "v=TLSRPTv1")]
        if not texts:
            return _finding(record, shown, Status.MISSING, publish)
        if len(texts) == 1 and "rua=" in texts[0].replace(" ", ""):
            return _finding(record, shown, Status.OK)
        return _finding(record, shown, Status.WRONG, f"one TLS-RPT record with rua=: {publish}")
    if record.kind is Kind.SRV:
        return _check_srv(record, published, shown, publish)
    raise AssertionError(f"no check for {record.kind}")


def _check_srv(record: Record, published: list[Any], shown: str, publish: str) -> Finding:
    offered = not record.value.endswith(" .")
    targets = [(_host(r.target), int(r.port)) for r in published]
    if offered:
        port = int(record.value.split()[2])
        if any(target and p == port for target, p in targets):
            return _finding(record, shown, Status.OK)
        if not published:
            return _finding(record, shown, Status.MISSING, publish)
        return _finding(record, shown, Status.WRONG, publish)
    if all(not target for target, _ in targets):
        return _finding(record, shown, Status.OK)  # "." or nothing: clients will not try
    return _finding(
        record,
        shown,
        Status.WRONG,
        f"{record.label} is not offered ([dns] client_services): {publish}",
    )


def _dkim_key(text: str) -> str:
    import dkim as dkimpy  # type: ignore[import-untyped]

    try:
        tags = dkimpy.util.parse_tag_value(text.encode())
    except dkimpy.util.InvalidTagValueList:
        return ""
    key: bytes = tags.get(b"p", b"")
    return "".join(key.decode("ascii", "replace").split())


async def _check_spf(
    settings: Settings,
    found: DomainRecords,
    record: Record,
    published: list[Any],
    resolver: Resolver,
) -> Finding:
    from mailroom.resolver import DnsTemporaryError

    texts = [txt_text(r) for r in published if _has_prefix(txt_text(r), "v=spf1")]
    publish = "publish the expected record (mailroomctl dns publish, or by hand)"
    if not texts:
        return _finding(record, "", Status.MISSING, publish)
    shown = "\n".join(texts)
    if len(texts) > 1:
        # RFC 7208 3.2: several SPF records are a permerror.
        return _finding(record, shown, Status.WRONG, "more than one SPF record: merge them")
    addresses = list(found.host_addresses)
    if not addresses:
        try:
            addresses = await resolver.addresses(found.hostname)
        except DnsTemporaryError:
            addresses = []
    problems: list[str] = []
    for address in addresses or ["192.0.2.1"]:  # no address known: the syntax alone
        result, detail = await spf_result(resolver, found.domain, found.hostname, address)
        if result in ("permerror", "temperror"):
            problems.append(f"{result}: {detail}")
            break
        if addresses and result != "pass":
            problems.append(f"it gives {result}, not pass, for {address}: add mx or ip:{address}")
    if found.relay_include and found.relay_include.lower() not in texts[0].lower().split():
        problems.append(f"the smarthost's {found.relay_include} is missing")
    if problems:
        return _finding(record, shown, Status.WRONG, "; ".join(problems))
    return _finding(record, shown, Status.OK)


async def spf_result(resolver: Resolver, domain: str, helo: str, address: str) -> tuple[str, str]:
    """pyspf's verdict on mail from ``postmaster@domain`` sent from ``address``."""
    from mailroom import authcheck

    loop = asyncio.get_running_loop()
    lookups = authcheck._Lookups(loop, resolver, time.monotonic() + 10)
    envelope = authcheck.Envelope(address, helo, f"postmaster@{domain}")
    verdict = await loop.run_in_executor(None, authcheck.check_spf, envelope, lookups)
    return str(verdict.result), verdict.detail


async def _check_caa(
    found: DomainRecords, expected: Sequence[Record], resolver: Resolver
) -> Finding:
    from mailroom.resolver import DnsPermanentError, DnsTemporaryError

    first = expected[0]
    title = "CAA"
    want = "\n".join(r.value for r in expected)
    # RFC 8659 3: the relevant set is the host's, else that of its nearest parent with one.
    name = found.hostname
    published: list[Any] = []
    where = name
    try:
        while True:
            published = list(await resolver.records(name, "CAA"))
            where = name
            if published or "." not in name or name == found.domain:
                break
            name = name.split(".", 1)[1]
    except (DnsTemporaryError, DnsPermanentError) as err:
        return Finding(title, first.name, want, "", Status.UNKNOWN, str(err), False)
    shown = "\n".join(f"{where}: {r.to_text()}" for r in published)
    publish = f"publish {first.name} CAA {first.value}"
    if not published:
        return Finding(title, first.name, want, "", Status.MISSING, publish, False)
    issuers = {
        _caa_domain(r) for r in published if r.tag.decode("ascii", "replace").lower() == "issue"
    }
    if issuers & set(found.caa_issuers):
        return Finding(title, first.name, want, shown, Status.OK, "", False)
    return Finding(
        title,
        first.name,
        want,
        shown,
        Status.WRONG,
        f"{', '.join(found.caa_issuers)} may not issue for {found.hostname}: {publish}",
        False,
    )


async def _check_host_address(found: DomainRecords, resolver: Resolver) -> Finding:
    from mailroom.resolver import DnsTemporaryError

    host = found.hostname
    try:
        addresses = await resolver.addresses(host)
    except DnsTemporaryError as err:
        return Finding("address", host, "A/AAAA", "", Status.UNKNOWN, str(err), True)
    todo = "set [dns] ipv4/ipv6 so that mailroom can check the exact addresses"
    if addresses:
        return Finding("address", host, "A/AAAA", "\n".join(addresses), Status.OK, todo, True)
    return Finding(
        "address",
        host,
        "A/AAAA",
        "",
        Status.MISSING,
        f"publish an A record for {host}; {todo}",
        True,
    )


async def _check_policy(
    settings: Settings, found: DomainRecords, resolver: Resolver, timeout: float
) -> Finding:
    from mailroom import mtasts
    from mailroom.resolver import DnsPermanentError, DnsTemporaryError

    title, name = "MTA-STS policy", f"mta-sts.{found.domain}"
    expected = found.mta_sts_policy.replace("\r\n", "; ").strip("; ")
    try:
        text = await asyncio.wait_for(
            mtasts.fetch(
                found.domain,
                resolver,
                port=settings.outbound.mta_sts_port,
                ca_file=settings.outbound.ca_file,
            ),
            timeout,
        )
        served = mtasts.parse_policy(text)
    except (mtasts.PolicyError, DnsTemporaryError, DnsPermanentError, TimeoutError) as err:
        reason = str(err) or "timed out"
        todo = f"serve the policy at {found.mta_sts_url} ({reason})"
        return Finding(title, name, expected, "", Status.WARN, todo, False)
    shown = text.replace("\r\n", "\n").strip().replace("\n", "; ")
    if text.replace("\r\n", "\n") == found.mta_sts_policy.replace("\r\n", "\n"):
        return Finding(title, name, expected, shown, Status.OK, "", False)
    todo = f"the served policy differs from mailroom's: serve it at {found.mta_sts_url}"
    if not served.matches(found.hostname):
        todo = f"the served policy does not name {found.hostname}: senders will refuse it; {todo}"
        return Finding(title, name, expected, shown, Status.WRONG, todo, False)
    return Finding(title, name, expected, shown, Status.WARN, todo, False)


async def _check_ptr(found: DomainRecords, resolver: Resolver) -> list[Finding]:
    import dns.reversename

    from mailroom.resolver import DnsPermanentError, DnsTemporaryError

    addresses = list(found.host_addresses)
    if not addresses:
        try:
            addresses = await resolver.addresses(found.hostname)
        except DnsTemporaryError:
            addresses = []
    findings = []
    for address in addresses:
        reverse = dns.reversename.from_address(address).to_text(omit_final_dot=True)
        try:
            ptr: list[Any] = list(await resolver.records(reverse, "PTR"))
            names = [_host(r.target) for r in ptr]
        except (DnsTemporaryError, DnsPermanentError) as err:
            names, error = [], str(err)
        else:
            error = ""
        status = Status.OK if found.hostname in names else Status.WARN
        todo = (
            ""
            if status is Status.OK
            else error
            or f"ask your ISP or hosting provider to set the reverse DNS of {address} to"
            f" {found.hostname}: many receivers refuse mail otherwise"
        )
        findings.append(
            Finding(
                f"PTR {address}", reverse, found.hostname, "\n".join(names), status, todo, False
            )
        )
    return findings


def print_findings(findings: Sequence[Finding], domain: str, width: int = 160) -> None:
    from rich.console import Console
    from rich.table import Table

    styles = {
        Status.OK: "green",
        Status.MISSING: "red",
        Status.WRONG: "red",
        Status.WARN: "yellow",
        Status.UNKNOWN: "red",
    }
    table = Table(title=f"DNS check of {domain}")
    for column in ("record", "name", "expected", "found", "status", "what to do"):
        table.add_column(column, overflow="fold")
    for f in findings:
        todo = (
            f"(recommended) {f.todo}"
            if f.todo and not f.required and f.status is not Status.OK
            else f.todo
        )
        table.add_row(
            f.record, f.name, f.expected, f.found or "-", f"[{styles[f.status]}]{f.status}[/]", todo
        )
    Console(width=width).print(table)
