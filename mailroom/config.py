"""Configuration: one validated ``Settings`` object for every mailroom program.

Sources, highest priority first: ``MAILROOM_*`` environment variables (nested keys with
``__``, e.g. ``MAILROOM_SMTP__MAX_RECIPIENTS``), then the TOML file at ``$CONFIG_PATH``
(default ``/etc/mailroom/config.toml``), then the defaults below. ``load_settings`` turns
every problem into a ``ConfigError`` that names the key and the file; it never lets a
pydantic traceback reach the admin.

The sections are frozen dataclasses whose annotations carry pydantic's constraints; pydantic
(about half of a service's cold start to import and build) is imported only to validate. A
service passes its cache directory: the validated settings are pickled there under a key of
everything they were made from, and the next start unpickles them (only these classes, paths
and addresses; a file not the service's own is ignored) instead of validating again.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pickle
import re
import stat
import sys
import tomllib
import typing
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from mailroom.errors import ConfigError

if TYPE_CHECKING:  # the annotations name them; _adapter() imports them when it validates
    from pydantic import AfterValidator, Field, TypeAdapter, ValidationError

DEFAULT_CONFIG_PATH = Path("/etc/mailroom/config.toml")
ENV_PREFIX = "MAILROOM_"
UNKNOWN_KEY = {"unexpected_keyword_argument", "extra_forbidden"}  # pydantic's error types

_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$"
)


def _host_name(value: str) -> str:
    value = value.strip().rstrip(".").lower()
    if not _HOSTNAME_RE.match(value):
        raise ValueError("must be a host name such as mail.example.net")
    return value


def _qualified_host_name(value: str) -> str:
    value = value.strip().rstrip(".").lower()
    if not _HOSTNAME_RE.match(value) or "." not in value:
        raise ValueError("must be a fully qualified host name such as mail.example.org")
    return value


def _zone_names(value: list[str]) -> list[str]:
    zones = [zone.strip().rstrip(".").lower() for zone in value]
    for zone in zones:
        if not _HOSTNAME_RE.match(zone) or "." not in zone:
            raise ValueError(f"{zone!r} is not a DNS zone name such as zen.spamhaus.org")
    return zones


def _log_level(value: str) -> str:
    value = value.upper()
    if value not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
    return value


def _absolute(value: Path) -> Path:
    if not value.is_absolute():
        raise ValueError("must be an absolute path")
    return value


def _relay_tls(value: str) -> str:
    if value not in ("starttls", "implicit"):
        raise ValueError('must be "starttls" or "implicit"')
    return value


class _Section:
    """A section's dataclass: pydantic validates it (``_adapter``), unknown keys refused."""

    __pydantic_config__: ClassVar[dict[str, str]] = {"extra": "forbid"}


@dataclass(frozen=True)
class SNICertificate(_Section):
    """One ``[[tls.sni]]`` entry: the pair served to clients that ask for ``hostname``."""

    hostname: Annotated[str, AfterValidator(_host_name)]
    cert: Path
    key: Path


@dataclass(frozen=True)
class TLSSettings(_Section):
    """The TLS of every server (see mailroom.tls).

    ``cert``/``key``: the default pair; empty means ``{data_dir}/tls/fullchain.pem`` and
    ``privkey.pem``. ``sni``: other pairs, each served to the clients asking for its host name
    (SNI); any other name, or none, gets the default pair. ``smtp_min_version``: the oldest
    TLS version port 25 accepts (the client ports always want TLS 1.2 or newer).
    """

    cert: Path | None = None
    key: Path | None = None
    sni: tuple[SNICertificate, ...] = ()
    smtp_min_version: Literal["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"] = "TLSv1.2"


