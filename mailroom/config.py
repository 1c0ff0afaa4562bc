"""Configuration: one validated ``Settings`` object for every mailroom program.

Sources, highest priority first: ``MAILROOM_*`` environment variables (nested keys with
``__``, e.g. ``MAILROOM_SMTP__MAX_RECIPIENTS``), then the TOML file at ``$CONFIG_PATH``
(default ``/etc/mailroom/config.toml``), then the defaults below. ``load_settings`` turns
every problem into a ``ConfigError`` that names the key and the file; it never lets a
pydantic traceback reach the admin.
"""

from __future__ import annotations

import os
import re
import tomllib
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any, Literal

# Set before pydantic builds anything (an admin's own setting wins); together ≈25 ms of every
# service's cold start. pydantic 2.10 checks each schema it generates against its own
# meta-schema, a third of the time the classes below take to define (2.11 dropped the check),
# and reads the entry points of every installed distribution looking for plugins (mailroom
# uses none).
os.environ.setdefault("PYDANTIC_SKIP_VALIDATING_CORE_SCHEMAS", "1")
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from mailroom.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/mailroom/config.toml")
ENV_PREFIX = "MAILROOM_"

_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$"
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SNICertificate(_Section):
    """One ``[[tls.sni]]`` entry: the pair served to clients that ask for ``hostname``."""

    hostname: str
    cert: Path
    key: Path

    @field_validator("hostname")
    @classmethod
    def _check_hostname(cls, value: str) -> str:
        value = value.strip().rstrip(".").lower()
        if not _HOSTNAME_RE.match(value):
            raise ValueError("must be a host name such as mail.example.net")
        return value


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


class SMTPSettings(_Section):
    """Limits and timeouts of the SMTP servers."""

    max_recipients: int = Field(default=100, ge=1, le=10_000)
    max_connections: int = Field(default=200, ge=1)
    max_connections_per_ip: int = Field(default=10, ge=1)
    # RFC 5321 4.5.3.2.7: the server timeout is at least 5 minutes.
    timeout_seconds: float = Field(default=300, ge=300)
    # RFC 5321 4.5.3.1.6: 1000 octets including CRLF (plus the transparency dot).
    max_line_length: int = Field(default=1000, ge=1000, le=65536)
    max_received_headers: int = Field(default=50, ge=10, le=500)
    # Processes serving port 25 (parsing, checks and fsyncs of concurrent sessions); 0: one per CPU.
    workers: int = Field(default=0, ge=0, le=64)


class IMAPSettings(_Section):
    """Limits and timeouts of the IMAP server."""

    max_connections: int = Field(default=200, ge=1)
    max_connections_per_ip: int = Field(default=20, ge=1)
    max_connections_per_user: int = Field(default=20, ge=1)
    preauth_timeout_seconds: float = Field(default=60, ge=10)
    # RFC 9051 5.4: the autologout timer is at least 30 minutes.
    autologout_seconds: float = Field(default=30 * 60, ge=30 * 60)
    # Processes serving the sockets; 0: one per CPU.
    workers: int = Field(default=0, ge=0, le=64)


class POP3Settings(_Section):
    """Limits and timeouts of the POP3 server."""

    max_connections: int = Field(default=200, ge=1)
    max_connections_per_ip: int = Field(default=20, ge=1)
    # RFC 1939 3: the inactivity autologout timer is at least 10 minutes.
    timeout_seconds: float = Field(default=600, ge=600)
    # Accept USER/PASS and AUTH without TLS from a loopback client (a local fetchmail).
    allow_plaintext_loopback: bool = False


class SubmissionSettings(_Section):
    """Limits and policy of the submission server (587 STARTTLS, 465 TLS)."""

    max_connections: int = Field(default=100, ge=1)
    max_connections_per_ip: int = Field(default=10, ge=1)
    max_recipients: int = Field(default=100, ge=1, le=10_000)
    timeout_seconds: float = Field(default=300, ge=30)
    # Name the client's address in the Received: header (off: its address stays private).
    received_client_address: bool = False
    # Processes serving the sockets (DKIM signing is CPU work); 0: one per CPU.
    workers: int = Field(default=0, ge=0, le=64)


