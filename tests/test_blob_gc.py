"""Attachment garbage collection (inboxd.blob_gc): files no mail_attachments or mail_outbox row names are deleted
once older than the grace period; a put or adopt of bytes already stored claims the file (its modification time),
and a collection or a forget running meanwhile keeps it. On SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
import structlog

from inboxd.blob_gc import GC_FIRST_DELAY, GC_INTERVAL, GRACE, GcSchedule, collect_garbage, collectable
from inboxd.blobs import _HOST as HOST
from inboxd.blobs import STAGING, BlobStore, StoredFile
from inboxd.cli import main
from inboxd.clock import FakeClock
from inboxd.crypto import SecretBox
from inboxd.forget import IN_FLIGHT, ForgetReport, delete_unused_blobs
from inboxd.models import MailOutbox
from inboxd.store import Credential, Store
from test_contacts import REC, Mailbox, write_config

outbox_t = MailOutbox.__table__  # type: ignore[attr-defined]
HOURS_AGO = time.time() - 2 * 3600


@pytest.fixture
def box(engine: sa.Engine, secret_box: SecretBox, tmp_path: Path) -> Mailbox:
    """A recruiter's mailbox filled through Store.store_batch (test_contacts.Mailbox), its files in tmp_path."""
    blobs = BlobStore(tmp_path / "attachments")
    store = Store(engine, clock=FakeClock(), secret_box=secret_box, blobs=blobs)
    account = store.add_account(REC, "fake", Credential("password", "x"))
    return Mailbox(store, account, store.ensure_folder(account.id, "INBOX", None).id, blobs)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put_old(blobs: BlobStore, data: bytes, *, at: float = HOURS_AGO) -> Path:
    path = blobs.put(sha(data), data)
    os.utime(path, (at, at))
    return path


def queue_outbox(engine: sa.Engine, account_id: int, key: str, attachments: object) -> None:
    with engine.begin() as conn:
        conn.execute(
            outbox_t.insert().values(account_id=account_id, to=["cand@example.org"], idempotency_key=key, subject="s")
        )
        # as the HR app writes it: the JSON text itself (on SQLite it may be no JSON at all)
        conn.execute(
            sa.text("UPDATE mail_outbox SET attachments = :a WHERE idempotency_key = :k"),
            {"a": attachments if isinstance(attachments, str) else json.dumps(attachments), "k": key},
        )


def test_collectable_is_the_unnamed_files_old_enough() -> None:
    files = [StoredFile("a" * 64, 100.0, 1), StoredFile("b" * 64, 100.0, 2), StoredFile("c" * 64, 300.0, 3)]
    doomed, recent = collectable(files, {"a" * 64}, cutoff=200.0)
    assert (doomed, recent) == ([StoredFile("b" * 64, 100.0, 2)], 1)


def test_inboxd_run_collects_ten_minutes_after_start_then_daily_never_twice_at_once() -> None:
    clock = FakeClock()
    schedule = GcSchedule(clock)
    assert not schedule.take(running=False), "not at start: `run --once` and restarts never collect"
    clock.sleep(GC_FIRST_DELAY.total_seconds() - 1)
    assert not schedule.take(running=False)
    clock.sleep(1)
    assert not schedule.take(running=True), "one at a time"
    assert schedule.take(running=False)
    assert not schedule.take(running=False)
    clock.sleep(GC_INTERVAL.total_seconds() - 1)
    assert not schedule.take(running=False)
    clock.sleep(1)
    assert schedule.take(running=False)


