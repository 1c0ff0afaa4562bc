"""DKIM keys and signatures for outbound mail (RFC 6376, RFC 8463).

What this module owns: the signing keys under ``{data_dir}/dkim/{domain}/``, one
``{selector}.key`` per key (the private key, mode 0600, in the form dkimpy signs with) and a
``{selector}.txt`` beside it (the DNS TXT record value, for people and other tools; the ``.key``
file is the only source of truth), and the ``DKIM-Signature:`` header fields put on outbound mail.

What it promises:

- ``generate`` makes one RSA-2048 and one Ed25519 key per call, with selectors named for the
  month (``r202611``, ``e202611``); it never overwrites a key, and a key file is either absent
  or complete (tmp, fsync, link, fsync dir).
- ``load_keys`` gives the newest key of each algorithm, RSA first; those are the keys that sign.
  Generating keys for a domain that has some makes the new ones the signing keys at once, so
  their DNS records must be published before mail goes out with them.
- ``sign`` adds one signature per key, ``c=relaxed/relaxed``, over the ``HEADERS`` present in
  the message, ``From:`` signed once more than it occurs, so that no From: can be added later
  (RFC 6376 8.15). It returns only the new header fields; the caller puts them on top.

Signing uses dkimpy (``import dkim``); Ed25519 signing needs PyNaCl beside it (dkimpy imports
it lazily). Keys are made with ``cryptography``.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import dkim as dkimpy  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailroom.addresses import normalise_domain
from mailroom.errors import MailroomError
from mailroom.maildir import fsync_dir, write_file

log = logging.getLogger(__name__)

RSA_SHA256 = "rsa-sha256"
ED25519_SHA256 = "ed25519-sha256"
ALGORITHMS = (RSA_SHA256, ED25519_SHA256)  # also the order of the signatures
_SELECTOR_PREFIX = {RSA_SHA256: "r", ED25519_SHA256: "e"}
RSA_BITS = 2048
MIN_RSA_BITS = 1024  # RFC 8301 3.2: verifiers MUST NOT consider smaller keys valid

KEY_MODE = 0o600
TXT_MODE = 0o644
DIR_MODE = 0o700

#: The header fields signed when present, in this order (RFC 6376 5.4.1). Each is listed as
#: often as it occurs, so every instance is covered; ``from`` is listed once more (OVERSIGNED).
HEADERS: tuple[bytes, ...] = (
    b"from",
    b"to",
    b"cc",
    b"subject",
    b"date",
    b"message-id",
    b"reply-to",
    b"in-reply-to",
    b"references",
    b"mime-version",
    b"content-type",
    b"content-transfer-encoding",
    b"list-id",
    b"list-help",
    b"list-unsubscribe",
    b"list-unsubscribe-post",  # RFC 8058 3.3: MUST be covered by a DKIM signature
    b"list-subscribe",
    b"list-post",
    b"list-owner",
    b"list-archive",
)
OVERSIGNED: tuple[bytes, ...] = (b"from",)

_SELECTOR_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_DATED_RE = re.compile(r"(\d{6})$")


class DkimError(MailroomError):
    """A DKIM key could not be made, read or used; the message names the file or the cause."""


@dataclass(frozen=True, slots=True)
class DkimKey:
    """One signing key of a domain, with the TXT record that publishes its public half."""

    domain: str  # lower-case A-label
    selector: str
    algorithm: str  # RSA_SHA256 or ED25519_SHA256
    # PKCS#1 PEM for RSA; base64 of the 32-byte seed for Ed25519 (what dkimpy signs with);
    # left out of repr() so that it never reaches a log line or a traceback
    private_key: bytes = field(repr=False)
    public_txt: str  # "v=DKIM1; k=rsa; p=..." / "v=DKIM1; k=ed25519; p=..."


def generate(dkim_dir: Path, domain: str, *, now: datetime | None = None) -> list[DkimKey]:
    """Make an RSA-2048 and an Ed25519 key for ``domain``, selectors dated from ``now``.

    Raises ``DkimError`` if a key with either selector exists already (nothing is written
    then), ``InvalidNameError`` for a bad domain.
    """
    domain = normalise_domain(domain)
    month = f"{(now or datetime.now(UTC)):%Y%m}"
    directory = dkim_dir / domain
    keys = [
        _rsa_key(domain, f"{_SELECTOR_PREFIX[RSA_SHA256]}{month}", _new_rsa()),
        _ed25519_key(domain, f"{_SELECTOR_PREFIX[ED25519_SHA256]}{month}", _new_ed25519()),
    ]
    for key in keys:
        if (directory / f"{key.selector}.key").exists():
            raise DkimError(f"{directory / key.selector}.key exists already; not overwriting it")
    _make_dir(dkim_dir)
    _make_dir(directory)
    # The .txt files first: a crash before the .key files are in place leaves no key behind.
    for key in keys:
        _write(directory / f"{key.selector}.txt", f"{key.public_txt}\n".encode(), TXT_MODE)
    for key in keys:
        _write(directory / f"{key.selector}.key", key.private_key, KEY_MODE, replace=False)
        log.info("dkim: generated %s key %s for %s", key.algorithm, key.selector, domain)
    return keys


def load_keys(dkim_dir: Path, domain: str) -> list[DkimKey]:
    """The newest key of each algorithm for ``domain`` (RSA first); ``[]`` if it has none.

    "Newest" is the latest ``YYYYMM`` the selector ends with; undated selectors (imported
    keys) count as older than any dated one, and among themselves go by name.
    """
    domain = normalise_domain(domain)
    directory = dkim_dir / domain
    try:
        paths = sorted(p for p in directory.iterdir() if p.suffix == ".key")
    except FileNotFoundError:
        return []
    except OSError as e:
        raise DkimError(f"cannot read DKIM keys in {directory}: {e.strerror}") from e
    newest: dict[str, DkimKey] = {}
    for path in paths:
        if not _SELECTOR_RE.match(path.stem):
            log.warning("dkim: ignoring %s: %r is not a usable selector", path, path.stem)
            continue
        key = _read_key(path, domain)
        have = newest.get(key.algorithm)
        if have is None or _age(key.selector) > _age(have.selector):
            newest[key.algorithm] = key
    return [newest[a] for a in ALGORITHMS if a in newest]


def dns_records(keys: Sequence[DkimKey]) -> list[tuple[str, str]]:
    """``(name, TXT value)`` per key. A value longer than 255 octets (RSA) goes into DNS as
    several character-strings of one TXT record; joining them is the verifier's job."""
    return [(_dns_name(key), key.public_txt) for key in keys]


