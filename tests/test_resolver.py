"""mailroom.resolver against a real authoritative server (knotd on loopback)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from mailroom.config import DNSSettings, Settings
from mailroom.errors import ConfigError, MailroomError
from mailroom.resolver import (
    DnsPermanentError,
    DnsTemporaryError,
    MxKind,
    MxResult,
    Resolver,
)
from tests import dnsserver

DnsServer = dnsserver.DnsServer
dns_server = dnsserver.dns_server  # the fixture

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def zone(dns_server: DnsServer) -> DnsServer:
    dns_server.set_zone("resolver.test", [
        ("@", "MX", "20 mx2.resolver.test."),
        ("@", "MX", "10 mx1a.resolver.test."),
        ("@", "MX", "10 mx1b.resolver.test."),
        ("@", "MX", "30 MX3.Resolver.Test."),
        ("mx1a", "A", "192.0.2.1"),
        ("mx1a", "AAAA", "2001:db8::1"),
        ("mx1b", "A", "192.0.2.2"),
        ("mx1b", "A", "192.0.2.3"),
        ("v6only", "AAAA", "2001:db8::6"),
        ("alias", "CNAME", "mx1b"),
        ("nomx", "A", "192.0.2.9"),
        ("null", "MX", "0 ."),
        ("nullplus", "MX", "0 ."),
        ("nullplus", "MX", "10 mx1a.resolver.test."),
        ("spf", "TXT", '"v=spf1 " "ip4:192.0.2.0/24 " "-all"'),
        ("multi", "TXT", '"first"'),
        ("multi", "TXT", '"second"'),
        ("empty.node", "A", "192.0.2.10"),  # node: exists, with no records of its own
    ])  # fmt: skip
    return dns_server


def resolver(server: DnsServer, timeout: float = 2.0) -> Resolver:
    return Resolver([server.address], timeout=timeout)


# -- MX ------------------------------------------------------------------------------------------


def test_mx_hosts_are_sorted_by_preference(zone: DnsServer) -> None:
    mx = run(resolver(zone).mx("resolver.test"))
    assert mx.kind == MxKind.HOSTS and str(mx.kind) == "hosts"
    assert mx.domain == "resolver.test"
    assert [pref for pref, _ in mx.hosts] == [10, 10, 20, 30]
    assert {host for _, host in mx.hosts[:2]} == {"mx1a.resolver.test", "mx1b.resolver.test"}
    assert mx.hosts[2:] == ((20, "mx2.resolver.test"), (30, "mx3.resolver.test"))


def test_mx_hosts_of_equal_preference_come_in_random_order(zone: DnsServer) -> None:
    """RFC 5321 5.1: equal preferences are tried in random order (each call shuffles anew)."""
    r = resolver(zone)

    async def firsts() -> set[str]:
        return {(await r.mx("resolver.test")).hosts[0][1] for _ in range(100)}

    assert run(firsts()) == {"mx1a.resolver.test", "mx1b.resolver.test"}


def test_null_mx(zone: DnsServer) -> None:
    mx = run(resolver(zone).mx("null.resolver.test"))
    assert mx == MxResult(MxKind.NULL_MX, "null.resolver.test")


def test_a_null_mx_among_other_records_is_skipped(zone: DnsServer) -> None:
    mx = run(resolver(zone).mx("nullplus.resolver.test"))
    assert mx.kind == MxKind.HOSTS
    assert mx.hosts == ((10, "mx1a.resolver.test"),)


def test_no_mx_records_means_the_domain_is_its_own_mx(zone: DnsServer) -> None:
    mx = run(resolver(zone).mx("nomx.resolver.test"))
    assert mx == MxResult(MxKind.NO_MX, "nomx.resolver.test", hosts=((0, "nomx.resolver.test"),))


def test_a_node_without_records_still_exists(zone: DnsServer) -> None:
    assert run(resolver(zone).mx("node.resolver.test")).kind == MxKind.NO_MX


def test_nxdomain(zone: DnsServer) -> None:
    mx = run(resolver(zone).mx("nowhere.resolver.test"))
    assert mx == MxResult(MxKind.NXDOMAIN, "nowhere.resolver.test")


def test_names_are_normalized(zone: DnsServer) -> None:
    mx = run(resolver(zone).mx("Resolver.TEST."))
    assert mx.domain == "resolver.test" and mx.kind == MxKind.HOSTS


def test_mx_result_is_immutable(zone: DnsServer) -> None:
    mx = run(resolver(zone).mx("resolver.test"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        mx.kind = MxKind.NXDOMAIN  # type: ignore[misc]


# -- addresses and TXT ---------------------------------------------------------------------------


def test_addresses_ipv4_then_ipv6(zone: DnsServer) -> None:
    r = resolver(zone)
    assert run(r.addresses("mx1a.resolver.test")) == ["192.0.2.1", "2001:db8::1"]
    assert sorted(run(r.addresses("mx1b.resolver.test"))) == ["192.0.2.2", "192.0.2.3"]
    assert run(r.addresses("v6only.resolver.test")) == ["2001:db8::6"]


def test_addresses_follow_a_cname(zone: DnsServer) -> None:
    assert sorted(run(resolver(zone).addresses("alias.resolver.test"))) == [
        "192.0.2.2",
        "192.0.2.3",
    ]


def test_no_addresses_is_an_empty_list(zone: DnsServer) -> None:
    r = resolver(zone)
    assert run(r.addresses("null.resolver.test")) == []  # exists, no A/AAAA
    assert run(r.addresses("nowhere.resolver.test")) == []  # NXDOMAIN


def test_txt_strings_of_a_record_are_joined(zone: DnsServer) -> None:
    r = resolver(zone)
    assert run(r.txt("spf.resolver.test")) == ["v=spf1 ip4:192.0.2.0/24 -all"]
    assert sorted(run(r.txt("multi.resolver.test"))) == ["first", "second"]
    assert run(r.txt("nomx.resolver.test")) == []
    assert run(r.txt("nowhere.resolver.test")) == []


# -- failures ------------------------------------------------------------------------------------


def test_a_silent_server_is_a_temporary_failure() -> None:
    r = Resolver([f"127.0.0.1:{dnsserver.free_udp_tcp_port()}"], timeout=0.3)
    started = time.monotonic()
    mx = run(r.mx("resolver.test"))
    assert mx.kind == MxKind.TEMPORARY and mx.hosts == ()
    assert "timed out" in mx.error
    with pytest.raises(DnsTemporaryError):
        run(r.addresses("mx1a.resolver.test"))
    with pytest.raises(DnsTemporaryError) as err:
        run(r.txt("spf.resolver.test"))
    assert isinstance(err.value, MailroomError) and not err.value.permanent
    assert time.monotonic() - started < 3


def test_a_refusing_server_is_a_temporary_failure(zone: DnsServer) -> None:
    """knotd answers REFUSED for a zone it does not serve (as SERVFAIL would be treated)."""
    mx = run(resolver(zone).mx("elsewhere.invalid"))
    assert mx.kind == MxKind.TEMPORARY
    assert "REFUSED" in mx.error


def test_a_malformed_name_is_a_permanent_error(zone: DnsServer) -> None:
    r = resolver(zone)
    with pytest.raises(DnsPermanentError) as err:
        run(r.mx("x" * 64 + ".resolver.test"))
    assert err.value.permanent
    with pytest.raises(DnsPermanentError):
        run(r.addresses("a..resolver.test"))


# -- cache ---------------------------------------------------------------------------------------


def test_answers_are_cached_for_the_life_of_the_resolver(dns_server: DnsServer) -> None:
    dns_server.set_zone("cache.resolver-test.test", [("@", "MX", "10 old.example.")])
    r = resolver(dns_server)
    assert run(r.mx("cache.resolver-test.test")).hosts == ((10, "old.example"),)
    dns_server.set_zone("cache.resolver-test.test", [("@", "MX", "10 new.example.")])
    assert run(r.mx("cache.resolver-test.test")).hosts == ((10, "old.example"),)
    assert run(resolver(dns_server).mx("cache.resolver-test.test")).hosts == ((10, "new.example"),)


def test_temporary_failures_are_cached_too() -> None:
    r = Resolver([f"127.0.0.1:{dnsserver.free_udp_tcp_port()}"], timeout=0.3)
    run(r.mx("resolver.test"))
    started = time.monotonic()
    assert run(r.mx("resolver.test")).kind == MxKind.TEMPORARY
    assert time.monotonic() - started < 0.1


def test_set_zone_accepts_zone_file_lines(dns_server: DnsServer) -> None:
    dns_server.set_zone("lines.resolver-test.test", ["@ 300 IN MX 5 mx.lines.resolver-test.test."])
    mx = run(resolver(dns_server).mx("lines.resolver-test.test"))
    assert mx.hosts == ((5, "mx.lines.resolver-test.test"),)


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "address", "port"),
    [("192.0.2.53", "192.0.2.53", 53), ("127.0.0.1:5353", "127.0.0.1", 5353),
     ("::1", "::1", 53), ("[::1]:5353", "::1", 5353), ("[2001:db8::53]", "2001:db8::53", 53)],
)  # fmt: skip
def test_nameserver_entries(entry: str, address: str, port: int) -> None:
    (server,) = Resolver([entry])._dns.nameservers
    assert (server.answer_nameserver(), server.answer_port()) == (address, port)  # type: ignore[union-attr]


@pytest.mark.parametrize("entry", ["ns.example.org", "127.0.0.1:dns", "127.0.0.1:0", "[::1]x"])
def test_bad_nameserver_entries_are_config_errors(entry: str) -> None:
    with pytest.raises(ConfigError, match="dns.nameservers"):
        Resolver([entry])


def test_from_settings(zone: DnsServer) -> None:
    settings = Settings(hostname="mail.example.test", dns=DNSSettings(nameservers=[zone.address]))
    for source in (settings, settings.dns):
        assert run(Resolver.from_settings(source).mx("null.resolver.test")).kind == MxKind.NULL_MX


def test_dns_server_is_gone_after_the_context() -> None:
    with DnsServer() as server:
        server.set_zone("gone.test", [("@", "A", "192.0.2.1")])
        proc = server._proc
        assert proc is not None and proc.poll() is None
    assert proc.poll() is not None