@dataclass(frozen=True)
class SMTPSettings(_Section):
    """Limits and timeouts of the SMTP servers."""

    max_recipients: Annotated[int, Field(ge=1, le=10_000)] = 100
    max_connections: Annotated[int, Field(ge=1)] = 200
    max_connections_per_ip: Annotated[int, Field(ge=1)] = 10
    # RFC 5321 4.5.3.2.7: the server timeout is at least 5 minutes.
    timeout_seconds: Annotated[float, Field(ge=300)] = 300
    # RFC 5321 4.5.3.1.6: 1000 octets including CRLF (plus the transparency dot).
    max_line_length: Annotated[int, Field(ge=1000, le=65536)] = 1000
    max_received_headers: Annotated[int, Field(ge=10, le=500)] = 50
    # Processes serving port 25 (parsing, checks and fsyncs of concurrent sessions); 0: one per CPU.
    workers: Annotated[int, Field(ge=0, le=64)] = 0


@dataclass(frozen=True)
class IMAPSettings(_Section):
    """Limits and timeouts of the IMAP server."""

    max_connections: Annotated[int, Field(ge=1)] = 200
    max_connections_per_ip: Annotated[int, Field(ge=1)] = 20
    max_connections_per_user: Annotated[int, Field(ge=1)] = 20
    preauth_timeout_seconds: Annotated[float, Field(ge=10)] = 60
    # RFC 9051 5.4: the autologout timer is at least 30 minutes.
    autologout_seconds: Annotated[float, Field(ge=30 * 60)] = 30 * 60
    # Processes serving the sockets; 0: one per CPU.
    workers: Annotated[int, Field(ge=0, le=64)] = 0


@dataclass(frozen=True)
class POP3Settings(_Section):
    """Limits and timeouts of the POP3 server."""

    max_connections: Annotated[int, Field(ge=1)] = 200
    max_connections_per_ip: Annotated[int, Field(ge=1)] = 20
    # RFC 1939 3: the inactivity autologout timer is at least 10 minutes.
    timeout_seconds: Annotated[float, Field(ge=600)] = 600
    # Accept USER/PASS and AUTH without TLS from a loopback client (a local fetchmail).
    allow_plaintext_loopback: bool = False


@dataclass(frozen=True)
class SubmissionSettings(_Section):
    """Limits and policy of the submission server (587 STARTTLS, 465 TLS)."""

    max_connections: Annotated[int, Field(ge=1)] = 100
    max_connections_per_ip: Annotated[int, Field(ge=1)] = 10
    max_recipients: Annotated[int, Field(ge=1, le=10_000)] = 100
    timeout_seconds: Annotated[float, Field(ge=30)] = 300
    # Name the client's address in the Received: header (off: its address stays private).
    received_client_address: bool = False
    # Processes serving the sockets (DKIM signing is CPU work); 0: one per CPU.
    workers: Annotated[int, Field(ge=0, le=64)] = 0


@dataclass(frozen=True)
class RelaySettings(_Section):
    """A smarthost: when ``host`` is set, every remote message goes through it."""

    host: str = ""
    port: Annotated[int, Field(ge=1, le=65535)] = 587
    tls: Annotated[str, AfterValidator(_relay_tls)] = "starttls"  # or "implicit" (usually 465)
    username: str = ""
    password_file: Path | None = None  # one line, readable by the service user only


@dataclass(frozen=True)
class OutboundSettings(_Section):
    """The outbound queue runner."""

    # Waits before the 1st, 2nd, ... retry; after the last, ``retry_interval_seconds``.
    retry_schedule_seconds: list[float] = field(
        default_factory=lambda: [60.0, 300.0, 1800.0, 3600.0]
    )
    retry_interval_seconds: Annotated[float, Field(ge=1)] = 3600
    give_up_seconds: Annotated[float, Field(ge=60)] = 5 * 86400
    delay_warning_seconds: Annotated[float, Field(ge=0)] = 4 * 3600  # 0: no delay warning
    connect_timeout_seconds: Annotated[float, Field(ge=1)] = 30
    command_timeout_seconds: Annotated[float, Field(ge=1)] = 300
    smtp_port: Annotated[int, Field(ge=1, le=65535)] = 25  # of remote MX hosts (tests change it)
    mta_sts: bool = True
    # The policy host's port (tests change it).
    mta_sts_port: Annotated[int, Field(ge=1, le=65535)] = 443
    ca_file: Path | None = None  # CA bundle for verifying TLS peers; empty: the system's
    relay: RelaySettings = field(default_factory=RelaySettings)


