"""Per-address limits count an IPv6 client by its /64: a home or a rented host is given a
whole /64, so counting single addresses would let one client take every limit once per
address it picks. Unit checks of ``client_group`` and the login throttle, and real
connections to mailroom-pop3d inside a network namespace of the test's own, whose loopback
device has addresses of two /64s for the clients to connect from."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mailroom.throttle import AuthThrottle, client_group
from tests.conftest import BIN, MailEnv

HOME = "2001:db8:1:2"  # the client's /64
NEIGHBOUR = "2001:db8:1:3"  # another /64


@pytest.mark.parametrize(
    ("peer", "group"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),  # IPv4-mapped: the IPv4 client it is
        ("2001:db8:1:2::a", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:DB8:1:2:0:0:0:A", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("::1", "::/64"),
        ("local", "local"),
        ("", ""),
    ],
)
def test_client_group(peer: str, group: str) -> None:
    assert client_group(peer) == group


def test_throttle_counts_a_64_as_one_client() -> None:
    throttle = AuthThrottle(lockout_after=3, base_delay=0.5)
    delays = [throttle.failed(f"{HOME}::{n:x}") for n in range(1, 4)]
    assert delays == [0.5, 1, 2]  # one client stepping through its addresses
    assert throttle.locked_out(f"{HOME}::99")
    assert not throttle.locked_out(f"{NEIGHBOUR}::1")
    throttle.succeeded(f"{HOME}::5")
    assert not throttle.locked_out(f"{HOME}::1")


PROBE = textwrap.dedent(
    """
    import json, socket, subprocess, sys, time

    port, config, program = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    activator = subprocess.Popen(
        [sys.executable, "-m", "mailroom.activator", "--service", f"{program}:pop3=[::1]:{port}"],
        env={"CONFIG_PATH": config, "PATH": "/usr/bin:/bin"},
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("::1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        time.sleep(1)  # the probe connection above is closed and released
        held, greetings = [], {}
        for source in sys.argv[4:]:
            sock = socket.socket(socket.AF_INET6)
            sock.settimeout(20)
            sock.bind((source, 0))
            sock.connect(("::1", port))
            greetings[source] = sock.recv(512).decode(errors="replace").strip()
            held.append(sock)
        print(json.dumps(greetings))
    finally:
        activator.terminate()
        activator.wait(30)
    """
)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare"
)
def test_pop3_connection_limit_counts_a_64_as_one_client(mail_env: MailEnv) -> None:
    config = mail_env.config
    config.write_text(
        config.read_text().replace(
            "[tls]", "[pop3]\nmax_connections_per_ip = 2\nallow_plaintext_loopback = true\n[tls]"
        )
    )
    sources = [f"{HOME}::a", f"{HOME}::b", f"{HOME}::c", f"{NEIGHBOUR}::a"]
    setup = " && ".join(
        ["ip link set lo up", *(f"ip -6 addr add {s}/128 dev lo nodad" for s in sources)]
    )
    probe = mail_env.root / "probe.py"
    probe.write_text(PROBE)
    command = f'{setup} && exec "$@"'
    args = [sys.executable, str(probe), "1110", str(config), str(BIN / "mailroom-pop3d"), *sources]
    result = subprocess.run(
        ["unshare", "--net", "sh", "-c", command, "sh", *args],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr
    greetings = json.loads(result.stdout.strip().splitlines()[-1])
    assert greetings[f"{HOME}::a"].startswith("+OK")
    assert greetings[f"{HOME}::b"].startswith("+OK")
    # A third address of the same /64 is the same client, over its limit of two:
    assert greetings[f"{HOME}::c"].startswith("-ERR"), greetings
    assert "too many connections" in result.stderr
    assert greetings[f"{NEIGHBOUR}::a"].startswith("+OK")  # another /64, another client