def test_a_collection_deletes_only_old_files_that_no_row_names(box: Mailbox, engine: sa.Engine) -> None:
    cv = b"%PDF cv of the candidate"
    box.deliver("m1", sender="Jane <jane@example.org>", to=REC, attachments=(("cv.pdf", cv, False),))
    os.utime(box.blobs.path(sha(cv)), (HOURS_AGO, HOURS_AGO))
    offer, offer_upper, orphan, fresh = b"offer letter", b"contract", b"nobody's file", b"being stored right now"
    for data in (offer, offer_upper, orphan):
        put_old(box.blobs, data)
    box.blobs.put(sha(fresh), fresh)  # no row yet, and new: a sync may be about to commit one
    queue_outbox(engine, box.account.id, "k1", [{"sha256": sha(offer), "filename": "offer.pdf"}])
    queue_outbox(engine, box.account.id, "k2", [{"sha256": sha(offer_upper).upper(), "filename": "c.pdf"}])

    dry = collect_garbage(engine, box.blobs, now=time.time(), dry_run=True)
    assert dry.as_dict() == {
        "dry_run": True,
        "files_checked": 5,
        "files_deleted": 1,
        "bytes_freed": len(orphan),
        "files_recent": 1,
        "files_failed": 0,
        "temporary_deleted": 0,
        "files_restored": 0,
    }
    assert box.blobs.has(sha(orphan)), "a dry run deletes nothing"

    report = collect_garbage(engine, box.blobs, now=time.time())
    assert (report.files_deleted, report.bytes_freed, report.files_recent) == (1, len(orphan), 1)
    assert not box.blobs.has(sha(orphan))
    for kept in (cv, offer, offer_upper, fresh):
        assert box.blobs.read(sha(kept)) == kept
    assert list((box.blobs.root / STAGING).iterdir()) == []
    # an hour later the fresh file, still unnamed, goes too
    later = collect_garbage(engine, box.blobs, now=time.time() + GRACE.total_seconds() + 1)
    assert later.files_deleted == 1 and not box.blobs.has(sha(fresh))


def test_the_temporary_files_of_puts_that_died_go_with_a_collection(box: Mailbox, engine: sa.Engine) -> None:
    shard = box.blobs.root / "ab"
    shard.mkdir(parents=True)
    dead, live = shard / ".tmp-dead", shard / ".tmp-writing"
    for path in (dead, live):
        path.write_bytes(b"half a file")
    os.utime(dead, (HOURS_AGO, HOURS_AGO))
    assert collect_garbage(engine, box.blobs, now=time.time(), dry_run=True).temporary_deleted == 1
    assert dead.exists()
    assert collect_garbage(engine, box.blobs, now=time.time()).temporary_deleted == 1
    assert not dead.exists() and live.exists(), "a put in progress keeps its file"


def test_an_outbox_row_whose_json_is_broken_still_keeps_its_files(box: Mailbox, engine: sa.Engine) -> None:
    """SQLite keeps any text in a JSON column: the row fails when sent, but the file it names stays."""
    data = b"attachment of a broken row"
    put_old(box.blobs, data)
    broken = f'[{{"sha256": "{sha(data)}", oops'
    if engine.dialect.name == "postgresql":
        with pytest.raises(sa.exc.DataError):  # PostgreSQL refuses it: nothing to protect there
            queue_outbox(engine, box.account.id, "k1", broken)
        return
    queue_outbox(engine, box.account.id, "k1", broken)
    assert collect_garbage(engine, box.blobs, now=time.time()).files_deleted == 0
    assert box.blobs.has(sha(data))


