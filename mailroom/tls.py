"""TLS for the servers: what they offer, and which certificate each new connection gets.

What this module owns:

- the two policies. ``INTERMEDIATE`` is Mozilla's "intermediate" configuration (guideline
  5.7) for the client ports (465, 587, 993, 995 and STARTTLS on 143/110): TLS 1.2 and 1.3,
  its nine TLS 1.2 suites, the client's cipher order, no compression, no session tickets,
  ffdhe2048 for the DHE suites. ``smtp_policy`` is port 25's: the same versions by default
  (``[tls] smtp_min_version``), but wider TLS 1.2 suites, because a sender whose STARTTLS
  fails falls back to plaintext.
- ``ServerTLS``, the one object a server asks for a context on every new connection. Its
  promises: every handshake, implicit TLS or STARTTLS, gets the pair on disk now (the files'
  identity, device/inode/mtime_ns/size, is compared at most once per ``CHECK_INTERVAL``
  seconds, and a changed pair is loaded into a fresh context); a pair that does not load
  (key not matching the certificate, a half-written or unreadable file) is never served: the
  last good one is, the problem is logged once, and the next check tries again; with
  ``[[tls.sni]]`` entries, the name the client asks for (SNI) picks the pair, any other name
  or none gets the default one.

How: the context handed to asyncio and aiosmtpd (``front``) has no certificate of its own,
only the policy and an ``sni_callback``. OpenSSL runs that callback for every ClientHello,
with or without SNI (CPython then passes ``None``; checked on 3.11 with OpenSSL 3.0 by
tests/test_tls.py), and the callback points the connection at the current pair's context
(``SSLObject.context`` = ``SSL_set_SSL_CTX``: certificate, key and DH parameters come from
it; versions, ciphers and options stay the front context's, so both are built alike).
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mailroom.config import Settings

log = logging.getLogger(__name__)

# How often (seconds) a connection may stat the certificate files: a renewal shows within this.
CHECK_INTERVAL = 1.0

# Mozilla "intermediate", guideline 5.7 (https://ssl-config.mozilla.org): TLS 1.2 suites.
# TLS 1.3's three suites are OpenSSL's default and Mozilla's list alike.
INTERMEDIATE_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    )
)
# Port 25: intermediate first, then what older MTAs still speak (CBC, RSA key exchange),
# never the unauthenticated or null ones. Encryption without a good suite beats plaintext.
SMTP_CIPHERS = INTERMEDIATE_CIPHERS + ":HIGH:!aNULL:!eNULL:!PSK:!SRP"

# RFC 7919 ffdhe2048, the group Mozilla publishes for the DHE suites (ssl-config's ffdhe2048.txt).
FFDHE2048 = """\
-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""

VERSIONS = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}


@dataclass(frozen=True, slots=True)
class Policy:
    """What a listener offers: the oldest TLS version and the TLS 1.2-and-older suites."""

    name: str
    ciphers: str
    minimum_version: ssl.TLSVersion


INTERMEDIATE = Policy("intermediate", INTERMEDIATE_CIPHERS, ssl.TLSVersion.TLSv1_2)


def smtp_policy(minimum_version: str = "TLSv1.2") -> Policy:
    """Port 25's policy; ``minimum_version`` is ``[tls] smtp_min_version``."""
    version = VERSIONS[minimum_version]
    ciphers = SMTP_CIPHERS
    if version < ssl.TLSVersion.TLSv1_2:
        # OpenSSL 3 allows TLS 1.0/1.1 (SHA-1 and MD5 in their handshake) only at level 0.
        ciphers += ":@SECLEVEL=0"
    return Policy("smtp", ciphers, version)


@cache
def _dh_params_path() -> str:
    """A path OpenSSL can read FFDHE2048 from (``load_dh_params`` takes only a path)."""
    fd = os.memfd_create("mailroom-ffdhe2048")
    os.write(fd, FFDHE2048.encode())
    return f"/proc/self/fd/{fd}"


