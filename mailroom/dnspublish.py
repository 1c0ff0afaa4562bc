"""``mailroomctl dns publish``: put the records of mailroom.dnsrecords into DNS, through RFC 2136
UPDATE with TSIG to the primary server, or through Cloudflare's HTTP API v4.

What this module owns: the plan (``plan``: which records to add and which to delete, from what
the provider has now) and the two providers that read the current records and carry a plan
out. What it promises: publishing is idempotent (a second run plans nothing); only records
whose content differs change (a TTL alone is no difference); records mailroom does not own
(``DomainRecords.owns``) are never changed or deleted, nor is any name or type mailroom does
not generate; an RFC 2136 plan goes out as one UPDATE message (the server applies all of it or
nothing, RFC 2136 3.4).

Credentials are the files certbot's DNS plugins use, mode 0600 (a file group or others may
read is refused): certbot-dns-rfc2136's INI (``dns_rfc2136_server``, ``_port``, ``_name``,
``_secret``, ``_algorithm``) and certbot-dns-cloudflare's (``dns_cloudflare_api_token``).
Errors are ``PublishError`` with one line; the token and the secret never appear in one.
"""

from __future__ import annotations

import json
import stat
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from mailroom.dnsrecords import DomainRecords, Record, identity, rdata_of, show, txt
from mailroom.errors import MailroomError

if TYPE_CHECKING:
    import dns.rdata

TIMEOUT = 20.0

# certbot-dns-rfc2136's names (its default is HMAC-MD5) -> dnspython's.
_TSIG_ALGORITHMS = {
    "HMAC-MD5": "hmac-md5.sig-alg.reg.int.",
    "HMAC-SHA1": "hmac-sha1.",
    "HMAC-SHA224": "hmac-sha224.",
    "HMAC-SHA256": "hmac-sha256.",
    "HMAC-SHA384": "hmac-sha384.",
    "HMAC-SHA512": "hmac-sha512.",
}


class PublishError(MailroomError):
    """The records could not be read or written; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Existing:
    """A record the provider has now; ``ref`` is the provider's id for it (Cloudflare)."""

    name: str
    rdtype: str
    rdata: dns.rdata.Rdata
    ref: str = ""


@dataclass(frozen=True, slots=True)
class Change:
    action: Literal["add", "delete"]
    name: str
    rdtype: str
    rdata: dns.rdata.Rdata
    record: Record | None = None  # the generated record an "add" publishes
    existing: Existing | None = None  # what a "delete" removes

    def describe(self) -> str:
        sign = "+" if self.action == "add" else "-"
        value = show(self.rdata)
        if self.rdtype == "TXT":
            value = txt(value)
        return f"{sign} {self.name}. IN {self.rdtype} {value}"


@dataclass(frozen=True, slots=True)
class Plan:
    changes: tuple[Change, ...]
    unchanged: int  # records already as they should be
    kept: tuple[Existing, ...] = field(default=())  # not mailroom's: left alone

    def lines(self) -> list[str]:
        return [c.describe() for c in self.changes]


class Provider(Protocol):
    """Reads and writes the records of one zone."""

    def current(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], list[Existing]]:
        """The records at each ``(name, type)``."""
        ...

    def apply(self, changes: Sequence[Change], ttl: int) -> None: ...


def plan(wanted: DomainRecords, current: Mapping[tuple[str, str], Sequence[Existing]]) -> Plan:
    """What to delete and add so that the owned records are exactly ``wanted``'s."""
    changes: list[Change] = []
    unchanged = 0
    kept: list[Existing] = []
    for (name, rdtype), records in wanted.rrsets().items():
        want = {identity(r.rdata()): r for r in records}
        have = list(current.get((name, rdtype), ()))
        have_ids = {identity(e.rdata) for e in have}
        for existing in have:
            if not wanted.owns(name, rdtype, existing.rdata):
                kept.append(existing)
            elif identity(existing.rdata) not in want:
                changes.append(Change("delete", name, rdtype, existing.rdata, existing=existing))
        for key, record in want.items():
            if key in have_ids:
                unchanged += 1
            else:
                changes.append(Change("add", name, rdtype, record.rdata(), record=record))
    return Plan(tuple(changes), unchanged, tuple(kept))


