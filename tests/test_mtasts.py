"""mailroom.mtasts: policy parsing and matching, and discovery against real DNS and HTTPS.

DNS is knotd on loopback (``mta-sts.<domain>`` -> 127.0.0.1); the policy host is Python's
http.server behind TLS on a free port, with a certificate from a CA made for the test.
"""

from __future__ import annotations

import asyncio
import datetime
import http.server
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailroom import mtasts
from mailroom.mtasts import Mode, Policy, PolicyError, parse_policy, parse_txt
from mailroom.resolver import Resolver
from tests import dnsserver

DnsServer = dnsserver.DnsServer
dns_server = dnsserver.dns_server  # the fixture

ENFORCE = (
    b"version: STSv1\r\nmode: enforce\r\nmx: mx.sts.test\r\nmx: *.backup.test\r\nmax_age: 86400\r\n"
)
TESTING = b"version: STSv1\nmode: testing\nmx: mx.sts.test\nmax_age: 600\n"


# -- parsing and matching (no I/O) ---------------------------------------------------------------


def test_parse_enforce_policy() -> None:
    policy = parse_policy(ENFORCE.decode(), "abc123")
    assert policy == Policy(Mode.ENFORCE, ("mx.sts.test", "*.backup.test"), 86400, "abc123")
    assert policy.mode == "enforce"


def test_parse_testing_policy_with_lf_line_ends() -> None:
    assert parse_policy(TESTING.decode()) == Policy(Mode.TESTING, ("mx.sts.test",), 600)


def test_parse_ignores_unknown_fields_and_blank_lines_and_caps_max_age() -> None:
    text = "version: STSv1\n\nmode:none\nfuture: yes\nmax_age: 9999999999\n"
    assert parse_policy(text) == Policy(Mode.NONE, (), mtasts.MAX_MAX_AGE)