ClientService = Literal["submissions", "submission", "imaps", "imap", "pop3s", "pop3"]
CLIENT_SERVICES: tuple[ClientService, ...] = (
    "submissions",
    "submission",
    "imaps",
    "imap",
    "pop3s",
    "pop3",
)


@dataclass(frozen=True)
class DNSPublishSettings(_Section):
    """How ``mailroomctl dns publish`` reaches the DNS provider (see mailroom.dnspublish).

    ``rfc2136_credentials``: certbot-dns-rfc2136's INI file (``dns_rfc2136_server``, ``_port``,
    ``_name``, ``_secret``, ``_algorithm``); empty: ``[certbot] rfc2136_credentials``.
    ``cloudflare_credentials``: certbot-dns-cloudflare's INI file (``dns_cloudflare_api_token``);
    empty: ``[certbot] cloudflare_credentials``. Both must be mode 0600. ``zone``: the zone
    the records go into; empty: the mail domain (Cloudflare: the nearest zone it has).
    """

    rfc2136_credentials: Path | None = None
    cloudflare_credentials: Path | None = None
    cloudflare_api_url: str = "https://api.cloudflare.com/client/v4"  # tests: a local fake
    zone: str = ""
    ttl: Annotated[int, Field(ge=60, le=86400)] = 3600  # of the records published


@dataclass(frozen=True)
class DNSSettings(_Section):
    """Where DNS questions go (empty: the system resolver), and what ``mailroomctl dns``
    generates, checks and publishes (see mailroom.dnsrecords)."""

    nameservers: list[str] = field(default_factory=list)
    # The mail host's public addresses: its A/AAAA records, and the PTR the ISP must set.
    ipv4: IPv4Address | None = None
    ipv6: IPv6Address | None = None
    mta_sts_mode: Literal["testing", "enforce", "off"] = "testing"
    mta_sts_max_age: Annotated[int, Field(ge=86400, le=31557600)] = 604800  # RFC 8461 3.2
    dmarc_report_address: str = ""  # rua=; empty: postmaster@DOMAIN
    tls_report_address: str = ""  # TLS-RPT rua=; empty: postmaster@DOMAIN
    caa_issuers: list[str] = field(default_factory=lambda: ["letsencrypt.org"])  # []: no CAA
    # Offered to mail clients (SRV records); the others get "." targets (RFC 6186 3.4).
    client_services: list[ClientService] = field(default_factory=lambda: list(CLIENT_SERVICES))
    publish: DNSPublishSettings = field(default_factory=DNSPublishSettings)


InboundAction = Literal["reject", "junk", "deliver"]


@dataclass(frozen=True)
class InboundSettings(_Section):
    """Authentication of mail arriving on port 25 (SPF, DKIM, DMARC) and what is done with it.

    Each ``*_action`` is ``"reject"`` (550 5.7.1 at the end of DATA, nothing stored),
    ``"junk"`` (delivered into the recipient's Junk folder) or ``"deliver"`` (INBOX; the
    verdict is still in ``Authentication-Results:``). A temporary DNS failure never rejects.
    """

    # Off: no checks and no Authentication-Results (e.g. behind a filtering relay).
    checks: bool = True
    dmarc_reject_action: InboundAction = "reject"  # DMARC fails, the domain says p=reject
    dmarc_quarantine_action: InboundAction = "junk"  # DMARC fails, the domain says p=quarantine
    spf_fail_action: InboundAction = "junk"  # SPF fail and the domain has no DMARC record
    # From: or MAIL FROM in one of our own domains, neither SPF nor DKIM passing for it.
    own_domain_forgery_action: InboundAction = "reject"
    # All DNS of one message (SPF, DKIM keys, DMARC) together; then "temperror".
    dns_timeout_seconds: Annotated[float, Field(gt=0, le=60)] = 5
    # Nameservers for these checks and the DNSBL; empty: those of [dns].
    nameservers: list[str] = field(default_factory=list)
    # DNSBL zones asked at connect (e.g. "zen.spamhaus.org"); a listed client gets 554 5.7.1 at
    # MAIL FROM. Several lists refuse queries that come through public resolvers.
    dnsbl_zones: Annotated[list[str], AfterValidator(_zone_names)] = field(default_factory=list)


