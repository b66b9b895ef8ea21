"""Which FETCHes a first sync sends: with scope "all" (and no exclusions) no header phase: one SEARCH per batch for its
big messages (and a FETCH of their sizes only when there are some), then one FETCH of bodies with their flags per run;
with scope "contacts" (or exclusions) header first, as before.

Counted on the FakeSession and, on a real Dovecot, in its rawlog of the commands the client sent."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from harness import MailStack, make_message
from harness.config import write_stack_config
from inboxd.clock import FakeClock, SystemClock
from inboxd.config import load_config
from inboxd.errors import Interrupted
from inboxd.imap import HeaderInfo
from inboxd.planner import Capabilities
from inboxd.runner import Runner
from inboxd.scope import Exclusions, contact_set
from inboxd.store import Credential, Store
from inboxd.sync import AccountSync, SyncSettings, bodies_runs, body_share
from inboxd.testing import FakeMailbox, FakeSession

CAPS = Capabilities(condstore=True, qresync=True)


def raw_message(n: int, sender: str = "cand{n}@example.org", size: int = 0) -> bytes:
    return (
        f"From: Cand {n} <{sender.format(n=n)}>\r\nTo: rec@example.test\r\nSubject: hello {n}\r\n"
        f"Message-ID: <f{n}@example.test>\r\n\r\nbody {n}\r\n{'x' * size}\r\n"
    ).encode()


def _sync(store: Store, email: str, mb: FakeMailbox, settings: SyncSettings, stop: object = None) -> list[str]:
    """One sync (recorded as done, as the Runner does); the FETCH and SEARCH LARGER commands it sent."""
    account = store.account(email) or store.add_account(email, "fake", Credential("password", "x"))
    mb.commands.clear()
    AccountSync(store, account, FakeSession(mb, CAPS), settings=settings, clock=FakeClock(), stop=stop).run()  # type: ignore[arg-type]
    store.set_state(account.id, "active", synced=True)
    return [c for c in mb.commands if c.startswith("FETCH") or c == "SEARCH larger"]


class StopOnceStored:
    """A stop flag set once the account has ``n`` messages stored (AccountSync looks between batches)."""

    def __init__(self, store: Store, email: str, n: int) -> None:
        self.store, self.email, self.n = store, email, n

    def is_set(self) -> bool:
        account = self.store.account(self.email)
        return account is not None and self.store.message_counts().get(account.id, 0) >= self.n


def test_an_import_resumed_after_an_interruption_still_fetches_no_header_fields(store: Store) -> None:
    """A first sync stopped after its first batch (a restart, a deploy) is resumed by a sync of an account not
    synced yet: the rest comes bodies first too. The resumed import fell back to the header-first path, a FETCH of
    header fields and then one of bodies per batch, for the hours a big import has left."""
    mb = FakeMailbox()
    for n in range(7):
        mb.append("INBOX", raw_message(n))
    settings = SyncSettings(batch_size=3, bodies_first=True)
    with pytest.raises(Interrupted):
        _sync(store, "resumed@example.test", mb, settings, stop=StopOnceStored(store, "resumed@example.test", 3))
    account = store.account("resumed@example.test")
    assert account is not None and account.last_sync_at is None
    assert len(store.known_uids(store.folders(account.id)["INBOX"].id)) == 3, "the first batch only"
    fetches = _sync(store, "resumed@example.test", mb, settings)
    # and the flags of what the first attempt stored (CHANGEDSINCE: the folder has a cursor now)
    assert [f for f in fetches if f != "FETCH flags"] == ["SEARCH larger", "FETCH messages"] * 2, fetches
    assert len(store.known_uids(store.folders(account.id)["INBOX"].id)) == 7


def test_scope_all_first_sync_fetches_no_header_fields(store: Store) -> None:
    mb = FakeMailbox()
    for n in range(7):
        mb.append("INBOX", raw_message(n))
    fetches = _sync(store, "all@example.test", mb, SyncSettings(batch_size=3, bodies_first=True))
    # batches of 3, 3, 1: each one SEARCH for messages over its share of max_fetch_bytes (none), then one FETCH
    assert fetches == ["SEARCH larger", "FETCH messages"] * 3
    account = store.account("all@example.test")
    assert account is not None
    folder = store.folders(account.id)["INBOX"]
    assert len(store.known_uids(folder.id)) == 7
    assert folder.cursor.last_uid == 7


def test_scope_all_bodies_still_come_in_runs_bounded_by_size(store: Store) -> None:
    """The messages over the batch's share of max_fetch_bytes (2500 / 6) are sized first; the rest count at the share:
    1103 + 1103 | 1103 + 1103 | 2 x 416 (for 2 x 104 bytes): each run under 2500 bytes."""
    mb = FakeMailbox()
    for n in range(6):
        mb.append("INBOX", raw_message(n, size=1000 if n < 4 else 0))
    fetches = _sync(
        store, "runs@example.test", mb, SyncSettings(batch_size=10, max_fetch_bytes=2500, bodies_first=True)
    )
    assert fetches == ["SEARCH larger", "FETCH meta", "FETCH messages", "FETCH messages", "FETCH messages"]


def test_scope_all_later_syncs_stay_header_first(store: Store) -> None:
    """A message moved in from another folder is recognized by its Message-ID and re-mapped without its body: only
    an account's first sync skips the header fields."""
    mb = FakeMailbox()
    mb.add_folder("Archive")
    mb.append("INBOX", raw_message(1))
    _sync(store, "moved@example.test", mb, SyncSettings(bodies_first=True))
    mb.move("INBOX", 1, "Archive")
    fetches = _sync(store, "moved@example.test", mb, SyncSettings(bodies_first=True))
    assert "FETCH headers" in fetches
    assert "FETCH bodies" not in fetches


