"""`mailroomctl dns records|check|publish` and `client-config`, run as the installed console
script against a real knotd on loopback (tests/dnsserver.py) and, for Cloudflare, a local fake
of its API.

The generated records are checked by parsers that are not mailroom's generator: pyspf
evaluates the SPF record, dkimpy verifies a signature against the published DKIM record, the
PyPI package dmarc and authcheck's parser (the one inbound mail uses) read DMARC, and
mailroom.mtasts's policy parser reads MTA-STS.
"""

from __future__ import annotations

import json
import plistlib
import re
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import dmarc as dmarc_parser  # type: ignore[import-untyped]
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.tsigkeyring
import dns.update
import pytest

from mailroom import dkim, dnsrecords
from mailroom.authcheck import parse_dmarc
from mailroom.config import load_settings
from mailroom.mtasts import parse_policy, parse_txt
from tests.dnsserver import DnsServer, dns_server  # noqa: F401 - the fixture
from tests.test_ctl import PASSWORD, Ctl

ADDRESS = "192.0.2.25"


def make_ctl(root: Path, domain: str, dns_address: str = "", extra: str = "") -> Ctl:
    """A mail host mail.DOMAIN with DOMAIN, a user and DKIM keys."""
    ctl = Ctl(root)
    nameservers = f'nameservers = ["{dns_address}"]\n' if dns_address else ""
    ctl.config.write_text(
        f'hostname = "mail.{domain}"\ndata_dir = "{ctl.data_dir}"\n'
        f'[dns]\n{nameservers}ipv4 = "{ADDRESS}"\n{extra}'
    )
    ctl.ok("domain", "add", domain)
    ctl.ok("user", "add", f"alice@{domain}", "--password-stdin", stdin=PASSWORD + "\n")
    ctl.ok("dkim", "generate", domain)
    return ctl


def records_of(ctl: Ctl, domain: str) -> list[dict[str, Any]]:
    data = json.loads(ctl.ok("dns", "records", domain, "--format", "json"))
    records: list[dict[str, Any]] = data["records"]
    return records


def ask(server: DnsServer, name: str, rdtype: str) -> list[Any]:
    query = dns.message.make_query(name, dns.rdatatype.from_text(rdtype))
    response = dns.query.tcp(query, server.host, port=server.port, timeout=5)
    return [
        r for rrset in response.answer if rrset.rdtype == query.question[0].rdtype for r in rrset
    ]


def texts(server: DnsServer, name: str) -> list[str]:
    return [b"".join(r.strings).decode() for r in ask(server, name, "TXT")]


def rfc2136_credentials(ctl: Ctl, server: DnsServer, mode: int = 0o600) -> Path:
    path = ctl.root / "rfc2136.ini"
    path.write_text(
        f"dns_rfc2136_server = {server.host}\ndns_rfc2136_port = {server.port}\n"
        f"dns_rfc2136_name = {server.tsig_name}\ndns_rfc2136_secret = {server.tsig_secret}\n"
        "dns_rfc2136_algorithm = HMAC-SHA256\n"
    )
    path.chmod(mode)
    return path


# -- records -------------------------------------------------------------------------------------