class RelaySettings(_Section):
    """A smarthost: when ``host`` is set, every remote message goes through it."""

    host: str = ""
    port: int = Field(default=587, ge=1, le=65535)
    tls: str = "starttls"  # "starttls" (usually 587) or "implicit" (usually 465)
    username: str = ""
    password_file: Path | None = None  # one line, readable by the service user only

    @field_validator("tls")
    @classmethod
    def _check_tls(cls, value: str) -> str:
        if value not in ("starttls", "implicit"):
            raise ValueError('must be "starttls" or "implicit"')
        return value


class OutboundSettings(_Section):
    """The outbound queue runner."""

    # Waits before the 1st, 2nd, ... retry; after the last, ``retry_interval_seconds``.
    retry_schedule_seconds: list[float] = Field(
        default_factory=lambda: [60.0, 300.0, 1800.0, 3600.0]
    )
    retry_interval_seconds: float = Field(default=3600, ge=1)
    give_up_seconds: float = Field(default=5 * 86400, ge=60)
    delay_warning_seconds: float = Field(default=4 * 3600, ge=0)  # 0: no delay warning
    connect_timeout_seconds: float = Field(default=30, ge=1)
    command_timeout_seconds: float = Field(default=300, ge=1)
    smtp_port: int = Field(default=25, ge=1, le=65535)  # of remote MX hosts (tests change it)
    mta_sts: bool = True
    mta_sts_port: int = Field(default=443, ge=1, le=65535)  # of the policy host (tests change it)
    ca_file: Path | None = None  # CA bundle for verifying TLS peers; empty: the system's
    relay: RelaySettings = RelaySettings()


ClientService = Literal["submissions", "submission", "imaps", "imap", "pop3s", "pop3"]
CLIENT_SERVICES: tuple[ClientService, ...] = (
    "submissions",
    "submission",
    "imaps",
    "imap",
    "pop3s",
    "pop3",
)


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
    ttl: int = Field(default=3600, ge=60, le=86400)  # of the records published


class DNSSettings(_Section):
    """Where DNS questions go (empty: the system resolver), and what ``mailroomctl dns``
    generates, checks and publishes (see mailroom.dnsrecords)."""

    nameservers: list[str] = Field(default_factory=list)
    # The mail host's public addresses: its A/AAAA records, and the PTR the ISP must set.
    ipv4: IPv4Address | None = None
    ipv6: IPv6Address | None = None
    mta_sts_mode: Literal["testing", "enforce", "off"] = "testing"
    mta_sts_max_age: int = Field(default=604800, ge=86400, le=31557600)  # RFC 8461 3.2
    dmarc_report_address: str = ""  # rua=; empty: postmaster@DOMAIN
    tls_report_address: str = ""  # TLS-RPT rua=; empty: postmaster@DOMAIN
    caa_issuers: list[str] = Field(default_factory=lambda: ["letsencrypt.org"])  # []: no CAA
    # Offered to mail clients (SRV records); the others get "." targets (RFC 6186 3.4).
    client_services: list[ClientService] = Field(default_factory=lambda: list(CLIENT_SERVICES))
    publish: DNSPublishSettings = DNSPublishSettings()


InboundAction = Literal["reject", "junk", "deliver"]


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
    dns_timeout_seconds: float = Field(default=5, gt=0, le=60)
    # Nameservers for these checks and the DNSBL; empty: those of [dns].
    nameservers: list[str] = Field(default_factory=list)
    # DNSBL zones asked at connect (e.g. "zen.spamhaus.org"); a listed client gets 554 5.7.1 at
    # MAIL FROM. Several lists refuse queries that come through public resolvers.
    dnsbl_zones: list[str] = Field(default_factory=list)

    @field_validator("dnsbl_zones")
    @classmethod
    def _check_zones(cls, value: list[str]) -> list[str]:
        zones = [zone.strip().rstrip(".").lower() for zone in value]
        for zone in zones:
            if not _HOSTNAME_RE.match(zone) or "." not in zone:
                raise ValueError(f"{zone!r} is not a DNS zone name such as zen.spamhaus.org")
        return zones


