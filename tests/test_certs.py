"""Let's Encrypt through certbot: ``mailroomctl tls issue|deploy-hook|status``.

Real peers: pebble (Debian's ACME test server) on loopback, certbot 4.0.0 from the virtualenv
(HTTP-01 standalone, and DNS-01 through certbot-dns-rfc2136 against knotd, the same flow as
Cloudflare with another plugin), mailroom-imapd and mailroom-submission behind the activator.
Certificates for the refusal cases are made here with ``cryptography``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailroom import certs
from mailroom.config import load_settings
from tests.conftest import BIN, HOSTNAME, PASSWORD, MailEnv, Server, free_port, write_config
from tests.dnsserver import DnsServer, dns_server  # noqa: F401 - the fixture

PEBBLE = shutil.which("pebble") or "/usr/bin/pebble"
CERTBOT = BIN / "certbot"
MAILROOMCTL = BIN / "mailroomctl"
ROOT = Path(__file__).resolve().parent.parent
NOW = dt.datetime.now(dt.UTC)


# -- certificates made here ------------------------------------------------------------------


def make_pair(
    names: list[str],
    *,
    days: float = 30,
    start: dt.datetime | None = None,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    ca: bool = False,
    ips: list[str] | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate for ``names`` valid ``days`` from ``start``; self-signed unless ``issuer``."""
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    start = start or NOW - dt.timedelta(minutes=5)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    issuer_name, issuer_key = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    alt: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    alt += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips or []]
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    return builder.sign(issuer_key, hashes.SHA256()), key


def pem(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[bytes, bytes]:
    return cert.public_bytes(serialization.Encoding.PEM), key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_lineage(d: Path, cert_pem: bytes, key_pem: bytes) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "fullchain.pem").write_bytes(cert_pem)
    (d / "privkey.pem").write_bytes(key_pem)
    return d


def fingerprint(path: Path) -> str:
    return certs.read_info(path).sha256


# -- pebble ----------------------------------------------------------------------------------


class Pebble:
    """pebble on 127.0.0.1 with a TLS certificate of our own CA (``ca_bundle``); it resolves
    names through ``dns_address`` and validates HTTP-01 on ``http_port``."""

    def __init__(self, root: Path, dns_address: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        ca, ca_key = make_pair(["mailroom test ACME CA"], ca=True, days=2)
        leaf, leaf_key = make_pair(["localhost"], ips=["127.0.0.1"], issuer=(ca, ca_key), days=2)
        self.ca_bundle = root / "ca.pem"
        self.ca_bundle.write_bytes(pem(ca, ca_key)[0])
        cert_pem, key_pem = pem(leaf, leaf_key)
        (root / "cert.pem").write_bytes(cert_pem)
        (root / "key.pem").write_bytes(key_pem)
        self.port, self.http_port, self.tls_port = free_port(), free_port(), free_port()
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.port}",
                "managementListenAddress": f"127.0.0.1:{free_port()}",
                "certificate": str(root / "cert.pem"),
                "privateKey": str(root / "key.pem"),
                "httpPort": self.http_port,
                "tlsPort": self.tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }
        }
        (root / "pebble.json").write_text(json.dumps(config))
        self.log_path = root / "pebble.log"
        env = dict(
            os.environ,
            PEBBLE_VA_NOSLEEP="1",
            PEBBLE_WFE_NONCEREJECT="0",
            PEBBLE_AUTHZREUSE="0",  # a renewal proves the name again
        )
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [PEBBLE, "-config", str(root / "pebble.json"), "-dnsserver", dns_address],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"pebble did not start:\n{self.output()}") from None
                time.sleep(0.05)

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def pebble(
    tmp_path_factory: pytest.TempPathFactory,
    dns_server: DnsServer,  # noqa: F811 - the fixture
) -> Iterator[Pebble]:
    if not Path(PEBBLE).exists():
        pytest.fail("pebble is not installed (Debian package pebble; bin/test installs it)")
    if not CERTBOT.exists():
        pytest.fail("certbot is not in the virtualenv (the [test] extra; bin/test installs it)")
    server = Pebble(tmp_path_factory.mktemp("pebble"), dns_server.address)
    yield server
    server.stop()


# -- the environment of one test ------------------------------------------------------------