def test_records_cover_every_kind_and_independent_parsers_accept_them(tmp_path: Path) -> None:
    ctl = make_ctl(tmp_path, "gen.test")
    records = records_of(ctl, "gen.test")
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_kind.setdefault(r["kind"], []).append(r)
    assert [r["value"] for r in by_kind["MX"]] == ["10 mail.gen.test."]
    assert [(r["name"], r["value"]) for r in by_kind["A"]] == [("mail.gen.test", ADDRESS)]
    assert [r["value"] for r in by_kind["SPF"]] == ["v=spf1 mx -all"]
    assert len(by_kind["DKIM"]) == 2
    assert by_kind["CAA"][0]["value"] == '0 issue "letsencrypt.org"'
    srv = {r["name"]: r["value"] for r in by_kind["SRV"]}
    assert srv["_submissions._tcp.gen.test"] == "0 1 465 mail.gen.test."
    assert srv["_submission._tcp.gen.test"] == "10 1 587 mail.gen.test."
    assert srv["_imaps._tcp.gen.test"] == "0 1 993 mail.gen.test."
    assert srv["_imap._tcp.gen.test"] == "10 1 143 mail.gen.test."
    assert srv["_pop3s._tcp.gen.test"] == "20 1 995 mail.gen.test."
    assert srv["_pop3._tcp.gen.test"] == "30 1 110 mail.gen.test."

    # DMARC: the parser inbound mail uses, and the RFC 7489 6.4 tag grammar.
    dmarc = by_kind["DMARC"][0]["value"]
    assert re.fullmatch(r"v=DMARC1(; [a-z]+=[^;]+)+", dmarc)
    assert parse_dmarc(dmarc) == {
        "v": "DMARC1",
        "p": "none",
        "rua": "mailto:postmaster@gen.test",
        "pct": "100",
    }
    # ... and an independent one: the PyPI package dmarc, strict.
    independent = dmarc_parser.DMARC().parse_record(dmarc, domain="gen.test")
    assert independent.p is dmarc_parser.DMARCDisposition.NONE
    assert independent.rua == ["mailto:postmaster@gen.test"]
    # TLS-RPT (RFC 8460 3).
    assert by_kind["TLS-RPT"][0]["value"] == "v=TLSRPTv1; rua=mailto:postmaster@gen.test"
    # MTA-STS: the id parses, and the policy is one the client side accepts for the MX.
    data = json.loads(ctl.ok("dns", "records", "gen.test", "--format", "json"))
    policy = parse_policy(data["mta_sts_policy"])
    assert policy.matches("mail.gen.test") and policy.mode == "testing"
    assert data["mta_sts_url"] == "https://mta-sts.gen.test/.well-known/mta-sts.txt"
    sts_id = parse_txt([by_kind["MTA-STS"][0]["value"]])
    assert sts_id == dnsrecords.policy_id(data["mta_sts_policy"])
    # Stable across runs; a new policy (mode) gives a new id.
    assert records_of(ctl, "gen.test") == records
    ctl.config.write_text(ctl.config.read_text() + 'mta_sts_mode = "enforce"\n')
    enforce = next(r for r in records_of(ctl, "gen.test") if r["kind"] == "MTA-STS")
    assert parse_txt([enforce["value"]]) not in (None, sts_id)

    # Zone form: every TXT string at most 255 octets, the DKIM text intact.
    zone = ctl.ok("dns", "records", "gen.test")
    for key in dkim.load_keys(ctl.data_dir / "dkim", "gen.test"):
        line = next(x for x in zone.splitlines() if x.startswith(f"{key.selector}._domainkey."))
        strings = re.findall(r'"([^"]*)"', line)
        assert all(len(s) <= 255 for s in strings)
        assert "".join(strings) == key.public_txt
    assert "PTR: ask your ISP" in zone and f"reverse DNS of {ADDRESS} to mail.gen.test" in zone
    assert "; MTA-STS policy, to serve at https://mta-sts.gen.test/" in zone
    table = ctl.ok("dns", "records", "gen.test", "--format", "table")
    assert "_imaps._tcp.gen.test" in table and "recommended" in table
    assert "not a local domain" in ctl.fails("dns", "records", "other.test")