@pytest.mark.parametrize(
    "text",
    [
        "mode: enforce\nmx: a.test\nmax_age: 1\n",  # no version
        "version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n",
        "version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmx: a.test\n",  # no max_age
        "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n",
        "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 1 day\n",
        "<html>version: STSv1</html>\n",
    ],
)
def test_invalid_policies(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_policy(text)


@pytest.mark.parametrize(
    ("records", "policy_id"),
    [
        (["v=STSv1; id=20261124T1"], "20261124T1"),
        (["v=STSv1;id=abc;"], "abc"),
        (["v=spf1 -all", "v=STSv1; id=x1; ext=foo"], "x1"),
        ([], None),
        (["v=spf1 -all"], None),
        (["v=STSv1; id=a", "v=STSv1; id=b"], None),  # RFC 8461 3.1: not exactly one
        (["v=STSv1"], None),  # no id
        (["v=STSv1; id=has-dash"], None),
        ([f"v=STSv1; id={'a' * 33}"], None),
        (["v=STSv10; id=a"], None),
    ],
)
def test_parse_txt(records: list[str], policy_id: str | None) -> None:
    assert parse_txt(records) == policy_id


@pytest.mark.parametrize(
    ("host", "matches"),
    [
        ("mx.sts.test", True),
        ("MX.STS.TEST.", True),
        ("mx2.sts.test", False),
        ("sts.test", False),
        ("a.backup.test", True),  # RFC 8461 4.1: the wildcard is one label
        ("a.b.backup.test", False),
        ("backup.test", False),
        (".backup.test", False),
        ("", False),
    ],
)
def test_matches(host: str, matches: bool) -> None:
    assert parse_policy(ENFORCE.decode()).matches(host) is matches


# -- a throwaway CA and a policy host ------------------------------------------------------------


class ThrowawayCA:
    """A CA made for one test, issuing server certificates (EC P-256, quick to make)."""

    def __init__(self, directory: Path, name: str = "mailroom test CA") -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                              content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False,
                              encipher_only=False, decipher_only=False),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )  # fmt: skip
        self.cert = directory / f"{id(self)}-ca.pem"
        self.cert.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))

    def issue(self, *names: str) -> tuple[Path, Path]:
        """A certificate (chain file) and key for ``names``."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )  # fmt: skip
        cert_path = self.directory / f"{names[0]}-{id(key)}.pem"
        key_path = cert_path.with_suffix(".key")
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_path, key_path


class PolicyHost:
    """``https://127.0.0.1:port/.well-known/mta-sts.txt`` serving ``body``; counts requests."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.body = ENFORCE
        self.status = 200
        self.content_type = "text/plain; charset=utf-8"
        self.chunked = False
        self.requests: list[tuple[str, str]] = []  # (path, Host header)
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                host.requests.append((self.path, self.headers.get("Host", "")))
                self.send_response(host.status)
                if host.status in (301, 302):
                    self.send_header("Location", "https://elsewhere.test/mta-sts.txt")
                self.send_header("Content-Type", host.content_type)
                self.send_header("Connection", "close")
                if host.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(0, len(host.body), 10):
                        chunk = host.body[i : i + 10]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self.send_header("Content-Length", str(len(host.body)))
                    self.end_headers()
                    self.wfile.write(host.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # failed handshakes are what some tests are about

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        self.server.socket = context.wrap_socket(
            self.server.socket, server_side=True, do_handshake_on_connect=False
        )
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def ca(tmp_path: Path) -> ThrowawayCA:
    return ThrowawayCA(tmp_path)


_domains = iter(range(1_000_000))


@pytest.fixture
def domain(dns_server: DnsServer) -> str:
    """A fresh domain per test, publishing id 1 and mta-sts.<domain> at 127.0.0.1."""
    name = f"sts{next(_domains)}.mtasts.test"
    publish(dns_server, name, "1")
    return name


def publish(dns: DnsServer, domain: str, *policy_ids: str) -> None:
    dns.set_zone(domain, [
        ("@", "MX", f"10 mx.{domain}."),
        ("mx", "A", "127.0.0.1"),
        ("mta-sts", "A", "127.0.0.1"),
        *(("_mta-sts", "TXT", f'"v=STSv1; id={policy_id}"') for policy_id in policy_ids),
    ])  # fmt: skip


@pytest.fixture
def host(ca: ThrowawayCA, domain: str) -> Iterator[PolicyHost]:
    server = PolicyHost(*ca.issue(f"mta-sts.{domain}"))
    yield server
    server.close()


class Clock:
    def __init__(self) -> None:
        self.time = time.time()

    def __call__(self) -> float:
        return self.time


def fetch_policy(
    dns: DnsServer,
    domain: str,
    host: PolicyHost,
    ca: ThrowawayCA,
    cache_dir: Path | None = None,
    now: Clock | None = None,
    timeout: float = mtasts.FETCH_TIMEOUT,
) -> Policy | None:
    """One policy lookup, with a fresh resolver as a new queue run would have."""
    return asyncio.run(
        mtasts.policy(
            domain,
            Resolver([dns.address], timeout=2),
            port=host.port,
            ca_file=ca.cert,
            cache_dir=cache_dir,
            now=now or time.time,
            timeout=timeout,
        )
    )


# -- discovery -----------------------------------------------------------------------------------


def test_enforce_policy_is_fetched(
    dns_server: DnsServer, domain: str, host: PolicyHost, ca: ThrowawayCA
) -> None:
    policy = fetch_policy(dns_server, domain, host, ca)
    assert policy == Policy(Mode.ENFORCE, ("mx.sts.test", "*.backup.test"), 86400, "1")
    assert policy.matches("mx.sts.test") and policy.matches("b.backup.test")
    assert not policy.matches(f"mx.{domain}")
    assert host.requests == [("/.well-known/mta-sts.txt", f"mta-sts.{domain}:{host.port}")]


def test_testing_policy_is_fetched_chunked(
    dns_server: DnsServer, domain: str, host: PolicyHost, ca: ThrowawayCA
) -> None:
    host.body, host.chunked = TESTING, True
    policy = fetch_policy(dns_server, domain, host, ca)
    assert policy == Policy(Mode.TESTING, ("mx.sts.test",), 600, "1")


def test_no_txt_record_no_policy_and_no_fetch(
    dns_server: DnsServer, domain: str, host: PolicyHost, ca: ThrowawayCA
) -> None:
    publish(dns_server, domain)
    assert fetch_policy(dns_server, domain, host, ca) is None
    assert host.requests == []


def test_two_sts_records_are_no_policy(
    dns_server: DnsServer, domain: str, host: PolicyHost, ca: ThrowawayCA
) -> None:
    publish(dns_server, domain, "1", "2")
    assert fetch_policy(dns_server, domain, host, ca) is None


def test_policy_is_cached_by_id(
    dns_server: DnsServer, domain: str, host: PolicyHost, ca: ThrowawayCA, tmp_path: Path
) -> None:
    cache = tmp_path / "mta-sts"
    first = fetch_policy(dns_server, domain, host, ca, cache)
    assert first is not None and first.mode == Mode.ENFORCE
    entry = json.loads((cache / f"{domain}.json").read_text())
    assert entry["id"] == "1" and entry["expires"] == pytest.approx(time.time() + 86400, abs=60)
    # Same id: the cached policy, no request (though the host now serves another one).
    host.body = TESTING
    assert fetch_policy(dns_server, domain, host, ca, cache) == first
    assert len(host.requests) == 1
    # A new id: fetched again.
    publish(dns_server, domain, "2")
    second = fetch_policy(dns_server, domain, host, ca, cache)
    assert second == Policy(Mode.TESTING, ("mx.sts.test",), 600, "2")
    assert len(host.requests) == 2
    assert json.loads((cache / f"{domain}.json").read_text())["id"] == "2"


def test_expired_cache_is_fetched_again(
    dns_server: DnsServer, domain: str, host: PolicyHost, ca: ThrowawayCA, tmp_path: Path
) -> None:
    clock = Clock()
    fetch_policy(dns_server, domain, host, ca, tmp_path, clock)
    clock.time += 86400 + 1
    host.body = TESTING
    policy = fetch_policy(dns_server, domain, host, ca, tmp_path, clock)
    assert policy is not None and policy.mode == Mode.TESTING
    assert len(host.requests) == 2


def test_certificate_from_an_unknown_ca_is_no_policy(
    dns_server: DnsServer,
    domain: str,
    ca: ThrowawayCA,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rogue = ThrowawayCA(tmp_path, "rogue CA")
    server = PolicyHost(*rogue.issue(f"mta-sts.{domain}"))
    try:
        assert fetch_policy(dns_server, domain, server, ca, tmp_path / "cache") is None
        assert server.requests == []
        assert "certificate not valid: unable to get local issuer certificate" in caplog.text
        assert not (tmp_path / "cache" / f"{domain}.json").exists()
    finally:
        server.close()


def test_certificate_for_another_name_is_no_policy(
    dns_server: DnsServer, domain: str, ca: ThrowawayCA, caplog: pytest.LogCaptureFixture
) -> None:
    server = PolicyHost(*ca.issue(domain, f"mx.{domain}"))
    try:
        assert fetch_policy(dns_server, domain, server, ca) is None
        assert server.requests == []
        assert "certificate not valid: Hostname mismatch" in caplog.text
    finally:
        server.close()


@pytest.mark.parametrize(
    ("status", "content_type", "body"),
    [
        (301, "text/plain", b""),  # RFC 8461 3.3: no redirects
        (404, "text/plain", b"not found"),
        (200, "text/html", ENFORCE),
        (200, "text/plain", ENFORCE + b"x" * (64 * 1024)),
        (200, "text/plain", b"<html>oops</html>"),
    ],
    ids=["redirect", "404", "html", "too-large", "not-a-policy"],
)
def test_unusable_answers_are_no_policy(
    dns_server: DnsServer,
    domain: str,
    host: PolicyHost,
    ca: ThrowawayCA,
    status: int,
    content_type: str,
    body: bytes,
) -> None:
    host.status, host.content_type, host.body = status, content_type, body
    assert fetch_policy(dns_server, domain, host, ca) is None
    assert len(host.requests) == 1


def test_cached_policy_is_kept_when_the_fetch_fails(
    dns_server: DnsServer, domain: str, host: PolicyHost, ca: ThrowawayCA, tmp_path: Path
) -> None:
    clock = Clock()
    cached = fetch_policy(dns_server, domain, host, ca, tmp_path, clock)
    assert cached is not None
    publish(dns_server, domain, "2")
    host.status = 500
    assert fetch_policy(dns_server, domain, host, ca, tmp_path, clock) == cached
    # An invalid certificate is a failed fetch too.
    rogue = PolicyHost(*ThrowawayCA(tmp_path, "rogue").issue(f"mta-sts.{domain}"))
    try:
        assert fetch_policy(dns_server, domain, rogue, ca, tmp_path, clock) == cached
    finally:
        rogue.close()
    # RFC 8461 5.1: a TXT record that disappears does not switch the cached policy off.
    publish(dns_server, domain)
    assert fetch_policy(dns_server, domain, host, ca, tmp_path, clock) == cached
    # Until it expires.
    clock.time += 86400 + 1
    assert fetch_policy(dns_server, domain, host, ca, tmp_path, clock) is None


def test_a_host_that_never_answers_times_out(
    dns_server: DnsServer, domain: str, ca: ThrowawayCA
) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        started = time.monotonic()
        policy = asyncio.run(
            mtasts.policy(domain, Resolver([dns_server.address]), port=port, ca_file=ca.cert,
                          timeout=0.5)
        )  # fmt: skip
        assert policy is None
        assert time.monotonic() - started < 3


def test_a_corrupt_cache_file_is_ignored(
    dns_server: DnsServer, domain: str, host: PolicyHost, ca: ThrowawayCA, tmp_path: Path
) -> None:
    (tmp_path / f"{domain}.json").write_text("{not json")
    policy = fetch_policy(dns_server, domain, host, ca, tmp_path)
    assert policy is not None and policy.id == "1"
    assert json.loads((tmp_path / f"{domain}.json").read_text())["id"] == "1"
