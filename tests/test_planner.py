"""The pure sync decisions (planner.py), exhaustively and without a socket."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from inboxd.imap import parse_vanished
from inboxd.planner import (
    Capabilities,
    ExpungeCheck,
    FolderCursor,
    FolderListing,
    FolderStatus,
    PlanKind,
    direction,
    imported_earlier,
    message_identity,
    plan_folder,
    select_folders,
    sequence_set,
)

CONDSTORE = Capabilities(condstore=True, qresync=False)
QRESYNC = Capabilities(condstore=True, qresync=True)
PLAIN = Capabilities(condstore=False, qresync=False)


def cursor(
    uidvalidity: int | None = 7, last_uid: int = 10, uidnext: int = 11, modseq: int | None = 100, count: int = 10
) -> FolderCursor:
    return FolderCursor(
        uidvalidity=uidvalidity, last_uid=last_uid, uidnext=uidnext, highest_modseq=modseq, message_count=count
    )


def status(uidvalidity: int = 7, uidnext: int = 11, messages: int = 10, modseq: int | None = 100) -> FolderStatus:
    return FolderStatus(uidvalidity=uidvalidity, uidnext=uidnext, messages=messages, highest_modseq=modseq)


@pytest.mark.parametrize("caps", [CONDSTORE, QRESYNC, PLAIN])
def test_first_sync_is_full_without_reset(caps: Capabilities) -> None:
    plan = plan_folder(None, status(), caps)
    assert plan.kind is PlanKind.FULL
    assert not plan.reset_locations
    assert plan.fetch_new_after == 0


def test_cursor_without_uidvalidity_is_a_first_sync() -> None:
    assert plan_folder(cursor(uidvalidity=None), status(), CONDSTORE).kind is PlanKind.FULL


@pytest.mark.parametrize("caps", [CONDSTORE, QRESYNC, PLAIN])
def test_uidvalidity_change_forces_full_sync_with_remap(caps: Capabilities) -> None:
    plan = plan_folder(cursor(), status(uidvalidity=8), caps)
    assert plan.kind is PlanKind.FULL
    assert plan.reset_locations


@pytest.mark.parametrize("caps", [CONDSTORE, QRESYNC])
def test_nothing_changed_with_condstore_is_unchanged(caps: Capabilities) -> None:
    assert plan_folder(cursor(), status(), caps).kind is PlanKind.UNCHANGED


def test_modseq_change_alone_means_flag_changes_since_cursor() -> None:
    plan = plan_folder(cursor(), status(modseq=105), CONDSTORE)
    assert plan.kind is PlanKind.INCREMENTAL
    assert plan.flags_changed_since == 100
    assert plan.fetch_new_after == 10
    assert plan.expunge_check is ExpungeCheck.UID_DIFF
    assert not plan.refresh_all_flags


def test_qresync_uses_vanished_for_expunges() -> None:
    plan = plan_folder(cursor(), status(messages=9, modseq=101), QRESYNC)
    assert plan.expunge_check is ExpungeCheck.VANISHED


def test_new_mail_without_condstore_rescans_flags_and_diffs_uids() -> None:
    plan = plan_folder(cursor(modseq=None), status(uidnext=12, messages=11, modseq=None), PLAIN)
    assert plan.kind is PlanKind.INCREMENTAL
    assert plan.refresh_all_flags
    assert plan.flags_changed_since is None
    assert plan.expunge_check is ExpungeCheck.UID_DIFF


def test_without_condstore_unchanged_counts_skip_until_flag_scan_is_due() -> None:
    assert plan_folder(cursor(modseq=None), status(modseq=None), PLAIN).kind is PlanKind.UNCHANGED
    plan = plan_folder(cursor(modseq=None), status(modseq=None), PLAIN, flag_scan_due=True)
    assert plan.kind is PlanKind.INCREMENTAL
    assert plan.refresh_all_flags


def test_expunge_only_visible_in_message_count() -> None:
    plan = plan_folder(cursor(modseq=None), status(messages=9, modseq=None), PLAIN)
    assert plan.kind is PlanKind.INCREMENTAL


def test_what_earlier_attempts_of_an_import_processed_as_far_as_cursor_and_status_tell() -> None:
    """An import resumed counts the messages its earlier attempts processed: none of a folder never started or whose
    UIDVALIDITY changed (synced again from UID 1), all of a folder finished at the UIDNEXT it still has (messages
    expunged since included: STATUS counts what is there); a folder started but not finished (no UIDNEXT recorded)
    or with new mail since needs the server's count of the UIDs at or below the cursor (None)."""
    never = FolderCursor(uidvalidity=None, last_uid=0, uidnext=None, highest_modseq=None, message_count=None)
    assert imported_earlier(never, status(messages=40)) == 0
    assert imported_earlier(cursor(), status(uidvalidity=8, messages=40)) == 0
    assert imported_earlier(cursor(), status(messages=10)) == 10
    assert imported_earlier(cursor(), status(messages=8)) == 8, "two expunged since: all the rest was processed"
    assert imported_earlier(cursor(), status(uidnext=13, messages=12)) is None, "new mail since"
    halfway = FolderCursor(uidvalidity=7, last_uid=6000, uidnext=None, highest_modseq=None, message_count=None)
    assert imported_earlier(halfway, status(uidnext=40_001, messages=40_000)) is None


def test_select_folders_skips_trash_junk_drafts_virtual_and_noselect_inbox_first() -> None:
    listing = [
        FolderListing("Trash", frozenset({"\\HasNoChildren", "\\Trash"})),
        FolderListing("Sent", frozenset({"\\HasNoChildren", "\\Sent"})),
        FolderListing("Work", frozenset({"\\HasNoChildren"})),
        FolderListing("Junk", frozenset({"\\junk"})),
        FolderListing("Drafts", frozenset({"\\Drafts"})),
        FolderListing("[Gmail]", frozenset({"\\Noselect", "\\HasChildren"})),
        FolderListing("[Gmail]/All Mail", frozenset({"\\All"})),
        FolderListing("Archive", frozenset({"\\Archive"})),
        FolderListing("inbox", frozenset({"\\HasNoChildren"})),
    ]
    chosen = select_folders(listing)
    assert [(f.name, f.special_use) for f in chosen] == [
        ("INBOX", "\\Inbox"),
        ("Sent", "\\Sent"),
        ("Archive", "\\Archive"),
        ("Work", None),
    ]


def test_direction() -> None:
    assert direction("rec@corp.test", "REC@corp.test", None) == "outbound"
    assert direction("cand@x.test", "rec@corp.test", "\\Sent") == "outbound"
    assert direction("cand@x.test", "rec@corp.test", "\\Inbox") == "inbound"
    assert direction(None, "rec@corp.test", None) == "inbound"


def test_identity_prefers_message_id_then_bytes() -> None:
    assert message_identity("a@b") == "mid:a@b"
    assert message_identity(None) is None
    assert message_identity(None, b"x") == message_identity("", b"x")
    assert message_identity(None, b"x") != message_identity(None, b"y")


@given(st.sets(st.integers(min_value=1, max_value=5000), min_size=1, max_size=300))
def test_sequence_set_round_trips_through_vanished_parser(uids: set[int]) -> None:
    encoded = sequence_set(uids)
    assert parse_vanished(encoded) == uids
    assert parse_vanished("(EARLIER) " + encoded) == uids


def test_sequence_set_is_compact() -> None:
    assert sequence_set([5, 1, 2, 3, 9, 10, 12]) == "1:3,5,9:10,12"
    with pytest.raises(ValueError, match="empty"):
        sequence_set([])