CertbotMethod = Literal["dns-cloudflare", "standalone", "webroot", "dns-rfc2136"]


@dataclass(frozen=True)
class CertbotSettings(_Section):
    """How ``mailroomctl tls issue`` runs certbot, and where ``tls status`` finds its renewal.

    ``method`` empty: chosen at issue time (Cloudflare credentials set: DNS-01; else a webroot
    set: webroot; else port 80 free: standalone). ``dns-rfc2136`` (DNS UPDATE with TSIG) is
    for tests and for admins who run their own DNS server.
    """

    method: CertbotMethod | None = None
    email: str = ""  # for Let's Encrypt's expiry mail; empty: registered without one
    cloudflare_credentials: Path | None = None  # dns_cloudflare_api_token = ..., mode 0600
    rfc2136_credentials: Path | None = None  # certbot-dns-rfc2136's ini file, mode 0600
    webroot_path: Path | None = None  # document root of the web server already on port 80
    http_01_port: Annotated[int, Field(ge=1, le=65535)] = 80  # standalone (tests change it)
    http_01_address: str = ""  # standalone: bind only this address; empty: all
    server: str = ""  # ACME directory URL; empty: Let's Encrypt (tests: pebble)
    config_dir: Path = Path("/etc/letsencrypt")
    work_dir: Path = Path("/var/lib/letsencrypt")
    logs_dir: Path = Path("/var/log/letsencrypt")
    cert_name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")] = "mailroom"


