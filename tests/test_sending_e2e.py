"""Sending end to end with real parts: swaks submits with AUTH to mailroom-submission, the
queue runner `mailroom-deliver` finds the MX in a real DNS server (knotd) and hands the
message to a real Postfix, and an independent DKIM implementation (Perl Mail::DKIM) verifies
the signature against the key published in that DNS."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailroom import dkim
from tests import postfix_peer
from tests.conftest import PASSWORD, MailEnv, Server, free_port
from tests.dnsserver import DnsServer, dns_server  # noqa: F401 - the fixture
from tests.test_deliver import CertAuthority, ca  # noqa: F401 - the fixture

BIN = Path(sys.executable).parent

# Mail::DKIM with its DNS lookups sent to the test's knotd; prints "result: detail" per signature.
VERIFY = textwrap.dedent(r"""
    use strict; use warnings;
    use Net::DNS; use Mail::DKIM::Verifier; use Mail::DKIM::DNS;
    my ($server, $port, $file) = @ARGV;
    Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(nameservers => [$server], port => $port,
                                                     recurse => 0, udp_timeout => 5));
    my $dkim = Mail::DKIM::Verifier->new();
    open(my $fh, '<', $file) or die;
    while (<$fh>) { s/\r?\n\z/\r\n/; $dkim->PRINT($_); }
    $dkim->CLOSE();
    foreach my $sig ($dkim->signatures) {
        printf "%s %s %s\n", $sig->algorithm, $sig->result, ($sig->result_detail // "");
    }
""")


@pytest.fixture
def postfix(ca: CertAuthority) -> Iterator[postfix_peer.PostfixPeer]:  # noqa: F811
    why = postfix_peer.available()
    assert why is None, f"Postfix cannot run here: {why} (bin/test installs it)"
    cert, key = ca.issue("mx.remote.test")
    with postfix_peer.PostfixPeer(
        port=free_port(),
        domains=["remote.test"],
        mailboxes=["bob@remote.test"],
        cert=cert,
        key=key,
    ) as peer:
        yield peer


def _txt(value: str) -> str:
    return " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))


def test_swaks_to_postfix_with_dkim_verified_by_mail_dkim(
    mail_env: MailEnv,
    dns_server: DnsServer,  # noqa: F811
    postfix: postfix_peer.PostfixPeer,
) -> None:
    keys = dkim.generate(mail_env.data_dir / "dkim", "example.test")
    dns_server.set_zone(
        "example.test",
        [f"{name.removesuffix('.example.test')} 300 IN TXT {_txt(value)}"
         for name, value in dkim.dns_records(keys)],
    )  # fmt: skip
    dns_server.set_zone("remote.test", ["@ 300 IN MX 10 mx.remote.test.", "mx 300 IN A 127.0.0.1"])
    with mail_env.config.open("a") as config:
        config.write(
            f'[dns]\nnameservers = ["{dns_server.address}"]\n'
            f"[outbound]\nsmtp_port = {postfix.port}\nmta_sts = false\n"
        )
    server = Server(mail_env, "mailroom-submission", ("submission", "submissions"))
    try:
        sent = subprocess.run(
            ["swaks", "--server", f"127.0.0.1:{server.ports['submission']}", "--tls",
             "--auth", "PLAIN", "--auth-user", "alice@example.test", "--auth-password", PASSWORD,
             "--from", "alice@example.test", "--to", "bob@remote.test",
             "--header", "From: Alice <alice@example.test>", "--header", "Subject: over the wire",
             "--body", "Signed, queued, delivered."],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        server.stop()
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert list((mail_env.data_dir / "queue").glob("*.json")), "not queued"
    runner = subprocess.run(
        [BIN / "mailroom-deliver"], env=mail_env.environ(), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert runner.returncode == 0, runner.stderr
    (stored,) = postfix.messages("bob@remote.test")
    assert b"Signed, queued, delivered." in stored
    assert not list((mail_env.data_dir / "queue").glob("*.json")), "still queued"
    path = mail_env.root / "received.eml"
    path.write_bytes(stored)
    out = subprocess.run(
        ["perl", "-e", VERIFY, "127.0.0.1", dns_server.address.rpartition(":")[2], str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    results = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert results["rsa-sha256"].startswith("pass"), out.stdout
    # Debian 12's Mail::DKIM (1.20230212) does not know Ed25519 yet; Debian 13's does.
    assert results["ed25519-sha256"].split()[0] in ("pass", "invalid"), out.stdout
    if results["ed25519-sha256"].startswith("invalid"):
        assert "unsupported" in results["ed25519-sha256"], out.stdout
