"""Builders for RFC 5322 test messages (stdlib email), so tests state only what matters to them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid

# (filename, MIME type "maintype/subtype", content)
Attachment = tuple[str, str, bytes]


def make_message(
    from_: str,
    to: str | Sequence[str],
    subject: str,
    body: str,
    *,
    message_id: str | None = None,
    in_reply_to: str | None = None,
    date: datetime | None = None,
    html: str | None = None,
    attachments: Iterable[Attachment] = (),
) -> bytes:
    """Return a complete message with CRLF line endings, ready for SMTP or IMAP APPEND.

    ``message_id`` defaults to a fresh ``<...@example.test>``; ``in_reply_to`` also sets References.
    ``html`` makes the body multipart/alternative; attachments make it multipart/mixed.
    """
    msg = EmailMessage(policy=SMTP)
    msg["From"] = from_
    msg["To"] = to if isinstance(to, str) else ", ".join(to)
    msg["Subject"] = subject
    msg["Date"] = format_datetime(date or datetime.now(UTC))
    msg["Message-ID"] = message_id or make_msgid(domain="example.test")
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
        msg["References"] = in_reply_to
    msg.set_content(body)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    for filename, mime_type, content in attachments:
        maintype, _, subtype = mime_type.partition("/")
        msg.add_attachment(content, maintype=maintype, subtype=subtype or "octet-stream", filename=filename)
    return msg.as_bytes()
