"""Sending one message through the account's own SMTP submission server: the SmtpSender port, its aiosmtplib
adapter, and the pure rules that turn SMTP replies into inboxd errors (what the outbox worker can do next).

Exactly-once needs to know whether the server may have accepted the message when something goes wrong, so the
adapter drives the SMTP phases itself instead of ``SMTP.sendmail()``, which hides them:

    connect -> [STARTTLS -> EHLO] -> EHLO -> AUTH -> MAIL -> RCPT* -> DATA (354) -> payload -> final reply

The payload is the message (dot-stuffed, CRLF) plus the terminating ``.\\r\\n``, handed to the transport in one
``SMTPProtocol.write()`` call, exactly as aiosmtplib's own ``execute_data_command`` (protocol.py) does it; we
call that method's two halves ourselves: ``SMTP.execute_command(b"DATA")`` for the 354, then
``protocol.write(payload)`` and ``protocol.read_response()`` for the final reply (both public methods).
The split is that ``write()`` call:

* anything failing before it returned (connect, TLS, AUTH, MAIL, RCPT, no 354, the connection found closed by
  ``write`` itself) leaves the server without a complete message: ``SendTemporary`` (safe to retry) or, for a
  definitive 5xx reply, ``SendRejected``;
* once it returned, the terminating dot may have reached the server; a lost connection, a timeout or a garbled
  reply while waiting for the final reply is ``SendAmbiguous``: the message may have been delivered, and the
  caller must look for its Message-ID in the Sent folder before sending again. A definitive final reply (250,
  4xx, 5xx) is never ambiguous.

Tokens and passwords never appear in exception messages or logs; server texts are scrubbed of them too.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, Protocol

import aiosmtplib
import structlog

from inboxd.config import ProviderConfig, is_loopback_host
from inboxd.errors import AccountFailed, InboxdError, ReauthRequired, RetryLater
from inboxd.tls import verified_context

log = structlog.get_logger(__name__)

Phase = Literal["connect", "starttls", "ehlo", "auth", "mail", "rcpt", "data", "message"]
_PHASE_WORDS: Final[dict[Phase, str]] = {
    "connect": "while connecting",
    "starttls": "during STARTTLS",
    "ehlo": "at EHLO",
    "auth": "during AUTH",
    "mail": "at MAIL FROM",
    "rcpt": "at RCPT TO",
    "data": "at DATA (before the message was sent)",
    "message": "after the message was sent, waiting for the final reply to DATA",
}
_ENHANCED_STATUS = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?!\d)")
_LINE_ENDINGS = re.compile(rb"\r\n|\n|\r")
_LEADING_DOT = re.compile(rb"(?m)^\.")
_MAX_TEXT: Final = 300


# --- errors -----------------------------------------------------------------------------------------


class SendTemporary(RetryLater):
    """Nothing was delivered (4xx reply or a network failure before the message was sent): safe to retry."""

    def __init__(self, message: str, *, code: int | None = None, text: str = "") -> None:
        super().__init__(message)
        self.code = code  # None for network failures
        self.text = text


class SendAmbiguous(RetryLater):
    """The connection failed after the message was sent but before the server's final reply: it may have been
    delivered. Look for the Message-ID in the Sent folder before any retry."""

    def __init__(self, message: str, *, phase: Phase) -> None:
        super().__init__(message)
        self.phase = phase


class SendRejected(InboxdError):
    """The server refused the message for good (5xx); sending it again will fail the same way."""

    def __init__(self, message: str, *, code: int, text: str) -> None:
        super().__init__(message)
        self.code = code
        self.text = text


class SendDailyLimit(SendRejected):
    """The account hit its provider's daily sending limit (550 5.4.5): pause sending for it for 24 h."""


# --- the port ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SendResult:
    accepted: tuple[str, ...]
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)  # recipient -> (code, text), 5xx only
    reply: str = ""  # the server's text of the 250 to the message (often carries a queue id)


