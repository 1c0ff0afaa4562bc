"""A real authoritative DNS server on loopback for tests: Knot DNS (``knotd``, Debian ``knot``).

``DnsServer`` writes a ``knot.conf`` and zone files into a temporary directory, runs ``knotd``
in the foreground on ``127.0.0.1`` and a free port (UDP and TCP), and waits until it answers.
``set_zone`` publishes a zone (new or changed) and returns once the new serial is served, so a
test can query it straight away. ``address`` ("127.0.0.1:PORT") is what goes into
``[dns] nameservers``. The process is always killed at the end, also when a test fails.
Every zone takes RFC 2136 updates signed with the TSIG key ``tsig_name``/``tsig_secret``
(HMAC-SHA256): what certbot-dns-rfc2136 and ``dns publish`` send.

    with DnsServer() as dns:
        dns.set_zone("example.test", [("@", "MX", "10 mx.example.test."),
                                      ("mx", "A", "127.0.0.1")])
        # or zone-file lines, names relative to the origin:
        dns.set_zone("example.test", ["@ 300 IN MX 10 mx.example.test."])
"""

from __future__ import annotations

import base64
import itertools
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

KNOTD = shutil.which("knotd") or "/usr/sbin/knotd"
KNOTC = shutil.which("knotc") or "/usr/sbin/knotc"
TTL = 300
TSIG_ALGORITHM = "hmac-sha256"
Record = tuple[str, str, str] | str


