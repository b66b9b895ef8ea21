"""The sync engine against a model: any sequence of server changes, synced at any points, ends with the database
equal to the mailbox (no loss, no duplicates), on SQLite and PostgreSQL, for every capability set."""

from __future__ import annotations

import imaplib
import uuid
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inboxd.clock import FakeClock
from inboxd.crypto import SecretBox
from inboxd.errors import RetryLater, SessionExpired
from inboxd.imap import FlagUpdate
from inboxd.models import MailFolder, MailLocation, MailMessage, MailQuarantine
from inboxd.planner import Capabilities, message_identity
from inboxd.scope import contact_set
from inboxd.store import Credential, Store
from inboxd.sync import AccountSync, SyncSettings
from inboxd.testing import FakeMailbox, FakeSession, message_id_of

messages_t = MailMessage.__table__  # type: ignore[attr-defined]
locations_t = MailLocation.__table__  # type: ignore[attr-defined]
folders_t = MailFolder.__table__  # type: ignore[attr-defined]
quarantine_t = MailQuarantine.__table__  # type: ignore[attr-defined]

CAPS = {
    "qresync": Capabilities(condstore=True, qresync=True),
    "condstore": Capabilities(condstore=True, qresync=False),
    "plain": Capabilities(condstore=False, qresync=False),
}
FOLDERS = ["INBOX", "Sent", "Archive"]


def raw_message(n: int, *, with_id: bool = True) -> bytes:
    mid = f"Message-ID: <m{n}@example.test>\r\n" if with_id else ""
    return (
        f"From: Cand {n} <cand{n}@example.org>\r\nTo: rec@example.test\r\nSubject: hello {n}\r\n"
        f"Date: Mon, 02 Nov 2026 10:{n % 60:02d}:00 +0000\r\n{mid}\r\nbody {n}\r\n"
    ).encode()


op = st.one_of(
    st.tuples(st.just("append"), st.sampled_from(FOLDERS), st.integers(0, 12), st.booleans(), st.booleans()),
    st.tuples(st.just("flag"), st.sampled_from(FOLDERS), st.integers(0, 50), st.booleans()),
    st.tuples(st.just("expunge"), st.sampled_from(FOLDERS), st.integers(0, 50)),
    st.tuples(st.just("move"), st.sampled_from(FOLDERS), st.integers(0, 50), st.sampled_from(FOLDERS)),
    st.tuples(st.just("renumber"), st.sampled_from(FOLDERS)),
    st.tuples(st.just("sync")),
)


def apply(mb: FakeMailbox, step: tuple) -> None:  # type: ignore[type-arg]
    kind = step[0]
    if kind == "append":
        _, folder, n, seen, with_id = step
        mb.append(folder, raw_message(n, with_id=with_id), ["\\Seen"] if seen else [])
        return
    if kind == "renumber":
        mb.renumber(step[1])
        return
    folder = mb.folders[step[1]]
    if not folder.messages:
        return
    uid = sorted(folder.messages)[step[2] % len(folder.messages)]
    if kind == "flag":
        mb.set_flags(step[1], uid, ["\\Seen"] if step[3] else [])
    elif kind == "expunge":
        mb.expunge(step[1], uid)
    elif kind == "move" and step[3] != step[1]:
        mb.move(step[1], uid, step[3])


def expected_state(mb: FakeMailbox, store_ids: dict[str, str]) -> dict[str, tuple[list[str], bool]]:
    """identity -> (labels, is_read) for every message present in a synced folder."""
    present: dict[str, tuple[set[str], bool]] = {}
    for folder in mb.folders.values():
        for msg in folder.messages.values():
            ident = message_identity(message_id_of(msg.raw), msg.raw)
            assert ident is not None
            labels, seen = present.get(ident, (set(), False))
            present[ident] = (labels | {folder.name}, seen or "\\Seen" in msg.flags)
    return {k: (sorted(v[0]), v[1]) for k, v in present.items()}


