"""Inbound MX (``mailroom-smtpd``, fd name ``smtp``): accept mail for local users, never relay.

Built on aiosmtpd. What this module adds to it and promises:

- RCPT is accepted only for local users and aliases (RFC 5321 3.6.2: no open relay, in
  any address form: percent hack, bang path, source route, quoted local part).
- DATA with a bare CR, a bare LF or a NUL is refused whole (SMTP smuggling, RFC 5321 2.3.8);
  aiosmtpd itself ends DATA only on ``<CRLF>.<CRLF>``.
- On port 25 (fd name ``smtp``, never on submission) the message is checked before anything
  is stored (``mailroom.authcheck``: SPF, DKIM, DMARC): forged ``Authentication-Results:``
  fields are removed and ours is added; policy rejects it (``550 5.7.1``), files it in the
  recipients' Junk folders, or delivers it. An optional DNSBL lookup starts at connect and
  refuses a listed client at MAIL FROM (``554 5.7.1``).
- The message is stored in every recipient's Maildir, fsync'd, before ``250`` is sent.
- Every reply carries an RFC 3463 enhanced status code; no exception text reaches a client.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import ipaddress
import itertools
import logging
import re
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

from mailroom import replies
from mailroom.accounts import Accounts, User
from mailroom.activation import Endpoint, Limits, serve
from mailroom.addresses import DOT_ATOM, Address, normalise_domain, parse_address
from mailroom.config import Settings
from mailroom.errors import (
    ConfigError,
    DeliveryError,
    InvalidNameError,
    MailroomError,
    QuotaExceededError,
)
from mailroom.maildir import Maildir, check_quota, deliver_all, to_lf
from mailroom.service import Sockets, run
from mailroom.threadpool import ThreadPool

if TYPE_CHECKING:
    from mailroom.authcheck import Checker, Verdict

log = logging.getLogger(__name__)

# RFC 5321 4.1.3 address literals, or a host name (underscores tolerated, as Postfix does).
_HELO_RE = re.compile(
    r"^(\[(\d{1,3}(\.\d{1,3}){3}|IPv6:[0-9A-Fa-f:.]{2,45})\]"
    r"|[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62}))*\.?)$"
)
_READ_LIMIT = 64 * 1024
_MESSAGE_ID = re.compile(rb"(?im)^message-id:[ \t]*(<[\x21-\x7e]{1,250}>)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HTTP = re.compile(rb"^[A-Z]{3,7} \S+ HTTP/\d")  # a request line, as IMAP and POP3 check
# A MAIL/RCPT path as nearly every client sends it: <dot-atom@host.name> and parameters after
# optional blanks (not a comment). Anything else goes to aiosmtpd's full RFC 5322 parser.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_SIMPLE_PATH = re.compile(
    rf"<({DOT_ATOM})@({_LABEL}(?:\.{_LABEL})*)>[ \t]*(?![ \t(])(.*)", re.DOTALL
)


_ID_PREFIX = secrets.token_hex(3).upper()
_ID_COUNTER = itertools.count(1)


def new_queue_id() -> str:
    """A short id for one accepted message (Received: and the logs): random per process, then a counter."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):06X}"


class InboundEnvelope(Envelope):  # type: ignore[misc]
    """aiosmtpd's envelope plus the mailboxes the recipients resolved to (each once)."""

    def __init__(self) -> None:
        super().__init__()
        self.mailboxes: dict[str, User] = {}


def _may_hold_reply(command: Callable[[Any, str | None], Awaitable[None]]) -> Any:
    """aiosmtpd's ``command`` (HELP text too), its reply held while the client's next command
    is already here (RFC 2920: the commands that may be pipelined; see ``InboundSMTP.push``)."""

    @functools.wraps(command)
    async def held(self: InboundSMTP, arg: str | None) -> None:
        self._holding = True
        try:
            await command(self, arg)
        finally:
            self._holding = False

    return held