def sign(message: bytes, keys: Sequence[DkimKey]) -> bytes:
    """The ``DKIM-Signature:`` fields (folded, CRLF-terminated) to prepend to ``message``.

    ``message`` is the whole message, header and body, with CRLF line ends.
    """
    if not keys:
        return b""
    try:
        signer = dkimpy.DKIM(message, linesep=b"\r\n")
    except dkimpy.DKIMException as e:
        raise DkimError(f"cannot sign a malformed message: {e}") from e
    names = [name.lower() for name, _ in signer.headers]
    if b"from" not in names:
        raise DkimError("cannot sign a message without a From: header")  # RFC 6376 5.4
    include = _header_list(names)
    signatures: list[bytes] = []
    for key in keys:
        try:
            signature: bytes = signer.sign(
                key.selector.encode("ascii"),
                key.domain.encode("ascii"),
                key.private_key,
                signature_algorithm=key.algorithm.encode("ascii"),
                canonicalize=(b"relaxed", b"relaxed"),
                include_headers=include,
            )
        except dkimpy.DKIMException as e:
            raise DkimError(f"DKIM signing with {_dns_name(key)} failed: {e}") from e
        signatures.append(signature)
    return b"".join(signatures)


def _header_list(names: Iterable[bytes]) -> list[bytes]:
    """The ``h=`` list for a message whose header field names are ``names``."""
    count = Counter(name.lower() for name in names)
    include = [name for name in HEADERS for _ in range(count[name])]
    return include + list(OVERSIGNED)


# -- keys ------------------------------------------------------------------------------------


def _new_rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)


def _new_ed25519() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def _rsa_key(domain: str, selector: str, private: rsa.RSAPrivateKey) -> DkimKey:
    # dkimpy reads only PKCS#1 ("BEGIN RSA PRIVATE KEY"); p= is the SubjectPublicKeyInfo DER.
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    spki = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    txt = f"v=DKIM1; k=rsa; p={base64.b64encode(spki).decode('ascii')}"
    return DkimKey(domain, selector, RSA_SHA256, pem, txt)


def _ed25519_key(domain: str, selector: str, private: ed25519.Ed25519PrivateKey) -> DkimKey:
    # RFC 8463 4: p= is the base64 of the raw 32-byte public key; dkimpy signs with the
    # base64 of the 32-byte seed (what its dknewkey writes).
    seed = private.private_bytes_raw()
    public = private.public_key().public_bytes_raw()
    txt = f"v=DKIM1; k=ed25519; p={base64.b64encode(public).decode('ascii')}"
    return DkimKey(domain, selector, ED25519_SHA256, base64.b64encode(seed), txt)


def _read_key(path: Path, domain: str) -> DkimKey:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DkimError(f"cannot read DKIM key {path}: {e.strerror}") from e
    selector = path.stem
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            private = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise DkimError(f"{path} is not a readable PEM private key: {e}") from e
        if not isinstance(private, rsa.RSAPrivateKey):
            raise DkimError(f"{path} holds a PEM key that is not RSA")
        if private.key_size < MIN_RSA_BITS:
            raise DkimError(f"{path} is a {private.key_size}-bit RSA key; at least 1024 needed")
        return _rsa_key(domain, selector, private)
    try:
        seed = base64.b64decode(data.strip(), validate=True)
    except binascii.Error:
        seed = b""
    if len(seed) != 32:
        raise DkimError(f"{path} is neither a PEM RSA key nor a base64 Ed25519 seed")
    return _ed25519_key(domain, selector, ed25519.Ed25519PrivateKey.from_private_bytes(seed))


def _dns_name(key: DkimKey) -> str:
    return f"{key.selector}._domainkey.{key.domain}"


def _age(selector: str) -> tuple[str, str]:
    dated = _DATED_RE.search(selector)
    return (dated.group(1) if dated else "", selector)


# -- files -----------------------------------------------------------------------------------


def _make_dir(path: Path) -> None:
    """Create ``path`` (and its parents) mode 0700 if missing; an existing one is left alone."""
    if path.is_dir():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=DIR_MODE)
    except FileExistsError:
        return
    os.chmod(path, DIR_MODE)  # mkdir's mode is masked by the umask
    fsync_dir(path.parent)


def _write(path: Path, data: bytes, mode: int, *, replace: bool = True) -> None:
    """Put ``data`` at ``path`` crash-safe: tmp file, fsync, rename (or link), fsync the dir.

    With ``replace=False`` an existing ``path`` is never touched: ``DkimError`` instead.
    """
    # the tmp file has its final mode from the start: key material is never readable to others
    try:
        write_file(path, data, mode, replace=replace)
    except FileExistsError:
        raise DkimError(f"{path} exists already; not overwriting it") from None
