"""inboxd.parsing: a ParserPool gives what parsing in the sync thread gives (parsed messages and unparseable
reasons, per UID), keeps small runs in the calling thread, survives a dead worker, and a first sync through it stores
the same rows as one without it (on SQLite and PostgreSQL)."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
import structlog

from inboxd import parsing
from inboxd.blobs import STAGING, BlobStore
from inboxd.clock import FakeClock
from inboxd.crypto import SecretBox
from inboxd.errors import UnparseableMessage
from inboxd.models import MailAttachment, MailMessage
from inboxd.parse import ParsedMessage
from inboxd.parsing import InlineParser, ParseOutcome, ParserPool
from inboxd.pipe_io import PIPE_SIZE
from inboxd.planner import Capabilities
from inboxd.store import Credential, Store
from inboxd.sync import AccountSync, SyncSettings
from inboxd.testing import FakeMailbox, FakeSession

messages_t = MailMessage.__table__  # type: ignore[attr-defined]
attachments_t = MailAttachment.__table__  # type: ignore[attr-defined]
CORPUS = sorted((Path(__file__).parent / "corpus").glob("*.eml"))
MAX_ATTACHMENT = 25 * 1024 * 1024


@pytest.fixture(scope="module")
def pool() -> Iterator[ParserPool]:
    parser = ParserPool(2)
    yield parser
    parser.close()


def bodies(count: int) -> dict[int, bytes]:
    """``count`` bodies: the corpus over and over, each with a Message-ID of its own first, and only whitespace at
    every 7th UID (unparseable, as some corpus messages are)."""
    return {
        uid: b"  \r\n"
        if uid % 7 == 0
        else f"Message-ID: <{uid}@seq>\r\n".encode() + CORPUS[uid % len(CORPUS)].read_bytes()
        for uid in range(1, count + 1)
    }


def comparable(outcomes: dict[int, ParseOutcome]) -> dict[int, object]:
    return {uid: o.message if isinstance(o, UnparseableMessage) else o for uid, o in outcomes.items()}


def test_a_pool_parses_a_run_as_the_sync_thread_would(pool: ParserPool) -> None:
    run = bodies(60)
    pooled = pool.start(run, max_attachment_bytes=MAX_ATTACHMENT).result()
    inline = InlineParser().start(run, max_attachment_bytes=MAX_ATTACHMENT).result()
    assert comparable(pooled) == comparable(inline)
    assert sum(isinstance(o, UnparseableMessage) for o in pooled.values()) >= 8


def test_the_pipes_to_and_from_a_worker_hold_a_mebibyte(pool: ParserPool) -> None:
    """A run crosses in writes of up to PIPE_SIZE, not the default pipe's 64 KiB (fewer wake-ups on both ends)."""
    pool.start(bodies(16), max_attachment_bytes=MAX_ATTACHMENT).result()
    for pid in pool.worker_pids():
        for fd in (0, 1):  # the worker's stdin and stdout are the pipes' other ends
            with open(f"/proc/{pid}/fd/{fd}", "rb", buffering=0) as end:
                assert fcntl.fcntl(end.fileno(), fcntl.F_GETPIPE_SZ) == PIPE_SIZE


def test_even_one_message_is_parsed_in_a_worker(pool: ParserPool) -> None:
    """A message found by IDLE is parsed where a hostile one can do no harm either (with a time limit)."""
    job = pool.start(bodies(1), max_attachment_bytes=MAX_ATTACHMENT)
    assert type(job).__name__ == "_Pooled"
    assert len(job.result()) == 1


def test_a_run_without_bodies_parses_to_nothing(pool: ParserPool) -> None:
    assert pool.start({}, max_attachment_bytes=MAX_ATTACHMENT).result() == {}