def make_context(policy: Policy) -> ssl.SSLContext:
    """A server context with ``policy`` and no certificate yet."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = policy.minimum_version
    context.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    context.set_ciphers(policy.ciphers)
    # Mozilla: the client's order (its hardware knows whether AES or ChaCha is faster), no
    # compression (CRIME), no tickets (OpenSSL never rotates their key; session ids remain).
    context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET
    # Mozilla's groups are X25519, P-256, P-384; Python's ssl sets exactly one
    # (SSL_CTX_set1_groups): P-256, which every client of the intermediate list has.
    context.set_ecdh_curve("prime256v1")
    context.load_dh_params(_dh_params_path())
    return context


def server_context(cert: Path, key: Path, policy: Policy = INTERMEDIATE) -> ssl.SSLContext | None:
    """A context serving ``cert``/``key`` once, or None (logged) when they do not load."""
    try:
        context = make_context(policy)
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as err:
        log.error("cannot load TLS certificate %s / key %s: %s", cert, key, err)
        return None
    return context


@dataclass(frozen=True, slots=True)
class CertPair:
    """A certificate chain and its private key, as files."""

    cert: Path
    key: Path


_Stat = tuple[int, int, int, int]


def _stat(path: Path) -> _Stat | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class _Loaded:
    """One pair on disk and the context last loaded from it."""

    def __init__(self, pair: CertPair, policy: Policy) -> None:
        self.pair = pair
        self.policy = policy
        self.context: ssl.SSLContext | None = None
        self.loaded: tuple[_Stat, _Stat] | None = None  # the identity ``context`` came from
        self.logged: object = None  # the identity whose problem was logged last (log once)

    def identity(self) -> tuple[_Stat, _Stat] | None:
        cert, key = _stat(self.pair.cert), _stat(self.pair.key)
        return None if cert is None or key is None else (cert, key)

    def refresh(self) -> None:
        identity = self.identity()
        if identity is None:
            if self.logged != "missing":
                self.logged = "missing"
                serving = "the previous one stays in use" if self.context else "no TLS"
                log.warning("no TLS certificate/key at %s, %s: %s", *self._files(), serving)
            return
        if identity == self.loaded:
            return
        context = make_context(self.policy)
        try:
            context.load_cert_chain(self.pair.cert, self.pair.key)
        except (OSError, ssl.SSLError) as err:
            # The deploy hook renames the certificate, then the key: in between they do not
            # match, and this keeps the old pair until the second rename.
            if self.logged != identity:
                self.logged = identity
                serving = "the previous one stays in use" if self.context else "no TLS yet"
                log.error("cannot load TLS pair %s, %s (%s): %s", *self._files(), err, serving)
            return
        if self.identity() != identity:
            return  # written to while being read: the next check loads the finished files
        first = self.loaded is None
        self.context, self.loaded, self.logged = context, identity, None
        log.info("TLS certificate %s %s", self.pair.cert, "loaded" if first else "reloaded")

    def _files(self) -> tuple[Path, Path]:
        return self.pair.cert, self.pair.key


class ServerTLS:
    """The TLS of one server process: a context per new connection, the current pair in it."""

    def __init__(
        self,
        default: CertPair,
        sni: Mapping[str, CertPair] | None = None,
        policy: Policy = INTERMEDIATE,
        *,
        check_interval: float = CHECK_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        # No certificate of its own: every handshake gets one from _select.
        self.front = make_context(policy)
        self.front.sni_callback = self._select
        self._default = _Loaded(default, policy)
        self._sni = {_name(n): _Loaded(pair, policy) for n, pair in (sni or {}).items()}
        self._interval = check_interval
        self._clock = clock
        self._next_check = float("-inf")
        self._refresh()

    @classmethod
    def for_clients(cls, settings: Settings) -> ServerTLS:
        """Submission, IMAP and POP3: Mozilla intermediate."""
        return cls(*_pairs(settings), INTERMEDIATE)

    @classmethod
    def for_smtp(cls, settings: Settings) -> ServerTLS:
        """Port 25: the lenient policy."""
        return cls(*_pairs(settings), smtp_policy(settings.tls.smtp_min_version))

    def context(self) -> ssl.SSLContext | None:
        """The context for a new connection (implicit TLS or STARTTLS), or None while the
        default pair has never loaded (port 25 then offers no STARTTLS)."""
        self._refresh()
        return self.front if self._default.context is not None else None

    def _refresh(self) -> None:
        now = self._clock()
        if now < self._next_check:
            return
        self._next_check = now + self._interval
        self._default.refresh()
        for loaded in self._sni.values():
            loaded.refresh()

    def _select(
        self,
        ssl_object: ssl.SSLObject | ssl.SSLSocket,
        server_name: str | None,
        front: ssl.SSLContext,
    ) -> int | None:
        """OpenSSL's servername callback: runs in every handshake, SNI or not."""
        self._refresh()
        loaded = self._sni.get(_name(server_name)) if server_name else None
        context = (loaded.context if loaded else None) or self._default.context
        if context is None:
            return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE  # no certificate at all
        ssl_object.context = context
        return None


def _name(hostname: str) -> str:
    return hostname.strip().rstrip(".").lower()


def _pairs(settings: Settings) -> tuple[CertPair, dict[str, CertPair]]:
    default = CertPair(settings.tls_cert, settings.tls_key)
    sni = {entry.hostname: CertPair(entry.cert, entry.key) for entry in settings.tls.sni}
    return default, sni
