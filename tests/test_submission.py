"""mailroom-submission over real sockets: TLS before AUTH, whose addresses a user may send
as, what is added to and removed from a message, DKIM, and where the message goes."""

from __future__ import annotations

import base64
import email
import email.policy
import json
import smtplib
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim as dkimpy  # type: ignore[import-untyped]
import pytest

from mailroom import dkim
from tests.conftest import PASSWORD, MailEnv, Server
from tests.smtpclient import SMTPConversation


@pytest.fixture
def submission(mail_env: MailEnv) -> Iterator[Server]:
    dkim.generate(mail_env.data_dir / "dkim", "example.test")
    server = Server(mail_env, "mailroom-submission", ("submission", "submissions"))
    yield server
    server.stop()


def _context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _client(server: Server, user: str = "alice@example.test") -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=15)
    client.starttls(context=_context())
    client.login(user, PASSWORD)
    return client


def _message(sender: str = "alice@example.test", extra: str = "") -> bytes:
    return (
        f"From: Alice <{sender}>\r\nTo: Bob <bob@example.test>\r\nSubject: hi\r\n{extra}"
        "\r\nHello Bob.\r\n"
    ).encode()


def _queued(env: MailEnv) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((env.data_dir / "queue").glob("*.json"))]


def test_nothing_but_starttls_before_tls_and_no_auth_in_plaintext(submission: Server) -> None:
    with SMTPConversation(submission.ports["submission"]) as conv:
        assert conv.last().startswith("220 ")
        conv.line("EHLO client.test")
        keywords = {line[4:].split()[0] for line in conv.reply()[1:]}
        assert "STARTTLS" in keywords and "AUTH" not in keywords
        assert conv.expect("AUTH PLAIN " + base64.b64encode(b"\0a\0b").decode(), "530")
        assert conv.expect("MAIL FROM:<alice@example.test>", "530")
        conv.expect("STARTTLS", "220")
        conv.starttls(_context())
        conv.line("EHLO client.test")
        keywords = {line[4:].split()[0] for line in conv.reply()[1:]}
        assert "AUTH" in keywords and "STARTTLS" not in keywords
        # RFC 4954 6: no MAIL, RCPT or DATA before AUTH, even over TLS.
        assert conv.expect("MAIL FROM:<alice@example.test>", "530")[-1].startswith("530 5.7.0")
        assert conv.expect("RCPT TO:<bob@example.test>", "530")


def test_auth_failures_say_why(submission: Server) -> None:
    def plain(raw: bytes) -> str:
        return "AUTH PLAIN " + base64.b64encode(raw).decode()

    with SMTPConversation(submission.ports["submission"]) as conv:
        assert conv.last().startswith("220 ")
        conv.line("EHLO client.test")
        conv.reply()
        conv.expect("STARTTLS", "220")
        conv.starttls(_context())
        conv.line("EHLO client.test")
        conv.reply()
        assert conv.expect("AUTH PLAIN !!!", "501")
        assert conv.expect(plain(b"alice@example.test\0alice"), "501")  # two fields
        assert conv.expect(
            plain(b"bob@example.test\0alice@example.test\0" + PASSWORD.encode()), "535"
        )
        assert conv.expect(plain(b"\0alice@example.test\0wrong"), "535")
        assert conv.expect(plain(b"\0alice@example.test\0" + PASSWORD.encode()), "235")


def test_local_and_remote_recipients_over_587_and_465(
    submission: Server, mail_env: MailEnv
) -> None:
    with _client(submission) as client:
        refused = client.sendmail(
            "alice@example.test",
            ["bob@example.test", "someone@remote.test"],
            _message(extra="Bcc: secret@remote.test,\r\n other@remote.test\r\n"),
        )
    assert refused == {}
    (delivered,) = mail_env.new_messages("bob@example.test")
    queued = _queued(mail_env)
    assert len(queued) == 1
    assert [r["address"] for r in queued[0]["recipients"]] == ["someone@remote.test"]
    for raw in (
        delivered.read_bytes(),
        next((mail_env.data_dir / "queue").glob("*.eml")).read_bytes(),
    ):
        message = email.message_from_bytes(raw, policy=email.policy.default)  # type: ignore[arg-type]
        assert message["Bcc"] is None and b"secret@remote.test" not in raw
        assert message["Message-ID"] and message["Date"]  # added: the client sent neither
        assert b"127.0.0.1" not in raw and b"client.test" not in raw  # the client stays private
        assert "ESMTPSA" in str(message["Received"])
    context = _context()
    with smtplib.SMTP_SSL("127.0.0.1", submission.ports["submissions"], context=context) as client:
        client.login("bob@example.test", PASSWORD)
        client.sendmail("bob@example.test", ["alice@example.test"], _message("bob@example.test"))
    assert len(mail_env.new_messages("alice@example.test")) == 1


