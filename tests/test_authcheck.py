"""mailroom.authcheck and mailroom.psl in-process: the Public Suffix List algorithm, DMARC
records, Authentication-Results (syntax, stripping), the policy table, and whole checks
against a fake resolver (``FakeDns``), with DKIM signatures made by mailroom.dkim (RSA and
Ed25519). The same paths over real sockets, knotd and an independent signer are in
tests/test_inbound_auth.py."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest

from mailroom import dkim, psl
from mailroom.authcheck import (
    _SIMPLE_FROM,
    Action,
    Checker,
    DkimVerdict,
    DmarcVerdict,
    Envelope,
    Result,
    SpfVerdict,
    Verdict,
    _dmarc_record,
    _domain_of,
    _from_domains,
    authserv_id_of,
    check_spf,
    decide,
    parse_dmarc,
    strip_authentication_results,
)
from mailroom.config import InboundSettings
from mailroom.psl import PublicSuffixList, default_list
from mailroom.resolver import DnsTemporaryError

# -- Public Suffix List --------------------------------------------------------------------------

RULES = """
// comment
com
uk
co.uk
*.ck
!www.ck
*.kawasaki.jp
!city.kawasaki.jp
jp
github.io
"""


@pytest.mark.parametrize(
    ("name", "suffix", "org"),
    [
        ("example.com", "com", "example.com"),
        ("a.b.example.com", "com", "example.com"),
        ("a.b.example.co.uk", "co.uk", "example.co.uk"),
        ("co.uk", "co.uk", "co.uk"),  # a suffix is its own organizational domain
        ("foo.ck", "foo.ck", "foo.ck"),  # wildcard *.ck
        ("a.foo.ck", "foo.ck", "a.foo.ck"),
        ("www.ck", "ck", "www.ck"),  # exception !www.ck
        ("a.www.ck", "ck", "www.ck"),
        ("x.y.kawasaki.jp", "y.kawasaki.jp", "x.y.kawasaki.jp"),
        ("x.city.kawasaki.jp", "kawasaki.jp", "city.kawasaki.jp"),
        ("pages.alice.github.io", "github.io", "alice.github.io"),
        ("mail.example.test", "test", "example.test"),  # no rule: the implicit "*"
        ("Mail.Example.COM.", "com", "example.com"),
    ],
)
def test_public_suffix_rules(name: str, suffix: str, org: str) -> None:
    rules = PublicSuffixList(RULES)
    assert rules.public_suffix(name) == suffix
    assert rules.organizational_domain(name) == org


def test_organizational_domains_are_remembered_within_a_bound() -> None:
    rules = PublicSuffixList(RULES)
    for round_ in range(2):  # the second round answers from what the first remembered
        for i in range(psl.ORG_CACHE + 10):
            assert rules.organizational_domain(f"m.d{i}.co.uk") == f"d{i}.co.uk", round_
            assert len(rules._organizational) <= psl.ORG_CACHE
    assert rules.organizational_domain("a.www.ck") == "www.ck"


def test_debians_list_is_used() -> None:
    psl = default_list()
    assert psl.organizational_domain("mail.example.co.uk") == "example.co.uk"
    assert psl.organizational_domain("a.b.example.com") == "example.com"
    assert psl.organizational_domain("x.alice.github.io") == "alice.github.io"  # private section


# -- DMARC records -------------------------------------------------------------------------------


def test_parse_dmarc() -> None:
    assert parse_dmarc("v=DMARC1; p=Reject; sp=quarantine; pct=50; adkim=s") == {
        "v": "DMARC1",
        "p": "reject",
        "sp": "quarantine",
        "pct": "50",
        "adkim": "s",
    }
    assert parse_dmarc("v=DMARC1; p=bogus") is None  # RFC 7489 6.6.3: no usable policy
    assert parse_dmarc("v=DMARC1; p=bogus; rua=mailto:a@b.test")["p"] == "none"  # type: ignore[index]
    assert parse_dmarc("v=DMARC1; p=none; pct=300; sp=x") == {
        "v": "DMARC1",
        "p": "none",
        "pct": "100",
    }


def test_a_dmarc_record_is_parsed_once_and_each_caller_gets_its_own_tags() -> None:
    def rdata(*texts: str) -> tuple[Any, ...]:
        return tuple(
            dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT, txt(t)) for t in texts
        )

    class Zone:
        def records(self, name: str, rdtype: str) -> tuple[Any, ...]:
            return rdata("v=DMARC1; p=reject; pct=50", "unrelated")

    first = _dmarc_record("a.test", Zone())
    assert first == {"v": "DMARC1", "p": "reject", "pct": "50"}
    first["p"] = "none"
    assert _dmarc_record("a.test", Zone()) == {"v": "DMARC1", "p": "reject", "pct": "50"}

    class Two:
        def records(self, name: str, rdtype: str) -> tuple[Any, ...]:
            return rdata("v=DMARC1; p=reject", "v=DMARC1; p=none")

    assert _dmarc_record("a.test", Two()) is None  # RFC 7489 6.6.3: several records


def test_from_fast_path_finds_the_domains_the_full_parser_finds() -> None:
    """The From: fields nearly every sender writes skip email's parser; every input, odd ones
    too, gives the domains the parser gives."""
    import random
    from email.utils import getaddresses

    def parsed(fields: list[str]) -> list[str]:
        domains = (_domain_of(address) for _name, address in getaddresses(fields))
        return list(dict.fromkeys(d for d in domains if d))

    cases = [
        "a@b.c", "Name <a@b.c>", '"N, x" <a@b.c>', "=?utf-8?q?x?= <a@B.C>", "a@b.c>", "<a@b.c",
        "John Q. Public <a@b.c>", "a b <c@d.e>", "a@b.c, d@e.f", "(c) a@b.c", "<a@b.c> (c)",
        '"a@b.c" <d@e.f>', '"\\"" <a@b.c>', "a..b@c.d", "<>", "", "Undisclosed:;", "a@[1.2.3.4]",
        "<@x,@y:a@b.c>", "a@b_c.d", "a@-b.c", "Ü <a@b.c>", "a@ü.de", "\t a@b.c \t",
    ]  # fmt: skip
    pieces = [*'ab.@<> \t(),"[]-_:;\\!Ü1=?', "a@b.c", "<a@b.c>", "Name", '"x y"']
    rng = random.Random(7)
    cases += ["".join(rng.choices(pieces, k=rng.randint(1, 10))) for _ in range(30000)]
    names = ["", "Name ", "A B ", '"x, y" ', '"" ', "=?utf-8?q?=C3=BC?= ", "a.b ", "(c) "]
    addresses = ["a@b.c", "a.b@C.d", "a-b+c@d-e.f", "a@b", "a@b.c.", ".a@b.c", "a@b..c"]
    cases += [
        rng.choice(["", " ", "\t"]) + rng.choice(names) + rng.choice(["<{}>", "{}", "<{}"])
        .format(rng.choice(addresses)) + rng.choice(["", " ", ",", " (c)"])
        for _ in range(5000)
    ]  # fmt: skip
    fast = 0
    for case in cases:
        fields = [case] if len(case) % 3 else [case, "Other <o@other.test>"]
        message = "".join(f"From: {f}\r\n" for f in fields).encode() + b"\r\nbody\r\n"
        assert _from_domains(message) == parsed(fields), fields
        fast += all(_SIMPLE_FROM.fullmatch(f) for f in fields)
    assert fast > 500  # both paths ran


# -- Authentication-Results ----------------------------------------------------------------------

VERDICT = Verdict(
    SpfVerdict(Result.PASS, "mailfrom", "a.test"),
    (
        DkimVerdict(Result.PASS, "a.test", "s1", "rsa-sha256"),
        DkimVerdict(Result.FAIL, "b.test", "s2", "ed25519-sha256", "body hash mismatch"),
    ),
    DmarcVerdict(Result.PASS, "a.test", "reject", "none", "a.test", True, p="reject"),
)


def test_header_syntax() -> None:
    assert VERDICT.header("mail.example.test") == (
        b"Authentication-Results: mail.example.test;\r\n"
        b"\tspf=pass smtp.mailfrom=a.test;\r\n"
        b"\tdkim=pass header.d=a.test header.s=s1 header.a=rsa-sha256;\r\n"
        b'\tdkim=fail reason="body hash mismatch" header.d=b.test header.s=s2'
        b" header.a=ed25519-sha256;\r\n"
        b"\tdmarc=pass (p=reject dis=none) header.from=a.test\r\n"
    )


def test_header_quotes_hostile_values() -> None:
    verdict = Verdict(
        SpfVerdict(Result.NONE, "helo", ""),
        (DkimVerdict(Result.PERMERROR, 'x;y"z', "a=b", "", "no\r\nkey"),),
        DmarcVerdict(Result.PERMERROR, ""),
    )
    assert verdict.header("mx.test") == (
        b"Authentication-Results: mx.test;\r\n\tspf=none;\r\n"
        b'\tdkim=permerror reason="no??key" header.d="x;y\\"z" header.s="a=b";\r\n'
        b"\tdmarc=permerror\r\n"
    )


@pytest.mark.parametrize(
    ("value", "authserv_id"),
    [
        (" mail.example.test; spf=pass", "mail.example.test"),
        ("MAIL.Example.test 1; none", "MAIL.Example.test"),
        (" (comment (nested)) mail.example.test;", "mail.example.test"),
        ('\r\n\t"mail.example.test"; dkim=pass', "mail.example.test"),
        (" other.test; spf=pass", "other.test"),
        ("", None),
    ],
)
def test_authserv_id(value: str, authserv_id: str | None) -> None:
    assert authserv_id_of(value) == authserv_id


def test_strip_only_ours_and_only_in_the_header() -> None:
    message = (
        b"Authentication-Results: MAIL.EXAMPLE.TEST; spf=pass\r\n"
        b"Received: from x\r\n"
        b"authentication-results: (forged)\r\n mail.example.test;\r\n dkim=pass\r\n"
        b"Authentication-Results: mx.other.test; spf=fail\r\n"
        b"Subject: hi\r\n"
        b"\r\n"
        b"Authentication-Results: mail.example.test; quoted in the body\r\n"
    )
    stripped, count = strip_authentication_results(message, "mail.example.test")
    assert count == 2
    assert stripped == (
        b"Received: from x\r\n"
        b"Authentication-Results: mx.other.test; spf=fail\r\n"
        b"Subject: hi\r\n"
        b"\r\n"
        b"Authentication-Results: mail.example.test; quoted in the body\r\n"
    )


# -- policy --------------------------------------------------------------------------------------

POLICY = InboundSettings()
SPF_PASS = SpfVerdict(Result.PASS, "mailfrom", "a.test")
SPF_FAIL = SpfVerdict(Result.FAIL, "mailfrom", "a.test")
SPF_TEMP = SpfVerdict(Result.TEMPERROR, "mailfrom", "a.test")


def dmarc(
    result: Result, policy: str = "", disposition: str = "none", aligned: bool = False
) -> DmarcVerdict:
    return DmarcVerdict(
        result, "a.test", policy, disposition, "a.test" if policy else "", aligned, p=policy
    )


@pytest.mark.parametrize(
    ("spf", "dmarc_verdict", "local", "action"),
    [
        (SPF_PASS, dmarc(Result.PASS, "reject", aligned=True), set(), Action.DELIVER),
        (SPF_FAIL, dmarc(Result.FAIL, "reject", "reject"), set(), Action.REJECT),
        (SPF_FAIL, dmarc(Result.FAIL, "reject", "quarantine"), set(), Action.JUNK),  # pct
        (SPF_FAIL, dmarc(Result.FAIL, "quarantine", "quarantine"), set(), Action.JUNK),
        (SPF_FAIL, dmarc(Result.FAIL, "none", "none"), set(), Action.DELIVER),
        (SPF_FAIL, dmarc(Result.NONE), set(), Action.JUNK),  # SPF fail, no DMARC record
        (
            SpfVerdict(Result.SOFTFAIL, "mailfrom", "a.test"),
            dmarc(Result.NONE),
            set(),
            Action.DELIVER,
        ),
        (SPF_TEMP, dmarc(Result.TEMPERROR), set(), Action.DELIVER),
        (
            SpfVerdict(Result.NONE, "mailfrom", "a.test"),
            dmarc(Result.NONE),
            {"a.test"},
            Action.REJECT,
        ),
        (SPF_PASS, dmarc(Result.NONE, aligned=True), {"a.test"}, Action.DELIVER),
        (SPF_TEMP, dmarc(Result.NONE), {"a.test"}, Action.DELIVER),  # temperror never rejects
    ],
)
def test_decide(
    spf: SpfVerdict, dmarc_verdict: DmarcVerdict, local: set[str], action: Action
) -> None:
    assert decide(spf, (), dmarc_verdict, local, POLICY)[0] == action


def test_decide_follows_the_configured_actions() -> None:
    policy = InboundSettings(
        dmarc_reject_action="junk", spf_fail_action="deliver", own_domain_forgery_action="junk"
    )
    assert (
        decide(SPF_FAIL, (), dmarc(Result.FAIL, "reject", "reject"), set(), policy)[0]
        == Action.JUNK
    )
    assert decide(SPF_FAIL, (), dmarc(Result.NONE), set(), policy)[0] == Action.DELIVER
    assert decide(SPF_FAIL, (), dmarc(Result.NONE), {"a.test"}, policy)[0] == Action.JUNK


# -- whole checks against a fake resolver --------------------------------------------------------


class FakeDns:
    """``Records`` from a dict ``{(name, type): [zone-file values]}``; ``delay`` per question."""

    def __init__(self, zone: dict[tuple[str, str], list[str]], delay: float = 0) -> None:
        self.zone = zone
        self.delay = delay
        self.asked: list[tuple[str, str]] = []

    def cached(self, name: str, rdtype: str) -> tuple[Any, ...] | None:
        return None  # every check goes to the executor and asks

    async def records(self, name: str, rdtype: str) -> tuple[Any, ...]:
        name = name.rstrip(".").lower()
        self.asked.append((name, rdtype))
        if self.delay:
            await asyncio.sleep(self.delay)
        if (name, rdtype) in self.zone and self.zone[(name, rdtype)] == ["SERVFAIL"]:
            raise DnsTemporaryError(f"SERVFAIL for {name}")
        kind = dns.rdatatype.from_text(rdtype)
        return tuple(
            dns.rdata.from_text(dns.rdataclass.IN, kind, value)
            for value in self.zone.get((name, rdtype), [])
        )


def txt(value: str) -> str:
    return " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))


def run_check(
    zone: dict[tuple[str, str], list[str]],
    message: bytes,
    *,
    ip: str = "192.0.2.1",
    mail_from: str = "bounce@a.test",
    helo: str = "mx.a.test",
    local: tuple[str, ...] = (),
    random: float = 0.5,
    delay: float = 0,
    policy: InboundSettings = POLICY,
) -> Verdict:
    async def check() -> Verdict:
        with ThreadPoolExecutor(2) as executor:
            checker = Checker(
                FakeDns(zone, delay), policy, executor, lambda d: d in local, lambda: random
            )
            return await checker.authenticate(message, Envelope(ip, helo, mail_from))

    return asyncio.run(check())


def message(sender: str = "alice@a.test", body: str = "Hello.\r\n") -> bytes:
    return f"From: Alice <{sender}>\r\nTo: bob@example.test\r\nSubject: hi\r\n\r\n{body}".encode()


SPF_A = {("a.test", "TXT"): [txt("v=spf1 ip4:192.0.2.1 -all")]}


@pytest.mark.parametrize(("ip", "result"), [("192.0.2.1", Result.PASS), ("192.0.2.2", Result.FAIL)])
def test_spf(ip: str, result: Result) -> None:
    verdict = run_check(SPF_A, message(), ip=ip)
    assert verdict.spf == SpfVerdict(result, "mailfrom", "a.test", verdict.spf.detail)


def test_spf_of_helo_for_the_null_sender() -> None:
    zone = {("mx.a.test", "TXT"): [txt("v=spf1 a -all")], ("mx.a.test", "A"): ["192.0.2.1"]}
    verdict = run_check(zone, message(), mail_from="")
    assert (verdict.spf.result, verdict.spf.scope, verdict.spf.domain) == (
        "pass",
        "helo",
        "mx.a.test",
    )


def test_spf_lookup_limit_is_permerror() -> None:
    # RFC 7208 4.6.4: more than 10 mechanisms that need DNS.
    zone = {
        ("a.test", "TXT"): [
            txt("v=spf1 " + " ".join(f"a:h{i}.a.test" for i in range(12)) + " -all")
        ]
    }
    zone.update({(f"h{i}.a.test", "A"): ["192.0.2.99"] for i in range(12)})
    assert run_check(zone, message()).spf.result == Result.PERMERROR


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> list[dkim.DkimKey]:
    return dkim.generate(tmp_path_factory.mktemp("dkim"), "a.test")


def signed(keys: list[dkim.DkimKey], body: str = "Hello.\r\n") -> bytes:
    original = message(body=body)
    return dkim.sign(original, keys) + original


def key_zone(keys: list[dkim.DkimKey]) -> dict[tuple[str, str], list[str]]:
    return {(name, "TXT"): [txt(value)] for name, value in dkim.dns_records(keys)}


def test_dkim_rsa_and_ed25519_pass(keys: list[dkim.DkimKey]) -> None:
    verdict = run_check(key_zone(keys), signed(keys), ip="192.0.2.9")
    assert [(s.result, s.algorithm) for s in verdict.dkim] == [
        ("pass", "rsa-sha256"),
        ("pass", "ed25519-sha256"),
    ]
    assert verdict.dmarc.aligned


def test_dkim_body_changed_after_signing_fails(keys: list[dkim.DkimKey]) -> None:
    tampered = signed(keys).replace(b"Hello.", b"Hellx.")
    verdict = run_check(key_zone(keys), tampered)
    assert [s.result for s in verdict.dkim] == ["fail", "fail"]
    assert "body hash" in verdict.dkim[0].detail


def test_dkim_without_a_published_key_is_permerror(keys: list[dkim.DkimKey]) -> None:
    verdict = run_check({}, signed(keys))
    assert [s.result for s in verdict.dkim] == ["permerror", "permerror"]


def test_dkim_key_servfail_is_temperror(keys: list[dkim.DkimKey]) -> None:
    zone = {name: ["SERVFAIL"] for name in key_zone(keys)}
    verdict = run_check(zone, signed(keys))
    assert [s.result for s in verdict.dkim] == ["temperror", "temperror"]


DMARC = "_dmarc.a.test"


@pytest.mark.parametrize(
    ("record", "random", "result", "disposition", "action"),
    [
        ("v=DMARC1; p=reject", 0.5, "fail", "reject", Action.REJECT),
        ("v=DMARC1; p=reject; pct=40", 0.5, "fail", "quarantine", Action.JUNK),  # outside pct
        ("v=DMARC1; p=reject; pct=60", 0.5, "fail", "reject", Action.REJECT),
        ("v=DMARC1; p=quarantine", 0.5, "fail", "quarantine", Action.JUNK),
        ("v=DMARC1; p=none", 0.5, "fail", "none", Action.DELIVER),
    ],
)
def test_dmarc_policy_and_pct(
    record: str, random: float, result: str, disposition: str, action: Action
) -> None:
    zone = {**SPF_A, (DMARC, "TXT"): [txt(record)]}
    verdict = run_check(zone, message(), ip="192.0.2.2", random=random)
    assert (verdict.dmarc.result, verdict.dmarc.disposition, verdict.action) == (
        result,
        disposition,
        action,
    )


def test_dmarc_subdomain_policy_from_the_organizational_domain() -> None:
    zone = {
        ("news.a.test", "TXT"): [txt("v=spf1 -all")],
        (DMARC, "TXT"): [txt("v=DMARC1; p=none; sp=reject")],
    }
    verdict = run_check(zone, message("x@news.a.test"), mail_from="x@news.a.test")
    assert (verdict.dmarc.policy, verdict.dmarc.used_sp, verdict.dmarc.record_domain) == (
        "reject",
        True,
        "a.test",
    )
    assert verdict.action == Action.REJECT
    assert ("_dmarc.news.a.test", "TXT") in verdict_asked(zone, message("x@news.a.test"))


def verdict_asked(zone: dict[tuple[str, str], list[str]], msg: bytes) -> list[tuple[str, str]]:
    fake = FakeDns(zone)

    async def check() -> None:
        with ThreadPoolExecutor(1) as executor:
            await Checker(fake, POLICY, executor, lambda d: False).authenticate(
                msg, Envelope("192.0.2.1", "h.test", "x@news.a.test")
            )

    asyncio.run(check())
    return fake.asked


@pytest.mark.parametrize(("aspf", "result"), [("r", "pass"), ("s", "fail")])
def test_dmarc_spf_alignment_relaxed_and_strict(aspf: str, result: str) -> None:
    zone = {
        ("bounces.a.test", "TXT"): [txt("v=spf1 ip4:192.0.2.1 -all")],
        (DMARC, "TXT"): [txt(f"v=DMARC1; p=reject; aspf={aspf}")],
    }
    verdict = run_check(zone, message(), mail_from="x@bounces.a.test")
    assert verdict.spf.result == "pass"
    assert verdict.dmarc.result == result


def test_own_domain_forgery_is_rejected() -> None:
    verdict = run_check(
        {}, message("boss@example.test"), mail_from="x@elsewhere.test", local=("example.test",)
    )
    assert verdict.action == Action.REJECT
    assert "example.test" in verdict.reason


def test_dns_timeout_is_temperror_within_the_budget() -> None:
    policy = InboundSettings(dns_timeout_seconds=0.5)
    start = time.monotonic()
    verdict = run_check(SPF_A, message(), delay=10, policy=policy)
    assert time.monotonic() - start < 3
    assert (verdict.spf.result, verdict.dmarc.result, verdict.action) == (
        "temperror",
        "temperror",
        Action.DELIVER,
    )


class RememberingDns(FakeDns):
    """``FakeDns`` that knows what it has answered, as a session's ``Resolver`` does."""

    def __init__(self, zone: dict[tuple[str, str], list[str]]) -> None:
        super().__init__(zone)
        self.known: dict[tuple[str, str], tuple[Any, ...]] = {}

    def cached(self, name: str, rdtype: str) -> tuple[Any, ...] | None:
        return self.known.get((name.rstrip(".").lower(), rdtype))

    async def records(self, name: str, rdtype: str) -> tuple[Any, ...]:
        found = await super().records(name, rdtype)
        self.known[(name.rstrip(".").lower(), rdtype)] = found
        return found


