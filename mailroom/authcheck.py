"""Inbound mail authentication: SPF, DKIM and DMARC verdicts, the ``Authentication-Results:``
header that records them, and the action policy takes on them.

What this module owns and promises:

- ``authenticate`` checks one message that arrived on port 25: SPF (RFC 7208, pyspf) of the
  MAIL FROM domain, or of the HELO name when MAIL FROM is ``<>``; every DKIM signature
  (RFC 6376, dkimpy; RSA and Ed25519); DMARC (RFC 7489) of the From: domain with the record of
  the organizational domain (``mailroom.psl``) as fallback, relaxed or strict alignment, p, sp
  and pct. It never raises: a failure inside a check is that check's ``temperror`` (or
  ``permerror``), logged.
- All DNS goes through the session's ``Resolver`` (answers cached for the session). pyspf and
  dkimpy are synchronous: they run in a worker thread whose lookups are handed to the event
  loop, so the loop keeps serving other sessions. The DNS time of one message is bounded by
  ``[inbound] dns_timeout_seconds`` over all its lookups; past it every check still waiting
  becomes ``temperror``.
- ``decide`` turns the verdicts into an ``Action`` (deliver, junk, reject) by ``[inbound]``:
  DMARC p=reject failing → reject, p=quarantine failing → junk, SPF fail without a DMARC
  record → junk, mail claiming one of our own domains without passing SPF or DKIM for it →
  reject (forged); a ``temperror`` never rejects or junks.
- ``Verdict.header`` is the RFC 8601 ``Authentication-Results:`` field with our authserv-id
  (the hostname); ``strip_authentication_results`` removes the fields that claim that id
  (RFC 8601 5) before ours is put on top.

pyspf and dkimpy are imported on the first message checked, not at start-up. pyspf looks up
DNS through its module-level ``DNSLookup``; it is replaced once by a function that asks the
calling thread's own lookup object, so concurrent checks never share a resolver.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from dataclasses import dataclass, field
from email.utils import getaddresses
from enum import StrEnum
from functools import lru_cache
from typing import Any, Protocol, TypeVar

from mailroom import psl
from mailroom.addresses import ATEXT, DOT_ATOM
from mailroom.config import InboundAction, InboundSettings
from mailroom.psl import PublicSuffixList
from mailroom.resolver import DnsPermanentError, DnsTemporaryError

log = logging.getLogger(__name__)

T = TypeVar("T")


class Action(StrEnum):
    """What happens to a checked message."""

    DELIVER = "deliver"  # INBOX
    JUNK = "junk"  # the recipient's Junk folder
    REJECT = "reject"  # 550 5.7.1 at the end of DATA, nothing stored


class Result(StrEnum):
    """RFC 8601 2.7 result codes (the ones SPF, DKIM and DMARC use)."""

    PASS = "pass"
    FAIL = "fail"
    SOFTFAIL = "softfail"
    NEUTRAL = "neutral"
    NONE = "none"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"


@dataclass(frozen=True, slots=True)
class SpfVerdict:
    """SPF of one identity: ``scope`` is ``mailfrom`` or ``helo`` (RFC 8601 2.7.2)."""

    result: Result
    scope: str
    domain: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class DkimVerdict:
    """One DKIM signature: its d=, s=, a= and what verifying it gave."""

    result: Result
    domain: str
    selector: str
    algorithm: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class DmarcVerdict:
    """DMARC of the From: domain.

    ``policy`` is the p= (or sp=) that applies, ``""`` when no record was found;
    ``disposition`` what the record asks for this message after pct (``none``,
    ``quarantine``, ``reject``); ``aligned`` whether SPF or DKIM passed aligned with the From:
    domain (relaxed when there is no record: used for our own domains).
    """

    result: Result
    from_domain: str
    policy: str = ""
    disposition: str = "none"
    record_domain: str = ""
    aligned: bool = False
    detail: str = ""
    used_sp: bool = False  # ``policy`` is the record's sp= (the From: domain is a subdomain)
    p: str = ""  # the record's p=


@dataclass(frozen=True, slots=True)
class Verdict:
    """Everything checked for one message and what is done with it."""

    spf: SpfVerdict
    dkim: tuple[DkimVerdict, ...]
    dmarc: DmarcVerdict
    action: Action = Action.DELIVER
    reason: str = ""

    def header(self, authserv_id: str) -> bytes:
        """The ``Authentication-Results:`` field (RFC 8601 2.2), folded, ending in CRLF."""
        results = [_spf_resinfo(self.spf)]
        results += [_dkim_resinfo(sig) for sig in self.dkim] or ["dkim=none"]
        results.append(_dmarc_resinfo(self.dmarc))
        body = ";\r\n\t".join([authserv_id, *results])
        return f"Authentication-Results: {body}\r\n".encode("utf-8", "replace")

    def journal_fields(self) -> dict[str, str]:
        """Structured log fields (``journalctl MAIL_ACTION=junk``)."""
        return {
            "MAIL_SPF": f"{self.spf.result} {self.spf.scope}={self.spf.domain}",
            "MAIL_DKIM": " ".join(f"{s.result}:{s.domain}/{s.selector}" for s in self.dkim)
            or "none",
            "MAIL_DMARC": f"{self.dmarc.result} from={self.dmarc.from_domain}"
            f" policy={self.dmarc.policy or '-'} disposition={self.dmarc.disposition}",
            "MAIL_ACTION": str(self.action),
            "MAIL_ACTION_REASON": self.reason,
        }

    def summary(self) -> str:
        dkim = ",".join(f"{s.result}:{s.domain}" for s in self.dkim) or "none"
        return (
            f"spf={self.spf.result} dkim={dkim} dmarc={self.dmarc.result}"
            f" action={self.action} ({self.reason})"
        )


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the SMTP session knows about the message's origin."""

    client_ip: str
    helo: str
    mail_from: str  # without <>; "" for the null sender


