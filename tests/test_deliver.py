"""The queue runner against real peers: Knot DNS for the MX records, a private Postfix as the
receiving MTA, aiosmtpd servers for scripted failures and for the smarthost, an HTTPS server for
MTA-STS policies. The clock is injected: no test sleeps through a retry interval.

Sender alice@example.test is local (conftest's ``mail_env``); bounces land in her INBOX.
"""

from __future__ import annotations

import asyncio
import email.policy
import http.server
import os
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from mailroom import deliver
from mailroom.accounts import Accounts
from mailroom.config import Settings, load_settings
from mailroom.deliver import Runner
from mailroom.queue import Queue, QueuedMessage, RecipientState
from tests import postfix_peer
from tests.conftest import BIN, MailEnv, free_port
from tests.dnsserver import DnsServer, dns_server  # noqa: F401 - the fixture, used by dns

T0 = 1_900_000_000.0  # the injected clock's start
SENDER = "alice@example.test"
BODY = b"Hello Bob,\r\n\r\n.a line that starts with a dot\r\n..and two\r\nBye\r\n"
PASSWORD = "s3cret relay password"


def message(to: str = "bob@remote.test", subject: str = "Hello") -> bytes:
    return (
        f"From: Alice <{SENDER}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
        f"Date: Tue, 24 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{subject}.1@example.test>\r\n"
        "\r\n"
    ).encode() + BODY


class Clock:
    def __init__(self, start: float = T0) -> None:
        self.time = start

    def __call__(self) -> float:
        return self.time


# -- certificates ------------------------------------------------------------------------------


@dataclass
class CertAuthority:
    directory: Path
    cert: Path  # the CA certificate: outbound.ca_file

    def issue(self, name: str, *names: str) -> tuple[Path, Path]:
        """A certificate for ``name`` (and ``names``) signed by this CA: (cert, key)."""
        cert, key, csr = (self.directory / f"{name}.{ext}" for ext in ("pem", "key", "csr"))
        ext = self.directory / f"{name}.ext"
        sans = ",".join(f"IP:{n}" if n[0].isdigit() else f"DNS:{n}" for n in (name, *names))
        ext.write_text(
            f"subjectAltName={sans}\nbasicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
        )
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", key, "-out", csr)  # fmt: skip
        _openssl("x509", "-req", "-in", csr, "-CA", self.cert, "-CAkey", self.directory / "ca.key",
                 "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", cert)  # fmt: skip
        return cert, key

    def server_context(self, name: str, *names: str) -> ssl.SSLContext:
        cert, key = self.issue(name, *names)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        return context


def _openssl(*args: object) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertAuthority:
    d = tmp_path_factory.mktemp("ca")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=Test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-keyout", d / "ca.key", "-out", d / "ca.pem")  # fmt: skip
    return CertAuthority(d, d / "ca.pem")


# -- the peers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postfix(ca: CertAuthority) -> Iterator[postfix_peer.PostfixPeer]:
    why = postfix_peer.available()
    assert why is None, f"Postfix cannot run here: {why} (bin/test installs it; run as root)"
    cert, key = ca.issue("mx.remote.test", "mx.sts.test")
    with postfix_peer.PostfixPeer(
        port=free_port(),
        domains=["remote.test", "sts.test"],
        mailboxes=["bob@remote.test", "bob@sts.test"],
        cert=cert,
        key=key,
    ) as peer:
        yield peer


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes
    tls: bool
    login: str = ""