class InboundSMTP(SMTP):  # type: ignore[misc]
    """aiosmtpd's protocol with mailroom's limits, reply codes and timeouts."""

    def __init__(
        self,
        handler: Any,
        settings: Settings,
        tls: ssl.SSLContext | None,
        *,
        timeout: float | None = None,
        inbound_auth: bool = False,
        **options: Any,
    ) -> None:
        """``options`` go to aiosmtpd (the submission server's AUTH settings).

        ``inbound_auth``: this is the port 25 listener, whose mail is checked (SPF, DKIM,
        DMARC, DNSBL); submission's is not.
        """
        self.settings = settings
        self.inbound_auth = inbound_auth and settings.inbound.checks
        self.checker: Checker | None = None  # made on the first message; one per session
        self.dnsbl: asyncio.Task[str] | None = None
        # The stream reader's limit also sets its flow control (pause above twice the limit):
        # a 1001-octet limit would pause and resume the socket every 2 KB of DATA. So the
        # reader gets 64 KiB (still bounded memory for a line without CRLF) and aiosmtpd
        # checks each command and DATA line against line_length_limit after reading it.
        self.line_length_limit = _READ_LIMIT
        self._plain_replies = False
        self._data_seen = False  # the first bytes may be an HTTP request
        self._held: list[bytes] = []  # replies not sent yet (see push)
        self._holding = False
        self._deadline = 0.0  # the idle timeout's (see _reset_timeout)
        super().__init__(
            handler,
            data_size_limit=settings.message_size_limit,
            enable_SMTPUTF8=True,
            hostname=settings.hostname,
            ident="ESMTP mailroom",
            tls_context=tls,
            timeout=timeout or settings.smtp.timeout_seconds,
            loop=asyncio.get_running_loop(),
            **options,
        )
        # aiosmtpd keeps command_size_limits on the class: every new session clears the dict
        # the others use (their EHLO extensions, submission's AUTH). One per session instead.
        self.command_size_limits: collections.defaultdict[str, int] = collections.defaultdict(
            lambda: SMTP.command_size_limit
        )
        # RFC 5321 4.5.3.1.6: 1000 octets per line including CRLF, plus the transparency dot.
        self.max_line_length = settings.smtp.max_line_length
        self.line_length_limit = self.max_line_length + 1

    def _create_envelope(self) -> InboundEnvelope:
        return InboundEnvelope()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's path parser, with a fast path for the plain ``<local@domain>`` form.

        aiosmtpd's builds a class and runs email's RFC 5322 parser on every MAIL and RCPT
        (~40 us, 7 % of port 25's CPU a message); the fast path gives the same answer. A path
        that makes email's parser raise is bad syntax, not a local error.
        """
        simple = _SIMPLE_PATH.fullmatch(arg)
        if simple is None:
            try:
                return super()._getaddr(arg)  # type: ignore[no-any-return]
            except Exception:  # email's parser trips on some (e.g. '"', '<@'): a syntax error
                return None, None
        local, domain, rest = simple.groups()
        if self.local_part_limit and len(local) > self.local_part_limit:
            return None, None
        return f"{local}@{domain}", rest

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        zones = self.settings.inbound.dnsbl_zones
        if self.inbound_auth and zones:
            peer = transport.get_extra_info("peername")
            if isinstance(peer, tuple) and peer:
                self.dnsbl = asyncio.get_running_loop().create_task(
                    _dnsbl_listing(self.settings, str(peer[0]), zones)
                )

    def connection_lost(self, error: Exception | None) -> None:
        if self.dnsbl is not None:
            self.dnsbl.cancel()
        super().connection_lost(error)

    def _reset_timeout(self, duration: float | None = None) -> None:
        """Start the idle timeout again (every command, every block of DATA). aiosmtpd makes
        a new timer each time; here the deadline moves and the one timer, firing before it,
        arms itself again for the rest."""
        deadline = self.loop.time() + (duration or self._timeout_duration)
        self._deadline = deadline
        handle = self._timeout_handle
        if handle is not None and not handle.cancelled() and handle.when() <= deadline:
            return
        if handle is not None:
            handle.cancel()
        self._timeout_handle = self.loop.call_at(deadline, self._timeout_cb)

    def _timeout_cb(self) -> None:
        if self.loop.time() < self._deadline:
            self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_cb)
        else:
            super()._timeout_cb()  # type: ignore[no-untyped-call]

    def data_received(self, data: bytes) -> None:
        if not self._data_seen:
            self._data_seen = True
            if _HTTP.match(data) and isinstance(self.transport, asyncio.WriteTransport):
                # A browser made to send a form here (a cross-protocol attack): hang up before
                # any line of it runs as a command. Postfix answers the same way.
                self.transport.write(b"521 5.5.1 This is an SMTP server, not HTTP\r\n")
                self.transport.close()
                return
        # RFC 5321 4.5.3.2.5/6: the timeout runs between blocks of data, not over the whole DATA.
        self._reset_timeout()
        super().data_received(data)

    async def push(self, status: str | bytes) -> None:
        """Send a reply; a reply to MAIL, RCPT or RSET waits while the client's next command
        is already here, to go out with the next one (RFC 2920 3.2: replies may be held until
        the server would wait for input). A pipelined message then costs one send, not three.
        """
        if isinstance(status, bytes):
            status = status.decode("utf-8", "replace")
        if not self._plain_replies:
            status = replies.with_enhanced_code(status)
        self._held.append(status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii") + b"\r\n")
        if self._holding and b"\n" in getattr(self._reader, "_buffer", b""):
            return
        held, self._held = b"".join(self._held), []
        log.debug("%r << %r", self.session and self.session.peer, held)  # as aiosmtpd logs it
        self._writer.write(held)
        await self._writer.drain()

    smtp_MAIL = _may_hold_reply(SMTP.smtp_MAIL)
    smtp_RCPT = _may_hold_reply(SMTP.smtp_RCPT)
    smtp_RSET = _may_hold_reply(SMTP.smtp_RSET)

    async def smtp_EHLO(self, hostname: str) -> None:
        await self._greet(super().smtp_EHLO, hostname)

    async def smtp_HELO(self, hostname: str) -> None:
        await self._greet(super().smtp_HELO, hostname)

    async def _greet(self, method: Any, hostname: str | None) -> None:
        if hostname and not _HELO_RE.match(hostname):
            await self.push(replies.BAD_HELO)
            return
        # RFC 2034: no enhanced codes in the replies to HELO and EHLO.
        self._plain_replies = True
        try:
            await method(hostname)
        finally:
            self._plain_replies = False

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """DATA, read in chunks rather than aiosmtpd's line by line (same replies, ~5x less CPU)."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        envelope = self.envelope
        assert envelope is not None
        if not envelope.rcpt_tos:
            await self.push("503 5.5.1 Need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        result = await read_data(self._reader, self.data_size_limit, self.max_line_length)
        if isinstance(result, str):
            status = result
        else:
            envelope.content = envelope.original_content = result
            status = await self._call_handler_hook("DATA")
        self.envelope = self._create_envelope()
        await self.push(status)

    async def smtp_VRFY(self, arg: str) -> None:
        # Never confirm or deny an address (RFC 5321 3.5.3 allows 252).
        await self.push("252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery")


async def read_data(
    reader: asyncio.StreamReader, size_limit: int | None, line_limit: int
) -> bytes | str:
    """The message of one DATA command, dot-unstuffed, or the error reply once it has ended.

    RFC 5321 4.1.1.4: the data ends at the first line that is a lone ".", i.e. at
    ``<CRLF>.<CRLF>`` where the DATA command's own CRLF counts as the first one. We read up to
    each ``.<CRLF>`` and look at the two octets before it, so nothing after the end is consumed:
    a pipelined command stays in the reader. Memory is bounded by ``size_limit`` plus one
    read-buffer; past the limit the data is read and dropped until the end (RFC 5321 4.2.5).
    """
    parts: list[bytes] = []
    before = b"\r\n"  # the last two octets read so far
    total = 0
    too_big = False
    while True:
        try:
            chunk = await reader.readuntil(b".\r\n")
        except asyncio.LimitOverrunError as err:
            chunk = await reader.read(err.consumed)
        total += len(chunk)
        if size_limit and total > size_limit + 3:
            too_big = True
            parts.clear()
        if not too_big:
            parts.append(chunk)
        if chunk.endswith(b".\r\n") and (before + chunk)[-5:-3] == b"\r\n":
            break
        before = (before + chunk)[-2:]
    if too_big:
        return "552 5.3.4 Message too big for this system"
    raw = b"".join(parts)[:-3]  # without the final ".<CRLF>"
    # RFC 5321 4.5.2: remove the transparency dot at the start of a line.
    message = raw.replace(b"\r\n.", b"\r\n")
    message = message[1:] if message.startswith(b".") else message
    # RFC 5321 4.5.3.1.6: a text line is at most 1000 octets including CRLF (not the dot).
    if _longest_line(message, line_limit - 2) + 2 > line_limit:
        return "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)"
    return message


def _longest_line(message: bytes, at_most: int) -> int:
    """The length of the longest CRLF-separated line of ``message`` (without its CRLF), or
    a number no greater than ``at_most`` when every line is that short.

    Splitting a 10 KiB message into its lines costs several times what a look for a CRLF
    in every ``at_most // 2``-octet stretch does: where each stretch has one, no line is
    longer than ``at_most``. Only when one has none is the message split.
    """
    stretch = max(at_most // 2, 1)
    find = message.find
    if all(find(b"\r\n", at, at + stretch + 1) >= 0 for at in range(0, len(message), stretch)):
        return min(at_most, len(message))
    return max(map(len, message.split(b"\r\n")))


class InboundHandler:
    """aiosmtpd handler hooks: each SMTP verb returns its reply."""

    def __init__(self, settings: Settings, accounts: Accounts) -> None:
        self.settings = settings
        self.accounts = accounts
        self._maildirs: dict[Address, Maildir] = {}
        # Blocking calls: deliveries (fsync waits on the disk, not the CPU: enough threads for
        # every session to wait at once lets the file system commit them together).
        self.threads = ThreadPool(16, "smtp")
        # pyspf and dkimpy are synchronous: they run here, their DNS on the event loop.
        self._check_executor: ThreadPoolExecutor | None = None
        self._warm_up: asyncio.Future[None] | None = None

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        self.warm_up(server)
        return [*responses[:-1], "250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]

    def warm_up(self, server: SMTP) -> None:
        """Import the checks' modules (dnspython, pyspf, dkimpy, the Public Suffix List) on a
        worker thread once the client has been greeted, so that the first message of a freshly
        started process does not wait for them at the end of DATA."""
        if self._warm_up is None and getattr(server, "inbound_auth", False):
            loop = asyncio.get_running_loop()
            self._warm_up = loop.run_in_executor(self.check_executor(), _import_checks)

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address != "<>" and (_CONTROL.search(address) or "@" not in address):
            return replies.BAD_SENDER
        self.warm_up(server)
        dnsbl = getattr(server, "dnsbl", None)
        if dnsbl is not None:
            listed = await dnsbl
            if listed:
                log.warning(
                    "MAIL from %s refused: %s",
                    _peer(session),
                    listed,
                    extra={"CLIENT_ADDR": _peer(session), "MAIL_ACTION": "reject"},
                )
                return replies.reply(554, "5.7.1", f"Service refused: {listed}")
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return replies.SENDER_OK

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: InboundEnvelope,
        address: str,
        options: list[str],
    ) -> str:
        reply, users = self.check_recipient(address)
        if not users:
            log.info(
                "RCPT %s refused: %s",
                _printable(address),
                reply,
                extra={"CLIENT_ADDR": _peer(session)},
            )
            return reply
        if len(envelope.rcpt_tos) >= self.settings.smtp.max_recipients:
            return replies.TOO_MANY_RECIPIENTS
        for user in users:
            if user.quota_bytes and self._maildir(user).usage_bytes() >= user.quota_bytes:
                return replies.MAILBOX_FULL
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        for user in users:
            envelope.mailboxes[str(user.address)] = user
        return replies.RECIPIENT_OK

    def check_recipient(self, address: str) -> tuple[str, list[User]]:
        """The reply for RCPT TO:<address> and, when accepted, the enabled mailboxes it reaches."""
        if _CONTROL.search(address) or address.startswith("@"):
            # A source route (RFC 5321 4.1.1.3 obsolete) is never followed.
            return replies.RELAY_DENIED, []
        localpart, at, domain = address.rpartition("@")
        if not at or not localpart:
            return replies.BAD_RECIPIENT, []
        try:
            domain = normalise_domain(domain)
        except InvalidNameError:
            return replies.RELAY_DENIED, []
        try:
            rcpt: Address | None = parse_address(f"{localpart}@{domain}")
        except InvalidNameError:
            rcpt = None  # quoted local parts, "%" and "!" forms: no such local user
        local, users = self.accounts.recipient(domain, rcpt)
        if not local:
            return replies.RELAY_DENIED, []
        enabled = [u for u in users if u.enabled]
        if not users:
            return replies.NO_SUCH_USER, []
        if not enabled:
            return replies.MAILBOX_DISABLED, []
        return replies.RECIPIENT_OK, enabled

    async def handle_DATA(self, server: SMTP, session: Session, envelope: InboundEnvelope) -> str:
        content: bytes = envelope.original_content or b""
        peer = _peer(session)
        if _has_bare_line_end_or_nul(content):
            log.warning("refused DATA with bare CR/LF or NUL", extra={"CLIENT_ADDR": peer})
            return replies.BARE_LINE_END
        if _count_received(content) > self.settings.smtp.max_received_headers:
            return replies.TOO_MANY_HOPS
        queue_id = new_queue_id()
        message_id = _message_id(content)
        header = self.trace_headers(server, session, envelope, queue_id)
        fields: dict[str, str] = {}
        junk = False
        if getattr(server, "inbound_auth", False):
            verdict = await self.authentication_verdict(server, session, envelope, content)
            if verdict is not None:
                fields = verdict.journal_fields()
                if verdict.action == "reject":
                    log.warning(
                        "%s rejected from=<%s> message-id=%s: %s",
                        queue_id,
                        _printable(envelope.mail_from or ""),
                        message_id,
                        verdict.summary(),
                        extra={"CLIENT_ADDR": peer, "QUEUE_ID": queue_id, **fields},
                    )
                    return replies.reply(
                        550, "5.7.1", f"Message rejected: {_printable(verdict.reason)}"
                    )
                junk = verdict.action == "junk"
                header = _with_authentication_results(header, verdict, self.settings.hostname)
                content = _strip_ours(content, self.settings.hostname, queue_id)
        message = header + content
        # The content has no bare CR (refused above): deleting its CRs is to_lf, and quicker.
        stored = to_lf(header) + content.translate(None, b"\r")
        users = list(envelope.mailboxes.values())
        targets = [
            (self._maildir(u), _junk_folder(self._maildir(u)) if junk else "") for u in users
        ]
        try:
            for (maildir, _), user in zip(targets, envelope.mailboxes.values(), strict=True):
                check_quota(maildir, user.quota_bytes, len(message))
            await self.threads.run(functools.partial(deliver_all, stored=stored), targets, message)
        except QuotaExceededError as err:
            log.info("%s refused: %s", queue_id, err, extra={"CLIENT_ADDR": peer})
            return replies.MESSAGE_TOO_BIG_FOR_MAILBOX
        except DeliveryError as err:
            log.error("%s not delivered: %s", queue_id, err, extra={"CLIENT_ADDR": peer})
            return replies.LOCAL_ERROR
        log.info(
            "%s delivered from=<%s> to %s%s size=%d message-id=%s%s",
            queue_id,
            _printable(envelope.mail_from or ""),
            ",".join(envelope.mailboxes),
            " (Junk)" if junk else "",
            len(message),
            message_id,
            f" {fields['MAIL_ACTION_REASON']}" if fields else "",
            extra={
                "CLIENT_ADDR": peer,
                "QUEUE_ID": queue_id,
                "MAIL_MESSAGE_ID": message_id,
                **fields,
            },
        )
        return f"250 2.0.0 Ok: delivered as {queue_id}"

    async def authentication_verdict(
        self, server: Any, session: Session, envelope: InboundEnvelope, content: bytes
    ) -> Verdict | None:
        """SPF, DKIM and DMARC of a message on port 25 and the action; None when the checks
        cannot run at all (a bad ``[inbound] nameservers``: logged)."""
        if self._warm_up is not None:
            await self._warm_up  # the imports below then find their modules loaded
        from mailroom.authcheck import Envelope as Origin

        checker: Checker | None = server.checker
        if checker is None:
            try:
                checker = server.checker = self.new_checker()
            except ConfigError as err:
                log.error("inbound checks off for this session: %s", err)
                server.inbound_auth = False
                return None
        mail_from = envelope.mail_from or ""
        origin = Origin(
            client_ip=_peer(session),
            helo=session.host_name or "",
            mail_from="" if mail_from == "<>" else mail_from,
        )
        return await checker.authenticate(content, origin)

    def new_checker(self) -> Checker:
        """A ``Checker`` for one SMTP session, with its own resolver (and answer cache)."""
        from mailroom.authcheck import Checker
        from mailroom.resolver import DEFAULT_TIMEOUT, Resolver

        inbound = self.settings.inbound
        resolver = Resolver(
            inbound.nameservers or self.settings.dns.nameservers,
            timeout=min(DEFAULT_TIMEOUT, inbound.dns_timeout_seconds),
        )
        return Checker(resolver, inbound, self.check_executor(), self.accounts.is_local_domain)

    def check_executor(self) -> ThreadPoolExecutor:
        """The threads pyspf and dkimpy run on (made on first use)."""
        if self._check_executor is None:
            self._check_executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="authcheck")
        return self._check_executor

    def trace_headers(
        self, server: SMTP, session: Session, envelope: Envelope, queue_id: str
    ) -> bytes:
        """``Return-Path:`` and ``Received:`` (RFC 5321 4.4), from validated values only."""
        helo = (
            session.host_name
            if session.host_name and _HELO_RE.match(session.host_name)
            else "unknown"
        )
        peer = _peer(session)
        proto = "UTF8SMTP" if envelope.smtp_utf8 else ("ESMTP" if session.extended_smtp else "SMTP")
        if session.ssl is not None:
            proto += "S"  # RFC 3848
        recipients = (
            "" if len(envelope.rcpt_tos) != 1 else f"\r\n\tfor <{_printable(envelope.rcpt_tos[0])}>"
        )
        date = _date_at(int(time.time()))
        sender = "" if envelope.mail_from == "<>" else _printable(envelope.mail_from or "")
        return (
            f"Return-Path: <{sender}>\r\n"
            f"Received: from {helo} ([{peer}])\r\n"
            f"\tby {self.settings.hostname} (mailroom) with {proto} id {queue_id}{recipients};\r\n"
            f"\t{date}\r\n"
        ).encode("utf-8", "surrogateescape")

    async def handle_exception(self, error: Exception) -> str:
        log.exception("error in SMTP session")
        return replies.LOCAL_ERROR

    def _maildir(self, user: User) -> Maildir:
        maildir = self._maildirs.get(user.address)
        if maildir is None:
            maildir = Maildir.for_address(
                self.settings.mail_root, user.address, self.settings.hostname
            )
            self._maildirs[user.address] = maildir
        return maildir


@functools.lru_cache(maxsize=1)
def _date_at(second: int) -> str:
    """The RFC 5322 date of ``second`` in local time (made once a second, not per message)."""
    return format_datetime(datetime.fromtimestamp(second, UTC).astimezone())


def _import_checks() -> None:
    from mailroom import authcheck

    authcheck.warm_up()


def _with_authentication_results(header: bytes, verdict: Verdict, authserv_id: str) -> bytes:
    """Our ``Authentication-Results:`` above the other trace fields we add (RFC 8601 4),
    below ``Return-Path:``, which RFC 5321 4.4 puts at the very beginning."""
    return_path, _, received = header.partition(b"\r\n")
    return return_path + b"\r\n" + verdict.header(authserv_id) + received


def _strip_ours(content: bytes, authserv_id: str, queue_id: str) -> bytes:
    """RFC 8601 5: the message without Authentication-Results fields that claim to be ours."""
    from mailroom.authcheck import strip_authentication_results

    stripped, count = strip_authentication_results(content, authserv_id)
    if count:
        log.info(
            "%s: removed %d forged Authentication-Results field(s) naming %s",
            queue_id,
            count,
            authserv_id,
            extra={"QUEUE_ID": queue_id},
        )
    return stripped


def _junk_folder(maildir: Maildir) -> str:
    """The Maildir++ folder holding the \\Junk special use (``Junk`` unless renamed)."""
    from mailroom.mailstore import folder_name, special_uses

    try:
        uses = special_uses(maildir.root)
    except OSError:
        return "Junk"
    for name, attr in uses.items():
        if attr == "\\Junk":
            try:
                return folder_name(name)
            except Exception:  # a name this version cannot map: the default folder
                break
    return "Junk"


async def _dnsbl_listing(settings: Settings, address: str, zones: list[str]) -> str:
    """Why ``address`` is refused (``"... listed by zone"``), or ``""``: DNSBL A lookups
    (RFC 5782 2.1, reversed address under each zone), all at once, within the DNS timeout."""
    from mailroom.resolver import DEFAULT_TIMEOUT, DnsTemporaryError, Resolver

    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return ""
    if ip.is_loopback or ip.is_private or ip.is_link_local:
        return ""
    inbound = settings.inbound
    try:
        resolver = Resolver(
            inbound.nameservers or settings.dns.nameservers,
            timeout=min(DEFAULT_TIMEOUT, inbound.dns_timeout_seconds),
        )
    except ConfigError as err:
        log.error("DNSBL lookups off: %s", err)
        return ""
    reverse = ip.reverse_pointer.removesuffix(".in-addr.arpa").removesuffix(".ip6.arpa")

    async def ask(zone: str) -> str:
        try:
            records = await resolver.records(f"{reverse}.{zone}", "A")
        except (DnsTemporaryError, MailroomError) as err:
            log.info("DNSBL %s: no answer for %s: %s", zone, address, err)
            return ""
        codes = [r.to_text() for r in records]
        # 127.255.255.0/24 answers are errors, not listings (e.g. Spamhaus refusing a query
        # that came through a public resolver).
        if any(c.startswith("127.255.255.") for c in codes):
            log.warning("DNSBL %s refused the query (%s): use your own resolver", zone, codes)
            return ""
        if any(c.startswith("127.") for c in codes):
            return f"{address} is listed by {zone}"
        return ""

    try:
        async with asyncio.timeout(inbound.dns_timeout_seconds):
            found = await asyncio.gather(*(ask(zone) for zone in zones))
    except TimeoutError:
        log.info("DNSBL lookups for %s timed out", address)
        return ""
    return next((why for why in found if why), "")


def _peer(session: Session) -> str:
    peer = session.peer
    return str(peer[0]) if isinstance(peer, tuple) and peer else "local"


def _printable(text: str) -> str:
    return _CONTROL.sub("?", text)


def _has_bare_line_end_or_nul(content: bytes) -> bool:
    """True if a CR or LF stands alone, or a NUL appears (RFC 5321 2.3.8, 4.1.1.4)."""
    crlf = content.count(b"\r\n")
    return content.count(b"\r") != crlf or content.count(b"\n") != crlf or b"\x00" in content


def _message_id(content: bytes) -> str:
    """The Message-ID of the message, for the logs ("" when it has none)."""
    end = content.find(b"\r\n\r\n")
    match = _MESSAGE_ID.search(content, 0, end if end >= 0 else len(content))
    return match.group(1).decode("ascii", "replace") if match else ""


def _count_received(content: bytes) -> int:
    """How many ``Received:`` fields the header section holds."""
    end = content.find(b"\r\n\r\n")
    head = content if end < 0 else content[: end + 2]
    return len(re.findall(rb"(?im)^received[ \t]*:", head))


ENDPOINT_NAMES = ("smtp",)


def endpoints(settings: Settings, accounts: Accounts) -> dict[str, Endpoint]:
    from mailroom.tls import ServerTLS

    handler = InboundHandler(settings, accounts)
    tls = ServerTLS.for_smtp(settings)  # None per connection while no pair loads: no STARTTLS
    busy = (replies.TOO_MANY_CONNECTIONS + "\r\n").encode()
    endpoint = Endpoint(
        lambda: InboundSMTP(handler, settings, tls.context(), inbound_auth=True), busy
    )
    return dict.fromkeys(ENDPOINT_NAMES, endpoint)


async def _serve(settings: Settings, accounts: Accounts, sockets: Sockets) -> None:
    await serve(
        endpoints(settings, accounts),
        sockets,
        limits=Limits(settings.smtp.max_connections, settings.smtp.max_connections_per_ip),
        idle_exit_seconds=settings.idle_exit_seconds,
        shutdown_grace_seconds=settings.shutdown_grace_seconds,
    )


def main() -> int:
    """Entry point of ``mailroom-smtpd``."""
    return run("mailroom-smtpd", _serve, workers=lambda s: s.smtp, one_cpu_each=True)
