"""Contacts in the HR contract, on SQLite and PostgreSQL: the view mail_contact_messages (a contact's messages,
Gmail dot/+tag variants included, once each, in one indexed query), the address keys migration 0004 fills in, and
`inboxd contacts forget` (GDPR erasure: everything of that contact goes, nothing of anyone else's)."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command

from inboxd import db
from inboxd.blobs import BlobStore
from inboxd.cli import main
from inboxd.clock import FakeClock
from inboxd.crypto import SecretBox
from inboxd.forget import StoredMessage, forget_contact, plan_erasure
from inboxd.models import (
    ContactBackfill,
    MailAccount,
    MailAttachment,
    MailContact,
    MailLocation,
    MailMessage,
    MailParticipant,
    MailThread,
)
from inboxd.parse import parse_message
from inboxd.scope import normalize_address
from inboxd.store import Account, Credential, NewLocation, NewMessage, Store

accounts_t = MailAccount.__table__  # type: ignore[attr-defined]
attachments_t = MailAttachment.__table__  # type: ignore[attr-defined]
backfills_t = ContactBackfill.__table__  # type: ignore[attr-defined]
contacts_t = MailContact.__table__  # type: ignore[attr-defined]
locations_t = MailLocation.__table__  # type: ignore[attr-defined]
messages_t = MailMessage.__table__  # type: ignore[attr-defined]
participants_t = MailParticipant.__table__  # type: ignore[attr-defined]
threads_t = MailThread.__table__  # type: ignore[attr-defined]

REC = "rec@corp.test"
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
PDF = b"%PDF-1.4 only jane's CV"
SHARED = b"the company brochure, sent to several candidates"

EMAILS_TAB = """
SELECT message_id, subject, direction, account_email, hr_user_ref, hr_contact_ref, attachment_count,
       has_attachments, provider_thread_id, thread_id
FROM mail_contact_messages
WHERE contact_id = :contact_id AND deleted_at IS NULL
ORDER BY sent_at DESC
"""


@dataclass
class Mailbox:
    """One recruiter's mailbox in the database, filled through Store.store_batch as the sync engine does."""

    store: Store
    account: Account
    folder_id: int
    blobs: BlobStore
    uid: int = 0
    ids: dict[str, int] = field(default_factory=dict)

    def deliver(
        self,
        name: str,
        *,
        sender: str,
        to: str,
        cc: str | None = None,
        reply_to: str | None = None,
        references: str | None = None,
        attachments: tuple[tuple[str, bytes, bool], ...] = (),
    ) -> int:
        msg = EmailMessage()
        msg["From"] = sender
        msg["To"] = to
        if cc:
            msg["Cc"] = cc
        msg["Subject"] = f"about {name}"
        msg["Message-ID"] = f"<{name}@mail.test>"
        msg["Date"] = format_datetime(T0 + timedelta(minutes=len(self.ids)))
        if reply_to:
            msg["In-Reply-To"] = f"<{reply_to}@mail.test>"
        if references:
            msg["References"] = f"<{references}@mail.test>"
        msg.set_content(f"body of {name}")
        for filename, data, inline in attachments:
            msg.add_attachment(
                data,
                maintype="application",
                subtype="octet-stream",
                filename=filename,
                disposition="inline" if inline else "attachment",
            )
        raw = msg.as_bytes()
        parsed = parse_message(raw)
        self.uid += 1
        new = NewMessage(
            identity=f"mid:{name}@mail.test",
            parsed=parsed,
            folder_name="INBOX",
            direction="outbound" if parsed.from_email == REC else "inbound",
            received_at=None,
            location=NewLocation(self.uid, (), None),
        )
        inserted = self.store.store_batch(self.account.id, self.folder_id, [new], {}, last_uid=self.uid)
        self.ids[name] = inserted[0]
        return inserted[0]


@pytest.fixture
def mailbox(engine: sa.Engine, secret_box: SecretBox, tmp_path: Path) -> Mailbox:
    blobs = BlobStore(tmp_path / "attachments")
    store = Store(engine, clock=FakeClock(), secret_box=secret_box, blobs=blobs)
    account = store.add_account(REC, "fake", Credential("password", "x"), hr_user_ref="recruiter-7")
    folder = store.ensure_folder(account.id, "INBOX", None)
    return Mailbox(store, account, folder.id, blobs)


