"""`mailroomctl setup`, the first-run wizard, run as the installed console script."""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from mailroom import dkim
from tests.dnsserver import free_udp_tcp_port as free_port
from tests.test_ctl import PASSWORD, Ctl

PACKAGED_CONFIG = Path(__file__).parent.parent / "packaging" / "config.toml"
HOST = "mx.example.org"
DOMAIN = "example.org"
USER = "alice@example.org"


@pytest.fixture
def ctl(tmp_path: Path) -> Ctl:
    return Ctl(tmp_path)  # no config file yet: setup writes it


def setup(ctl: Ctl, *extra: str, hostname: str = HOST) -> str:
    return ctl.ok(
        "setup",
        "--non-interactive",
        "--hostname",
        hostname,
        "--domain",
        DOMAIN,
        "--user",
        USER,
        "--password-stdin",
        "--data-dir",
        str(ctl.data_dir),
        *extra,
        stdin=PASSWORD + "\n",
    )


def written(ctl: Ctl) -> list[Path]:
    """The files setup leaves behind that a second run must not touch."""
    return [
        ctl.config,
        ctl.data_dir / "auth.sqlite3",
        ctl.data_dir / "tls" / "fullchain.pem",
        ctl.data_dir / "tls" / "privkey.pem",
        *sorted((ctl.data_dir / "dkim" / DOMAIN).iterdir()),
    ]


def test_non_interactive_setup_makes_a_working_server(ctl: Ctl) -> None:
    out = setup(ctl)
    config = tomllib.loads(ctl.config.read_text())
    assert config == {"hostname": HOST, "data_dir": str(ctl.data_dir)}
    assert ctl.config.stat().st_mode & 0o777 == 0o640
    assert "configuration is valid" in ctl.ok("config", "check")
    with ctl.accounts() as accounts:
        assert accounts.list_domains() == [DOMAIN]
        assert accounts.verify_password(USER, PASSWORD) is not None
    for sub in ("mail", "queue", "dkim", "tls"):
        assert (ctl.data_dir / sub).stat().st_mode & 0o777 == 0o700
    keys = dkim.load_keys(ctl.data_dir / "dkim", DOMAIN)
    assert [k.algorithm for k in keys] == [dkim.RSA_SHA256, dkim.ED25519_SHA256]

    cert = x509.load_pem_x509_certificate((ctl.data_dir / "tls" / "fullchain.pem").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == HOST
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [HOST]
    assert (ctl.data_dir / "tls" / "privkey.pem").stat().st_mode & 0o777 == 0o600
    assert "mailroomctl tls issue" in out

    assert f"{DOMAIN}. IN MX 10 {HOST}." in out
    assert f'{DOMAIN}. IN TXT "v=spf1 mx -all"' in out
    assert f'_dmarc.{DOMAIN}. IN TXT "v=DMARC1; p=none; rua=mailto:postmaster@{DOMAIN}"' in out
    for key in keys:
        line = next(x for x in out.splitlines() if f"{key.selector}._domainkey.{DOMAIN}." in x)
        strings = line.split(" IN TXT ", 1)[1].strip().split('" "')
        assert all(len(s.strip('"')) <= 255 for s in strings)
        assert "".join(s.strip('"') for s in strings) == key.public_txt
    assert f"check: {USER} can log in" in out
    assert "listening on localhost" in out
    assert "already:" not in out


def test_a_second_run_changes_nothing(ctl: Ctl) -> None:
    setup(ctl)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in written(ctl)}
    out = setup(ctl)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in written(ctl)} == before
    assert "done:" not in out
    steps = [line for line in out.splitlines() if line.startswith(("done:", "already:"))]
    assert len(steps) == 6, out
    assert f"already: user {USER} exists (password unchanged)" in out
    assert f"check: {USER} can log in" in out


def test_an_existing_password_is_never_changed_non_interactively(ctl: Ctl) -> None:
    setup(ctl)
    result = ctl(
        "setup", "--non-interactive", "--hostname", HOST, "--user", USER,
        "--data-dir", str(ctl.data_dir), "--password-stdin", stdin="another password\n",
    )  # fmt: skip
    assert result.returncode == 1
    assert "(password unchanged)" in result.stdout
    assert result.stderr == f"mailroomctl: {USER} cannot log in with the password given\n"
    with ctl.accounts() as accounts:
        assert accounts.verify_password(USER, PASSWORD) is not None