@dataclass
class ScriptedHandler:
    """aiosmtpd hooks that answer from scripts and remember what they were sent."""

    rcpt_replies: list[str] = field(default_factory=list)  # popped per RCPT; then 250
    data_replies: list[str] = field(default_factory=list)  # popped per DATA; then 250
    stall_data: bool = False
    hellos: int = 0
    mails: list[str] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    data_started: threading.Event = field(default_factory=threading.Event)

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        self.hellos += 1
        session.host_name = hostname
        return responses

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self.mails.append(address)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        reply = self.rcpt_replies.pop(0) if self.rcpt_replies else "250 2.1.5 OK"
        if reply.startswith("250"):
            envelope.rcpt_tos.append(address)
        return reply

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.data_started.set()
        while self.stall_data:
            await asyncio.sleep(0.05)
        reply = self.data_replies.pop(0) if self.data_replies else "250 2.0.0 OK: queued"
        if reply.startswith("250"):
            login = session.auth_data.login.decode() if session.auth_data else ""
            self.received.append(
                Received(
                    envelope.mail_from,
                    list(envelope.rcpt_tos),
                    envelope.original_content,
                    session.ssl is not None,
                    login,
                )
            )
        return reply


@pytest.fixture
def scripted() -> Iterator[tuple[ScriptedHandler, int]]:
    """A plain aiosmtpd server on 127.0.0.1 (no STARTTLS): the handler and the port."""
    handler = ScriptedHandler()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield handler, controller.port
    finally:
        handler.stall_data = False
        controller.stop()


# -- settings, DNS and the runner ----------------------------------------------------------------


@pytest.fixture
def dns(dns_server: DnsServer) -> DnsServer:  # noqa: F811 - the knotd of tests/dnsserver.py
    return dns_server


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def configure(
    env: MailEnv, dns: DnsServer, *, relay: dict[str, object] | None = None, **outbound: object
) -> Settings:
    """Write ``env``'s config with [dns] and [outbound] sections; the loaded settings."""
    lines = [
        'hostname = "mail.example.test"',
        f"data_dir = {_toml(env.data_dir)}",
        "[dns]",
        f"nameservers = {_toml([dns.address])}",
        "[outbound]",
        "mta_sts = false",
        "connect_timeout_seconds = 5",
        "command_timeout_seconds = 20",
    ]
    lines += [f"{k} = {_toml(v)}" for k, v in outbound.items() if k != "mta_sts"]
    if "mta_sts" in outbound:
        lines[lines.index("mta_sts = false")] = f"mta_sts = {_toml(outbound['mta_sts'])}"
    if relay:
        lines += ["[outbound.relay]", *(f"{k} = {_toml(v)}" for k, v in relay.items())]
    env.config.write_text("\n".join(lines) + "\n")
    return load_settings(env.config)


def zone(dns: DnsServer, origin: str, *records: str) -> None:
    """Publish ``origin`` with zone-file ``records`` (names relative to the origin)."""
    dns.set_zone(origin, list(records))


def run(settings: Settings, clock: Clock) -> int:
    with Accounts(settings.auth_db) as accounts:
        runner = Runner(settings, accounts, Queue(settings.queue_dir), now=clock)
        return asyncio.run(runner.run())


def enqueue(settings: Settings, recipients: list[str], data: bytes, now: float = T0,
            sender: str = SENDER) -> str:  # fmt: skip
    return Queue(settings.queue_dir).enqueue(sender, recipients, data, now)


def queued(settings: Settings, queue_id: str) -> QueuedMessage:
    return Queue(settings.queue_dir).load(queue_id)


def inbox(env: MailEnv, address: str = SENDER) -> list[EmailMessage]:
    parser = BytesParser(EmailMessage, policy=email.policy.default)
    return [parser.parsebytes(p.read_bytes()) for p in env.new_messages(address)]


def delivery_status(report: EmailMessage) -> list[dict[str, str]]:
    """The per-recipient blocks of a DSN's message/delivery-status part."""
    part = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    raw = part.as_bytes().split(b"\n\n", 1)[1].decode().replace("\r\n", "\n")
    blocks = [b for b in raw.strip().split("\n\n") if b.strip()]
    parsed = []
    for block in blocks[1:]:
        fields: dict[str, str] = {}
        for line in block.replace("\n ", " ").splitlines():
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        parsed.append(fields)
    return parsed


def body_of(stored: bytes) -> bytes:
    """The body of a message as Postfix stored it (LF), with CRLF line ends again."""
    return stored.split(b"\n\n", 1)[1].replace(b"\n", b"\r\n")


# -- direct delivery to a real Postfix ---------------------------------------------------------