class SmtpSender(Protocol):
    async def send(self, *, sender: str, recipients: list[str], message: bytes) -> SendResult:
        """Submit ``message`` for ``recipients``. Raises SendTemporary, SendAmbiguous, SendRejected (incl.
        SendDailyLimit), ReauthRequired, AccountFailed, or RetryLater/ReauthRequired from the token source."""


@dataclass(frozen=True)
class SmtpEndpoint:
    host: str
    port: int
    tls: str  # 'tls' | 'starttls' | 'plain' (plain only to loopback)
    ca_file: Path | None = None
    timeout: float = 30.0
    # for the reply to the end of the data, once the message has left (None: the larger of timeout and
    # FINAL_REPLY_TIMEOUT; RFC 5321 allows a server 10 minutes)
    final_reply_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.tls not in ("tls", "starttls", "plain"):
            raise ValueError(f"smtp tls mode must be tls, starttls or plain, not {self.tls!r}")
        if self.tls == "plain" and not is_loopback_host(self.host):
            raise ValueError(f"plain SMTP (no TLS) is only allowed to loopback, not to {self.host}")

    @classmethod
    def from_provider(cls, provider: ProviderConfig) -> SmtpEndpoint:
        if provider.smtp_host is None or provider.smtp_port is None or provider.smtp_tls is None:
            raise ValueError(f"provider {provider.name} has no SMTP server configured")
        return cls(
            host=provider.smtp_host,
            port=provider.smtp_port,
            tls=provider.smtp_tls,
            ca_file=provider.ca_file,
            timeout=provider.timeout,
        )


# --- pure reply rules -------------------------------------------------------------------------------


def enhanced_status(text: str) -> str | None:
    """The RFC 3463 enhanced status code an SMTP reply text starts with ("5.4.5"), if any."""
    match = _ENHANCED_STATUS.match(text.strip())
    return ".".join(match.groups()) if match else None


def classify_reply(code: int, text: str, *, phase: Phase, where: str) -> InboxdError:
    """The error for a non-success reply ``code``/``text`` received in ``phase`` (not for AUTH: see
    ``classify_auth_failure``). A reply is definitive, so never SendAmbiguous."""
    status = enhanced_status(text)
    summary = f"{where} answered {code} {text}".rstrip() + f" {_PHASE_WORDS[phase]}"
    if code == 550 and status == "5.4.5":
        return SendDailyLimit(f"daily sending limit reached: {summary}", code=code, text=text)
    if 500 <= code < 600 and phase in ("mail", "rcpt", "data", "message"):
        return SendRejected(f"message refused: {summary}", code=code, text=text)
    # 4xx anywhere, and odd or 5xx replies before the transaction started (greeting, EHLO, STARTTLS): the
    # server is not refusing this message, so the bounded retries of the outbox decide when to give up.
    return SendTemporary(f"temporary failure: {summary}", code=code, text=text)


AuthVerdict = Literal["retry_with_fresh_token", "reauth", "account", "temporary"]


def classify_auth_failure(code: int, text: str) -> AuthVerdict:
    """What to do about a refused AUTH. 535/534 are bad or expired credentials; Microsoft's 535 5.7.139 means
    SMTP AUTH is disabled for the tenant or mailbox, which only an admin can change."""
    if enhanced_status(text) == "5.7.139":
        return "account"
    if 400 <= code < 500:
        return "temporary"
    if code in (534, 535):
        return "retry_with_fresh_token"
    return "account"  # e.g. 530 (TLS required), 504 (mechanism not offered): configuration, not credentials


# --- the aiosmtplib adapter -------------------------------------------------------------------------


def _dot_stuffed(message: bytes) -> bytes:
    """The DATA payload: CRLF line endings, leading dots doubled, ending in ``CRLF.CRLF``."""
    message = _LINE_ENDINGS.sub(b"\r\n", message)
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    return _LEADING_DOT.sub(b"..", message) + b".\r\n"


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