class Records(Protocol):
    """Where the checks ask DNS: ``mailroom.resolver.Resolver`` (tests pass a fake)."""

    async def records(self, name: str, rdtype: str) -> tuple[Any, ...]: ...

    def cached(self, name: str, rdtype: str) -> tuple[Any, ...] | None:
        """``records``' answer if it is known already (None if not), from any thread."""
        ...


@dataclass
class Checker:
    """Checks messages of one SMTP session: its resolver, its policy, a thread for pyspf/dkimpy."""

    resolver: Records
    policy: InboundSettings
    executor: Executor
    is_local_domain: Callable[[str], bool]
    random: Callable[[], float] = random.random  # for pct; tests pass a fixed one
    suffixes: PublicSuffixList | None = None  # None: Debian's list, read on first use
    # Which domains are ours, asked once a session (a transaction on the accounts database).
    _local: dict[str, bool] = field(default_factory=dict, init=False, repr=False)
    # SPF verdicts by origin: the session's DNS answers do not change, so neither do they.
    _spf: dict[Envelope, SpfVerdict] = field(default_factory=dict, init=False, repr=False)

    def organizational_domain(self, domain: str) -> str:
        if self.suffixes is None:
            self.suffixes = psl.default_list()
        return self.suffixes.organizational_domain(domain)

    def _is_local(self, domain: str) -> bool:
        # The accounts database answers on this thread (its connection belongs here).
        known = self._local.get(domain)
        if known is None:
            known = self._local[domain] = self.is_local_domain(domain)
        return known

    async def authenticate(self, message: bytes, envelope: Envelope) -> Verdict:
        """The verdicts on ``message`` and the action; never raises."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.policy.dns_timeout_seconds
        lookups = _Lookups(loop, self.resolver, deadline)
        from_domains = _from_domains(message)
        local = {d for d in from_domains if self._is_local(d)}
        mail_domain = _domain_of(envelope.mail_from)
        if mail_domain and self._is_local(mail_domain):
            local.add(mail_domain)
        try:
            spf, dkim, dmarc = await self._evaluated(message, envelope, from_domains, lookups)
        except Exception:
            log.exception("authentication checks failed; recorded as temperror")
            spf = SpfVerdict(Result.TEMPERROR, "mailfrom", mail_domain, "internal error")
            dkim = ()
            dmarc = DmarcVerdict(Result.TEMPERROR, ",".join(from_domains), detail="internal error")
        action, reason = decide(spf, dkim, dmarc, local, self.policy, self.organizational_domain)
        return Verdict(spf, dkim, dmarc, action, reason)

    async def _evaluated(
        self, message: bytes, envelope: Envelope, from_domains: list[str], lookups: _Lookups
    ) -> tuple[SpfVerdict, tuple[DkimVerdict, ...], DmarcVerdict]:
        """The three verdicts: right here when every DNS answer they need is in the session's
        cache and there is no DKIM signature to verify (a few hundred microseconds of CPU:
        cheaper than the hops to a worker thread and back), else on the executor."""
        spf = self._spf.get(envelope)
        verdicts = None
        if not _signed(message):
            known = _KnownAnswers(self.resolver)
            verdicts = self._evaluate(message, envelope, from_domains, known, spf)
            if known.missed:
                verdicts = None
        if verdicts is None:
            verdicts = await lookups.loop.run_in_executor(
                self.executor, self._evaluate, message, envelope, from_domains, lookups, spf
            )
        if verdicts[0].result != Result.TEMPERROR:
            self._spf[envelope] = verdicts[0]
        return verdicts

    def _evaluate(
        self,
        message: bytes,
        envelope: Envelope,
        from_domains: list[str],
        lookups: Answers,
        spf: SpfVerdict | None = None,
    ) -> tuple[SpfVerdict, tuple[DkimVerdict, ...], DmarcVerdict]:
        """The verdicts; ``spf`` if this origin's is known already."""
        if spf is None:
            spf = check_spf(envelope, lookups)
        dkim = check_dkim(message, lookups)
        dmarc = self.check_dmarc(from_domains, spf, dkim, lookups)
        return spf, dkim, dmarc

    # -- DMARC (RFC 7489) ------------------------------------------------------------------------

    def check_dmarc(
        self,
        from_domains: list[str],
        spf: SpfVerdict,
        dkim: tuple[DkimVerdict, ...],
        lookups: Answers,
    ) -> DmarcVerdict:
        # RFC 7489 6.6.1: exactly one author domain, or DMARC cannot be applied.
        if len(from_domains) != 1:
            detail = "no From: domain" if not from_domains else "more than one From: domain"
            return DmarcVerdict(Result.PERMERROR, ",".join(from_domains), detail=detail)
        (domain,) = from_domains
        org = self.organizational_domain(domain)
        try:
            # RFC 7489 6.6.3: the author domain's record, else the organizational domain's.
            record, record_domain = _dmarc_record(domain, lookups), domain
            if record is None and org != domain:
                record, record_domain = _dmarc_record(org, lookups), org
        except DnsTemporaryError as err:
            aligned = self._aligned(domain, spf, dkim, strict_spf=False, strict_dkim=False)
            return DmarcVerdict(Result.TEMPERROR, domain, aligned=aligned, detail=str(err))
        if record is None:
            aligned = self._aligned(domain, spf, dkim, strict_spf=False, strict_dkim=False)
            return DmarcVerdict(Result.NONE, domain, aligned=aligned)
        aligned = self._aligned(
            domain,
            spf,
            dkim,
            strict_spf=record.get("aspf") == "s",
            strict_dkim=record.get("adkim") == "s",
        )
        used_sp = record_domain != domain and "sp" in record
        policy = record["sp"] if used_sp else record["p"]
        p = record["p"]
        if aligned:
            return DmarcVerdict(
                Result.PASS, domain, policy, "none", record_domain, True, used_sp=used_sp, p=p
            )
        disposition = policy
        # RFC 7489 6.6.4: a message outside the pct sample gets the next weaker policy.
        if disposition != "none" and self.random() * 100 >= int(record.get("pct", "100")):
            disposition = "quarantine" if disposition == "reject" else "none"
        temporary = spf.result == Result.TEMPERROR or any(
            s.result == Result.TEMPERROR for s in dkim
        )
        result = Result.TEMPERROR if temporary else Result.FAIL
        return DmarcVerdict(
            result, domain, policy, disposition, record_domain, used_sp=used_sp, p=p
        )

    def _aligned(
        self,
        domain: str,
        spf: SpfVerdict,
        dkim: tuple[DkimVerdict, ...],
        *,
        strict_spf: bool,
        strict_dkim: bool,
    ) -> bool:
        """RFC 7489 3.1: an SPF or DKIM pass whose domain matches (strict) or shares the
        organizational domain (relaxed) with the From: domain."""

        def same(other: str, strict: bool) -> bool:
            other = other.lower().rstrip(".")
            if strict:
                return other == domain
            return self.organizational_domain(other) == self.organizational_domain(domain)

        if spf.result == Result.PASS and spf.domain and same(spf.domain, strict_spf):
            return True
        return any(s.result == Result.PASS and same(s.domain, strict_dkim) for s in dkim)


