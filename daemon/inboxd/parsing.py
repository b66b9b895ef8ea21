"""Where message bodies are parsed: in the sync thread (InlineParser), or in worker processes (ParserPool).

Parsing (inboxd.parse, the stdlib's pure-Python MIME parser and the HTML sanitizer) is most of a first sync's CPU,
and Python threads share one core for it: with a pool, runs of bodies are parsed on other cores while the sync
thread stores the previous run and the fetch thread receives the next one. A worker is also where a hostile message
can do no harm: one that dies (a parser crash, the OOM killer) or overruns its time limit (a parser path that is
super-linear on some input) is replaced, and its chunk parsed again a message at a time in fresh workers, so that
the message that does it again is quarantined with the reason and the rest are stored.
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
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import structlog

from inboxd.errors import RetryLater, UnparseableMessage
from inboxd.parse import ParsedMessage
from inboxd.parse_worker import READY, Answer, ParseOutcome, parse_all
from inboxd.pipe_io import PipeReader, PipeWriter, readable, widen_pipe

log = structlog.get_logger(__name__)

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
                outcomes.update(_outcomes(future.result()))
            except WorkerDidNotStart as exc:  # the chunk never reached a worker: nobody's fault, parsed here
                self._pool.broken(exc, self._processes)
                outcomes.update(parse_all(dict(bodies), self._max_attachment_bytes))
            except Exception as exc:  # a worker that died or ran out of time, or anything else on the way
                log.warning("parse.worker_failed", error_kind=type(exc).__name__, messages=len(bodies))
                # not in this thread: the message that killed or stalled the worker would do the same here
                outcomes.update(self._pool.isolate(bodies, self._max_attachment_bytes))
        return outcomes


def _outcomes(answer: Answer) -> dict[int, ParseOutcome]:
    return {uid: o if isinstance(o, ParsedMessage) else UnparseableMessage(o) for uid, o in answer}


class WorkerDidNotStart(OSError):
    """A new worker did not say it was ready (an import hanging, no memory): not the fault of any message."""


class ParseTimedOut(OSError):
    """A worker did not answer within its time limit: it was killed."""

    def __init__(self, limit: float) -> None:
        super().__init__(f"no answer from the parser worker within {limit:.0f} s")
        self.limit = limit


# What a request to a dead (or dying) worker raises: a closed pipe on the way there, none or half an answer back;
# ParseTimedOut (an OSError) when it was killed for taking too long.
_WORKER_GONE = (OSError, EOFError, pickle.UnpicklingError)

# How long a worker may take over a chunk: the configured limit (sync.parse_time_limit) plus this per MiB of the
# chunk's bodies. Ordinary mail parses at several MB/s; the slowest linear shapes known take 3-6 s per MB
# (CHANGELOG, "Not yet"); super-linear ones, which this stops, take minutes to hours.
SECONDS_PER_MIB = 10.0
DEFAULT_TIME_LIMIT = 60.0  # sync.parse_time_limit's default (inboxd.config)
START_TIME_LIMIT = 60.0  # for a new worker's imports, before its first chunk
_ALONE_ATTEMPTS = 5  # requests for one message under isolation: two strikes, and room for a pool that is changing


def chunk_time_limit(bodies: list[tuple[int, bytes]], base: float) -> float:
    """The seconds a worker has to answer for ``bodies``."""
    return base + SECONDS_PER_MIB * sum(len(raw) for _, raw in bodies) / (1 << 20)


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
        self._answers_fd = self.process.stdout.fileno()
        self._started = False
        self._answers = PipeReader(self._answers_fd)

    def parse(
        self, chunk: list[tuple[int, bytes]], max_attachment_bytes: int, blob_dir: str | None, limit: float
    ) -> Answer:
        """The worker's answer; ParseTimedOut (the worker killed) when none has begun within ``limit`` seconds. The
        worker reads the whole request before it parses and writes its answer only when done, so waiting for
        the first byte of the answer is waiting for the parsing."""
        if not self._started:  # its imports are not its parsing: the clock starts once it says it is ready
            if not readable(self._answers_fd, START_TIME_LIMIT) or os.read(self._answers_fd, 1) != READY:
                self.process.kill()
                raise WorkerDidNotStart(f"the parser worker was not ready within {START_TIME_LIMIT:.0f} s")
            self._started = True
        pickle.dump((chunk, max_attachment_bytes, blob_dir), self._requests, protocol=pickle.HIGHEST_PROTOCOL)
        if not readable(self._answers_fd, limit):
            self.process.kill()
            raise ParseTimedOut(limit)
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
    I/O releases the GIL). A worker that fails (killed at its time limit, or dead) is replaced in place at once, so
    the chunks of other syncs in flight are not disturbed; only when no worker can start does the pool drop the
    generation (ParserPool.broken) and start a new one for the next run."""

    def __init__(self, count: int, blob_dir: str | None, time_limit: float) -> None:
        self.blob_dir = blob_dir
        self.time_limit = time_limit
        self.workers: list[_Worker] = []
        try:
            for _ in range(count):
                self.workers.append(_Worker())
        except BaseException:  # one could not start (no memory, no processes left): stop the ones that did
            for worker in self.workers:
                worker.stop()
            raise
        self._lock = threading.Lock()
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        for worker in self.workers:
            self._idle.put(worker)
        self._threads = ThreadPoolExecutor(count, thread_name_prefix="inboxd-parse")

    def submit(self, chunk: list[tuple[int, bytes]], max_attachment_bytes: int) -> Future[Answer]:
        return self._threads.submit(self._parse, chunk, max_attachment_bytes)

    def _parse(self, chunk: list[tuple[int, bytes]], max_attachment_bytes: int) -> Answer:
        worker = self._idle.get()
        try:
            if worker.process.poll() is not None:  # died while idle (the OOM killer): not this chunk's doing
                worker = self._replace(worker)
                if worker.process.poll() is not None:
                    raise WorkerDidNotStart("no parser worker could be started in place of one that died")
            return worker.parse(chunk, max_attachment_bytes, self.blob_dir, chunk_time_limit(chunk, self.time_limit))
        except BaseException:
            with contextlib.suppress(OSError):
                worker.process.kill()  # half a request or half an answer may be in the pipes: the worker is done
            worker = self._replace(worker)
            raise
        finally:
            self._idle.put(worker)

    def _replace(self, dead: _Worker) -> _Worker:
        """A new worker in the place of ``dead`` (reaped), so that the other chunks in flight and the next ones go on
        without a new generation; ``dead`` itself when none can start (the next request on it then raises
        WorkerDidNotStart)."""
        dead.stop()
        try:
            fresh = _Worker()
        except OSError as exc:
            log.warning("parse.worker_replace_failed", error_kind=type(exc).__name__)
            return dead
        with self._lock:
            self.workers = [fresh if w is dead else w for w in self.workers]
        return fresh

    def shutdown(self) -> None:
        self._threads.shutdown(wait=True, cancel_futures=True)
        for worker in self.workers:
            worker.stop()