# -- credentials ---------------------------------------------------------------------------------


def read_credentials(path: Path) -> dict[str, str]:
    """The ``key = value`` lines of a certbot plugin's credentials file, after checking that
    only its owner can read it."""
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PublishError(f"credentials file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PublishError(f"cannot read credentials file {path}: {err}") from None
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISREG(st.st_mode):
        raise PublishError(f"credentials file {path} is not a regular file")
    if mode & 0o077:
        raise PublishError(
            f"credentials file {path} is open to group or others (mode {mode:04o});"
            f" chmod 600 {path}"
        )
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, equals, value = line.partition("=")
        if equals:
            values[key.strip()] = value.strip().strip("'\"")
    return values


# -- RFC 2136 ------------------------------------------------------------------------------------


class Rfc2136:
    """Dynamic updates (RFC 2136) signed with TSIG (RFC 8945) to the zone's primary server;
    the current records are asked of that server directly (over TCP, no cache between)."""

    def __init__(
        self,
        zone: str,
        server: str,
        port: int,
        key_name: str,
        secret: str,
        algorithm: str = "HMAC-SHA256",
        timeout: float = TIMEOUT,
    ) -> None:
        import dns.name
        import dns.tsigkeyring

        algo = _TSIG_ALGORITHMS.get(algorithm.strip().upper())
        if algo is None:
            raise PublishError(
                f"TSIG algorithm {algorithm!r} is not one of {', '.join(_TSIG_ALGORITHMS)}"
            )
        self.zone = dns.name.from_text(zone)
        self.server, self.port, self.timeout = server, port, timeout
        self.key_name = dns.name.from_text(key_name)
        self.algorithm = dns.name.from_text(algo)
        try:
            self.keyring = dns.tsigkeyring.from_text({key_name: secret})
        except Exception:
            raise PublishError("the TSIG secret is not valid base64") from None

    @classmethod
    def from_credentials(cls, path: Path, zone: str) -> Rfc2136:
        values = read_credentials(path)
        missing = [
            k for k in ("dns_rfc2136_server", "dns_rfc2136_name", "dns_rfc2136_secret")
            if not values.get(k)
        ]  # fmt: skip
        if missing:
            raise PublishError(f"credentials file {path} has no {', '.join(missing)}")
        port = values.get("dns_rfc2136_port", "53")
        if not port.isdigit():
            raise PublishError(f"credentials file {path}: dns_rfc2136_port is not a number")
        return cls(
            zone,
            values["dns_rfc2136_server"],
            int(port),
            values["dns_rfc2136_name"],
            values["dns_rfc2136_secret"],
            values.get("dns_rfc2136_algorithm", "HMAC-MD5"),
        )

    def current(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], list[Existing]]:
        import dns.exception
        import dns.message
        import dns.query
        import dns.rcode
        import dns.rdatatype

        found: dict[tuple[str, str], list[Existing]] = {}
        for name, rdtype in keys:
            kind = dns.rdatatype.from_text(rdtype)
            query = dns.message.make_query(name, kind)
            try:
                response = dns.query.tcp(query, self.server, timeout=self.timeout, port=self.port)
            except (dns.exception.DNSException, OSError) as err:
                raise PublishError(f"cannot ask {self._where} for {rdtype} {name}: {err}") from None
            rcode = response.rcode()
            if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                raise PublishError(
                    f"{self._where} answered {dns.rcode.to_text(rcode)} for {rdtype} {name}"
                    " (is it the primary server of the zone?)"
                )
            found[(name, rdtype)] = [
                Existing(name, rdtype, rdata)
                for rrset in response.answer
                if rrset.rdtype == kind
                for rdata in rrset
            ]
        return found

    def apply(self, changes: Sequence[Change], ttl: int) -> None:
        import dns.exception
        import dns.name
        import dns.query
        import dns.rcode
        import dns.update

        if not changes:
            return
        update = dns.update.UpdateMessage(
            self.zone, keyring=self.keyring, keyname=self.key_name, keyalgorithm=self.algorithm
        )
        for change in changes:  # deletions first: the plan lists them before additions
            name = dns.name.from_text(change.name)
            if change.action == "delete":
                update.delete(name, change.rdata)
            else:
                update.add(name, ttl, change.rdata)
        try:
            response = dns.query.tcp(update, self.server, timeout=self.timeout, port=self.port)
        except (dns.exception.DNSException, OSError) as err:
            raise PublishError(f"the update to {self._where} failed: {err}") from None
        rcode = response.rcode()
        if rcode != dns.rcode.NOERROR:
            raise PublishError(
                f"{self._where} refused the update: {dns.rcode.to_text(rcode)}"
                " (does the TSIG key have an update ACL for this zone?)"
            )

    @property
    def _where(self) -> str:
        return f"{self.server} port {self.port}"