def warm_up() -> None:
    """Load pyspf, dkimpy and the Public Suffix List now rather than on the first message."""
    _import_spf()
    import dkim  # type: ignore[import-untyped]  # noqa: F401

    psl.default_list()


def decide(
    spf: SpfVerdict,
    dkim: tuple[DkimVerdict, ...],
    dmarc: DmarcVerdict,
    local_domains: set[str],
    policy: InboundSettings,
    organizational_domain: Callable[[str], str] = psl.organizational_domain,
) -> tuple[Action, str]:
    """The action for these verdicts and why, by ``[inbound]``."""
    temporary = (
        spf.result == Result.TEMPERROR
        or dmarc.result == Result.TEMPERROR
        or any(s.result == Result.TEMPERROR for s in dkim)
    )
    for domain in sorted(local_domains):
        # Our users send through submission (587/465), never through port 25: mail that says
        # it is from us must prove it, by SPF for the envelope or DKIM for the domain.
        org = organizational_domain(domain)
        proven = (spf.result == Result.PASS and spf.domain == domain) or any(
            s.result == Result.PASS and organizational_domain(s.domain) == org for s in dkim
        )
        if domain == dmarc.from_domain and dmarc.aligned:
            proven = True
        if not proven and not temporary:
            return _action(policy.own_domain_forgery_action), (
                f"claims our domain {domain} but neither SPF nor DKIM passes for it"
            )
    if dmarc.result == Result.FAIL:
        where = f"{dmarc.record_domain} {'sp' if dmarc.used_sp else 'p'}={dmarc.policy}"
        if dmarc.disposition == "reject":
            return _action(policy.dmarc_reject_action), f"DMARC fail, policy of {where}"
        if dmarc.disposition == "quarantine":
            return _action(policy.dmarc_quarantine_action), f"DMARC fail, policy of {where}"
        return Action.DELIVER, f"DMARC fail, policy of {where} (disposition none)"
    if dmarc.result == Result.NONE and spf.result == Result.FAIL:
        return _action(policy.spf_fail_action), f"SPF fail for {spf.domain}, no DMARC record"
    if temporary:
        return Action.DELIVER, "temporary DNS failure: accepted unchecked"
    return Action.DELIVER, "authentication accepted"