@dataclass(frozen=True)
class Settings(_Section):
    """Everything configurable, with defaults a home server can run on."""

    hostname: Annotated[str, AfterValidator(_qualified_host_name)]
    data_dir: Annotated[Path, AfterValidator(_absolute)] = Path("/var/lib/mailroom")
    idle_exit_seconds: Annotated[float, Field(ge=0)] = 60
    shutdown_grace_seconds: Annotated[float, Field(ge=0)] = 30
    message_size_limit: Annotated[int, Field(ge=1024, le=1024**3)] = 25 * 1024 * 1024
    log_level: Annotated[str, AfterValidator(_log_level)] = "INFO"
    # Failed logins (IMAP, POP3, submission together; mailroom.throttle): per client address
    # and per account name within the window, then a temporary refusal until it passes.
    login_failures_per_ip: Annotated[int, Field(ge=1)] = 10
    login_failures_per_account: Annotated[int, Field(ge=1)] = 30
    login_failure_window_seconds: Annotated[float, Field(ge=1)] = 900
    login_failure_delay_seconds: Annotated[float, Field(ge=0, le=60)] = 0.5  # doubles per failure
    tls: TLSSettings = field(default_factory=TLSSettings)
    smtp: SMTPSettings = field(default_factory=SMTPSettings)
    imap: IMAPSettings = field(default_factory=IMAPSettings)
    pop3: POP3Settings = field(default_factory=POP3Settings)
    dns: DNSSettings = field(default_factory=DNSSettings)
    submission: SubmissionSettings = field(default_factory=SubmissionSettings)
    outbound: OutboundSettings = field(default_factory=OutboundSettings)
    inbound: InboundSettings = field(default_factory=InboundSettings)
    certbot: CertbotSettings = field(default_factory=CertbotSettings)

    @property
    def tls_cert(self) -> Path:
        return self.tls.cert or self.data_dir / "tls" / "fullchain.pem"

    @property
    def tls_key(self) -> Path:
        return self.tls.key or self.data_dir / "tls" / "privkey.pem"

    @property
    def auth_db(self) -> Path:
        return self.data_dir / "auth.sqlite3"

    @property
    def mail_root(self) -> Path:
        return self.data_dir / "mail"

    @property
    def queue_dir(self) -> Path:
        return self.data_dir / "queue"

    @property
    def dkim_dir(self) -> Path:
        return self.data_dir / "dkim"

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as plain data, derived paths filled."""
        data: dict[str, Any] = _adapter().dump_python(self, mode="json")
        data["tls"]["cert"] = str(self.tls_cert)
        data["tls"]["key"] = str(self.tls_key)
        return data


def config_path() -> Path:
    """The configuration file in force: ``$CONFIG_PATH`` or the default."""
    return Path(os.environ.get("CONFIG_PATH") or DEFAULT_CONFIG_PATH)


def load_settings(path: Path | None = None, cache: Path | None = None) -> Settings:
    """Read, validate and return the configuration, or raise ``ConfigError``.

    ``cache``: a directory of the calling service's own (systemd's ``CacheDirectory=``) that
    keeps the validated settings, keyed by everything they were made from. A start that finds
    them there never imports pydantic, about half of a service's cold start.
    """
    path = path or config_path()
    raw = _read(path)
    env = {name: value for name, value in os.environ.items() if name.upper().startswith(ENV_PREFIX)}
    key = b""
    if cache is not None:
        key = _cache_key(path, raw, env)
        found = _cached(cache / CACHE_NAME, key)
        if found is not None:
            return found
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid UTF-8") from None
    from pydantic import ValidationError

    try:
        settings = validated(_deep_update(data, _environment(env)))
    except ValidationError as err:
        raise ConfigError(_describe(err, path)) from None
    if cache is not None:
        _keep(cache / CACHE_NAME, key, settings)
    return settings


def validated(data: dict[str, Any]) -> Settings:
    """``data`` (a parsed configuration file) as ``Settings``, or pydantic's ``ValidationError``."""
    return _adapter().validate_python(data)


@functools.cache
def _adapter() -> TypeAdapter[Settings]:
    """pydantic's validator of ``Settings``, made on first use."""
    # Set before pydantic builds anything (an admin's own setting wins): pydantic 2.10 checks
    # each schema it generates against its own meta-schema (2.11 dropped the check), and reads
    # the entry points of every installed distribution looking for plugins (mailroom has none).
    os.environ.setdefault("PYDANTIC_SKIP_VALIDATING_CORE_SCHEMAS", "1")
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    # The sections' annotations name these; pydantic resolves them in this frame.
    from pydantic import AfterValidator, Field, TypeAdapter  # noqa: F401

    return TypeAdapter(Settings)


