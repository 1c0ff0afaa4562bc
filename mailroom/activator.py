"""mailroom's own socket activator: plays systemd's part for ``bin/dev`` and the tests.

It binds the listening sockets, and when a connection waits on a socket whose service is
not running it starts the service with the sockets passed exactly as systemd passes them
(sd_listen_fds(3): fds from 3 on, ``LISTEN_PID``, ``LISTEN_FDS``, ``LISTEN_FDNAMES``;
``Accept=no``). A service that exits (idle exit) is started again by the next connection.
A service that fails (exit status > 0) right after starting is held back for a moment, like systemd's start
limit, so a broken config does not spin. SIGINT/SIGTERM stop the services and then itself.

    python -m mailroom.activator --service 'mailroom-smtpd:smtp=127.0.0.1:2525' ...
"""

from __future__ import annotations

import argparse
import fcntl
import os
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

HOLD_SECONDS = 2.0
STOP_SECONDS = 15.0


@dataclass
class Service:
    """One program and the named sockets it is started for."""

    command: list[str]
    listeners: list[tuple[str, socket.socket]]
    pid: int | None = None
    started: float = 0.0
    hold_until: float = 0.0
    starts: int = field(default=0)

    @property
    def name(self) -> str:
        return os.path.basename(self.command[0])


def parse_service(spec: str) -> Service:
    """``PROGRAM:NAME=HOST:PORT[,NAME=HOST:PORT...]`` → a Service with bound sockets."""
    program, sep, binds = spec.partition(":")
    if not sep or not binds:
        raise ValueError(f"bad --service {spec!r}: expected PROGRAM:NAME=HOST:PORT[,...]")
    listeners = []
    for bind in binds.split(","):
        name, eq, addr = bind.partition("=")
        host, colon, port = addr.rpartition(":")
        if not (eq and colon and name and port.isdigit()):
            raise ValueError(f"bad listener {bind!r}: expected NAME=HOST:PORT")
        listeners.append((name, listen(host.strip("[]"), int(port))))
    return Service(command=program.split(), listeners=listeners)


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def spawn(service: Service) -> int:
    """fork + exec ``service.command`` with its sockets at fd 3, 4, ... (sd_listen_fds)."""
    names = ":".join(name for name, _ in service.listeners)
    count = len(service.listeners)
    pid = os.fork()
    if pid:
        return pid
    try:  # the child: nothing here may return
        high = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD, 64) for _, s in service.listeners]
        for i, fd in enumerate(high):
            os.dup2(fd, 3 + i, inheritable=True)
        os.closerange(3 + count, 4096)
        env = dict(
            os.environ, LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(count), LISTEN_FDNAMES=names
        )
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.execvpe(service.command[0], service.command, env)
    except BaseException as err:  # report, then leave the child whatever happened
        print(f"mailroom-activator: cannot start {service.command[0]}: {err}", file=sys.stderr)
    os._exit(127)


class Activator:
    """Watches the sockets of stopped services and reaps the running ones."""

    def __init__(self, services: list[Service]) -> None:
        self.services = services
        self.stopping = False

    def say(self, text: str) -> None:
        print(f"mailroom-activator: {text}", file=sys.stderr, flush=True)

    def run(self) -> int:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._stop)
        for service in self.services:
            for name, sock in service.listeners:
                host, port = sock.getsockname()[:2]
                self.say(f"{service.name}: listening {name} on {host}:{port}")
        while not self.stopping:
            self.reap()
            now = time.monotonic()
            waiting = {
                sock.fileno(): service
                for service in self.services
                if service.pid is None and service.hold_until <= now
                for _, sock in service.listeners
            }
            try:
                ready, _, _ = select.select(list(waiting), [], [], 0.2)
            except InterruptedError:
                continue
            for service in {id(waiting[fd]): waiting[fd] for fd in ready}.values():
                if not self.stopping:
                    service.pid = spawn(service)
                    service.started = time.monotonic()
                    service.starts += 1
                    self.say(f"started {service.name} (pid {service.pid})")
        return self.shutdown()

    def _stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for service in self.services:
                if service.pid == pid:
                    code = os.waitstatus_to_exitcode(status)
                    self.say(f"{service.name} (pid {pid}) exited with status {code}")
                    service.pid = None
                    if code > 0 and time.monotonic() - service.started < HOLD_SECONDS:
                        service.hold_until = time.monotonic() + HOLD_SECONDS

    def shutdown(self) -> int:
        running = [s for s in self.services if s.pid is not None]
        for service in running:
            assert service.pid is not None
            os.kill(service.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_SECONDS
        while any(s.pid is not None for s in self.services) and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.05)
        for service in self.services:
            if service.pid is not None:
                os.kill(service.pid, signal.SIGKILL)
        self.reap()
        self.say("stopped")
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mailroom.activator", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--service",
        action="append",
        required=True,
        metavar="PROGRAM:NAME=HOST:PORT[,...]",
        help="a program and the named sockets it serves (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        services = [parse_service(spec) for spec in args.service]
    except (ValueError, OSError) as err:
        print(f"mailroom-activator: {err}", file=sys.stderr)
        return 2
    return Activator(services).run()


if __name__ == "__main__":
    sys.exit(main())
