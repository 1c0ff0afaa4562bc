"""Fuzzing the POP3 session: any bytes, before and after login, get +OK / -ERR / "+ " lines or a
multi-line answer, never an exception, and never output out of proportion to the input."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mailroom.pop3.session import POP3Session, State
from tests.security import fuzzing  # noqa: F401  (the settings profile)
from tests.test_pop3_session import ALICE, PASSWORD, PLAIN, filled, session

VERBS = ["USER", "PASS", "APOP", "AUTH", "STLS", "CAPA", "QUIT", "STAT", "LIST", "UIDL", "RETR",
         "TOP", "DELE", "NOOP", "RSET", "XTND", "user", "", " "]  # fmt: skip
ARGS = ["", "1", "2", "3", "4", "0", "-1", "999999999", "9999999999", "1 0", "1 -1", "2 100",
        "PLAIN", f"PLAIN {PLAIN}", "PLAIN =", "*", "=", ALICE, PASSWORD, "\x00", "\xff", " " * 3,
        "a" * 3000]  # fmt: skip


@st.composite
def command(draw: st.DrawFn) -> bytes:
    verb = draw(st.sampled_from(VERBS))
    arg = draw(st.sampled_from(ARGS) | st.text(max_size=12))
    end = draw(st.sampled_from([b"\r\n", b"\n", b"\r\n", b""]))
    return f"{verb} {arg}".encode("utf-8", "surrogatepass") + end


def _play(s: POP3Session, chunks: list[bytes]) -> None:
    sent = 0
    for chunk in chunks:
        sent += len(chunk)
        out = s.feed(chunk)  # must not raise
        assert not out.data or out.data.endswith(b"\r\n"), (chunk, out.data)
        first = out.data[:5]
        assert not out.data or first.startswith((b"+OK", b"-ERR", b"+ ")), out.data
        # three messages of at most 60 octets: every answer is small
        assert len(out.data) <= 4096 + 16 * sent, (chunk, len(out.data))
        if out.action is not None or s.state in (State.UPDATE, State.CLOSED):
            return


@given(st.lists(command(), max_size=10))
def test_commands_before_login(commands: list[bytes]) -> None:
    _play(session(filled()), commands)


@given(st.lists(command(), max_size=10))
def test_commands_after_login(commands: list[bytes]) -> None:
    s = session(filled())
    s.feed(f"USER {ALICE}\r\nPASS {PASSWORD}\r\n".encode())
    assert s.state is State.TRANSACTION
    _play(s, commands)


@given(st.binary(max_size=5000), st.integers(min_value=1, max_value=700), st.booleans())
def test_arbitrary_bytes(data: bytes, size: int, logged_in: bool) -> None:
    s = session(filled())
    if logged_in:
        s.feed(f"USER {ALICE}\r\nPASS {PASSWORD}\r\n".encode())
    _play(s, [data[i : i + size] for i in range(0, len(data), size)])