def test_a_dead_worker_costs_a_retry_in_new_workers_not_the_run() -> None:
    parser = ParserPool(1)
    try:
        parser.prestart()
        pids = parser.worker_pids()
        assert len(pids) == 1
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        run = bodies(40)
        with structlog.testing.capture_logs() as logs:
            outcomes = parser.start(run, max_attachment_bytes=MAX_ATTACHMENT).result()
        assert comparable(outcomes) == comparable(
            InlineParser().start(run, max_attachment_bytes=MAX_ATTACHMENT).result()
        )
        assert [e["event"] for e in logs if e["event"].startswith("parse.")] == [], "replaced in place, no blame"
        assert parser.worker_pids() and parser.worker_pids() != pids, "parsed in a new worker"
        # and the next run goes to it
        again = parser.start(run, max_attachment_bytes=MAX_ATTACHMENT)
        assert type(again).__name__ == "_Pooled"
        assert len(again.result()) == 40
    finally:
        parser.close()


def slow_html(size: int) -> bytes:
    """A message html5ever (in nh3) takes seconds over: linear, but about 3 s per MB here."""
    html = "<table>" + "x<td>" * (size // 5)
    head = "From: a@example.test\r\nSubject: slow\r\nMessage-ID: <slow@example.test>\r\nContent-Type: text/html"
    return f"{head}\r\n\r\n{html}\r\n".encode()


def test_a_message_over_the_time_limit_is_quarantined_alone_and_the_rest_stored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A parser path that is slow on some input (super-linear ones take hours) held the sync of the account, and
    with one worker every account's, for as long as it took. The worker is killed at the time limit and the
    chunk parsed again a message at a time: only that message is quarantined."""
    monkeypatch.setattr(parsing, "SECONDS_PER_MIB", 0.0)  # the limit alone, so that a test-sized message overruns it
    run = bodies(30)
    run[5] = slow_html(2_000_000)
    parser = ParserPool(1, time_limit=1.0)
    try:
        parser.prestart()
        first = parser.worker_pids()
        with structlog.testing.capture_logs() as logs:
            outcomes = parser.start(run, max_attachment_bytes=MAX_ATTACHMENT).result()
        slow = outcomes.pop(5)
        assert isinstance(slow, UnparseableMessage)
        assert slow.message == "parsing took longer than 1 s (sync.parse_time_limit), twice"
        del run[5]
        expected = comparable(InlineParser().start(run, max_attachment_bytes=MAX_ATTACHMENT).result())
        assert comparable(outcomes) == expected
        timed_out = [e for e in logs if e["event"] == "parse.timed_out"]
        assert [(e["uid"], e["size"], e["strike"]) for e in timed_out] == [
            (5, len(slow_html(2_000_000)), 1),
            (5, len(slow_html(2_000_000)), 2),
        ], "a second try before it is quarantined: a stalled machine can overrun a limit once"
        assert parser.worker_pids() != first, "the stalled worker was killed and replaced"
        for pid in first:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    finally:
        parser.close()


def test_another_sync_parsing_meanwhile_is_not_disturbed_by_a_stalled_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two syncs share the pool; one run holds a message that overruns its time limit. Its worker is replaced in
    place: the other run's chunks are neither cancelled nor parsed again a message at a time, and none of its
    messages is blamed."""
    monkeypatch.setattr(parsing, "SECONDS_PER_MIB", 0.0)
    hostile = bodies(30)
    hostile[5] = slow_html(2_000_000)
    innocent = {1000 + uid: body for uid, body in bodies(60).items()}
    expected = comparable(InlineParser().start(innocent, max_attachment_bytes=MAX_ATTACHMENT).result())
    parser = ParserPool(2, time_limit=1.0)
    results: dict[str, dict[int, ParseOutcome]] = {}
    try:
        parser.prestart()
        with structlog.testing.capture_logs() as logs:
            first = threading.Thread(
                target=lambda: results.update(a=parser.start(hostile, max_attachment_bytes=MAX_ATTACHMENT).result())
            )
            first.start()
            time.sleep(0.3)  # the hostile chunk is in a worker
            for _ in range(3):
                results["b"] = parser.start(innocent, max_attachment_bytes=MAX_ATTACHMENT).result()
                assert comparable(results["b"]) == expected
            first.join(60)
    finally:
        parser.close()
    assert isinstance(results["a"].pop(5), UnparseableMessage)
    del hostile[5]
    assert comparable(results["a"]) == comparable(
        InlineParser().start(hostile, max_attachment_bytes=MAX_ATTACHMENT).result()
    )
    failed = [e for e in logs if e["event"] == "parse.worker_failed"]
    assert [e["messages"] for e in failed] == [8], "only the hostile run's chunk (of 8) was isolated"
    assert not any(e["event"] == "parse.pool_failed" for e in logs)


def test_a_worker_that_dies_on_the_same_message_twice_gets_it_quarantined(monkeypatch: pytest.MonkeyPatch) -> None:
    """A message that kills its worker (a crash in C or Rust code, memory) is tried in a fresh worker once more,
    then quarantined; the messages beside it are parsed. The crash here: workers whose address space is capped
    below what that message needs, so that reading the request (before parse_message, which would turn a
    MemoryError into UnparseableMessage itself) kills the process."""
    real_popen = subprocess.Popen

    def capped(*args: object, **kwargs: object) -> subprocess.Popen[bytes]:
        cap = 400 << 20
        return real_popen(*args, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap)), **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr("inboxd.parsing.subprocess.Popen", capped)
    run = bodies(20)
    run[3] = b"Subject: huge\r\n\r\n" + b"x" * (350 << 20)
    parser = ParserPool(1)
    try:
        with structlog.testing.capture_logs() as logs:
            outcomes = parser.start(run, max_attachment_bytes=MAX_ATTACHMENT).result()
    finally:
        parser.close()
    huge = outcomes.pop(3)
    assert isinstance(huge, UnparseableMessage)
    assert huge.message == "the parser process died on it, twice"
    del run[3]
    assert comparable(outcomes) == comparable(InlineParser().start(run, max_attachment_bytes=MAX_ATTACHMENT).result())
    assert [e["uid"] for e in logs if e["event"] == "parse.worker_died_on_message"] == [3, 3], "two strikes"