def _action(value: InboundAction) -> Action:
    return Action(value)


# -- SPF (RFC 7208) ------------------------------------------------------------------------------

_SPF_RESULTS = {r.value: r for r in Result}
_spf_installed = threading.Lock()
_thread = threading.local()


def check_spf(envelope: Envelope, lookups: Answers) -> SpfVerdict:
    """SPF of MAIL FROM's domain, or of HELO for the null sender (RFC 7208 2.4)."""
    spf = _import_spf()
    if envelope.mail_from:
        scope, domain = "mailfrom", _domain_of(envelope.mail_from)
    else:
        scope, domain = "helo", envelope.helo.lower().rstrip(".")
        # RFC 7208 2.3: HELO is checked only when it is a domain name.
        if not domain or domain.startswith("[") or "." not in domain:
            return SpfVerdict(Result.NONE, scope, domain, "HELO is not a domain name")
    if not domain:
        return SpfVerdict(Result.NONE, scope, domain, "no domain")
    _thread.lookups = lookups
    try:
        # RFC 7208 4.6.4 lookup limits (10 mechanisms, 2 void lookups) are pyspf's own.
        query = spf.query(
            i=envelope.client_ip, s=envelope.mail_from, h=envelope.helo, timeout=60, querytime=0
        )
        result, _code, explanation = query.check()
    except Exception as err:  # pyspf raises for malformed input (an IP it cannot parse, ...)
        log.warning("SPF check of %s failed: %s", domain, err)
        return SpfVerdict(Result.PERMERROR, scope, domain, str(err))
    finally:
        _thread.lookups = None
    return SpfVerdict(_SPF_RESULTS.get(str(result), Result.PERMERROR), scope, domain, explanation)