async def _discard(client: aiosmtplib.SMTP, transport: asyncio.BaseTransport | None = None) -> None:
    """Close the connection now. ``SMTP.close()`` starts a graceful TLS shutdown that needs more round trips with
    the server and may outlive the event loop (an unclosed socket); after QUIT, or once we gave up on the
    connection, there is nothing left to say, so the socket is aborted and its close runs before we return."""
    transport = transport or client.transport
    if isinstance(transport, asyncio.WriteTransport):  # plain and TLS transports both are
        transport.abort()
    client.close()  # releases aiosmtplib's connect lock and resets its state
    await asyncio.sleep(0)  # let the transport's scheduled connection_lost close the socket


FINAL_REPLY_TIMEOUT = 300.0  # seconds for the reply to the end of the data, once it is sent (see _transaction)


async def _drained(protocol: Any, *, stall: float) -> None:
    """Wait until the transport has handed the whole message to the kernel; TimeoutError when it stops moving for
    ``stall`` seconds (the peer reads nothing)."""
    transport = protocol.transport
    if transport is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    left, still = transport.get_write_buffer_size(), 0.0
    while left:
        await asyncio.sleep(0.05)
        now = transport.get_write_buffer_size()
        still = still + 0.05 if now >= left else 0.0
        if still >= stall:
            raise TimeoutError("the server stopped reading the message")
        left = now