@pytest.mark.parametrize("caps_name", sorted(CAPS))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(op, max_size=30))
def test_any_change_sequence_converges_to_the_mailbox(
    engine: sa.Engine,
    secret_box: SecretBox,
    caps_name: str,
    steps: list[tuple],  # type: ignore[type-arg]
) -> None:
    caps = CAPS[caps_name]
    clock = FakeClock()
    store = Store(engine, clock=clock, secret_box=secret_box)
    account = store.add_account(f"rec-{uuid.uuid4().hex[:10]}@example.test", "fake", Credential("password", "x"))
    mb = FakeMailbox()
    mb.add_folder("Sent", "\\Sent")
    mb.add_folder("Archive", "\\Archive")
    # A flag scan on every sync: without CONDSTORE, flags are only as fresh as the last scan (tested separately).
    settings_ = SyncSettings(batch_size=3, flag_scan_interval=timedelta(0))

    def sync() -> None:
        AccountSync(store, account, FakeSession(mb, caps), settings=settings_, clock=clock).run()
        clock.advance(1)

    ever_seen: set[str] = set()
    for step in [*steps, ("sync",)]:
        if step[0] == "sync":
            sync()
            ever_seen |= set(expected_state(mb, {}))
        else:
            apply(mb, step)

    want = expected_state(mb, {})
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(messages_t).where(messages_t.c.account_id == account.id)).all()
    got_live = {r.provider_message_id: (sorted(r.labels or []), r.is_read) for r in rows if r.deleted_at is None}
    got_deleted = {r.provider_message_id for r in rows if r.deleted_at is not None}
    assert got_live == want
    # Every message ever synced has exactly one row; the ones gone from every folder are marked deleted, not lost.
    assert len(rows) == len({r.provider_message_id for r in rows})
    assert got_deleted == (ever_seen - set(want))


def test_unchanged_mailbox_costs_one_status_per_folder(store: Store) -> None:
    account = store.add_account("quiet@example.test", "fake", Credential("password", "x"))
    mb = FakeMailbox()
    mb.add_folder("Sent", "\\Sent")
    for n in range(5):
        mb.append("INBOX", raw_message(n))
    clock = FakeClock()
    caps = CAPS["condstore"]
    AccountSync(store, account, FakeSession(mb, caps), settings=SyncSettings(), clock=clock).run()
    mb.commands.clear()
    folder_reads: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM inboxd_folders" in statement:
            folder_reads.append(statement)

    sa.event.listen(store.engine, "before_cursor_execute", count)
    try:
        stats = AccountSync(store, account, FakeSession(mb, caps), settings=SyncSettings(), clock=clock).run()
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", count)
    assert mb.commands == ["LIST", "STATUS", "STATUS"]
    assert stats.folders_unchanged == 2
    assert len(folder_reads) == 1  # Store.prepare_folders: the folder table once per sync, not once per folder


def test_uidvalidity_change_remaps_without_downloading_bodies(store: Store) -> None:
    account = store.add_account("remap@example.test", "fake", Credential("password", "x"))
    mb = FakeMailbox()
    for n in range(7):
        mb.append("INBOX", raw_message(n))
    clock = FakeClock()
    caps = CAPS["qresync"]
    AccountSync(store, account, FakeSession(mb, caps), settings=SyncSettings(), clock=clock).run()
    mb.renumber("INBOX")
    mb.commands.clear()
    stats = AccountSync(store, account, FakeSession(mb, caps), settings=SyncSettings(), clock=clock).run()
    assert "FETCH bodies" not in mb.commands
    assert stats.remapped == 7
    assert stats.new_messages == 0


