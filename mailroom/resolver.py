"""DNS: every question mailroom asks goes through one ``Resolver``.

It owns the choice of nameservers (``[dns] nameservers``, or the system's ``/etc/resolv.conf``)
and turns dnspython's answers and exceptions into what mail needs to know:

- ``mx(domain)`` says where mail for a domain goes, as an ``MxResult`` whose ``kind`` is one of
  ``hosts``, ``null_mx`` (RFC 7505), ``no_mx`` (implicit MX, RFC 5321 5.1), ``nxdomain`` or
  ``temporary`` (try again later);
- ``addresses(host)`` gives the A and AAAA addresses of a host;
- ``txt(name)`` gives TXT records (SPF, DKIM, DMARC, MTA-STS), each one string.

Every answer is kept for the life of the ``Resolver`` (one queue run, one SMTP session), failures
included, so a run asks about a domain once however many messages go there. Make a new one for
the next run.

Errors: ``DnsTemporaryError`` (SERVFAIL, timeout, no nameserver answered: a retry can help) and
``DnsPermanentError`` (the name cannot exist, e.g. a label longer than 63 octets). A name that
does not exist is an answer, not an error: ``MxKind.NXDOMAIN``, or no addresses, or no TXT.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdatatype
import dns.resolver

from mailroom.config import DNSSettings, Settings
from mailroom.errors import ConfigError, MailroomError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0


class DnsTemporaryError(MailroomError):
    """The question got no answer (SERVFAIL, timeout, refused): asking again later can help."""

    permanent = False


class DnsPermanentError(MailroomError):
    """The question cannot have an answer (a malformed name): asking again will not help."""

    permanent = True


class MxKind(StrEnum):
    """What an MX lookup found."""

    HOSTS = "hosts"  # MX records: deliver to ``hosts`` in order
    NULL_MX = "null_mx"  # RFC 7505: the domain accepts no mail
    NO_MX = "no_mx"  # RFC 5321 5.1: no MX, the domain exists: it is its own (implicit) MX
    NXDOMAIN = "nxdomain"  # the domain does not exist
    TEMPORARY = "temporary"  # no answer now (SERVFAIL, timeout): retry later


@dataclass(frozen=True, slots=True)
class MxResult:
    """Where mail for ``domain`` goes.

    ``hosts`` holds ``(preference, host)`` pairs, lowest preference first, hosts of equal
    preference in random order; host names are lower case without the final dot. For
    ``NO_MX`` it is the implicit MX ``((0, domain),)``; otherwise empty. ``error`` says what
    went wrong for ``TEMPORARY``.
    """

    kind: MxKind
    domain: str
    hosts: tuple[tuple[int, str], ...] = ()
    error: str = ""


@dataclass(frozen=True, slots=True)
class _Answer:
    """One cached answer: the records (``None``: NXDOMAIN) or the failure it was."""

    records: tuple[dns.rdata.Rdata, ...] | None = None
    error: str = ""
    permanent: bool = False


class Resolver:
    """Asks the configured nameservers (or the system's) and remembers every answer.

    ``nameservers`` entries are ``"ip"`` or ``"ip:port"`` (IPv6 with a port: ``"[::1]:5353"``);
    none means ``/etc/resolv.conf``. ``timeout`` bounds each question, retries included.
    """

    def __init__(self, nameservers: Sequence[str] = (), timeout: float = DEFAULT_TIMEOUT) -> None:
        if nameservers:
            self._dns = dns.asyncresolver.Resolver(configure=False)
            self._dns.nameservers = [_nameserver(entry) for entry in nameservers]
        else:
            try:
                self._dns = dns.asyncresolver.Resolver()
            except dns.resolver.NoResolverConfiguration:
                # What the C library does without /etc/resolv.conf.
                self._dns = dns.asyncresolver.Resolver(configure=False)
                self._dns.nameservers = ["127.0.0.1", "::1"]
        self._dns.timeout = timeout
        self._dns.lifetime = timeout
        self._dns.search = []
        self._dns.use_search_by_default = False
        self._cache: dict[tuple[str, dns.rdatatype.RdataType], _Answer] = {}

    @classmethod
    def from_settings(
        cls, settings: Settings | DNSSettings, timeout: float = DEFAULT_TIMEOUT
    ) -> Resolver:
        """The resolver ``[dns]`` describes; takes the whole ``Settings`` or its ``dns`` part."""
        dns_settings = settings.dns if isinstance(settings, Settings) else settings
        return cls(list(dns_settings.nameservers), timeout=timeout)

    # -- questions -------------------------------------------------------------------------------

    async def mx(self, domain: str) -> MxResult:
        """Where mail for ``domain`` goes; raises ``DnsPermanentError`` for a malformed name."""
        domain = _normalize(domain)
        answer = await self._lookup(domain, dns.rdatatype.MX)
        if answer.error:
            return MxResult(MxKind.TEMPORARY, domain, error=answer.error)
        if answer.records is None:
            return MxResult(MxKind.NXDOMAIN, domain)
        if not answer.records:
            # RFC 5321 5.1: no MX records: the domain itself is the implicit MX, preference 0.
            return MxResult(MxKind.NO_MX, domain, hosts=((0, domain),))
        pairs = [(int(r.preference), _host(r.exchange)) for r in answer.records]  # type: ignore[attr-defined]
        if len(pairs) == 1 and pairs[0][1] == "":
            return MxResult(MxKind.NULL_MX, domain)  # RFC 7505 3: a single "0 ." record
        # A "." among other MX records is a misconfiguration; it names no host to try.
        pairs = [pair for pair in pairs if pair[1]]
        # RFC 5321 5.1: lowest preference first; equal ones in random order.
        random.shuffle(pairs)
        pairs.sort(key=lambda pair: pair[0])
        return MxResult(MxKind.HOSTS, domain, hosts=tuple(pairs))

    async def addresses(self, host: str) -> list[str]:
        """The IPv4 then IPv6 addresses of ``host``; empty if it has none or does not exist.

        Raises ``DnsTemporaryError`` when neither lookup answered, or when one did not and the
        other found nothing (the missing one might have had addresses).
        """
        host = _normalize(host)
        found: list[str] = []
        errors: list[str] = []
        answers = await asyncio.gather(
            self._lookup(host, dns.rdatatype.A), self._lookup(host, dns.rdatatype.AAAA)
        )
        for answer in answers:
            if answer.error:
                errors.append(answer.error)
            else:
                found += [r.to_text() for r in answer.records or ()]
        if errors and not found:
            raise DnsTemporaryError(errors[0])
        return found

    async def txt(self, name: str) -> list[str]:
        """The TXT records at ``name``, each record's strings joined (RFC 7208 3.3).

        Empty if there are none or ``name`` does not exist; raises ``DnsTemporaryError`` when no
        answer came. Strings are decoded as UTF-8 (invalid bytes replaced).
        """
        answer = await self._lookup(_normalize(name), dns.rdatatype.TXT)
        if answer.error:
            raise DnsTemporaryError(answer.error)
        return [
            b"".join(r.strings).decode("utf-8", errors="replace")  # type: ignore[attr-defined]
            for r in answer.records or ()
        ]

    async def records(self, name: str, rdtype: str) -> tuple[dns.rdata.Rdata, ...]:
        """The records of type ``rdtype`` ("A", "MX", "PTR", ...) at ``name``, for callers that
        need them raw (SPF's mechanisms, DNSBL codes).

        Empty if there are none or ``name`` does not exist; raises ``DnsTemporaryError`` when
        no answer came, ``DnsPermanentError`` for a malformed name or type.
        """
        answer = await self._lookup(_normalize(name), _record_type(rdtype))
        if answer.error:
            raise DnsTemporaryError(answer.error)
        return answer.records or ()

    def cached(self, name: str, rdtype: str) -> tuple[dns.rdata.Rdata, ...] | None:
        """What ``records`` would give if this resolver has the answer already, without
        asking; None when it has not. Safe from any thread (one dict lookup)."""
        answer = self._cache.get((_normalize(name), _record_type(rdtype)))
        if answer is None:
            return None
        if answer.error:
            raise (DnsPermanentError if answer.permanent else DnsTemporaryError)(answer.error)
        return answer.records or ()

    # -- internals -------------------------------------------------------------------------------

    async def _lookup(self, name: str, rdtype: dns.rdatatype.RdataType) -> _Answer:
        key = (name, rdtype)
        answer = self._cache.get(key)
        if answer is None:
            answer = await self._ask(name, rdtype)
            self._cache[key] = answer
        if answer.permanent:
            raise DnsPermanentError(answer.error)
        return answer

    async def _ask(self, name: str, rdtype: dns.rdatatype.RdataType) -> _Answer:
        what = f"{dns.rdatatype.to_text(rdtype)} {name}"
        try:
            qname = dns.name.from_text(name)
        except (dns.exception.DNSException, UnicodeError, ValueError) as err:
            return _Answer(error=f"{name!r} is not a valid domain name: {err}", permanent=True)
        try:
            result = await self._dns.resolve(qname, rdtype, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return _Answer(records=None)
        except dns.resolver.YXDOMAIN as err:
            return _Answer(error=f"DNS lookup of {what}: {err}", permanent=True)
        except dns.resolver.LifetimeTimeout:
            return self._failed(what, "timed out")
        except dns.resolver.NoNameservers as err:
            return self._failed(what, _server_errors(err))
        except dns.exception.DNSException as err:
            return self._failed(what, str(err) or type(err).__name__)
        rrset = result.rrset
        return _Answer(records=tuple(rrset) if rrset is not None else ())

    @staticmethod
    def _failed(what: str, reason: str) -> _Answer:
        log.debug("DNS lookup of %s failed: %s", what, reason)
        return _Answer(error=f"DNS lookup of {what} failed: {reason}")


def _record_type(rdtype: str) -> dns.rdatatype.RdataType:
    try:
        return dns.rdatatype.from_text(rdtype)
    except dns.rdatatype.UnknownRdatatype:
        raise DnsPermanentError(f"unknown DNS record type {rdtype!r}") from None


def _normalize(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _host(name: dns.name.Name) -> str:
    """``mx.example.org`` for ``mx.example.org.``; ``""`` for the root (a null MX)."""
    return name.to_text(omit_final_dot=True).lower().rstrip(".") if name.labels != (b"",) else ""


def _server_errors(err: dns.resolver.NoNameservers) -> str:
    """``"SERVFAIL from 127.0.0.1@53"``, not dnspython's whole sentence."""
    parts = []
    for entry in err.kwargs.get("errors") or []:
        if isinstance(entry, tuple) and len(entry) >= 4:
            server, _tcp, _port, error = entry[:4]
            parts.append(f"{error} from {str(server).removeprefix('Do53:')}")
    return "; ".join(parts) or "no nameserver answered"


def _nameserver(entry: str) -> dns.nameserver.Nameserver:
    """``Do53Nameserver`` for ``"ip"``, ``"ip:port"`` or ``"[ipv6]:port"``."""
    text, port = entry.strip(), 53
    if text.startswith("["):
        address, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ConfigError(f"dns.nameservers: {entry!r} is not ip, ip:port or [ipv6]:port")
            port = int(rest[1:])
    elif text.count(":") == 1:
        address, _, port_text = text.partition(":")
        if not port_text.isdigit():
            raise ConfigError(f"dns.nameservers: {entry!r} is not ip, ip:port or [ipv6]:port")
        port = int(port_text)
    else:
        address = text
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise ConfigError(f"dns.nameservers: {entry!r} is not an IP address") from None
    if not 0 < port < 65536:
        raise ConfigError(f"dns.nameservers: {entry!r}: port out of range")
    return dns.nameserver.Do53Nameserver(address, port)
