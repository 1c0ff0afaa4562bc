"""The outbound queue runner (``mailroom-deliver``): deliver what is due, then exit.

What this module owns: the walk from a queued message to a final state for each of its
recipients. What it promises:

* **One transaction per (message, domain).** The recipients of one domain go in one SMTP
  transaction (with a smarthost: all remote recipients of the message); up to ``PARALLEL``
  domains (and messages) are worked on at once. A message is worked on under the queue's
  exclusive lock, so two runners never send it twice at once.
* **Routes.** With ``outbound.relay.host`` set, every message goes to that smarthost (STARTTLS
  or implicit TLS, the certificate verified, AUTH when a user name is set). Otherwise direct:
  MX lookup (RFC 5321 5.1; implicit MX when there is none; RFC 7505 null MX fails at once),
  hosts by preference, each of their addresses, port ``outbound.smtp_port``. Recipients in a
  local domain (a bounce whose Maildir delivery failed) go into their Maildirs.
* **TLS.** Direct delivery uses STARTTLS whenever offered, without verifying the certificate
  (opportunistic, RFC 3207; a failed handshake is retried once in plaintext), except where the
  domain publishes an MTA-STS policy in ``enforce`` mode (RFC 8461): then only the MX hosts
  the policy names, only over STARTTLS with a certificate valid for the MX name, and never in
  plaintext; otherwise the recipients are deferred.
* **Results.** 2xx: delivered. 4xx, a lost connection, a TLS or temporary DNS failure:
  deferred to the next time of the retry schedule. 5xx: failed. Deferred recipients past the
  give-up time fail with their last error. When every recipient is final, the failed ones are
  reported to the sender in one RFC 3464 bounce (not to the null sender), and the message
  leaves the queue. A message deferred longer than ``delay_warning_seconds`` gets one delay
  warning.
* **Crash safety.** A recipient is marked delivered only after the remote ``250`` to DATA, and
  the state is saved after each transaction: a crash loses nothing, and at worst sends a
  message twice. A bounce is delivered (or queued) before the bounced message is removed.
* **The outside world is injected**: the resolver, the clock (``now``) and the queue.

Each delivery attempt is logged per recipient with the fields ``QUEUE_ID``,
``MAIL_RECIPIENT``, ``REMOTE_MTA``, ``SMTP_REPLY`` and ``DELIVERY_STATE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import ssl
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib

from mailroom import dsn, mtasts
from mailroom.accounts import Accounts
from mailroom.addresses import parse_address
from mailroom.config import Settings
from mailroom.errors import DeliveryError, MailroomError
from mailroom.maildir import Maildir, deliver_all
from mailroom.queue import (
    CorruptMessageError,
    MessageNotFoundError,
    Queue,
    QueuedMessage,
    Recipient,
    RecipientState,
    expired,
    needs_delay_warning,
    next_attempt,
)
from mailroom.resolver import DnsPermanentError, DnsTemporaryError, MxKind, Resolver
from mailroom.service import EX_CONFIG, failed, start

log = logging.getLogger(__name__)

PARALLEL = 10  # domains (and messages) worked on at once
SMARTHOST = "[smarthost]"  # the route of every remote recipient when a relay is configured

# Replies made up here, for what no server said (RFC 3463 enhanced codes).
NULL_MX = "556 5.1.10 Recipient address has null MX"  # RFC 7505
NO_DOMAIN = "550 5.1.2 Domain {domain} does not exist (DNS: NXDOMAIN)"
NO_ADDRESS = "550 5.4.4 No address for {domain} and its MX hosts"
DNS_TEMPORARY = "451 4.4.3 DNS lookup for {domain} failed: {error}"
NO_ROUTE = "451 4.4.1 No MX host of {domain} could be reached: {error}"
STS_NO_MX = "451 4.7.5 MTA-STS policy of {domain} (enforce) names none of its MX hosts"
STS_NO_TLS = "451 4.7.5 {host} does not offer STARTTLS, required by MTA-STS (enforce)"
TLS_FAILED = "451 4.7.5 TLS with {host} failed: {error}"
RELAY_NO_TLS = "451 4.7.5 Smarthost {host} does not offer STARTTLS"
RELAY_PASSWORD = "451 4.7.0 Cannot read the smarthost password file {path}: {error}"
RELAY_AUTH = "451 4.7.0 Smarthost {host} refused the credentials: {reply}"
CONNECTION = "451 4.4.2 {host}: {error}"
NO_UTF8 = "553 5.6.7 {host} does not support SMTPUTF8, needed for a non-ASCII address"
NO_SUCH_USER = "550 5.1.1 No such user here"
LOCAL_FAILED = "451 4.3.0 Local delivery failed: {error}"
CANCELLED = "550 5.0.0 Returned to the sender by the postmaster"

_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\b")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
MAX_REPLY = 500  # characters of a remote reply kept in the queue, the log and the bounce


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one recipient in one attempt."""

    state: RecipientState
    reply: str  # the server's reply (code, enhanced code, text) or one made up here
    remote_mta: str = ""

    @property
    def status(self) -> str:
        """The RFC 3463 enhanced status code of the reply."""
        code, _, text = self.reply.partition(" ")
        match = _ENHANCED.match(text)
        return match.group(1) if match else f"{code[:1] or '4'}.0.0"


