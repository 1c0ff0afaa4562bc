"""Byte transcripts for the sans-IO IMAP session (the IMAP twin of ``smtpclient.run_transcript``).

A transcript is a list of lines:

    C: a1 LOGIN {5}        the client sends the text and CRLF
    S: + Ready for literal data
    C: alice {6}
    ...
    S: a1 OK *             the next line the server sent; fnmatch pattern when it holds "*"
                           after the first two characters, else compared exactly

Every line the server sends must be matched, in order: the transcript fails on a missing,
unexpected or different line. ``C+: text`` sends the text without CRLF (partial input).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from textwrap import dedent

from mailroom.accounts import User
from mailroom.addresses import Address
from mailroom.imap.session import IMAPSession, MailStore, Output, SessionConfig
from tests.imap_fake_store import FakeStore

ALICE = User(Address("alice", "example.test"), True, 0)
PASSWORD = "correct horse"


def authenticate(username: str, password: str) -> User | None:
    return ALICE if (username, password) == ("alice@example.test", PASSWORD) else None


def make_config(store: MailStore, **overrides: object) -> SessionConfig:
    values: dict[str, object] = {
        "hostname": "mail.example.test",
        "implicit_tls": True,
        "starttls_available": False,
        "authenticate": authenticate,
        "open_store": lambda user: store,
    }
    values.update(overrides)
    return SessionConfig(**values)  # type: ignore[arg-type]


@dataclass
class Conversation:
    """A session and everything it has said that a transcript has not matched yet."""

    session: IMAPSession
    pending: list[str] = field(default_factory=list)
    outputs: list[Output] = field(default_factory=list)

    def send(self, data: bytes) -> Output:
        out = self.session.feed(data)
        self.outputs.append(out)
        self.pending += _lines(out.data)
        return out

    def run(self, transcript: str) -> None:
        for raw in dedent(transcript).strip("\n").splitlines():
            raw = raw.strip()
            if not raw:
                continue
            kind, _, text = raw.partition(":")
            text = text.removeprefix(" ")
            if kind == "C":
                self.send(text.encode("utf-8") + b"\r\n")
            elif kind == "C+":
                self.send(text.encode("utf-8"))
            elif kind == "S":
                assert self.pending, f"expected {text!r}, the server said nothing more"
                got = self.pending.pop(0)
                ok = _match(got, text)
                assert ok, f"expected {text!r}\n     got {got!r}\n    then {self.pending!r}"
            else:
                raise ValueError(f"bad transcript line {raw!r}")
        assert not self.pending, f"unexpected server output {self.pending!r}"

    @property
    def action(self) -> object:
        return self.outputs[-1].action if self.outputs else None


def _match(got: str, pattern: str) -> bool:
    if "*" not in pattern[2:]:
        return got == pattern or (
            pattern == "+" and got == "+ "
        )  # "+ " loses its space in a transcript
    escaped = "".join(
        "[[]" if c == "[" else "[]]" if c == "]" else "[?]" if c == "?" else c for c in pattern
    )
    return fnmatch.fnmatchcase(got, escaped)


def _lines(data: bytes) -> list[str]:
    if not data:
        return []
    assert data.endswith(b"\r\n"), f"output does not end in CRLF: {data!r}"
    return [line.decode("utf-8", "replace") for line in data[:-2].split(b"\r\n")]


def conversation(
    store: MailStore | None = None, *, login: bool = True, **overrides: object
) -> Conversation:
    """A session on ``store`` (a fresh FakeStore), greeted and, with ``login``, logged in."""
    session = IMAPSession(make_config(store if store is not None else FakeStore(), **overrides))
    conv = Conversation(session)
    conv.pending += _lines(session.greeting())
    conv.pending.pop(0)
    if login:
        conv.run(f"""
            C: L1 LOGIN alice@example.test "{PASSWORD}"
            S: L1 OK [CAPABILITY *] Logged in
        """)
    return conv


def message(
    subject: str = "Hello", body: str = "Hi there.", sender: str = "bob@example.test"
) -> bytes:
    return (
        f"From: Bob <{sender}>\r\nTo: alice@example.test\r\nSubject: {subject}\r\n"
        f"Date: Mon, 23 Nov 2026 09:00:00 +0100\r\nMessage-ID: <{subject.replace(' ', '.')}@x>\r\n"
        f"\r\n{body}\r\n"
    ).encode()


def fill(store: FakeStore, count: int, folder: str = "INBOX", **flags: frozenset[str]) -> None:
    for i in range(1, count + 1):
        store.append(
            folder,
            message(f"Message {i}", f"Body number {i}."),
            flags.get(f"m{i}", frozenset()),
            datetime(2026, 11, (i - 1) % 30 + 1, 12, 0, 0, tzinfo=UTC),
        )
    store.claim_recent(folder)


Factory = Callable[..., Conversation]