def test_delivers_to_postfix_over_starttls_by_mx_preference(
    mail_env: MailEnv, dns: DnsServer, postfix: postfix_peer.PostfixPeer
) -> None:
    # The preferred MX (127.0.0.2) refuses connections: the runner falls back to the next.
    zone(dns, "remote.test",
         "@ 300 IN MX 10 down.remote.test.", "@ 300 IN MX 20 mx.remote.test.",
         "down 300 IN A 127.0.0.2", "mx 300 IN A 127.0.0.1")  # fmt: skip
    settings = configure(mail_env, dns, smtp_port=postfix.port)
    queue_id = enqueue(settings, ["bob@remote.test"], message())
    assert run(settings, Clock()) == 1
    (stored,) = postfix.messages("bob@remote.test")
    assert body_of(stored) == BODY
    assert b"Return-Path: <alice@example.test>" in stored
    assert b"Subject: Hello" in stored
    assert b"using TLSv1" in stored  # opportunistic STARTTLS (certificate not checked)
    assert b"from mail.example.test (localhost [127.0.0.1])" in stored  # our EHLO name
    assert not Queue(settings.queue_dir).list()
    with pytest.raises(Exception, match="no such message"):
        queued(settings, queue_id)
    assert not inbox(mail_env)  # no bounce


def test_5xx_from_postfix_bounces_into_the_local_senders_inbox(
    mail_env: MailEnv, dns: DnsServer, postfix: postfix_peer.PostfixPeer
) -> None:
    zone(dns, "remote.test", "@ 300 IN MX 10 mx.remote.test.", "mx 300 IN A 127.0.0.1")
    settings = configure(mail_env, dns, smtp_port=postfix.port)
    data = message(subject="Partly")
    before = len(postfix.messages("bob@remote.test", timeout=0))
    enqueue(settings, ["bob@remote.test", "nobody@remote.test"], data)
    run(settings, Clock())
    assert len(postfix.messages("bob@remote.test")) == before + 1  # one transaction, one copy
    assert not Queue(settings.queue_dir).list()
    (report,) = inbox(mail_env)
    raw = mail_env.new_messages(SENDER)[0].read_bytes()
    assert raw.startswith(b"Return-Path: <>\n")
    assert report["To"].addresses[0].addr_spec == SENDER
    assert "MAILER-DAEMON@mail.example.test" in report["From"]
    assert report["Auto-Submitted"] == "auto-replied"
    assert report.get_content_type() == "multipart/report"
    (block,) = delivery_status(report)
    assert block["final-recipient"] == "rfc822; nobody@remote.test"
    assert block["action"] == "failed"
    assert block["status"] == "5.1.1"
    assert block["remote-mta"] == "dns; mx.remote.test"
    assert block["diagnostic-code"].startswith("smtp; 550 5.1.1 <nobody@remote.test>")
    headers = next(p for p in report.walk() if p.get_content_type() == "text/rfc822-headers")
    assert b"Subject: Partly" in headers.as_bytes()
    assert b"Bye" not in headers.as_bytes()  # the header only, never the body


# -- scripted failures ---------------------------------------------------------------------------


def test_451_is_deferred_and_retried_on_schedule(
    mail_env: MailEnv, dns: DnsServer, scripted: tuple[ScriptedHandler, int]
) -> None:
    handler, port = scripted
    handler.rcpt_replies = ["451 4.3.0 Greylisted, try again later"]
    zone(dns, "grey.test", "@ 300 IN MX 10 mx.grey.test.", "mx 300 IN A 127.0.0.1")
    settings = configure(mail_env, dns, smtp_port=port, retry_schedule_seconds=[60, 300])
    queue_id = enqueue(settings, ["bob@grey.test"], message("bob@grey.test"))
    clock = Clock()
    run(settings, clock)
    (rcpt,) = queued(settings, queue_id).recipients
    assert rcpt.state == RecipientState.DEFERRED
    assert rcpt.attempts == 1
    assert rcpt.next_attempt == T0 + 60
    assert rcpt.last_error == "451 4.3.0 Greylisted, try again later"
    assert rcpt.remote_mta == "mx.grey.test"
    assert handler.received == []

    clock.time = T0 + 59  # not due yet: no connection
    hellos = handler.hellos
    assert run(settings, clock) == 0
    assert handler.hellos == hellos

    clock.time = T0 + 60
    run(settings, clock)
    (got,) = handler.received
    assert got.sender == SENDER and got.recipients == ["bob@grey.test"]
    assert got.data == message("bob@grey.test")
    assert not Queue(settings.queue_dir).list()
    assert not inbox(mail_env)


