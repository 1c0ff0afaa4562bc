"""TLS of the servers (mailroom.tls), against real servers on real sockets.

- sslyze finds 993 and 465 compliant with Mozilla intermediate (5.7), and port 25 not (its
  wider suites: the check can fail); TLS 1.0 and 1.1 handshakes fail on the client ports.
- A pair replaced under running servers: the next connection (implicit TLS and STARTTLS)
  gets the new certificate, open connections carry on, and a certificate without its key
  (the deploy hook's two renames) or a half-written file is never served: the old pair is.
- SNI picks the pair per name; an unknown name, or none, gets the default.
- Port 25 accepts a suite outside intermediate (and TLS 1.0 when configured); 465 does not.
"""

from __future__ import annotations

import datetime
import hashlib
import imaplib
import os
import smtplib
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from sslyze.connection_helpers.opportunistic_tls_helpers import ProtocolWithOpportunisticTlsEnum
from sslyze.mozilla_tls_profile.tls_config_checker import (
    SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
    MozillaTlsConfiguration,
    ServerNotCompliantWithTlsConfiguration,
    TlsConfigurationEnum,
    check_server_against_tls_configuration,
)
from sslyze.plugins.certificate_info.implementation import CertificateInfoExtraArgument
from sslyze.scanner.models import ScanCommandsExtraArguments, ServerScanRequest
from sslyze.scanner.scanner import Scanner
from sslyze.server_setting import ServerNetworkConfiguration, ServerNetworkLocation

from mailroom.accounts import Accounts
from mailroom.tls import CHECK_INTERVAL, CertPair, ServerTLS
from tests.conftest import HOSTNAME, MailEnv, Server, write_config

OTHER = "mail.example.net"  # a second name, served through [[tls.sni]]

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class CA:
    """A test certificate authority; ``pem`` is what clients (and sslyze) trust."""

    def __init__(self, directory: Path) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailroom test CA")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.pem = directory / "ca.pem"
        self.pem.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, key: PrivateKey) -> bytes:
        """A 90-day leaf for ``name``, as PEM (the chain: leaf only, the CA is trusted)."""
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=90))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def install(path: Path, data: bytes) -> None:
    """What the deploy hook does for one file: write a new file, rename it into place."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def fingerprint(pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def client_context(ca: CA) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca.pem))
    context.check_hostname = False  # the test picks names for SNI; the chain is still verified
    return context


def seen(sock: ssl.SSLSocket | socket.socket | None) -> str:
    """The SHA-256 fingerprint of the certificate the server sent."""
    assert isinstance(sock, ssl.SSLSocket)
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def cipher(sock: ssl.SSLSocket) -> str:
    negotiated = sock.cipher()
    assert negotiated is not None
    return negotiated[0]


def implicit(port: int, context: ssl.SSLContext, name: str | None = None) -> ssl.SSLSocket:
    """A TLS connection to an implicit-TLS port (993, 465), SNI ``name``; greeting read."""
    sock = context.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname=name
    )
    assert sock.recv(4096)  # "* OK" or "220"
    return sock


def starttls(kind: str, port: int, context: ssl.SSLContext) -> str:
    """The fingerprint a STARTTLS client sees on ``port`` (``kind`` "imap" or "smtp")."""
    if kind == "imap":
        with imaplib.IMAP4("127.0.0.1", port, timeout=10) as imap:
            imap.starttls(context)
            fp = seen(imap.socket())
            imap.noop()
            return fp
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.starttls(context=context)
        fp = seen(smtp.sock)
        smtp.ehlo()
        return fp


@dataclass
class TLSEnv:
    env: MailEnv
    ca: CA
    cert: Path
    key: Path
    current: bytes  # the default certificate (PEM) installed now
    other: bytes  # the certificate of OTHER (SNI)

    def replace(self) -> bytes:
        """A new default pair, both files renamed into place; returns the certificate."""
        key = rsa_key()
        cert = self.ca.issue(HOSTNAME, key)
        install(self.cert, cert)
        install(self.key, key_pem(key))
        self.current = cert
        return cert


@pytest.fixture
def tls_env(tmp_path: Path) -> TLSEnv:
    """A data directory whose default pair (RSA, HOSTNAME) and SNI pair (ECDSA, OTHER) the
    test may replace; config: [tls] cert/key plus one [[tls.sni]]."""
    (tmp_path / "data").mkdir(mode=0o750)
    tls = tmp_path / "tls"
    tls.mkdir()
    ca = CA(tmp_path)
    key = rsa_key()
    cert, cert_path, key_path = ca.issue(HOSTNAME, key), tls / "fullchain.pem", tls / "privkey.pem"
    install(cert_path, cert)
    install(key_path, key_pem(key))
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = ca.issue(OTHER, other_key)
    (tls / OTHER).mkdir()
    install(tls / OTHER / "fullchain.pem", other)
    install(tls / OTHER / "privkey.pem", key_pem(other_key))
    config = write_config(
        tmp_path, (cert_path, key_path), idle_exit_seconds=30, shutdown_grace_seconds=2
    )
    with config.open("a") as f:
        f.write(
            f'[[tls.sni]]\nhostname = "{OTHER}"\n'
            f'cert = "{tls / OTHER / "fullchain.pem"}"\nkey = "{tls / OTHER / "privkey.pem"}"\n'
        )
    env = MailEnv(tmp_path, config)
    with Accounts(env.data_dir / "auth.sqlite3") as accounts:
        accounts.add_domain("example.test")
    return TLSEnv(env, ca, cert_path, key_path, cert, other)


def serve(env: MailEnv, program: str, names: tuple[str, ...]) -> Iterator[Server]:
    server = Server(env, program, names)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def imapd(tls_env: TLSEnv) -> Iterator[Server]:
    yield from serve(tls_env.env, "mailroom-imapd", ("imaps", "imap"))


@pytest.fixture
def submission(tls_env: TLSEnv) -> Iterator[Server]:
    yield from serve(tls_env.env, "mailroom-submission", ("submissions", "submission"))


def wait_for_check() -> None:
    """Past the servers' rate limit on looking at the files."""
    time.sleep(CHECK_INTERVAL + 0.2)