STOP_CONT_STORM = """
import os, random, signal, sys, time
pids = [int(p) for p in sys.argv[1:]]
while True:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGSTOP)
            time.sleep(random.random() * 0.002)
        finally:
            os.kill(pid, signal.SIGCONT)
    time.sleep(random.random() * 0.004)
"""


def test_stopping_and_continuing_both_processes_loses_no_byte_between_them() -> None:
    """SIGSTOP/SIGCONT (Ctrl-Z, a debugger, py-spy) interrupt pipe reads and writes half-way. With Python's buffered
    pipe objects this broke the stream: "invalid load key" answers, or both sides waiting forever. Here a storm of
    stops hits the test process and its worker while runs bigger than a pipe's buffer go back and forth."""
    big = {uid: b"Subject: big\r\n\r\n" + (b"line of text %d\r\n" % uid) * 20_000 for uid in range(1, 9)}
    run = {**bodies(40), **{1000 + uid: body for uid, body in big.items()}}
    expected = comparable(InlineParser().start(run, max_attachment_bytes=MAX_ATTACHMENT).result())
    parser = ParserPool(1)
    parser.prestart()
    parser.start(run, max_attachment_bytes=MAX_ATTACHMENT).result()  # the worker is up
    worker = parser.worker_pids()[0]
    storm = subprocess.Popen([sys.executable, "-c", STOP_CONT_STORM, str(os.getpid()), str(worker)])
    results: list[dict[int, object]] = []

    def runs() -> None:
        for _ in range(12):
            results.append(comparable(parser.start(run, max_attachment_bytes=MAX_ATTACHMENT).result()))

    try:
        with structlog.testing.capture_logs() as logs:
            thread = threading.Thread(target=runs)
            thread.start()
            thread.join(timeout=120)
            stuck = thread.is_alive()
            storm.kill()
            storm.wait()
            with contextlib.suppress(ProcessLookupError):  # a failed worker is gone
                os.kill(worker, signal.SIGCONT)  # the storm may have been killed between a stop and its continue
                if stuck:  # the old symptom: both sides waiting to read; killing the worker ends the wait
                    os.kill(worker, signal.SIGKILL)
            thread.join()
    finally:
        parser.close()
    assert not stuck, "the daemon and its worker both waited for the other"
    assert [e["event"] for e in logs if e["event"].startswith("parse.")] == []
    assert results == [expected] * 12


