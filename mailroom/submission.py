"""Message submission (``mailroom-submission``, fd names ``submission``: 587 with STARTTLS,
``submissions``: 465 implicit TLS): authenticated users send mail.

Built on the inbound server's aiosmtpd protocol (``smtpd.InboundSMTP``: limits, reply codes,
the chunked DATA reader). What this module adds and promises:

- TLS first: on 587 every command but EHLO/STARTTLS/NOOP/QUIT waits for STARTTLS, and AUTH
  (PLAIN, LOGIN; RFC 4954) is offered and accepted only over TLS. MAIL, RCPT and DATA
  without AUTH get ``530 5.7.0``. Failed logins are throttled like IMAP's and POP3's.
- The envelope sender and every ``From:`` address must be the user's: their address, one of
  its plus-addresses, or an alias (not a catch-all) that delivers to them; otherwise
  ``550 5.7.1`` saying which address and why.
- The message gets ``Message-ID:`` and ``Date:`` when it has none, loses ``Bcc:``, gets a
  ``Received:`` that names the client's address only if configured, and is DKIM-signed
  (``mailroom.dkim``) with the keys of the From: domain.
- Local recipients are delivered into their Maildir, remote ones written into the outbound
  queue (``mailroom.queue``); both fsync'd before ``250``. The queue runner is started by
  systemd's ``mailroom-deliver.path`` when the queue changes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import re
import secrets
import ssl
import time
from datetime import UTC, datetime
from email.utils import format_datetime, getaddresses
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session

from mailroom import replies
from mailroom.accounts import Accounts, User
from mailroom.activation import Endpoint, Limits, serve
from mailroom.addresses import normalise_domain, parse_address
from mailroom.config import Settings
from mailroom.errors import DeliveryError, InvalidNameError, MailroomError, QuotaExceededError
from mailroom.maildir import check_quota, deliver_all
from mailroom.queue import Queue
from mailroom.service import Sockets, run
from mailroom.smtpd import (
    InboundEnvelope,
    InboundHandler,
    InboundSMTP,
    _has_bare_line_end_or_nul,
    _message_id,
    _peer,
    _printable,
    new_queue_id,
)
from mailroom.throttle import AuthThrottle, TooManyFailures, throttled

if TYPE_CHECKING:
    from mailroom.dkim import DkimKey  # dkimpy and dnspython load on the first signature

log = logging.getLogger(__name__)

ENDPOINT_NAMES = ("submission", "submissions")
AUTH_LINE_LIMIT = 12288 + 2  # RFC 4954 4: an AUTH command line of 12288 octets must work

NOT_YOURS = "550 5.7.1 Sender address {address} is not yours: send as {user} or its aliases"
FROM_NOT_YOURS = "550 5.7.1 From: address {address} is not yours: send as {user} or its aliases"
NO_FROM = "550 5.6.0 The message has no From: address"
NULL_SENDER = "550 5.7.1 Users may not send with the null sender <>"
AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
AUTH_LOCKED = "454 4.7.0 Too many failed logins; try again later"  # RFC 4954 6
QUEUED = "250 2.0.0 Ok: queued as {id}"


class SubmissionEnvelope(InboundEnvelope):
    """The inbound envelope plus the remote recipients."""

    def __init__(self) -> None:
        super().__init__()
        self.remote: list[str] = []


class SubmissionSMTP(InboundSMTP):
    """aiosmtpd's protocol for submission: AUTH over TLS only, the user checked in a thread."""

    def __init__(
        self,
        handler: SubmissionHandler,
        settings: Settings,
        tls: ssl.SSLContext | None,
        *,
        implicit_tls: bool,
    ) -> None:
        super().__init__(
            handler,
            settings,
            tls,
            timeout=settings.submission.timeout_seconds,
            auth_required=True,
            auth_require_tls=True,
            require_starttls=not implicit_tls and tls is not None,
        )
        self.line_length_limit = AUTH_LINE_LIMIT
        self.command_size_limits["AUTH"] = AUTH_LINE_LIMIT - 2  # aiosmtpd's default: 512
        self.submission_handler = handler
        self.implicit_tls = implicit_tls
        self.user: User | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.implicit_tls and transport.get_extra_info("ssl_object") is not None:
            # Port 465: TLS from the first byte. aiosmtpd knows only STARTTLS's TLS; tell it
            # this session is encrypted too (AUTH offered, STARTTLS not).
            self._tls_protocol = transport  # type: ignore[assignment]
            assert self.session is not None
            self.session.ssl = {"ssl_object": transport.get_extra_info("ssl_object")}

    def _create_envelope(self) -> SubmissionEnvelope:
        return SubmissionEnvelope()

    # RFC 4616: message = [authzid] NUL authcid NUL passwd
    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        data = await self._response(args, "")
        if isinstance(data, AuthResult):
            return data
        fields = data.split(b"\0")
        if len(fields) != 3:
            await self.push("501 5.5.2 PLAIN needs authzid NUL authcid NUL password")
            return AuthResult(success=False, handled=True)
        authzid, login, password = fields
        if authzid and authzid != login:
            await self.push("535 5.7.8 Authorization identity must be the login name")
            return AuthResult(success=False, handled=True)
        return await self._check(login, password)

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        login = await self._response(args, self.AuthLoginUsernameChallenge)
        if isinstance(login, AuthResult):
            return login
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if password is MISSING:
            return AuthResult(success=False)
        assert isinstance(password, bytes)
        return await self._check(login, password)

    async def _response(self, args: list[str], challenge: str) -> bytes | AuthResult:
        """The client's first response: on the AUTH line (RFC 4954 4, base64) or to
        ``challenge``; an AuthResult when there is none to use (cancelled, bad base64)."""
        if len(args) == 1:
            data = await self.challenge_auth(challenge)
            if data is MISSING:
                return AuthResult(success=False)
            assert isinstance(data, bytes)
            return data
        decoded = _b64(args[1])
        if decoded is None:
            await self.push("501 5.5.2 Cannot decode base64")
            return AuthResult(success=False, handled=True)
        return decoded

    async def _check(self, login: bytes, password: bytes) -> AuthResult:
        try:
            username, secret = login.decode("utf-8"), password.decode("utf-8")
        except UnicodeDecodeError:
            return AuthResult(success=False, handled=False, message=AUTH_FAILED)
        if any(c in username for c in "\r\n\0"):
            return AuthResult(success=False, handled=False, message=AUTH_FAILED)
        assert self.session is not None
        try:
            user = await self.submission_handler.authenticate(self.session, username, secret)
        except TooManyFailures:
            return AuthResult(success=False, handled=False, message=AUTH_LOCKED)
        if user is None:
            return AuthResult(success=False, handled=False, message=AUTH_FAILED)
        self.user = user
        return AuthResult(success=True, auth_data=str(user.address))


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return None