# -- the scanner ---------------------------------------------------------------------------


def mozilla_issues(port: int, ca: CA, protocol: str | None = None) -> dict[str, str]:
    """What sslyze finds against Mozilla intermediate on ``port`` ({} when compliant)."""
    opportunistic = ProtocolWithOpportunisticTlsEnum[protocol] if protocol else None
    request = ServerScanRequest(
        server_location=ServerNetworkLocation(HOSTNAME, port, ip_address="127.0.0.1"),
        network_configuration=ServerNetworkConfiguration(
            HOSTNAME, tls_opportunistic_encryption=opportunistic
        ),
        scan_commands=SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
        scan_commands_extra_arguments=ScanCommandsExtraArguments(
            certificate_info=CertificateInfoExtraArgument(custom_ca_file=ca.pem)
        ),
    )
    scanner = Scanner()
    scanner.queue_scans([request])
    (result,) = list(scanner.get_results())
    try:
        check_server_against_tls_configuration(
            result, MozillaTlsConfiguration.get(TlsConfigurationEnum.MOZILLA_INTERMEDIATE)
        )
    except ServerNotCompliantWithTlsConfiguration as err:
        return err.issues
    return {}


@pytest.mark.filterwarnings("ignore:Parsed a negative serial")  # in sslyze's own stores
def test_sslyze_client_ports_are_mozilla_intermediate(
    tls_env: TLSEnv, imapd: Server, submission: Server
) -> None:
    assert mozilla_issues(imapd.ports["imaps"], tls_env.ca) == {}
    assert mozilla_issues(submission.ports["submissions"], tls_env.ca) == {}


