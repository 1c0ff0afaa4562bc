"""The systemd units in systemd/: valid for systemd, and in step with the code's fd names."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).parent.parent / "systemd"
BIN = Path(sys.executable).parent


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


def test_systemd_analyze_verify_is_silent(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: bin/test installs the systemd package")
    for unit in UNITS.iterdir():
        text = unit.read_text().replace("ExecStart=/usr/bin/", f"ExecStart={BIN}/")
        (tmp_path / unit.name).write_text(text)
    out = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *sorted(tmp_path.iterdir())],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr


def test_socket_names_match_the_programs() -> None:
    from mailroom import imapd, pop3d, smtpd, submission

    served = {
        "mailroom-smtpd.service": set(smtpd.ENDPOINT_NAMES),
        "mailroom-submission.service": set(submission.ENDPOINT_NAMES),
        "mailroom-imapd.service": set(imapd.ENDPOINT_NAMES),
        "mailroom-pop3d.service": set(pop3d.ENDPOINT_NAMES),
    }
    for socket_unit in UNITS.glob("*.socket"):
        unit = _unit(socket_unit)
        service = unit["Socket"]["Service"]
        assert unit["Socket"]["Accept"] == "no"
        assert unit["Socket"]["FileDescriptorName"] in served[service], socket_unit.name
        assert (UNITS / service).exists()
