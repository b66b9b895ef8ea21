"""Where message bodies are parsed: in the sync thread (InlineParser), or in worker processes (ParserPool).

Parsing (inboxd.parse, the stdlib's pure-Python MIME parser and the HTML sanitizer) is most of a first sync's CPU,
and Python threads share one core for it: with a pool, runs of bodies are parsed on other cores while the sync
thread stores the previous run and the fetch thread receives the next one. A worker that dies (a parser crash on a
hostile message, the OOM killer) costs nothing but time: the pool is rebuilt and that run is parsed in the sync
thread, where parse_message's own guarantees hold (a ParsedMessage or UnparseableMessage, never a crash).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import subprocess
import sys
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import structlog

from inboxd.errors import UnparseableMessage
from inboxd.parse import ParsedMessage
from inboxd.parse_worker import Answer, ParseOutcome, parse_all
from inboxd.pipe_io import PipeReader, PipeWriter, widen_pipe

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
        processes: _Processes,
        chunks: list[tuple[list[tuple[int, bytes]], Future[Answer]]],
        max_attachment_bytes: int,
    ) -> None:
        self._pool = pool
        self._processes = processes
        self._chunks = chunks
        self._max_attachment_bytes = max_attachment_bytes

    def result(self) -> dict[int, ParseOutcome]:
        outcomes: dict[int, ParseOutcome] = {}
        for bodies, future in self._chunks:
            try:
                parsed = future.result()
            except Exception as exc:  # a dead worker, or anything else that went wrong on the way: parse here
                if isinstance(exc, _WORKER_GONE):
                    self._pool.broken(exc, self._processes)
                else:
                    log.warning("parse.worker_failed", error_kind=type(exc).__name__)
                outcomes.update(parse_all(dict(bodies), self._max_attachment_bytes))
                continue
            for uid, outcome in parsed:
                outcomes[uid] = outcome if isinstance(outcome, ParsedMessage) else UnparseableMessage(outcome)
        return outcomes


# What a request to a dead (or dying) worker raises: a closed pipe on the way there, none or half an answer back.
_WORKER_GONE = (OSError, EOFError, pickle.UnpicklingError)


class _Worker:
    """One parser process, ``python -m inboxd.parse_worker DAEMON_PID``: a request is a pickled (chunk, limit) on its
    stdin, the answer the pickled parse_chunk result on its stdout, one at a time, both through inboxd.pipe_io. A
    plain child process, not multiprocessing's: nothing of the daemon is imported in it, and no resource-tracker
    process comes with it."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(  # noqa: S603 (our own interpreter and module)
            [sys.executable, "-m", "inboxd.parse_worker", str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
        )
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        for pipe in (self.process.stdin, self.process.stdout):
            widen_pipe(pipe.fileno())
        self._requests = PipeWriter(self.process.stdin.fileno())
        self._answers = PipeReader(self.process.stdout.fileno())

    def parse(self, chunk: list[tuple[int, bytes]], max_attachment_bytes: int, blob_dir: str | None) -> Answer:
        pickle.dump((chunk, max_attachment_bytes, blob_dir), self._requests, protocol=pickle.HIGHEST_PROTOCOL)
        answer: Answer = pickle.load(self._answers)  # noqa: S301 (our own worker's answer)
        return answer

    def stop(self) -> None:
        """Close its stdin (it exits at the end of its input), then wait a little; kill if it does not go."""
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