def test_messages_are_dkim_signed_with_rsa_and_ed25519(
    submission: Server, mail_env: MailEnv
) -> None:
    with _client(submission) as client:
        client.sendmail("alice@example.test", ["bob@example.test"], _message())
    (path,) = mail_env.new_messages("bob@example.test")
    raw = path.read_bytes().replace(b"\n", b"\r\n")  # the Maildir keeps LF line ends
    raw = raw[raw.index(b"\r\n") + 2 :]  # the Return-Path local delivery adds is not signed
    keys = dkim.load_keys(mail_env.data_dir / "dkim", "example.test")
    records = {f"{k.selector}._domainkey.{k.domain}.": k.public_txt.encode() for k in keys}

    def dns(name: bytes | str, timeout: int = 5) -> bytes:
        return records.get(name.decode() if isinstance(name, bytes) else name, b"")

    signatures = [
        h for h in raw.split(b"\r\n\r\n")[0].split(b"\r\n") if h.startswith(b"DKIM-Signature")
    ]
    assert len(signatures) == 2
    verifier = dkimpy.DKIM(raw)
    assert all(verifier.verify(idx=i, dnsfunc=dns) for i in range(2))


@pytest.mark.parametrize(
    ("mail_from", "header_from", "code"),
    [
        ("bob@example.test", "alice@example.test", "550 5.7.1 Sender address bob@example.test"),
        ("alice@example.test", "bob@example.test", "550 5.7.1 From: address bob@example.test"),
        ("alice@example.test", "dave@example.org", "550 5.7.1 From: address dave@example.org"),
        ("", "alice@example.test", "550 5.7.1 Users may not send"),
    ],
)
def test_sending_as_someone_else_is_refused(
    submission: Server, mail_env: MailEnv, mail_from: str, header_from: str, code: str
) -> None:
    with (
        _client(submission) as client,
        pytest.raises((smtplib.SMTPSenderRefused, smtplib.SMTPDataError)) as refused,
    ):
        client.sendmail(mail_from, ["bob@example.test"], _message(header_from))
    error = refused.value.smtp_error
    reply = refused.value.smtp_code, error.decode() if isinstance(error, bytes) else error
    assert f"{reply[0]} {reply[1]}".startswith(code), reply
    assert mail_env.new_messages("bob@example.test") == []


@pytest.mark.parametrize(
    "address", ["alice@example.test", "alice+lists@example.test", "team@example.test"]
)
def test_own_addresses_and_aliases_may_send(
    submission: Server, mail_env: MailEnv, address: str
) -> None:
    with _client(submission) as client:
        assert client.sendmail(address, ["carol@example.test"], _message(address)) == {}
    assert len(mail_env.new_messages("carol@example.test")) == 1


def test_unknown_local_recipient_is_refused_at_rcpt(submission: Server) -> None:
    with _client(submission) as client, pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        client.sendmail("alice@example.test", ["nobody@example.test"], _message())
    assert refused.value.recipients["nobody@example.test"][0] == 550


def test_swaks_sends_with_auth_over_starttls(submission: Server, mail_env: MailEnv) -> None:
    out = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{submission.ports['submission']}", "--tls",
         "--auth", "LOGIN", "--auth-user", "alice@example.test", "--auth-password", PASSWORD,
         "--from", "alice@example.test", "--to", "bob@example.test",
         "--header", "From: alice@example.test", "--body", "sent by swaks"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    (path,) = mail_env.new_messages("bob@example.test")
    assert b"sent by swaks" in path.read_bytes()


def test_remote_mail_is_durable_before_250(submission: Server, mail_env: MailEnv) -> None:
    with _client(submission) as client:
        client.sendmail("alice@example.test", ["x@remote.test", "y@remote.test"], _message())
    (queued,) = _queued(mail_env)
    eml = mail_env.data_dir / "queue" / f"{queued['id']}.eml"
    assert b"Hello Bob." in eml.read_bytes()
    assert [r["state"] for r in queued["recipients"]] == ["pending", "pending"]
    assert Path(eml).stat().st_mode & 0o077 == 0  # not readable by others