def _outcome(code: int, text: str, remote_mta: str) -> Outcome:
    reply = f"{code} {_CONTROL.sub(' ', text).strip()}"[:MAX_REPLY]
    if 200 <= code < 300:
        return Outcome(RecipientState.DELIVERED, reply, remote_mta)
    if 500 <= code < 600:
        return Outcome(RecipientState.FAILED, reply, remote_mta)
    return Outcome(RecipientState.DEFERRED, reply, remote_mta)


def _reply_outcome(reply: str, remote_mta: str = "") -> Outcome:
    code, _, text = reply.partition(" ")
    return _outcome(int(code), text, remote_mta)


def _everyone(recipients: Iterable[str], outcome: Outcome) -> dict[str, Outcome]:
    return dict.fromkeys(recipients, outcome)


class _HostFailed(Exception):
    """This host (address) could not take the transaction: try the next one, else defer."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


class _TlsHandshakeFailed(_HostFailed):
    """STARTTLS was offered but the handshake failed (opportunistic: retry in plaintext)."""


@dataclass(frozen=True, slots=True)
class _Peer:
    """Where and how one SMTP session goes."""

    host: str  # the MX (or smarthost) name: the certificate's name and the log's
    address: str  # what is connected to: an IP address (direct) or the host name (smarthost)
    port: int
    tls: ssl.SSLContext | None  # STARTTLS with this context (None: never STARTTLS)
    require_tls: bool = False  # no STARTTLS or a failed handshake: give up on this host
    implicit_tls: bool = False  # TLS from the first byte (smarthost on 465)
    login: tuple[str, str] | None = None  # AUTH (user, password)
    smarthost: bool = False

    @property
    def name(self) -> str:
        return self.host if self.host == self.address else f"{self.host}[{self.address}]"


def opportunistic_context() -> ssl.SSLContext:
    """STARTTLS without verification: better than plaintext, and what MTAs do by default."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def verifying_context(ca_file: Path | None) -> ssl.SSLContext:
    """TLS with the certificate verified against ``ca_file`` or the system's CAs."""
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None
    )
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


def _needs_utf8(*addresses: str) -> bool:
    return any(not a.isascii() for a in addresses)


