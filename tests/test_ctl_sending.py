"""`mailroomctl dkim` and `mailroomctl queue`, run as the installed console script."""

from __future__ import annotations

import json
import re
import time

from mailroom.queue import Queue
from tests.test_ctl import Ctl, alice, ctl  # noqa: F401 - the fixtures


def test_dkim_generate_and_show(alice: Ctl) -> None:  # noqa: F811
    assert "not a local domain" in alice.fails("dkim", "generate", "other.test")
    assert "has no DKIM keys" in alice.fails("dkim", "show", "example.test")
    out = alice.ok("dkim", "generate", "example.test")
    records = re.findall(r"^(\S+)\. IN TXT (.+)$", out, re.M)
    assert [name.split(".")[0][0] for name, _ in records] == ["r", "e"]
    rsa = records[0][1]
    assert all(len(part) <= 257 for part in re.findall(r'"[^"]*"', rsa))  # 255 octets a string
    assert "".join(re.findall(r'"([^"]*)"', rsa)).startswith("v=DKIM1; k=rsa; p=")
    assert alice.ok("dkim", "show", "example.test").splitlines() == out.splitlines()[1:]
    assert "exist" in alice.fails("dkim", "generate", "example.test")  # never overwritten
    for key in (alice.data_dir / "dkim" / "example.test").glob("*.key"):
        assert key.stat().st_mode & 0o077 == 0


def test_queue_list_flush_bounce_delete(alice: Ctl) -> None:  # noqa: F811
    assert alice.ok("queue", "list") == "the queue is empty\n"
    queue = Queue(alice.data_dir / "queue")
    message = b"From: alice@example.test\r\nSubject: out\r\n\r\nbody\r\n"
    first = queue.enqueue("alice@example.test", ["x@remote.test"], message, time.time())
    second = queue.enqueue("alice@example.test", ["y@remote.test"], message, time.time())
    table = alice.ok("queue", "list")
    assert first in table and "x@remote.test" in table and "pending" in table
    rows = json.loads(alice.ok("queue", "list", "--json"))
    assert [r["id"] for r in rows] == sorted([first, second])
    assert "message(s) due now" in alice.ok("queue", "flush")
    alice.ok("queue", "bounce", first)
    assert [m.id for m in queue.list()] == [second]
    inbox = list((alice.maildir("alice@example.test") / "new").iterdir())
    bounce = [p for p in inbox if b"Undelivered Mail" in p.read_bytes()]
    assert len(bounce) == 1 and b"x@remote.test" in bounce[0].read_bytes()
    alice.ok("queue", "delete", second)
    assert queue.list() == []
    assert "invalid" in alice.fails("queue", "delete", "../etc").lower()
