"""Inbound authentication end to end: swaks sends to a real mailroom-smtpd over loopback, a real
knotd serves SPF, DKIM and DMARC records for several test domains, Perl Mail::DKIM signs
independently. Each test asserts where the message ended up (INBOX, Junk, or refused with
550 and stored nowhere) and the exact Authentication-Results field."""

from __future__ import annotations

import re
import socket
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PASSWORD, Certificate, MailEnv, Server, write_config
from tests.dnsserver import DnsServer, dns_server  # noqa: F401 - the fixture

RCPT = "alice@example.test"
AR = "Authentication-Results: mail.example.test;\n\t"

SIGN = textwrap.dedent(r"""
    use strict; use warnings;
    use Mail::DKIM::Signer; use Mail::DKIM::TextWrap;
    my ($key, $domain, $selector, $file) = @ARGV;
    my $dkim = Mail::DKIM::Signer->new(Algorithm => "rsa-sha256", Method => "relaxed",
                                       Domain => $domain, Selector => $selector, KeyFile => $key);
    open(my $fh, '<', $file) or die;
    while (<$fh>) { s/\r?\n\z/\r\n/; $dkim->PRINT($_); }
    $dkim->CLOSE();
    print $dkim->signature->as_string, "\r\n";
""")


def _txt(value: str) -> str:
    return " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))


def _spf(rule: str = "ip4:127.0.0.1 -all") -> str:
    return f"@ 300 IN TXT {_txt('v=spf1 ' + rule)}"


def _dmarc(record: str) -> str:
    return f"_dmarc 300 IN TXT {_txt('v=DMARC1; ' + record)}"