class SubmissionHandler(InboundHandler):
    """aiosmtpd handler hooks for submission; each returns its reply."""

    def __init__(self, settings: Settings, accounts: Accounts, queue: Queue) -> None:
        super().__init__(settings, accounts)
        self.queue = queue
        self.throttle = AuthThrottle.from_settings(settings, accounts)
        self._keys: dict[str, tuple[tuple[int, int], list[DkimKey]]] = {}

    def warm_up(self, server: SMTP) -> None:
        """Load dkimpy and dnspython on a worker thread once the client has said EHLO (it still
        has to log in), so that the first message a fresh process signs does not wait for them."""
        if self._warm_up is None:
            self._warm_up = asyncio.ensure_future(self.threads.run(_import_dkim))

    async def authenticate(self, session: Session, username: str, password: str) -> User | None:
        check = throttled(self.accounts.verify_password, self.throttle, _peer(session))
        return await self.threads.run(check, username, password)

    async def handle_MAIL(
        self, server: Any, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        user = _user(server)
        if address in ("", "<>"):
            return NULL_SENDER
        if not self.owns(user, address):
            log.warning(
                "%s tried to send as %s", user.address, _printable(address)[:200],
                extra={"CLIENT_ADDR": _peer(session)},
            )  # fmt: skip
            return NOT_YOURS.format(address=_printable(address)[:200], user=user.address)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return replies.SENDER_OK

    async def handle_RCPT(
        self,
        server: Any,
        session: Session,
        envelope: InboundEnvelope,
        address: str,
        options: list[str],
    ) -> str:
        assert isinstance(envelope, SubmissionEnvelope)
        if len(envelope.rcpt_tos) >= self.settings.submission.max_recipients:
            return replies.TOO_MANY_RECIPIENTS
        if not _valid_remote(address):
            return replies.BAD_RECIPIENT
        domain = address.rpartition("@")[2]
        try:
            local = self.accounts.is_local_domain(normalise_domain(domain))
        except InvalidNameError:
            return replies.BAD_RECIPIENT
        if local:
            reply, users = self.check_recipient(address)
            if not users:
                return reply
            for user in users:
                envelope.mailboxes[str(user.address)] = user
        else:
            envelope.remote.append(address)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return replies.RECIPIENT_OK

    async def handle_DATA(self, server: Any, session: Session, envelope: InboundEnvelope) -> str:
        assert isinstance(envelope, SubmissionEnvelope)
        user = _user(server)
        content: bytes = envelope.original_content or b""
        peer = _peer(session)
        if _has_bare_line_end_or_nul(content):
            return replies.BARE_LINE_END
        head, body = _split(content)
        senders = _from_addresses(head)
        if not senders:
            return NO_FROM
        for address in senders:
            if not self.owns(user, address):
                return FROM_NOT_YOURS.format(address=_printable(address)[:200], user=user.address)
        queue_id = new_queue_id()
        head = self.fix_header(head, session)
        message = self.received(server, session, queue_id) + head + body
        # Signing is milliseconds of CPU (RSA): a worker thread, not the event loop.
        message = await self.threads.run(self.sign, message, senders[0]) + message
        now = time.time()
        try:
            if envelope.mailboxes:
                targets = [(self._maildir(u), "") for u in envelope.mailboxes.values()]
                for (maildir, _), rcpt in zip(targets, envelope.mailboxes.values(), strict=True):
                    check_quota(maildir, rcpt.quota_bytes, len(message))
                local = b"Return-Path: <" + (envelope.mail_from or "").encode() + b">\r\n"
                await self.threads.run(deliver_all, targets, local + message)
            if envelope.remote:
                queue_id = await self.threads.run(
                    self.queue.enqueue, envelope.mail_from or "", envelope.remote, message, now
                )
        except QuotaExceededError:
            return replies.MESSAGE_TOO_BIG_FOR_MAILBOX
        except (DeliveryError, MailroomError, OSError) as err:
            log.error("%s not accepted: %s", queue_id, err, extra={"CLIENT_ADDR": peer})
            return replies.LOCAL_ERROR
        message_id = _message_id(message)
        log.info(
            "%s submitted by %s from=<%s> local=%s remote=%s size=%d message-id=%s",
            queue_id, user.address, _printable(envelope.mail_from or ""),
            ",".join(envelope.mailboxes), ",".join(_printable(r) for r in envelope.remote),
            len(message), message_id,
            extra={"CLIENT_ADDR": peer, "QUEUE_ID": queue_id, "MAIL_MESSAGE_ID": message_id},
        )  # fmt: skip
        return QUEUED.format(id=queue_id)

    # -- what a submitted message must be -----------------------------------------------------

    def owns(self, user: User, text: str) -> bool:
        """Whether ``user`` may send as ``text``: itself, a plus-address of itself, or an
        alias (not a catch-all) whose targets include it."""
        try:
            address = parse_address(text)
        except InvalidNameError:
            return False
        if address.base == user.address:
            return True
        explicit = {source for source, _ in self.accounts.list_aliases()}
        for candidate in (address, address.base):
            if str(candidate) in explicit and any(
                u.address == user.address for u in self.accounts.resolve(candidate)
            ):
                return True
        return False

    def fix_header(self, head: bytes, session: Session) -> bytes:
        """Without ``Bcc:``; with ``Message-ID:`` and ``Date:`` if they were missing."""
        head = _BCC.sub(b"", head)
        extra = b""
        if not _has_field(head, b"message-id"):
            extra += f"Message-ID: <{secrets.token_hex(12)}@{self.settings.hostname}>\r\n".encode()
        if not _has_field(head, b"date"):
            extra += f"Date: {format_datetime(datetime.now(UTC).astimezone())}\r\n".encode()
        return head + extra

    def received(self, server: Any, session: Session, queue_id: str) -> bytes:
        """RFC 5321 4.4 trace field; RFC 3848 ESMTPSA/ESMTPA. Neither the client's address
        nor its EHLO name (often a laptop's home address) unless configured."""
        proto = "ESMTPSA" if session.ssl is not None else "ESMTPA"
        source = ""
        if self.settings.submission.received_client_address:
            helo = _printable(session.host_name or "unknown")[:100]
            source = f"from {helo} ([{_peer(session)}])\r\n\t"
        date = format_datetime(datetime.now(UTC).astimezone())
        user = _user(server).address
        return (
            f"Received: {source}by {self.settings.hostname} (mailroom)"
            f" with {proto} id {queue_id}\r\n\t(authenticated as {user});\r\n\t{date}\r\n"
        ).encode("utf-8", "surrogateescape")

    def keys(self, domain: str) -> list[DkimKey]:
        """The DKIM keys of ``domain``, parsed once and again only when its key directory
        changes (a new key, a rotation): parsing an RSA key costs milliseconds."""
        directory = self.settings.dkim_dir / domain
        try:
            st = os.stat(directory)
            stamp = (st.st_ino, st.st_mtime_ns)
        except FileNotFoundError:
            stamp = (0, 0)
        cached = self._keys.get(domain)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        from mailroom import dkim

        keys = dkim.load_keys(self.settings.dkim_dir, domain)
        self._keys[domain] = (stamp, keys)
        return keys

    def sign(self, message: bytes, sender: str) -> bytes:
        """The DKIM-Signature fields for ``message``, with the keys of the sender's domain."""
        domain = sender.rpartition("@")[2].lower()
        try:
            keys = self.keys(normalise_domain(domain))
        except (InvalidNameError, MailroomError, OSError) as err:
            log.error("no DKIM keys for %s: %s", domain, err)
            return b""
        if not keys:
            log.warning("no DKIM keys for %s: sending unsigned (mailroomctl dkim generate)", domain)
            return b""
        from mailroom import dkim

        return dkim.sign(message, keys)


_BCC = re.compile(rb"(?im)^bcc[ \t]*:.*\r\n(?:[ \t].*\r\n)*")


def _split(content: bytes) -> tuple[bytes, bytes]:
    """(header section with its last CRLF, the rest from the empty line on)."""
    if content.startswith(b"\r\n"):
        return b"", content
    end = content.find(b"\r\n\r\n")
    if end < 0:
        return content if content.endswith(b"\r\n") else content + b"\r\n", b""
    return content[: end + 2], content[end + 2 :]


def _has_field(head: bytes, name: bytes) -> bool:
    return re.search(rb"(?im)^" + re.escape(name) + rb"[ \t]*:", head) is not None


def _from_addresses(head: bytes) -> list[str]:
    """The addresses of the From: fields (unfolded, RFC 5322 3.6.2)."""
    text = head.decode("utf-8", "surrogateescape")
    values = re.findall(r"(?im)^from[ \t]*:(.*(?:\r\n[ \t].*)*)", text)
    return [addr for _, addr in getaddresses([v.replace("\r\n", "") for v in values]) if addr]


def _valid_remote(address: str) -> bool:
    localpart, at, domain = address.rpartition("@")
    return bool(at and localpart and domain) and not re.search(
        r"[\x00-\x20\x7f<>()\[\]\\,;:]", domain
    )


def _user(server: Any) -> User:
    user = getattr(server, "user", None)
    assert isinstance(user, User), "AUTH is required before MAIL, RCPT and DATA"
    return user


def endpoints(settings: Settings, accounts: Accounts) -> dict[str, Endpoint]:
    from mailroom.tls import ServerTLS

    handler = SubmissionHandler(settings, accounts, Queue(settings.queue_dir))
    tls = ServerTLS.for_clients(settings)
    busy = (replies.TOO_MANY_CONNECTIONS + "\r\n").encode()
    if tls.context() is None:
        log.error(
            "submissions: no TLS certificate at %s; connections are closed", settings.tls_cert
        )
    # 465: asked per connection (none: hang up); the handshake gets the current pair.
    return {
        "submission": Endpoint(
            lambda: SubmissionSMTP(handler, settings, tls.context(), implicit_tls=False), busy
        ),
        "submissions": Endpoint(
            lambda: SubmissionSMTP(handler, settings, tls.front, implicit_tls=True),
            busy,
            tls=tls.context,
        ),
    }


async def _serve(settings: Settings, accounts: Accounts, sockets: Sockets) -> None:
    await serve(
        endpoints(settings, accounts),
        sockets,
        limits=Limits(
            settings.submission.max_connections, settings.submission.max_connections_per_ip
        ),
        idle_exit_seconds=settings.idle_exit_seconds,
        shutdown_grace_seconds=settings.shutdown_grace_seconds,
    )


def main() -> int:
    """Entry point of ``mailroom-submission``."""
    return run(
        "mailroom-submission",
        _serve,
        workers=lambda s: s.submission,
    )


def _import_dkim() -> None:
    from mailroom import dkim  # noqa: F401 - loaded for the first signature