def free_udp_tcp_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (knotd listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise OSError("no port free for both UDP and TCP")


class DnsServer:
    """knotd serving the zones given to ``set_zone`` on 127.0.0.1:``port``."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_udp_tcp_port()
        self.zones: dict[str, list[Record]] = {}
        self._serials = itertools.count(int(time.time()))  # only ever grows
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.tsig_name = "mailroom-test."
        self.tsig_secret = base64.b64encode(secrets.token_bytes(32)).decode()

    @property
    def address(self) -> str:
        """``ip:port``, as ``DNSSettings.nameservers`` takes it."""
        return f"{self.host}:{self.port}"

    @property
    def dir(self) -> Path:
        assert self._tmp is not None, "the server is not running"
        return Path(self._tmp.name)

    @property
    def conf(self) -> Path:
        return self.dir / "knot.conf"

    @property
    def log_path(self) -> Path:
        return self.dir / "knotd.log"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self._tmp else ""

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="knot-")
        (self.dir / "zones").mkdir()
        self._write_conf()
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                [KNOTD, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            self._wait(lambda: self._query(".", "SOA") is not None, "knotd to answer")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> DnsServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- zones -----------------------------------------------------------------------------------

    def set_zone(self, origin: str, records: Sequence[Record]) -> None:
        """Publish ``origin`` with ``records`` in place of what it had, and wait until it is served.

        A record is ``(name, type, value)`` (name relative to the origin, ``@`` for the apex;
        value in zone-file syntax, e.g. ``"10 mx.example.test."`` or ``'"v=spf1 -all"'``) or a
        whole zone-file line (``"mx 300 IN A 127.0.0.1"``). SOA and NS are added.
        """
        origin = origin.strip().rstrip(".").lower()
        new = origin not in self.zones
        self.zones[origin] = list(records)
        serial = next(self._serials)
        lines = [
            f"$ORIGIN {origin}.",
            f"$TTL {TTL}",
            f"@ {TTL} IN SOA ns.{origin}. hostmaster.{origin}. {serial} 3600 600 86400 60",
            f"@ {TTL} IN NS localhost.",
        ]
        for record in records:
            if isinstance(record, str):
                lines.append(record)
            else:
                name, rdtype, value = record
                lines.append(f"{name} {TTL} IN {rdtype.upper()} {value}")
        zone_file = self.dir / "zones" / f"{origin}.zone"
        tmp = zone_file.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(zone_file)
        log_start = self.log_path.stat().st_size
        if new:
            self._write_conf()
            self._knotc("reload")
        else:
            self._knotc("zone-reload", f"{origin}.")

        def loaded() -> bool:
            if self.serial(origin) == serial:
                return True
            with self.log_path.open("rb") as log:
                log.seek(log_start)
                errors = [
                    line
                    for line in log.read().decode(errors="replace").splitlines()
                    if f"[{origin}.]" in line and " error: " in line
                ]
            if errors:
                raise ValueError(f"knotd rejected zone {origin}:\n" + "\n".join(errors))
            return False

        self._wait(loaded, f"serial {serial} of {origin}")

    def serial(self, origin: str) -> int | None:
        """The SOA serial the server answers for ``origin`` (None: it does not serve it)."""
        response = self._query(origin, "SOA")
        if response is None or response.rcode() != dns.rcode.NOERROR or not response.answer:
            return None
        return int(response.answer[0][0].serial)

    # -- internals -------------------------------------------------------------------------------

    def _write_conf(self) -> None:
        d = self.dir
        zones = "".join(f"  - domain: {origin}.\n" for origin in sorted(self.zones))
        conf = (
            "server:\n"
            f"  rundir: {d}\n"
            "  user: root:root\n"
            f"  listen: {self.host}@{self.port}\n"
            "  udp-workers: 1\n"
            "  tcp-workers: 1\n"
            "  background-workers: 1\n"
            "control:\n"
            f"  listen: {d / 'knot.sock'}\n"
            "database:\n"
            f"  storage: {d}\n"
            "log:\n"
            "  - target: stderr\n"
            "    any: info\n"
            "key:\n"
            f"  - id: {self.tsig_name}\n"
            f"    algorithm: {TSIG_ALGORITHM}\n"
            f"    secret: {self.tsig_secret}\n"
            "acl:\n"
            "  - id: tsig-update\n"
            f"    key: {self.tsig_name}\n"
            "    action: update\n"
            "template:\n"
            "  - id: default\n"
            f"    storage: {d / 'zones'}\n"
            '    file: "%s.zone"\n'
            "    zonefile-sync: -1\n"
            "    zonefile-load: whole\n"
            "    journal-content: none\n"
            "    semantic-checks: off\n"
            "    acl: tsig-update\n" + (f"zone:\n{zones}" if zones else "")
        )
        tmp = self.conf.with_suffix(".tmp")
        tmp.write_text(conf)
        tmp.replace(self.conf)

    def _knotc(self, *args: str) -> None:
        result = subprocess.run(
            [KNOTC, "-c", str(self.conf), "-s", str(self.dir / "knot.sock"), *args],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"knotc {' '.join(args)} failed: {result.stdout}{result.stderr}\n{self.output()}"
            )

    def _query(self, name: str, rdtype: str) -> dns.message.Message | None:
        query = dns.message.make_query(name, dns.rdatatype.from_text(rdtype))
        try:
            return dns.query.udp(query, self.host, timeout=0.2, port=self.port)
        except (dns.exception.DNSException, OSError):
            return None

    def _wait(self, ready: Callable[[], bool], what: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"knotd exited ({self._proc.returncode}):\n{self.output()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout} s for {what}:\n{self.output()}")
            time.sleep(0.01)


class RefusingDnsServer:
    """A UDP DNS server on 127.0.0.1 that answers every question REFUSED, at once.

    The default test configuration points ``[inbound] nameservers`` here, so that port-25 mail
    in tests that do not care about authentication gets ``temperror`` without waiting for the
    machine's resolver (which may have no internet and time out).
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.queries = 0
        self._thread = threading.Thread(target=self._serve, daemon=True, name="refusing-dns")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return  # closed
            try:
                query = dns.message.from_wire(data)
            except dns.exception.DNSException:
                continue
            reply = dns.message.make_response(query)
            reply.set_rcode(dns.rcode.REFUSED)
            self.queries += 1
            self.sock.sendto(reply.to_wire(), peer)

    def __enter__(self) -> RefusingDnsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


_REFUSING: RefusingDnsServer | None = None
_REFUSING_LOCK = threading.Lock()


def refusing_dns_address() -> str:
    """The address of this process's ``RefusingDnsServer``, started on first use."""
    global _REFUSING
    with _REFUSING_LOCK:
        if _REFUSING is None:
            _REFUSING = RefusingDnsServer().__enter__()
        return _REFUSING.address


@pytest.fixture(scope="session")
def dns_server() -> Iterator[DnsServer]:
    """A knotd on loopback; each test publishes the zones it needs with ``set_zone``."""
    if not Path(KNOTD).exists():
        pytest.fail("knotd is not installed (Debian package knot; bin/test installs it)")
    with DnsServer() as server:
        yield server