@pytest.fixture(scope="module")
def rsa_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A private key for Mail::DKIM and the ``p=`` of its DNS record."""
    key = tmp_path_factory.mktemp("perl-dkim") / "key.pem"
    subprocess.run(["openssl", "genrsa", "-out", key, "2048"], check=True, capture_output=True)
    public = subprocess.run(
        ["openssl", "rsa", "-in", key, "-pubout"], check=True, capture_output=True, text=True
    ).stdout
    return key, "".join(line for line in public.splitlines() if "-----" not in line)


@pytest.fixture(scope="module")
def zones(dns_server: DnsServer, rsa_key: tuple[Path, str]) -> DnsServer:  # noqa: F811
    key = f"sel._domainkey 300 IN TXT {_txt('v=DKIM1; k=rsa; p=' + rsa_key[1])}"
    dns_server.set_zone("signed.test", [_spf("-all"), key, _dmarc("p=reject")])
    dns_server.set_zone("reject.test", [_spf(), _dmarc("p=reject")])
    dns_server.set_zone("quarantine.test", [_spf(), _dmarc("p=quarantine")])
    dns_server.set_zone("monitor.test", [_spf(), _dmarc("p=none")])
    dns_server.set_zone("nodmarc.test", [_spf()])
    dns_server.set_zone(
        "org.test", [_dmarc("p=none; sp=reject"), "news 300 IN TXT " + _txt("v=spf1 -all")]
    )
    dns_server.set_zone(
        "strict.test",
        [_dmarc("p=reject; aspf=s"), "bounces 300 IN TXT " + _txt("v=spf1 ip4:127.0.0.1 -all")],
    )
    dns_server.set_zone(
        "relaxed.test",
        [_dmarc("p=reject; aspf=r"), "bounces 300 IN TXT " + _txt("v=spf1 ip4:127.0.0.1 -all")],
    )
    # Our own domain: only submission (not 127.0.0.1 on port 25) sends its mail.
    dns_server.set_zone("example.test", [_spf("ip4:192.0.2.1 -all")])
    return dns_server


@pytest.fixture
def smtpd(mail_env: MailEnv, certificate: Certificate, zones: DnsServer) -> Iterator[Server]:
    write_config(mail_env.root, certificate, inbound_dns=zones.address, idle_exit_seconds=30)
    server = Server(mail_env)
    yield server
    server.stop()


def swaks(
    server: Server, mail_from: str, message: bytes, *, source: str = "127.0.0.1"
) -> subprocess.CompletedProcess[str]:
    path = Path(server.log_path).with_name(f"message-{time.monotonic_ns()}.eml")
    path.write_bytes(message)
    return subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{server.port}", "--local-interface", source,
         "--helo", "client.test", "--from", mail_from, "--to", RCPT, "--data", f"@{path}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def message(sender: str, body: str = "Hello.", extra: str = "") -> bytes:
    return (
        f"{extra}From: <{sender}>\r\nTo: <{RCPT}>\r\nSubject: auth test\r\n"
        f"Message-ID: <{time.monotonic_ns()}@test>\r\n\r\n{body}\r\n"
    ).encode()


def stored(env: MailEnv, folder: str = "") -> list[bytes]:
    new = env.mailbox(RCPT, folder) / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []


def only_message(env: MailEnv, folder: str = "") -> bytes:
    other = stored(env, "Junk" if not folder else "")
    assert not other, f"a copy in the {'INBOX' if folder else 'Junk'} folder too"
    [data] = stored(env, folder)
    return data


def ours(data: bytes) -> list[str]:
    """Our Authentication-Results fields, as stored (LF line ends, folding kept)."""
    head = data.split(b"\n\n", 1)[0].decode()
    fields = re.findall(r"(?ms)^Authentication-Results:.*?\n(?![ \t])", head)
    return [
        f for f in fields if re.match(r"Authentication-Results:\s*mail\.example\.test;", f, re.I)
    ]


def delivered(out: subprocess.CompletedProcess[str]) -> None:
    assert out.returncode == 0, out.stdout + out.stderr
    assert "250 2.0.0 Ok: delivered" in out.stdout


def refused(out: subprocess.CompletedProcess[str], env: MailEnv) -> str:
    assert out.returncode != 0, out.stdout
    [line] = [line for line in out.stdout.splitlines() if line.startswith("<** 550")]
    assert not stored(env) and not stored(env, "Junk"), "stored although refused"
    return line.removeprefix("<** ")


def test_mail_dkim_signature_passes(
    smtpd: Server, mail_env: MailEnv, rsa_key: tuple[Path, str], tmp_path: Path
) -> None:
    original = message("news@signed.test")
    (tmp_path / "m.eml").write_bytes(original)
    signature = subprocess.run(
        ["perl", "-e", SIGN, str(rsa_key[0]), "signed.test", "sel", str(tmp_path / "m.eml")],
        capture_output=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    # SPF fails (signed.test sends from nowhere): DKIM alone carries DMARC.
    delivered(swaks(smtpd, "news@signed.test", signature + original))
    data = only_message(mail_env)
    assert ours(data) == [
        AR + "spf=fail smtp.mailfrom=signed.test;\n"
        "\tdkim=pass header.d=signed.test header.s=sel header.a=rsa-sha256;\n"
        "\tdmarc=pass (p=reject dis=none) header.from=signed.test\n"
    ]
    assert data.startswith(b"Return-Path: <news@signed.test>\nAuthentication-Results: ")


def test_body_changed_after_signing_fails_and_is_rejected(
    smtpd: Server, mail_env: MailEnv, rsa_key: tuple[Path, str], tmp_path: Path
) -> None:
    original = message("news@signed.test", "Pay 10 euros.")
    (tmp_path / "m.eml").write_bytes(original)
    signature = subprocess.run(
        ["perl", "-e", SIGN, str(rsa_key[0]), "signed.test", "sel", str(tmp_path / "m.eml")],
        capture_output=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    tampered = signature + original.replace(b"10 euros", b"1000 euros")
    assert refused(swaks(smtpd, "news@signed.test", tampered), mail_env).startswith(
        "550 5.7.1 Message rejected: DMARC fail, policy of signed.test p=reject"
    )
    assert "dkim=fail:signed.test" in smtpd.output()  # the log says why


def test_dmarc_reject(smtpd: Server, mail_env: MailEnv) -> None:
    out = swaks(smtpd, "x@reject.test", message("x@reject.test"), source="127.0.0.2")
    assert refused(out, mail_env) == (
        "550 5.7.1 Message rejected: DMARC fail, policy of reject.test p=reject"
    )
    assert "rejected from=<x@reject.test>" in smtpd.output()
    assert "spf=fail dkim=none dmarc=fail action=reject" in smtpd.output()


def test_dmarc_pass_from_the_authorised_address(smtpd: Server, mail_env: MailEnv) -> None:
    delivered(swaks(smtpd, "x@reject.test", message("x@reject.test")))
    assert ours(only_message(mail_env)) == [
        AR + "spf=pass smtp.mailfrom=reject.test;\n\tdkim=none;\n"
        "\tdmarc=pass (p=reject dis=none) header.from=reject.test\n"
    ]


def test_dmarc_quarantine_goes_to_junk(smtpd: Server, mail_env: MailEnv) -> None:
    delivered(swaks(smtpd, "x@quarantine.test", message("x@quarantine.test"), source="127.0.0.2"))
    assert ours(only_message(mail_env, "Junk")) == [
        AR + "spf=fail smtp.mailfrom=quarantine.test;\n\tdkim=none;\n"
        "\tdmarc=fail (p=quarantine dis=quarantine) header.from=quarantine.test\n"
    ]
    assert (mail_env.mailbox(RCPT, "Junk") / "maildirfolder").exists()


def test_dmarc_none_is_delivered(smtpd: Server, mail_env: MailEnv) -> None:
    delivered(swaks(smtpd, "x@monitor.test", message("x@monitor.test"), source="127.0.0.2"))
    assert ours(only_message(mail_env)) == [
        AR + "spf=fail smtp.mailfrom=monitor.test;\n\tdkim=none;\n"
        "\tdmarc=fail (p=none dis=none) header.from=monitor.test\n"
    ]


def test_spf_fail_without_dmarc_record_goes_to_junk(smtpd: Server, mail_env: MailEnv) -> None:
    delivered(swaks(smtpd, "x@nodmarc.test", message("x@nodmarc.test"), source="127.0.0.2"))
    assert ours(only_message(mail_env, "Junk")) == [
        AR + "spf=fail smtp.mailfrom=nodmarc.test;\n\tdkim=none;\n"
        "\tdmarc=none header.from=nodmarc.test\n"
    ]


def test_spf_pass_without_dmarc_record_is_delivered(smtpd: Server, mail_env: MailEnv) -> None:
    delivered(swaks(smtpd, "x@nodmarc.test", message("x@nodmarc.test")))
    assert ours(only_message(mail_env)) == [
        AR + "spf=pass smtp.mailfrom=nodmarc.test;\n\tdkim=none;\n"
        "\tdmarc=none header.from=nodmarc.test\n"
    ]


def test_subdomain_policy(smtpd: Server, mail_env: MailEnv) -> None:
    # org.test says p=none; sp=reject: news.org.test falls under sp.
    out = swaks(smtpd, "x@news.org.test", message("x@news.org.test"))
    assert refused(out, mail_env) == (
        "550 5.7.1 Message rejected: DMARC fail, policy of org.test sp=reject"
    )


@pytest.mark.parametrize(
    ("domain", "outcome"), [("relaxed.test", "pass (p=reject dis=none)"), ("strict.test", None)]
)
def test_spf_alignment_relaxed_and_strict(
    smtpd: Server, mail_env: MailEnv, domain: str, outcome: str | None
) -> None:
    # SPF passes for bounces.<domain>; From: is <domain>.
    out = swaks(smtpd, f"b@bounces.{domain}", message(f"x@{domain}"))
    if outcome is None:
        assert refused(out, mail_env) == (
            f"550 5.7.1 Message rejected: DMARC fail, policy of {domain} p=reject"
        )
        return
    delivered(out)
    assert ours(only_message(mail_env)) == [
        AR + f"spf=pass smtp.mailfrom=bounces.{domain};\n\tdkim=none;\n"
        f"\tdmarc={outcome} header.from={domain}\n"
    ]


def test_forged_authentication_results_are_stripped(smtpd: Server, mail_env: MailEnv) -> None:
    forged = (
        "Authentication-Results: MAIL.example.test; dkim=pass header.d=bank.test\r\n"
        "Authentication-Results: (trust me)\r\n mail.example.test;\r\n dmarc=pass\r\n"
        "Authentication-Results: mx.elsewhere.test; spf=pass\r\n"
    )
    delivered(swaks(smtpd, "x@nodmarc.test", message("x@nodmarc.test", extra=forged)))
    data = only_message(mail_env)
    assert len(ours(data)) == 1
    assert b"bank.test" not in data and b"trust me" not in data
    assert b"Authentication-Results: mx.elsewhere.test; spf=pass\n" in data


def test_own_domain_on_port_25_is_forged(smtpd: Server, mail_env: MailEnv) -> None:
    out = swaks(smtpd, "ceo@example.test", message("ceo@example.test"))
    assert refused(out, mail_env).startswith(
        "550 5.7.1 Message rejected: claims our domain example.test"
    )


def test_dns_timeout_gives_temperror_and_delivers(
    mail_env: MailEnv, certificate: Certificate
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # asked, never answers
        silent.bind(("127.0.0.1", 0))
        write_config(mail_env.root, certificate, inbound_dns=f"127.0.0.1:{silent.getsockname()[1]}")
        with mail_env.config.open("a") as config:
            config.write("dns_timeout_seconds = 1\n")
        server = Server(mail_env)
        try:
            start = time.monotonic()
            delivered(swaks(server, "x@reject.test", message("x@reject.test")))
            elapsed = time.monotonic() - start
        finally:
            server.stop()
    assert elapsed < 4, f"took {elapsed:.1f} s"
    assert ours(only_message(mail_env)) == [
        AR + "spf=temperror smtp.mailfrom=reject.test;\n\tdkim=none;\n"
        "\tdmarc=temperror header.from=reject.test\n"
    ]


def test_submission_is_not_checked(
    mail_env: MailEnv, certificate: Certificate, zones: DnsServer
) -> None:
    # example.test's SPF allows only 192.0.2.1: on port 25 this would be rejected as forged.
    write_config(mail_env.root, certificate, inbound_dns=zones.address)
    server = Server(mail_env, "mailroom-submission", ("submission", "submissions"))
    try:
        out = subprocess.run(
            ["swaks", "--server", f"127.0.0.1:{server.ports['submission']}", "--tls",
             "--auth", "PLAIN", "--auth-user", "bob@example.test", "--auth-password", PASSWORD,
             "--from", "bob@example.test", "--to", RCPT, "--header", "From: bob@example.test",
             "--body", "from bob"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        server.stop()
    assert out.returncode == 0, out.stdout + out.stderr
    data = only_message(mail_env)
    assert b"from bob" in data
    assert b"Authentication-Results" not in data


def test_dnsbl_lookup(zones: DnsServer) -> None:
    import asyncio

    from mailroom.config import InboundSettings, Settings
    from mailroom.smtpd import _dnsbl_listing

    zones.set_zone(
        "dnsbl.test",
        ["9.9.9.9 300 IN A 127.0.0.2", "8.8.8.8 300 IN A 127.255.255.254"],  # listed; refused
    )
    settings = Settings(
        hostname="mail.example.test",
        inbound=InboundSettings(nameservers=[zones.address], dnsbl_zones=["dnsbl.test"]),
    )
    zones_list = settings.inbound.dnsbl_zones

    async def listing(address: str) -> str:
        return await _dnsbl_listing(settings, address, zones_list)

    assert asyncio.run(listing("9.9.9.9")) == "9.9.9.9 is listed by dnsbl.test"
    assert asyncio.run(listing("8.8.8.8")) == ""  # an error code is not a listing
    assert asyncio.run(listing("9.9.9.10")) == ""
    assert asyncio.run(listing("127.0.0.1")) == ""  # loopback is never looked up