def _import_spf() -> Any:
    import spf  # type: ignore[import-untyped]

    with _spf_installed:
        if spf.DNSLookup is not _spf_lookup:
            spf.DNSLookup = _spf_lookup
    return spf


def _spf_lookup(name: str, qtype: str, strict: object = True, timeout: object = None) -> list[Any]:
    """pyspf's DNSLookup: ``[((name, qtype), value), ...]`` from this thread's ``_Lookups``."""
    import spf  # type: ignore[import-untyped]

    lookups: Answers | None = getattr(_thread, "lookups", None)
    if lookups is None:
        raise spf.TempError("DNS lookup outside a mailroom check")
    try:
        records = lookups.records(name, qtype)
    except DnsTemporaryError as err:
        raise spf.TempError(f"DNS {err}") from None
    except DnsPermanentError:
        return []
    key = (name, qtype)
    values: list[Any] = []
    for record in records:
        if qtype in ("A", "AAAA"):
            values.append(record.address)
        elif qtype == "MX":
            values.append((record.preference, record.exchange.to_text(omit_final_dot=True)))
        elif qtype == "PTR":
            values.append(record.target.to_text(omit_final_dot=True))
        elif qtype in ("TXT", "SPF"):
            values.append(list(record.strings))
    return [(key, value) for value in values]


# -- DKIM (RFC 6376, RFC 8463) -------------------------------------------------------------------

_QUIET = logging.getLogger("mailroom.authcheck.dkimpy")
_QUIET.propagate = False
_QUIET.addHandler(logging.NullHandler())
_QUIET.setLevel(logging.CRITICAL + 1)


def _signed(message: bytes) -> bool:
    """Whether the header names a ``DKIM-Signature:`` (parsing decides whether it is one)."""
    end = message.find(b"\r\n\r\n")
    return b"dkim-signature" in (message if end < 0 else message[:end]).lower()


