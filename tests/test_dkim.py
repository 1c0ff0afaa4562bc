"""DKIM keys and signatures: files on disk, dkimpy round trips, and Perl's Mail::DKIM as an
independent verifier."""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import dkim  # type: ignore[import-untyped]
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailroom.dkim import HEADERS, DkimError, DkimKey, dns_records, generate, load_keys, sign

NOV_2026 = datetime(2026, 11, 3, 12, 0, tzinfo=UTC)

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: Lunch on Friday\r\n"
    b"Date: Tue, 03 Nov 2026 12:00:00 +0000\r\n"
    b"Message-ID: <lunch.1@example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"shall we have lunch on Friday?\r\n"
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> list[DkimKey]:
    return generate(tmp_path_factory.mktemp("data") / "dkim", "example.org", now=NOV_2026)


def dnsfunc(keys: list[DkimKey]) -> object:
    records = dict(dns_records(keys))

    def get_txt(name: bytes, timeout: int = 5) -> bytes | None:
        value = records.get(name.decode("ascii").rstrip("."))
        return None if value is None else value.encode("ascii")

    return get_txt


def dkimpy_results(message: bytes, keys: list[DkimKey]) -> list[bool]:
    """dkimpy's verdict on each DKIM-Signature of ``message``, top first."""
    verifier = dkim.DKIM(message)
    count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
    return [bool(verifier.verify(idx=i, dnsfunc=dnsfunc(keys))) for i in range(count)]


def signed_headers(signature_fields: bytes) -> list[list[bytes]]:
    """The h= list of each signature in ``signature_fields``."""
    unfolded = re.sub(rb"\r\n[ \t]", b" ", signature_fields)
    return [
        [name.strip() for name in h.split(b":")] for h in re.findall(rb"; h=([^;]*);", unfolded)
    ]


# -- keys on disk ----------------------------------------------------------------------------


def test_generate_writes_private_keys_0600_in_0700_directories(tmp_path: Path) -> None:
    dkim_dir = tmp_path / "dkim"
    keys = generate(dkim_dir, "Example.ORG.", now=NOV_2026)

    assert [(k.domain, k.selector, k.algorithm) for k in keys] == [
        ("example.org", "r202611", "rsa-sha256"),
        ("example.org", "e202611", "ed25519-sha256"),
    ]
    domain_dir = dkim_dir / "example.org"
    assert sorted(p.name for p in domain_dir.iterdir()) == [
        "e202611.key",
        "e202611.txt",
        "r202611.key",
        "r202611.txt",
    ]
    for path in (dkim_dir, domain_dir):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
    for key in keys:
        key_file = domain_dir / f"{key.selector}.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert key_file.read_bytes() == key.private_key
        assert (domain_dir / f"{key.selector}.txt").read_text() == key.public_txt + "\n"
    assert keys[0].private_key.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    private = serialization.load_pem_private_key(keys[0].private_key, password=None)
    assert isinstance(private, rsa.RSAPrivateKey) and private.key_size == 2048
    assert re.fullmatch(r"v=DKIM1; k=rsa; p=MIIB[A-Za-z0-9+/]+=*", keys[0].public_txt)
    # RFC 8463 4: the raw 32-byte public key, and dkimpy's base64 32-byte seed
    assert re.fullmatch(r"v=DKIM1; k=ed25519; p=[A-Za-z0-9+/]{43}=", keys[1].public_txt)
    assert re.fullmatch(rb"[A-Za-z0-9+/]{43}=", keys[1].private_key)
    assert "private_key" not in repr(keys[0])


def test_generate_refuses_to_overwrite_existing_selectors(tmp_path: Path) -> None:
    generate(tmp_path, "example.org", now=NOV_2026)
    before = {p.name: p.read_bytes() for p in (tmp_path / "example.org").iterdir()}

    with pytest.raises(DkimError, match="exists already"):
        generate(tmp_path, "example.org", now=NOV_2026)
    (tmp_path / "example.org" / "r202611.key").unlink()
    with pytest.raises(DkimError, match="e202611.key exists already"):
        generate(tmp_path, "example.org", now=NOV_2026)

    after = {p.name: p.read_bytes() for p in (tmp_path / "example.org").iterdir()}
    assert after == {n: b for n, b in before.items() if n != "r202611.key"}  # nothing written