# -- Cloudflare ----------------------------------------------------------------------------------


class Cloudflare:
    """Cloudflare's API v4 (``/zones``, ``/zones/{id}/dns_records``) with an API token
    (permission Zone:DNS:Edit), over HTTPS with the system's CAs."""

    def __init__(
        self, token: str, zone: str, api_url: str, *, timeout: float = TIMEOUT, fixed_zone: bool
    ) -> None:
        self.token = token
        self.api_url = api_url.rstrip("/")
        self.timeout = timeout
        self._zone_name = zone
        self._fixed_zone = fixed_zone  # the configured zone: no search upwards
        self._zone_id = ""

    @classmethod
    def from_credentials(
        cls, path: Path, zone: str, api_url: str, *, fixed_zone: bool
    ) -> Cloudflare:
        values = read_credentials(path)
        token = values.get("dns_cloudflare_api_token", "")
        if not token:
            raise PublishError(
                f"credentials file {path} has no dns_cloudflare_api_token (mailroom needs an API"
                " token with Zone:DNS:Edit, not the global API key)"
            )
        return cls(token, zone, api_url, fixed_zone=fixed_zone)

    # -- HTTP ---------------------------------------------------------------------------------

    def _call(
        self, method: str, path: str, query: Mapping[str, str] | None = None, body: Any = None
    ) -> Any:
        url = self.api_url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as err:
            try:
                payload = json.loads(err.read() or b"{}")
            except ValueError:
                payload = {}
            raise PublishError(f"Cloudflare: {method} {path}: {_cf_errors(payload, err)}") from None
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise PublishError(f"Cloudflare: {method} {path}: {reason}") from None
        if not payload.get("success", False):
            raise PublishError(f"Cloudflare: {method} {path}: {_cf_errors(payload, None)}")
        return payload.get("result")

    # -- Provider -----------------------------------------------------------------------------

    def zone_id(self) -> str:
        """The id of the configured zone, else of the nearest one holding the domain."""
        if self._zone_id:
            return self._zone_id
        name = self._zone_name
        while True:
            result = self._call("GET", "/zones", {"name": name})
            if result:
                self._zone_id = str(result[0]["id"])
                return self._zone_id
            if self._fixed_zone or name.count(".") < 2:
                raise PublishError(
                    f"Cloudflare has no zone {self._zone_name} (or the token may not see it)"
                )
            name = name.split(".", 1)[1]

    def current(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], list[Existing]]:
        zone = self.zone_id()
        found: dict[tuple[str, str], list[Existing]] = {}
        for name, rdtype in keys:
            query = {"type": rdtype, "name": name, "per_page": "100"}
            result = self._call("GET", f"/zones/{zone}/dns_records", query)
            found[(name, rdtype)] = [
                Existing(name, rdtype, rdata_of(rdtype, _cf_to_text(item)), str(item["id"]))
                for item in result or ()
                if str(item.get("type")) == rdtype
            ]
        return found

    def apply(self, changes: Sequence[Change], ttl: int) -> None:
        zone = self.zone_id()
        deletes = [c for c in changes if c.action == "delete"]
        adds = [c for c in changes if c.action == "add"]
        for add in adds:
            # A changed record is one PUT of the old record's id (its id and history stay).
            old = next((d for d in deletes if (d.name, d.rdtype) == (add.name, add.rdtype)), None)
            body = _cf_body(add, ttl)
            if old is not None and old.existing is not None:
                deletes.remove(old)
                self._call("PUT", f"/zones/{zone}/dns_records/{old.existing.ref}", body=body)
            else:
                self._call("POST", f"/zones/{zone}/dns_records", body=body)
        for delete in deletes:
            assert delete.existing is not None
            self._call("DELETE", f"/zones/{zone}/dns_records/{delete.existing.ref}")


