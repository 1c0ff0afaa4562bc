"""What the read-only views of the configuration TUI show about the running system.

Each service is asked of systemd first (``systemctl show``: the socket unit's and the service
unit's ActiveState); where systemd does not know the unit (no systemd, a development machine),
a TCP connection to the service's port on 127.0.0.1 says whether something listens.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mailroom.setup import _listening


@dataclass(frozen=True, slots=True)
class Service:
    socket_unit: str  # "" for the oneshot queue runner
    service_unit: str
    port: int  # 0: none to probe


# The units in systemd/ and the ports of design.md.
SERVICES: tuple[Service, ...] = (
    Service("mailroom-smtpd.socket", "mailroom-smtpd.service", 25),
    Service("mailroom-submission.socket", "mailroom-submission.service", 587),
    Service("mailroom-submissions.socket", "mailroom-submission.service", 465),
    Service("mailroom-imap.socket", "mailroom-imapd.service", 143),
    Service("mailroom-imaps.socket", "mailroom-imapd.service", 993),
    Service("mailroom-pop3.socket", "mailroom-pop3d.service", 110),
    Service("mailroom-pop3s.socket", "mailroom-pop3d.service", 995),
    Service("mailroom-deliver.timer", "mailroom-deliver.service", 0),
)


@dataclass(frozen=True, slots=True)
class ServiceState:
    unit: str
    port: int
    listening: str  # "yes", "no" or "unknown"
    running: str  # the service unit's ActiveState, or "unknown" without systemd
    source: str  # "systemd" or "tcp probe"


UnitStates = Callable[[Sequence[str]], dict[str, str]]
PortProbe = Callable[[int], bool]


def tcp_listening(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    return _listening(port)


def systemd_states(units: Sequence[str]) -> dict[str, str]:
    """ActiveState of each unit systemd knows ({} without systemctl or a running systemd)."""
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        return {}
    try:
        done = subprocess.run(
            [systemctl, "show", "--property=Id,LoadState,ActiveState", "--", *units],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if done.returncode != 0:
        return {}
    states: dict[str, str] = {}
    # One block of KEY=VALUE lines per unit, blocks separated by a blank line.
    for block in done.stdout.strip().split("\n\n"):
        props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if props.get("LoadState") == "loaded" and "Id" in props:
            states[props["Id"]] = props.get("ActiveState", "unknown")
    return states


def service_states(
    services: Sequence[Service] = SERVICES,
    unit_states: UnitStates = systemd_states,
    probe: PortProbe = tcp_listening,
) -> list[ServiceState]:
    units = sorted({u for s in services for u in (s.socket_unit, s.service_unit) if u})
    states = unit_states(units)
    found = []
    for service in services:
        unit = service.socket_unit or service.service_unit
        if service.socket_unit in states:
            listening = "yes" if states[service.socket_unit] == "active" else "no"
            running = states.get(service.service_unit, "unknown")
            source = "systemd"
        else:
            listening = "unknown"
            if service.port:
                listening = "yes" if probe(service.port) else "no"
            running, source = "unknown", "tcp probe"
        found.append(ServiceState(unit, service.port, listening, running, source))
    return found