def test_scope_contacts_stays_header_first(store: Store) -> None:
    mb = FakeMailbox()
    for n in range(5):
        mb.append("INBOX", raw_message(n, sender="cand{n}@example.org" if n % 2 else "other{n}@example.org"))
    contacts = contact_set(f"cand{n}@example.org" for n in range(5))
    fetches = _sync(
        store, "contacts@example.test", mb, SyncSettings(batch_size=5, contacts=contacts, bodies_first=True)
    )
    assert fetches == ["FETCH headers", "FETCH bodies"]


def test_exclusions_keep_header_first(store: Store) -> None:
    """Excluded mail is decided on its header fields and its body never downloaded."""
    mb = FakeMailbox()
    mb.append("INBOX", raw_message(1, sender="hr@corp.example"))
    mb.append("INBOX", raw_message(2))
    excluded = frozenset({"@corp.example", "rec@example.test"})
    settings = SyncSettings(exclusions=Exclusions(addresses=excluded), bodies_first=True)
    fetches = _sync(store, "excl@example.test", mb, settings)
    assert fetches == ["FETCH headers", "FETCH bodies"]


@pytest.mark.mailstack
@pytest.mark.parametrize("scope", ["all", "contacts"])
def test_first_sync_fetches_on_dovecot(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, scope: str
) -> None:
    """The rawlog of the no_qresync listener: scope "all" sends one body FETCH per batch (one run each) and no
    HEADER.FIELDS FETCH; scope "contacts" sends the header-field FETCH first, as before."""
    user = mailstack.new_user()
    path = write_stack_config(tmp_path, db_url, mailstack, host=mailstack.imap_host("no_qresync"), scope=scope)
    config = load_config(path, env={})
    store.add_account(user, "local", Credential("oauth2_refresh", mailstack.refresh_token(user)))
    for n in range(5):
        mailstack.deliver(user, make_message(f"cand{n}@example.org", user, f"hello {n}", "x"))
    if scope == "contacts":
        with store.engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO mail_contacts (email) VALUES ('cand1@example.org')")
    runner = Runner(config, store, clock=SystemClock(), settings=SyncSettings(batch_size=2, bodies_first=True))
    [result] = runner.sync_once(only=user)
    assert result.ok, result.reason
    fetches = [c.upper() for c in mailstack.imap_commands(user) if c.upper().startswith("UID FETCH")]
    header_fields = [c for c in fetches if "HEADER.FIELDS" in c]
    bodies = [c for c in fetches if "BODY.PEEK[]" in c]
    if scope == "all":
        assert result.stats.new_messages == 5
        assert header_fields == []
        assert len(bodies) == 3, fetches  # batches of 2, 2, 1
        assert len(fetches) == 3, fetches  # each batch: its bodies with their flags (no message is big)
        assert all("FLAGS" in c and "INTERNALDATE" in c for c in bodies), bodies
        searches = [c.upper() for c in mailstack.imap_commands(user) if " LARGER " in c.upper()]
        assert len(searches) == 3, searches
    else:
        assert result.stats.new_messages == 1
        assert len(header_fields) == 3, fetches
        assert len(bodies) == 1, fetches  # only the contact's message has its body downloaded