class ParserPool:
    """Parse every run in ``workers`` processes (started by prestart() or on first use), each chunk within a time
    limit (``time_limit`` seconds plus SECONDS_PER_MIB per MiB): a worker that takes longer is killed, and so is
    one that crashes; the chunk is then parsed again one message at a time (isolate), so that only the message that
    does it is quarantined, with the reason. Even a run of one message found by IDLE goes to a worker: a round
    trip of about a millisecond, against a hostile message stalling or crashing the daemon. Workers are separate
    interpreters started with ``python -m inboxd.parse_worker`` (not forked: a fork of the threaded daemon could
    inherit a lock held by another thread) and exit by themselves when the daemon dies.

    With ``blob_dir`` (the store's BlobStore directory) the workers stage the attachments they decode there
    themselves, durably, and send the parts back with the staged file's name instead of their bytes (see
    inboxd.parse_worker.stash_attachments; the store adopts them); a run parsed inline keeps its bytes for the store
    to write."""

    def __init__(self, workers: int, *, blob_dir: Path | None = None, time_limit: float = DEFAULT_TIME_LIMIT) -> None:
        if workers < 1:
            raise ValueError("a parser pool needs at least one worker")
        self.workers = workers
        self.blob_dir = str(blob_dir) if blob_dir is not None else None
        self.time_limit = time_limit
        self._lock = threading.Lock()
        self._processes: _Processes | None = None
        self._closed = False

    def start(self, bodies: Mapping[int, bytes], *, max_attachment_bytes: int) -> ParseJob:
        if not bodies:  # a run whose bodies all went (expunged meanwhile, or only headers were wanted)
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

    def isolate(self, bodies: list[tuple[int, bytes]], max_attachment_bytes: int) -> dict[int, ParseOutcome]:
        """Parse ``bodies`` one message per request, after a chunk of them killed or stalled its worker (or went
        down with a worker another chunk killed): the message that does it again is found and quarantined with the
        reason, the others parse as ever. None is parsed in this thread: when no worker can start, RetryLater."""
        return {uid: self._alone(uid, raw, max_attachment_bytes) for uid, raw in bodies}

    def _alone(self, uid: int, raw: bytes, max_attachment_bytes: int) -> ParseOutcome:
        """One message in a worker of its own request. A timeout or a dead worker is a strike against it (a second
        try first: a stall of the machine or the OOM killer can do either once); two strikes quarantine it. When no
        worker can start it is not parsed here, where it could do what it did to the worker: the run fails for
        this cycle (RetryLater) and is fetched and parsed again in the next."""
        strikes: list[str] = []
        for _ in range(_ALONE_ATTEMPTS):
            try:
                processes = self._running()
            except (RuntimeError, OSError) as exc:  # closing, or no worker can start: not this message's doing
                self.broken(exc, None)
                raise RetryLater(
                    f"no parser worker ({type(exc).__name__}); the run is parsed again next cycle"
                ) from exc
            try:
                return _outcomes(processes.submit([(uid, raw)], max_attachment_bytes).result())[uid]
            except WorkerDidNotStart as exc:
                self.broken(exc, processes)
                raise RetryLater(f"no parser worker could start ({exc}); the run is parsed again next cycle") from exc
            except ParseTimedOut as exc:
                strikes.append(f"parsing took longer than {exc.limit:.0f} s (sync.parse_time_limit)")
                log.warning("parse.timed_out", uid=uid, size=len(raw), limit_s=round(exc.limit), strike=len(strikes))
            except (CancelledError, RuntimeError) as exc:  # the pool closing, or a generation dropped meanwhile
                if self._closed:
                    raise RetryLater("the parser pool is closing") from exc
                continue
            except _WORKER_GONE as exc:
                strikes.append("the parser process died on it")
                log.warning("parse.worker_died_on_message", uid=uid, size=len(raw), error_kind=type(exc).__name__)
            if len(strikes) == 2:
                return UnparseableMessage(strikes[-1] + ", twice" if strikes[0] == strikes[1] else "; ".join(strikes))
        raise RetryLater("the parser pool kept changing under this run; it is parsed again next cycle")

    def prestart(self) -> None:
        """Start the workers now rather than for the first run (they import while the daemon connects)."""
        try:
            self._running()
        except (RuntimeError, OSError) as exc:
            self.broken(exc, None)  # logged; the first run tries again

    def worker_pids(self) -> list[int]:
        """The process ids of the running workers (none before prestart() or the first run)."""
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
                self._processes = _Processes(self.workers, self.blob_dir, self.time_limit)
                log.info("parse.pool_started", workers=self.workers)
            return self._processes