def add_contact(engine: sa.Engine, email: str, ref: str) -> int:
    with engine.begin() as conn:
        return int(conn.execute(contacts_t.insert().values(email=email, hr_contact_ref=ref)).inserted_primary_key[0])


def emails_tab(engine: sa.Engine, contact_id: int) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text(EMAILS_TAB), {"contact_id": contact_id}).all())


# --- the view -----------------------------------------------------------------------------------------------


def test_view_lists_a_contacts_messages_once_with_gmail_variants_direction_and_attachment_count(
    mailbox: Mailbox, engine: sa.Engine
) -> None:
    """Jane (written with capitals by the HR app) matches her googlemail/+tag/dot variants; a message where she is
    both From and Cc is one row; a message shared with Bob is in both tabs; a deleted message leaves the tab;
    attachment_count ignores inline parts; the account (recruiter) and thread come along."""
    jane = add_contact(engine, "Jane.Doe@Gmail.com", "cand-1")
    bob = add_contact(engine, "bob@example.org", "cand-2")
    mailbox.deliver(
        "m1",
        sender="Jane <Jane.Doe+jobs@googlemail.com>",
        to=REC,
        cc="janedoe@gmail.com",
        attachments=(("cv.pdf", PDF, False), ("logo.png", SHARED, True)),
    )
    mailbox.deliver("m2", sender=REC, to="j.a.n.e.doe@gmail.com", reply_to="m1")
    mailbox.deliver("m3", sender="bob@example.org", to=REC, cc="JANE.DOE@gmail.com")
    mailbox.deliver("m4", sender="someone@else.test", to=REC)
    mailbox.deliver("m5", sender="jane.doe@example.com", to=REC)  # dots count outside Gmail: not Jane
    mailbox.deliver("m6", sender="jane.doe@gmail.com", to=REC)
    with engine.begin() as conn:
        conn.execute(messages_t.update().where(messages_t.c.id == mailbox.ids["m6"]).values(deleted_at=T0))

    rows = emails_tab(engine, jane)
    assert [r.subject for r in rows] == ["about m3", "about m2", "about m1"]  # newest first
    by_subject = {r.subject: r for r in rows}
    assert by_subject["about m1"].direction == "inbound"
    assert by_subject["about m2"].direction == "outbound"
    assert by_subject["about m1"].attachment_count == 1
    assert bool(by_subject["about m1"].has_attachments) is True
    assert by_subject["about m3"].attachment_count == 0
    assert {r.account_email for r in rows} == {REC}
    assert {r.hr_user_ref for r in rows} == {"recruiter-7"}
    assert {r.hr_contact_ref for r in rows} == {"cand-1"}
    assert by_subject["about m2"].thread_id == by_subject["about m1"].thread_id
    assert by_subject["about m1"].provider_thread_id == "m1@mail.test"
    assert [r.subject for r in emails_tab(engine, bob)] == ["about m3"]

    with engine.connect() as conn:  # without the deleted_at filter the deleted message is there, once
        all_rows = conn.execute(
            sa.text("SELECT message_id, deleted_at FROM mail_contact_messages WHERE contact_id = :c"), {"c": jane}
        ).all()
    assert sorted(r.message_id for r in all_rows) == sorted(mailbox.ids[m] for m in ("m1", "m2", "m3", "m6"))


ADDRESSES = [
    "Jane.Doe+jobs@GoogleMail.com",
    "j.a.n.e.doe@gmail.com",
    "a+b+c@gmail.com",
    "x.y+z@example.org",
    "Plain@Example.ORG",
    "first.last@gmail.com.example.net",
]