def _session(
    zone: dict[tuple[str, str], list[str]], *ips: str, shutdown_after_first: bool = False
) -> tuple[list[Verdict], list[tuple[str, str]]]:
    """The verdicts on one message from each of ``ips`` in one session, and what DNS was asked."""

    async def check() -> list[Verdict]:
        with ThreadPoolExecutor(1) as executor:
            checker = Checker(answers, POLICY, executor, lambda d: False, lambda: 0.5)
            verdicts = []
            for ip in ips:
                verdicts.append(
                    await checker.authenticate(message(), Envelope(ip, "mx.a.test", "b@a.test"))
                )
                if shutdown_after_first:
                    executor.shutdown()  # from now on, a check given to it fails (temperror)
            return verdicts

    answers = RememberingDns(zone)
    return asyncio.run(check()), answers.asked


def test_the_sessions_next_message_is_checked_from_known_answers_alone() -> None:
    zone = {**SPF_A, ("_dmarc.a.test", "TXT"): [txt("v=DMARC1; p=reject")]}
    (first, second), asked = _session(zone, "192.0.2.1", "192.0.2.1", shutdown_after_first=True)
    assert (first.spf.result, first.dmarc.result) == ("pass", "pass")
    assert second == first  # checked on the event loop: the executor was shut down
    assert sorted(asked) == [("_dmarc.a.test", "TXT"), ("a.test", "TXT")]


