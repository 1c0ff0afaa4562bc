"""Python's imaplib driving the sans-IO session over a socket pair (no server, no TLS).

A real client catches what hand-written transcripts cannot: its own parsing of our responses.
"""

from __future__ import annotations

import imaplib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from mailroom.imap.session import IMAPSession
from tests.imap_fake_store import FakeStore
from tests.imap_transcript import PASSWORD, fill, make_config


def serve(sock: socket.socket, session: IMAPSession) -> None:
    """What mailroom.imap.server does, minus asyncio: bytes in, session, bytes out."""
    with sock:
        sock.sendall(session.greeting())
        while True:
            data = sock.recv(65536)
            if not data:
                return
            out = session.feed(data)
            sock.sendall(out.data)
            if out.action == "close":
                return


class PairIMAP(imaplib.IMAP4):
    def __init__(self, sock: socket.socket) -> None:
        self._pair = sock
        super().__init__("pair.invalid")

    def _create_socket(self, timeout: Any = None) -> socket.socket:
        return self._pair


@pytest.fixture
def client() -> Iterator[tuple[PairIMAP, FakeStore]]:
    store = FakeStore()
    fill(store, 3)
    ours, theirs = socket.socketpair()
    ours.settimeout(10)
    session = IMAPSession(make_config(store))
    thread = threading.Thread(target=serve, args=(theirs, session), daemon=True)
    thread.start()
    imap = PairIMAP(ours)
    try:
        yield imap, store
    finally:
        if imap.state != "LOGOUT":
            imap.shutdown()
        thread.join(5)


def test_imaplib_session(client: tuple[PairIMAP, FakeStore]) -> None:
    imap, store = client
    assert "IDLE" in imap.capabilities
    assert imap.login("alice@example.test", PASSWORD)[0] == "OK"
    typ, names = imap.list()
    assert typ == "OK"
    assert b'(\\HasNoChildren \\Subscribed \\Sent) "/" "Sent"' in names
    typ, data = imap.select("INBOX")
    assert (typ, data) == ("OK", [b"3"])
    typ, data = imap.search(None, "UNSEEN")
    assert (typ, data) == ("OK", [b"1 2 3"])
    typ, fetched = imap.fetch("2", "(UID RFC822.SIZE BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert typ == "OK"
    assert fetched[0] == (
        b"2 (UID 2 RFC822.SIZE 158 BODY[HEADER.FIELDS (SUBJECT)] {22}",
        b"Subject: Message 2\r\n\r\n",
    )
    typ, fetched = imap.fetch("1", "(RFC822)")
    assert typ == "OK" and isinstance(fetched[0], tuple)
    assert fetched[0][1] == store.folders["INBOX"].bodies[1]
    typ, data = imap.store("3", "+FLAGS", "(\\Deleted)")
    assert (typ, data) == ("OK", [b"3 (FLAGS (\\Deleted))"])
    typ, data = imap.uid("COPY", "1:2", "Archive")
    assert typ == "OK"
    assert imap.untagged_responses["COPYUID"] == [b"1005 1,2 1,2"]
    typ, data = imap.expunge()
    assert (typ, data) == ("OK", [b"3"])
    date = '"05-Nov-2026 10:11:12 +0100"'
    result: Any = imap.append("Drafts", "(\\Draft)", date, b"Subject: d\r\n\r\nText\r\n")
    typ, appended = result  # typeshed says append returns str; it is (typ, data)
    assert typ == "OK" and appended == [b"[APPENDUID 1002 1] APPEND completed"]
    typ, data = imap.status("Drafts", "(MESSAGES UIDNEXT)")
    assert data == [b'"Drafts" (MESSAGES 1 UIDNEXT 2)']
    assert imap.close()[0] == "OK"
    assert imap.logout()[0] == "BYE"
    assert sorted(store.folders["Archive"].messages) == [1, 2]
