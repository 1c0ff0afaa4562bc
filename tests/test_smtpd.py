"""mailroom-smtpd over real sockets: delivery, relay refusal, smuggling, STARTTLS, limits."""

from __future__ import annotations

import random
import smtplib
import socket
import ssl
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import Certificate, MailEnv, Server
from tests.smtpclient import SMTPConversation, run_transcript

MESSAGE = (
    b"From: Sender <sender@elsewhere.test>\r\n"
    b"To: alice@example.test\r\n"
    b"Subject: hello\r\n"
    b"Message-ID: <1@elsewhere.test>\r\n"
    b"\r\n"
    b"First line.\r\n"
    b"..a line that starts with a dot\r\n"
    b"Last line.\r\n"
)


def session(
    conv: SMTPConversation, rcpts: list[str], sender: str = "sender@elsewhere.test"
) -> None:
    conv.hello()
    conv.transaction(rcpts, sender, data=False)


def test_ehlo_advertises_extensions(smtpd: Server) -> None:
    with SMTPConversation(smtpd.port) as conv:
        assert conv.last().startswith("220 mail.example.test ESMTP")
        conv.line("EHLO client.test")
        lines = conv.reply()
    keywords = {line[4:].split()[0] for line in lines[1:]}
    assert {
        "SIZE",
        "8BITMIME",
        "SMTPUTF8",
        "PIPELINING",
        "ENHANCEDSTATUSCODES",
        "STARTTLS",
    } <= keywords
    assert "AUTH" not in keywords
    assert "250-SIZE 26214400" in lines


def test_delivery_exact_bytes(smtpd: Server, mail_env: MailEnv) -> None:
    with SMTPConversation(smtpd.port) as conv:
        session(conv, ["alice@example.test"])
        conv.expect("DATA", "354 ")
        conv.send(MESSAGE + b".\r\n")
        reply = conv.last()
        assert reply.startswith("250 2.0.0 Ok: delivered as ")
        queue_id = reply.split()[-1]
    [path] = mail_env.new_messages("alice@example.test")
    data = path.read_bytes()
    head, _, body = data.partition(b"\nFrom: ")
    # RFC 5321 4.4: Return-Path first; RFC 8601 4: Authentication-Results above our Received.
    assert head.startswith(b"Return-Path: <sender@elsewhere.test>\nAuthentication-Results: ")
    assert b"\nReceived: from client.test ([127.0.0.1])\n" in head
    assert (
        f"by mail.example.test (mailroom) with ESMTP id {queue_id}\n\tfor <alice@example.test>;".encode()
        in head
    )
    expected = MESSAGE.replace(b"\r\n..a line", b"\r\n.a line").replace(b"\r\n", b"\n")
    assert b"From: " + body == expected
    lines = data.count(b"\n")
    assert f",S={len(data)},W={len(data) + lines}" in path.name


