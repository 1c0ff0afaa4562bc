"""TLS contexts for the servers: the certificate pair in use, or none yet."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

log = logging.getLogger(__name__)


def server_context(cert: Path, key: Path) -> ssl.SSLContext | None:
    """A server context for ``cert``/``key`` (TLS 1.2 or newer), or None when they are missing.

    A missing or unusable pair is logged, not fatal: port 25 then offers no STARTTLS.
    """
    if not cert.exists() or not key.exists():
        log.warning("no TLS certificate at %s; STARTTLS is not offered", cert)
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as err:
        log.error(
            "cannot load TLS certificate %s / key %s: %s; STARTTLS is not offered", cert, key, err
        )
        return None
    return context