class _Processes:
    """One generation of workers, and a thread per worker that hands it chunks and waits for the answers (the pipe
    I/O releases the GIL). A worker that fails is not replaced here: every later chunk of this generation fails fast
    on it, and the pool starts a new generation (ParserPool.broken)."""

    def __init__(self, count: int, blob_dir: str | None) -> None:
        self.blob_dir = blob_dir
        self.workers: list[_Worker] = []
        try:
            for _ in range(count):
                self.workers.append(_Worker())
        except BaseException:  # one could not start (no memory, no processes left): stop the ones that did
            for worker in self.workers:
                worker.stop()
            raise
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        for worker in self.workers:
            self._idle.put(worker)
        self._threads = ThreadPoolExecutor(count, thread_name_prefix="inboxd-parse")

    def submit(self, chunk: list[tuple[int, bytes]], max_attachment_bytes: int) -> Future[Answer]:
        return self._threads.submit(self._parse, chunk, max_attachment_bytes)

    def _parse(self, chunk: list[tuple[int, bytes]], max_attachment_bytes: int) -> Answer:
        worker = self._idle.get()
        try:
            return worker.parse(chunk, max_attachment_bytes, self.blob_dir)
        except BaseException:
            with contextlib.suppress(OSError):
                worker.process.kill()  # half a request or half an answer may be in the pipes: the worker is done
            raise
        finally:
            self._idle.put(worker)

    def shutdown(self) -> None:
        self._threads.shutdown(wait=True, cancel_futures=True)
        for worker in self.workers:
            worker.stop()


class ParserPool:
    """Parse runs of at least MIN_POOL_RUN bodies in ``workers`` processes, started on first use; smaller runs
    inline. Workers are separate interpreters started with ``python -m inboxd.parse_worker`` (not forked: a fork of
    the threaded daemon could inherit a lock held by another thread) and exit by themselves when the daemon dies.

    With ``blob_dir`` (the store's BlobStore directory) the workers stage the attachments they decode there
    themselves, durably, and send the parts back with the staged file's name instead of their bytes (see
    inboxd.parse_worker.stash_attachments; the store adopts them); a run parsed inline keeps its bytes for the store
    to write."""

    def __init__(self, workers: int, *, blob_dir: Path | None = None) -> None:
        if workers < 1:
            raise ValueError("a parser pool needs at least one worker")
        self.workers = workers
        self.blob_dir = str(blob_dir) if blob_dir is not None else None
        self._lock = threading.Lock()
        self._processes: _Processes | None = None
        self._closed = False

    def start(self, bodies: Mapping[int, bytes], *, max_attachment_bytes: int) -> ParseJob:
        if len(bodies) < MIN_POOL_RUN:
            return _Deferred(bodies, max_attachment_bytes)
        items = list(bodies.items())
        size = -(-len(items) // (self.workers * _CHUNKS_PER_WORKER))
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        submitted = []
        processes = None
        try:
            processes = self._running()
            for chunk in chunks:
                submitted.append((chunk, processes.submit(chunk, max_attachment_bytes)))
        except (RuntimeError, OSError) as exc:  # workers that cannot start, or a pool shut down meanwhile
            self.broken(exc, processes)
            return _Deferred(bodies, max_attachment_bytes)
        return _Pooled(self, processes, submitted, max_attachment_bytes)

    def worker_pids(self) -> list[int]:
        """The process ids of the running workers (none before the first big run)."""
        with self._lock:
            processes = self._processes
        return [worker.process.pid for worker in processes.workers] if processes is not None else []

    def broken(self, exc: BaseException, failed: _Processes | None) -> None:
        """A worker of ``failed`` died or it cannot run: drop that generation, unless another run already replaced
        it (several syncs share the pool); the next run starts a new one."""
        if failed is None:  # the workers could not start: nothing to drop, the next run tries again
            log.warning("parse.pool_failed", error_kind=type(exc).__name__, workers=self.workers)
            return
        with self._lock:
            if self._processes is not failed:
                return
            self._processes = None
        log.warning("parse.pool_failed", error_kind=type(exc).__name__, workers=self.workers)
        threading.Thread(target=failed.shutdown, name="inboxd-parse-reap", daemon=True).start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            processes, self._processes = self._processes, None
        if processes is not None:
            processes.shutdown()

    def _running(self) -> _Processes:
        with self._lock:
            if self._closed:
                raise RuntimeError("the parser pool is closed")
            if self._processes is None:
                self._processes = _Processes(self.workers, self.blob_dir)
                log.info("parse.pool_started", workers=self.workers)
            return self._processes