def test_a_question_not_answered_yet_sends_the_check_to_the_executor() -> None:
    # The second client fails SPF, and pyspf then wants the exp= explanation: not known yet.
    zone = {
        ("a.test", "TXT"): [txt("v=spf1 ip4:192.0.2.1 exp=why.a.test -all")],
        ("why.a.test", "TXT"): [txt("not our server")],
        ("_dmarc.a.test", "TXT"): [txt("v=DMARC1; p=none")],
    }
    (passed, failed), asked = _session(zone, "192.0.2.1", "192.0.2.2")
    assert (passed.spf.result, failed.spf.result) == ("pass", "fail")
    assert ("why.a.test", "TXT") in asked
    assert failed.spf.detail == "not our server"
    assert failed == run_check(zone, message(), ip="192.0.2.2", mail_from="b@a.test")


def test_a_session_asks_the_accounts_once_per_domain() -> None:
    asked: list[str] = []

    def local(domain: str) -> bool:
        asked.append(domain)
        return domain == "a.test"

    async def check() -> list[Verdict]:
        with ThreadPoolExecutor(1) as executor:
            checker = Checker(FakeDns(SPF_A), POLICY, executor, local, lambda: 0.5)
            envelope = Envelope("192.0.2.2", "mx.a.test", "b@a.test")  # SPF fails: a forgery
            return [await checker.authenticate(message(), envelope) for _ in range(3)]

    verdicts = asyncio.run(check())
    assert [v.action for v in verdicts] == [Action.REJECT] * 3  # ours, not passing: forged
    assert asked == ["a.test"]


