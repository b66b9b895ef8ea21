"""The pure sync decisions (planner.py), exhaustively and without a socket."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from inboxd.dialect import GenericImap
from inboxd.imap import HeaderInfo, parse_vanished
from inboxd.planner import (
    KNOWN_SPECIAL_USE,
    SKIPPED_SPECIAL_USE,
    WELL_KNOWN_NAMES,
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
    sent_folder,
    sequence_set,
    special_uses,
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


def _plain(*names: str, delimiter: str | None = None) -> list[FolderListing]:
    """A listing without SPECIAL-USE attributes, as Courier or a Dovecot without special_use sends it."""
    return [FolderListing(name, frozenset({"\\HasNoChildren"}), delimiter) for name in names]


def _chosen(listing: list[FolderListing]) -> list[tuple[str, str | None]]:
    return [(f.name, f.special_use) for f in select_folders(listing)]


def test_a_courier_listing_without_special_use_skips_trash_drafts_junk_by_name_and_knows_sent() -> None:
    """Courier keeps every folder under INBOX and flags none: INBOX.Trash, INBOX.Drafts and INBOX.Spam were synced as
    mail (the recruiter's autosaved drafts as outbound mail, deleted mail still visible) and INBOX.Sent was not
    known as Sent. A folder deeper down or one whose name merely contains the word stays a normal folder."""
    listing = _plain(
        "INBOX",
        "INBOX.Trash",
        "INBOX.Drafts",
        "INBOX.Sent",
        "INBOX.Spam",
        "INBOX.Archives",
        "INBOX.Candidates",
        "INBOX.Candidates.Trash",
        "INBOX.Trash talk",
        "INBOX.Old Sent",
        delimiter=".",
    )
    assert _chosen(listing) == [
        ("INBOX", "\\Inbox"),
        ("INBOX.Sent", "\\Sent"),
        ("INBOX.Archives", "\\Archive"),
        ("INBOX.Candidates", None),
        ("INBOX.Candidates.Trash", None),
        ("INBOX.Old Sent", None),
        ("INBOX.Trash talk", None),
    ]


def test_top_level_well_known_names_match_case_insensitively_with_the_delimiter_guessed() -> None:
    """Outlook-style names at the top level, in any case; without a known delimiter "INBOX/" and "INBOX." are both
    taken as INBOX's children; with one, only that one."""
    listing = _plain("inbox", "Deleted Items", "JUNK E-MAIL", "sent items", "drafts", "INBOX/Deleted Messages", "Work")
    assert _chosen(listing) == [("INBOX", "\\Inbox"), ("sent items", "\\Sent"), ("Work", None)]
    assert _chosen(_plain("INBOX", "INBOX.Trash", "INBOX/Spam", delimiter="/")) == [
        ("INBOX", "\\Inbox"),
        ("INBOX.Trash", None),
    ]


def test_a_flagged_folder_wins_over_names_kind_by_kind() -> None:
    """Once a folder carries a kind's attribute, folders merely named like that kind are normal folders; a kind no
    folder is flagged with is still told by name; a folder's own attribute is never overridden by its name."""
    listing = [
        FolderListing("INBOX", frozenset()),
        FolderListing("Bin", frozenset({"\\Trash"})),
        FolderListing("Trash", frozenset()),  # the server says Bin is the trash: this is the user's own folder
        FolderListing("Sent", frozenset({"\\Sent"})),
        FolderListing("Sent Items", frozenset()),
        FolderListing("Junk", frozenset()),  # no \\Junk anywhere: spam by its name
        FolderListing("Drafts", frozenset({"\\Archive"})),  # odd, but the attribute is what the server says
    ]
    assert _chosen(listing) == [
        ("INBOX", "\\Inbox"),
        ("Sent", "\\Sent"),
        ("Drafts", "\\Archive"),
        ("Sent Items", None),
        ("Trash", None),
    ]


def test_inbox_is_never_reclassified() -> None:
    listing = [FolderListing("INBOX", frozenset({"\\Trash"})), *_plain("Trash")]
    assert special_uses(listing) == {"Trash": "\\Trash"}
    assert _chosen(_plain("Inbox", "Trash")) == [("INBOX", "\\Inbox")]


def test_sent_folder_is_the_flagged_one_else_the_best_named_one() -> None:
    """Where the outbox files its copy of a sent message: the \\Sent folder, else by name ("Sent" before "Sent
    Items", top level or under INBOX alike), never a \\Noselect one; None without either."""
    flagged = [FolderListing("Sent", frozenset()), FolderListing("Gesendet", frozenset({"\\Sent"}))]
    assert sent_folder(flagged) == "Gesendet"
    assert sent_folder(_plain("INBOX", "Sent Items", "INBOX.Sent", "Sent Messages")) == "INBOX.Sent"
    assert sent_folder(_plain("INBOX", "Sent Mail", "Sent Items")) == "Sent Items"
    noselect = [FolderListing("Sent", frozenset({"\\Noselect"})), *_plain("Sent Items")]
    assert sent_folder(noselect) == "Sent Items"
    assert sent_folder(_plain("INBOX", "Old Sent", "Projects/Sent", delimiter="/")) is None


_ATTRIBUTES = [*KNOWN_SPECIAL_USE, "\\HasNoChildren", "\\Noselect", "\\Marked"]
_KNOWN_NAMES = [name for names in WELL_KNOWN_NAMES.values() for name in names]


@st.composite
def _listings(draw: st.DrawFn) -> list[FolderListing]:
    last = st.sampled_from([*_KNOWN_NAMES, "Work", "Trash talk", "My Drafts", "Candidates", "INBOX"])
    cased = last.flatmap(lambda n: st.sampled_from([n, n.upper(), n.lower()]))
    parent = st.sampled_from(["", "INBOX/", "INBOX.", "inbox/", "Projects/", "INBOX.Projects."])
    names = st.builds(lambda p, n: p + n, parent, cased)
    attributes = st.frozensets(st.sampled_from(_ATTRIBUTES), max_size=2)
    # server names are case-sensitive but INBOX's is not: one INBOX per listing
    folders = draw(st.lists(st.tuples(names, attributes), max_size=12, unique_by=lambda f: f[0].upper()))
    return [FolderListing(name, flags) for name, flags in folders]


def _stripped(name: str) -> str:
    return name[6:] if name[:6].upper() in {"INBOX/", "INBOX."} else name


@given(_listings())
def test_special_use_of_any_listing_follows_the_rules(listing: list[FolderListing]) -> None:
    """For any listing: an attribute always decides; a name decides only a kind nobody is flagged with, and only for
    an unflagged folder at the top level or directly under INBOX whose whole remaining name is a well-known one;
    INBOX is the inbox; what select_folders keeps is exactly the selectable folders not of a skipped kind."""
    uses = special_uses(listing)
    flagged_kinds = {k for f in listing if f.name.upper() != "INBOX" for k in KNOWN_SPECIAL_USE if k in f.flags}
    for folder in listing:
        own = next((k for k in KNOWN_SPECIAL_USE if k in folder.flags), None)
        if folder.name.upper() == "INBOX":
            assert folder.name not in uses
        elif own is not None:
            assert uses[folder.name] == own
        elif folder.name in uses:
            kind = uses[folder.name]
            assert kind not in flagged_kinds
            assert _stripped(folder.name).casefold() in {n.casefold() for n in WELL_KNOWN_NAMES[kind]}
        else:
            part = _stripped(folder.name).casefold()
            kinds = [k for k, names in WELL_KNOWN_NAMES.items() if part in {n.casefold() for n in names}]
            assert all(k in flagged_kinds for k in kinds)
    chosen = {f.name: f.special_use for f in select_folders(listing)}
    for folder in listing:
        inbox = folder.name.upper() == "INBOX"
        skipped = folder.flags & ({"\\Noselect"} | SKIPPED_SPECIAL_USE) or uses.get(folder.name) in SKIPPED_SPECIAL_USE
        assert (("INBOX" if inbox else folder.name) in chosen) == (not skipped)
        if not skipped and not inbox:
            assert chosen[folder.name] == uses.get(folder.name)


def _header(*flags: str) -> HeaderInfo:
    return HeaderInfo(uid=1, message_id="<d@x>", size=10, flags=flags, modseq=None, internaldate=None)


def test_a_generic_server_message_flagged_draft_is_a_draft() -> None:
    """A draft a client saved in a synced folder (\\Draft, any case) is never stored as mail; was always False."""
    generic = GenericImap()
    assert generic.is_draft(_header("\\Seen", "\\Draft"))
    assert generic.is_draft(_header("\\DRAFT"))
    assert not generic.is_draft(_header("\\Seen", "\\Answered", "$Draft-ish"))
    assert not generic.is_draft(_header())


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
