"""B1 (first sync vs the bare fetch and mbsync), B2 (a sync with nothing changed) and B5 (scope "contacts" vs
"all"): each case runs real processes against the loopback stack and returns result rows.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import seed
from report import Row
from stack import Bench, Measured, measure, scratch

HERE = Path(__file__).resolve().parent
DATABASES = ("sqlite", "postgresql")
MB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Synced:
    """A first sync that has just finished: its config, environment and measures."""

    directory: Path
    config: Path
    env: dict[str, str]
    run: Measured
    bytes_sent: int
    stored: int


@dataclass
class Runs:
    """Measures later cases compare against: scope "all" first syncs by (size, database)."""

    first_sync: dict[tuple[int, str], Synced] = field(default_factory=dict)


# _LATE_CLEANUP: the files a case writes (inboxd's attachment files, mbsync's Maildir) are deleted with the run's
# directory when the whole bench ends, not after each case. On ext4 without a journal (this machine's root file
# system) a new inode skips every inode deleted in the last 5 s, or 5 min while its inode table block is unwritten
# (fs/ext4/ialloc.c, recently_deleted): deleting 20,000 files just before the next case made that case's own file
# creation scan them, in the kernel and on its clock (perf: 6% of inboxd's samples in find_inode_bit even 90 s
# after a deletion). A deployment does not delete thousands of files just before a first sync; the bench should not.


class Cases:
    def __init__(self, bench: Bench, *, seed_value: int = seed.DEFAULT_SEED, keep: bool = False) -> None:
        self.bench = bench
        self.seed = seed_value
        self.keep = keep
        self.runs = Runs()

    # -- setup ------------------------------------------------------------------------------------------------

    def mailbox(self, size: int) -> str:
        """The bench user for `size` messages, seeded (from the cached pool) and indexed by Dovecot."""
        user = self.bench.user(size)
        pool = seed.pool(self.bench.cache, size, self.seed)
        if seed.install(pool, self.bench.home(user), self.bench.doveadm, user):
            print(f"seed: {user}: {size} messages, {pool.total_bytes / MB:.0f} MB, {pool.kinds}", flush=True)
        return user

    @contextmanager
    def synced(self, size: int, kind: str, *, scope: str = "all", contacts: tuple[str, ...] = ()) -> Iterator[Synced]:
        """A fresh database, the account connected, and one timed `inboxd run --once` (the first sync)."""
        user = self.bench.user(size)
        directory = scratch(self.bench.work, f"{size}-{kind}-{scope}")
        with self.bench.database(kind, directory) as url:
            config = self.bench.write_config(directory, url, scope=scope)
            env = self.bench.connect(config, user, contacts=contacts)
            offset = self.bench.log_offset()
            run = self.run_once(env, directory / "inboxd.log")
            if run.returncode != 0:
                raise RuntimeError(f"inboxd run --once failed ({run.returncode}):\n{run.stdout}\nsee {directory}")
            sent = self.bench.bytes_sent(user, offset)
            yield Synced(directory, config, env, run, sent, self.bench.stored_messages(config))
        # the directory (attachment files) goes with the whole run's at the end, not here: see _LATE_CLEANUP

    def run_once(self, env: dict[str, str], log: Path) -> Measured:
        """`inboxd run --once`, timed. The stack is shared with the test suites, whose start.sh restarts it when
        its files change: a run that failed is retried once on a (re)started stack, and says so."""
        run = measure([self.bench.inboxd, "run", "--once"], env=env, stderr=log)
        if run.returncode == 0:
            return run
        print(f"bench: inboxd run --once failed, retrying once on a restarted stack:\n{run.stdout}", flush=True)
        self.bench.stack.start()
        return measure([self.bench.inboxd, "run", "--once"], env=env, stderr=log)

    # -- B1 ---------------------------------------------------------------------------------------------------

    def floor(self, size: int) -> tuple[Measured, int]:
        """The bare imapclient fetch of the same mailbox (floor.py), as its own process."""
        user = self.bench.user(size)
        directory = scratch(self.bench.work, f"{size}-floor")
        token = directory / "access.token"
        token.write_text(self.bench.stack.access_token(user))
        offset = self.bench.log_offset()
        stack = self.bench.stack
        cmd = [self.bench.python, str(HERE / "floor.py"), "--host", stack.host, "--port", str(stack.imap_port)]
        cmd += ["--ca-file", str(stack.ca_cert), "--user", user, "--token-file", str(token), "--batch-size", "200"]
        run = measure(cmd, stderr=directory / "floor.log")
        if run.returncode != 0:
            raise RuntimeError(f"floor fetch failed ({run.returncode}): see {directory / 'floor.log'}")
        fetched = json.loads(run.stdout)["messages"]
        if fetched != size:
            raise RuntimeError(f"floor fetch got {fetched} messages, expected {size}")
        sent = self.bench.bytes_sent(user, offset)
        shutil.rmtree(directory)
        return run, sent

    def mbsync(self, size: int) -> tuple[Measured, int]:
        """mbsync (isync) at its default settings into a fresh Maildir."""
        user = self.bench.user(size)
        directory = scratch(self.bench.work, f"{size}-mbsync")
        self.bench.allow_password_login(user)
        config = self.bench.mbsync_config(directory, user)
        offset = self.bench.log_offset()
        run = measure(["mbsync", "-c", str(config), "-a"], stderr=directory / "mbsync.log")
        if run.returncode != 0:
            raise RuntimeError(f"mbsync failed ({run.returncode}): see {directory / 'mbsync.log'}")
        inbox = directory / "maildir" / "INBOX"
        got = sum(1 for sub in ("cur", "new") for _ in (inbox / sub).iterdir())
        if got != size:
            raise RuntimeError(f"mbsync stored {got} messages, expected {size}")
        sent = self.bench.bytes_sent(user, offset)
        return run, sent  # its Maildir stays until the end of the run (_LATE_CLEANUP)

    def b1_b2(self, size: int, *, b1: bool, b2: bool) -> list[Row]:
        """B1 at `size` (floor, inboxd on each database, mbsync, ratios) and/or B2 after each first sync."""
        self.mailbox(size)
        rows: list[Row] = []
        floor = None
        if b1:
            cold, _ = self.floor(size)  # reads every file once: page cache and Dovecot's cache warm for all
            floor, floor_bytes = self.floor(size)
            rows += _process_rows("B1", f"{size} floor (cold run)", cold, size, rss_target=False)[:1]
            rows += _process_rows("B1", f"{size} floor", floor, size, rss_target=False)
            rows.append(Row("B1", f"{size} floor", "downloaded", floor_bytes / MB, "MB"))
        walls: dict[str, float] = {}
        for kind in DATABASES:
            with self.synced(size, kind) as synced:
                self.runs.first_sync[(size, kind)] = synced
                walls[kind] = synced.run.wall_s
                if b1:
                    case = f"{size} inboxd {kind}"
                    rows += _process_rows("B1", case, synced.run, size, rss_target=True)
                    rows.append(Row("B1", case, "downloaded", synced.bytes_sent / MB, "MB"))
                    rows.append(Row("B1", case, "stored", synced.stored, "msgs", f"= {size}", synced.stored == size))
                    assert floor is not None
                    ratio = synced.run.wall_s / floor.wall_s
                    rows.append(Row("B1", case, "time vs floor", ratio, "x", "<= 2.0 (aim 1.5)", ratio <= 2.0))
                if b2:
                    rows += self.b2(size, kind, synced)
        if b1:
            assert floor is not None
            mbsync, mbsync_bytes = self.mbsync(size)
            rows += _process_rows("B1", f"{size} mbsync", mbsync, size, rss_target=False)
            rows.append(Row("B1", f"{size} mbsync", "downloaded", mbsync_bytes / MB, "MB"))
            rows.append(Row("B1", f"{size} mbsync", "time vs floor", mbsync.wall_s / floor.wall_s, "x"))
            for kind in DATABASES:
                ratio = walls[kind] / mbsync.wall_s
                rows.append(Row("B1", f"{size} inboxd {kind}", "time vs mbsync", ratio, "x", "< 1.0", ratio < 1.0))
        return rows

    # -- B2 ---------------------------------------------------------------------------------------------------

    def b2(self, size: int, kind: str, synced: Synced) -> list[Row]:
        """A sync with nothing changed, right after the first: as a process, and in-process (insync.py)."""
        case = f"{size} {kind}"
        again = self.run_once(synced.env, synced.directory / "inboxd.log")
        if again.returncode != 0 or not re.search(r"\b0 new\b", again.stdout):
            raise RuntimeError(f"B2 {case}: the unchanged sync failed or stored mail:\n{again.stdout}")
        cmd = [self.bench.python, str(HERE / "insync.py"), "--config", str(synced.config), "--repeat", "5"]
        inproc = measure([*cmd, "--log", str(synced.directory / "insync.log")], env=synced.env)
        if inproc.returncode != 0:
            raise RuntimeError(f"B2 {case}: insync.py failed: {inproc.stdout}")
        stats = json.loads(inproc.stdout)
        if stats["new_messages_last"] != 0:
            raise RuntimeError(f"B2 {case}: nothing changed, yet {stats['new_messages_last']} new messages")
        names = ", ".join(f"{n} {c}" for n, c in sorted(stats["command_names"].items()))
        print(f"B2 {case}: IMAP commands of one unchanged cycle: {names}", flush=True)
        per_folder = stats["max_commands_per_folder"]
        new_session = stats["new_session_sync_ms"]
        return [
            Row("B2", case, "process wall", again.wall_s * 1000, "ms"),
            Row("B2", case, "sync wall", stats["sync_ms"], "ms", "<= 50", stats["sync_ms"] <= 50),
            Row("B2", case, "of which STATUS round trips", stats["status_ms"], "ms"),
            Row("B2", case, "IMAP commands", stats["commands"], "cmds"),
            Row("B2", case, "sync wall, new session", new_session, "ms", "<= 50", new_session <= 50),
            Row("B2", case, "of which STATUS, new session", stats["new_session_status_ms"], "ms"),
            Row("B2", case, "IMAP commands, new session", stats["new_session_commands"], "cmds"),
            Row("B2", case, "folders", stats["folders"], "folders"),
            Row("B2", case, "max commands per folder", per_folder, "cmds", "<= 2", per_folder <= 2),
        ]

    def b2_only(self, size: int) -> list[Row]:
        """B2 at a size B1 does not measure: a first sync (not reported), then the unchanged one."""
        self.mailbox(size)
        rows: list[Row] = []
        for kind in DATABASES:
            with self.synced(size, kind) as synced:
                rows += self.b2(size, kind, synced)
        return rows

    # -- B5 ---------------------------------------------------------------------------------------------------

    def b5(self, size: int) -> list[Row]:
        """scope "contacts" (1% candidate mail, the candidates in mail_contacts) against scope "all", SQLite."""
        self.mailbox(size)
        reference = self.runs.first_sync.get((size, "sqlite"))
        if reference is None:
            with self.synced(size, "sqlite") as synced:
                reference = synced
        candidates = sum(seed.is_candidate(self.seed, i) for i in range(size))
        with self.synced(size, "sqlite", scope="contacts", contacts=seed.CANDIDATES) as synced:
            contacts = synced
        bytes_ratio = contacts.bytes_sent / reference.bytes_sent
        return [
            Row("B5", f"{size} all", "wall", reference.run.wall_s, "s"),
            Row("B5", f"{size} all", "downloaded", reference.bytes_sent / MB, "MB"),
            Row("B5", f"{size} contacts", "wall", contacts.run.wall_s, "s"),
            Row("B5", f"{size} contacts", "downloaded", contacts.bytes_sent / MB, "MB"),
            Row("B5", f"{size} contacts", "stored", contacts.stored, "msgs", f"= {candidates} candidate msgs",
                contacts.stored == candidates),
            Row("B5", f"{size} contacts", "time vs all", contacts.run.wall_s / reference.run.wall_s, "x"),
            Row("B5", f"{size} contacts", "bytes vs all", 100 * bytes_ratio, "%", "<= 10", bytes_ratio <= 0.10),
        ]  # fmt: skip


def _process_rows(bench: str, case: str, run: Measured, size: int, *, rss_target: bool) -> list[Row]:
    """Wall, rate, peak RSS of the process, and of it with its children (inboxd's parser workers): the target
    applies to the whole, which is what the host gives inboxd."""
    tree_ok = run.peak_tree_rss_mb <= 200 if rss_target else None
    target = "<= 200" if rss_target else None
    return [
        Row(bench, case, "wall", run.wall_s, "s"),
        Row(bench, case, "rate", size / run.wall_s, "msgs/s"),
        Row(bench, case, "peak RSS", run.peak_rss_mb, "MB"),
        Row(bench, case, "peak RSS, all processes", run.peak_tree_rss_mb, "MB", target, tree_ok),
    ]


def flatness(rows: list[Row]) -> list[Row]:
    """Across sizes: B1 peak RSS within +-15% from the smallest to the largest size, B2 sync wall flat (grows by
    at most 15% or 5 ms, whichever is larger: a few ms of jitter is not growth, and a drop is noise)."""
    out: list[Row] = []
    for kind in DATABASES:
        rss = {int(r.case.split()[0]): r.value for r in rows if r.bench == "B1" and r.case.endswith(f"inboxd {kind}")
               and r.metric == "peak RSS, all processes"}  # fmt: skip
        if len(rss) >= 2:
            lo, hi = min(rss), max(rss)
            ratio = rss[hi] / rss[lo]
            out.append(Row("B1", f"{lo}->{hi} inboxd {kind}", "peak RSS growth (all)", 100 * (ratio - 1), "%", "+-15",
                           abs(ratio - 1) <= 0.15))  # fmt: skip
        for metric in ("sync wall", "sync wall, new session"):
            sync = {int(r.case.split()[0]): r.value for r in rows if r.bench == "B2" and r.case.endswith(f" {kind}")
                    and r.metric == metric}  # fmt: skip
            if len(sync) >= 2:
                lo, hi = min(sync), max(sync)
                growth = sync[hi] - sync[lo]
                flat = growth <= max(0.15 * sync[lo], 5.0)
                out.append(Row("B2", f"{lo}->{hi} {kind}", f"{metric} growth", growth, "ms", "<= 15% or 5 ms", flat))
    return out