@pytest.mark.filterwarnings("ignore:Parsed a negative serial")  # in sslyze's own stores
def test_sslyze_sees_port_25_wider_than_intermediate(tls_env: TLSEnv) -> None:
    for smtpd in serve(tls_env.env, "mailroom-smtpd", ("smtp",)):
        issues = mozilla_issues(smtpd.port, tls_env.ca, "SMTP")
        assert set(issues) == {"ciphers"}, issues  # TLS 1.2 only with CBC/RSA suites added


def test_client_picks_the_suite(tls_env: TLSEnv, imapd: Server) -> None:
    """Mozilla: no server preference; the client's first suite wins, in either order."""
    a, b = "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-RSA-CHACHA20-POLY1305"
    for first, second in [(a, b), (b, a)]:
        context = old_client(ssl.TLSVersion.TLSv1_2, f"{first}:{second}")
        with implicit(imapd.ports["imaps"], context) as sock:
            assert cipher(sock) == first


def old_client(version: ssl.TLSVersion, ciphers: str = "DEFAULT:@SECLEVEL=0") -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = context.maximum_version = version
    context.set_ciphers(ciphers)  # level 0: OpenSSL 3 itself allows TLS 1.0/1.1 only there
    return context


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_tls_1_0_and_1_1_refused(
    tls_env: TLSEnv, imapd: Server, submission: Server, version: ssl.TLSVersion
) -> None:
    for port in (imapd.ports["imaps"], submission.ports["submissions"]):
        with pytest.raises(ssl.SSLError):
            implicit(port, old_client(version)).close()
    imap = imaplib.IMAP4("127.0.0.1", imapd.ports["imap"], timeout=10)
    try:
        with pytest.raises(ssl.SSLError):
            imap.starttls(old_client(version))
    finally:
        imap.sock.close()
    # The same client does speak it where a server allows it: port 25 set to TLS 1.0.
    with tls_env.env.config.open("r+") as f:
        text = f.read().replace("[tls]\n", '[tls]\nsmtp_min_version = "TLSv1"\n')
        f.seek(0)
        f.write(text)
    for smtpd in serve(tls_env.env, "mailroom-smtpd", ("smtp",)):
        with smtplib.SMTP("127.0.0.1", smtpd.port, timeout=10) as smtp:
            smtp.starttls(context=old_client(version))
            assert isinstance(smtp.sock, ssl.SSLSocket)
            assert smtp.sock.version() == {ssl.TLSVersion.TLSv1: "TLSv1"}.get(version, "TLSv1.1")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_port_25_accepts_a_suite_outside_intermediate(tls_env: TLSEnv, submission: Server) -> None:
    cbc = old_client(ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-AES128-SHA")
    for smtpd in serve(tls_env.env, "mailroom-smtpd", ("smtp",)):
        with smtplib.SMTP("127.0.0.1", smtpd.port, timeout=10) as smtp:
            smtp.starttls(context=cbc)
            assert isinstance(smtp.sock, ssl.SSLSocket)
            assert cipher(smtp.sock) == "ECDHE-RSA-AES128-SHA"
            # Still TLS 1.2 at least by default.
        with (
            pytest.raises(ssl.SSLError),
            smtplib.SMTP("127.0.0.1", smtpd.port, timeout=10) as smtp,
        ):
            smtp.starttls(context=old_client(ssl.TLSVersion.TLSv1_1))
    with pytest.raises(ssl.SSLError):
        implicit(submission.ports["submissions"], cbc).close()
    with (
        pytest.raises(ssl.SSLError),
        smtplib.SMTP("127.0.0.1", submission.ports["submission"], timeout=10) as smtp,
    ):
        smtp.starttls(context=cbc)


# -- renewal without restart ---------------------------------------------------------------


def test_renewed_pair_served_to_the_next_connection_never_half(
    tls_env: TLSEnv, imapd: Server, submission: Server
) -> None:
    context = client_context(tls_env.ca)
    imaps, submissions = imapd.ports["imaps"], submission.ports["submissions"]
    old = fingerprint(tls_env.current)
    held_imap = implicit(imaps, context)
    held_smtp = implicit(submissions, context)
    assert seen(held_imap) == seen(held_smtp) == old

    # The certificate renamed into place, the key not yet: the old pair is still served.
    new_key = rsa_key()
    new_cert = tls_env.ca.issue(HOSTNAME, new_key)
    install(tls_env.cert, new_cert)
    wait_for_check()
    for port in (imaps, submissions):
        with implicit(port, context) as sock:
            assert seen(sock) == old
    assert starttls("imap", imapd.ports["imap"], context) == old
    assert starttls("smtp", submission.ports["submission"], context) == old

    # The key follows: every new connection gets the new pair.
    install(tls_env.key, key_pem(new_key))
    wait_for_check()
    new = fingerprint(new_cert)
    for port in (imaps, submissions):
        with implicit(port, context) as sock:
            assert seen(sock) == new
    assert starttls("imap", imapd.ports["imap"], context) == new
    assert starttls("smtp", submission.ports["submission"], context) == new

    # A half-written certificate (cut mid-file, written in place): the new pair stays.
    tls_env.cert.write_bytes(tls_env.ca.issue(HOSTNAME, rsa_key())[:300])
    wait_for_check()
    for port in (imaps, submissions):
        with implicit(port, context) as sock:
            assert seen(sock) == new

    # The connections opened before all this carry on, on the pair they started with.
    held_imap.sendall(b"a1 NOOP\r\n")
    assert b"a1 OK" in held_imap.recv(4096)
    held_smtp.sendall(b"EHLO client.example\r\n")
    assert held_smtp.recv(4096).startswith(b"250")
    assert seen(held_imap) == seen(held_smtp) == old
    held_imap.close()
    held_smtp.close()


def test_pair_appearing_after_start_is_picked_up(tls_env: TLSEnv) -> None:
    cert, key = tls_env.cert.read_bytes(), tls_env.key.read_bytes()
    tls_env.cert.unlink()
    tls_env.key.unlink()
    context = client_context(tls_env.ca)
    for imapd in serve(tls_env.env, "mailroom-imapd", ("imaps", "imap")):
        with pytest.raises((ssl.SSLError, OSError)):
            implicit(imapd.ports["imaps"], context).close()
        with imaplib.IMAP4("127.0.0.1", imapd.ports["imap"], timeout=10) as imap:
            assert "STARTTLS" not in imap.capabilities
        install(tls_env.cert, cert)
        install(tls_env.key, key)
        wait_for_check()
        with implicit(imapd.ports["imaps"], context) as sock:
            assert seen(sock) == fingerprint(cert)
        assert starttls("imap", imapd.ports["imap"], context) == fingerprint(cert)


# -- SNI -----------------------------------------------------------------------------------


def test_sni_picks_the_pair_of_the_name(tls_env: TLSEnv, imapd: Server, submission: Server) -> None:
    context = client_context(tls_env.ca)
    default, other = fingerprint(tls_env.current), fingerprint(tls_env.other)
    for port in (imapd.ports["imaps"], submission.ports["submissions"]):
        for name, expected in [
            (OTHER, other),
            (OTHER.upper(), other),
            (HOSTNAME, default),
            ("unknown.example.org", default),
            (None, default),
        ]:
            with implicit(port, context, name) as sock:
                assert seen(sock) == expected, (port, name)


# -- the check's rate limit, without a server ----------------------------------------------


def test_files_looked_at_once_per_interval(tls_env: TLSEnv) -> None:
    now = [100.0]
    tls = ServerTLS(CertPair(tls_env.cert, tls_env.key), check_interval=1.0, clock=lambda: now[0])
    before = tls.context()
    assert before is not None
    first = tls._default.context
    tls_env.replace()
    now[0] += 0.5
    assert tls.context() is before and tls._default.context is first  # not looked at yet
    now[0] += 0.6
    assert tls.context() is before  # the context handed out stays; the pair behind it changes
    assert tls._default.context is not first
