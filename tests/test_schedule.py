"""Which due accounts a node starts (schedule.to_start, pure): most urgent first, one sync per account at a time,
and a lane of its own for first syncs, so that hours of one account's first sync never take every slot."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from inboxd.schedule import FIRST, REGULAR, Slots, Why, lane, merge, to_start

SLOTS = Slots(first=2, regular=4)


def test_most_urgent_first_within_the_free_slots() -> None:
    due = {1: Why.ROUND, 2: Why.PUSH, 3: Why.RETRY, 4: Why.ROUND, 5: Why.CHANGED}
    assert to_start(due, {}, {}, Slots(first=2, regular=3)) == [2, 5, 3]


def test_an_account_already_syncing_stays_due_and_waits() -> None:
    """A push in the middle of an account's sync: it syncs again after, never twice at once."""
    assert to_start({7: Why.PUSH}, {7: REGULAR}, {7: REGULAR}, SLOTS) == []


def test_first_syncs_fill_their_own_lane_and_pushes_still_start() -> None:
    """Two first syncs of hours run; more first syncs wait, but a push to an established account starts at once
    (before, one long sync held up every other account of the node until it was over)."""
    running = {10: FIRST, 11: FIRST}
    due = {12: Why.ROUND, 13: Why.CHANGED, 1: Why.PUSH}
    lanes = {12: FIRST, 13: FIRST, 1: REGULAR}
    assert to_start(due, running, lanes, SLOTS) == [1]


def test_regular_slots_full_leave_first_syncs_going() -> None:
    running = {1: REGULAR, 2: REGULAR, 3: REGULAR, 4: REGULAR}
    assert to_start({5: Why.PUSH, 9: Why.ROUND}, running, {5: REGULAR, 9: FIRST}, SLOTS) == [9]


def test_lane_by_whether_a_sync_ever_finished() -> None:
    assert lane(None) == FIRST
    assert lane("2026-11-27") == REGULAR


def test_merge_keeps_the_more_urgent_reason() -> None:
    due = {1: Why.PUSH, 2: Why.ROUND}
    merge(due, [1, 2, 3], Why.CHANGED)
    assert due == {1: Why.PUSH, 2: Why.CHANGED, 3: Why.CHANGED}


@given(
    due=st.dictionaries(st.integers(0, 30), st.sampled_from(list(Why)), max_size=20),
    running=st.dictionaries(st.integers(0, 30), st.sampled_from([FIRST, REGULAR]), max_size=10),
    lanes=st.dictionaries(st.integers(0, 30), st.sampled_from([FIRST, REGULAR])),
    first=st.integers(0, 4),
    regular=st.integers(0, 6),
)
def test_never_over_a_lanes_slots_never_twice_and_never_a_less_urgent_one_first(
    due: dict[int, Why], running: dict[int, str], lanes: dict[int, str], first: int, regular: int
) -> None:
    slots = Slots(first=first, regular=regular)
    chosen = to_start(due, running, lanes, slots)
    assert len(set(chosen)) == len(chosen) and not set(chosen) & set(running)
    assert set(chosen) <= set(due)
    for which in (FIRST, REGULAR):
        busy = sum(1 for v in running.values() if v == which)
        started = sum(1 for a in chosen if lanes.get(a, REGULAR) == which)
        assert started <= max(slots.of(which) - busy, 0)
        # a lane with room left started every waiting account of it, and passed over none more urgent
        waiting = [a for a in due if a not in running and a not in chosen and lanes.get(a, REGULAR) == which]
        if busy + started < slots.of(which):
            assert not waiting
        for a in waiting:
            assert all((due[c], c) < (due[a], a) for c in chosen if lanes.get(c, REGULAR) == which)
