"""The README demo: seed a recruiter's mailbox with a candidate exchange, sync it with inboxd, print the timeline.

Runs against the loopback stack started by tests/demo (Dovecot + Postfix + local OAuth server) and SQLite.
"""

from __future__ import annotations

import base64
import smtplib
import sqlite3
import subprocess
import sys
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import MailStack, make_message

ROOT = Path(__file__).resolve().parent.parent
INBOXD = str(ROOT / ".venv" / "bin" / "inboxd")


def inboxd(config: Path, *args: str) -> None:
    print(f"$ inboxd {' '.join(args)}", flush=True)
    subprocess.run([INBOXD, "--config", str(config), *args], check=True)


def main() -> int:
    stack = MailStack.start()
    work = Path(tempfile.mkdtemp(prefix="inboxd-demo-"))
    tag = uuid.uuid4().hex[:6]
    recruiter = f"rita-{tag}@example.test"
    candidate = f"carl-{tag}@example.org"
    config = work / "inboxd.toml"
    config.write_text(f"""# demo config (see config/inboxd.toml for every key)
state_dir = "{work / "state"}"
[sync]
scope = "all"
[providers.local]
kind = "imap"
imap_host = "127.0.0.1"
imap_port = {stack.imap_port}
imap_tls = "starttls"
auth = "oauth2"
token_uri = "{stack.token_uri}"
client_id = "{stack.client_id}"
client_secret = "{stack.client_secret}"
ca_file = "{stack.ca_cert}"
""")
    token_file = work / "refresh-token"
    token_file.write_text(stack.refresh_token(recruiter))
    token_file.chmod(0o600)

    inboxd(config, "secrets", "init")
    inboxd(config, "db", "upgrade")
    inboxd(config, "accounts", "add", recruiter, "--provider", "local", "--refresh-token-file", str(token_file))

    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=2)
    print(f"\nseeding: {candidate} applies, {recruiter} replies over SMTP (XOAUTH2), the candidate answers")
    application = make_message(
        f"Carl Candidate <{candidate}>",
        recruiter,
        "Application: Senior Backend Engineer",
        "Hi Rita,\n\nplease find my application for the backend role.\n\nCarl",
        message_id=f"<application-{tag}@example.org>",
        date=start,
        attachments=[("cv.pdf", "application/pdf", b"%PDF-1.4 demo cv")],
    )
    stack.deliver(recruiter, application)
    reply = make_message(
        f"Rita Recruiter <{recruiter}>",
        candidate,
        "Re: Application: Senior Backend Engineer",
        "Hi Carl,\n\nthanks! Are you free for a call on Thursday?\n\nRita",
        message_id=f"<reply-{tag}@example.test>",
        in_reply_to=f"<application-{tag}@example.org>",
        date=start + timedelta(hours=3),
    )
    with smtplib.SMTP("127.0.0.1", stack.submission_port, timeout=10) as smtp:
        smtp.starttls()
        smtp.ehlo()
        access = stack.access_token(recruiter)
        sasl = base64.b64encode(f"user={recruiter}\x01auth=Bearer {access}\x01\x01".encode()).decode()
        smtp.docmd("AUTH", "XOAUTH2 " + sasl)
        smtp.sendmail(recruiter, [candidate], reply)
    with stack.admin_imap(recruiter) as imap:  # a generic server keeps no Sent copy: the client files it
        imap.append("Sent", reply, flags=[b"\\Seen"])
    stack.deliver(
        recruiter,
        make_message(
            f"Carl Candidate <{candidate}>",
            recruiter,
            "Re: Application: Senior Backend Engineer",
            "Thursday 10:00 works for me.\n\nCarl",
            message_id=f"<answer-{tag}@example.org>",
            in_reply_to=f"<reply-{tag}@example.test>",
            date=start + timedelta(hours=20),
        ),
    )
    stack.deliver(
        recruiter,
        make_message(
            "Newsletter <news@example.org>",
            recruiter,
            "Weekly digest",
            "not a candidate",
            message_id=f"<news-{tag}@example.org>",
        ),
    )

    print()
    inboxd(config, "run", "--once")
    print()
    inboxd(config, "status")

    db = sqlite3.connect(work / "state" / "inboxd.db")
    rows = db.execute(
        """SELECT m.sent_at, m.direction, m.from_email, m.subject, m.snippet, m.thread_id,
                  (SELECT COUNT(*) FROM mail_attachments a WHERE a.message_id = m.id AND NOT a.is_inline)
           FROM mail_messages m
           WHERE m.deleted_at IS NULL AND m.id IN (SELECT message_id FROM mail_participants WHERE email = ?)
           ORDER BY m.sent_at""",
        (candidate,),
    ).fetchall()
    print(f"\nTimeline of {candidate} (from {work / 'state' / 'inboxd.db'}):")
    for sent_at, direction, sender, subject, snippet, thread_id, attachments in rows:
        arrow = "->" if direction == "outbound" else "<-"
        clip = f"  [{attachments} attachment(s)]" if attachments else ""
        print(f"  {sent_at[:16]}  {arrow} {direction:<8} thread {thread_id}  {sender}: {subject}{clip}")
        print(f"      {snippet[:90]}")
    ok = len(rows) == 3 and len({r[5] for r in rows}) == 1
    print("\ndemo OK: 3 messages, one thread" if ok else "\ndemo FAILED: expected 3 messages in one thread")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
