"""Mail client autoconfiguration files: what ``mailroomctl client-config ADDRESS`` writes.

What this module owns: the Thunderbird autoconfig file (``config-v1.1.xml``, the format
Thunderbird, K-9/Thunderbird for Android and Evolution fetch from
``https://autoconfig.DOMAIN/mail/config-v1.1.xml``) and the Apple configuration profile
(``ADDRESS.mobileconfig``, an unsigned plist with one IMAP account and its SMTP server, for
iOS, iPadOS and macOS). What it promises: both name the configured ``hostname`` and only the
services in ``[dns] client_services``, implicit TLS first (RFC 8314); neither holds a
password; the same input gives the same bytes (the profile's UUIDs derive from the address),
so regenerating changes nothing.
"""

from __future__ import annotations

import plistlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree as ET

from mailroom.addresses import Address
from mailroom.errors import MailroomError
from mailroom.maildir import write_file

AUTOCONFIG_NAME = "config-v1.1.xml"
AUTOCONFIG_PATH = "/mail/config-v1.1.xml"
_NAMESPACE = uuid.UUID("6f1c2a52-3c4e-4d6a-9b1e-6d61696c726f")  # "mailroom" profiles


@dataclass(frozen=True, slots=True)
class Server:
    """One way to reach a service: ``socket`` is ``SSL`` (implicit TLS) or ``STARTTLS``."""

    protocol: str  # "imap", "pop3", "smtp"
    port: int
    socket: str


# In order of preference (RFC 8314 3.3: implicit TLS first; IMAP before POP3).
_SERVERS: tuple[tuple[str, Server], ...] = (
    ("imaps", Server("imap", 993, "SSL")),
    ("imap", Server("imap", 143, "STARTTLS")),
    ("pop3s", Server("pop3", 995, "SSL")),
    ("pop3", Server("pop3", 110, "STARTTLS")),
    ("submissions", Server("smtp", 465, "SSL")),
    ("submission", Server("smtp", 587, "STARTTLS")),
)


def servers(services: Sequence[str]) -> list[Server]:
    """The offered servers, most preferred first."""
    return [server for name, server in _SERVERS if name in services]


def thunderbird(domain: str, hostname: str, services: Sequence[str]) -> bytes:
    """``config-v1.1.xml`` for every address of ``domain`` (the user name is the address)."""
    root = ET.Element("clientConfig", version="1.1")
    provider = ET.SubElement(root, "emailProvider", id=domain)
    ET.SubElement(provider, "domain").text = domain
    ET.SubElement(provider, "displayName").text = f"{domain} mail"
    ET.SubElement(provider, "displayShortName").text = domain
    for server in servers(services):
        tag = "outgoingServer" if server.protocol == "smtp" else "incomingServer"
        element = ET.SubElement(provider, tag, type=server.protocol)
        ET.SubElement(element, "hostname").text = hostname
        ET.SubElement(element, "port").text = str(server.port)
        ET.SubElement(element, "socketType").text = server.socket
        ET.SubElement(element, "authentication").text = "password-cleartext"
        ET.SubElement(element, "username").text = "%EMAILADDRESS%"
    ET.indent(root)
    data: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return data + b"\n"


def mobileconfig(address: Address, hostname: str, services: Sequence[str]) -> bytes:
    """An Apple configuration profile with ``address``'s IMAP account (no password: the
    device asks for it when the profile is installed)."""
    offered = servers(services)
    imap = next((s for s in offered if s.protocol == "imap"), None)
    smtp = next((s for s in offered if s.protocol == "smtp"), None)
    if imap is None or smtp is None:
        raise MailroomError(
            "an Apple profile needs IMAP and submission: [dns] client_services offers"
            f" {', '.join(services) or 'nothing'}"
        )
    text = str(address)
    reverse = ".".join(reversed(address.domain.split(".")))
    identifier = f"{reverse}.mailroom.{address.localpart}"
    account = {
        "PayloadType": "com.apple.mail.managed",
        "PayloadVersion": 1,
        "PayloadIdentifier": f"{identifier}.account",
        "PayloadUUID": str(uuid.uuid5(_NAMESPACE, f"account:{text}")).upper(),
        "PayloadDisplayName": f"Mail {text}",
        "EmailAccountDescription": text,
        "EmailAccountType": "EmailTypeIMAP",
        "EmailAddress": text,
        "IncomingMailServerHostName": hostname,
        "IncomingMailServerPortNumber": imap.port,
        "IncomingMailServerUseSSL": True,  # on 143 the device uses STARTTLS
        "IncomingMailServerAuthentication": "EmailAuthPassword",
        "IncomingMailServerUsername": text,
        "OutgoingMailServerHostName": hostname,
        "OutgoingMailServerPortNumber": smtp.port,
        "OutgoingMailServerUseSSL": True,
        "OutgoingMailServerAuthentication": "EmailAuthPassword",
        "OutgoingMailServerUsername": text,
        "OutgoingPasswordSameAsIncomingPassword": True,
    }
    profile = {
        "PayloadContent": [account],
        "PayloadDisplayName": f"{address.domain} mail ({text})",
        "PayloadDescription": f"The mail account {text} on {hostname}",
        "PayloadIdentifier": identifier,
        "PayloadType": "Configuration",
        "PayloadUUID": str(uuid.uuid5(_NAMESPACE, f"profile:{text}")).upper(),
        "PayloadVersion": 1,
        "PayloadRemovalDisallowed": False,
    }
    data: bytes = plistlib.dumps(profile, fmt=plistlib.FMT_XML, sort_keys=True)
    return data


def write(out: Path, address: Address, hostname: str, services: Sequence[str]) -> tuple[Path, Path]:
    """Write both files into ``out`` (created if needed); their paths."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        xml_path = out / AUTOCONFIG_NAME
        profile_path = out / f"{address}.mobileconfig"
        write_file(xml_path, thunderbird(address.domain, hostname, services), 0o644)
        write_file(profile_path, mobileconfig(address, hostname, services), 0o644)
    except OSError as err:
        raise MailroomError(f"cannot write into {out}: {err.strerror or err}") from None
    return xml_path, profile_path