class DropsOneBody(FakeSession):
    """A server that once answers a body FETCH without the body of its lowest message (bodies-first, as in a first
    sync, and header-first)."""

    dropped = False

    def fetch_bodies(self, uids):  # type: ignore[no-untyped-def]
        bodies = super().fetch_bodies(uids)
        if not DropsOneBody.dropped and bodies:
            DropsOneBody.dropped = True
            bodies.pop(min(bodies))
        return bodies

    def fetch_messages(self, uids):  # type: ignore[no-untyped-def]
        fetched = super().fetch_messages(uids)
        if not DropsOneBody.dropped and fetched:
            DropsOneBody.dropped = True
            uid = min(fetched)
            fetched[uid] = (None, fetched[uid][1])
        return fetched


def _stored(store: Store, account_id: int) -> int:
    with store.engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count()).select_from(messages_t).where(messages_t.c.account_id == account_id)
            ).scalar_one()
        )


def _stored_flags(store: Store, account_id: int, uid: int) -> list[str]:
    with store.engine.connect() as conn:
        return list(
            conn.execute(
                sa.select(locations_t.c.flags)
                .join(folders_t, folders_t.c.id == locations_t.c.folder_id)
                .where(folders_t.c.account_id == account_id, locations_t.c.uid == uid)
            ).scalar_one()
        )


@pytest.mark.parametrize("bodies_first", [True, False])
def test_a_missing_body_is_fetched_again_not_skipped(store: Store, bodies_first: bool) -> None:
    """The body of the first batch's first message did not come: the cursor stays below it through the later
    batches of the same sync (a later batch's cursor used to jump past it, and it was never fetched again)."""
    DropsOneBody.dropped = False
    account = store.add_account(f"gaps-{bodies_first}@example.test", "fake", Credential("password", "x"))
    mb = FakeMailbox()
    for n in range(8):
        mb.append("INBOX", raw_message(n))
    clock = FakeClock()
    caps = CAPS["qresync"]
    settings = SyncSettings(batch_size=2, bodies_first=bodies_first)
    AccountSync(store, account, DropsOneBody(mb, caps), settings=settings, clock=clock).run()
    assert DropsOneBody.dropped
    assert _stored(store, account.id) == 7
    AccountSync(store, account, FakeSession(mb, caps), settings=settings, clock=clock).run()
    assert _stored(store, account.id) == 8, "the cursor stopped before the message whose body did not come"


class WithholdsBodies(FakeSession):
    """A server that sends no body for these UIDs (bodies-first and header-first)."""

    def __init__(self, mailbox: FakeMailbox, caps: Capabilities, uids: set[int]) -> None:
        super().__init__(mailbox, caps)
        self._uids = uids

    def fetch_bodies(self, uids):  # type: ignore[no-untyped-def]
        return {uid: body for uid, body in super().fetch_bodies(uids).items() if uid not in self._uids}

    def fetch_messages(self, uids):  # type: ignore[no-untyped-def]
        fetched = super().fetch_messages(uids)
        return {uid: (None, meta) if uid in self._uids else (body, meta) for uid, (body, meta) in fetched.items()}


class NeverSendsOneBody(WithholdsBodies):
    """A server that never returns the body of one message (bodies-first and header-first)."""

    def __init__(self, mailbox: FakeMailbox, caps: Capabilities, uid: int) -> None:
        super().__init__(mailbox, caps, {uid})