class Runner:
    """Delivers the due messages of ``queue``; ``now`` is the clock (seconds since the epoch)."""

    def __init__(
        self,
        settings: Settings,
        accounts: Accounts,
        queue: Queue,
        resolver: Resolver | None = None,
        *,
        now: Callable[[], float] = time.time,
        parallel: int = PARALLEL,
    ) -> None:
        self.settings = settings
        self.accounts = accounts
        self.queue = queue
        self._resolver = resolver
        self.now = now
        self.parallel = parallel
        self._opportunistic = opportunistic_context()
        self._verifying: ssl.SSLContext | None = None

    @property
    def resolver(self) -> Resolver:
        if self._resolver is None:  # made on first use: mailroomctl's bounce needs none
            self._resolver = Resolver.from_settings(self.settings)
        return self._resolver

    @property
    def verifying(self) -> ssl.SSLContext:
        if self._verifying is None:
            self._verifying = verifying_context(self.settings.outbound.ca_file)
        return self._verifying

    # -- the run -------------------------------------------------------------------------------

    async def run(self) -> int:
        """Deliver every due message, and those queued meanwhile; the number worked on.

        Each message is tried at most once per run, so a run always ends.
        """
        self.queue.clean(time.time())  # compares with file times: the real clock
        seen: set[str] = set()
        messages = asyncio.Semaphore(self.parallel)
        domains = asyncio.Semaphore(self.parallel)

        async def one(queue_id: str) -> None:
            async with messages:
                try:
                    await self.deliver_message(queue_id, domains)
                except MailroomError as err:  # a queue file that cannot be written, ...
                    log.error("%s: %s", queue_id, err, extra={"QUEUE_ID": queue_id})
                except Exception:  # a bug must not stop the other messages
                    log.exception("%s: delivery failed", queue_id, extra={"QUEUE_ID": queue_id})

        while True:
            now = self.now()
            # A message with nothing left to try is one a killed runner saved but did not
            # remove (or bounce): finish() does that now, else it would stay for ever.
            due = [m.id for m in self.queue.list() if (m.due(now) or m.done) and m.id not in seen]
            if not due:
                return len(seen)
            seen.update(due)
            await asyncio.gather(*(one(queue_id) for queue_id in due))

    async def deliver_message(
        self, queue_id: str, domains: asyncio.Semaphore | None = None
    ) -> None:
        """One attempt for the due recipients of one message, under its lock."""
        domains = domains or asyncio.Semaphore(self.parallel)
        with self.queue.lock(queue_id) as locked:
            if not locked:
                log.info("%s is being delivered by another runner", queue_id,
                         extra={"QUEUE_ID": queue_id})  # fmt: skip
                return
            try:
                msg = self.queue.load(queue_id)
            except (MessageNotFoundError, CorruptMessageError):
                return  # removed by another runner meanwhile, or moved aside (and logged)
            now = self.now()
            by_domain: dict[str, list[str]] = {}
            for rcpt in msg.recipients:
                if rcpt.due(now):
                    by_domain.setdefault(self._route(rcpt.address), []).append(rcpt.address)
            if by_domain:
                data = self.queue.read(queue_id)
                state = _MessageState(self, msg)

                async def domain(name: str, addresses: list[str]) -> None:
                    async with domains:
                        outcomes = await self.deliver_domain(msg, name, addresses, data)
                    state.record(outcomes)  # saved at once, while the others go on

                results = await asyncio.gather(
                    *(domain(d, a) for d, a in by_domain.items()), return_exceptions=True
                )
                for result in results:  # every domain has had its turn; now the first error
                    if isinstance(result, BaseException):
                        raise result
                msg = state.msg
            self.finish(msg, self.now())

    def _route(self, address: str) -> str:
        """What a recipient's transaction is shared by: its domain, or the smarthost."""
        domain = _domain_of(address)
        if self.settings.outbound.relay.host and not self.accounts.is_local_domain(domain):
            return SMARTHOST
        return domain

    async def deliver_domain(
        self, msg: QueuedMessage, domain: str, recipients: list[str], data: bytes
    ) -> dict[str, Outcome]:
        """One transaction's outcomes for ``recipients`` (all in ``domain``, or all remote
        ones when ``domain`` is ``SMARTHOST``)."""
        try:
            if domain == SMARTHOST:
                return await self._relay(msg, recipients, data)
            if self.accounts.is_local_domain(domain):
                return self._deliver_local(msg, recipients, data)
            return await self._direct(msg, domain, recipients, data)
        except Exception as err:  # a bug must not stop the other deliveries, nor lose mail
            log.exception("%s: delivery to %s failed", msg.id, domain,
                          extra={"QUEUE_ID": msg.id})  # fmt: skip
            reply = f"451 4.3.0 Internal error: {type(err).__name__}"
            return _everyone(recipients, _reply_outcome(reply))

    # -- routes --------------------------------------------------------------------------------

    async def _direct(
        self, msg: QueuedMessage, domain: str, recipients: list[str], data: bytes
    ) -> dict[str, Outcome]:
        try:
            mx = await self.resolver.mx(domain)
        except DnsTemporaryError as err:
            return _everyone(
                recipients, _reply_outcome(DNS_TEMPORARY.format(domain=domain, error=err))
            )
        except DnsPermanentError:
            return _everyone(recipients, _reply_outcome(NO_DOMAIN.format(domain=domain)))
        if mx.kind == MxKind.NULL_MX:
            return _everyone(recipients, _reply_outcome(NULL_MX))
        if mx.kind == MxKind.NXDOMAIN:
            return _everyone(recipients, _reply_outcome(NO_DOMAIN.format(domain=domain)))
        if mx.kind == MxKind.TEMPORARY:
            error = mx.error or "no answer"
            return _everyone(
                recipients, _reply_outcome(DNS_TEMPORARY.format(domain=domain, error=error))
            )
        # By preference, equal ones shuffled (RFC 5321 5.1); NO_MX: the domain itself.
        hosts = list(dict.fromkeys(host for _, host in mx.hosts))
        enforce = False
        policy = await self._mta_sts(msg, domain)
        if policy is not None and policy.mode == "enforce":
            # RFC 8461 4.1: only MX hosts the policy names, with a valid certificate.
            enforce = True
            hosts = [h for h in hosts if policy.matches(h)]
            if not hosts:
                return _everyone(recipients, _reply_outcome(STS_NO_MX.format(domain=domain)))
        elif policy is not None and policy.mode == "testing":
            for host in hosts:
                if not policy.matches(host):
                    log.warning("%s: MTA-STS (testing) of %s does not name MX %s", msg.id,
                                domain, host, extra={"QUEUE_ID": msg.id})  # fmt: skip
        port = self.settings.outbound.smtp_port
        last = "no MX host"
        unresolved = 0
        for host in hosts:
            try:
                addresses = await self.resolver.addresses(host)
            except DnsTemporaryError as err:
                last = f"DNS lookup for {host} failed: {err}"
                continue
            except DnsPermanentError as err:
                last, unresolved = f"{host}: {err}", unresolved + 1
                continue
            if not addresses:
                last, unresolved = f"{host} has no address", unresolved + 1
                continue
            for address in addresses:
                if enforce:
                    peer = _Peer(host, address, port, self.verifying, require_tls=True)
                else:
                    peer = _Peer(host, address, port, self._opportunistic)
                try:
                    return await self._session_with_fallback(peer, msg, recipients, data)
                except _HostFailed as err:
                    last = err.reply
                    self._log_host(msg, recipients, peer, err.reply)
        if unresolved == len(hosts):
            # RFC 5321 5.1: no address at all for the domain or any of its MX hosts.
            return _everyone(recipients, _reply_outcome(NO_ADDRESS.format(domain=domain)))
        return _everyone(recipients, _reply_outcome(NO_ROUTE.format(domain=domain, error=last)))

    async def _mta_sts(self, msg: QueuedMessage, domain: str) -> mtasts.Policy | None:
        if not self.settings.outbound.mta_sts:
            return None
        try:
            return await mtasts.policy(
                domain,
                self.resolver,
                port=self.settings.outbound.mta_sts_port,
                ca_file=self.settings.outbound.ca_file,
                cache_dir=self.settings.queue_dir / "mta-sts",
                now=self.now,
            )
        except Exception as err:  # RFC 8461 5: no usable policy is no policy
            log.warning("%s: MTA-STS policy of %s not usable: %s", msg.id, domain, err,
                        extra={"QUEUE_ID": msg.id})  # fmt: skip
            return None

    async def _relay(
        self, msg: QueuedMessage, recipients: list[str], data: bytes
    ) -> dict[str, Outcome]:
        relay = self.settings.outbound.relay
        login: tuple[str, str] | None = None
        if relay.username:
            try:
                password = _read_password(relay.password_file)
            except OSError as err:
                reply = RELAY_PASSWORD.format(path=relay.password_file, error=err.strerror or err)
                return _everyone(recipients, _reply_outcome(reply, relay.host))
            login = (relay.username, password)
        peer = _Peer(
            relay.host,
            relay.host,
            relay.port,
            self.verifying,
            require_tls=True,
            implicit_tls=relay.tls == "implicit",
            login=login,
            smarthost=True,
        )
        try:
            return await self._session(peer, msg, recipients, data)
        except _HostFailed as err:
            self._log_host(msg, recipients, peer, err.reply)
            return _everyone(recipients, _reply_outcome(err.reply, relay.host))

    def _deliver_local(
        self, msg: QueuedMessage, recipients: list[str], data: bytes
    ) -> dict[str, Outcome]:
        outcomes: dict[str, Outcome] = {}
        for rcpt in recipients:
            outcome = self._local_one(msg, rcpt, data)
            outcomes[rcpt] = outcome
            self._log(msg, rcpt, "local", outcome)
        return outcomes

    def _local_one(self, msg: QueuedMessage, rcpt: str, data: bytes) -> Outcome:
        try:
            users = [u for u in self.accounts.resolve(parse_address(rcpt)) if u.enabled]
        except MailroomError:
            users = []
        if not users:
            return _reply_outcome(NO_SUCH_USER, "local")
        targets = [(self._maildir(u.address), "") for u in users]
        trace = f"Return-Path: <{msg.sender}>\r\n".encode("utf-8", "surrogateescape")
        try:
            deliver_all(targets, trace + data)
        except DeliveryError as err:
            reply = LOCAL_FAILED.format(error=err)
            if err.permanent:
                reply = "550 5.3.0 " + reply.split(" ", 2)[2]
            return _reply_outcome(reply, "local")
        return _reply_outcome("250 2.0.0 Delivered to the mailbox", "local")

    def _maildir(self, address: Any) -> Maildir:
        return Maildir.for_address(self.settings.mail_root, address, self.settings.hostname)

    # -- one SMTP session ----------------------------------------------------------------------

    async def _session_with_fallback(
        self, peer: _Peer, msg: QueuedMessage, recipients: list[str], data: bytes
    ) -> dict[str, Outcome]:
        try:
            return await self._session(peer, msg, recipients, data)
        except _TlsHandshakeFailed as err:
            if peer.require_tls:
                raise
            # Opportunistic TLS that fails is retried without it (as Postfix does).
            self._log_host(msg, recipients, peer, err.reply + "; retrying without TLS")
            plain = dataclasses.replace(peer, tls=None)
            return await self._session(plain, msg, recipients, data)

    async def _session(
        self, peer: _Peer, msg: QueuedMessage, recipients: list[str], data: bytes
    ) -> dict[str, Outcome]:
        """Connect, EHLO, (STARTTLS, EHLO,) (AUTH,) MAIL, RCPT..., DATA; QUIT.

        Raises ``_HostFailed`` when the host could not take the transaction at all (connect,
        greeting, EHLO, TLS, AUTH, a lost connection or a 421 before the end of DATA);
        returns the outcome of each recipient otherwise.
        """
        outbound = self.settings.outbound
        smtp = aiosmtplib.SMTP(
            hostname=peer.address,
            port=peer.port,
            local_hostname=self.settings.hostname,
            timeout=outbound.command_timeout_seconds,
            use_tls=peer.implicit_tls,
            start_tls=False,
            tls_context=peer.tls if peer.implicit_tls else None,
        )
        try:
            try:
                await smtp.connect(timeout=outbound.connect_timeout_seconds)
                await self._hello(smtp)
                if not peer.implicit_tls:
                    await self._starttls(smtp, peer)
                if peer.login is not None:
                    await self._auth(smtp, peer)
                return await self._transaction(smtp, peer, msg, recipients, data)
            except _HostFailed:
                raise
            except ssl.SSLError as err:
                raise _HostFailed(TLS_FAILED.format(host=peer.name, error=_reason(err))) from err
            except aiosmtplib.SMTPResponseException as err:
                raise _HostFailed(f"{err.code} {_clean(err.message)} (from {peer.name})") from err
            except (aiosmtplib.SMTPException, OSError) as err:
                raise _HostFailed(CONNECTION.format(host=peer.name, error=_reason(err))) from err
        finally:
            smtp.close()

    async def _hello(self, smtp: aiosmtplib.SMTP) -> None:
        try:
            await smtp.ehlo()
        except aiosmtplib.SMTPHeloError as err:
            if not 500 <= err.code < 600 or not smtp.is_connected:
                raise
            await smtp.helo()  # RFC 5321 3.2: a server without EHLO

    async def _starttls(self, smtp: aiosmtplib.SMTP, peer: _Peer) -> None:
        if peer.tls is None:
            return
        if not smtp.supports_extension("starttls"):
            if peer.require_tls:
                template = RELAY_NO_TLS if peer.smarthost else STS_NO_TLS
                raise _HostFailed(template.format(host=peer.name))
            return
        try:
            # RFC 3207 4: the certificate is checked against the MX name, not the address.
            await smtp.starttls(server_hostname=peer.host, tls_context=peer.tls)
        except aiosmtplib.SMTPResponseException as err:
            reply = f"{err.code} {_clean(err.message)}"
            raise _TlsHandshakeFailed(TLS_FAILED.format(host=peer.name, error=reply)) from err
        except (ssl.SSLError, aiosmtplib.SMTPException, OSError) as err:
            raise _TlsHandshakeFailed(
                TLS_FAILED.format(host=peer.name, error=_reason(err))
            ) from err
        await smtp.ehlo()  # RFC 3207 4.2: forget what was learned before TLS

    async def _auth(self, smtp: aiosmtplib.SMTP, peer: _Peer) -> None:
        assert peer.login is not None
        user, password = peer.login
        try:
            await smtp.login(user, password)
        except aiosmtplib.SMTPAuthenticationError as err:
            reply = f"{err.code} {_clean(err.message)}"
            raise _HostFailed(RELAY_AUTH.format(host=peer.host, reply=reply)) from err

    async def _transaction(
        self,
        smtp: aiosmtplib.SMTP,
        peer: _Peer,
        msg: QueuedMessage,
        recipients: list[str],
        data: bytes,
    ) -> dict[str, Outcome]:
        encoding = "ascii"
        options: list[str] = []
        if _needs_utf8(msg.sender, *recipients):
            if not smtp.supports_extension("smtputf8"):
                return _everyone(recipients, _reply_outcome(NO_UTF8.format(host=peer.name)))
            encoding = "utf-8"
            options.append("SMTPUTF8")  # RFC 6531 3.4
        if smtp.supports_extension("size"):
            options.append(f"SIZE={len(data)}")  # RFC 1870
        if smtp.supports_extension("8bitmime") and not data.isascii():
            options.append("BODY=8BITMIME")  # RFC 6152
        try:
            await smtp.mail(msg.sender, options=options, encoding=encoding)
        except aiosmtplib.SMTPSenderRefused as err:
            _check_421(err, peer)
            return _everyone(recipients, _outcome(err.code, err.message, peer.host))
        outcomes: dict[str, Outcome] = {}
        accepted: list[str] = []
        for rcpt in recipients:
            try:
                await smtp.rcpt(rcpt, encoding=encoding)
            except aiosmtplib.SMTPRecipientRefused as err:
                _check_421(err, peer)
                outcomes[rcpt] = _outcome(err.code, err.message, peer.host)
            else:
                accepted.append(rcpt)
        if accepted:
            try:
                response = await smtp.data(data)
            except aiosmtplib.SMTPDataError as err:
                _check_421(err, peer)
                outcome = _outcome(err.code, err.message, peer.host)
            else:
                outcome = _outcome(response.code, response.message, peer.host)
            outcomes.update(_everyone(accepted, outcome))
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            await smtp.quit()  # the outcomes are final already
        return outcomes

    # -- after the attempt ---------------------------------------------------------------------

    def finish(self, msg: QueuedMessage, now: float) -> None:
        """Give up on expired recipients, report to the sender, leave the queue when done."""
        if expired(msg, now, self.settings.outbound):
            recipients = []
            for rcpt in msg.recipients:
                if rcpt.state == RecipientState.DEFERRED:
                    log.info("%s to=<%s> expired after %d attempts: %s", msg.id, rcpt.address,
                             rcpt.attempts, rcpt.last_error,
                             extra={"QUEUE_ID": msg.id, "MAIL_RECIPIENT": rcpt.address,
                                    "DELIVERY_STATE": "failed"})  # fmt: skip
                    # Its 4.x.x status stays: the bounce says 5.4.7, delivery time expired.
                    rcpt = dataclasses.replace(rcpt, state=RecipientState.FAILED)
                recipients.append(rcpt)
            msg = dataclasses.replace(msg, recipients=tuple(recipients))
            self.queue.save(msg)
        if msg.done:
            failed = [r for r in msg.recipients if r.state == RecipientState.FAILED]
            if failed and dsn.should_bounce(msg.sender):
                original = self.queue.read(msg.id)
                report = dsn.build_bounce(self.settings.hostname, msg, failed, original, now)
                self.notify(msg, report, now, "bounce")
            self.queue.remove(msg.id)
            log.info("%s removed: %d delivered, %d failed", msg.id,
                     len(msg.recipients) - len(failed), len(failed),
                     extra={"QUEUE_ID": msg.id})  # fmt: skip
            return
        outbound = self.settings.outbound
        if needs_delay_warning(msg, now, outbound) and any(
            r.state == RecipientState.DEFERRED for r in msg.recipients
        ):
            if dsn.should_bounce(msg.sender):
                delayed = [r for r in msg.recipients if r.state == RecipientState.DEFERRED]
                original = self.queue.read(msg.id)
                retry_until = msg.created + outbound.give_up_seconds
                report = dsn.build_delay_warning(
                    self.settings.hostname, msg, delayed, original, now, retry_until
                )
                self.notify(msg, report, now, "delay warning")
            self.queue.save(dataclasses.replace(msg, delay_warned=True))

    def notify(self, msg: QueuedMessage, report: bytes, now: float, what: str) -> None:
        """Send a report to ``msg``'s sender: into its Maildir if local, else via the queue."""
        sender = msg.sender
        extra = {"QUEUE_ID": msg.id, "MAIL_RECIPIENT": sender}
        if self.accounts.is_local_domain(_domain_of(sender)):
            outcome = self._local_one(dataclasses.replace(msg, sender=""), sender, report)
            if outcome.state == RecipientState.DELIVERED:
                log.info("%s %s delivered to <%s>", msg.id, what, sender, extra=extra)
                return
            if outcome.state == RecipientState.FAILED:
                log.warning("%s %s to <%s> dropped: %s", msg.id, what, sender, outcome.reply,
                            extra=extra)  # fmt: skip
                return
            # A temporary local failure: the queue retries it (as a local recipient).
        report_id = self.queue.enqueue("", [sender], report, now)
        log.info("%s %s to <%s> queued as %s", msg.id, what, sender, report_id, extra=extra)

    # -- logging -------------------------------------------------------------------------------

    def _log(self, msg: QueuedMessage, rcpt: str, relay: str, outcome: Outcome) -> None:
        state = str(outcome.state)
        level = logging.INFO if outcome.state == RecipientState.DELIVERED else logging.WARNING
        log.log(
            level,
            "%s to=<%s> relay=%s state=%s reply=%s",
            msg.id, rcpt, relay or "none", state, outcome.reply,
            extra={"QUEUE_ID": msg.id, "MAIL_RECIPIENT": rcpt, "REMOTE_MTA": relay,
                   "SMTP_REPLY": outcome.reply, "DELIVERY_STATE": state},
        )  # fmt: skip

    def _log_host(self, msg: QueuedMessage, recipients: list[str], peer: _Peer, reply: str) -> None:
        log.info(
            "%s to=<%s> relay=%s:%d not used: %s",
            msg.id, ",".join(recipients), peer.name, peer.port, reply,
            extra={"QUEUE_ID": msg.id, "REMOTE_MTA": peer.host, "SMTP_REPLY": reply},
        )  # fmt: skip


