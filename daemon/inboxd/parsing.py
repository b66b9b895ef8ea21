"""Where message bodies are parsed: in the sync thread (InlineParser), or in worker processes (ParserPool).

Parsing (inboxd.parse, the stdlib's pure-Python MIME parser and the HTML sanitizer) is most of a first sync's CPU,
and Python threads share one core for it: with a pool, runs of bodies are parsed on other cores while the sync
thread stores the previous run and the fetch thread receives the next one. A worker that dies (a parser crash on a
hostile message, the OOM killer) costs nothing but time: the pool is rebuilt and that run is parsed in the sync
thread, where parse_message's own guarantees hold (a ParsedMessage or UnparseableMessage, never a crash).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.spawn
import os
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol

import structlog

from inboxd.errors import UnparseableMessage
from inboxd.parse import ParsedMessage
from inboxd.parse_worker import ParseOutcome, exit_with, parse_all, parse_chunk

log = structlog.get_logger(__name__)

# Below this many bodies a run is parsed in the sync thread: shipping a few messages to a worker and back costs
# more than it saves, and an incremental sync (a message or two) never waits for a process.
MIN_POOL_RUN = 16
# A run is cut into about this many chunks per worker, so that workers finish together.
_CHUNKS_PER_WORKER = 2


class ParseJob(Protocol):
    def result(self) -> dict[int, ParseOutcome]:
        """UID -> what parse_message gave for that body (the exception when it raised UnparseableMessage)."""
        ...


class MessageParser(Protocol):
    def start(self, bodies: Mapping[int, bytes], *, max_attachment_bytes: int) -> ParseJob:
        """Begin parsing ``bodies`` (UID -> raw message); the job's result() waits for them."""
        ...


class _Deferred:
    """Parses when asked for the result, in the asking thread."""

    def __init__(self, bodies: Mapping[int, bytes], max_attachment_bytes: int) -> None:
        self._bodies = bodies
        self._max_attachment_bytes = max_attachment_bytes

    def result(self) -> dict[int, ParseOutcome]:
        return parse_all(self._bodies, self._max_attachment_bytes)


class InlineParser:
    """Parse in the thread that stores: no processes (the default for library use and tests)."""

    def start(self, bodies: Mapping[int, bytes], *, max_attachment_bytes: int) -> ParseJob:
        return _Deferred(bodies, max_attachment_bytes)


class _Pooled:
    def __init__(
        self,
        pool: ParserPool,
        executor: ProcessPoolExecutor,
        chunks: list[tuple[list[tuple[int, bytes]], Future[list[tuple[int, ParsedMessage | str]]]]],
        max_attachment_bytes: int,
    ) -> None:
        self._pool = pool
        self._executor = executor
        self._chunks = chunks
        self._max_attachment_bytes = max_attachment_bytes

    def result(self) -> dict[int, ParseOutcome]:
        outcomes: dict[int, ParseOutcome] = {}
        for bodies, future in self._chunks:
            try:
                parsed = future.result()
            except Exception as exc:  # a dead worker, or anything else that went wrong on the way: parse here
                if isinstance(exc, BrokenProcessPool | OSError | EOFError):
                    self._pool.broken(exc, self._executor)
                else:
                    log.warning("parse.worker_failed", error_kind=type(exc).__name__)
                outcomes.update(parse_all(dict(bodies), self._max_attachment_bytes))
                continue
            for uid, outcome in parsed:
                outcomes[uid] = outcome if isinstance(outcome, ParsedMessage) else UnparseableMessage(outcome)
        return outcomes


_stdlib_preparation_data = multiprocessing.spawn.get_preparation_data


def _without_main(name: str) -> dict[str, Any]:
    """What a spawned process is told to set up, minus the parent's ``__main__``: the ``inboxd`` script imports the
    whole daemon (87 MB) and a parser needs inboxd.parse (about 23 MB). Everything a worker runs is in
    inboxd.parse_worker, which imports nothing else."""
    data: dict[str, Any] = _stdlib_preparation_data(name)
    data.pop("init_main_from_path", None)
    data.pop("init_main_from_name", None)
    return data


class ParserPool:
    """Parse runs of at least MIN_POOL_RUN bodies in ``workers`` processes, started on first use; smaller runs
    inline. Workers are spawned (a fork of the threaded daemon could inherit a lock held by another thread) and exit
    by themselves when the daemon dies."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError("a parser pool needs at least one worker")
        self.workers = workers
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None
        self._closed = False

    def start(self, bodies: Mapping[int, bytes], *, max_attachment_bytes: int) -> ParseJob:
        if len(bodies) < MIN_POOL_RUN:
            return _Deferred(bodies, max_attachment_bytes)
        items = list(bodies.items())
        size = -(-len(items) // (self.workers * _CHUNKS_PER_WORKER))
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        submitted = []
        executor = None
        try:
            executor = self._running()
            for chunk in chunks:
                submitted.append((chunk, executor.submit(parse_chunk, chunk, max_attachment_bytes)))
        except (BrokenProcessPool, RuntimeError, OSError) as exc:  # broken, or shut down meanwhile
            self.broken(exc, executor)
            return _Deferred(bodies, max_attachment_bytes)
        return _Pooled(self, executor, submitted, max_attachment_bytes)

    def broken(self, exc: BaseException, failed: ProcessPoolExecutor | None) -> None:
        """A worker of ``failed`` died or it cannot run: drop it, unless another run already replaced it (several
        syncs share the pool); the next run starts a new one."""
        with self._lock:
            if failed is None or self._executor is not failed:
                return
            self._executor = None
        log.warning("parse.pool_failed", error_kind=type(exc).__name__, workers=self.workers)
        failed.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def _running(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise RuntimeError("the parser pool is closed")
            if self._executor is None:
                # the daemon spawns no other processes: leaving its __main__ out of every spawn is safe
                multiprocessing.spawn.get_preparation_data = _without_main
                self._executor = ProcessPoolExecutor(
                    self.workers,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=exit_with,
                    initargs=(os.getpid(),),
                )
                log.info("parse.pool_started", workers=self.workers)
            return self._executor