def test_migration_0004_fills_address_keys_like_normalize_address(engine: sa.Engine) -> None:
    """Participants stored before 0004 get the key the daemon computes (the view's SQL rule is the same one);
    downgrade and upgrade run both ways."""
    with engine.begin() as conn:
        command.downgrade(db._alembic_config(conn), "0003")
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO mail_accounts (id, email, provider, enabled, state, created_at, updated_at) "
                "VALUES (1, 'rec@corp.test', 'p', :t, 'active', :now, :now)"
            ),
            {"t": True, "now": T0.replace(tzinfo=None)},
        )
        conn.execute(
            sa.text(
                "INSERT INTO mail_messages (id, account_id, provider_message_id, direction, is_read, has_attachments,"
                " created_at, updated_at) VALUES (1, 1, 'mid:x', 'inbound', :f, :f, :now, :now)"
            ),
            {"f": False, "now": T0.replace(tzinfo=None)},
        )
        for email in ADDRESSES:
            conn.execute(
                sa.text("INSERT INTO mail_participants (message_id, role, email) VALUES (1, 'to', :e)"), {"e": email}
            )
    db.upgrade(engine)
    with engine.connect() as conn:
        keys = {r.email: r.address_key for r in conn.execute(sa.select(participants_t))}
    assert keys == {email: normalize_address(email) for email in ADDRESSES}


def test_view_matches_contacts_written_in_any_variant_like_normalize_address(
    mailbox: Mailbox, engine: sa.Engine
) -> None:
    """The contact-side key is computed in SQL: each way of writing an address finds exactly the messages whose
    participants normalize_address() puts with it."""
    for n, email in enumerate(ADDRESSES):
        mailbox.deliver(f"v{n}", sender=email, to=REC)
    for n, email in enumerate(ADDRESSES):
        contact = add_contact(engine, email.upper() if n % 2 else email, f"c{n}")
        want = {
            mailbox.ids[f"v{i}"]
            for i, other in enumerate(ADDRESSES)
            if normalize_address(other) == normalize_address(email)
        }
        assert {r.message_id for r in emails_tab(engine, contact)} == want


def test_emails_tab_is_one_indexed_query(engine: sa.Engine) -> None:
    """With 2000 messages, 6000 participants and 200 contacts (statistics gathered), the Emails-tab query looks the
    contact's messages up through ix_mail_participants_address_key, never by scanning mail_participants."""
    now = T0
    with engine.begin() as conn:
        conn.execute(
            accounts_t.insert().values(id=1, email=REC, provider="p", created_at=now, updated_at=now, hr_user_ref="r")
        )
        conn.execute(
            contacts_t.insert(), [{"email": f"cand.{i}@gmail.com", "hr_contact_ref": f"c{i}"} for i in range(200)]
        )
        conn.execute(
            messages_t.insert(),
            [
                {
                    "id": i,
                    "account_id": 1,
                    "provider_message_id": f"mid:{i}",
                    "direction": "inbound",
                    "sent_at": now - timedelta(minutes=i),
                    "created_at": now,
                    "updated_at": now,
                }
                for i in range(1, 2001)
            ],
        )
        rows = []
        for i in range(1, 2001):
            for role, email in (
                ("from", f"cand.{i % 250}@gmail.com"),
                ("to", REC),
                ("cc", f"cand{i % 250}+x@gmail.com"),
            ):
                rows.append({"message_id": i, "role": role, "email": email, "address_key": normalize_address(email)})
        conn.execute(participants_t.insert(), rows)
        conn.execute(sa.text("ANALYZE"))
        contact = conn.execute(sa.select(contacts_t.c.id).where(contacts_t.c.email == "cand.7@gmail.com")).scalar()
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as conn:
        assert len(conn.execute(sa.text(EMAILS_TAB), {"contact_id": contact}).all()) == 8
        explain = "EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN "
        plan = "\n".join(str(r[-1]) for r in conn.execute(sa.text(explain + EMAILS_TAB), {"contact_id": contact}))
    assert "ix_mail_participants_address_key" in plan, plan
    if sqlite:
        assert "SCAN p" not in plan and "SCAN q" not in plan and "SCAN m" not in plan, plan
    else:
        assert "Seq Scan on mail_participants" not in plan and "Seq Scan on mail_messages" not in plan, plan


# --- forgetting ---------------------------------------------------------------------------------------------


