"""MTA-STS (RFC 8461): which MX hosts of a domain mail may go to, and only over verified TLS.

``policy(domain, resolver, ...)`` finds the policy the way a sending MTA must (RFC 8461 3, 5.1):

1. the TXT record ``_mta-sts.{domain}`` (``v=STSv1; id=...``) says a policy exists, and its id;
2. a cached policy with that id that has not expired is used as it is;
3. otherwise ``https://mta-sts.{domain}/.well-known/mta-sts.txt`` is fetched (certificate checked
   for ``mta-sts.{domain}``, no redirects, 10 s, 64 KiB, ``text/plain``) from the addresses the
   resolver gives, parsed, and cached in ``cache_dir`` until ``max_age`` runs out;
4. if the TXT record is missing or the fetch fails, an unexpired cached policy still applies
   (an attacker who can strip the TXT record or block the fetch must not switch it off).

``policy`` returns ``None`` when there is no usable policy; it does not raise for DNS, network,
TLS or format problems (they are logged). ``Policy.matches(host)`` says whether an MX host is one
the policy names. The HTTPS client is the few lines of HTTP/1.1 this needs, on asyncio and ssl.

The cache is one JSON file per domain, ``{cache_dir}/{domain}.json``, written crash-safely:
``{"domain", "id", "fetched", "expires", "policy"}`` with the policy's text as served.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from mailroom.errors import MailroomError
from mailroom.maildir import fsync_dir
from mailroom.resolver import DnsPermanentError, DnsTemporaryError, Resolver

log = logging.getLogger(__name__)

POLICY_PATH = "/.well-known/mta-sts.txt"
FETCH_TIMEOUT = 10.0
MAX_POLICY_SIZE = 64 * 1024  # RFC 8461 3.3: senders may limit the body; 64 KiB is plenty
MAX_MAX_AGE = 31_557_600  # RFC 8461 3.2: max_age is at most a year
_MAX_HEADER_SIZE = 16 * 1024
_ID_RE = re.compile(r"^[A-Za-z0-9]{1,32}$")  # RFC 8461 3.1: sts-id = 1*32(ALPHA / DIGIT)
_DOMAIN_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")


class PolicyError(MailroomError):
    """A policy could not be fetched, or what was fetched is not a valid policy."""


class Mode(StrEnum):
    """RFC 8461 5: what a sender does when an MX host fails the policy."""

    ENFORCE = "enforce"  # do not deliver to it
    TESTING = "testing"  # deliver anyway (and report)
    NONE = "none"  # the domain has withdrawn its policy


@dataclass(frozen=True, slots=True)
class Policy:
    """A parsed policy: ``mx`` holds its patterns, lower case, without a final dot."""

    mode: Mode
    mx: tuple[str, ...]
    max_age: int
    id: str = ""

    def matches(self, mx_host: str) -> bool:
        """Whether ``mx_host`` is one the policy names (RFC 8461 4.1)."""
        host = mx_host.strip().rstrip(".").lower()
        if not host:
            return False
        for pattern in self.mx:
            if pattern.startswith("*."):
                # RFC 8461 4.1: a wildcard stands for exactly one label, the leftmost.
                label, dot, rest = host.partition(".")
                if label and dot and rest == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False


# -- parsing (no I/O) ----------------------------------------------------------------------------


def parse_txt(records: list[str]) -> str | None:
    """The policy id from ``_mta-sts`` TXT records, or ``None`` if they announce no policy.

    RFC 8461 3.1: records not starting with ``v=STSv1`` are discarded; unless exactly one is
    left and it has a valid id, there is no policy.
    """
    sts = [r for r in records if re.match(r"v=STSv1\s*(;|$)", r)]
    if len(sts) != 1:
        return None
    fields = [f.strip() for f in sts[0].split(";")]
    for name, _, value in (f.partition("=") for f in fields[1:] if f):
        if name.strip() == "id":
            value = value.strip()
            return value if _ID_RE.match(value) else None
    return None


def parse_policy(text: str, policy_id: str = "") -> Policy:
    """The policy in ``text`` (RFC 8461 3.2); raises ``PolicyError`` if it is not a valid one."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.split("\n"):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise PolicyError(f"policy line without a colon: {line[:80]!r}")
        name, value = name.strip().lower(), value.strip()
        if name == "mx":
            mx.append(value.rstrip(".").lower())
        else:
            # A repeated field: the first one counts. Unknown fields are ignored (3.2).
            fields.setdefault(name, value)
    if fields.get("version") != "STSv1":
        raise PolicyError(f"policy version is {fields.get('version')!r}, not 'STSv1'")
    try:
        mode = Mode(fields.get("mode", ""))
    except ValueError:
        raise PolicyError(
            f"policy mode {fields.get('mode')!r} is not enforce, testing or none"
        ) from None
    max_age_text = fields.get("max_age", "")
    if not re.fullmatch(r"[0-9]{1,10}", max_age_text):
        raise PolicyError(f"policy max_age {max_age_text!r} is not a number of seconds")
    return Policy(mode, tuple(mx), min(int(max_age_text), MAX_MAX_AGE), policy_id)


