"""Let's Encrypt certificates through certbot: issuing, installing, reporting.

This module owns the certificate pair in ``{data_dir}/tls/`` (``Settings.tls_cert`` and
``tls_key``) from the outside: the servers only read it (``mailroom.tls``).

- ``issue_command`` builds the ``certbot certonly`` command line for one of the methods
  (DNS-01 through Cloudflare or RFC 2136, HTTP-01 standalone or webroot) with the deploy hook
  registered, so that certbot's own timer renews the certificate and installs it again.
- ``install`` is the deploy hook: it checks a certbot lineage's ``fullchain.pem`` and
  ``privkey.pem`` (the key belongs to the certificate, the certificate is valid now, its names
  cover the hostname) and only then puts them in place, crash-safe, the key first. On any
  problem it raises ``CertError`` and the pair in use stays as it was, byte for byte.
- ``status`` describes the pair in use: names, issuer, days left, where it is served and
  whether certbot will renew it.

Every error is a ``CertError`` whose text is one line fit for the admin.
"""

from __future__ import annotations

import configparser
import contextlib
import datetime as dt
import errno
import os
import pwd
import shlex
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificatePublicKeyTypes,
    PrivateKeyTypes,
)

from mailroom.config import Settings
from mailroom.errors import MailroomError
from mailroom.maildir import fsync_dir, write_file

SERVICE_USER = "mailroom"
WARN_DAYS = 14  # `tls status` warns when fewer days are left
CERT_MODE = 0o644
KEY_MODE = 0o600
TLS_DIR_MODE = 0o750
# The sockets that serve the pair (systemd units; ports as in design.md).
USED_BY = (
    ("mailroom-smtpd", "smtp", 25, "STARTTLS"),
    ("mailroom-submission", "submission", 587, "STARTTLS"),
    ("mailroom-submission", "submissions", 465, "TLS"),
    ("mailroom-imapd", "imap", 143, "STARTTLS"),
    ("mailroom-imapd", "imaps", 993, "TLS"),
    ("mailroom-pop3d", "pop3", 110, "STLS"),
    ("mailroom-pop3d", "pop3s", 995, "TLS"),
)
HOOK_ARGS = ("tls", "deploy-hook")
PACKAGED_HOOK = Path("renewal-hooks/deploy/mailroom")  # in certbot's config dir (the .deb)


class CertError(MailroomError):
    """A certificate cannot be issued, installed or read; the text is one line."""


class Method(StrEnum):
    """How certbot proves control of the hostname."""

    DNS_CLOUDFLARE = "dns-cloudflare"  # DNS-01 through the Cloudflare API: no port 80 needed
    DNS_RFC2136 = "dns-rfc2136"  # DNS-01 through DNS UPDATE with TSIG (own DNS server, tests)
    STANDALONE = "standalone"  # HTTP-01, certbot listens on port 80 itself
    WEBROOT = "webroot"  # HTTP-01 through the web server already on port 80


# -- reading certificates --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CertInfo:
    """What an admin wants to know about a certificate."""

    subject: str
    names: tuple[str, ...]  # subjectAltName DNS names
    issuer: str
    not_before: dt.datetime
    not_after: dt.datetime
    self_signed: bool
    sha256: str  # fingerprint, hex

    def days_left(self, now: dt.datetime) -> int:
        return (self.not_after - now).days

    def covers(self, hostname: str) -> bool:
        return any(name_matches(name, hostname) for name in self.names)


def name_matches(name: str, hostname: str) -> bool:
    """``name`` (a SAN entry, maybe ``*.example.org``) covers ``hostname``. RFC 6125 6.4.3:
    the wildcard stands for exactly one whole left-most label."""
    name, hostname = name.lower().rstrip("."), hostname.lower().rstrip(".")
    if name.startswith("*."):
        first, dot, rest = hostname.partition(".")
        return bool(first) and bool(dot) and rest == name[2:]
    return name == hostname


def load_chain(data: bytes, where: str) -> list[x509.Certificate]:
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertError(f"{where}: not a PEM certificate") from None
    return chain


def load_key(data: bytes, where: str) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise CertError(f"{where}: not an unencrypted PEM private key") from None


