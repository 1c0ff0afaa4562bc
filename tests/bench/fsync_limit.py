"""The physical limit of durable delivery on a disk: messages per second, no SMTP.

``bench_fsync_limit`` runs ``count`` deliveries of ``size``-byte messages through the very
code path the SMTP server uses (``mailroom.maildir.deliver_all``: write to tmp/, fsync, link
into new/, fsync new/), so ``bin/bench smtp-inbound`` can report its throughput as a fraction
of this ceiling. Run directly: ``python tests/bench/fsync_limit.py [DIR] --count N --size B``.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mailroom.maildir import Maildir


def make_message(size: int) -> bytes:
    """A message of exactly ``size`` (at least 68) bytes with CRLF line ends, as SMTP delivers it."""
    header = b"From: bench@example.org\r\nTo: bench@example.org\r\nSubject: bench\r\n\r\n"
    fill = size - len(header) - 2
    if fill < 0:
        raise ValueError(f"message size {size} is too small")
    body = ((b"x" * 76 + b"\r\n") * (fill // 78 + 1))[:fill]
    if body.endswith(b"\r"):  # cut inside a CRLF: no bare CR
        body = body[:-1] + b"x"
    return header + body + b"\r\n"


def bench_fsync_limit(directory: Path, count: int, size: int, *, workers: int = 1) -> float:
    """Deliver ``count`` messages of ``size`` bytes into a Maildir at ``directory``; msgs/s.

    ``workers`` > 1 delivers from that many threads at once, as the SMTP server does for
    concurrent sessions (file systems commit concurrent fsyncs together). The messages stay
    in ``directory/new/``; the caller owns ``directory``.
    """
    maildir = Maildir(directory, socket.gethostname())
    maildir.create()
    message = make_message(size)
    start = time.perf_counter()
    if workers <= 1:
        for _ in range(count):
            maildir.deliver(message)
    else:
        with ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(lambda _: maildir.deliver(message), range(count)):
                pass
    return count / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", nargs="?", type=Path, help="default: a temporary directory")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--size", type=int, default=10 * 1024)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.directory) as tmp:
        rate = bench_fsync_limit(Path(tmp) / "Maildir", args.count, args.size, workers=args.workers)
    print(f"{rate:.0f} msgs/s ({args.count} x {args.size} bytes, {args.workers} worker(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