def test_workers_started_before_one_that_cannot_start_are_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second worker's fork fails (no processes left): the first is stopped at once, the run is parsed in the
    calling thread."""
    real_popen = subprocess.Popen
    started: list[subprocess.Popen[bytes]] = []

    def popen(*args: object, **kwargs: object) -> subprocess.Popen[bytes]:
        if started:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        started.append(real_popen(*args, **kwargs))  # type: ignore[call-overload]
        return started[0]

    monkeypatch.setattr("inboxd.parsing.subprocess.Popen", popen)
    parser = ParserPool(2)
    try:
        with structlog.testing.capture_logs() as logs:
            outcomes = parser.start(bodies(40), max_attachment_bytes=MAX_ATTACHMENT).result()
        assert len(outcomes) == 40
        assert [e["error_kind"] for e in logs if e["event"] == "parse.pool_failed"] == ["BlockingIOError"]
        assert len(started) == 1
        assert started[0].poll() is not None, "the worker that did start was left running"
    finally:
        parser.close()


def test_a_closed_pool_still_parses_in_the_calling_thread() -> None:
    parser = ParserPool(1)
    parser.close()
    assert len(parser.start(bodies(30), max_attachment_bytes=MAX_ATTACHMENT).result()) == 30


def test_a_pool_needs_a_worker() -> None:
    with pytest.raises(ValueError, match="at least one worker"):
        ParserPool(0)


def test_a_first_sync_through_the_pool_stores_what_the_inline_parser_stores(
    engine: sa.Engine, secret_box: SecretBox, pool: ParserPool
) -> None:
    """The same mailbox synced twice, into two accounts: bodies first (prefetching) with the pool, and the same
    with parsing in the sync thread; every stored column but ids and timestamps is equal, quarantine included."""
    clock = FakeClock()
    store = Store(engine, clock=clock, secret_box=secret_box)
    mailbox = FakeMailbox()
    for raw in bodies(90).values():
        mailbox.append("INBOX", raw, ["\\Seen"])
    caps = Capabilities(True, True)
    results = []
    for name, parser in (("pooled", pool), ("inline", InlineParser())):
        account = store.add_account(f"{name}@example.test", "fake", Credential("password", "x"))
        settings = SyncSettings(batch_size=40)
        stats = AccountSync(
            store, account, FakeSession(mailbox, caps), settings=settings, clock=clock, parser=parser
        ).run()
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(messages_t).where(messages_t.c.account_id == account.id).order_by(messages_t.c.id)
            ).all()
            attachments = conn.execute(
                sa.select(attachments_t.c.sha256, attachments_t.c.filename)
                .join(messages_t, messages_t.c.id == attachments_t.c.message_id)
                .where(messages_t.c.account_id == account.id)
                .order_by(attachments_t.c.id)
            ).all()
        skip = {"id", "account_id", "thread_id", "created_at", "updated_at"}
        results.append(
            (
                [{k: v for k, v in row._mapping.items() if k not in skip} for row in rows],
                attachments,
                stats.new_messages,
                stats.quarantined,
            )
        )
    assert results[0] == results[1]
    assert results[0][2] > 60
    assert results[0][3] >= 12  # the whitespace bodies, at least


def test_workers_stage_the_attachments_and_send_them_back_without_bytes(tmp_path: Path) -> None:
    """A worker with a blob directory writes each attachment it decodes to the staging directory and answers with
    the staged file's name instead of the bytes; nothing is in the store itself until adopt moves it there."""
    blob_dir = tmp_path / "blobs"
    parser = ParserPool(1, blob_dir=blob_dir)
    try:
        run = bodies(60)
        pooled = parser.start(run, max_attachment_bytes=MAX_ATTACHMENT).result()
        limited = parser.start(run, max_attachment_bytes=10).result()  # the parts over the limit are not written
    finally:
        parser.close()
    inline = InlineParser().start(run, max_attachment_bytes=MAX_ATTACHMENT).result()
    assert pooled.keys() == inline.keys()
    store = BlobStore(blob_dir)
    staged = 0
    for uid, expected in inline.items():
        got = pooled[uid]
        if not isinstance(expected, ParsedMessage):
            assert comparable({uid: got}) == comparable({uid: expected})
            continue
        assert isinstance(got, ParsedMessage)
        assert len(got.attachments) == len(expected.attachments)
        for part, whole in zip(got.attachments, expected.attachments, strict=True):
            assert (part.staged is not None) == bool(whole.data)
            if whole.data:
                staged += 1
                assert part.data == b""
                assert part.staged is not None
                assert (blob_dir / STAGING / part.staged).read_bytes() == whole.data
            assert dataclasses.replace(part, data=whole.data, staged=None) == whole
        assert dataclasses.replace(got, attachments=expected.attachments) == expected
    assert staged >= 8  # the corpus' attachments, several times over
    assert [f for f in blob_dir.iterdir() if f.name != STAGING] == [], "nothing is in the store before adopt"
    over = [a for o in limited.values() if isinstance(o, ParsedMessage) for a in o.attachments if a.size_bytes > 10]
    assert len(over) >= 8
    assert not any(a.staged or a.data for a in over)
    # adopt moves a staged file into place, or drops it when the store has the file already
    first = next(a for o in pooled.values() if isinstance(o, ParsedMessage) for a in o.attachments if a.staged)
    assert first.staged is not None
    assert store.adopt(first.sha256, first.staged)
    assert store.read(first.sha256) == next(
        a.data
        for o in inline.values()
        if isinstance(o, ParsedMessage)
        for a in o.attachments
        if a.sha256 == first.sha256
    )
    assert not (blob_dir / STAGING / first.staged).exists()
    assert store.adopt(first.sha256, first.staged), "the store has it: a staged copy that is gone is no loss"
    with pytest.raises(ValueError, match="staged"):
        store.adopt(first.sha256, "../" + first.staged)


