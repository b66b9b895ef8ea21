"""Which FETCHes a first sync sends: with scope "all" (and no exclusions) no header-field FETCH, one FETCH of flags and
sizes per batch and one body FETCH per run; with scope "contacts" (or exclusions) header first, as before.

Counted on the FakeSession and, on a real Dovecot, in its rawlog of the commands the client sent."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import MailStack, make_message
from harness.config import write_stack_config
from inboxd.clock import FakeClock, SystemClock
from inboxd.config import load_config
from inboxd.planner import Capabilities
from inboxd.runner import Runner
from inboxd.scope import Exclusions, contact_set
from inboxd.store import Credential, Store
from inboxd.sync import AccountSync, SyncSettings
from inboxd.testing import FakeMailbox, FakeSession

CAPS = Capabilities(condstore=True, qresync=True)


def raw_message(n: int, sender: str = "cand{n}@example.org", size: int = 0) -> bytes:
    return (
        f"From: Cand {n} <{sender.format(n=n)}>\r\nTo: rec@example.test\r\nSubject: hello {n}\r\n"
        f"Message-ID: <f{n}@example.test>\r\n\r\nbody {n}\r\n{'x' * size}\r\n"
    ).encode()


def _sync(store: Store, email: str, mb: FakeMailbox, settings: SyncSettings) -> list[str]:
    account = store.account(email) or store.add_account(email, "fake", Credential("password", "x"))
    mb.commands.clear()
    AccountSync(store, account, FakeSession(mb, CAPS), settings=settings, clock=FakeClock()).run()
    return [c for c in mb.commands if c.startswith("FETCH")]


def test_scope_all_first_sync_fetches_no_header_fields(store: Store) -> None:
    mb = FakeMailbox()
    for n in range(7):
        mb.append("INBOX", raw_message(n))
    fetches = _sync(store, "all@example.test", mb, SyncSettings(batch_size=3, bodies_first=True))
    # batches of 3, 3, 1: each one FETCH of flags and sizes, then its bodies in one FETCH
    assert fetches == ["FETCH meta", "FETCH bodies"] * 3
    account = store.account("all@example.test")
    assert account is not None
    assert len(store.known_uids(store.folders(account.id)["INBOX"].id)) == 7


def test_scope_all_bodies_still_come_in_runs_bounded_by_size(store: Store) -> None:
    mb = FakeMailbox()
    for n in range(4):
        mb.append("INBOX", raw_message(n, size=1000))
    fetches = _sync(
        store, "runs@example.test", mb, SyncSettings(batch_size=10, max_fetch_bytes=2500, bodies_first=True)
    )
    assert fetches == ["FETCH meta", "FETCH bodies", "FETCH bodies"]


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
        assert len(fetches) == 6, fetches  # each batch: flags and sizes, then bodies
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