# -- discovery -----------------------------------------------------------------------------------


async def policy(
    domain: str,
    resolver: Resolver,
    *,
    port: int = 443,
    ca_file: Path | None = None,
    cache_dir: Path | None = None,
    now: Callable[[], float] = time.time,
    timeout: float = FETCH_TIMEOUT,
) -> Policy | None:
    """The MTA-STS policy of ``domain`` that applies now, or ``None`` (RFC 8461 5.1).

    ``port`` is the policy host's HTTPS port and ``ca_file`` the CA bundle its certificate must
    chain to (default: the system's); both are for tests. ``cache_dir`` None: no cache.
    ``now`` is the clock; ``timeout`` bounds the HTTPS fetch.
    """
    domain = domain.strip().rstrip(".").lower()
    cached = _load(cache_dir, domain, now())
    try:
        records: list[str] | None = await resolver.txt(f"_mta-sts.{domain}")
    except (DnsTemporaryError, DnsPermanentError) as err:
        log.info("MTA-STS: TXT lookup for %s failed: %s", domain, err)
        records = None
    policy_id = parse_txt(records) if records is not None else None
    if policy_id is None:
        # RFC 8461 5.1: without a (valid) TXT record, an unexpired cached policy still applies.
        return cached
    if cached is not None and cached.id == policy_id:
        return cached
    try:
        text = await asyncio.wait_for(fetch(domain, resolver, port=port, ca_file=ca_file), timeout)
        fetched = parse_policy(text, policy_id)
    except (PolicyError, DnsTemporaryError, DnsPermanentError, TimeoutError) as err:
        reason = str(err) or f"timed out after {timeout:g} s"
        log.warning("MTA-STS: no policy fetched for %s: %s", domain, reason)
        # RFC 8461 5.1: a failed fetch leaves an unexpired cached policy in force.
        return cached
    if cache_dir is not None:
        _store(cache_dir, domain, text, fetched, now())
    return fetched


async def fetch(
    domain: str, resolver: Resolver, *, port: int = 443, ca_file: Path | None = None
) -> str:
    """The text at ``https://mta-sts.{domain}/.well-known/mta-sts.txt`` (RFC 8461 3.3).

    Connects to each address the resolver gives for ``mta-sts.{domain}`` in turn, verifying
    the certificate for that name. Raises ``PolicyError`` (or a ``Dns*Error``); the caller
    bounds the time.
    """
    host = f"mta-sts.{domain}"
    addresses = await resolver.addresses(host)
    if not addresses:
        raise PolicyError(f"{host} has no address")
    context = _tls_context(ca_file)
    problems: list[str] = []
    for address in addresses:
        try:
            reader, writer = await asyncio.open_connection(
                address, port, ssl=context, server_hostname=host
            )
        except OSError as err:  # ssl.SSLError included
            problems.append(f"{address} port {port}: {_describe(err)}")
            continue
        try:
            return await _get(reader, writer, host, port)
        except (
            OSError,
            EOFError,  # asyncio.IncompleteReadError: the body ended early
            asyncio.LimitOverrunError,  # a header or chunk-size line over 64 KiB
            ValueError,  # a number that is not one; UnicodeDecodeError
        ) as err:
            raise PolicyError(f"https://{host}{POLICY_PATH}: {_describe(err)}") from None
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    raise PolicyError(f"cannot fetch https://{host}{POLICY_PATH}: " + "; ".join(problems))