CertbotMethod = Literal["dns-cloudflare", "standalone", "webroot", "dns-rfc2136"]


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
    http_01_port: int = Field(default=80, ge=1, le=65535)  # standalone (tests change it)
    http_01_address: str = ""  # standalone: bind only this address; empty: all
    server: str = ""  # ACME directory URL; empty: Let's Encrypt (tests: pebble)
    config_dir: Path = Path("/etc/letsencrypt")
    work_dir: Path = Path("/var/lib/letsencrypt")
    logs_dir: Path = Path("/var/log/letsencrypt")
    cert_name: str = Field(default="mailroom", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class Settings(_Section):
    """Everything configurable, with defaults a home server can run on."""

    hostname: str
    data_dir: Path = Path("/var/lib/mailroom")
    idle_exit_seconds: float = Field(default=60, ge=0)
    shutdown_grace_seconds: float = Field(default=30, ge=0)
    message_size_limit: int = Field(default=25 * 1024 * 1024, ge=1024, le=1024**3)
    log_level: str = "INFO"
    # Failed logins (IMAP, POP3, submission together; mailroom.throttle): per client address
    # and per account name within the window, then a temporary refusal until it passes.
    login_failures_per_ip: int = Field(default=10, ge=1)
    login_failures_per_account: int = Field(default=30, ge=1)
    login_failure_window_seconds: float = Field(default=900, ge=1)
    login_failure_delay_seconds: float = Field(default=0.5, ge=0, le=60)  # doubles per failure
    tls: TLSSettings = TLSSettings()
    smtp: SMTPSettings = SMTPSettings()
    imap: IMAPSettings = IMAPSettings()
    pop3: POP3Settings = POP3Settings()
    dns: DNSSettings = DNSSettings()
    submission: SubmissionSettings = SubmissionSettings()
    outbound: OutboundSettings = OutboundSettings()
    inbound: InboundSettings = InboundSettings()
    certbot: CertbotSettings = CertbotSettings()

    @field_validator("hostname")
    @classmethod
    def _check_hostname(cls, value: str) -> str:
        value = value.strip().rstrip(".").lower()
        if not _HOSTNAME_RE.match(value) or "." not in value:
            raise ValueError("must be a fully qualified host name such as mail.example.org")
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return value

    @field_validator("data_dir")
    @classmethod
    def _check_data_dir(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError("must be an absolute path")
        return value

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
        """The effective configuration as plain data, secrets masked, derived paths filled."""
        data = _mask(self.model_dump(mode="json"), self)
        data["tls"]["cert"] = str(self.tls_cert)
        data["tls"]["key"] = str(self.tls_key)
        return data


def _mask(data: dict[str, Any], model: BaseModel) -> dict[str, Any]:
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, SecretStr):
            data[name] = "********" if value.get_secret_value() else ""
        elif isinstance(value, BaseModel):
            data[name] = _mask(data[name], value)
    return data


def config_path() -> Path:
    """The configuration file in force: ``$CONFIG_PATH`` or the default."""
    return Path(os.environ.get("CONFIG_PATH") or DEFAULT_CONFIG_PATH)


def load_settings(path: Path | None = None) -> Settings:
    """Read, validate and return the configuration, or raise ``ConfigError``."""
    path = path or config_path()
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found (set CONFIG_PATH?)") from None
    except PermissionError:
        raise ConfigError(
            f"{path}: cannot read the configuration file (permission denied)"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a configuration file") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid UTF-8") from None
    try:
        return Settings.model_validate(_deep_update(data, _environment()))
    except ValidationError as err:
        raise ConfigError(_describe(err, path)) from None


def _environment() -> dict[str, Any]:
    """The ``MAILROOM_*`` overrides as nested data (pydantic-settings' reading of them).

    pydantic-settings is imported only when such a variable is set: its import costs about
    45 ms, a third of a service's cold start, and the installed units set none.
    """
    if not any(name.upper().startswith(ENV_PREFIX) for name in os.environ):
        return {}
    from pydantic_settings import EnvSettingsSource

    source = EnvSettingsSource(
        Settings,  # type: ignore[arg-type]  # reads only model_fields and model_config
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
    )
    return source()


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
        if problem["type"] == "extra_forbidden":
            message = "unknown key"
        elif problem["type"] == "missing":
            message = "required key is missing"
        else:
            message = problem["msg"].removeprefix("Value error, ")
        env_name = ENV_PREFIX + "__".join(loc).upper()
        where = f" (from environment variable {env_name})" if env_name in os.environ else ""
        lines.append(f"  {key}: {message}{where}")
    return "\n".join(lines)