def tls_env(root: Path, certbot: dict[str, object] | None = None) -> MailEnv:
    """A data directory whose TLS pair lives in ``{data_dir}/tls/`` (the defaults), a
    self-signed one to begin with, and a ``[certbot]`` section pointing into ``root``."""
    data = root / "data"
    (data / "tls").mkdir(mode=0o750, parents=True)
    cert_pem, key_pem = pem(*make_pair([HOSTNAME], days=2))
    (data / "tls" / "fullchain.pem").write_bytes(cert_pem)
    (data / "tls" / "privkey.pem").write_bytes(key_pem)
    config = write_config(root, None, idle_exit_seconds=30, shutdown_grace_seconds=2)
    section = {
        "config_dir": str(root / "le" / "config"),
        "work_dir": str(root / "le" / "work"),
        "logs_dir": str(root / "le" / "logs"),
        **(certbot or {}),
    }
    lines = ["[certbot]"] + [f"{k} = {json.dumps(v)}" for k, v in section.items()]
    with config.open("a") as f:
        f.write("\n".join(lines) + "\n")
    env = MailEnv(root, config)
    with env.accounts() as accounts:
        accounts.add_domain("example.test")
        accounts.add_user("alice@example.test", PASSWORD)
    return env


def ctl(
    env: MailEnv, *args: str, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = env.environ(PATH=f"{BIN}:{os.environ.get('PATH', '')}", **(extra_env or {}))
    return subprocess.run(
        [str(MAILROOMCTL), *args], env=environ, capture_output=True, text=True, timeout=120
    )


def acme_env(env: MailEnv, pebble: Pebble) -> dict[str, str]:
    return {"REQUESTS_CA_BUNDLE": str(pebble.ca_bundle)}


def wait_served(port: int, expected: str, timeout: float = 3) -> str:
    """The fingerprint a new client sees, asked again until it is ``expected`` or ``timeout``
    passes (mailroom.tls looks at the files at most once per CHECK_INTERVAL, 1 s)."""
    deadline = time.monotonic() + timeout
    while (seen := served_fingerprint(port)) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return seen


def served_fingerprint(port: int) -> str:
    """The SHA-256 of the certificate the server on ``port`` shows a new TLS client."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=HOSTNAME) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def publish_host(dns: DnsServer) -> None:
    dns.set_zone("example.test", [("mail", "A", "127.0.0.1")])


# -- issuing with pebble ---------------------------------------------------------------------


def test_http01_standalone_issue_then_renewal_runs_the_hook_again(
    tmp_path: Path,
    pebble: Pebble,
    dns_server: DnsServer,  # noqa: F811 - the fixture
) -> None:
    """certbot (HTTP-01 standalone on a loopback port) gets a certificate from pebble; the
    deploy hook installs it into {data_dir}/tls/; `certbot renew --force-renewal` runs the
    saved hook again and the installed pair changes; `tls status` says certbot renews it."""
    publish_host(dns_server)
    env = tls_env(
        tmp_path,
        {
            "server": pebble.directory,
            "http_01_port": pebble.http_port,
            "http_01_address": "127.0.0.1",
        },
    )
    settings = load_settings(env.config)
    self_signed = fingerprint(settings.tls_cert)

    # No --method: nothing configured for DNS-01 and the port is free, so standalone.
    done = ctl(env, "tls", "issue", extra_env=acme_env(env, pebble))
    assert done.returncode == 0, done.stdout + done.stderr + pebble.output()
    assert "--standalone" in done.stderr
    info = certs.read_info(settings.tls_cert)
    assert info.names == (HOSTNAME,) and "Pebble" in info.issuer and not info.self_signed
    assert info.sha256 != self_signed
    lineage = settings.certbot.config_dir / "live" / "mailroom"
    assert settings.tls_cert.read_bytes() == (lineage / "fullchain.pem").read_bytes()
    assert settings.tls_key.read_bytes() == (lineage / "privkey.pem").read_bytes()
    assert settings.tls_key.stat().st_mode & 0o777 == 0o600
    renewal_conf = (settings.certbot.config_dir / "renewal" / "mailroom.conf").read_text()
    assert "tls deploy-hook" in renewal_conf and "CONFIG_PATH=" in renewal_conf

    renew = subprocess.run(
        [str(CERTBOT), "renew", "--force-renewal", "--non-interactive", "--no-random-sleep-on-renew",
         "--config-dir", str(settings.certbot.config_dir),
         "--work-dir", str(settings.certbot.work_dir),
         "--logs-dir", str(settings.certbot.logs_dir)],
        env=env.environ(PATH=f"{BIN}:{os.environ['PATH']}", **acme_env(env, pebble)),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert renew.returncode == 0, renew.stdout + renew.stderr
    assert "installed certificate for mail.example.test" in renew.stdout + renew.stderr
    renewed = certs.read_info(settings.tls_cert)
    assert renewed.sha256 != info.sha256
    assert settings.tls_cert.read_bytes() == (lineage / "fullchain.pem").read_bytes()
    assert settings.tls_key.read_bytes() == (lineage / "privkey.pem").read_bytes()

    status = ctl(env, "tls", "status", "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["names"] == [HOSTNAME] and data["self_signed"] is False
    assert data["days_left"] > 14 and data["warnings"] == []
    assert data["renewal"]["renewed_by_certbot"] is True
    assert data["renewal"]["authenticator"] == "standalone"
    assert data["renewal"]["lineage_matches"] is True
    assert {u["port"] for u in data["used_by"]} == {25, 465, 587, 143, 993, 110, 995}
    text = ctl(env, "tls", "status").stdout
    assert "issued by" in text and "Pebble" in text
    assert "renewal:     yes, certbot's timer (standalone)" in text
    assert "WARNING" not in text


def test_dns01_rfc2136_issue_reaches_running_imaps_and_submissions(
    tmp_path: Path,
    pebble: Pebble,
    dns_server: DnsServer,  # noqa: F811 - the fixture
) -> None:
    """DNS-01 through certbot-dns-rfc2136 (TSIG-signed updates to knotd; Cloudflare's flow
    with another plugin): running mailroom-imapd (imaps) and mailroom-submission
    (submissions) show the new certificate to their next client without a restart."""
    publish_host(dns_server)
    credentials = tmp_path / "rfc2136.ini"
    credentials.write_text(
        f"dns_rfc2136_server = 127.0.0.1\n"
        f"dns_rfc2136_port = {dns_server.port}\n"
        f"dns_rfc2136_name = {dns_server.tsig_name}\n"
        f"dns_rfc2136_secret = {dns_server.tsig_secret}\n"
        "dns_rfc2136_algorithm = HMAC-SHA256\n"
    )
    credentials.chmod(0o600)
    env = tls_env(tmp_path, {"server": pebble.directory, "rfc2136_credentials": str(credentials)})
    settings = load_settings(env.config)
    imapd = Server(env, "mailroom-imapd", ("imap", "imaps"))
    submission = Server(env, "mailroom-submission", ("submission", "submissions"))
    try:
        before = fingerprint(settings.tls_cert)
        assert served_fingerprint(imapd.ports["imaps"]) == before
        assert served_fingerprint(submission.ports["submissions"]) == before

        done = ctl(
            env, "tls", "issue", "--", "--dns-rfc2136-propagation-seconds", "1",
            extra_env=acme_env(env, pebble),
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr + pebble.output()
        assert "--dns-rfc2136 --dns-rfc2136-credentials" in done.stderr
        after = certs.read_info(settings.tls_cert)
        assert "Pebble" in after.issuer and after.covers(HOSTNAME)

        assert wait_served(imapd.ports["imaps"], after.sha256) == after.sha256, imapd.output()
        assert wait_served(submission.ports["submissions"], after.sha256) == after.sha256
    finally:
        imapd.stop()
        submission.stop()


# -- the deploy hook refuses -----------------------------------------------------------------


def _refusal_cases() -> dict[str, tuple[bytes, bytes, str]]:
    good_cert, _ = make_pair([HOSTNAME])
    _, other_key = make_pair([HOSTNAME])
    expired = make_pair([HOSTNAME], start=NOW - dt.timedelta(days=100), days=90)
    future = make_pair([HOSTNAME], start=NOW + dt.timedelta(days=1))
    wrong = make_pair(["mail.example.org", "*.mail.example.test"])
    return {
        "mismatch": (*pem(good_cert, other_key), "the private key does not belong"),
        "expired": (*pem(*expired), "the certificate expired on"),
        "not yet valid": (*pem(*future), "the certificate is not valid before"),
        "wrong name": (
            *pem(*wrong),
            "is for mail.example.org, *.mail.example.test, not for mail.example.test",
        ),
        "garbage": (b"not a certificate\n", pem(*wrong)[1], "not a PEM certificate"),
    }


@pytest.mark.parametrize("case", list(_refusal_cases()))
def test_deploy_hook_refuses_and_keeps_the_old_pair(tmp_path: Path, case: str) -> None:
    """A certificate/key mismatch, an expired or not-yet-valid certificate, one for another
    name, garbage: non-zero exit, one clear line on stderr, old pair kept byte for byte."""
    env = tls_env(tmp_path)
    settings = load_settings(env.config)
    good = write_lineage(tmp_path / "good", *pem(*make_pair([HOSTNAME])))
    done = ctl(env, "tls", "deploy-hook", extra_env={"RENEWED_LINEAGE": str(good)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("installed certificate for mail.example.test")
    old = settings.tls_cert.read_bytes(), settings.tls_key.read_bytes()

    cert_pem, key_pem, reason = _refusal_cases()[case]
    bad = write_lineage(tmp_path / "bad", cert_pem, key_pem)
    done = ctl(env, "tls", "deploy-hook", "--lineage", str(bad))
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"mailroomctl: tls deploy-hook: refused: {bad}")
    assert reason in done.stderr and "kept the pair in use" in done.stderr
    assert (settings.tls_cert.read_bytes(), settings.tls_key.read_bytes()) == old
    assert sorted(p.name for p in settings.tls_cert.parent.iterdir()) == [
        "fullchain.pem",
        "privkey.pem",
    ]


def test_deploy_hook_accepts_a_wildcard_and_is_idempotent(tmp_path: Path) -> None:
    env = tls_env(tmp_path)
    settings = load_settings(env.config)
    lineage = write_lineage(tmp_path / "wild", *pem(*make_pair(["*.example.test"])))
    assert ctl(env, "tls", "deploy-hook", "--lineage", str(lineage)).returncode == 0
    again = ctl(env, "tls", "deploy-hook", "--lineage", str(lineage))
    assert again.returncode == 0 and again.stdout.startswith("unchanged:")
    assert settings.tls_cert.read_bytes() == (lineage / "fullchain.pem").read_bytes()
    no_lineage = ctl(env, "tls", "deploy-hook")
    assert no_lineage.returncode == 2 and "RENEWED_LINEAGE" in no_lineage.stderr


def test_packaged_renewal_hook_touches_only_mailrooms_lineage(tmp_path: Path) -> None:
    """packaging/certbot/mailroom (in /etc/letsencrypt/renewal-hooks/deploy/) runs for every
    certificate certbot renews on the machine: only the ``mailroom`` lineage is installed."""
    env = tls_env(tmp_path)
    settings = load_settings(env.config)
    hook = ROOT / "packaging" / "certbot" / "mailroom"
    assert hook.stat().st_mode & 0o111
    pair = pem(*make_pair([HOSTNAME]))
    other = write_lineage(tmp_path / "live" / "www.example.test", *pair)
    ours = write_lineage(tmp_path / "live" / "mailroom", *pair)
    path = f"{BIN}:{os.environ['PATH']}"
    before = settings.tls_cert.read_bytes()
    skipped = subprocess.run(
        [str(hook)], env=env.environ(RENEWED_LINEAGE=str(other), PATH=path),
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert skipped.returncode == 0 and settings.tls_cert.read_bytes() == before
    done = subprocess.run(
        [str(hook)], env=env.environ(RENEWED_LINEAGE=str(ours), PATH=path),
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert settings.tls_cert.read_bytes() == pair[0]


# -- the command line certbot gets -----------------------------------------------------------


def test_cloudflare_command_line_and_credentials_permissions(tmp_path: Path) -> None:
    """The Cloudflare API cannot be reached from here, so this checks the exact certbot
    command `tls issue` builds for DNS-01 through Cloudflare (--dry-run prints it and runs
    nothing) and the check of the credentials file's permissions certbot would warn about."""
    token = tmp_path / "cloudflare.ini"
    token.write_text("dns_cloudflare_api_token = 0123456789abcdef\n")
    token.chmod(0o600)
    env = tls_env(tmp_path, {"cloudflare_credentials": str(token), "email": "admin@example.test"})
    done = ctl(env, "tls", "issue", "--dry-run")  # chosen: credentials are configured
    assert done.returncode == 0, done.stderr
    le = tmp_path / "le"
    hook = f"env CONFIG_PATH={env.config} {MAILROOMCTL} tls deploy-hook"
    expected = [
        "certbot", "certonly", "--non-interactive", "--agree-tos",
        "--cert-name", "mailroom", "-d", HOSTNAME, "--keep-until-expiring",
        "--config-dir", f"{le}/config", "--work-dir", f"{le}/work", "--logs-dir", f"{le}/logs",
        "--deploy-hook", hook, "--email", "admin@example.test",
        "--dns-cloudflare", "--dns-cloudflare-credentials", str(token),
    ]  # fmt: skip
    import shlex

    assert done.stderr == f"running: {shlex.join(expected)}\n"

    token.chmod(0o644)
    refused = ctl(env, "tls", "issue", "--dry-run")
    assert refused.returncode == 1
    assert refused.stderr == (
        f"mailroomctl: credentials file {token} is readable by group or others (mode 0644);"
        f" chmod 600 {token}\n"
    )
    token.chmod(0o600)
    token.write_text("api = nothing\n")
    assert "has no dns_cloudflare_api_token" in ctl(env, "tls", "issue", "--dry-run").stderr
    missing = ctl(env, "tls", "issue", "--dry-run", "--credentials", str(tmp_path / "nope"))
    assert "does not exist" in missing.stderr and missing.returncode == 1


def test_port_80_in_use_is_said_clearly(tmp_path: Path) -> None:
    """Standalone needs the HTTP-01 port: taken, `tls issue` says so and names DNS-01."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = tls_env(tmp_path, {"http_01_port": port, "http_01_address": "127.0.0.1"})
        chosen = ctl(env, "tls", "issue", "--dry-run")
        assert chosen.returncode == 1
        assert f"port 127.0.0.1:{port} is in use" in chosen.stderr
        assert "--method dns-cloudflare --credentials FILE" in chosen.stderr
        forced = ctl(env, "tls", "issue", "--dry-run", "--method", "standalone")
        assert forced.returncode == 1
        assert f"HTTP-01 standalone: port 127.0.0.1:{port} is in use" in forced.stderr
    webroot = ctl(env, "tls", "issue", "--dry-run", "--method", "webroot", "--webroot-path", "/")
    assert webroot.returncode == 0 and "--webroot -w /" in webroot.stderr


# -- status ----------------------------------------------------------------------------------


def test_status_of_a_self_signed_and_a_short_lived_certificate(tmp_path: Path) -> None:
    env = tls_env(tmp_path)
    settings = load_settings(env.config)
    data = json.loads(ctl(env, "tls", "status", "--json").stdout)
    assert data["self_signed"] is True and data["names"] == [HOSTNAME]
    assert data["renewal"]["renewed_by_certbot"] is False
    text = ctl(env, "tls", "status").stdout
    assert "(self-signed)" in text and "renewal:     no (self-signed)" in text
    assert "WARNING: self-signed" in text

    ca = make_pair(["Short CA"], ca=True)
    short = write_lineage(tmp_path / "short", *pem(*make_pair([HOSTNAME], days=5, issuer=ca)))
    assert ctl(env, "tls", "deploy-hook", "--lineage", str(short)).returncode == 0
    data = json.loads(ctl(env, "tls", "status", "--json").stdout)
    assert data["self_signed"] is False and data["days_left"] == 4
    assert data["warnings"][0].startswith("the certificate expires in 4 day(s)")
    text = ctl(env, "tls", "status").stdout
    assert "(4 days left)" in text and "WARNING: the certificate expires in 4 day(s)" in text
    assert "issued by CN=Short CA" in text
    settings.tls_cert.unlink()
    gone = ctl(env, "tls", "status")
    assert gone.returncode == 1 and f"no certificate at {settings.tls_cert}" in gone.stderr


def test_name_matching() -> None:
    assert certs.name_matches("mail.example.org", "MAIL.example.org.")
    assert certs.name_matches("*.example.org", "mail.example.org")
    assert not certs.name_matches("*.example.org", "example.org")
    assert not certs.name_matches("*.example.org", "a.mail.example.org")
    assert not certs.name_matches("mail.example.org", "mail.example.org.evil")