def test_load_keys_returns_the_newest_key_of_each_algorithm(tmp_path: Path) -> None:
    assert load_keys(tmp_path, "example.org") == []
    november = generate(tmp_path, "example.org", now=NOV_2026)
    assert load_keys(tmp_path, "EXAMPLE.org") == november

    january = generate(tmp_path, "example.org", now=datetime(2027, 1, 5, tzinfo=UTC))
    assert [k.selector for k in january] == ["r202701", "e202701"]
    assert load_keys(tmp_path, "example.org") == january
    assert load_keys(tmp_path, "example.net") == []


def test_load_keys_reads_an_imported_pkcs8_key_as_older_than_dated_ones(tmp_path: Path) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "example.org").mkdir(mode=0o700)
    (tmp_path / "example.org" / "default.key").write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    [imported] = load_keys(tmp_path, "example.org")
    assert (imported.selector, imported.algorithm) == ("default", "rsa-sha256")
    # dkimpy signs only with PKCS#1, so the key comes back in that form
    assert imported.private_key.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert dkimpy_results(sign(MESSAGE, [imported]) + MESSAGE, [imported]) == [True]

    dated = generate(tmp_path, "example.org", now=NOV_2026)
    assert load_keys(tmp_path, "example.org") == dated


def test_load_keys_rejects_an_unreadable_key_file(tmp_path: Path) -> None:
    (tmp_path / "example.org").mkdir()
    (tmp_path / "example.org" / "r202611.key").write_bytes(b"not a key\n")
    with pytest.raises(DkimError, match=r"r202611\.key is neither"):
        load_keys(tmp_path, "example.org")


def test_dns_records(keys: list[DkimKey]) -> None:
    assert dns_records(keys) == [
        ("r202611._domainkey.example.org", keys[0].public_txt),
        ("e202611._domainkey.example.org", keys[1].public_txt),
    ]


# -- signatures, checked with dkimpy ---------------------------------------------------------


def test_sign_makes_one_verifiable_signature_per_key(keys: list[DkimKey]) -> None:
    fields = sign(MESSAGE, keys)

    assert fields.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;")
    assert fields.count(b"DKIM-Signature:") == 2
    assert b"a=ed25519-sha256; c=relaxed/relaxed; d=example.org;" in fields
    assert b" s=r202611;" in fields and b" s=e202611;" in fields
    assert fields.endswith(b"\r\n") and b"\n" not in fields.replace(b"\r\n", b"")
    assert all(len(line) <= 78 for line in fields.split(b"\r\n"))  # folded
    assert dkimpy_results(fields + MESSAGE, keys) == [True, True]


def test_header_list_covers_present_headers_and_oversigns_from(keys: list[DkimKey]) -> None:
    message = (
        b"Received: from a by b; Tue, 03 Nov 2026 12:00:00 +0000\r\n"
        b"From: alice@example.org\r\n"
        b"To: bob@example.net\r\n"
        b"Cc: carol@example.net\r\n"
        b"Cc: dave@example.net\r\n"
        b"Subject: [team] notes\r\n"
        b"List-Id: team <team.example.org>\r\n"
        b"List-Unsubscribe: <mailto:leave@example.org>\r\n"
        b"X-Mailer: mailroom\r\n"
        b"\r\n"
        b"notes\r\n"
    )
    fields = sign(message, keys)

    expected = [
        b"from",
        b"to",
        b"cc",
        b"cc",
        b"subject",
        b"list-id",
        b"list-unsubscribe",
        b"from",
    ]
    assert signed_headers(fields) == [expected, expected]
    assert set(expected) <= set(HEADERS)
    assert dkimpy_results(fields + message, keys) == [True, True]


def test_relaxed_canonicalization_survives_refolding(keys: list[DkimKey]) -> None:
    fields = sign(MESSAGE, keys)
    # what a relay may do: unfold/refold header fields, change whitespace and name case
    refolded = (
        re.sub(rb"\r\n ", b"\r\n\t  ", fields)
        + MESSAGE.replace(b"Subject: Lunch on Friday", b"subject:Lunch   on\r\n\tFriday  ")
        .replace(b"To: bob@example.net", b"TO:  bob@example.net")
        .replace(b"Hello Bob,", b"Hello   Bob,\t")
        + b"\r\n\r\n"
    )
    assert refolded != fields + MESSAGE
    assert dkimpy_results(refolded, keys) == [True, True]