def field_types(section: type) -> dict[str, Any]:
    """The type of each field of a section's dataclass, without its validation metadata."""
    from pydantic import AfterValidator, Field

    names = {"AfterValidator": AfterValidator, "Field": Field}
    hints = typing.get_type_hints(section, localns=names)
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found (set CONFIG_PATH?)") from None
    except PermissionError:
        raise ConfigError(
            f"{path}: cannot read the configuration file (permission denied)"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a configuration file") from None


# -- the validated settings kept between starts ------------------------------------------------

CACHE_NAME = "settings.pickle"
_CACHE_VERSION = b"mailroom settings 1\0"
# What the cache may name: a pickle naming anything else is refused, not run.
_CACHE_GLOBALS = {
    ("pathlib", "PosixPath"),
    ("ipaddress", "IPv4Address"),
    ("ipaddress", "IPv6Address"),
}


def _cache_key(path: Path, raw: bytes, env: dict[str, str]) -> bytes:
    """What the settings were made from: the file, the environment's overrides, this module's
    code (the schema), the pydantic that validated them and the Python that pickled them."""
    digest = hashlib.sha256(_CACHE_VERSION)
    parts = (str(path), sys.version, _validators(), *sorted(f"{k}={v}" for k, v in env.items()))
    for part in parts:
        digest.update(part.encode("utf-8", "surrogateescape") + b"\0")
    digest.update(hashlib.sha256(raw).digest())
    digest.update(hashlib.sha256(Path(__file__).read_bytes()).digest())
    return digest.digest()


def _validators() -> str:
    """Which pydantic validates, found without importing it (that is what the cache saves):
    the ``__init__.py`` the import system would take for each package (first on sys.path)
    and its inode, size and mtime, which an upgrade changes."""
    found = []
    for name in ("pydantic", "pydantic_core", "pydantic_settings"):
        identity = "-"
        for entry in sys.path:
            origin = os.path.join(entry or ".", name, "__init__.py")
            try:
                st = os.stat(origin)
            except OSError:
                continue
            identity = f"{origin}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
            break
        found.append(f"{name}={identity}")
    return " ".join(found)


class _SettingsUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        cls = globals().get(name) if module == __name__ else None
        if isinstance(cls, type) and issubclass(cls, _Section):
            return cls
        if (module, name) in _CACHE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of the settings")


def _cached(file: Path, key: bytes) -> Settings | None:
    """The settings kept in ``file`` under ``key``; None when there are none (or the file is
    not this user's own and writable only by it: anything else is not trusted)."""
    try:
        with file.open("rb") as f:
            st = os.fstat(f.fileno())
            if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                return None
            if f.read(len(key)) != key:
                return None
            found = _SettingsUnpickler(f).load()
    except Exception:  # missing, or anything wrong with it: validated again
        return None
    return found if isinstance(found, Settings) else None


def _keep(file: Path, key: bytes, settings: Settings) -> None:
    """Write the cache (a new file renamed over the old); a failure costs only speed."""
    tmp = file.with_name(f".{file.name}.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
            pickle.dump(settings, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, file)
    except OSError:
        tmp.unlink(missing_ok=True)


def _environment(env: dict[str, str]) -> dict[str, Any]:
    """The ``MAILROOM_*`` overrides in ``env`` as nested data (pydantic-settings' reading).

    pydantic-settings is imported only when such a variable is set: its import costs about
    45 ms, and the installed units set none.
    """
    if not env:
        return {}
    from pydantic_settings import EnvSettingsSource

    source = EnvSettingsSource(
        _as_model(Settings),  # type: ignore[arg-type]  # reads only model_fields and model_config
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
    )
    return source()


def _as_model(section: type) -> type:
    """A pydantic model with the fields of ``section``'s dataclass (nested sections too): what
    pydantic-settings reads the environment by. It validates nothing; ``validated`` does."""
    from pydantic import create_model

    fields: dict[str, Any] = {}
    for name, kind in field_types(section).items():
        nested = isinstance(kind, type) and dataclasses.is_dataclass(kind)
        fields[name] = (_as_model(kind) if nested else kind, None)
    model: type = create_model(section.__name__, **fields)
    return model


def _deep_update(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` laid over it, tables merged key by key."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_update(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(err: ValidationError, path: Path) -> str:
    lines = [f"{path}: invalid configuration:"]
    for problem in err.errors():
        loc = [str(part) for part in problem["loc"]]
        key = ".".join(loc) or "(top level)"
        if problem["type"] in UNKNOWN_KEY:
            message = "unknown key"
        elif problem["type"] == "missing":
            message = "required key is missing"
        else:
            message = problem["msg"].removeprefix("Value error, ")
        env_name = ENV_PREFIX + "__".join(loc).upper()
        where = f" (from environment variable {env_name})" if env_name in os.environ else ""
        lines.append(f"  {key}: {message}{where}")
    return "\n".join(lines)