def test_staged_files_of_runs_never_stored_are_swept_once_old(tmp_path: Path) -> None:
    """A run that was parsed but never stored (a stop, a lost lease) leaves staged files; the sweep removes those
    older than its limit, and adopt of a swept file says the file is not stored."""
    store = BlobStore(tmp_path / "blobs")
    data = {hashlib.sha256(b"%d" % i).hexdigest(): b"%d" % i for i in range(3)}
    names = store.stage_all(data.items())()
    old, fresh, gone = list(data)
    past = time.time() - 7200
    os.utime(tmp_path / "blobs" / STAGING / names[old], (past, past))
    os.utime(tmp_path / "blobs" / STAGING / names[gone], (past, past))
    assert store.sweep_staging(3600) == 2
    assert sorted(p.name for p in (tmp_path / "blobs" / STAGING).iterdir()) == [names[fresh]]
    assert not store.adopt(gone, names[gone])
    assert not store.has(gone)
    assert store.adopt(fresh, names[fresh]) and store.read(fresh) == data[fresh]
    assert BlobStore(tmp_path / "none").sweep_staging(0) == 0


def test_a_worker_that_cannot_write_the_blobs_sends_the_bytes_back(tmp_path: Path) -> None:
    """The blob directory is unusable (here a file; a full disk, permissions): the answer carries the bytes as without a
    directory, and the store's own write meets the failure and reports it."""
    blob_dir = tmp_path / "blobs"
    blob_dir.write_text("not a directory")
    parser = ParserPool(1, blob_dir=blob_dir)
    try:
        run = bodies(60)
        pooled = parser.start(run, max_attachment_bytes=MAX_ATTACHMENT).result()
    finally:
        parser.close()
    inline = InlineParser().start(run, max_attachment_bytes=MAX_ATTACHMENT).result()
    assert comparable(pooled) == comparable(inline)
    assert any(isinstance(o, ParsedMessage) and any(a.data for a in o.attachments) for o in pooled.values())