def test_a_from_added_after_signing_breaks_every_signature(keys: list[DkimKey]) -> None:
    fields = sign(MESSAGE, keys)
    added_header = fields + b"X-Spam-Score: 0.1\r\n" + MESSAGE
    assert dkimpy_results(added_header, keys) == [True, True]

    for forged in (
        fields + b"From: mallory@example.com\r\n" + MESSAGE,
        fields + MESSAGE.replace(b"\r\n\r\n", b"\r\nFrom: mallory@example.com\r\n\r\n", 1),
    ):
        assert dkimpy_results(forged, keys) == [False, False]


def test_sign_without_keys_adds_nothing() -> None:
    assert sign(MESSAGE, []) == b""


def test_sign_refuses_a_message_without_from(keys: list[DkimKey]) -> None:
    with pytest.raises(DkimError, match="without a From"):
        sign(MESSAGE.replace(b"From: Alice <alice@example.org>\r\n", b""), keys)


# -- an independent verifier: Perl's Mail::DKIM ----------------------------------------------

# Reads the message on stdin; the arguments are DNS name / TXT value pairs, served by a resolver
# object handed to Mail::DKIM::DNS (its documented resolver() hook) instead of real DNS.
MAIL_DKIM_VERIFY = r"""
use strict;
use warnings;
use Mail::DKIM::DNS;
use Mail::DKIM::Verifier;
use Net::DNS;

package RecordsResolver;
sub new { my ($class, %records) = @_; return bless { records => \%records }, $class; }
sub errorstring { return 'NOERROR'; }
sub send {
    my ($self, $name, $type) = @_;
    my $packet = Net::DNS::Packet->new($name, $type);
    my $value = $self->{records}{lc $name};
    if (defined $value && $type eq 'TXT') {
        # a TXT record's character-strings hold at most 255 octets each
        $packet->push(answer => Net::DNS::RR->new(
            name => $name, type => 'TXT', txtdata => [unpack('(a255)*', $value)]));
    } else {
        $packet->header->rcode('NXDOMAIN');
    }
    return $packet;
}

package main;
Mail::DKIM::DNS::resolver(RecordsResolver->new(@ARGV));
my $verifier = Mail::DKIM::Verifier->new();
binmode STDIN;
local $/;
$verifier->PRINT(<STDIN>);
$verifier->CLOSE();
foreach my $signature ($verifier->signatures) {
    printf "%s %s %s\n", $signature->selector, $signature->result, $signature->result_detail;
}
"""


def mail_dkim_results(message: bytes, keys: list[DkimKey]) -> dict[str, str]:
    """Mail::DKIM's result per selector, e.g. ``{"r202611": "pass"}``."""
    args = [part for record in dns_records(keys) for part in record]
    done = subprocess.run(
        ["perl", "-e", MAIL_DKIM_VERIFY, *args],
        input=message,
        capture_output=True,
        check=True,
        timeout=30,
    )
    results = {}
    for line in done.stdout.decode().splitlines():
        selector, result, _ = line.split(" ", 2)
        results[selector] = result
    return results


def mail_dkim_knows_ed25519() -> bool:
    """Mail::DKIM verifies Ed25519 (RFC 8463) only in releases newer than Debian 12's
    1.20230212; look for it in the installed module rather than guess by version."""
    done = subprocess.run(
        ["perl", "-MMail::DKIM::PublicKey", "-e", 'print $INC{"Mail/DKIM/PublicKey.pm"}'],
        capture_output=True,
        check=True,
    )
    return b"ed25519" in Path(done.stdout.decode()).read_bytes()


needs_perl = pytest.mark.skipif(shutil.which("perl") is None, reason="perl is not installed")


@needs_perl
def test_mail_dkim_passes_the_signatures(keys: list[DkimKey]) -> None:
    results = mail_dkim_results(sign(MESSAGE, keys) + MESSAGE, keys)

    assert results["r202611"] == "pass"
    if mail_dkim_knows_ed25519():
        assert results["e202611"] == "pass"
    else:
        # Debian 12's Mail::DKIM (1.20230212) has no Ed25519: it must not pass, and a verifier
        # that ignores the Ed25519 signature still passes the message on the RSA one (RFC 8463 3).
        assert results["e202611"] == "invalid"  # "unsupported algorithm ed25519-sha256"


@needs_perl
def test_mail_dkim_fails_a_from_added_after_signing(keys: list[DkimKey]) -> None:
    forged = sign(MESSAGE, keys) + b"From: mallory@example.com\r\n" + MESSAGE
    assert mail_dkim_results(forged, keys)["r202611"] == "fail"