class _MessageState:
    """The message as the attempts of its domains finish, saved after each."""

    def __init__(self, runner: Runner, msg: QueuedMessage) -> None:
        self.runner = runner
        self.msg = msg

    def record(self, outcomes: dict[str, Outcome]) -> None:
        runner = self.runner
        now = runner.now()
        recipients: list[Recipient] = []
        for rcpt in self.msg.recipients:
            outcome = outcomes.get(rcpt.address)
            if outcome is not None:
                if outcome.remote_mta != "local":
                    runner._log(self.msg, rcpt.address, outcome.remote_mta, outcome)
                rcpt = _after(rcpt, outcome, now, runner.settings)
            recipients.append(rcpt)
        self.msg = dataclasses.replace(self.msg, recipients=tuple(recipients))
        runner.queue.save(self.msg)


def _after(rcpt: Recipient, outcome: Outcome, now: float, settings: Settings) -> Recipient:
    attempts = rcpt.attempts + 1
    if outcome.state == RecipientState.DEFERRED:
        retry = next_attempt(attempts, now, settings.outbound)
    else:
        retry = rcpt.next_attempt
    return dataclasses.replace(
        rcpt,
        state=outcome.state,
        attempts=attempts,
        next_attempt=retry,
        last_error="" if outcome.state == RecipientState.DELIVERED else outcome.reply,
        remote_mta=outcome.remote_mta,
        status=outcome.status,
        last_attempt=now,
    )