def test_a_body_the_server_never_sends_is_quarantined_after_three_syncs(store: Store) -> None:
    """A missing body holds the cursor so that the next sync fetches it again; one the server never sends would
    hold it for good, and every sync would read every UID after it again. After three syncs in a row it is
    quarantined (no bytes) and the cursor moves on; a body that comes meanwhile starts the count over."""
    account = store.add_account("never@example.test", "fake", Credential("password", "x"))
    mb = FakeMailbox()
    uids = [mb.append("INBOX", raw_message(n)) for n in range(6)]
    clock = FakeClock()
    caps = CAPS["qresync"]
    misses: dict[tuple[int, str, int, int], int] = {}

    def sync(session: FakeSession) -> Any:
        clock.advance(1)
        return AccountSync(
            store, account, session, settings=SyncSettings(batch_size=2), clock=clock, body_misses=misses
        ).run()

    for attempt in (1, 2):
        assert sync(NeverSendsOneBody(mb, caps, uids[1])).quarantined == 0
        assert _stored(store, account.id) == 5, f"held after sync {attempt}"
    stats = sync(NeverSendsOneBody(mb, caps, uids[1]))
    assert stats.quarantined == 1 and misses == {}
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(quarantine_t.c.uid, quarantine_t.c.reason, quarantine_t.c.raw)).one()
    assert (row.uid, row.raw) == (uids[1], None) and "no body" in row.reason
    with store.engine.connect() as conn:
        last_uid = conn.execute(sa.select(folders_t.c.last_uid).where(folders_t.c.account_id == account.id)).scalar()
    assert last_uid == max(uids), "the cursor moved on"
    mb.append("INBOX", raw_message(9))
    assert sync(NeverSendsOneBody(mb, caps, uids[1])).new_messages == 1
    assert _stored(store, account.id) == 6


class SyncedAccount:
    """Syncs of one account as the Runner makes them: the account read afresh and recorded as synced after each
    (no longer importing), its body misses and retry times kept across syncs, the clock a second on each time."""

    def __init__(self, store: Store, account_id: int, *, batch_size: int) -> None:
        self.store, self.account_id, self.batch_size = store, account_id, batch_size
        self.clock = FakeClock()
        self.misses: dict[tuple[int, str, int, int], int] = {}
        self.retried: dict[tuple[int, str, int], float] = {}

    def __call__(self, session: FakeSession) -> Any:
        self.clock.advance(1)
        stats = AccountSync(
            self.store,
            self.store.account_by_id(self.account_id),
            session,
            settings=SyncSettings(batch_size=self.batch_size),
            clock=self.clock,
            body_misses=self.misses,
            bodiless_retried=self.retried,
        ).run()
        self.store.set_state(self.account_id, "active", synced=True)
        return stats


def test_a_message_quarantined_without_its_body_is_stored_once_the_server_sends_it(store: Store) -> None:
    """Three syncs in a row without a body can be a minute (pushes): the server's hiccup must not cost the message
    for good. Once an hour, for a week, the folder's messages quarantined without bytes are asked for again; one
    that comes is stored and leaves the quarantine. Before, nothing ever asked again."""
    account = store.add_account("later@example.test", "fake", Credential("password", "x"))
    mb = FakeMailbox()
    for n in range(4):
        mb.append("INBOX", raw_message(n))
    caps = CAPS["qresync"]
    sync = SyncedAccount(store, account.id, batch_size=2)
    clock = sync.clock

    sync(FakeSession(mb, caps))  # the account's first sync (an import is never retried into)
    mb.append("INBOX", raw_message(7))
    late = mb.append("INBOX", raw_message(8))
    for _ in range(3):
        sync(NeverSendsOneBody(mb, caps, late))
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(quarantine_t.c.uid)).scalars().all() == [late]
    assert _stored(store, account.id) == 5
    assert sync(FakeSession(mb, caps)).new_messages == 0, "asked again within the hour: not yet"
    clock.advance(3600)
    stats = sync(FakeSession(mb, caps))
    assert stats.new_messages == 1
    assert _stored(store, account.id) == 6
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(quarantine_t)).scalar() == 0
    clock.advance(3600)
    assert sync(FakeSession(mb, caps)).new_messages == 0, "stored once"