def test_plan_erasure_keeps_shared_messages_and_conversations_another_contact_is_in() -> None:
    """Linked and alone: goes. Linked with another contact: stays. The rest of a conversation goes with it unless
    another contact is still in that conversation."""
    messages = {
        1: StoredMessage(10, frozenset({"jane@x.test", "rec@corp.test"})),
        2: StoredMessage(10, frozenset({"rec@corp.test", "colleague@corp.test"})),  # forward inside jane's thread
        3: StoredMessage(20, frozenset({"jane@x.test", "bob@x.test"})),  # shared with bob
        4: StoredMessage(20, frozenset({"jane@x.test"})),
        5: StoredMessage(20, frozenset({"rec@corp.test"})),  # bob's conversation goes on
        6: StoredMessage(None, frozenset({"jane@x.test"})),
    }
    erasure = plan_erasure("jane@x.test", messages, frozenset({"bob@x.test", "carol@x.test"}))
    assert erasure.delete == {1, 2, 4, 6}
    assert erasure.shared == {3}


@dataclass
class Scene:
    jane: int
    bob: int
    carol: int


@pytest.fixture
def scene(mailbox: Mailbox, engine: sa.Engine) -> Scene:
    """Jane's conversation (with an internal forward in it), a thread Bob started that Jane is on and answered
    alone, and Carol's mail carrying an attachment whose bytes Jane's mail carries too."""
    scene = Scene(
        add_contact(engine, "jane.doe@gmail.com", "cand-1"),
        add_contact(engine, "bob@example.org", "cand-2"),
        add_contact(engine, "carol@example.net", "cand-3"),
    )
    mailbox.deliver(
        "a1", sender="janedoe+x@gmail.com", to=REC, attachments=(("cv.pdf", PDF, False), ("b.pdf", SHARED, False))
    )
    mailbox.deliver("a2", sender=REC, to="Jane.Doe@gmail.com", reply_to="a1", references="a1")
    mailbox.deliver("a3", sender=REC, to="colleague@corp.test", references="a1")  # forward: no candidate on it
    mailbox.deliver("ab", sender="bob@example.org", to=REC, cc="jane.doe@gmail.com")
    mailbox.deliver("a4", sender="jane.doe@gmail.com", to=REC, reply_to="ab")
    mailbox.deliver("c1", sender="carol@example.net", to=REC, attachments=(("b.pdf", SHARED, False),))
    mailbox.store.mark_backfilled(mailbox.account.id, ["janedoe@gmail.com", "carol@example.net"])
    age_files(mailbox.blobs.root)
    return scene


def age_files(root: Path, seconds: float = 3600) -> None:
    """Files stored an hour ago: forgetting keeps a file written less than forget.IN_FLIGHT before it began (a sync
    storing the same bytes may not have committed the row yet), for the daily collection to take."""
    past = time.time() - seconds
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, (past, past))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_forget_removes_everything_of_the_contact_and_nothing_else(
    scene: Scene, mailbox: Mailbox, engine: sa.Engine
) -> None:
    """Jane's messages (and her conversation's internal forward) go with their participants, attachment rows,
    locations, files and thread; the message she shares with Bob stays; Bob's thread is recounted; Carol's mail and
    the bytes it shares with Jane's stay; Jane's contact row and backfill marks go."""
    ids = mailbox.ids
    with engine.connect() as conn:
        thread_of = {r.id: r.thread_id for r in conn.execute(sa.select(messages_t))}
    assert thread_of[ids["a3"]] == thread_of[ids["a1"]]  # the forward is in Jane's conversation
    assert mailbox.blobs.has(sha(PDF)) and mailbox.blobs.has(sha(SHARED))

    report = forget_contact(engine, mailbox.blobs, "Jane.Doe@GMAIL.com")

    kept = {ids["ab"], ids["c1"]}
    with engine.connect() as conn:
        assert set(conn.execute(sa.select(messages_t.c.id)).scalars()) == kept
        assert set(conn.execute(sa.select(participants_t.c.message_id)).scalars()) == kept
        assert set(conn.execute(sa.select(locations_t.c.message_id)).scalars()) == kept
        assert list(conn.execute(sa.select(attachments_t.c.message_id)).scalars()) == [ids["c1"]]
        threads = {r.id: r for r in conn.execute(sa.select(threads_t))}
        contacts = set(conn.execute(sa.select(contacts_t.c.email)).scalars())
        backfills = set(conn.execute(sa.select(backfills_t.c.email)).scalars())
    assert thread_of[ids["a1"]] not in threads
    bob_thread = threads[thread_of[ids["ab"]]]
    assert bob_thread.message_count == 1 and bob_thread.subject == "about ab"
    assert contacts == {"bob@example.org", "carol@example.net"}
    assert backfills == {"carol@example.net"}
    assert not mailbox.blobs.has(sha(PDF))
    assert mailbox.blobs.has(sha(SHARED))
    assert [r.subject for r in emails_tab(engine, scene.bob)] == ["about ab"]
    assert emails_tab(engine, scene.jane) == []
    assert report.counts() == {
        "contacts": 1,
        "messages": 4,
        "participants": 8,
        "attachments": 2,
        "locations": 4,
        "threads_deleted": 1,
        "threads_updated": 1,
        "backfills": 1,
        "attachment_files_deleted": 1,
        "attachment_files_kept": 1,
        "messages_kept_shared": 1,
    }