# -- HTTPS ---------------------------------------------------------------------------------------


def _tls_context(ca_file: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


async def _get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int
) -> str:
    authority = host if port == 443 else f"{host}:{port}"
    writer.write(
        f"GET {POLICY_PATH} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: mailroom\r\n"
        "Accept: text/plain\r\nConnection: close\r\n\r\n".encode("ascii")
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    if len(head) > _MAX_HEADER_SIZE:
        raise PolicyError(f"https://{host}{POLICY_PATH}: response header too large")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise PolicyError(f"https://{host}{POLICY_PATH}: not an HTTP response")
    if parts[1] != "200":
        # RFC 8461 3.3: anything but 200 fails the fetch; redirects are not followed.
        raise PolicyError(f"https://{host}{POLICY_PATH}: HTTP status {' '.join(parts[1:])}")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    media_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "text/plain":
        # RFC 8461 3.3: senders should check the media type is text/plain.
        raise PolicyError(f"https://{host}{POLICY_PATH}: Content-Type {media_type or 'missing'}")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = await _read_chunked(reader)
    elif "content-length" in headers:
        length = int(headers["content-length"])
        if not 0 <= length <= MAX_POLICY_SIZE:
            raise PolicyError(f"https://{host}{POLICY_PATH}: policy larger than 64 KiB")
        body = await reader.readexactly(length)
    else:
        body = await reader.read(MAX_POLICY_SIZE + 1)
        while len(body) <= MAX_POLICY_SIZE:
            more = await reader.read(MAX_POLICY_SIZE + 1 - len(body))
            if not more:
                break
            body += more
    if len(body) > MAX_POLICY_SIZE:
        raise PolicyError(f"https://{host}{POLICY_PATH}: policy larger than 64 KiB")
    return body.decode("utf-8")


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return bytes(body)
        if len(body) + size > MAX_POLICY_SIZE:
            raise PolicyError("policy larger than 64 KiB")
        body += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise PolicyError("malformed chunked body")


def _describe(err: BaseException) -> str:
    if isinstance(err, ssl.SSLCertVerificationError):
        return f"certificate not valid: {err.verify_message or err.reason}"
    return str(err) or type(err).__name__


# -- cache ---------------------------------------------------------------------------------------


def _cache_file(cache_dir: Path | None, domain: str) -> Path | None:
    if cache_dir is None or not _DOMAIN_RE.match(domain):
        return None
    return cache_dir / f"{domain}.json"


def _load(cache_dir: Path | None, domain: str, now: float) -> Policy | None:
    """The cached policy of ``domain`` if there is one and it has not expired."""
    path = _cache_file(cache_dir, domain)
    if path is None:
        return None
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        if float(entry["expires"]) <= now:
            return None
        return parse_policy(str(entry["policy"]), str(entry["id"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, PolicyError) as err:
        log.warning("MTA-STS: ignoring the unreadable cache file %s: %s", path, err)
        return None


def _store(cache_dir: Path, domain: str, text: str, fetched: Policy, now: float) -> None:
    """Write the cache entry crash-safely: tmp, fsync, rename, fsync the directory."""
    path = _cache_file(cache_dir, domain)
    if path is None:
        return
    entry = {
        "domain": domain,
        "id": fetched.id,
        "fetched": now,
        "expires": now + fetched.max_age,
        "policy": text,
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(entry, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        fsync_dir(cache_dir)
    except OSError as err:
        log.warning("MTA-STS: cannot cache the policy of %s in %s: %s", domain, path, err)
        with contextlib.suppress(OSError):
            tmp.unlink()