def test_asking_again_for_a_quarantined_message_never_moves_the_cursor(store: Store) -> None:
    """The cursor is held below a message whose body has not come yet (UID 2) when a message above it, quarantined
    without its body (UID 3), is asked for again and still does not come. That retry stored its batch with the
    batch's cursor and moved the folder's past UID 2, which no sync then fetched again: lost for good."""
    account = store.add_account("held-retry@example.test", "fake", Credential("password", "x"))
    mb = FakeMailbox()
    uids = [mb.append("INBOX", raw_message(n)) for n in range(3)]
    caps = CAPS["qresync"]
    sync = SyncedAccount(store, account.id, batch_size=10)
    clock = sync.clock

    for _ in range(3):
        sync(WithholdsBodies(mb, caps, {uids[2]}))  # the third time it is quarantined, the cursor passes it
    with store.engine.begin() as conn:  # the cursor held below UID 2 (as a message not yet come holds it)
        conn.execute(
            folders_t.update().where(folders_t.c.account_id == account.id).values(last_uid=uids[0], uidnext=None)
        )
        conn.execute(sa.text("DELETE FROM inboxd_locations WHERE uid = :uid"), {"uid": uids[1]})
        conn.execute(sa.text("DELETE FROM mail_messages WHERE subject = 'hello 1'"))
    clock.advance(3600)  # the quarantined UID 3 is due to be asked for again
    sync(WithholdsBodies(mb, caps, {uids[1], uids[2]}))
    with store.engine.connect() as conn:
        last_uid = conn.execute(sa.select(folders_t.c.last_uid).where(folders_t.c.account_id == account.id)).scalar()
    assert last_uid == uids[0], "held below UID 2"
    sync(FakeSession(mb, caps))
    assert _stored(store, account.id) == 3, "UID 2 came, and so did UID 3"


def test_flags_change_above_a_held_cursor_is_not_lost(store: Store) -> None:
    """While the cursor is held below a message that did not come, the messages above it are stored: a flag change
    on one of them (CHANGEDSINCE, asked only up to the cursor) was lost once HIGHESTMODSEQ moved on."""
    DropsOneBody.dropped = False
    account = store.add_account("held@example.test", "fake", Credential("password", "x"))
    mb = FakeMailbox()
    uids = [mb.append("INBOX", raw_message(n)) for n in range(4)]
    clock = FakeClock()
    caps = CAPS["qresync"]
    AccountSync(store, account, DropsOneBody(mb, caps), settings=SyncSettings(), clock=clock).run()
    mb.set_flags("INBOX", uids[2], ["\\Seen"])
    DropsOneBody.dropped = False  # and the first body is missing once more
    clock.advance(1)
    AccountSync(store, account, DropsOneBody(mb, caps), settings=SyncSettings(), clock=clock).run()
    assert "\\Seen" in _stored_flags(store, account.id, uids[2])


class LosesOneReply(FakeSession):
    """A server whose FETCH reply for one message never arrives (or imapclient merged it into another's after a
    mid-FETCH EXPUNGE renumbered them), although the message is there."""

    def __init__(self, mailbox: FakeMailbox, caps: Capabilities, lost: int) -> None:
        super().__init__(mailbox, caps)
        self._lost = lost

    def fetch_messages(self, uids):  # type: ignore[no-untyped-def]
        return {uid: v for uid, v in super().fetch_messages(uids).items() if uid != self._lost}

    def fetch_headers(self, uids, *, fields=True):  # type: ignore[no-untyped-def]
        return {uid: v for uid, v in super().fetch_headers(uids, fields=fields).items() if uid != self._lost}