def _check_421(err: aiosmtplib.SMTPResponseException, peer: _Peer) -> None:
    """RFC 5321 3.8: 421 closes the session; the transaction did not happen."""
    if err.code == 421:
        raise _HostFailed(f"421 {_clean(err.message)} (from {peer.name})")


def _clean(text: str) -> str:
    return _CONTROL.sub(" ", text).strip()[:MAX_REPLY]


def _reason(err: BaseException) -> str:
    if isinstance(err, ssl.SSLCertVerificationError):
        return f"certificate not valid: {err.verify_message}"
    text = str(err) or type(err).__name__
    return _clean(text)


def _read_password(path: Path | None) -> str:
    if path is None:
        raise FileNotFoundError(2, "relay.password_file is not set")
    return path.read_text(encoding="utf-8").strip("\r\n")


# -- mailroomctl queue ...  --------------------------------------------------------------------


def queue_rows(settings: Settings) -> list[dict[str, Any]]:
    """One row per queued message, for ``mailroomctl queue list`` (oldest first)."""
    rows = []
    for msg in Queue(settings.queue_dir).list():
        rows.append(
            {
                "id": msg.id,
                "sender": msg.sender,
                "created": msg.created,
                "size": msg.size,
                "recipients": [
                    {
                        "address": r.address,
                        "state": str(r.state),
                        "attempts": r.attempts,
                        "next_attempt": r.next_attempt,
                        "last_error": r.last_error,
                    }
                    for r in msg.recipients
                ],
            }
        )
    return sorted(rows, key=lambda row: (row["created"], row["id"]))