def test_a_first_sync_with_workers_writing_blobs_stores_what_the_inline_parser_stores(
    engine: sa.Engine, secret_box: SecretBox, tmp_path: Path, fs_calls: list[tuple[str, str]]
) -> None:
    """As above, with a blob store: the pool's workers write the attachment files, the sync thread writes them for
    the inline parser; the rows are the same (``stored`` included) and every stored file holds its bytes. Each file
    is durable before the commit of the rows naming it: renamed into place, then its directory and the store's root
    fsynced, then the commit."""
    sa.event.listen(engine, "commit", lambda _conn: fs_calls.append(("commit", "")))
    clock = FakeClock()
    mailbox = FakeMailbox()
    for raw in bodies(90).values():
        mailbox.append("INBOX", raw, ["\\Seen"])
    inline_parsed = InlineParser().start(bodies(90), max_attachment_bytes=MAX_ATTACHMENT).result()
    expected_bytes = {
        a.sha256: a.data for o in inline_parsed.values() if isinstance(o, ParsedMessage) for a in o.attachments
    }
    results = []
    pool = ParserPool(1, blob_dir=tmp_path / "pooled")
    try:
        for name, parser in (("pooled", pool), ("inline", InlineParser())):
            blobs = CountingBlobs(tmp_path / name, fs_calls)
            store = Store(engine, clock=clock, secret_box=secret_box, blobs=blobs)
            account = store.add_account(f"{name}-blobs@example.test", "fake", Credential("password", "x"))
            AccountSync(
                store,
                account,
                FakeSession(mailbox, Capabilities(True, True)),
                settings=SyncSettings(batch_size=45),  # two runs of 45, both for the pool
                clock=clock,
                parser=parser,
            ).run()
            with engine.connect() as conn:
                attachments = conn.execute(
                    sa.select(attachments_t.c.sha256, attachments_t.c.filename, attachments_t.c.stored)
                    .join(messages_t, messages_t.c.id == attachments_t.c.message_id)
                    .where(messages_t.c.account_id == account.id)
                    .order_by(attachments_t.c.id)
                ).all()
            for sha256, _, stored in attachments:
                assert stored
                assert blobs.read(sha256) == expected_bytes[sha256]
                waited = "adopt_all" if parser is pool else "put_all"
                assert _durable_before_commit(fs_calls, blobs.path(sha256), blobs.root, waited)
            results.append((attachments, blobs.handed))
    finally:
        pool.close()
    assert results[0][0] == results[1][0]
    assert len(results[0][0]) >= 8
    assert list((tmp_path / "pooled" / STAGING).iterdir()) == [], "every staged file was moved into place"
    assert results[0][1] == 0, "the sync thread wrote attachments that the workers had written"
    assert results[1][1] >= 1


def _durable_before_commit(calls: list[tuple[str, str]], path: Path, root: Path, waited: str) -> bool:
    """Whether, between ``path``'s rename into place and the next commit, its directory and ``root`` were fsynced
    and the store waited for the files (``waited``: put_all's or adopt_all's wait, as CountingBlobs records it)."""
    renamed = calls.index(("replace", str(path)))
    committed = calls.index(("commit", ""), renamed)
    between = calls[renamed + 1 : committed]
    return all(event in between for event in (("fsync", str(path.parent)), ("fsync", str(root)), ("waited", waited)))