@pytest.mark.parametrize("bodies_first", [True, False])
def test_a_message_without_a_reply_holds_the_cursor_unless_it_is_gone(store: Store, bodies_first: bool) -> None:
    """A UID listed but not answered was taken for expunged and the cursor passed it: lost for good when it was
    there. It is checked with one SEARCH: still there, it holds the cursor (fetched by the next sync); gone, not."""
    account = store.add_account(f"lost-{bodies_first}@example.test", "fake", Credential("password", "x"))
    mb = FakeMailbox()
    uids = [mb.append("INBOX", raw_message(n)) for n in range(5)]
    clock = FakeClock()
    caps = CAPS["qresync"]
    settings = SyncSettings(batch_size=2, bodies_first=bodies_first)
    AccountSync(store, account, LosesOneReply(mb, caps, uids[1]), settings=settings, clock=clock).run()
    assert _stored(store, account.id) == 4
    AccountSync(store, account, FakeSession(mb, caps), settings=settings, clock=clock).run()
    assert _stored(store, account.id) == 5, "fetched again by the next sync"

    other = store.add_account(f"gone-{bodies_first}@example.test", "fake", Credential("password", "x"))
    mb2 = FakeMailbox()
    uids2 = [mb2.append("INBOX", raw_message(n)) for n in range(5)]

    class ExpungedMidFetch(FakeSession):
        def fetch_messages(self, wanted):  # type: ignore[no-untyped-def]
            if uids2[1] in mb2.folders["INBOX"].messages:
                mb2.expunge("INBOX", uids2[1])
            return super().fetch_messages(wanted)

        def fetch_headers(self, wanted, *, fields=True):  # type: ignore[no-untyped-def]
            if uids2[1] in mb2.folders["INBOX"].messages:
                mb2.expunge("INBOX", uids2[1])
            return super().fetch_headers(wanted, fields=fields)

    stats = AccountSync(store, other, ExpungedMidFetch(mb2, caps), settings=settings, clock=clock).run()
    assert _stored(store, other.id) == 4
    with store.engine.connect() as conn:
        last_uid = conn.execute(
            sa.select(folders_t.c.last_uid).where(folders_t.c.account_id == other.id, folders_t.c.name == "INBOX")
        ).scalar_one()
    assert last_uid == max(uids2), "an expunged message does not hold the cursor"
    assert stats.new_messages == 4


class ChangedFlagsWithoutItems(FakeSession):
    """A server whose CHANGEDSINCE reply leaves FLAGS out for a message (MODSEQ alone, as an unsolicited update)."""

    def changed_flags(self, up_to_uid, since_modseq, *, vanished):  # type: ignore[no-untyped-def]
        updates, gone = super().changed_flags(up_to_uid, since_modseq, vanished=vanished)
        return [FlagUpdate(u.uid, None, u.modseq, None) for u in updates], gone


def test_a_flag_reply_without_flags_keeps_the_stored_ones(store: Store) -> None:
    """A reply that carries no FLAGS said nothing about them: it was stored as "no flags", marking a read message
    unread (and on Gmail, no X-GM-LABELS erased every label)."""
    account = store.add_account("noflags@example.test", "fake", Credential("password", "x"))
    mb = FakeMailbox()
    uid = mb.append("INBOX", raw_message(0), flags=["\\Seen"])
    clock = FakeClock()
    caps = CAPS["condstore"]
    AccountSync(store, account, FakeSession(mb, caps), settings=SyncSettings(), clock=clock).run()
    mb.set_flags("INBOX", uid, ["\\Seen", "\\Flagged"])
    clock.advance(1)
    AccountSync(store, account, ChangedFlagsWithoutItems(mb, caps), settings=SyncSettings(), clock=clock).run()
    assert _stored_flags(store, account.id, uid) == ["\\Seen"], "kept as stored (a full flag read brings \\Flagged)"


class RefusesOneFolder(FakeSession):
    """A server that answers NO to the STATUS of one folder (no read right, [UNAVAILABLE], deleted meanwhile)."""

    def __init__(self, mailbox: FakeMailbox, caps: Capabilities, refused: set[str]) -> None:
        super().__init__(mailbox, caps)
        self._refused = refused

    def status(self, folder: str):  # type: ignore[no-untyped-def]
        if folder in self._refused:
            try:
                raise imaplib.IMAP4.error("STATUS command error: BAD [b'NO [UNAVAILABLE] try later']")
            except imaplib.IMAP4.error as exc:
                raise RetryLater(f"IMAP command failed: {exc}") from exc
        return super().status(folder)