def flush(settings: Settings) -> int:
    """Make every deferred recipient due now (the runner delivers them); how many messages."""
    return Queue(settings.queue_dir).flush()


def delete(settings: Settings, queue_id: str) -> None:
    """Remove message ``queue_id`` from the queue without telling anyone."""
    queue = Queue(settings.queue_dir)
    with queue.lock(queue_id) as locked:
        if not locked:
            raise MailroomError(f"message {queue_id} is being delivered right now; try again")
        queue.load(queue_id)  # MessageNotFoundError for an unknown id
        queue.remove(queue_id)
    log.info("%s deleted by the administrator", queue_id, extra={"QUEUE_ID": queue_id})


def bounce(settings: Settings, queue_id: str, *, now: Callable[[], float] = time.time) -> None:
    """Fail every recipient of ``queue_id`` not yet delivered, and bounce to the sender now."""
    queue = Queue(settings.queue_dir)
    with Accounts(settings.auth_db) as accounts:
        runner = Runner(settings, accounts, queue, now=now)
        with queue.lock(queue_id) as locked:
            if not locked:
                raise MailroomError(f"message {queue_id} is being delivered right now; try again")
            msg = queue.load(queue_id)
            cancelled = _reply_outcome(CANCELLED)
            recipients = [
                r
                if r.state in (RecipientState.DELIVERED, RecipientState.FAILED)
                else dataclasses.replace(
                    r,
                    state=RecipientState.FAILED,
                    last_error=r.last_error or cancelled.reply,
                    status=cancelled.status,
                )
                for r in msg.recipients
            ]
            msg = dataclasses.replace(msg, recipients=tuple(recipients))
            queue.save(msg)
            runner.finish(msg, now())
    log.info("%s bounced by the administrator", queue_id, extra={"QUEUE_ID": queue_id})


# -- the program -------------------------------------------------------------------------------


def main() -> int:
    """Entry point of ``mailroom-deliver``: deliver what is due, then exit."""
    program = "mailroom-deliver"
    settings = start(program)
    if settings is None:
        return EX_CONFIG
    try:
        queue = Queue(settings.queue_dir)
        with Accounts(settings.auth_db) as accounts:
            count = asyncio.run(Runner(settings, accounts, queue).run())
    except MailroomError as err:
        return failed(program, err)
    log.info("%d message(s) worked on", count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