def test_a_session_evaluates_spf_once_per_origin(monkeypatch: pytest.MonkeyPatch) -> None:
    from mailroom import authcheck

    evaluated: list[Envelope] = []

    def counted(envelope: Envelope, lookups: Any) -> SpfVerdict:
        evaluated.append(envelope)
        return check_spf(envelope, lookups)

    monkeypatch.setattr(authcheck, "check_spf", counted)
    zone = {**SPF_A, ("_dmarc.a.test", "TXT"): [txt("v=DMARC1; p=reject")]}
    origins = [("192.0.2.1", "b@a.test")] * 3 + [
        ("192.0.2.2", "b@a.test"),
        ("192.0.2.1", "c@a.test"),
    ]

    async def check() -> list[tuple[Verdict, int]]:
        with ThreadPoolExecutor(1) as executor:
            checker = Checker(RememberingDns(zone), POLICY, executor, lambda d: False)
            results = []
            for ip, sender in origins:
                envelope = Envelope(ip, "mx.a.test", sender)
                results.append((await checker.authenticate(message(), envelope), len(evaluated)))
            return results

    verdicts, counts = zip(*asyncio.run(check()), strict=True)
    assert [v.spf.result for v in verdicts] == ["pass"] * 3 + ["fail", "pass"]
    assert verdicts[1] == verdicts[2] == verdicts[0]
    # The same origin again: no new evaluation. A new sender or client: evaluated.
    assert counts[0] == counts[1] == counts[2] < counts[3] < counts[4]
    assert {(e.client_ip, e.mail_from) for e in evaluated} == set(origins)


def test_checks_import_lazily(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = "import sys, mailroom.smtpd; print(sorted({'spf', 'dkim', 'dns'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_journal_fields() -> None:
    verdict = Verdict(VERDICT.spf, VERDICT.dkim, VERDICT.dmarc, Action.JUNK, "why")
    assert verdict.journal_fields() == {
        "MAIL_SPF": "pass mailfrom=a.test",
        "MAIL_DKIM": "pass:a.test/s1 fail:b.test/s2",
        "MAIL_DMARC": "pass from=a.test policy=reject disposition=none",
        "MAIL_ACTION": "junk",
        "MAIL_ACTION_REASON": "why",
    }


def test_without_a_list_only_the_implicit_rule_applies(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        PublicSuffixList.load(tmp_path / "missing.dat")
    assert PublicSuffixList("").organizational_domain("a.b.example.co.uk") == "co.uk"