def test_forget_dry_run_changes_nothing(scene: Scene, mailbox: Mailbox, engine: sa.Engine) -> None:
    """The preview the CLI shows before asking counts the same but deletes no row and no file."""
    with engine.connect() as conn:
        before = conn.execute(sa.select(sa.func.count()).select_from(messages_t)).scalar()
    report = forget_contact(engine, mailbox.blobs, "jane.doe@gmail.com", dry_run=True)
    assert report.messages == 4 and report.contacts == 1
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(messages_t)).scalar() == before
        assert conn.execute(sa.select(sa.func.count()).select_from(contacts_t)).scalar() == 3
    assert mailbox.blobs.has(sha(PDF))


def test_forget_after_the_hr_app_deleted_the_contact_still_erases_the_mail(
    scene: Scene, mailbox: Mailbox, engine: sa.Engine
) -> None:
    """The HR app may delete the mail_contacts row first: the mail is found by its participants' keys."""
    with engine.begin() as conn:
        conn.execute(contacts_t.delete().where(contacts_t.c.id == scene.jane))
    report = forget_contact(engine, mailbox.blobs, "jane.doe@gmail.com")
    assert report.contacts == 0 and report.messages == 4


# --- the command --------------------------------------------------------------------------------------------


def write_config(tmp_path: Path, db_url: str, *, scope: str = "contacts") -> Path:
    path = tmp_path / "inboxd.toml"
    path.write_text(
        f'[database]\nurl = "{db_url}"\n[secrets]\nkey_file = "{tmp_path}/secret.key"\n'
        f'[sync]\nscope = "{scope}"\nattachments_dir = "{tmp_path}/attachments"\n'
    )
    return path


def test_cli_forget_prints_counts_and_exits_0(
    scene: Scene, mailbox: Mailbox, db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`contacts forget EMAIL --yes` deletes and prints what it deleted, as counts; the address is not logged."""
    code = main(["--config", str(write_config(tmp_path, db_url)), "contacts", "forget", "jane.doe@gmail.com", "--yes"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "deleted for janedoe@gmail.com" in out
    counts = dict(line.split() for line in out.splitlines() if line.split() and line.split()[-1].isdigit())
    assert counts["messages"] == "4" and counts["contacts"] == "1" and counts["attachment_files_deleted"] == "1"
    assert "1 message(s) kept" in out and "mail_quarantine" in out
    assert "jane" not in err
    assert not mailbox.blobs.has(sha(PDF))


def test_cli_forget_unknown_contact_exits_2(db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An address with no contact row and no stored mail: exit 2, nothing to forget, said plainly."""
    code = main(["--config", str(write_config(tmp_path, db_url)), "contacts", "forget", "nobody@example.org", "--yes"])
    _, err = capsys.readouterr()
    assert code == 2
    assert "no contact and no stored mail for nobody@example.org" in err


def test_cli_forget_refuses_without_yes_off_a_terminal_and_with_scope_all(
    scene: Scene, engine: sa.Engine, db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No --yes and no terminal to ask on: exit 2, nothing deleted. Scope "all" would store the mail again: exit 2."""
    config = write_config(tmp_path, db_url)
    assert main(["--config", str(config), "contacts", "forget", "jane.doe@gmail.com"]) == 2
    assert "--yes" in capsys.readouterr().err
    config_all = write_config(tmp_path, db_url, scope="all")
    assert main(["--config", str(config_all), "contacts", "forget", "jane.doe@gmail.com", "--yes"]) == 2
    assert 'sync.scope is "all"' in capsys.readouterr().err
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(contacts_t)).scalar() == 3
