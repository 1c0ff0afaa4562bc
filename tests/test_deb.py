"""The .deb: built by packaging/build-deb in a Debian 13 chroot, then inspected from outside.

``build_deb()`` is the one way tests get the package; the end-to-end tests call it too. It
builds at most once per state of the source (the hash ``packaging/build-deb --source-hash``
prints: the files that go into the package, nothing under tests/ or bin/) and keeps the result
in ``/var/cache/mailroom-build/deb/<hash>/`` beside lintian's report, so every later test and
every later run on the same tree reuses it. The first build of a machine makes the chroot
(about a minute); a build after that takes seconds.
"""

from __future__ import annotations

import functools
import io
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
import tomllib
from pathlib import Path

import pytest

from mailroom.config import ENV_PREFIX, load_settings

ROOT = Path(__file__).resolve().parent.parent
BUILD_DEB = ROOT / "packaging" / "build-deb"
CACHE = Path(os.environ.get("MAILROOM_BUILD_CACHE", "/var/cache/mailroom-build")) / "deb"
KEEP_DAYS = 7  # cached packages of older trees are removed after this

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SCRIPTS = [
    "mailroom-smtpd", "mailroom-submission", "mailroom-imapd", "mailroom-pop3d",
    "mailroom-deliver", "mailroomctl",
]  # fmt: skip
DEBIAN_DEPENDS = [
    "python3-aiosmtpd", "python3-aiosmtplib", "python3-dkim", "python3-nacl",
    "python3-cryptography", "python3-dnspython", "python3-pydantic", "python3-pydantic-settings",
    "python3-systemd", "python3-argon2", "python3-click", "python3-rich", "python3-spf",
    "python3-tomlkit", "publicsuffix", "openssl",
]  # fmt: skip
DEBIAN_RECOMMENDS = ["certbot", "python3-certbot-dns-cloudflare", "python3-textual"]
UNITS = sorted(p.name for p in (ROOT / "systemd").iterdir() if p.suffix in
               {".socket", ".service", ".path", ".timer", ".target"})  # fmt: skip
MAN_PAGES = sorted(p.name for p in (ROOT / "packaging" / "man").glob("*.8"))


def deb_version() -> str:
    """The package version: the top entry of packaging/debian/changelog (e.g. 0.1.0-1)."""
    first = (ROOT / "packaging" / "debian" / "changelog").read_text().splitlines()[0]
    match = re.match(r"mailroom \(([^)]+)\)", first)
    assert match, f"unexpected changelog head: {first!r}"
    return match.group(1)


@functools.cache
def build_deb() -> Path:
    """The path of mailroom_<version>_all.deb for the current source, built if needed."""
    source_hash = subprocess.run(
        [BUILD_DEB, "--source-hash"], check=True, capture_output=True, text=True
    ).stdout.strip()
    final = CACHE / source_hash
    deb = final / f"mailroom_{deb_version()}_all.deb"
    if deb.exists():
        return deb
    CACHE.mkdir(parents=True, exist_ok=True)
    for old in CACHE.iterdir():
        if old.is_dir() and time.time() - old.stat().st_mtime > KEEP_DAYS * 86400:
            shutil.rmtree(old, ignore_errors=True)
    out = Path(tempfile.mkdtemp(prefix=f".{source_hash}.", dir=CACHE))
    try:
        subprocess.run([BUILD_DEB, out], check=True, timeout=840)
        assert (out / deb.name).exists(), f"packaging/build-deb made no {deb.name} in {out}"
        try:
            out.rename(final)  # atomic: a concurrent reader sees all files or none
        except OSError:
            if not deb.exists():  # not another session having built the same tree
                raise
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return deb


@pytest.fixture(scope="session")
def deb() -> Path:
    return build_deb()


def dpkg_deb(*args: str | Path) -> str:
    return subprocess.run(["dpkg-deb", *args], check=True, capture_output=True, text=True).stdout


def control_field(deb: Path, field: str) -> str:
    return dpkg_deb("-f", deb, field).strip()


def relation_names(value: str) -> set[str]:
    """Package names in a Depends-style field: 'a (>= 1), b | c' -> {a, b, c}."""
    return {alt.split()[0].split(":")[0] for alt in re.split(r"[,|]", value) if alt.strip()}


def contents(deb: Path) -> set[str]:
    # "-rw-r--r-- root/root 261 2026-11-24 15:05 ./usr/lib/..."; symlinks end in " -> target"
    lines = dpkg_deb("-c", deb).splitlines()
    return {line.split(None, 5)[5].split(" -> ")[0].removeprefix(".") for line in lines}


