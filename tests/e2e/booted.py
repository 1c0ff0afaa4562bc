"""A booted Debian 13 for the end-to-end tests: a cached debootstrap root, and a container of it.

``boot_root()`` makes (at most once a day) a trixie root that can boot systemd and keeps it in
``/var/cache/mailroom-build/boot-trixie``, beside the chroot packaging/build-deb uses. A
``Container`` is a fresh copy of that root booted with ``systemd-nspawn -b`` on the host's
network, so its socket units listen on the host's loopback; commands run inside with
``nsenter`` into the container's systemd (the hosts here run no systemd of their own, so
``machinectl`` and ``systemd-run -M`` have nothing to talk to). The copy is removed when the
container stops, so every run starts from the same clean root.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CACHE = Path(os.environ.get("MAILROOM_BUILD_CACHE", "/var/cache/mailroom-build"))
BOOT_ROOT = CACHE / "boot-trixie"
APT_ARCHIVES = CACHE / "boot-apt-archives"  # downloaded .debs, shared by every run
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
INCLUDE = "systemd,systemd-sysv,dbus,ca-certificates,openssl"
MAX_AGE_SECONDS = 86400
INSIDE_ENV = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "LC_ALL=C.UTF-8",
              "DEBIAN_FRONTEND=noninteractive"]  # fmt: skip


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Print how long the block took (the test's timings)."""
    start = time.monotonic()
    try:
        yield
    finally:
        print(f"[e2e {time.monotonic() - start:6.1f}s] {name}", flush=True)


@contextmanager
def locked(name: str) -> Iterator[None]:
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / name, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_tools() -> None:
    """systemd-nspawn and debootstrap, installed from Debian when missing."""
    missing = [pkg for tool, pkg in (("systemd-nspawn", "systemd-container"),
                                     ("debootstrap", "debootstrap")) if not shutil.which(tool)]  # fmt: skip
    if missing:
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True,
                       capture_output=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})  # fmt: skip


def boot_root() -> Path:
    """The cached trixie root (debootstrap minbase plus systemd), made when missing or old."""
    ensure_tools()
    stamp = BOOT_ROOT / ".mailroom-boot-ready"
    with locked("boot-trixie.lock"):
        if (
            stamp.exists()
            and stamp.read_text().strip() == INCLUDE
            and (time.time() - stamp.stat().st_mtime < MAX_AGE_SECONDS)
        ):
            return BOOT_ROOT
        new = CACHE / "boot-trixie.new"
        shutil.rmtree(new, ignore_errors=True)
        log = CACHE / "boot-debootstrap.log"
        with open(log, "w") as out:
            done = subprocess.run(
                ["debootstrap", "--variant=minbase", f"--include={INCLUDE}", "trixie", new, MIRROR],
                stdout=out, stderr=subprocess.STDOUT, timeout=1200,
            )  # fmt: skip
        assert done.returncode == 0, f"debootstrap failed: {log.read_text()[-2000:]}"
        (new / ".mailroom-boot-ready").write_text(INCLUDE + "\n")
        shutil.rmtree(BOOT_ROOT, ignore_errors=True)
        new.rename(BOOT_ROOT)
        return BOOT_ROOT


class Container:
    """A copy of the boot root, booted; ``run`` executes a command inside it."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="e2e.", dir=CACHE))
        self.root = self.workdir / "root"
        self.process: subprocess.Popen[bytes] | None = None
        self.pid = 0  # the container's systemd, as the host sees it
        self.console = self.workdir / "console.log"

    def copy_root(self, source: Path) -> None:
        subprocess.run(["cp", "-a", "--reflink=auto", source, self.root], check=True)
        shutil.copy("/etc/resolv.conf", self.root / "etc" / "resolv.conf", follow_symlinks=True)

    def boot(self, timeout: float = 60) -> None:
        APT_ARCHIVES.mkdir(parents=True, exist_ok=True)
        nspawn = (
            f"systemd-nspawn -b --register=no --keep-unit -D {self.root}"
            f" --bind={APT_ARCHIVES}:/var/cache/apt/archives --resolv-conf=off"
        )
        # nspawn -b wants a terminal: script gives it one, and the console goes to a file.
        self.process = subprocess.Popen(
            ["script", "-qfc", nspawn, str(self.console)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not self.pid:
            assert self.process.poll() is None, f"systemd-nspawn exited: {self.console_tail()}"
            assert time.monotonic() < deadline, (
                f"no systemd in the container: {self.console_tail()}"
            )
            self.pid = self._find_init()
            time.sleep(0.1)

    def _find_init(self) -> int:
        """The descendant of the nspawn process that is PID 1 in its own namespace."""
        assert self.process is not None
        todo, seen = [self.process.pid], set()
        while todo:
            pid = todo.pop()
            seen.add(pid)
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            nspid = next(
                (line.split() for line in status.splitlines() if line.startswith("NSpid:")), []
            )
            if (
                len(nspid) > 2
                and nspid[-1] == "1"
                and Path(f"/proc/{pid}/comm").read_text().strip() == "systemd"
            ):
                return pid
            todo += [int(c) for c in children if int(c) not in seen]
        return 0

    def console_tail(self, chars: int = 3000) -> str:
        try:
            return self.console.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def run(self, *cmd: str, check: bool = True, input: str | None = None, timeout: float = 300,
            ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Run a command inside the booted container, as root, with a clean environment."""
        done = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-a", *INSIDE_ENV, *cmd],
            input=input, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            )
        return done

    def wait_running(self, timeout: float = 120) -> str:
        """Wait until systemd says the boot is done; returns its state (running or degraded)."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.run(
                "systemctl", "is-system-running", "--wait", check=False, timeout=timeout
            )
            if state.stdout.strip() in {"running", "degraded"}:
                return state.stdout.strip()
            assert time.monotonic() < deadline, (
                f"system state {state.stdout!r}: {self.console_tail()}"
            )
            time.sleep(0.5)  # the bus may not be up yet

    def stop(self) -> None:
        """Power off (kill after 30 s) and remove the copy of the root."""
        if self.process is not None and self.process.poll() is None:
            if self.pid:
                subprocess.run(["nsenter", "-t", str(self.pid), "-a", "systemctl", "poweroff"],
                               capture_output=True, timeout=30, check=False)  # fmt: skip
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                # init first: the container's whole PID namespace dies with it
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    if self.pid:
                        os.kill(self.pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        shutil.rmtree(self.workdir, ignore_errors=True)