def test_delay_warning_once_then_give_up_bounces_with_the_last_error(
    mail_env: MailEnv, dns: DnsServer, scripted: tuple[ScriptedHandler, int]
) -> None:
    handler, port = scripted
    handler.rcpt_replies = ["452 4.2.2 Mailbox full"] * 10
    zone(dns, "full.test", "@ 300 IN MX 10 mx.full.test.", "mx 300 IN A 127.0.0.1")
    settings = configure(
        mail_env, dns, smtp_port=port, retry_schedule_seconds=[100],
        retry_interval_seconds=100, delay_warning_seconds=150, give_up_seconds=600,
    )  # fmt: skip
    queue_id = enqueue(settings, ["bob@full.test"], message("bob@full.test"))
    clock = Clock()
    for step in (0, 100, 200, 300):
        clock.time = T0 + step
        run(settings, clock)
    assert queued(settings, queue_id).delay_warned
    (warning,) = inbox(mail_env)
    assert warning["Subject"].startswith("Delayed Mail")
    (block,) = delivery_status(warning)
    assert block["action"] == "delayed" and block["status"] == "4.2.2"
    assert "will-retry-until" in block

    clock.time = T0 + 600  # the give-up time
    run(settings, clock)
    assert not Queue(settings.queue_dir).list()
    warning, report = sorted(inbox(mail_env), key=lambda m: m["Subject"] != warning["Subject"])
    assert report["Subject"] == "Undelivered Mail Returned to Sender"
    (block,) = delivery_status(report)
    assert block["action"] == "failed"
    assert block["status"] == "5.4.7"  # delivery time expired
    assert block["diagnostic-code"] == "smtp; 452 4.2.2 Mailbox full"


@pytest.mark.parametrize(
    ("records", "domain", "status", "diagnostic"),
    [
        (["@ 300 IN MX 0 .", "@ 300 IN A 127.0.0.1"], "dead.test", "5.1.10", "null MX"),
        (["@ 300 IN A 127.0.0.1"], "missing.dead.test", "5.1.2", "does not exist"),
        (["@ 300 IN MX 10 nohost.dead.test."], "dead.test", "5.4.4", "No address"),
    ],
    ids=["null-mx", "nxdomain", "mx-without-address"],
)
def test_undeliverable_domains_fail_at_once_without_connecting(
    mail_env: MailEnv,
    dns: DnsServer,
    scripted: tuple[ScriptedHandler, int],
    records: list[str],
    domain: str,
    status: str,
    diagnostic: str,
) -> None:
    handler, port = scripted
    zone(dns, "dead.test", *records)
    settings = configure(mail_env, dns, smtp_port=port)
    enqueue(settings, [f"bob@{domain}"], message(f"bob@{domain}"))
    run(settings, Clock())
    assert handler.hellos == 0
    assert not Queue(settings.queue_dir).list()
    (report,) = inbox(mail_env)
    (block,) = delivery_status(report)
    assert block["status"] == status
    assert diagnostic in block["diagnostic-code"]