def describe(cert: x509.Certificate) -> CertInfo:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = ()
    return CertInfo(
        subject=cert.subject.rfc4514_string(),
        names=names,
        issuer=cert.issuer.rfc4514_string(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        self_signed=_self_signed(cert),
        sha256=cert.fingerprint(hashes.SHA256()).hex(),
    )


def read_info(path: Path) -> CertInfo:
    """The first certificate of the PEM file at ``path``."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CertError(f"no certificate at {path}") from None
    except OSError as err:
        raise CertError(f"cannot read {path}: {err.strerror}") from None
    return describe(load_chain(data, str(path))[0])


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (InvalidSignature, ValueError, TypeError):  # not signed by its own key
        return False
    return True


def _public_der(public: CertificatePublicKeyTypes) -> bytes:
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# -- the deploy hook -------------------------------------------------------------------------


def check_pair(
    cert_pem: bytes, key_pem: bytes, hostname: str, now: dt.datetime, where: str
) -> CertInfo:
    """The pair is usable for ``hostname`` at ``now``, or ``CertError`` says why not."""
    chain = load_chain(cert_pem, f"{where}/fullchain.pem")
    key = load_key(key_pem, f"{where}/privkey.pem")
    leaf = chain[0]
    if _public_der(key.public_key()) != _public_der(leaf.public_key()):  # type: ignore[arg-type]
        raise CertError(f"{where}: the private key does not belong to the certificate")
    info = describe(leaf)
    if now < info.not_before:
        raise CertError(f"{where}: the certificate is not valid before {_when(info.not_before)}")
    if now >= info.not_after:
        raise CertError(f"{where}: the certificate expired on {_when(info.not_after)}")
    if not info.covers(hostname):
        names = ", ".join(info.names) or "no DNS names"
        raise CertError(f"{where}: the certificate is for {names}, not for {hostname}")
    return info


@dataclass(frozen=True, slots=True)
class Installed:
    info: CertInfo
    changed: bool  # False: the same pair was in place already


def install(
    settings: Settings,
    lineage: Path,
    *,
    now: dt.datetime | None = None,
    owner: tuple[int, int] | None = None,
) -> Installed:
    """Check ``lineage``'s ``fullchain.pem``/``privkey.pem`` and put them in place as
    ``settings.tls_cert``/``tls_key``; on any problem ``CertError`` and nothing changed.

    ``owner`` (uid, gid) of the files when run as root; default: the service user, else the
    owner of ``data_dir``. The key is written first: until the certificate follows, the
    servers see a pair that does not match and keep serving the one they have.
    """
    now = now or dt.datetime.now(dt.UTC)
    cert_pem = _read_lineage(lineage / "fullchain.pem")
    key_pem = _read_lineage(lineage / "privkey.pem")
    info = check_pair(cert_pem, key_pem, settings.hostname, now, str(lineage))
    cert_path, key_path = settings.tls_cert, settings.tls_key
    old_cert, old_key = _read_quietly(cert_path), _read_quietly(key_path)
    if old_cert == cert_pem and old_key == key_pem:
        return Installed(info, changed=False)
    owner = owner or default_owner(settings)
    try:
        for directory in {cert_path.parent, key_path.parent}:
            _make_tls_dir(directory, owner)
        write_file(key_path, key_pem, KEY_MODE, owner=owner)
    except OSError as err:
        raise CertError(
            f"cannot write {key_path}: {_oserror(err)}; the pair in use is kept"
        ) from None
    try:
        write_file(cert_path, cert_pem, CERT_MODE, owner=owner)
    except OSError as err:
        if old_key is not None:  # put the old key back beside the old certificate
            with contextlib.suppress(OSError):
                write_file(key_path, old_key, KEY_MODE, owner=owner)
        raise CertError(
            f"cannot write {cert_path}: {_oserror(err)}; the pair in use is kept"
        ) from None
    return Installed(info, changed=True)


def default_owner(settings: Settings) -> tuple[int, int] | None:
    """The service user's uid/gid if it exists, else the owner of ``data_dir`` (or None)."""
    try:
        user = pwd.getpwnam(SERVICE_USER)
        return user.pw_uid, user.pw_gid
    except KeyError:
        pass
    try:
        st = os.stat(settings.data_dir)
    except OSError:
        return None
    return st.st_uid, st.st_gid


def _make_tls_dir(path: Path, owner: tuple[int, int] | None) -> None:
    if path.is_dir():
        return
    path.mkdir(mode=TLS_DIR_MODE, parents=True, exist_ok=True)
    if owner is not None and os.geteuid() == 0:
        os.chown(path, *owner)
    fsync_dir(path.parent)


def _read_lineage(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertError(f"{path} does not exist (not a certbot lineage?)") from None
    except OSError as err:
        raise CertError(f"cannot read {path}: {_oserror(err)}") from None


def _read_quietly(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


# -- issuing ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IssueRequest:
    """Everything ``certbot certonly`` is told; ``issue_command`` turns it into argv."""

    hostname: str
    method: Method
    deploy_hook: str
    cert_name: str = "mailroom"
    email: str = ""
    credentials: Path | None = None  # dns-cloudflare, dns-rfc2136
    webroot_path: Path | None = None  # webroot
    http_01_port: int = 80  # standalone
    http_01_address: str = ""  # standalone
    server: str = ""
    staging: bool = False
    config_dir: Path = Path("/etc/letsencrypt")
    work_dir: Path = Path("/var/lib/letsencrypt")
    logs_dir: Path = Path("/var/log/letsencrypt")
    extra_args: tuple[str, ...] = field(default_factory=tuple)


def issue_command(request: IssueRequest, certbot: str = "certbot") -> list[str]:
    """The ``certbot certonly`` argv for ``request``."""
    r = request
    argv = [
        certbot, "certonly", "--non-interactive", "--agree-tos",
        "--cert-name", r.cert_name, "-d", r.hostname, "--keep-until-expiring",
        "--config-dir", str(r.config_dir), "--work-dir", str(r.work_dir),
        "--logs-dir", str(r.logs_dir),
        "--deploy-hook", r.deploy_hook,
    ]  # fmt: skip
    argv += ["--email", r.email] if r.email else ["--register-unsafely-without-email"]
    if r.server:
        argv += ["--server", r.server]
    if r.staging:
        argv.append("--staging")
    match r.method:
        case Method.DNS_CLOUDFLARE | Method.DNS_RFC2136:
            plugin = str(r.method)
            argv += [f"--{plugin}", f"--{plugin}-credentials", str(r.credentials)]
        case Method.STANDALONE:
            argv += ["--standalone", "--http-01-port", str(r.http_01_port)]
            if r.http_01_address:
                argv += ["--http-01-address", r.http_01_address]
        case Method.WEBROOT:
            argv += ["--webroot", "-w", str(r.webroot_path)]
    return argv + list(r.extra_args)


def deploy_hook_command(mailroomctl: str | None = None) -> str:
    """The shell command certbot stores and runs after each issue and renewal: this very
    ``mailroomctl`` (its absolute path), with ``CONFIG_PATH`` when one is set, since the
    renewal timer runs without our environment."""
    if mailroomctl is None:
        me = Path(sys.argv[0])
        found = shutil.which("mailroomctl")
        mailroomctl = str(me.absolute()) if me.name == "mailroomctl" else found or "mailroomctl"
    argv = [mailroomctl, *HOOK_ARGS]
    config = os.environ.get("CONFIG_PATH")
    if config:  # certbot checks that the hook's first word is a program: env, not VAR=...
        argv = ["env", f"CONFIG_PATH={Path(config).absolute()}", *argv]
    return shlex.join(argv)


def choose_method(
    *,
    cloudflare_credentials: Path | None,
    rfc2136_credentials: Path | None,
    webroot_path: Path | None,
    http_01_port: int,
    http_01_address: str,
    port_free: Callable[[str, int], str | None] | None = None,
) -> Method:
    """The method that fits what is configured, or ``CertError`` explaining the choice."""
    if cloudflare_credentials is not None:
        return Method.DNS_CLOUDFLARE
    if rfc2136_credentials is not None:
        return Method.DNS_RFC2136
    if webroot_path is not None:
        return Method.WEBROOT
    problem = (port_free or port_problem)(http_01_address, http_01_port)
    if problem is None:
        return Method.STANDALONE
    raise CertError(
        f"cannot choose how to prove the hostname: {problem}. Use DNS-01 (no port 80 needed):"
        " --method dns-cloudflare --credentials FILE, or the web server's document root:"
        " --method webroot --webroot-path DIR"
    )


def port_problem(address: str, port: int) -> str | None:
    """None if certbot's standalone server can listen on ``address``:``port``, else why not."""
    where = f"{address or '*'}:{port}"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return f"port {where} is in use (another web server?)"
            if err.errno == errno.EACCES:
                return f"port {where} needs root to listen on"
            return f"cannot listen on {where}: {err.strerror}"
    return None


def check_credentials(path: Path, method: Method) -> None:
    """The credentials file exists, is a file and no one but its owner can read it (certbot
    warns otherwise: it holds an API token or TSIG secret)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CertError(f"credentials file {path} does not exist") from None
    except OSError as err:
        raise CertError(f"cannot read credentials file {path}: {_oserror(err)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CertError(f"credentials file {path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise CertError(
            f"credentials file {path} is readable by group or others (mode {mode:04o});"
            f" chmod 600 {shlex.quote(str(path))}"
        )
    if method is Method.DNS_CLOUDFLARE:
        text = path.read_text(errors="replace")
        if "dns_cloudflare_api_token" not in text and "dns_cloudflare_api_key" not in text:
            raise CertError(
                f"credentials file {path} has no dns_cloudflare_api_token"
                " (one line: dns_cloudflare_api_token = TOKEN, Zone:DNS:Edit)"
            )


def check_request(
    request: IssueRequest, port_free: Callable[[str, int], str | None] | None = None
) -> None:
    """What can be checked before certbot runs, with a message an admin can act on."""
    match request.method:
        case Method.DNS_CLOUDFLARE | Method.DNS_RFC2136:
            if request.credentials is None:
                raise CertError(f"--method {request.method} needs --credentials FILE")
            check_credentials(request.credentials, request.method)
        case Method.WEBROOT:
            if request.webroot_path is None:
                raise CertError("--method webroot needs --webroot-path DIR")
            if not request.webroot_path.is_dir():
                raise CertError(f"webroot {request.webroot_path} is not a directory")
        case Method.STANDALONE:
            problem = (port_free or port_problem)(request.http_01_address, request.http_01_port)
            if problem is not None:
                raise CertError(
                    f"HTTP-01 standalone: {problem}. Use DNS-01 (--method dns-cloudflare"
                    " --credentials FILE) or the running web server (--method webroot"
                    " --webroot-path DIR)"
                )


def run_certbot(argv: Sequence[str], env: dict[str, str] | None = None) -> None:
    """Run certbot with its output on ours; ``CertError`` if it fails."""
    if shutil.which(argv[0], path=(env or os.environ).get("PATH")) is None:
        raise CertError(f"{argv[0]} is not installed (Debian package certbot)")
    done = subprocess.run(list(argv), env=env, check=False)
    if done.returncode != 0:
        raise CertError(f"certbot failed (exit status {done.returncode}); its log is above")


def lineage_dir(config_dir: Path, cert_name: str) -> Path:
    return config_dir / "live" / cert_name


# -- status ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Renewal:
    """Whether certbot renews the lineage and runs mailroom's hook afterwards."""

    config: Path
    exists: bool
    deploy_hook: bool  # the renewal config or certbot's deploy-hook directory runs ours
    authenticator: str
    lineage_matches: bool | None  # the lineage's cert is the one in use (None: unreadable)


def renewal(settings: Settings, in_use: CertInfo) -> Renewal:
    cb = settings.certbot
    conf = cb.config_dir / "renewal" / f"{cb.cert_name}.conf"
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read_string("[top]\n" + conf.read_text())
        exists = True
    except (OSError, configparser.Error):
        exists = False
    params = parser["renewalparams"] if parser.has_section("renewalparams") else {}
    hook_saved = " ".join(HOOK_ARGS) in str(params.get("renew_hook", ""))
    packaged = cb.config_dir / PACKAGED_HOOK
    hook_dir = packaged.is_file() and os.access(packaged, os.X_OK)
    try:
        live = read_info(lineage_dir(cb.config_dir, cb.cert_name) / "cert.pem")
        matches: bool | None = live.sha256 == in_use.sha256
    except CertError:
        matches = None
    return Renewal(
        config=conf,
        exists=exists,
        deploy_hook=hook_saved or hook_dir,
        authenticator=str(params.get("authenticator", "")),
        lineage_matches=matches,
    )


def status(settings: Settings, now: dt.datetime | None = None) -> dict[str, object]:
    """The pair in use as plain data (``tls status --json``)."""
    now = now or dt.datetime.now(dt.UTC)
    info = read_info(settings.tls_cert)
    days = info.days_left(now)
    renew = renewal(settings, info)
    warnings = []
    if now >= info.not_after:
        warnings.append(f"the certificate expired on {_when(info.not_after)}")
    elif days < WARN_DAYS:
        warnings.append(f"the certificate expires in {days} day(s), on {_when(info.not_after)}")
    if not info.covers(settings.hostname):
        warnings.append(f"the certificate does not cover the hostname {settings.hostname}")
    if info.self_signed:
        warnings.append("self-signed: mail clients warn; `mailroomctl tls issue` gets a real one")
    elif not (renew.exists and renew.deploy_hook):
        warnings.append("certbot does not renew it into mailroom; run `mailroomctl tls issue`")
    elif renew.lineage_matches is False:
        warnings.append(
            f"certbot's lineage holds another certificate: `mailroomctl tls deploy-hook"
            f" --lineage {lineage_dir(settings.certbot.config_dir, settings.certbot.cert_name)}`"
        )
    return {
        "certificate": str(settings.tls_cert),
        "key": str(settings.tls_key),
        "subject": info.subject,
        "names": list(info.names),
        "issuer": info.issuer,
        "self_signed": info.self_signed,
        "not_before": info.not_before.isoformat(),
        "not_after": info.not_after.isoformat(),
        "days_left": days,
        "sha256": info.sha256,
        "covers_hostname": info.covers(settings.hostname),
        "used_by": [
            {"service": service, "socket": name, "port": port, "tls": how}
            for service, name, port, how in USED_BY
        ],
        "renewal": {
            "config": str(renew.config),
            "exists": renew.exists,
            "deploy_hook": renew.deploy_hook,
            "authenticator": renew.authenticator,
            "lineage_matches": renew.lineage_matches,
            "renewed_by_certbot": (not info.self_signed) and renew.exists and renew.deploy_hook,
        },
        "warnings": warnings,
    }


def status_lines(data: dict[str, object]) -> list[str]:
    """``status`` for a person."""
    renew = data["renewal"]
    assert isinstance(renew, dict)
    names = data["names"]
    assert isinstance(names, list)
    used = data["used_by"]
    assert isinstance(used, list)
    kind = "self-signed" if data["self_signed"] else f"issued by {data['issuer']}"
    if data["self_signed"]:
        renews = "no (self-signed)"
    elif renew["renewed_by_certbot"]:
        how = f" ({renew['authenticator']})" if renew["authenticator"] else ""
        renews = f"yes, certbot's timer{how}, then the deploy hook ({renew['config']})"
    elif renew["exists"]:
        renews = f"certbot renews it, but without mailroom's deploy hook ({renew['config']})"
    else:
        renews = f"no (no certbot renewal config at {renew['config']})"
    lines = [
        f"certificate: {data['certificate']} ({kind})",
        f"subject:     {data['subject']}",
        f"names:       {', '.join(names) or '(none)'}",
        f"issuer:      {data['issuer']}",
        f"not after:   {data['not_after']} ({data['days_left']} days left)",
        "used by:     " + ", ".join(f"{u['socket']} {u['port']}" for u in used),
        f"renewal:     {renews}",
    ]
    warnings = data["warnings"]
    assert isinstance(warnings, list)
    lines += [f"WARNING: {w}" for w in warnings]
    return lines


def _when(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _oserror(err: OSError) -> str:
    return err.strerror or str(err)