def test_swaks_plain_and_starttls(smtpd: Server, mail_env: MailEnv) -> None:
    base = [
        "swaks",
        "--server",
        f"127.0.0.1:{smtpd.port}",
        "--from",
        "x@elsewhere.test",
        "--h-Subject",
        "swaks",
    ]
    out = subprocess.run(
        [*base, "--to", "bob@example.test"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run(
        [*base, "--to", "bob@example.test", "--tls"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "TLS started" in out.stdout
    messages = [p.read_bytes() for p in mail_env.new_messages("bob@example.test")]
    assert len(messages) == 2
    assert sum(b"with ESMTPS id" in m for m in messages) == 1
    assert all(b"Subject: swaks" in m for m in messages)


def test_smtplib_starttls_aliases_each_delivered_once(smtpd: Server, mail_env: MailEnv) -> None:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", smtpd.port, timeout=15) as client:
        client.starttls(context=context)
        refused = client.sendmail(
            "sender@elsewhere.test",
            [
                "everyone@example.test",
                "team@example.test",
                "Alice+News@EXAMPLE.test",
                "dave@example.org",
            ],
            MESSAGE,
        )
    assert refused == {}
    for user in (
        "alice@example.test",
        "bob@example.test",
        "carol@example.test",
        "dave@example.org",
    ):
        [path] = mail_env.new_messages(user)
        assert b"with ESMTPS id" in path.read_bytes()
        assert b"\tfor <" not in path.read_bytes()  # several recipients: none named


def test_null_sender_accepted(smtpd: Server, mail_env: MailEnv) -> None:
    with smtplib.SMTP("127.0.0.1", smtpd.port, timeout=15) as client:
        client.sendmail("<>", ["carol@example.test"], MESSAGE)
    [path] = mail_env.new_messages("carol@example.test")
    assert path.read_bytes().startswith(b"Return-Path: <>\n")


@pytest.mark.parametrize(
    ("rcpt", "reply"),
    [
        ("someone@elsewhere.test", "550 5.7.1 Relaying denied*"),
        ("nobody@example.test", "550 5.1.1 *"),
        # the relay forms of nmap's smtp-open-relay and classic percent/bang/route hacks
        ("someone%elsewhere.test@example.test", "550 5.1.1 *"),
        ("elsewhere.test!someone@example.test", "550 5.1.1 *"),
        ("@example.test:someone@elsewhere.test", "550 5.7.1 *"),
        ('"someone@elsewhere.test"@example.test', "550 5.1.1 *"),
        ('"someone%elsewhere.test"@example.test', "550 5.1.1 *"),
        ("someone@elsewhere.test@example.test", "5?? *"),
        ("someone@[127.0.0.1]", "550 5.7.1 *"),
        ("alice@example.test.", "553 5.1.3 *"),
        ("../alice@example.test", "550 5.1.1 *"),
        ("alice@../example.test", "553 5.1.3 *"),
    ],
)
def test_recipients_never_relay(smtpd: Server, mail_env: MailEnv, rcpt: str, reply: str) -> None:
    run_transcript(
        smtpd.port,
        f"""
        S: 220 *
        C: EHLO client.test
        S: 250 *
        C: MAIL FROM:<x@elsewhere.test>
        S: 250 2.1.0 *
        C: RCPT TO:<{rcpt}>
        S: {reply}
        C: QUIT
        S: 221 *
        """,
    )


def test_disabled_user_and_transcript_errors(smtpd: Server, mail_env: MailEnv) -> None:
    with mail_env.accounts() as accounts:
        accounts.set_enabled("carol@example.test", False)
    run_transcript(
        smtpd.port,
        """
        S: 220 *
        C: MAIL FROM:<x@elsewhere.test>
        S: 503 5.5.1 *
        C: EHLO bad/helo
        S: 501 5.5.4 *
        C: EHLO client.test
        S: 250 HELP
        C: RCPT TO:<alice@example.test>
        S: 503 5.5.1 *
        C: MAIL FROM:<x@elsewhere.test>
        S: 250 2.1.0 *
        C: RCPT TO:<carol@example.test>
        S: 550 5.2.1 *
        C: DATA
        S: 503 5.5.1 *
        C: VRFY alice
        S: 252 2.5.0 *
        C: FROB
        S: 500 5.5.2 *
        C: RSET
        S: 250 2.0.0 *
        C: NOOP
        S: 250 2.0.0 *
        C: QUIT
        S: 221 2.0.0 *
        """,
    )


SMUGGLING = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r.\r",
    b"\r.\n",
    b"\r\n.\n",
    b"\r\n.\r",
    b"\r\n.\r\r\n",
    b"\r\n\x00.\r\n",
]


@pytest.mark.parametrize("ending", SMUGGLING, ids=[repr(e) for e in SMUGGLING])
def test_smuggling_rejected(smtpd: Server, mail_env: MailEnv, ending: bytes) -> None:
    smuggled = (
        b"MAIL FROM:<evil@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nSmuggled\r\n"
    )
    with SMTPConversation(smtpd.port) as conv:
        session(conv, ["alice@example.test"])
        conv.expect("DATA", "354 ")
        conv.send(b"Subject: a\r\n\r\nbody" + ending + smuggled + b".\r\n")
        assert conv.last().startswith("554 5.6.0 ")
        # the session is still in step: the smuggled commands were data, never executed
        conv.line("NOOP")
        assert conv.last().startswith("250 2.0.0")
    assert mail_env.new_messages("alice@example.test") == []
    assert mail_env.new_messages("bob@example.test") == []


def test_starttls_injection_and_envelope_reset(smtpd: Server) -> None:
    with SMTPConversation(smtpd.port) as conv:
        session(conv, [])
        # a command pipelined behind STARTTLS in the same packet must not run inside TLS
        conv.send(b"STARTTLS\r\nRCPT TO:<alice@example.test>\r\n")
        assert conv.last().startswith("220 ")
        conv.buffer = b""
        conv.starttls()
        conv.line("RCPT TO:<bob@example.test>")  # envelope and EHLO reset by STARTTLS
        assert conv.last().startswith("503 5.5.1")
        conv.line("EHLO client.test")
        lines = conv.reply()
        assert lines[-1] == "250 HELP" and not any("STARTTLS" in line for line in lines)
        conv.line("RCPT TO:<bob@example.test>")
        assert conv.last().startswith("503 5.5.1")  # MAIL FROM from before TLS is gone


def test_size_limits(mail_env: MailEnv, certificate: Certificate) -> None:
    from tests.conftest import write_config

    write_config(mail_env.root, certificate, message_size_limit=4096)
    server = Server(mail_env)
    try:
        with SMTPConversation(server.port) as conv:
            assert conv.last().startswith("220")
            assert "250-SIZE 4096" in conv.expect("EHLO client.test", "250 ")
            conv.expect("MAIL FROM:<x@elsewhere.test> SIZE=5000", "552 5.3.4")
            conv.transaction(["alice@example.test"])
            conv.send(b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 100 + b".\r\n")
            assert conv.last().startswith("552 5.3.4")
    finally:
        server.stop()
    assert mail_env.new_messages("alice@example.test") == []


def test_long_lines_bounded(smtpd: Server, mail_env: MailEnv) -> None:
    with SMTPConversation(smtpd.port) as conv:
        session(conv, ["alice@example.test"])
        conv.expect("DATA", "354 ")
        conv.send(b"Subject: long\r\n\r\n" + b"z" * 1001 + b"\r\n.\r\n")
        assert conv.last().startswith("500 5.5.2 Line too long")
        # a 10 MB command line without CRLF: read and discarded piecewise, then one error
        pid = smtpd.child_pids()[0]
        conv.send(b"A" * (10 * 1024 * 1024) + b"\r\n")
        assert conv.last().startswith("500 5.5.2")
        conv.line("NOOP")
        assert conv.last().startswith("250")
    rss_kib = int(
        next(
            line
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith("VmHWM")
        ).split()[1]
    )
    assert rss_kib < 80 * 1024, f"peak RSS {rss_kib} KiB"
    assert mail_env.new_messages("alice@example.test") == []


def test_the_longest_line_is_found_as_splitting_finds_it() -> None:
    """``_longest_line`` looks for a CRLF in stretches and splits only when one has none: for
    every limit it must say "too long" exactly when splitting the message does."""
    from mailroom.smtpd import _longest_line

    rnd = random.Random(5321)
    pieces = [b"\r\n", b"\r", b"\n", b"ab", b"x" * 997, b"x" * 998, b"x" * 999, b"x" * 2000]
    for _ in range(20_000):
        message = b"".join(rnd.choice(pieces) for _ in range(rnd.randrange(0, 12)))
        limit = rnd.choice([997, 998, 999, 1000, 3])
        exact = max(map(len, message.split(b"\r\n")))
        found = _longest_line(message, limit)
        assert (found > limit) == (exact > limit), (message, limit)
        if found > limit:
            assert found == exact


def test_recipient_limit(mail_env: MailEnv, certificate: Certificate) -> None:
    from tests.conftest import write_config

    with mail_env.accounts() as accounts:
        for i in range(12):
            accounts.add_user(f"u{i}@example.test", "long enough password")
    write_config(mail_env.root, certificate)
    with open(mail_env.config, "a") as f:
        f.write("[smtp]\nmax_recipients = 10\n")
    server = Server(mail_env)
    try:
        with SMTPConversation(server.port) as conv:
            session(conv, [f"u{i}@example.test" for i in range(10)])
            conv.line("RCPT TO:<u10@example.test>")
            assert conv.last().startswith("452 4.5.3")
    finally:
        server.stop()


def test_hop_count(smtpd: Server, mail_env: MailEnv) -> None:
    hops = b"".join(
        b"Received: from hop%d.test by x.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n" % i
        for i in range(51)
    )
    with SMTPConversation(smtpd.port) as conv:
        session(conv, ["alice@example.test"])
        conv.expect("DATA", "354 ")
        conv.send(hops + b"Subject: loop\r\n\r\nbody\r\n.\r\n")
        assert conv.last().startswith("554 5.4.6")
        conv.transaction(["alice@example.test"])
        conv.send(hops[: len(hops) // 51 * 50] + b"Subject: ok\r\n\r\nbody\r\n.\r\n")
        assert conv.last().startswith("250 2.0.0")
    assert len(mail_env.new_messages("alice@example.test")) == 1


def test_quota(smtpd: Server, mail_env: MailEnv) -> None:
    with mail_env.accounts() as accounts:
        accounts.set_quota("bob@example.test", 2000)
    with SMTPConversation(smtpd.port) as conv:
        session(conv, ["bob@example.test"])
        conv.expect("DATA", "354 ")
        conv.send(b"Subject: big\r\n\r\n" + (b"q" * 70 + b"\r\n") * 40 + b".\r\n")
        assert conv.last().startswith("552 5.2.2")
    assert mail_env.new_messages("bob@example.test") == []


def test_connections_per_ip(mail_env: MailEnv, certificate: Certificate) -> None:
    with open(mail_env.config, "a") as f:
        f.write("[smtp]\nmax_connections_per_ip = 3\n")
    server = Server(mail_env)
    time.sleep(0.5)  # let the server see the readiness probe's connection close
    try:
        convs = [SMTPConversation(server.port) for _ in range(3)]
        for conv in convs:
            assert conv.last().startswith("220 ")
        with SMTPConversation(server.port) as extra:
            assert extra.last().startswith("421 4.7.0")
        convs.pop().close()
        time.sleep(0.3)
        with SMTPConversation(server.port) as again:
            assert again.last().startswith("220 ")
        for conv in convs:
            conv.close()
    finally:
        server.stop()


def test_no_traceback_on_garbage(smtpd: Server) -> None:
    garbage = [
        b"\xff\xfe\r\n",
        b"MAIL FROM:<\xff@x.test>\r\n",
        b"EHLO \x00\r\n",
        b"MAIL FROM:<a@b.test> SIZE=abc\r\n",
        b"MAIL FROM:<a@b.test> FOO=BAR\r\n",
        b"RCPT TO:<\r\n",
        b"RCPT TO:<a@b@c>\r\n",
        b'MAIL FROM:"\r\n',  # email's parser raises IndexError on these two
        b"RCPT TO:<@\r\n",
        b"MAIL FROM:<a\rb@c.test>\r\n",
        b"RCPT TO:<\xc3\xa9@example.test>\r\n",
        b"AUTH PLAIN AGFsaWNlAHg=\r\n",
        b"GET / HTTP/1.1\r\n",
    ]
    with SMTPConversation(smtpd.port) as conv:
        assert conv.last().startswith("220")
        conv.line("EHLO client.test")
        conv.reply()
        for line in garbage:
            conv.send(line)
            reply = conv.last()
            assert reply[:1] in "245" and "Traceback" not in reply and "Error: (" not in reply, (
                line,
                reply,
            )
            if line in (b'MAIL FROM:"\r\n', b"RCPT TO:<@\r\n"):
                assert reply.startswith("5"), (line, reply)  # bad syntax, not a local error


def test_path_fast_path_parses_as_aiosmtpd() -> None:
    """MAIL/RCPT paths: the fast path gives aiosmtpd's answer for every input, odd ones too."""
    import random

    from aiosmtpd.smtp import SMTP

    from mailroom.smtpd import _SIMPLE_PATH, InboundSMTP

    theirs, ours = SMTP.__new__(SMTP), InboundSMTP.__new__(InboundSMTP)
    cases = [
        "<a@b.c>", "<a@b.c> SIZE=100 BODY=8BITMIME", "<a@b.c>SIZE=1", "<a@b.c>\t X", "<>",
        "< a@b.c >", "<a@b.c> (comment) X", "<a@b.c> X ", "<a..b@c>", "<.a@b>", "<a@-b>",
        "<a@b..c>", "<a@b.c.>", '<"x y"@c>', "<a@[1.2.3.4]>", "<@x,@y:a@b>", "a@b.c", "<a@b.c",
        "<Ü@ü.de>", "<a(c)@b>", "<a!#$%&'*+-/=?^_`{|}~@b>", "<a@b_c>",
    ]  # fmt: skip
    pieces = [*'ab.@<> \t(),"[]-_:;\\!Ü1', "SIZE=1", "a@b.c", "<a@b.c>"]
    rng = random.Random(7)
    cases += ["".join(rng.choices(pieces, k=rng.randint(1, 10))) for _ in range(30000)]

    def parsed(server: SMTP, case: str) -> object:
        try:
            return server._getaddr(case)
        except Exception:  # email's parser trips on some paths: ours calls them bad syntax
            return None, None

    for limit in (0, 3):
        theirs.local_part_limit = ours.local_part_limit = limit
        for case in cases:
            assert parsed(ours, case) == parsed(theirs, case), case
    assert sum(bool(_SIMPLE_PATH.fullmatch(case)) for case in cases) > 1000  # both paths ran


def _data_segments_received(sock: socket.socket) -> int:
    """Linux TCP_INFO tcpi_data_segs_in: how many segments with data this socket has received."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return int(struct.unpack_from("I", info, 152)[0])


def test_pipelined_replies_go_out_together_and_none_waits(smtpd: Server) -> None:
    """RFC 2920: replies to pipelined MAIL/RCPT are held while the next command is already
    there, and sent the moment the server would wait for the client."""
    with SMTPConversation(smtpd.port) as conv:
        conv.hello()
        assert isinstance(conv.sock, socket.socket)
        before = _data_segments_received(conv.sock)
        conv.send(
            b"MAIL FROM:<sender@elsewhere.test>\r\nRCPT TO:<alice@example.test>\r\n"
            b"RCPT TO:<nobody@example.test>\r\nRSET\r\nMAIL FROM:<sender@elsewhere.test>\r\n"
            b"RCPT TO:<alice@example.test>\r\nDATA\r\n"
        )
        codes = [conv.last()[:3] for _ in range(7)]
        assert codes == ["250", "250", "550", "250", "250", "250", "354"]
        time.sleep(0.2)  # anything sent on its own would be in by now
        assert _data_segments_received(conv.sock) - before == 1
        conv.send(MESSAGE + b".\r\n")
        assert conv.last().startswith("250 ")
        # Nothing more to read: the held reply goes out at once (a client waiting on it
        # must not wait for ever), also when part of the next command is already in.
        conv.send(b"MAIL FROM:<sender@elsewhere.test>\r\nRCPT TO:<alice@example.test>\r\nNO")
        assert [conv.last()[:3] for _ in range(2)] == ["250", "250"]
        conv.send(b"OP\r\n")
        assert conv.last().startswith("250 ")


def test_idle_timeout_starts_again_with_each_command_and_block_of_data(mail_env: MailEnv) -> None:
    """A session that sends nothing for the timeout is closed; each command and each block of
    DATA starts the timeout again (one timer per session whose deadline moves)."""
    import asyncio

    from mailroom.config import load_settings
    from mailroom.smtpd import InboundHandler, InboundSMTP

    timeout, pause = 0.6, 0.3

    async def reply(reader: asyncio.StreamReader) -> bytes:
        line = await reader.readline()
        while line[3:4] == b"-":
            line = await reader.readline()
        return line

    async def session() -> tuple[float, float]:
        settings = load_settings(mail_env.config)
        with mail_env.accounts() as accounts:
            handler = InboundHandler(settings, accounts)
            server = await asyncio.get_running_loop().create_server(
                lambda: InboundSMTP(handler, settings, None, timeout=timeout), "127.0.0.1", 0
            )
            async with server:
                port = server.sockets[0].getsockname()[1]
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                assert (await reply(reader)).startswith(b"220")
                start = time.monotonic()
                for command in (b"EHLO client.test", b"NOOP", b"NOOP", b"NOOP"):
                    await asyncio.sleep(pause)
                    writer.write(command + b"\r\n")
                    assert (await reply(reader)).startswith(b"250"), command
                writer.write(b"MAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
                for code in (b"250", b"250", b"354"):
                    assert (await reply(reader)).startswith(code)
                for _ in range(4):  # a slow client: blocks of data, each within the timeout
                    await asyncio.sleep(pause)
                    writer.write(b"Subject: slow\r\n")
                writer.write(b"\r\nbody\r\n.\r\n")
                assert (await reply(reader)).startswith(b"250")
                alive = time.monotonic() - start
                idle = time.monotonic()
                assert await reader.read() == b""  # closed for being idle
                closed_after = time.monotonic() - idle
                writer.close()
                return alive, closed_after

    alive, closed_after = asyncio.run(session())
    assert alive > 4 * timeout  # kept open well past one timeout by the commands and data
    assert timeout * 0.9 < closed_after < timeout + 1
    assert len(mail_env.new_messages("alice@example.test")) == 1