def test_bounce_to_a_remote_sender_is_queued_with_the_null_sender_and_sent_in_the_same_run(
    mail_env: MailEnv, dns: DnsServer, scripted: tuple[ScriptedHandler, int]
) -> None:
    handler, port = scripted
    handler.rcpt_replies = ["550 5.1.1 No such user"]
    zone(dns, "remote.test", "@ 300 IN MX 10 mx.remote.test.", "mx 300 IN A 127.0.0.1")
    zone(dns, "elsewhere.test", "@ 300 IN MX 10 mx.elsewhere.test.",
         "mx 300 IN A 127.0.0.1")  # fmt: skip
    settings = configure(mail_env, dns, smtp_port=port)
    enqueue(settings, ["nobody@remote.test"], message("nobody@remote.test"),
            sender="carol@elsewhere.test")  # fmt: skip
    assert run(settings, Clock()) == 2  # the message, then its bounce
    (bounce,) = handler.received
    assert bounce.sender in ("", "<>") and bounce.recipients == ["carol@elsewhere.test"]
    assert b"Final-Recipient: rfc822; nobody@remote.test" in bounce.data
    assert not Queue(settings.queue_dir).list()


# -- MTA-STS -------------------------------------------------------------------------------------


class _PolicyHandler(http.server.BaseHTTPRequestHandler):
    policy = b""

    def do_GET(self) -> None:
        if self.path != "/.well-known/mta-sts.txt":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(self.policy)))
        self.end_headers()
        self.wfile.write(self.policy)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def policy_server(ca: CertAuthority) -> Iterator[tuple[type[_PolicyHandler], int]]:
    handler = type("Policy", (_PolicyHandler,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    context = ca.server_context("mta-sts.sts.test")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield handler, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _sts_policy(mx: str) -> bytes:
    return f"version: STSv1\r\nmode: enforce\r\nmx: {mx}\r\nmax_age: 86400\r\n".encode()


def _sts_zone(dns: DnsServer) -> None:
    zone(dns, "sts.test",
         "@ 300 IN MX 10 mx.sts.test.", "mx 300 IN A 127.0.0.1",
         "mta-sts 300 IN A 127.0.0.1", '_mta-sts 300 IN TXT "v=STSv1; id=20261124"')  # fmt: skip


def test_mta_sts_enforce_delivers_only_with_a_valid_certificate(
    mail_env: MailEnv, dns: DnsServer, postfix: postfix_peer.PostfixPeer,
    policy_server: tuple[type[_PolicyHandler], int], ca: CertAuthority,
) -> None:  # fmt: skip
    handler, https_port = policy_server
    handler.policy = _sts_policy("mx.sts.test")
    _sts_zone(dns)
    settings = configure(mail_env, dns, smtp_port=postfix.port, mta_sts=True,
                         mta_sts_port=https_port, ca_file=ca.cert)  # fmt: skip
    enqueue(settings, ["bob@sts.test"], message("bob@sts.test"))
    run(settings, Clock())
    (stored,) = postfix.messages("bob@sts.test")
    assert body_of(stored) == BODY and b"using TLSv1" in stored
    assert not Queue(settings.queue_dir).list()


def test_mta_sts_enforce_with_a_mismatching_mx_defers_without_connecting(
    mail_env: MailEnv, dns: DnsServer, scripted: tuple[ScriptedHandler, int],
    policy_server: tuple[type[_PolicyHandler], int], ca: CertAuthority,
) -> None:  # fmt: skip
    smtp, port = scripted
    handler, https_port = policy_server
    handler.policy = _sts_policy("mx.elsewhere.test")
    _sts_zone(dns)
    settings = configure(mail_env, dns, smtp_port=port, mta_sts=True,
                         mta_sts_port=https_port, ca_file=ca.cert)  # fmt: skip
    queue_id = enqueue(settings, ["bob@sts.test"], message("bob@sts.test"))
    run(settings, Clock())
    (rcpt,) = queued(settings, queue_id).recipients
    assert rcpt.state == RecipientState.DEFERRED
    assert "4.7.5" in rcpt.last_error and "MTA-STS" in rcpt.last_error
    assert smtp.hellos == 0 and smtp.mails == []


def test_mta_sts_enforce_never_sends_in_plaintext(
    mail_env: MailEnv, dns: DnsServer, scripted: tuple[ScriptedHandler, int],
    policy_server: tuple[type[_PolicyHandler], int], ca: CertAuthority,
) -> None:  # fmt: skip
    smtp, port = scripted  # matches the policy, but offers no STARTTLS
    handler, https_port = policy_server
    handler.policy = _sts_policy("mx.sts.test")
    _sts_zone(dns)
    settings = configure(mail_env, dns, smtp_port=port, mta_sts=True,
                         mta_sts_port=https_port, ca_file=ca.cert)  # fmt: skip
    queue_id = enqueue(settings, ["bob@sts.test"], message("bob@sts.test"))
    run(settings, Clock())
    (rcpt,) = queued(settings, queue_id).recipients
    assert rcpt.state == RecipientState.DEFERRED
    assert "STARTTLS" in rcpt.last_error
    assert smtp.mails == [] and smtp.received == []


# -- smarthost -----------------------------------------------------------------------------------


@pytest.fixture
def smarthost(
    ca: CertAuthority, request: pytest.FixtureRequest
) -> Iterator[tuple[ScriptedHandler, int]]:
    """aiosmtpd requiring TLS (STARTTLS, or implicit with param "implicit") and AUTH."""
    implicit = getattr(request, "param", "starttls") == "implicit"
    handler = ScriptedHandler()
    context = ca.server_context("localhost", "127.0.0.1")

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                      auth_data: Any) -> AuthResult:  # fmt: skip
        ok = isinstance(auth_data, LoginPassword) and (
            auth_data.login == b"alice-relay" and auth_data.password == PASSWORD.encode()
        )
        # handled=False: aiosmtpd answers 535 itself (it stays silent with the default).
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    # aiosmtpd 1.4.6 counts only STARTTLS as TLS for auth_require_tls: with implicit TLS
    # every byte is encrypted anyway.
    options: dict[str, Any] = {"ssl_context": context, "auth_require_tls": False} if implicit \
        else {"tls_context": context, "require_starttls": True, "auth_require_tls": True}  # fmt: skip
    controller = Controller(
        handler, hostname="127.0.0.1", port=free_port(), auth_required=True,
        authenticator=authenticator, **options,
    )  # fmt: skip
    controller.start()
    try:
        yield handler, controller.port
    finally:
        controller.stop()


@pytest.mark.parametrize("smarthost", ["starttls", "implicit"], indirect=True)
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_smarthost_with_tls_and_auth(
    mail_env: MailEnv, dns: DnsServer, smarthost: tuple[ScriptedHandler, int], ca: CertAuthority,
    request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    handler, port = smarthost
    password_file = mail_env.root / "relay-password"
    password_file.write_text(PASSWORD + "\n")
    tls = request.node.callspec.params["smarthost"]
    relay = {"host": "localhost", "port": port, "tls": tls, "username": "alice-relay",
             "password_file": password_file}  # fmt: skip
    # No DNS records at all for remote.test: a smarthost needs none.
    settings = configure(mail_env, dns, ca_file=ca.cert, relay=relay)
    enqueue(settings, ["bob@remote.test", "carol@other.test"], message())
    run(settings, Clock())
    (got,) = handler.received  # both domains through the smarthost
    # aiosmtpd 1.4.6 sets session.ssl only after STARTTLS; port "implicit" speaks TLS only.
    assert (got.tls or tls == "implicit") and got.login == "alice-relay"
    assert got.sender == SENDER
    assert got.data == message()
    assert not Queue(settings.queue_dir).list()


def test_smarthost_refusing_the_password_defers(
    mail_env: MailEnv,
    dns: DnsServer,
    smarthost: tuple[ScriptedHandler, int],
    ca: CertAuthority,
) -> None:
    handler, port = smarthost
    password_file = mail_env.root / "relay-password"
    password_file.write_text("wrong\n")
    relay = {"host": "localhost", "port": port, "username": "alice-relay",
             "password_file": password_file}  # fmt: skip
    settings = configure(mail_env, dns, ca_file=ca.cert, relay=relay)
    queue_id = enqueue(settings, ["bob@remote.test"], message())
    run(settings, Clock())
    (rcpt,) = queued(settings, queue_id).recipients
    assert rcpt.state == RecipientState.DEFERRED
    assert "535" in rcpt.last_error and "wrong" not in rcpt.last_error
    assert handler.received == []


def test_smarthost_certificate_is_verified(
    mail_env: MailEnv, dns: DnsServer, smarthost: tuple[ScriptedHandler, int]
) -> None:
    handler, port = smarthost  # its CA is not in ca_file (the system's bundle)
    password_file = mail_env.root / "relay-password"
    password_file.write_text(PASSWORD)
    relay = {"host": "localhost", "port": port, "username": "alice-relay",
             "password_file": password_file}  # fmt: skip
    settings = configure(mail_env, dns, relay=relay)
    queue_id = enqueue(settings, ["bob@remote.test"], message())
    run(settings, Clock())
    (rcpt,) = queued(settings, queue_id).recipients
    assert rcpt.state == RecipientState.DEFERRED
    assert "certificate" in rcpt.last_error
    assert handler.mails == []


# -- crash safety --------------------------------------------------------------------------------


def test_kill_9_during_data_keeps_the_message_queued(
    mail_env: MailEnv, dns: DnsServer, scripted: tuple[ScriptedHandler, int]
) -> None:
    handler, port = scripted
    handler.stall_data = True  # the whole message arrives, the 250 never does
    zone(dns, "remote.test", "@ 300 IN MX 10 mx.remote.test.", "mx 300 IN A 127.0.0.1")
    settings = configure(mail_env, dns, smtp_port=port)
    now = time.time()
    queue_id = enqueue(settings, ["bob@remote.test"], message(), now=now)
    env = mail_env.environ()
    proc = subprocess.Popen([str(BIN / "mailroom-deliver")], env=env,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        assert handler.data_started.wait(30), "the runner never reached DATA"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (rcpt,) = queued(settings, queue_id).recipients
    assert rcpt.state == RecipientState.PENDING and rcpt.attempts == 0  # not "delivered"

    handler.stall_data = False
    done = subprocess.run([str(BIN / "mailroom-deliver")], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"{queue_id} to=<bob@remote.test>" in done.stderr  # the attempt is logged
    (got,) = handler.received
    assert got.data == message()
    assert not Queue(settings.queue_dir).list()


def test_bad_config_exits_78(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('hostname = "not a host name"\n')
    done = subprocess.run([str(BIN / "mailroom-deliver")],
                          env=dict(os.environ, CONFIG_PATH=str(config)),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 78
    assert "hostname" in done.stderr


# -- mailroomctl queue ... ----------------------------------------------------------------------


def test_ctl_functions(
    mail_env: MailEnv, dns: DnsServer, scripted: tuple[ScriptedHandler, int]
) -> None:
    handler, port = scripted
    handler.rcpt_replies = ["451 4.3.0 Later"] * 2
    zone(dns, "remote.test", "@ 300 IN MX 10 mx.remote.test.", "mx 300 IN A 127.0.0.1")
    settings = configure(mail_env, dns, smtp_port=port)
    first = enqueue(settings, ["bob@remote.test"], message(subject="First"))
    second = enqueue(settings, ["bob@remote.test"], message(subject="Second"), now=T0 + 1)
    run(settings, Clock(T0 + 1))
    rows = deliver.queue_rows(settings)
    assert [r["id"] for r in rows] == [first, second]
    assert rows[0]["sender"] == SENDER
    assert rows[0]["recipients"][0]["state"] == "deferred"
    assert rows[0]["recipients"][0]["last_error"] == "451 4.3.0 Later"

    deliver.delete(settings, second)
    assert [r["id"] for r in deliver.queue_rows(settings)] == [first]
    assert deliver.flush(settings) == 1
    assert queued(settings, first).recipients[0].next_attempt == 0

    deliver.bounce(settings, first, now=lambda: T0 + 10)
    assert deliver.queue_rows(settings) == []
    (report,) = inbox(mail_env)
    (block,) = delivery_status(report)
    assert block["action"] == "failed" and block["diagnostic-code"] == "smtp; 451 4.3.0 Later"