class AioSmtpSender:
    """SmtpSender over aiosmtplib: one connection per message, XOAUTH2 (or password), TLS always verified."""

    def __init__(
        self,
        endpoint: SmtpEndpoint,
        *,
        username: str,
        access_token: Callable[[], str] | None = None,
        invalidate_token: Callable[[], None] | None = None,
        password: str | None = None,
        ehlo_name: str | None = None,
    ) -> None:
        if (access_token is None) == (password is None):
            raise ValueError("pass exactly one of access_token and password")
        self._endpoint = endpoint
        self._username = username
        self._access_token = access_token
        self._invalidate_token = invalidate_token
        self._password = password
        # None: an address literal of our end of the connection, so the machine's host name is not announced
        self._ehlo_name = ehlo_name
        self._tls: ssl.SSLContext | None = None
        self._secrets: list[str] = [password] if password else []
        self._where = f"{endpoint.host}:{endpoint.port}"
        # whether the last send() began writing the message after DATA: until then a failure is known not to have
        # delivered it (the outbox clears its write-ahead mark), from then on it may have
        self.data_sent = False

    def __repr__(self) -> str:
        return f"AioSmtpSender({self._where}, username={self._username!r})"

    async def send(self, *, sender: str, recipients: list[str], message: bytes) -> SendResult:
        """See SmtpSender.send. ValueError for an address aiosmtplib will not put on the wire (use
        inboxd.mime.envelope_recipients, which validates)."""
        self.data_sent = False
        if not recipients:
            raise ValueError("no recipients")
        client = await self._connect()
        transport = None
        try:
            await self._authenticate(client)
            result = await self._transaction(client, sender, recipients, message)
            transport = client.transport  # quit() drops aiosmtplib's reference to it
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):  # accepted; a failing QUIT changes nothing
                await client.quit()
        finally:
            await _discard(client, transport)
        log.info(
            "smtp.sent",
            server=self._where,
            accepted=len(result.accepted),
            refused=len(result.refused),
            reply=result.reply,
        )
        return result

    # --- phases -----------------------------------------------------------------------------------

    async def _connect(self) -> aiosmtplib.SMTP:
        endpoint = self._endpoint
        if endpoint.tls != "plain" and self._tls is None:
            self._tls = await asyncio.to_thread(verified_context, endpoint.ca_file)
        client = aiosmtplib.SMTP(
            hostname=endpoint.host,
            port=endpoint.port,
            timeout=endpoint.timeout,
            use_tls=endpoint.tls == "tls",
            start_tls=False,  # done below, and only when configured: never opportunistic, never skipped
            tls_context=self._tls,
            local_hostname=self._ehlo_name or "localhost",  # else connect() looks up our FQDN; EHLO is ours below
        )
        try:
            with self._phase("connect"):
                await client.connect()
            ehlo_name = self._ehlo_name or self._address_literal(client)
            with self._phase("ehlo"):
                await client.ehlo(hostname=ehlo_name)
            if endpoint.tls == "starttls":
                if not client.supports_extension("starttls"):
                    raise SendTemporary(f"{self._where} did not offer STARTTLS; not sending without TLS")
                with self._phase("starttls"):
                    await client.starttls()
                with self._phase("ehlo"):
                    await client.ehlo(hostname=ehlo_name)
        except BaseException:
            await _discard(client)
            raise
        return client

    @staticmethod
    def _address_literal(client: aiosmtplib.SMTP) -> str:
        sockname = client.get_transport_info("sockname")
        host = str(sockname[0]) if isinstance(sockname, tuple) and sockname else "127.0.0.1"
        return f"[IPv6:{host}]" if ":" in host else f"[{host}]"

    async def _authenticate(self, client: aiosmtplib.SMTP) -> None:
        with self._phase("auth"):
            if self._access_token is None:
                try:
                    await client.login(self._username, self._password or "")
                except aiosmtplib.SMTPAuthenticationError as exc:
                    raise self._auth_error(exc, fresh_token=True) from exc
                return
            if "xoauth2" not in client.server_auth_methods:
                offered = " ".join(client.server_auth_methods) or "none"
                raise AccountFailed(f"{self._where} does not offer AUTH XOAUTH2 (offers: {offered})")
            try:
                await client.auth_xoauth2(self._username, await self._token())
            except aiosmtplib.SMTPAuthenticationError as first:
                if classify_auth_failure(first.code, first.message) != "retry_with_fresh_token":
                    raise self._auth_error(first, fresh_token=False) from first
                # A cached token may have been revoked or expired early on the server: one fresh token, one retry.
                if self._invalidate_token is not None:
                    self._invalidate_token()
                try:
                    await client.auth_xoauth2(self._username, await self._token())
                except aiosmtplib.SMTPAuthenticationError as exc:
                    raise self._auth_error(exc, fresh_token=True) from exc

    async def _token(self) -> str:
        assert self._access_token is not None
        # The token source may refresh over HTTP (blocking): keep it off the event loop.
        token = await asyncio.to_thread(self._access_token)
        self._secrets.append(token)
        return token

    async def _transaction(
        self, client: aiosmtplib.SMTP, sender: str, recipients: list[str], message: bytes
    ) -> SendResult:
        with self._phase("mail"):
            await client.mail(sender)

        accepted: list[str] = []
        refused: dict[str, tuple[int, str]] = {}
        for recipient in recipients:
            with self._phase("rcpt"):
                try:
                    await client.rcpt(recipient)
                except aiosmtplib.SMTPRecipientRefused as exc:
                    error = self._reply_error(exc, "rcpt")
                    if type(error) is not SendRejected:
                        # 4xx for one recipient (or the daily limit): the whole message later, never in parts
                        raise error from exc
                    refused[recipient] = (exc.code, error.text)
                else:
                    accepted.append(recipient)
        if not accepted:
            code, text = next(iter(refused.values()))
            raise SendRejected(
                f"all {len(refused)} recipients refused by {self._where}, the first with {code} {text}",
                code=code,
                text=text,
            )

        payload = _dot_stuffed(message)
        with self._phase("data"):
            start = await client.execute_command(b"DATA")
            if start.code != 354:
                raise self._reply_error(aiosmtplib.SMTPDataError(start.code, start.message), "data")
            protocol = client.protocol
            if protocol is None:
                raise aiosmtplib.SMTPServerDisconnected("Connection lost")
            self.data_sent = True
            protocol.write(payload)  # raises SMTPServerDisconnected, having sent nothing, if the connection is gone

        # From here on the server may have the whole message. (A CancelledError propagates as it is: the
        # caller must then treat the attempt as ambiguous too.)
        try:
            await _drained(protocol, stall=self._endpoint.timeout)
            # RFC 5321 4.5.3.2.6: a server may take up to 10 minutes to answer the end of the data (scanning); the
            # timer starts once the message has left, not when it was buffered (34 MB take minutes on a slow link)
            final = self._endpoint.final_reply_timeout
            reply = await protocol.read_response(
                timeout=final if final is not None else max(self._endpoint.timeout, FINAL_REPLY_TIMEOUT)
            )
        except (aiosmtplib.SMTPException, OSError) as exc:
            log.warning("smtp.send_ambiguous", server=self._where, error=type(exc).__name__)
            raise SendAmbiguous(
                f"{type(exc).__name__} {_PHASE_WORDS['message']} from {self._where}: the message may have been "
                "delivered; look for its Message-ID in the Sent folder before sending again",
                phase="message",
            ) from exc
        if reply.code != 250:
            raise self._reply_error(aiosmtplib.SMTPDataError(reply.code, reply.message), "message")
        return SendResult(accepted=tuple(accepted), refused=refused, reply=self._scrub(reply.message))

    # --- error translation ------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text.replace("\n", " / ")[:_MAX_TEXT]

    def _reply_error(self, exc: aiosmtplib.SMTPResponseException, phase: Phase) -> InboxdError:
        return classify_reply(exc.code, self._scrub(exc.message), phase=phase, where=self._where)

    def _auth_error(self, exc: aiosmtplib.SMTPAuthenticationError, *, fresh_token: bool) -> InboxdError:
        text = self._scrub(exc.message)
        verdict = classify_auth_failure(exc.code, text)
        if verdict == "temporary":
            return SendTemporary(
                f"{self._where} answered {exc.code} {text} during AUTH; try again later", code=exc.code, text=text
            )
        if verdict == "account":
            if enhanced_status(text) == "5.7.139":
                return AccountFailed(
                    f"{self._where} has SMTP AUTH disabled for {self._username} ({exc.code} {text}); a Microsoft 365 "
                    "admin must enable 'Authenticated SMTP' for this mailbox (Set-CASMailbox -SmtpClientAuthentication"
                    "Disabled $false) or for the tenant"
                )
            return AccountFailed(f"{self._where} refused AUTH for {self._username}: {exc.code} {text}")
        what = "a freshly issued access token" if self._access_token is not None and fresh_token else "the credentials"
        return ReauthRequired(f"{self._where} refused {what} for {self._username}: {exc.code} {text}")

    @contextlib.contextmanager
    def _phase(self, phase: Phase) -> Iterator[None]:
        """Translate what the library raises in ``phase``: replies by ``classify_reply``, TLS failures to
        AccountFailed, network failures and timeouts to SendTemporary. Our own errors pass through."""
        try:
            yield
        except InboxdError:
            raise
        except Exception as exc:
            tls_error = _ssl_cause(exc)
            if tls_error is not None:
                reason = tls_error.reason or type(tls_error).__name__
                raise AccountFailed(f"TLS to {self._where} failed {_PHASE_WORDS[phase]}: {reason}") from exc
            if isinstance(exc, aiosmtplib.SMTPResponseException):
                raise self._reply_error(exc, phase) from exc
            if isinstance(exc, aiosmtplib.SMTPException | OSError):
                detail = self._scrub(getattr(exc, "message", "") or str(exc)) or type(exc).__name__
                raise SendTemporary(f"{type(exc).__name__} {_PHASE_WORDS[phase]} with {self._where}: {detail}") from exc
            raise