def test_a_copy_in_a_second_folder_is_one_row_and_counted_re_mapped(store: Store) -> None:
    """Without header fields a copy is only recognized after its body came: still one row, two locations."""
    mb = FakeMailbox()
    mb.add_folder("Archive")
    mb.append("INBOX", raw_message(1))
    mb.append("Archive", raw_message(1))
    account = store.add_account("copy@example.test", "fake", Credential("password", "x"))
    settings = SyncSettings(bodies_first=True)
    stats = AccountSync(store, account, FakeSession(mb, CAPS), settings=settings, clock=FakeClock()).run()
    assert (stats.new_messages, stats.remapped) == (1, 1)
    folders = store.folders(account.id)
    assert store.known_uids(folders["INBOX"].id) == store.known_uids(folders["Archive"].id) == {1}


def test_bodies_first_is_the_default_and_can_be_turned_off(store: Store) -> None:
    mb = FakeMailbox()
    mb.append("INBOX", raw_message(1))
    assert _sync(store, "default@example.test", mb, SyncSettings(bodies_first=False)) == [
        "FETCH headers",
        "FETCH bodies",
    ]
    assert SyncSettings().bodies_first


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 500), st.integers(1 << 20, 64 << 20), st.data())
def test_a_batch_is_one_run_while_its_big_messages_fit_in_half(
    batch_size: int, max_bytes: int, data: st.DataObject
) -> None:
    """With the sync's share the batch's other messages take at most half of max_fetch_bytes at their bound, so big
    messages adding up to the other half never split the batch (before body_share, any one big message did)."""
    share = body_share(max_bytes, batch_size)
    assert share * batch_size <= max_bytes // 2
    batch = list(range(1, batch_size + 1))
    big = data.draw(st.lists(st.sampled_from(batch), min_size=1, max_size=10, unique=True))
    budget = max_bytes // 2 - len(big) * (share + 1)
    assume(budget >= 0)
    sizes = {uid: share + 1 + budget // len(big) for uid in big}
    assert bodies_runs(batch, set(big), sizes, share, max_bytes) == [batch]


def test_bodies_runs_bound_each_run() -> None:
    """bodies_runs: big messages by their size, the others at the share, a big one with no size (expunged since)
    alone; a batch with nothing big is one run."""
    assert bodies_runs([1, 2, 3], set(), {}, 100, 300) == [[1, 2, 3]]
    assert bodies_runs([1, 2, 3, 4], {2}, {2: 250}, 50, 300) == [[1, 2], [3, 4]]
    assert bodies_runs([1, 2, 3], {2}, {}, 50, 300) == [[1], [2], [3]]
    assert bodies_runs([1, 2], {1, 2}, {1: 900, 2: 10}, 5, 300) == [[1], [2]]  # bigger than max: a run of its own


def test_a_message_expunged_before_its_body_came_does_not_hold_the_cursor(store: Store) -> None:
    """Listed at the folder's start, gone when its run is fetched: no reply at all, so nothing is missing (a reply
    without its body would be): the cursor moves past it and the folder is complete."""
    mb = FakeMailbox()
    for n in range(4):
        mb.append("INBOX", raw_message(n))
    account = store.add_account("gone@example.test", "fake", Credential("password", "x"))
    session = FakeSession(mb, CAPS)
    fetch_messages = session.fetch_messages

    def expunging(uids: list[int]) -> dict[int, tuple[bytes | None, HeaderInfo]]:
        mb.folders["INBOX"].messages.pop(2, None)
        return fetch_messages(uids)

    session.fetch_messages = expunging  # type: ignore[method-assign]
    settings = SyncSettings(bodies_first=True)
    stats = AccountSync(store, account, session, settings=settings, clock=FakeClock()).run()
    assert stats.new_messages == 3
    folder = store.folders(account.id)["INBOX"]
    assert folder.cursor.last_uid == 4
    assert store.known_uids(folder.id) == {1, 3, 4}
