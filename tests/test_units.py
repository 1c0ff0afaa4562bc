"""The systemd units in systemd/: valid for systemd, and in step with the code's fd names."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import stat
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


SERVICES = sorted(UNITS.glob("mailroom-*.service"))
PACKAGING = Path(__file__).parent.parent / "packaging"
MAX_EXPOSURE = 2.0


def test_every_program_has_its_service() -> None:
    names = {unit.name for unit in SERVICES}
    programs = ["smtpd", "submission", "imapd", "pop3d", "deliver"]
    assert names == {f"mailroom-{program}.service" for program in programs}


@pytest.mark.parametrize("unit", SERVICES, ids=lambda unit: unit.name)
def test_services_run_unprivileged_on_a_read_only_system(unit: Path) -> None:
    service = _unit(unit)["Service"]
    assert service["User"] == "mailroom" and service["Group"] == "mailroom"
    assert service["NoNewPrivileges"] == "yes"
    assert service["CapabilityBoundingSet"] == "" and service["AmbientCapabilities"] == ""
    assert service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"] == "/var/lib/mailroom"
    assert service["CacheDirectory"] == "mailroom"  # service.cache_directory(): the settings
    assert service["PrivateUsers"] == "yes" and service["MemoryDenyWriteExecute"] == "yes"


@pytest.mark.parametrize("unit", SERVICES, ids=lambda unit: unit.name)
def test_services_exposure_is_low(unit: Path) -> None:
    """systemd-analyze security rates each service at most 2.0 (0 is the most locked down)."""
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: bin/test installs the systemd package")
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", out.stdout)
    assert found is not None, out.stdout + out.stderr
    exposure = float(found.group(1))
    print(f"{unit.name}: exposure {exposure}")
    assert exposure <= MAX_EXPOSURE, out.stdout


def _root_with(tmp_path: Path, kind: str) -> Path:
    """A scratch root holding packaging/{kind}/mailroom.conf as /usr/lib/{kind}/mailroom.conf."""
    root = tmp_path / "root"
    (root / "usr/lib" / kind).mkdir(parents=True, exist_ok=True)
    (root / "etc").mkdir(exist_ok=True)
    shutil.copy(PACKAGING / kind / "mailroom.conf", root / "usr/lib" / kind / "mailroom.conf")
    return root


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    if shutil.which(argv[0]) is None:
        pytest.fail(f"{argv[0]} is missing: bin/test installs the systemd package")
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def _entry(path: Path, name: str) -> list[str]:
    """The fields of ``name``'s line in a passwd or group file."""
    for line in path.read_text().splitlines():
        if line.split(":")[0] == name:
            return line.split(":")
    raise AssertionError(f"no {name} in {path}")


def test_sysusers_creates_the_mailroom_user(tmp_path: Path) -> None:
    root = _root_with(tmp_path, "sysusers.d")
    dry = _run("systemd-sysusers", "--dry-run", f"--root={root}")
    assert dry.returncode == 0 and "ignoring" not in dry.stderr, dry.stderr
    real = _run("systemd-sysusers", f"--root={root}")
    assert real.returncode == 0 and "ignoring" not in real.stderr, real.stderr
    _name, _pw, uid, gid, _gecos, home, shell = _entry(root / "etc/passwd", "mailroom")
    assert int(uid) < 1000 and _entry(root / "etc/group", "mailroom")[2] == gid
    assert (home, shell) == ("/var/lib/mailroom", "/usr/sbin/nologin")


def test_tmpfiles_makes_the_state_and_config_directories(tmp_path: Path) -> None:
    """Created in a scratch root (chown needs root), else parsed by a dry run where there is one."""
    root = _root_with(tmp_path, "sysusers.d")
    assert _run("systemd-sysusers", f"--root={root}").returncode == 0
    root = _root_with(tmp_path, "tmpfiles.d")
    if os.geteuid() != 0:
        if "--dry-run" not in _run("systemd-tmpfiles", "--help").stdout:
            pytest.skip("not root, and this systemd-tmpfiles has no --dry-run")
        out = _run("systemd-tmpfiles", "--create", "--dry-run", f"--root={root}")
        assert out.returncode == 0 and out.stderr.strip() == "", out.stderr
        return
    out = _run("systemd-tmpfiles", "--create", f"--root={root}")
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr
    uid, gid = (int(field) for field in _entry(root / "etc/passwd", "mailroom")[2:4])
    expected = {
        "var/lib/mailroom": (0o750, uid, gid),
        "var/lib/mailroom/mail": (0o700, uid, gid),
        "var/lib/mailroom/queue": (0o700, uid, gid),
        "var/lib/mailroom/dkim": (0o700, uid, gid),
        "var/lib/mailroom/tls": (0o700, uid, gid),
        "etc/mailroom": (0o750, 0, gid),
    }
    for path, (mode, owner, group) in expected.items():
        st = (root / path).stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, owner, group), path