def control_file(deb: Path, name: str) -> str:
    return dpkg_deb("-I", deb, name)


def test_file_name_has_the_pyproject_version(deb: Path) -> None:
    upstream = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert deb_version().rsplit("-", 1)[0] == upstream
    assert deb.name == f"mailroom_{deb_version()}_all.deb"


def test_control_fields(deb: Path) -> None:
    info = dpkg_deb("-I", deb)
    assert re.search(r"^ Architecture: all$", info, re.M), info
    assert control_field(deb, "Package") == "mailroom"
    depends = relation_names(control_field(deb, "Depends"))
    assert set(DEBIAN_DEPENDS) <= depends, f"missing: {set(DEBIAN_DEPENDS) - depends}"
    # dh-python's names come from py3dist-overrides: no PyPI name guessed into a package name
    python_deps = {d for d in depends if d.startswith("python3-")}
    assert python_deps <= set(DEBIAN_DEPENDS), f"unexpected: {python_deps - set(DEBIAN_DEPENDS)}"
    assert "systemd" in depends  # for systemd-sysusers in the postinst
    assert set(DEBIAN_RECOMMENDS) <= relation_names(control_field(deb, "Recommends"))


def test_contents(deb: Path) -> None:
    files = contents(deb)
    expected = {f"/usr/bin/{s}" for s in SCRIPTS}
    expected |= {f"/usr/lib/systemd/system/{u}" for u in UNITS}
    expected |= {f"/usr/share/man/man8/{m}.gz" for m in MAN_PAGES}
    expected |= {
        "/etc/mailroom/config.toml",
        "/usr/lib/sysusers.d/mailroom.conf",
        "/usr/lib/tmpfiles.d/mailroom.conf",
        "/usr/lib/python3/dist-packages/mailroom/__init__.py",
        "/usr/share/doc/mailroom/copyright",
        "/usr/share/bash-completion/completions/mailroomctl",
        "/etc/letsencrypt/renewal-hooks/deploy/mailroom",
    }
    assert expected <= files, f"missing: {sorted(expected - files)}"
    hook = "./etc/letsencrypt/renewal-hooks/deploy/mailroom"
    assert any(
        line.startswith("-rwxr-xr-x")
        for line in dpkg_deb("-c", deb).splitlines()
        if line.endswith(hook)
    )
    assert len(UNITS) >= 15 and len(MAN_PAGES) >= 6
    assert not any("/tests/" in f or "__pycache__" in f for f in files)
    assert control_file(deb, "conffiles").split() == [
        "/etc/letsencrypt/renewal-hooks/deploy/mailroom",
        "/etc/mailroom/config.toml",
    ]


def test_shipped_config_validates(
    deb: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    fsys = subprocess.run(["dpkg-deb", "--fsys-tarfile", deb], check=True, capture_output=True)
    config = tmp_path / "config.toml"
    with tarfile.open(fileobj=io.BytesIO(fsys.stdout)) as tar:
        member = tar.extractfile("./etc/mailroom/config.toml")
        assert member is not None
        config.write_bytes(member.read())
    settings = load_settings(config)
    assert settings.hostname == "mail.example.org"
    assert settings.data_dir == Path("/var/lib/mailroom")


def test_maintainer_scripts(deb: Path) -> None:
    postinst = control_file(deb, "postinst")
    # the user and /var/lib/mailroom exist before any unit starts
    order = [
        postinst.index(s)
        for s in ("systemd-sysusers", "systemd-tmpfiles", "deb-systemd-invoke start")
    ]
    assert order == sorted(order)
    enabled = set(re.findall(r"deb-systemd-helper enable '([^']+)'", postinst))
    assert enabled == {u for u in UNITS if not u.endswith(".service")}
    started = re.search(r"deb-systemd-invoke start (.*?) >", postinst)
    assert started and ".service" not in started.group(1)  # services are socket/path-activated
    assert "/var/lib/mailroom" in control_file(deb, "postrm")
    for script in ("preinst", "postinst", "prerm", "postrm"):
        text = control_file(deb, script)
        assert not re.search(r"\brm\s[^\n]*/var/lib/mailroom", text), f"{script} deletes the mail"
    assert "rm -rf /etc/mailroom" in control_file(deb, "postrm")


def test_lintian_reports_no_errors(deb: Path) -> None:
    report = deb.with_suffix(".lintian")
    assert report.exists(), f"packaging/build-deb left no lintian report beside {deb}"
    errors = [line for line in report.read_text().splitlines() if line.startswith("E: ")]
    assert not errors, "\n".join(errors)
