"""Fuzzing SASL decoding (RFC 4616 PLAIN, LOGIN) in IMAP AUTHENTICATE, POP3 AUTH and the
submission server's base64 reader: any response is refused or logs in exactly the account whose
credentials it holds; the password check only ever sees text without NUL, CR or LF."""

from __future__ import annotations

import base64

from hypothesis import given
from hypothesis import strategies as st

from mailroom.accounts import User
from mailroom.addresses import parse_address
from mailroom.imap.session import State as IMAPState
from mailroom.pop3.session import POP3Session, SessionConfig
from mailroom.pop3.session import State as POP3State
from mailroom.submission import _b64
from tests.imap_transcript import PASSWORD as IMAP_PASSWORD
from tests.imap_transcript import conversation
from tests.security import fuzzing  # noqa: F401  (the settings profile)
from tests.test_pop3_session import ALICE, HOST, PASSWORD, World

fields = st.sampled_from(["", "alice@example.test", "bob", "a\x00b", "\r\n", "é"]) | st.text(
    max_size=12
)


@st.composite
def plain_payload(draw: st.DrawFn) -> bytes:
    """Mostly authzid NUL authcid NUL password with odd field counts; sometimes any bytes."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=200))
    parts = draw(st.lists(fields, min_size=0, max_size=5))
    return "\x00".join(parts).encode("utf-8", "surrogatepass")


def response(payload: bytes, mangle: int) -> bytes:
    text = base64.b64encode(payload)
    if mangle == 1 and text:  # break the base64: a non-alphabet octet, a lost pad
        text = text[:-1] + b"!"
    elif mangle == 2:
        text = text.rstrip(b"=")
    return text


def _valid(payload: bytes, password: str) -> bool:
    parts = payload.split(b"\x00")
    return (
        len(parts) == 3
        and parts[1] == b"alice@example.test"
        and parts[2] == password.encode()
        and parts[0] in (b"", parts[1])
    )


class Recorder:
    def __init__(self, password: str, user: User) -> None:
        self.password, self.user = password, user
        self.seen: list[tuple[str, str]] = []

    def __call__(self, username: str, password: str) -> User | None:
        self.seen.append((username, password))
        assert isinstance(username, str) and isinstance(password, str)
        return (
            self.user if (username, password) == (str(self.user.address), self.password) else None
        )


@given(plain_payload(), st.sampled_from([0, 0, 1, 2]), st.booleans())
def test_imap_authenticate_plain(payload: bytes, mangle: int, initial: bool) -> None:
    check = Recorder(IMAP_PASSWORD, User(parse_address("alice@example.test"), True, 0))
    conv = conversation(login=False, authenticate=check)
    line = response(payload, mangle)
    if initial:
        out = conv.session.feed(b"a AUTHENTICATE PLAIN " + (line or b"=") + b"\r\n").data
    else:
        assert conv.session.feed(b"a AUTHENTICATE PLAIN\r\n").data.startswith(b"+")
        out = conv.session.feed(line + b"\r\n").data
    assert out.endswith(b"\r\n") and b"SERVERBUG" not in out, out
    logged_in = conv.session.state is IMAPState.AUTHENTICATED
    assert logged_in == (mangle == 0 and _valid(payload, IMAP_PASSWORD)), (payload, out)
    assert (b"a OK" in out) == logged_in, out
    for username, _ in check.seen:
        assert "\x00" not in username


@given(st.lists(st.binary(max_size=60), min_size=2, max_size=2), st.booleans())
def test_imap_authenticate_login(answers: list[bytes], broken: bool) -> None:
    check = Recorder(IMAP_PASSWORD, User(parse_address("alice@example.test"), True, 0))
    conv = conversation(login=False, authenticate=check)
    out = conv.session.feed(b"a AUTHENTICATE LOGIN\r\n").data
    for answer in answers:
        if not out.startswith(b"+"):
            break
        line = base64.b64encode(answer) + (b"*!" if broken else b"")
        out = conv.session.feed(line + b"\r\n").data
    assert out.endswith(b"\r\n") and b"SERVERBUG" not in out, out
    assert conv.session.state is IMAPState.NOT_AUTHENTICATED


@given(plain_payload(), st.sampled_from([0, 0, 1, 2]))
def test_pop3_auth_plain(payload: bytes, mangle: int) -> None:
    world = World()
    s = POP3Session(
        SessionConfig(
            hostname=HOST,
            authenticate=world.authenticate,
            open_maildrop=world.open_maildrop,
            implicit_tls=True,
        )
    )
    s.feed(b"AUTH PLAIN\r\n")
    out = s.feed(response(payload, mangle) + b"\r\n").data
    assert out.startswith((b"+OK", b"-ERR")) and out.endswith(b"\r\n"), out
    assert (s.state is POP3State.TRANSACTION) == (mangle == 0 and _valid(payload, PASSWORD)), (
        payload,
        out,
    )
    for username, _ in world.logins:
        assert username == ALICE or "\x00" not in username


@given(st.text(max_size=200) | st.binary(max_size=150).map(lambda b: base64.b64encode(b).decode()))
def test_submission_base64_reader(text: str) -> None:
    decoded = _b64(text)
    if decoded is not None:
        assert len(decoded) <= len(text) * 3 // 4
        assert _b64(base64.b64encode(decoded).decode()) == decoded
