"""Random and mutated commands: the session never raises, and always answers in whole lines."""

from __future__ import annotations

import random

from mailroom.imap.session import State
from tests.imap_fake_store import FakeStore
from tests.imap_transcript import conversation, fill

COMMANDS = [
    b"a1 SELECT INBOX", b"a2 FETCH 1:* (FLAGS UID BODY.PEEK[HEADER.FIELDS (SUBJECT)]<0.10>)",
    b"a3 UID SEARCH RETURN (MIN MAX) OR SEEN (NOT DELETED) UID 1:*", b"a4 STORE 1 +FLAGS (\\Seen)",
    b'a5 LIST (SUBSCRIBED) "" ("*" "%") RETURN (STATUS (MESSAGES))', b"a6 UID MOVE 2 Trash",
    b"a7 APPEND INBOX (\\Seen) {5+}\r\nhello", b"a8 STATUS INBOX (MESSAGES SIZE)",
    b"a9 SELECT INBOX (QRESYNC (1000 1 1:3))", b"b1 UID FETCH 1:* (FLAGS) (CHANGEDSINCE 1 VANISHED)",
    b"b2 ENABLE QRESYNC UTF8=ACCEPT", b"b3 CREATE a/b (USE (\\Sent))", b"b4 EXPUNGE", b"b5 IDLE",
    b"DONE", b"b6 SEARCH CHARSET UTF-8 TEXT {3+}\r\nabc", b"b7 UNSELECT", b"b8 CLOSE",
    b"b9 COPY 1:2 Archive", b"c1 GETQUOTAROOT INBOX", b"c2 ID NIL", b"c3 NAMESPACE",
]  # fmt: skip
NOISE = [b"(", b")", b"{", b"}", b"{3}", b"{2+}\r\n", b"\r\n", b" ", b"*", b"\\", b'"', b"\x00", b"\xff", b"[", b"]", b"<", b">", b"1:", b",", b"$", b"~{1}\r\n"]  # fmt: skip


def mutate(rng: random.Random, command: bytes) -> bytes:
    data = bytearray(command)
    for _ in range(rng.randint(0, 3)):
        pos = rng.randint(0, len(data))
        choice = rng.random()
        if choice < 0.4:
            data[pos:pos] = rng.choice(NOISE)
        elif choice < 0.7 and data:
            del data[pos : pos + rng.randint(1, 4)]
        else:
            data[pos:pos] = bytes(rng.randint(0, 255) for _ in range(rng.randint(1, 3)))
    return bytes(data)


def test_mutated_commands_never_raise() -> None:
    rng = random.Random(20261124)
    for _ in range(150):
        store = FakeStore()
        fill(store, 3)
        conv = conversation(store)
        for _ in range(20):
            data = mutate(rng, rng.choice(COMMANDS)) + b"\r\n"
            out = conv.session.feed(data)  # must not raise
            assert not out.data or out.data.endswith(b"\r\n"), (data, out.data)
            assert b"SERVERBUG" not in out.data, (data, out.data)
            if out.action == "close" or conv.session.state is State.LOGOUT:
                break
        conv.session.feed(b"\r\n" * 3 + b"DONE\r\n")


def test_random_bytes_before_login_never_raise() -> None:
    rng = random.Random(7)
    for _ in range(200):
        conv = conversation(login=False)
        data = bytes(rng.randint(0, 255) for _ in range(rng.randint(1, 300)))
        for cut in range(0, len(data), 37):
            out = conv.session.feed(data[cut : cut + 37])
            if out.action == "close":
                break
