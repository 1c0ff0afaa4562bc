"""The physical limit of durable delivery on a disk: messages per second, no SMTP.

``bench_fsync_limit`` makes ``count`` ``size``-byte files durable in a Maildir the way
maildir(5) describes, each on its own: write to tmp/, fsync, link into new/, unlink the tmp/
name, fsync new/. That is written out here rather than taken from ``mailroom.maildir``, so
the ceiling stays the disk's and does not move when mailroom's delivery gets smarter (it
shares one fsync of new/ between concurrent deliveries). ``bin/bench smtp-inbound`` reports
its throughput as a fraction of this. Run directly:
``python tests/bench/fsync_limit.py [DIR] --count N --size B``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


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
    """Make ``count`` files of ``size`` bytes durable in a Maildir at ``directory``; files/s.

    ``workers`` > 1 delivers from that many threads at once, as the SMTP server does for
    concurrent sessions (file systems commit concurrent fsyncs together). The files stay in
    ``directory/new/``; the caller owns ``directory``.
    """
    for sub in ("cur", "new", "tmp"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    message = make_message(size).replace(b"\r\n", b"\n")  # stored as mailroom stores it
    suffix = f".{socket.gethostname()},S={len(message)},W={size}"
    names = itertools.count()

    def deliver(_: object) -> None:
        name = f"{time.time():.6f}.P{os.getpid()}N{next(names)}{suffix}"
        tmp, new = directory / "tmp" / name, directory / "new" / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, message)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, new)
        os.unlink(tmp)
        fd = os.open(directory / "new", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    start = time.perf_counter()
    if workers <= 1:
        for i in range(count):
            deliver(i)
    else:
        with ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(deliver, range(count)):
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