def test_a_row_the_hr_app_inserts_while_a_collection_runs_keeps_its_file(
    box: Mailbox, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outbox is read once when a collection starts, which can be hours before it reaches a given file: the
    HR app may attach an old file (a template its earlier rows used) meanwhile. The candidates are checked against
    the outbox again just before they go."""
    template = b"the company's standard offer template"
    put_old(box.blobs, template)
    queue_outbox(engine, box.account.id, "k1", [{"sha256": sha(template).upper(), "filename": "offer.pdf"}])
    monkeypatch.setattr("inboxd.blob_gc.outbox_shas", lambda conn: set())  # the snapshot from before that row
    report = collect_garbage(engine, box.blobs, now=time.time())
    assert (report.files_checked, report.files_deleted) == (1, 0)
    assert box.blobs.has(sha(template))


def test_a_file_moved_aside_by_a_collection_is_not_swept_as_staging(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "attachments")
    (blobs.root / STAGING).mkdir(parents=True)
    aside = blobs.root / STAGING / f"gc-{'a' * 64}.1.2"
    leftover = blobs.root / STAGING / f"{'b' * 64}.x"
    for path in (aside, leftover):
        path.write_bytes(b"x")
        os.utime(path, (HOURS_AGO, HOURS_AGO))
    assert blobs.sweep_staging(older_than=60) == 1
    assert aside.exists() and not leftover.exists()


def _set_aside(blobs: BlobStore, data: bytes, *, pid: int, host: str = HOST) -> Path:
    """What remove_unused does first: the file moved to .staging/gc-<sha256>.<pid>.<random>.<host>."""
    (blobs.root / STAGING).mkdir(parents=True, exist_ok=True)
    aside = blobs.root / STAGING / f"gc-{sha(data)}.{pid}.0a1b2c3d.{host}"
    os.rename(blobs.path(sha(data)), aside)
    return aside


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_file_a_dead_collection_left_aside_is_put_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A collection that dies (kill -9, OOM) between moving a file aside and deciding on it leaves it in the staging
    directory, and a row may name it (claimed just before the move): the next check puts it back, with a fresh time
    (as a claim leaves it), at once when the process that set it aside is gone from this host (a restart comes
    30 s after a kill), else a minute later. One the store has again meanwhile is not overwritten: the copy aside
    goes. Left alone: one this process, or another live one, may be deciding on, one from another host (until the
    minute), and names or entries the collection does not make."""
    blobs = BlobStore(tmp_path / "attachments")
    dead = _dead_pid()
    kept, rewritten, live, remote, old = (b"the CV a row still names", b"written again", b"ours", b"node 2", b"x")
    for data in (kept, rewritten, live, remote, old):
        put_old(blobs, data)
    asides = {
        kept: _set_aside(blobs, kept, pid=dead),
        rewritten: _set_aside(blobs, rewritten, pid=dead),
        live: _set_aside(blobs, live, pid=os.getpid()),
        remote: _set_aside(blobs, remote, pid=dead, host="another-node"),
    }
    old_style = blobs.root / STAGING / f"gc-{sha(old)}.1.2"  # the name before this version: pid and thread
    os.rename(blobs.path(sha(old)), old_style)
    blobs.put(sha(rewritten), b"written again")  # a sync wrote it anew after the move
    fresh_copy = blobs.path(sha(rewritten)).stat()
    stranger = blobs.root / STAGING / "gc-not-a-digest.1.2"
    stranger.write_bytes(b"?")
    (blobs.root / STAGING / f"gc-{'c' * 64}.{dead}.00.{HOST}").mkdir()

    assert blobs.restore_abandoned() == (1, 0)
    assert blobs.read(sha(kept)) == kept and blobs.path(sha(kept)).stat().st_mtime > time.time() - 60
    assert blobs.path(sha(rewritten)).stat().st_ino == fresh_copy.st_ino, "the file written meanwhile stays"
    assert not asides[rewritten].exists() and not asides[kept].exists()
    assert asides[live].exists() and asides[remote].exists() and old_style.exists() and stranger.exists()

    monkeypatch.setattr("inboxd.blobs.ASIDE_ABANDONED", -1.0)  # a minute later (ctime cannot be set back)
    assert blobs.restore_abandoned() == (3, 0)
    assert all(blobs.read(sha(data)) == data for data in (live, remote, old))
    assert sorted(p.name for p in (blobs.root / STAGING).iterdir()) == sorted(
        [stranger.name, f"gc-{'c' * 64}.{dead}.00.{HOST}"]
    )


def test_a_sweep_that_puts_a_file_back_while_its_collection_lives_keeps_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """remove_unused held up for over a minute between its move and its check (a stalled disk): the sweep takes the
    file for abandoned and puts it back, refreshed; the collection then keeps it."""
    blobs = BlobStore(tmp_path / "attachments")
    data = b"an attachment in a stalled collection"
    path = put_old(blobs, data)
    real_rename = os.rename

    def renamed_then_swept(src: object, dst: object) -> None:
        real_rename(src, dst)  # type: ignore[arg-type]
        monkeypatch.setattr("inboxd.blobs.ASIDE_ABANDONED", -1.0)
        assert blobs.restore_abandoned() == (1, 0)

    monkeypatch.setattr("inboxd.blobs.os.rename", renamed_then_swept)
    assert not blobs.remove_unused(sha(data), unchanged_since=time.time() - 60)
    assert path.read_bytes() == data


def test_the_collection_and_the_sweep_put_back_what_a_dead_collection_left(
    tmp_path: Path, engine: sa.Engine, secret_box: SecretBox
) -> None:
    """`inboxd attachments gc` restores first (not in a dry run), and the daemon's sweep at start and after each
    cycle does (store.attachments_restored)."""
    blobs = BlobStore(tmp_path / "attachments")
    data = b"set aside by a collection killed a moment ago"
    put_old(blobs, data)
    _set_aside(blobs, data, pid=_dead_pid())
    assert collect_garbage(engine, blobs, now=time.time(), dry_run=True).files_restored == 0
    assert not blobs.has(sha(data))
    report = collect_garbage(engine, blobs, now=time.time())
    assert report.files_restored == 1 and report.files_deleted == 0, "fresh again: kept for the grace"
    assert blobs.read(sha(data)) == data
    put_old(blobs, data)
    _set_aside(blobs, data, pid=_dead_pid())
    store = Store(engine, clock=FakeClock(), secret_box=secret_box, blobs=blobs)
    with structlog.testing.capture_logs() as logs:
        store.sweep_staged_attachments()
    assert blobs.has(sha(data))
    assert [e["files"] for e in logs if e["event"] == "store.attachments_restored"] == [1]


def test_adopting_finds_a_file_written_meanwhile_and_claims_it(tmp_path: Path) -> None:
    """The staged copy was swept, but the store has the file (another sync, or a restore, put it there): it counts
    as stored only with its time refreshed, so that a collection does not take it before the row commits."""
    blobs = BlobStore(tmp_path / "attachments")
    data = b"staged, swept, and in the store all the same"
    names = blobs.stage_all([(sha(data), data)])()
    path = put_old(blobs, data)
    real_utime = os.utime
    calls = []

    def first_claim_misses(target: object, *args: object) -> None:  # the file arrives just after the first claim
        calls.append(target)
        if len(calls) == 1:
            raise FileNotFoundError(target)
        real_utime(target, *args)  # type: ignore[arg-type]

    (blobs.root / STAGING / names[sha(data)]).unlink()  # swept
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("inboxd.blobs.os.utime", first_claim_misses)
        stored, durable = blobs.adopt_all([(sha(data), names[sha(data)])])
    durable()
    assert stored == {sha(data)} and path.stat().st_mtime > time.time() - 60


def test_storing_bytes_the_store_has_claims_the_file(tmp_path: Path) -> None:
    """put and adopt of bytes already stored refresh the file's time: the row about to name it is not committed
    yet, and a collection must not take the file from under it."""
    blobs = BlobStore(tmp_path / "attachments")
    data = b"the same CV, sent again"
    path = put_old(blobs, data)
    blobs.put(sha(data), data)
    assert path.stat().st_mtime > time.time() - 60
    os.utime(path, (HOURS_AGO, HOURS_AGO))
    names = blobs.stage_all([(sha(data), data)])()
    stored, durable = blobs.adopt_all([(sha(data), names[sha(data)])])
    durable()
    assert stored == {sha(data)} and path.stat().st_mtime > time.time() - 60
    assert not blobs.remove_unused(sha(data), unchanged_since=time.time() - 3600)
    assert blobs.read(sha(data)) == data


def test_a_file_whose_time_cannot_be_refreshed_is_replaced_by_a_fresh_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file the HR app wrote (an outbox attachment, its owner another user) refuses a new modification time
    (EPERM; root, which runs the tests, is never refused, hence the injected error): storing the same bytes puts
    inboxd's own copy over it, which is new, so the claim holds all the same."""
    blobs = BlobStore(tmp_path / "attachments")
    data = b"a template the HR app stored"
    path = put_old(blobs, data)
    before = path.stat().st_ino

    def refused(*args: object, **kwargs: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr("inboxd.blobs.os.utime", refused)
    blobs.put(sha(data), data)
    assert path.stat().st_ino != before and path.stat().st_mtime > time.time() - 60
    assert path.read_bytes() == data
    names = blobs.stage_all([(sha(data), data)])()
    stored, durable = blobs.adopt_all([(sha(data), names[sha(data)])])
    durable()
    assert stored == {sha(data)} and path.read_bytes() == data
    assert list((blobs.root / STAGING).iterdir()) == []


def test_a_claim_while_the_file_is_being_removed_puts_it_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race remove_unused closes: a sync claims the file after the collection read its old time. The claim
    lands before the move (simulated here inside it): the file is moved back. After the move, a claim finds no
    file and the sync writes its own copy."""
    blobs = BlobStore(tmp_path / "attachments")
    data = b"claimed at the last moment"
    path = put_old(blobs, data)
    real_rename = os.rename

    def claimed_then_renamed(src: object, dst: object) -> None:
        os.utime(src)  # type: ignore[arg-type]
        real_rename(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr("inboxd.blobs.os.rename", claimed_then_renamed)
    assert not blobs.remove_unused(sha(data), unchanged_since=time.time() - 60)
    assert path.read_bytes() == data
    assert list((blobs.root / STAGING).iterdir()) == []
    monkeypatch.undo()
    assert blobs.remove_unused(sha(data), unchanged_since=time.time() + 1)
    assert not path.exists()
    blobs.put(sha(data), data)  # what a claim after the move does: the bytes are written again
    assert path.read_bytes() == data


def test_forget_keeps_a_file_claimed_shortly_before_or_after_it_began(tmp_path: Path, engine: sa.Engine) -> None:
    """A sync claims a file (the same bytes arriving again) before it commits the row naming it: a claim within
    IN_FLIGHT before the erasure began, or after, keeps the file for the daily collection."""
    blobs = BlobStore(tmp_path / "attachments")
    old, just_before, after = b"the forgotten CV", b"the CV that came again a minute ago", b"and again just now"
    for data in (old, just_before, after):
        put_old(blobs, data)
    began = time.time()
    os.utime(blobs.path(sha(just_before)), (began - 60, began - 60))
    blobs.put(sha(after), after)
    report = ForgetReport(address_key="x", attachment_shas={sha(old), sha(just_before), sha(after)})
    delete_unused_blobs(engine, blobs, report, unchanged_since=began)
    assert (report.blobs_deleted, report.blobs_kept) == (1, 2)
    assert not blobs.has(sha(old)) and blobs.has(sha(just_before)) and blobs.has(sha(after))
    assert IN_FLIGHT.total_seconds() > 60


def test_forget_goes_on_past_a_file_it_may_not_delete(
    tmp_path: Path, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The erasure's rows are committed before its files go: a file that cannot be deleted (permissions; injected,
    as root is never refused) is counted as kept and logged once, and the other files still go."""
    blobs = BlobStore(tmp_path / "attachments")
    files = [b"first CV", b"a file of another user", b"third CV"]
    for data in files:
        put_old(blobs, data)
    real_rename = os.rename

    def refused_for_one(src: object, dst: object) -> None:
        if str(src).endswith(sha(files[1])):
            raise PermissionError(1, "Operation not permitted")
        real_rename(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr("inboxd.blobs.os.rename", refused_for_one)
    report = ForgetReport(address_key="x", attachment_shas={sha(data) for data in files})
    with structlog.testing.capture_logs() as logs:
        delete_unused_blobs(engine, blobs, report, unchanged_since=time.time())
    assert (report.blobs_deleted, report.blobs_kept) == (2, 1)
    assert [blobs.has(sha(data)) for data in files] == [False, True, False]
    assert [e["event"] for e in logs] == ["forget.attachment_delete_failed"]


def test_cli_gc(box: Mailbox, db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, db_url)  # attachments_dir = tmp_path/attachments, the mailbox's store
    put_old(box.blobs, b"orphan one")
    code = main(["--config", str(config), "attachments", "gc", "--dry-run", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out) == {
        "dry_run": True,
        "files_checked": 1,
        "files_deleted": 1,
        "bytes_freed": 10,
        "files_recent": 0,
        "files_failed": 0,
        "temporary_deleted": 0,
        "files_restored": 0,
    }
    assert main(["--config", str(config), "attachments", "gc"]) == 0
    out, _ = capsys.readouterr()
    assert "deleted 1 (0.0 MB) that no message or outbox row names" in out
    assert not box.blobs.has(sha(b"orphan one"))