def test_spf_record_passes_the_mail_host_in_pyspf(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pyspf evaluates the generated SPF with answers from a table (no mailroom code)."""
    import spf  # type: ignore[import-untyped]

    ctl = make_ctl(tmp_path, "spf.test", extra='[outbound.relay]\nhost = "smtp.sendgrid.net"\n')
    record = next(r["value"] for r in records_of(ctl, "spf.test") if r["kind"] == "SPF")
    assert record == "v=spf1 mx include:sendgrid.net -all"
    answers = {
        ("spf.test", "TXT"): [record],
        ("spf.test", "MX"): [(10, "mail.spf.test")],
        ("mail.spf.test", "A"): [ADDRESS],
        ("sendgrid.net", "TXT"): ["v=spf1 ip4:198.51.100.0/24 -all"],
    }

    def lookup(name: str, qtype: str, strict: object = True, timeout: object = None) -> list[Any]:
        values = answers.get((name, qtype), [])
        return [((name, qtype), [v.encode()] if qtype == "TXT" else v) for v in values]

    monkeypatch.setattr(spf, "DNSLookup", lookup)

    def verdict(ip: str) -> str:
        return str(spf.query(i=ip, s="alice@spf.test", h="mail.spf.test").check()[0])

    assert verdict(ADDRESS) == "pass"
    assert verdict("198.51.100.7") == "pass"  # through the smarthost
    assert verdict("203.0.113.9") == "fail"

    # An unknown relay: no include is invented; the advice says what to add.
    ctl.config.write_text(ctl.config.read_text().replace("smtp.sendgrid.net", "relay.isp.test"))
    out = ctl.ok("dns", "records", "spf.test")
    assert 'spf.test. IN TXT "v=spf1 mx -all"' in out
    assert "smarthost relay.isp.test: add the include:" in out


def test_client_config_files_parse_with_the_right_servers(tmp_path: Path) -> None:
    ctl = make_ctl(
        tmp_path, "cc.test", extra='client_services = ["submissions", "submission", "imaps"]\n'
    )
    out_dir = tmp_path / "www"
    out = ctl.ok("client-config", "alice@cc.test", "--out", str(out_dir))
    assert "https://autoconfig.cc.test/mail/config-v1.1.xml" in out
    root = ET.parse(out_dir / "config-v1.1.xml").getroot()
    assert root.tag == "clientConfig" and root.get("version") == "1.1"
    provider = root.find("emailProvider")
    assert provider is not None and provider.findtext("domain") == "cc.test"
    servers = [
        (s.tag, s.get("type"), s.findtext("hostname"), s.findtext("port"), s.findtext("socketType"))
        for s in provider
        if s.tag.endswith("Server")
    ]
    assert servers == [
        ("incomingServer", "imap", "mail.cc.test", "993", "SSL"),
        ("outgoingServer", "smtp", "mail.cc.test", "465", "SSL"),
        ("outgoingServer", "smtp", "mail.cc.test", "587", "STARTTLS"),
    ]
    assert {s.findtext("username") for s in provider if s.tag.endswith("Server")} == {
        "%EMAILADDRESS%"
    }
    profile_path = out_dir / "alice@cc.test.mobileconfig"
    profile = plistlib.loads(profile_path.read_bytes())
    assert profile["PayloadType"] == "Configuration"
    (account,) = profile["PayloadContent"]
    assert account["PayloadType"] == "com.apple.mail.managed"
    assert account["EmailAddress"] == "alice@cc.test"
    assert account["EmailAccountType"] == "EmailTypeIMAP"
    assert (account["IncomingMailServerHostName"], account["IncomingMailServerPortNumber"]) == (
        "mail.cc.test",
        993,
    )
    assert (account["OutgoingMailServerHostName"], account["OutgoingMailServerPortNumber"]) == (
        "mail.cc.test",
        465,
    )
    assert account["IncomingMailServerUseSSL"] is True
    assert not any(
        "Password" in k and k != "OutgoingPasswordSameAsIncomingPassword" for k in account
    )
    before = profile_path.read_bytes()
    ctl.ok("client-config", "alice@cc.test", "--out", str(out_dir))
    assert profile_path.read_bytes() == before  # the same UUIDs: same bytes
    # Services not offered get "." SRV targets.
    srv = {r["name"]: r["value"] for r in records_of(ctl, "cc.test") if r["kind"] == "SRV"}
    assert srv["_pop3s._tcp.cc.test"] == "0 0 0 ." and srv["_imap._tcp.cc.test"] == "0 0 0 ."
    assert "not a local domain" in ctl.fails("client-config", "bob@other.test")


# -- check and publish through RFC 2136, against knotd -------------------------------------------


def hand_update(server: DnsServer, zone: str, name: str, rdtype: str, *values: str) -> None:
    """Replace the records at ``name`` by hand, as an admin with nsupdate would."""
    keyring = dns.tsigkeyring.from_text({server.tsig_name: server.tsig_secret})
    update = dns.update.UpdateMessage(zone, keyring=keyring, keyalgorithm="hmac-sha256.")
    update.replace(dns.name.from_text(name), 300, rdtype, *values)
    response = dns.query.tcp(update, server.host, port=server.port, timeout=5)
    assert response.rcode() == dns.rcode.NOERROR


def test_publish_check_change_republish_rfc2136(
    tmp_path: Path,
    dns_server: DnsServer,  # noqa: F811
) -> None:
    domain = "pub.test"
    dns_server.set_zone(
        domain,
        [
            ("@", "TXT", '"google-site-verification=abc123"'),
            ("www", "A", "192.0.2.80"),
            ("mail", "CAA", '0 issue "sectigo.com"'),
        ],
    )
    dns_server.set_zone("2.0.192.in-addr.arpa", [("25", "PTR", "other.example.")])
    ctl = make_ctl(tmp_path, domain, dns_server.address)
    creds = rfc2136_credentials(ctl, dns_server)
    ctl.config.write_text(
        ctl.config.read_text() + f'[dns.publish]\nrfc2136_credentials = "{creds}"\n'
    )
    wanted = dnsrecords.generate(load_settings(ctl.config), domain)

    before = ctl("dns", "check", domain)
    assert before.returncode == 1, before.stdout
    assert "MX (missing)" in before.stderr and "SPF (missing)" in before.stderr

    dry = ctl.ok("dns", "publish", domain, "--provider", "rfc2136", "--dry-run")
    assert f"+ {domain}. IN MX 10 mail.{domain}." in dry and "dry run:" in dry
    assert ask(dns_server, domain, "MX") == []

    out = ctl.ok("dns", "publish", domain, "--provider", "rfc2136")
    assert "published:" in out
    assert 'kept (not mailroom\'s): mail.pub.test CAA 0 issue "sectigo.com"' in out
    # Every record resolves with the expected content.
    for record in wanted.records:
        published = {dnsrecords.identity(r) for r in ask(dns_server, record.name, record.rdtype)}
        assert dnsrecords.identity(record.rdata()) in published, record
    # dkimpy verifies a signature with the key as published (the TXT strings joined).
    import dkim as dkimpy  # type: ignore[import-untyped]

    keys = dkim.load_keys(ctl.data_dir / "dkim", domain)
    message = f"From: alice@{domain}\r\nTo: bob@x.test\r\nSubject: hi\r\n\r\nhello\r\n".encode()
    signed = dkim.sign(message, keys) + message

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes:
        return texts(dns_server, name.decode().rstrip("."))[0].encode()

    for n in range(len(keys)):
        assert dkimpy.DKIM(signed).verify(idx=n, dnsfunc=dnsfunc), keys[n].selector

    good = ctl("dns", "check", domain)
    assert good.returncode == 0, good.stdout + good.stderr
    assert f"{domain} has every required record" in good.stdout
    # The PTR names another host: a warning, not a failure.
    assert "PTR 192.0.2.25" in good.stdout and "warning" in good.stdout

    # By hand: the Ed25519 key record now holds another key.
    ed = next(r for r in wanted.records if r.kind == "DKIM" and r.label.startswith("e"))
    other = "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
    hand_update(dns_server, domain, ed.name, "TXT", f'"{other}"')
    serial = dns_server.serial(domain)
    bad = ctl("dns", "check", domain)
    assert bad.returncode == 1
    assert f"DKIM {ed.label} (wrong)" in bad.stderr and "1 problem(s)" in bad.stderr

    out = ctl.ok("dns", "publish", domain, "--provider", "rfc2136")
    changes = [line for line in out.splitlines() if line.startswith(("+ ", "- "))]
    assert changes == [
        f'- {ed.name}. IN TXT "{other}"',
        f'+ {ed.name}. IN TXT "{ed.value}"',
    ]
    assert dns_server.serial(domain) == (serial or 0) + 1  # one UPDATE
    assert texts(dns_server, ed.name) == [ed.value]
    # What mailroom does not own is as it was.
    assert "google-site-verification=abc123" in texts(dns_server, domain)
    assert [r.to_text() for r in ask(dns_server, f"www.{domain}", "A")] == ["192.0.2.80"]
    caa = sorted(r.to_text() for r in ask(dns_server, f"mail.{domain}", "CAA"))
    assert caa == ['0 issue "letsencrypt.org"', '0 issue "sectigo.com"']
    assert ctl("dns", "check", domain).returncode == 0

    again = ctl.ok("dns", "publish", domain, "--provider", "rfc2136")
    assert "nothing to change" in again
    assert not [line for line in again.splitlines() if line.startswith(("+ ", "- "))]
    assert dns_server.serial(domain) == (serial or 0) + 1  # no UPDATE sent


def test_check_rules_where_admins_differ(
    tmp_path: Path,
    dns_server: DnsServer,  # noqa: F811
) -> None:
    """p=quarantine, ~all with ip4:, a backup MX, a CAA at the apex: all fine; a second SPF
    record and a CAA that shuts Let's Encrypt out are not."""
    domain = "rules.test"
    ctl = make_ctl(tmp_path, domain, dns_server.address)
    wanted = dnsrecords.generate(load_settings(ctl.config), domain)
    zone: list[tuple[str, str, str]] = []
    for record in wanted.records:
        name = record.name.removesuffix(domain).rstrip(".") or "@"
        if record.kind in ("SPF", "DMARC", "CAA", "MX"):
            continue
        zone.append((name, record.rdtype, record.rdata_text()))
    zone += [
        ("@", "MX", f"10 mail.{domain}."),
        ("@", "MX", "20 backup.example."),
        ("@", "TXT", f'"v=spf1 ip4:{ADDRESS} ~all"'),
        ("_dmarc", "TXT", '"v=DMARC1; p=quarantine; rua=mailto:dmarc@elsewhere.example"'),
        ("@", "CAA", '0 issue "letsencrypt.org"'),
    ]
    dns_server.set_zone(domain, zone)
    good = ctl("dns", "check", domain)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "p=quarantine" in good.stdout and "backup.example" in good.stdout

    dns_server.set_zone(
        domain,
        [
            *zone[:-1],
            ("@", "TXT", '"v=spf1 mx -all"'),
            ("@", "CAA", '0 issue "pki.goog"'),
        ],
    )
    bad = ctl("dns", "check", domain, "--json")
    assert bad.returncode == 1
    assert "SPF (wrong)" in bad.stderr and "CAA (wrong)" in bad.stderr
    rows = {row["record"]: row for row in json.loads(bad.stdout)}
    assert rows["SPF"]["todo"] == "more than one SPF record: merge them"
    assert "letsencrypt.org may not issue for mail.rules.test" in rows["CAA"]["todo"]
    assert rows["MX"]["status"] == "ok" and rows["DMARC"]["status"] == "ok"


def test_rfc2136_credentials_must_be_private(
    tmp_path: Path,
    dns_server: DnsServer,  # noqa: F811
) -> None:
    ctl = make_ctl(tmp_path, "perm.test", dns_server.address)
    creds = rfc2136_credentials(ctl, dns_server, mode=0o644)
    ctl.config.write_text(
        ctl.config.read_text() + f'[dns.publish]\nrfc2136_credentials = "{creds}"\n'
    )
    error = ctl.fails("dns", "publish", "perm.test", "--provider", "rfc2136")
    assert "open to group or others" in error and "chmod 600" in error
    assert dns_server.tsig_secret not in error


# -- Cloudflare, against a fake of its API -------------------------------------------------------

TOKEN = "cf-test-token-0123456789"


class FakeCloudflare:
    """A FAKE of Cloudflare's API v4 (the real one cannot be reached from tests): the
    endpoints ``dns publish`` uses, answering in the real API's envelope
    (``{"success", "errors", "messages", "result"}``) and refusing what the real API refuses:
    no ``Authorization: Bearer`` token, a body that is not JSON, a record without the fields
    its type needs (``content`` for A/AAAA/TXT/MX, ``priority`` for MX, ``data`` for SRV/CAA),
    unknown fields, unknown zone or record ids."""

    FIELDS = frozenset(
        {"type", "name", "content", "ttl", "priority", "proxied", "data", "comment", "tags"}
    )

    def __init__(self, zone: str) -> None:
        self.zone_id = "023e105f4ecef8ad9ca31a8372d0c353"
        self.zone = zone
        self.records: dict[str, dict[str, Any]] = {}
        self.log: list[tuple[str, str]] = []
        self._ids = iter(range(1, 10_000))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/client/v4"

    def add(self, **record: Any) -> str:
        rid = f"rec{next(self._ids)}"
        self.records[rid] = {"id": rid, "zone_id": self.zone_id, **record}
        return rid

    def writes(self) -> list[tuple[str, str]]:
        return [entry for entry in self.log if entry[0] != "GET"]

    def _validate(self, body: Any) -> str:
        if not isinstance(body, dict) or not {"type", "name", "ttl"} <= body.keys():
            return "type, name and ttl are required"
        if set(body) - self.FIELDS:
            return f"unknown fields {sorted(set(body) - self.FIELDS)}"
        kind = body["type"]
        if kind in ("A", "AAAA", "TXT", "MX") and not isinstance(body.get("content"), str):
            return "content is required"
        if kind == "MX" and not isinstance(body.get("priority"), int):
            return "priority is required for MX"
        if kind == "SRV" and set(body.get("data", {})) != {"priority", "weight", "port", "target"}:
            return "data.priority, weight, port, target are required for SRV"
        if kind == "CAA" and set(body.get("data", {})) != {"flags", "tag", "value"}:
            return "data.flags, tag, value are required for CAA"
        if not (body["name"] == self.zone or body["name"].endswith("." + self.zone)):
            return "name is not in the zone"
        return ""

    def _stored(self, body: dict[str, Any], rid: str) -> dict[str, Any]:
        record = {"id": rid, "zone_id": self.zone_id, **body}
        data = body.get("data")
        if body["type"] == "SRV":  # the real API fills content from data
            record["content"] = f"{data['weight']} {data['port']} {data['target']}"  # type: ignore[index]
            record["priority"] = data["priority"]  # type: ignore[index]
        elif body["type"] == "CAA":
            record["content"] = f'{data["flags"]} {data["tag"]} "{data["value"]}"'  # type: ignore[index]
        return record

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, status: int, result: Any = None, error: str = "") -> None:
                errors = (
                    [{"code": 1004 if status == 400 else 9109, "message": error}] if error else []
                )
                payload = {"success": not error, "errors": errors, "messages": [], "result": result}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                fake.log.append((self.command, url.path))
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self._reply(403, error="Invalid access token")
                body: Any = None
                if self.command in ("POST", "PUT"):
                    if self.headers.get("Content-Type") != "application/json":
                        return self._reply(400, error="Content-Type must be application/json")
                    length = int(self.headers.get("Content-Length", "0"))
                    try:
                        body = json.loads(self.rfile.read(length))
                    except ValueError:
                        return self._reply(400, error="body is not JSON")
                parts = url.path.removeprefix("/client/v4/").split("/")
                if parts == ["zones"] and self.command == "GET":
                    zones = [{"id": fake.zone_id, "name": fake.zone, "status": "active"}]
                    return self._reply(200, [z for z in zones if z["name"] == query.get("name")])
                if len(parts) < 3 or parts[:3] != ["zones", fake.zone_id, "dns_records"]:
                    return self._reply(404, error="Could not route to " + url.path)
                if len(parts) == 3 and self.command == "GET":
                    found = [
                        r
                        for r in fake.records.values()
                        if r["type"] == query.get("type", r["type"])
                        and r["name"] == query.get("name", r["name"])
                    ]
                    return self._reply(200, found)
                if len(parts) == 3 and self.command == "POST":
                    problem = fake._validate(body)
                    if problem:
                        return self._reply(400, error=problem)
                    rid = f"rec{next(fake._ids)}"
                    fake.records[rid] = fake._stored(body, rid)
                    return self._reply(200, fake.records[rid])
                if len(parts) == 4 and parts[3] in fake.records:
                    rid = parts[3]
                    if self.command == "PUT":
                        problem = fake._validate(body)
                        if problem:
                            return self._reply(400, error=problem)
                        fake.records[rid] = fake._stored(body, rid)
                        return self._reply(200, fake.records[rid])
                    if self.command == "DELETE":
                        del fake.records[rid]
                        return self._reply(200, {"id": rid})
                return self._reply(404, error="Record not found")

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        return Handler

    def __enter__(self) -> FakeCloudflare:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def cloudflare() -> Iterator[FakeCloudflare]:
    with FakeCloudflare("cf.test") as fake:
        yield fake


