"""Sending the HR app's outbox rows through each recruiter's own mailbox, exactly once.

A row is claimed atomically, checked (account, recipients, headers, attachments) before anything reaches SMTP,
given its Message-ID before the first attempt, sent, filed in Sent where the server does not do it itself, and
stored at once as an outbound, threaded message. A retry after an attempt that may have delivered first looks
for the Message-ID in the account's Sent mail; where that cannot prove anything, it is not retried.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import structlog

from inboxd.blobs import BlobStore
from inboxd.clock import Clock
from inboxd.config import Config, ProviderConfig
from inboxd.connections import Connections
from inboxd.errors import AccountFailed, InboxdError, ReauthRequired, RetryLater
from inboxd.imap import ImapSession
from inboxd.metrics import Metrics
from inboxd.mime import (
    MAX_ATTACHMENTS,
    Draft,
    InvalidDraft,
    OutgoingAttachment,
    ReplyContext,
    build_message,
    envelope_recipients,
    make_message_id,
    validate,
)
from inboxd.outbox_policy import Outcome, RetryPolicy, after_attempt, idle_wait
from inboxd.outbox_store import OutboxRow, OutboxStore
from inboxd.parse import parse_message
from inboxd.planner import sent_folder
from inboxd.smtp import SendAmbiguous, SendDailyLimit, SendRejected
from inboxd.store import DISCONNECTED_REASON, Account, NewLocation, NewMessage, Store

log = structlog.get_logger(__name__)

HOLD = timedelta(minutes=1)  # how long a row of a paused/disabled account waits before it is looked at again
# Prefix of last_error after a failure that happened before the message was handed over (safe to send again);
# for people reading last_error: the decision itself uses mail_outbox.delivery_uncertain.
TEMPORARY = "temporary: "
# Providers that file SMTP-sent mail in Sent themselves; elsewhere inboxd APPENDs the Sent copy.
SERVER_FILES_SENT = frozenset({"gmail", "microsoft"})


@dataclass(frozen=True, slots=True)
class SendReport:
    row_id: int
    status: str  # what the row became: sent / queued / failed / held
    detail: str | None = None


class Outbox:
    def __init__(
        self,
        config: Config,
        store: Store,
        outbox: OutboxStore,
        connections: Connections,
        blobs: BlobStore,
        *,
        clock: Clock,
        policy: RetryPolicy | None = None,
        imap_factory: Callable[[Account, ProviderConfig], ImapSession] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._outbox = outbox
        self._connections = connections
        self._blobs = blobs
        self._clock = clock
        self._policy = policy or RetryPolicy()
        self._imap = imap_factory or connections.imap
        self._metrics = metrics or Metrics()
        self._claimed = clock.monotonic()  # when the row being processed was claimed (drain)

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded config (pauses, display names, providers, limits) from the next row on."""
        self._config = config

    def drain(self, stop: threading.Event | None = None) -> list[SendReport]:
        """Send every row that is due now (until `stop` is set: the send in flight is finished first)."""
        reports: list[SendReport] = []
        while not (stop is not None and stop.is_set()) and (row := self._outbox.claim_next()) is not None:
            claimed = self._claimed = self._clock.monotonic()
            try:
                reports.append(self._process(row))
            except Exception as exc:  # a bug or a database hiccup must not wedge the queue: retry with backoff
                log.exception("outbox.row_crashed", row=row.id)
                update = after_attempt(
                    Outcome.TEMPORARY,
                    attempts=row.attempts,
                    now=self._clock.now(),
                    error=f"{TEMPORARY}internal error ({type(exc).__name__})",
                    policy=self._policy,
                )
                # keep delivery_uncertain as the attempt left it: it may have reached SMTP before the error
                self._outbox.record(row.id, update, uncertain=None, claimed_at=row.claimed_at)
                reports.append(SendReport(row.id, update.status, update.last_error))
            self._metrics.outbox_row_done(reports[-1].status, self._clock.monotonic() - claimed)
        return reports

    def idle_wait(self) -> float:
        """Seconds until the next row becomes due (a retry, a stale claim), for the sender's sleep between drains."""
        return idle_wait(self._outbox.next_due(), self._clock.now())

    # -- one row ---------------------------------------------------------------------------------------------

    def _process(self, row: OutboxRow) -> SendReport:  # noqa: PLR0911 (one return per outcome)
        if row.unreadable is not None:
            return self._finish(row, Outcome.INVALID, row.unreadable)
        account = self._store.account_by_id(row.account_id)
        if account is None:
            return self._finish(row, Outcome.INVALID, f"account {row.account_id} does not exist")
        held = self._hold_reason(account)
        if held is not None:
            self._outbox.hold(row.id, held, self._clock.now() + HOLD, claimed_at=row.claimed_at)
            return SendReport(row.id, "held", held)
        provider = self._config.providers.get(account.provider)
        if provider is None:
            return self._finish(row, Outcome.INVALID, f"provider {account.provider!r} is not in the config")
        domain = account.email.rpartition("@")[2]
        message_id = self._outbox.fix_message_id(row.id, row.message_id_header or make_message_id(domain))
        files_sent_itself = provider.kind in SERVER_FILES_SENT
        if row.delivery_uncertain:  # an earlier attempt may have delivered (lost after DATA, or a crash)
            # Sent first, by the Message-ID alone: the row may no longer build as it did (an attachment file
            # deleted, a lower size limit, the replied-to message deleted), and a delivered mail is sent whatever
            try:
                found = self._in_sent(account, provider, message_id)
            except RetryLater as exc:
                return self._finish(row, Outcome.TEMPORARY, f"{TEMPORARY}cannot check Sent: {exc}", uncertain=True)
            if found:
                return self._sent(row, account, self._built(row, account, message_id), provider, already_filed=True)
            if found is None:  # no folder to look in (All Mail hidden from IMAP, no folder marked \Sent)
                return self._finish(
                    row,
                    Outcome.INVALID,
                    "delivery uncertain: the connection was lost after the message was handed to the server, and "
                    "the mailbox shows no Sent folder over IMAP to check; not sent again to avoid a duplicate",
                )
            if not files_sent_itself:
                return self._finish(
                    row,
                    Outcome.INVALID,
                    "delivery uncertain: the connection was lost after the message was handed to the server, and "
                    "this server keeps no Sent copy to check; not sent again to avoid a duplicate",
                )
        try:
            draft, raw = self._build(row, account, message_id)
        except InvalidDraft as exc:
            return self._finish(row, Outcome.INVALID, str(exc))
        return self._send(row, account, provider, draft, raw, files_sent_itself=files_sent_itself)

    def _build(self, row: OutboxRow, account: Account, message_id: str) -> tuple[Draft, bytes]:
        """The row's draft, checked, and its message; the same Date on every attempt. Raises InvalidDraft."""
        draft = self._draft(row, account)
        validate(draft, max_attachment_bytes=self._config.sync.max_attachment_bytes)
        return draft, build_message(draft, message_id=message_id, date=row.created_at or self._clock.now())

    def _built(self, row: OutboxRow, account: Account, message_id: str) -> bytes | None:
        """The row's message as the attempts built it, for storing the sent mail at once; None when it no longer
        builds (the next sync stores the server's copy instead)."""
        try:
            return self._build(row, account, message_id)[1]
        except InvalidDraft:
            return None

    def _send(  # noqa: PLR0911, PLR0912 (one branch and return per outcome)
        self,
        row: OutboxRow,
        account: Account,
        provider: ProviderConfig,
        draft: Draft,
        raw: bytes,
        *,
        files_sent_itself: bool,
    ) -> SendReport:
        try:  # the credentials first: a failure to read them is known not to have reached SMTP
            sender = self._connections.smtp(account, provider)
        except AccountFailed as exc:
            return self._finish(row, Outcome.REJECTED, str(exc))
        except InboxdError as exc:  # the secrets key unreadable or wrong, the database away
            return self._finish(row, Outcome.TEMPORARY, f"{TEMPORARY}{exc}")
        # write-ahead: if this process dies from here on, the next attempt checks Sent before sending again
        if not self._outbox.mark_uncertain(row.id, claimed_at=row.claimed_at):
            log.warning("outbox.claim_lost", row=row.id)  # another worker took the row over: it sends, not us
            return SendReport(row.id, "sending", "claim lost to another worker")
        try:
            result = asyncio.run(self._send_within(sender, account.email, envelope_recipients(draft), raw))
        except SendAmbiguous as exc:
            return self._finish(row, Outcome.AMBIGUOUS, f"uncertain: {exc}", uncertain=True)
        except TimeoutError:  # the attempt's own deadline (_send_within)
            limit = f"the attempt took over {self._policy.stale_after.total_seconds() * 0.9:.0f} s"
            if getattr(sender, "data_sent", True):
                return self._finish(
                    row, Outcome.AMBIGUOUS, f"uncertain: {limit} after the message went", uncertain=True
                )
            return self._finish(row, Outcome.TEMPORARY, f"{TEMPORARY}{limit}")
        except SendDailyLimit as exc:
            report = self._finish(row, Outcome.DAILY_LIMIT, str(exc))
            self._outbox.defer_account(account.id, self._clock.now() + self._policy.daily_limit_pause, str(exc))
            return report
        except SendRejected as exc:
            return self._finish(row, Outcome.REJECTED, str(exc))
        except ReauthRequired as exc:
            self._store.set_state(account.id, "needs_reauth", str(exc), error=str(exc))
            return self._finish(row, Outcome.AUTH, str(exc))
        except AccountFailed as exc:
            return self._finish(row, Outcome.REJECTED, str(exc))
        except RetryLater as exc:
            return self._finish(row, Outcome.TEMPORARY, f"{TEMPORARY}{exc}")
        except Exception as exc:  # a bug, or the token source's database away: before the message went, known safe
            if getattr(sender, "data_sent", True):
                raise  # it may have reached the server: the row keeps its mark (Outbox.drain)
            log.exception("outbox.send_crashed", row=row.id)
            return self._finish(row, Outcome.TEMPORARY, f"{TEMPORARY}internal error ({type(exc).__name__})")
        note = None
        if result.refused:
            note = "refused by the server: " + ", ".join(f"{a} ({c} {t})" for a, (c, t) in result.refused.items())
        return self._sent(row, account, raw, provider, already_filed=files_sent_itself, note=note)

    def _attempt_limit(self) -> float:
        """Seconds the send may still take: the attempt ends within 90% of stale_after from its claim, after which
        another worker (or node) takes a row in 'sending' for abandoned and sends it itself. Each SMTP step has its
        own timeout, but a hundred RCPTs, a slow final reply or a slow Sent check before could add up past it:
        two deliveries. At least a second, so that a late send fails as temporary rather than not at all."""
        spent = self._clock.monotonic() - self._claimed
        return max(self._policy.stale_after.total_seconds() * 0.9 - spent, 1.0)

    async def _send_within(self, sender: Any, from_email: str, recipients: list[str], raw: bytes) -> Any:
        return await asyncio.wait_for(
            sender.send(sender=from_email, recipients=recipients, message=raw), timeout=self._attempt_limit()
        )

    def _hold_reason(self, account: Account) -> str | None:
        if not account.enabled and account.state_reason == DISCONNECTED_REASON:  # disconnect sets enabled = false
            return "held: the mailbox was disconnected; connect it again to send"
        if not account.enabled:
            return "held: the account is disabled by the HR app"
        policy = self._config.policy_for(account.email)
        if policy.paused:
            return f"held: the account is paused ({policy.reason or 'config'})"
        if account.state == "needs_reauth":
            return "held: the recruiter must reconnect the mailbox"
        return None

    def _draft(self, row: OutboxRow, account: Account) -> Draft:
        reply = None
        if row.reply_to_message_id is not None:
            context = self._store.reply_context(account.id, row.reply_to_message_id)
            if context is None:
                raise InvalidDraft(
                    f"{row.reply_to_message_id} is not a message of {account.email}",
                    field="reply_to_message_id",
                )
            reply = ReplyContext(*context)
        return Draft(
            from_email=account.email,
            from_name=self._config.policy_for(account.email).display_name,
            to=_addresses(row.to, "to"),
            cc=_addresses(row.cc, "cc"),
            bcc=_addresses(row.bcc, "bcc"),
            subject=_text_field(row.subject, "subject") or "",
            body_text=_text_field(row.body_text, "body_text"),
            body_html=_text_field(row.body_html, "body_html"),
            attachments=self._attachments(row.attachments),
            reply_to_message=reply,
        )

    def _attachments(self, value: Any) -> tuple[OutgoingAttachment, ...]:
        """The row's files, read from the store once their number and sizes are known to be within the limits
        (MAX_ATTACHMENTS files, sync.max_attachment_bytes each and in all): one row naming a big file many times
        would otherwise be read into memory whole, and built into a message several times its size."""
        if value is None:
            return ()
        if not isinstance(value, list):
            raise InvalidDraft("attachments must be a JSON list", field="attachments")
        if len(value) > MAX_ATTACHMENTS:
            raise InvalidDraft(f"{len(value)} files, at most {MAX_ATTACHMENTS} allowed", field="attachments")
        limit = self._config.sync.max_attachment_bytes
        total = 0
        for i, item in enumerate(value):
            field = f"attachments[{i}]"
            if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in ("sha256", "filename")):
                raise InvalidDraft("needs sha256 and filename strings", field=field)
            try:
                size = self._blobs.path(item["sha256"]).stat().st_size
            except (OSError, ValueError):
                raise _no_stored_bytes(field, item["sha256"]) from None
            if size > limit:
                raise InvalidDraft(
                    f"{item['filename'][:100]!r} is {size} bytes, over the limit of {limit}", field=f"{field}.data"
                )
            total += size
        if total > limit:
            raise InvalidDraft(
                f"{total} bytes in all, over the limit of {limit} (sync.max_attachment_bytes) for one message",
                field="attachments",
            )
        out = []
        for i, item in enumerate(value):
            field = f"attachments[{i}]"
            try:
                data = self._blobs.read(item["sha256"])
            except (OSError, ValueError):
                raise _no_stored_bytes(field, item["sha256"]) from None
            content_type = item.get("content_type") or "application/octet-stream"
            out.append(OutgoingAttachment(filename=item["filename"], content_type=str(content_type), data=data))
        return tuple(out)

    def _in_sent(self, account: Account, provider: ProviderConfig, message_id: str) -> bool | None:
        """Whether the Sent mail (All Mail on Gmail) holds ``message_id``; None when the mailbox shows no such
        folder over IMAP, which proves nothing either way."""
        session = self._imap(account, provider)
        try:
            folder = _sent_folder(session)
            return None if folder is None else session.find_message_id(folder, message_id)
        finally:
            session.close()

    def _sent(
        self,
        row: OutboxRow,
        account: Account,
        raw: bytes | None,
        provider: ProviderConfig,
        *,
        already_filed: bool,
        note: str | None = None,
    ) -> SendReport:
        # the server took it: record that first, in its own transaction; everything after is best effort and
        # must never turn a delivered message into a failed (and so resent) row
        update = after_attempt(
            Outcome.SENT, attempts=row.attempts, now=self._clock.now(), error=None, policy=self._policy
        )
        self._outbox.record(row.id, update, note=note, claimed_at=row.claimed_at)
        log.info("outbox.sent", row=row.id, account=account.email, attempts=row.attempts)
        if not already_filed and raw is not None:
            try:
                self._file_in_sent(account, provider, raw)
            except Exception as exc:  # sent is sent: a missing Sent copy must not cause a second delivery
                reason = str(exc) if isinstance(exc, InboxdError) else type(exc).__name__
                copy_note = f"sent, but the copy in Sent could not be filed: {reason}"
                note = f"{note}; {copy_note}" if note else copy_note  # the refused recipients stay named
                log.warning("outbox.sent_copy_failed", row=row.id, error=reason)
        message_id = None if raw is None else self._store_sent(row, account, raw)
        try:
            self._outbox.record(row.id, update, sent_message_id=message_id, note=note, claimed_at=row.claimed_at)
        except Exception as exc:  # the row is already 'sent'; only the link to the stored copy is missing
            log.warning("outbox.sent_link_failed", row=row.id, error_kind=type(exc).__name__)
        return SendReport(row.id, "sent", note)

    def _store_sent(self, row: OutboxRow, account: Account, raw: bytes) -> int | None:
        """The sent mail in mail_messages at once (outbound, threaded); None when that failed: the next sync stores
        the Sent copy anyway. (A row whose message no longer builds has no ``raw``: the sync's copy it is.)"""
        try:
            parsed = parse_message(raw, max_attachment_bytes=self._config.sync.max_attachment_bytes)
            return self._store.store_sent(
                account.id,
                NewMessage(
                    identity=f"mid:{parsed.message_id_header}",
                    parsed=parsed,
                    folder_name="Sent",
                    direction="outbound",
                    received_at=self._clock.now(),
                    location=NewLocation(uid=0, flags=("\\Seen",), modseq=None, labels=["SENT"]),
                ),
            )
        except Exception as exc:  # the next sync stores the Sent copy anyway
            log.warning("outbox.store_sent_failed", row=row.id, error_kind=type(exc).__name__)
            return None

    def _file_in_sent(self, account: Account, provider: ProviderConfig, raw: bytes) -> None:
        session = self._imap(account, provider)
        try:
            folder = _sent_folder(session)
            if folder is None:
                raise AccountFailed("the mailbox has no folder marked \\Sent")
            parsed_id = parse_message(raw).message_id_header or ""
            if not session.find_message_id(folder, parsed_id):  # a retry may have filed it already
                session.append(folder, raw)
        finally:
            session.close()

    def _finish(self, row: OutboxRow, outcome: Outcome, error: str, *, uncertain: bool = False) -> SendReport:
        update = after_attempt(outcome, attempts=row.attempts, now=self._clock.now(), error=error, policy=self._policy)
        self._outbox.record(row.id, update, uncertain=uncertain, claimed_at=row.claimed_at)
        log.info("outbox.attempt", row=row.id, outcome=outcome.value, status=update.status, error=error)
        return SendReport(row.id, update.status, error)


def _no_stored_bytes(field: str, sha256: str) -> InvalidDraft:
    return InvalidDraft(f"no stored bytes for sha256 {sha256[:70]} in the attachment store", field=field)


def _text_field(value: Any, field: str) -> str | None:
    """A text column's value, or InvalidDraft naming it: SQLite keeps a BLOB the HR app wrote there as bytes, which
    failed deep in building the message as an internal error, retried eight times."""
    if value is None or isinstance(value, str):
        return value
    raise InvalidDraft(f"must be text, not {type(value).__name__}", field=field)


def _addresses(value: Any, field: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidDraft('must be a JSON list of "addr" or "Name <addr>" strings', field=field)
    return tuple(value)


def _sent_folder(session: ImapSession) -> str | None:
    """Where sent mail is: Gmail's All Mail (Sent is a label), else the folder marked \\Sent or, on a server that
    marks none, the one named so (planner.sent_folder: "Sent", "Sent Items", ...)."""
    folders = session.list_folders()
    if session.capabilities.gmail:
        return next((f.name for f in folders if "\\all" in {x.lower() for x in f.flags}), None)
    return sent_folder(folders)