class CountingBlobs(BlobStore):
    """A real blob store that counts the attachments the sync thread hands it to write, and records in ``events``
    when the store has waited for the files to be durable."""

    def __init__(self, root: Path, events: list[tuple[str, str]]) -> None:
        super().__init__(root)
        self.handed = 0
        self.events = events

    def put_all(self, blobs: Iterable[tuple[str, bytes]]) -> Callable[[], None]:
        listed = list(blobs)
        self.handed += len(listed)
        return self._recorded(super().put_all(listed), "put_all")

    def adopt_all(self, staged: Iterable[tuple[str, str]]) -> tuple[set[str], Callable[[], None]]:
        stored, durable = super().adopt_all(staged)
        return stored, self._recorded(durable, "adopt_all")

    def _recorded(self, wait: Callable[[], None], name: str) -> Callable[[], None]:
        def recorded() -> None:
            wait()
            self.events.append(("waited", name))

        return recorded


KILLED_DAEMON = """
import os, signal, sys
from inboxd.parsing import ParserPool
if __name__ == "__main__":
    pool = ParserPool(2)
    bodies = {uid: b"From: a@example.org\\r\\nSubject: x\\r\\n\\r\\nhi\\r\\n" for uid in range(40)}
    pool.start(bodies, max_attachment_bytes=1000).result()
    print(" ".join(str(pid) for pid in pool.worker_pids()), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_workers_exit_when_the_daemon_is_killed(tmp_path: Path) -> None:
    """`kill -9` of inboxd (or the OOM killer) never shuts the pool down: the workers notice and exit."""
    script = tmp_path / "daemon.py"
    script.write_text(KILLED_DAEMON)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == -signal.SIGKILL, run.stderr
    workers = [int(pid) for pid in run.stdout.splitlines()[-1].split()]  # after the log lines
    assert len(workers) == 2
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in workers):
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers), "a worker outlived the daemon"


SCRIPT_DAEMON = """
from inboxd.cli import main  # the inboxd console script starts like this: the whole daemon is imported
from inboxd.parsing import ParserPool
if __name__ == "__main__":
    pool = ParserPool(1)
    bodies = {uid: b"From: a@example.org\\r\\nSubject: x\\r\\n\\r\\nhi\\r\\n" for uid in range(20)}
    pool.start(bodies, max_attachment_bytes=1000).result()
    [pid] = pool.worker_pids()
    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
        print(cmdline.read().split(b"\\0")[1:3])
    with open(f"/proc/{pid}/maps") as maps:
        print("sqlalchemy" in maps.read())
    import os
    print(sorted(p for p in os.listdir("/proc") if p.isdigit() and os.path.exists(f"/proc/{p}/stat")
                 and int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1]) == os.getpid()))
    print(pid)
    pool.close()
"""

WORKER_MODULES = (
    "import sys, inboxd.parse_worker; print(sorted(m for m in sys.modules if m.split('.')[0] in "
    "('inboxd', 'sqlalchemy', 'structlog', 'multiprocessing', 'concurrent')))"
)


def test_workers_do_not_import_the_daemon(tmp_path: Path) -> None:
    """A worker is `python -m inboxd.parse_worker`: it imports the parser (~20 MB), not a second copy of the daemon
    the `inboxd` script imports (~87 MB), nor structlog or multiprocessing; and no other process comes with it (no
    multiprocessing resource tracker, 12 MB)."""
    script = tmp_path / "inboxd_script.py"
    script.write_text(SCRIPT_DAEMON)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    cmdline, mapped_sqlalchemy, children, pid = run.stdout.splitlines()[-4:]
    assert cmdline == str([b"-m", b"inboxd.parse_worker"])
    assert mapped_sqlalchemy == "False", "the worker loaded SQLAlchemy: it imported the daemon"
    assert children == str([pid]), "the daemon has other child processes than its worker"
    modules = subprocess.run([sys.executable, "-c", WORKER_MODULES], capture_output=True, text=True, check=True)
    assert modules.stdout.strip() == str(
        [
            # the blob store's writer threads (a worker writes the attachments it decodes): about 1.3 MB
            "concurrent",
            "concurrent.futures",
            "concurrent.futures._base",
            "concurrent.futures.thread",
            "inboxd",
            "inboxd.blobs",
            "inboxd.errors",
            "inboxd.html",
            "inboxd.mimesplit",
            "inboxd.parse",
            "inboxd.parse_worker",
            "inboxd.pipe_io",
        ]
    )