def check_dkim(message: bytes, lookups: Answers) -> tuple[DkimVerdict, ...]:
    """One verdict per ``DKIM-Signature:`` field, in the order they appear."""
    if not _signed(message):
        return ()  # no need to parse the message
    import dkim  # type: ignore[import-untyped]
    from dkim.util import InvalidTagValueList, parse_tag_value  # type: ignore[import-untyped]

    try:
        verifier = dkim.DKIM(message, logger=_QUIET, minkey=1024)
    except dkim.DKIMException as err:
        return (DkimVerdict(Result.PERMERROR, "", "", "", f"message not parseable: {err}"),)
    signatures = [value for name, value in verifier.headers if name.lower() == b"dkim-signature"]
    verdicts = []
    for index, value in enumerate(signatures):
        try:
            tags = parse_tag_value(value)
        except (InvalidTagValueList, dkim.DKIMException):
            tags = {}
        domain = _text(tags.get(b"d", b"")).lower()
        selector = _text(tags.get(b"s", b""))
        algorithm = _text(tags.get(b"a", b""))

        def verdict(result: Result, detail: str = "") -> DkimVerdict:
            return DkimVerdict(result, domain, selector, algorithm, detail)  # noqa: B023

        key = _KeyLookup(lookups)
        try:
            ok = verifier.verify(idx=index, dnsfunc=key)
        except DnsTemporaryError as err:
            verdicts.append(verdict(Result.TEMPERROR, str(err)))
            continue
        except dkim.ValidationError as err:
            # A body hash that does not match is a failed verification, the rest (missing
            # tags, expired x=) a signature that cannot be used.
            failed = "body hash mismatch" in str(err)
            verdicts.append(verdict(Result.FAIL if failed else Result.PERMERROR, str(err)))
            continue
        except dkim.DKIMException as err:
            verdicts.append(verdict(Result.PERMERROR, str(err)))
            continue
        except Exception as err:  # dkimpy on input it did not expect
            log.warning("DKIM verification of d=%s s=%s failed: %s", domain, selector, err)
            verdicts.append(verdict(Result.PERMERROR, str(err)))
            continue
        if ok:
            verdicts.append(verdict(Result.PASS))
        elif key.asked and key.answer is None:
            verdicts.append(verdict(Result.PERMERROR, "no key published"))
        elif key.answer is not None and not _usable_key(key.name, key.answer):
            verdicts.append(verdict(Result.PERMERROR, "key record not usable"))
        else:
            verdicts.append(verdict(Result.FAIL, "signature did not verify"))
    return tuple(verdicts)


class _KeyLookup:
    """dkimpy's ``dnsfunc``: the key record, remembering what was found."""

    def __init__(self, lookups: Answers) -> None:
        self.lookups = lookups
        self.asked = False
        self.name = b""
        self.answer: bytes | None = None

    def __call__(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        self.asked = True
        self.name = name.encode() if isinstance(name, str) else name
        text = self.name.decode("ascii", "replace")
        try:
            records = self.lookups.records(text, "TXT")
        except DnsPermanentError:
            records = ()
        values = [b"".join(r.strings) for r in records]
        self.answer = values[0] if values else None
        return self.answer


def _usable_key(name: bytes, record: bytes) -> bool:
    import dkim  # type: ignore[import-untyped]

    try:
        dkim.evaluate_pk(name, record)
    except Exception:
        return False
    return True


# -- DMARC records -------------------------------------------------------------------------------

_DMARC_TAG = re.compile(r"^\s*([a-z]+)\s*=\s*(.*?)\s*$", re.I)
_POLICIES = ("none", "quarantine", "reject")


def _dmarc_record(domain: str, lookups: Answers) -> dict[str, str] | None:
    """The DMARC record at ``_dmarc.domain`` as tags, or None (RFC 7489 6.6.3: none, several,
    or one without a valid p= and no rua=)."""
    try:
        records = lookups.records(f"_dmarc.{domain}", "TXT")
    except DnsPermanentError:
        return None
    tags = _usable_dmarc(tuple(b"".join(r.strings).decode("utf-8", "replace") for r in records))
    return None if tags is None else dict(tags)


@lru_cache(maxsize=256)  # the same few records come with every message
def _usable_dmarc(texts: tuple[str, ...]) -> tuple[tuple[str, str], ...] | None:
    candidates = [t for t in texts if re.match(r"^v\s*=\s*DMARC1\s*(;|$)", t)]
    tags = parse_dmarc(candidates[0]) if len(candidates) == 1 else None
    return None if tags is None else tuple(tags.items())


def parse_dmarc(text: str) -> dict[str, str] | None:
    """The tags of one DMARC record (lower-case values), p= and sp= checked; None if unusable."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        match = _DMARC_TAG.match(part)
        if match:
            tags.setdefault(match.group(1).lower(), match.group(2))
    for name in ("p", "sp", "adkim", "aspf"):
        if name in tags:
            tags[name] = tags[name].lower()
    if tags.get("p") not in _POLICIES:
        # RFC 7489 6.6.3: with a rua= the record counts as p=none, otherwise it is ignored.
        if not tags.get("rua"):
            return None
        tags["p"] = "none"
    if "sp" in tags and tags["sp"] not in _POLICIES:
        del tags["sp"]
    pct = tags.get("pct", "100")
    tags["pct"] = str(min(100, max(0, int(pct)))) if pct.isdigit() else "100"
    return tags


# -- DNS for the synchronous checks --------------------------------------------------------------


class Answers(Protocol):
    """DNS for the synchronous checks (pyspf, dkimpy, DMARC)."""

    def records(self, name: str, rdtype: str) -> tuple[Any, ...]: ...


class _Lookups:
    """The session's ``Resolver`` for code on a worker thread, within one message's deadline:
    a known answer at once, any other asked on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, resolver: Records, deadline: float):
        self.loop = loop
        self.resolver = resolver
        self.deadline = deadline

    def records(self, name: str, rdtype: str) -> tuple[Any, ...]:
        known = self.resolver.cached(name, rdtype)
        if known is not None:
            return known
        return self._run(self.resolver.records(name, rdtype))

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            coroutine.close()
            raise DnsTemporaryError("DNS time for this message used up")
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(remaining)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise DnsTemporaryError("DNS time for this message used up") from None