def test_publish_through_cloudflare(tmp_path: Path, cloudflare: FakeCloudflare) -> None:
    fake = cloudflare
    google = fake.add(type="TXT", name="cf.test", content="google-site-verification=xyz", ttl=1)
    stale_spf = fake.add(type="TXT", name="cf.test", content='"v=spf1 a -all"', ttl=1)
    www = fake.add(type="A", name="www.cf.test", content="192.0.2.80", ttl=1, proxied=True)
    ctl = make_ctl(tmp_path, "cf.test")
    creds = ctl.root / "cloudflare.ini"
    creds.write_text(f"# certbot-dns-cloudflare\ndns_cloudflare_api_token = {TOKEN}\n")
    creds.chmod(0o644)
    ctl.config.write_text(
        ctl.config.read_text()
        + f'[dns.publish]\ncloudflare_api_url = "{fake.url}"\n'
        + f'[certbot]\ncloudflare_credentials = "{creds}"\n'  # the file certbot uses
    )
    error = ctl.fails("dns", "publish", "cf.test", "--provider", "cloudflare")
    assert "chmod 600" in error and TOKEN not in error
    creds.chmod(0o600)

    dry = ctl.ok("dns", "publish", "cf.test", "--provider", "cloudflare", "--dry-run")
    assert "+ cf.test. IN MX 10 mail.cf.test." in dry and '- cf.test. IN TXT "v=spf1 a -all"' in dry
    assert fake.writes() == []

    ctl.ok("dns", "publish", "cf.test", "--provider", "cloudflare")
    writes = fake.writes()
    base = f"/client/v4/zones/{fake.zone_id}/dns_records"
    assert ("PUT", f"{base}/{stale_spf}") in writes  # the changed record keeps its id
    assert not [w for w in writes if w[0] == "DELETE"]
    wanted = dnsrecords.generate(load_settings(ctl.config), "cf.test")
    assert len([w for w in writes if w[0] == "POST"]) == len(wanted.records) - 1
    stored = list(fake.records.values())
    assert fake.records[google]["content"] == "google-site-verification=xyz"
    assert fake.records[www] == {
        "id": www, "zone_id": fake.zone_id, "type": "A", "name": "www.cf.test",
        "content": "192.0.2.80", "ttl": 1, "proxied": True,
    }  # fmt: skip
    assert fake.records[stale_spf]["content"] == "v=spf1 mx -all"
    mx = [r for r in stored if r["type"] == "MX"]
    assert [(r["content"], r["priority"]) for r in mx] == [("mail.cf.test", 10)]
    host_a = [r for r in stored if r["type"] == "A" and r["name"] == "mail.cf.test"]
    assert [(r["content"], r["proxied"]) for r in host_a] == [(ADDRESS, False)]
    imaps = next(r for r in stored if r["name"] == "_imaps._tcp.cf.test")
    assert imaps["data"] == {"priority": 0, "weight": 1, "port": 993, "target": "mail.cf.test"}
    dkim_txt = [r for r in stored if "._domainkey." in r["name"]]
    assert sorted(r["content"] for r in dkim_txt) == sorted(
        k.public_txt for k in dkim.load_keys(ctl.data_dir / "dkim", "cf.test")
    )

    fake.log.clear()
    again = ctl.ok("dns", "publish", "cf.test", "--provider", "cloudflare")
    assert "nothing to change" in again and fake.writes() == []

    # A record changed by hand in the dashboard: only that one is put back.
    caa = next(r for r in stored if r["type"] == "CAA")
    fake.records[caa["id"]]["data"] = {"flags": 0, "tag": "issue", "value": "letsencrypt.org"}
    dmarc = next(r for r in stored if r["name"] == "_dmarc.cf.test")
    fake.records[dmarc["id"]]["content"] = "v=DMARC1; p=reject"
    fake.log.clear()
    ctl.ok("dns", "publish", "cf.test", "--provider", "cloudflare")
    assert fake.writes() == [("PUT", f"{base}/{dmarc['id']}")]
    assert fake.records[dmarc["id"]]["content"] == "v=DMARC1; p=none; rua=mailto:postmaster@cf.test"

    # A wrong token: the API's own error, and no token in it.
    creds.write_text("dns_cloudflare_api_token = wrong\n")
    error = ctl.fails("dns", "publish", "cf.test", "--provider", "cloudflare")
    assert "Invalid access token" in error