def test_a_folder_the_server_refuses_does_not_keep_the_others_from_syncing(store: Store) -> None:
    account = store.add_account("refused@example.test", "fake", Credential("password", "x"))
    mb = FakeMailbox()
    mb.add_folder("Archive", "\\Archive")
    mb.add_folder("Zeta")
    for folder in ("INBOX", "Archive", "Zeta"):
        mb.append(folder, raw_message(len(mb.folders[folder].messages) + hash(folder) % 1000))
    clock = FakeClock()
    caps = CAPS["qresync"]
    with structlog.testing.capture_logs() as logs:
        stats = AccountSync(
            store, account, RefusesOneFolder(mb, caps, {"Archive"}), settings=SyncSettings(), clock=clock
        ).run()
    assert stats.new_messages == 2, "INBOX and Zeta, before and after the refused folder"
    assert [e["folder"] for e in logs if e["event"] == "sync.folder_refused"] == ["Archive"]
    everything = RefusesOneFolder(mb, caps, {"INBOX", "Archive", "Zeta"})
    with pytest.raises(RetryLater):
        AccountSync(store, account, everything, settings=SyncSettings(), clock=clock).run()


@pytest.mark.parametrize("caps_name", ["condstore", "plain"])
def test_expunge_found_even_when_some_messages_are_not_stored(store: Store, caps_name: str) -> None:
    """Out-of-scope messages are never stored, so message counts cannot reveal an expunge: the UID diff asks the
    server about the UIDs we store."""
    account = store.add_account(f"partial-{caps_name}@example.test", "fake", Credential("password", "x"))
    mb = FakeMailbox()
    cand = mb.append("INBOX", raw_message(0))
    mb.append("INBOX", raw_message(1))  # a stranger: out of scope
    clock = FakeClock()
    settings = SyncSettings(contacts=contact_set(["cand0@example.org"]), flag_scan_interval=timedelta(0))
    AccountSync(store, account, FakeSession(mb, CAPS[caps_name]), settings=settings, clock=clock).run()
    mb.expunge("INBOX", cand)
    mb.append("INBOX", raw_message(2))  # another stranger keeps the count equal
    clock.advance(1)
    stats = AccountSync(store, account, FakeSession(mb, CAPS[caps_name]), settings=settings, clock=clock).run()
    assert stats.expunged == 1
    with store.engine.connect() as conn:
        [row] = conn.execute(sa.select(messages_t).where(messages_t.c.account_id == account.id)).all()
    assert row.deleted_at is not None


class FailsOnSelect(FakeSession):
    """A session the server ends when a given folder is selected (Gmail's routine BYE, a network cut...)."""

    def __init__(self, mailbox: FakeMailbox, caps: Capabilities, folder: str) -> None:
        super().__init__(mailbox, caps)
        self._fail_on = folder

    def select(self, folder: str):  # type: ignore[no-untyped-def]
        if folder == self._fail_on:
            raise SessionExpired("session ended")
        return super().select(folder)


def test_an_interrupted_sync_loses_no_state_change(store: Store) -> None:
    """An expunge applied in INBOX before the session died in the next folder still ends with deleted_at set:
    the recompute marks are written with the change, not kept in memory."""
    account = store.add_account("interrupted@example.test", "fake", Credential("password", "x"))
    mb = FakeMailbox()
    mb.add_folder("Archive", "\\Archive")
    uid = mb.append("INBOX", raw_message(0))
    mb.append("Archive", raw_message(1))
    clock = FakeClock()
    caps = CAPS["qresync"]
    AccountSync(store, account, FakeSession(mb, caps), settings=SyncSettings(), clock=clock).run()
    mb.expunge("INBOX", uid)
    mb.append("Archive", raw_message(2))
    with pytest.raises(SessionExpired):
        AccountSync(store, account, FailsOnSelect(mb, caps, "Archive"), settings=SyncSettings(), clock=clock).run()
    AccountSync(store, account, FakeSession(mb, caps), settings=SyncSettings(), clock=clock).run()
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(messages_t).where(messages_t.c.account_id == account.id)).all()
    by_subject = {r.subject: r for r in rows}
    assert by_subject["hello 0"].deleted_at is not None
    assert by_subject["hello 2"].deleted_at is None