class _KnownAnswers:
    """Only the answers the session's resolver has already, for checks on the event loop: a
    question it has no answer for fails as temporary and sets ``missed`` (the verdicts are
    then thrown away and made again on a worker thread, which may wait for DNS)."""

    def __init__(self, resolver: Records) -> None:
        self.resolver = resolver
        self.missed = False

    def records(self, name: str, rdtype: str) -> tuple[Any, ...]:
        known = self.resolver.cached(name, rdtype)
        if known is None:
            self.missed = True
            raise DnsTemporaryError(f"{rdtype} {name} not known yet")
        return known


# -- Authentication-Results (RFC 8601) -----------------------------------------------------------

# RFC 2045 5.1: a token is any CHAR but SPACE, CTLs and tspecials; other values are quoted.
_TOKEN = re.compile(r'^[^\x00-\x20\x7f()<>@,;:\\"/\[\]?=]+$')


def _value(text: str) -> str:
    if _TOKEN.match(text):
        return text
    clean = re.sub(r"[\x00-\x1f\x7f]", "?", text).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{clean}"'


def _reason(detail: str) -> str:
    return f" reason={_value(detail[:100])}" if detail else ""


def _spf_resinfo(spf: SpfVerdict) -> str:
    # RFC 8601 2.7.2: smtp.mailfrom or smtp.helo; the domain alone, no local-part.
    prop = f" smtp.{spf.scope}={_value(spf.domain)}" if spf.domain else ""
    return f"spf={spf.result}{prop}"


def _dkim_resinfo(sig: DkimVerdict) -> str:
    reason = _reason(sig.detail) if sig.result != Result.PASS else ""
    props = "".join(
        f" header.{name}={_value(value)}"
        for name, value in (("d", sig.domain), ("s", sig.selector), ("a", sig.algorithm))
        if value
    )
    return f"dkim={sig.result}{reason}{props}"


def _dmarc_resinfo(dmarc: DmarcVerdict) -> str:
    # RFC 7489 11.2: method dmarc, property header.from; the policy as a comment.
    comment = ""
    if dmarc.policy:
        sp = f" sp={dmarc.policy}" if dmarc.used_sp else ""
        comment = f" (p={dmarc.p}{sp} dis={dmarc.disposition})"
    prop = f" header.from={_value(dmarc.from_domain)}" if dmarc.from_domain else ""
    return f"dmarc={dmarc.result}{comment}{prop}"