def test_other_config_keys_and_comments_are_kept(ctl: Ctl) -> None:
    text = PACKAGED_CONFIG.read_text() + "\n[smtp]\nmax_recipients = 5\n"
    ctl.config.write_text(text)
    setup(ctl)
    new = ctl.config.read_text()
    config = tomllib.loads(new)
    assert config["hostname"] == HOST
    assert config["data_dir"] == str(ctl.data_dir)
    assert config["smtp"] == {"max_recipients": 5}
    # only the two lines changed; every comment is still there
    changed = [(a, b) for a, b in zip(text.splitlines(), new.splitlines(), strict=True) if a != b]
    assert changed == [
        ('hostname = "mail.example.org"', f'hostname = "{HOST}"'),
        ('data_dir = "/var/lib/mailroom"', f'data_dir = "{ctl.data_dir}"'),
    ]


def test_keys_missing_from_an_existing_config_are_added(ctl: Ctl) -> None:
    ctl.config.write_text("# mine\n[smtp]\nmax_recipients = 5\n")
    setup(ctl)
    config = tomllib.loads(ctl.config.read_text())
    assert config == {
        "hostname": HOST,
        "data_dir": str(ctl.data_dir),
        "smtp": {"max_recipients": 5},
    }
    assert ctl.config.read_text().startswith("# mine\n")


@pytest.mark.parametrize("hostname", ["localhost", "mail..example.org", "mail_1.example.org"])
def test_an_invalid_hostname_is_one_clear_error(ctl: Ctl, hostname: str) -> None:
    err = ctl.fails(
        "setup", "--non-interactive", "--hostname", hostname, "--user", USER,
        "--password-stdin", "--data-dir", str(ctl.data_dir), stdin=PASSWORD + "\n",
    )  # fmt: skip
    assert f"invalid host name {hostname!r}" in err
    assert not ctl.config.exists()
    assert not ctl.data_dir.exists()


def test_a_user_outside_the_domain_is_refused(ctl: Ctl) -> None:
    err = ctl.fails(
        "setup", "--non-interactive", "--hostname", HOST, "--user", "bob@example.net",
        "--password-stdin", stdin=PASSWORD + "\n",
    )  # fmt: skip
    assert "must be an address in example.org" in err


def test_interactive_setup_asks_with_defaults(ctl: Ctl) -> None:
    code, out = ctl.interactive(
        ["setup", "--data-dir", str(ctl.data_dir)],
        [
            ("Host name", HOST),
            (f"Mail domain [{DOMAIN}]: ", ""),  # the default: the host name minus mx.
            ("First user [", USER),
            ("Password: ", "typed password"),
            ("Repeat for confirmation: ", "typed password"),
            ("Get a Let's Encrypt certificate now", ""),  # no: the self-signed one
        ],
    )
    assert code == 0, out
    assert "typed password" not in out
    assert f"done: added user {USER}" in out
    assert f"check: {USER} can log in" in out
    with ctl.accounts() as accounts:
        assert accounts.verify_password(USER, "typed password") is not None
    assert tomllib.loads(ctl.config.read_text())["hostname"] == HOST

    # again: the user exists, so the wizard asks before changing the password
    code, out = ctl.interactive(
        ["setup"],
        [
            (f"Host name [{HOST}]: ", ""),
            (f"Mail domain [{DOMAIN}]: ", ""),
            ("First user [", USER),
            (f"{USER} exists; set a new password? [y/N]: ", ""),
            ("Get a Let's Encrypt certificate now", ""),
        ],
    )
    assert code == 0, out
    assert "done:" not in out
    assert f"login of {USER} not tried" in out


def test_certbot_and_dns_publishing_that_fail_leave_a_working_setup(
    ctl: Ctl, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """setup --certbot tries `tls issue` and --publish-dns `dns publish`; here neither can work
    (no ACME server answers, no DNS credentials), so each says why and what stays, and setup
    still finishes with the self-signed certificate. The successful paths are test_certs.py's
    (pebble) and test_dns.py's (knotd), through the same commands."""
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")  # certbot
    ctl.config.write_text(
        f'[certbot]\nserver = "https://127.0.0.1:9/directory"\nhttp_01_port = {free_port()}\n'
        f'config_dir = "{tmp_path}/le"\nwork_dir = "{tmp_path}/le-work"\n'
        f'logs_dir = "{tmp_path}/le-logs"\n'
    )
    out = setup(ctl, "--certbot", "--publish-dns", "rfc2136")
    assert "setup: Let's Encrypt certificate failed: certbot failed" in out, out
    assert "the self-signed certificate stays" in out
    assert f"setup: publishing the DNS records of {DOMAIN} (rfc2136) failed: " in out, out
    cert = x509.load_pem_x509_certificate((ctl.data_dir / "tls" / "fullchain.pem").read_bytes())
    assert cert.issuer == cert.subject  # still the self-signed one
    assert f"check: {USER} can log in" in out
