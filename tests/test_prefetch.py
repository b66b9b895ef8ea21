"""inboxd.prefetch: the producer runs at most one item ahead, in order, and its failures and an early stop of the
consumer reach the other side (the sync relies on it to fetch bodies while the previous run is stored)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from inboxd.prefetch import Prefetched


def test_items_arrive_in_order_and_the_producer_stays_one_item_ahead() -> None:
    made: list[int] = []

    def source() -> Iterator[int]:
        for i in range(6):
            made.append(i)
            yield i

    seen: list[tuple[int, int]] = []
    with Prefetched(source(), ahead=1) as items:
        for item in items:
            # the producer may be making item+2 (blocked on the full queue with item+1 in it), never further
            threading.Event().wait(0.05)
            seen.append((item, len(made)))
    assert [item for item, _ in seen] == list(range(6))
    assert all(made_so_far <= item + 3 for item, made_so_far in seen)
    assert any(made_so_far > item + 1 for item, made_so_far in seen), "the producer did work ahead"


def test_a_producer_failure_is_raised_at_the_consumer_after_the_items_made_before_it() -> None:
    def source() -> Iterator[int]:
        yield 1
        yield 2
        raise ConnectionResetError("server went away")

    seen: list[int] = []

    def consume() -> None:
        with Prefetched(source()) as items:
            seen.extend(items)

    with pytest.raises(ConnectionResetError, match="server went away"):
        consume()
    assert seen == [1, 2]


def test_a_consumer_that_stops_early_stops_and_joins_the_producer() -> None:
    finished = threading.Event()
    thread_of_finally: list[str] = []

    def source() -> Iterator[int]:
        try:
            yield from range(1_000_000)
        finally:
            thread_of_finally.append(threading.current_thread().name)
            finished.set()

    def consume() -> None:
        with Prefetched(source(), name="fetcher") as items:
            for item in items:
                if item == 3:
                    raise RuntimeError("store failed")

    with pytest.raises(RuntimeError, match="store failed"):
        consume()
    assert finished.is_set(), "the producer was stopped and waited for before the with block ended"
    assert thread_of_finally == ["fetcher"], "the source was closed in its own thread"
    assert not any(t.name == "fetcher" for t in threading.enumerate())


def test_an_exhausted_source_ends_the_iteration() -> None:
    with Prefetched(iter([])) as items:
        assert list(items) == []