def _cf_errors(payload: Any, err: urllib.error.HTTPError | None) -> str:
    errors = payload.get("errors") if isinstance(payload, dict) else None
    if errors:
        return "; ".join(f"{e.get('message', e)} (code {e.get('code', '?')})" for e in errors)
    return f"HTTP {err.code} {err.reason}" if err is not None else "the API said no"


def _cf_to_text(item: Mapping[str, Any]) -> str:
    """A Cloudflare record as zone-file rdata."""
    rdtype = str(item["type"])
    content = str(item.get("content", ""))
    data = item.get("data") or {}
    if rdtype == "MX":
        return f"{int(item.get('priority', 0))} {content.rstrip('.')}."
    if rdtype == "TXT":
        if content.startswith('"') and content.endswith('"'):  # newer API: quoted strings
            return content
        return txt(content)
    if rdtype == "SRV":
        if data:
            target = str(data["target"]).rstrip(".") + "."
            return f"{data['priority']} {data['weight']} {data['port']} {target}"
        return f"{int(item.get('priority', 0))} {content.rstrip('.')}."
    if rdtype == "CAA":
        if data:
            return f'{data["flags"]} {data["tag"]} "{data["value"]}"'
        return content
    return content


def _cf_body(change: Change, ttl: int) -> dict[str, Any]:
    """A record as Cloudflare's create/overwrite body."""
    assert change.record is not None
    rdata: Any = change.rdata
    body: dict[str, Any] = {"type": change.rdtype, "name": change.name, "ttl": ttl}
    if change.rdtype in ("A", "AAAA"):
        body["content"] = rdata.address
        body["proxied"] = False  # Cloudflare's proxy carries HTTP only, never SMTP or IMAP
    elif change.rdtype == "MX":
        body["content"] = rdata.exchange.to_text(omit_final_dot=True)
        body["priority"] = int(rdata.preference)
    elif change.rdtype == "TXT":
        body["content"] = change.record.value
    elif change.rdtype == "SRV":
        body["data"] = {
            "priority": int(rdata.priority),
            "weight": int(rdata.weight),
            "port": int(rdata.port),
            "target": rdata.target.to_text(omit_final_dot=True) or ".",
        }
    elif change.rdtype == "CAA":
        body["data"] = {
            "flags": int(rdata.flags),
            "tag": rdata.tag.decode(),
            "value": rdata.value.decode(),
        }
    else:
        raise PublishError(f"cannot publish {change.rdtype} records through Cloudflare")
    return body


# -- the command ---------------------------------------------------------------------------------


def provider_for(
    name: str, wanted: DomainRecords, *, rfc2136_credentials: Path | None,
    cloudflare_credentials: Path | None, zone: str, api_url: str,
) -> Provider:  # fmt: skip
    """The provider ``name`` with the configured credentials."""
    if name == "rfc2136":
        if rfc2136_credentials is None:
            raise PublishError(
                "no RFC 2136 credentials: set [dns.publish] rfc2136_credentials (or [certbot]"
                " rfc2136_credentials) to certbot-dns-rfc2136's INI file"
            )
        return Rfc2136.from_credentials(rfc2136_credentials, zone or wanted.domain)
    if name == "cloudflare":
        if cloudflare_credentials is None:
            raise PublishError(
                "no Cloudflare credentials: set [dns.publish] cloudflare_credentials (or"
                " [certbot] cloudflare_credentials) to a file with dns_cloudflare_api_token = ..."
            )
        return Cloudflare.from_credentials(
            cloudflare_credentials, zone or wanted.domain, api_url, fixed_zone=bool(zone)
        )
    raise PublishError(f"unknown DNS provider {name!r}: rfc2136 or cloudflare")


def publish(wanted: DomainRecords, provider: Provider, ttl: int, *, dry_run: bool) -> Plan:
    """Read, plan, and (unless ``dry_run``) apply; returns the plan."""
    current = provider.current(wanted.rrsets())
    the_plan = plan(wanted, current)
    if not dry_run:
        provider.apply(the_plan.changes, ttl)
    return the_plan