_FIELD_START = re.compile(rb"(?m)^(?![ \t])")


def strip_authentication_results(message: bytes, authserv_id: str) -> tuple[bytes, int]:
    """``message`` without the ``Authentication-Results:`` fields whose authserv-id is
    ``authserv_id`` (case-insensitive, RFC 8601 5); and how many were removed."""
    end = message.find(b"\r\n\r\n")
    head, rest = (message, b"") if end < 0 else (message[: end + 2], message[end + 2 :])
    if b"authentication-results" not in head.lower():
        return message, 0
    fields = re.split(rb"(?m)(?<=\n)(?=[^ \t])", head)
    kept = [f for f in fields if not _claims(f, authserv_id)]
    return b"".join(kept) + rest, len(fields) - len(kept)


_AR_NAME = re.compile(rb"^authentication-results[ \t]*:", re.I)


def _claims(field_bytes: bytes, authserv_id: str) -> bool:
    match = _AR_NAME.match(field_bytes)
    if not match:
        return False
    value = field_bytes[match.end() :].decode("utf-8", "replace")
    return (authserv_id_of(value) or "").lower() == authserv_id.lower()


def authserv_id_of(value: str) -> str | None:
    """The authserv-id of an ``Authentication-Results:`` value: the first ``value`` after
    optional CFWS (RFC 8601 2.2); a token or a quoted-string."""
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if c in " \t\r\n":
            i += 1
        elif c == "(":  # RFC 5322 3.2.2 comments nest; a backslash quotes the next character
            depth = 0
            while i < n:
                if value[i] == "\\":
                    i += 2
                    continue
                depth += {"(": 1, ")": -1}.get(value[i], 0)
                i += 1
                if depth == 0:
                    break
        else:
            break
    if i >= n:
        return None
    if value[i] == '"':
        out, i = [], i + 1
        while i < n and value[i] != '"':
            if value[i] == "\\" and i + 1 < n:
                i += 1
            out.append(value[i])
            i += 1
        return "".join(out)
    match = re.match(r'[^\x00-\x20\x7f()<>@,;:\\"/\[\]?=]+', value[i:])
    return match.group(0) if match else None


# -- message and envelope parsing ----------------------------------------------------------------

_FROM_FIELD = re.compile(rb"(?im)^from[ \t]*:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)")  # without its CRLF


# A From: field as nearly every sender writes it: one address, bare or in angle brackets after
# a display name of atoms and quoted strings. Anything else goes to email's full parser.
_WORD = rf'(?:{ATEXT}|"[^"\\\r\n]*")'
_ADDR_SPEC = rf"{DOT_ATOM}@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_SIMPLE_FROM = re.compile(
    rf"[ \t]*(?:(?:{_WORD}(?:[ \t]+{_WORD})*[ \t]*)?<({_ADDR_SPEC})>|({_ADDR_SPEC}))[ \t]*"
)


def _from_domains(message: bytes) -> list[str]:
    """The distinct domains of the addresses in the From: field(s), lower case. DMARC needs
    exactly one (RFC 7489 6.6.1); none or several make its verdict permerror."""
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[: end + 2]
    texts = [f.decode("utf-8", "replace").replace("\r\n", "") for f in _FROM_FIELD.findall(head)]
    simple = [_SIMPLE_FROM.fullmatch(text) for text in texts]
    if all(simple):
        addresses = [m.group(1) or m.group(2) for m in simple if m]
    else:
        addresses = [address for _name, address in getaddresses(texts)]
    return list(dict.fromkeys(d for d in map(_domain_of, addresses) if d))


def _domain_of(address: str) -> str:
    address = address.strip().strip("<>")
    _, at, domain = address.rpartition("@")
    domain = domain.strip().rstrip(".").lower()
    if not at or not domain or not re.match(r"^[a-z0-9_.-]+$", domain, re.A):
        return ""
    return domain


def _text(value: bytes) -> str:
    return re.sub(rb"\s+", b"", value).decode("utf-8", "replace")
