"""The `inboxd` command line end to end: config errors, secrets, schema checks, accounts, `run --once` against the
loopback mail stack, status, and the TTY progress display. Mostly in-process through `inboxd.cli.main`; a few runs of
the installed console script prove the exit codes a shell (or systemd) sees. DB-bound tests run on SQLite and
PostgreSQL."""

from __future__ import annotations

import io
import json
import os
import secrets
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from harness import MailStack, make_message
from harness.config import write_stack_config
from inboxd import db
from inboxd.cli import _importing, main
from inboxd.clock import FakeClock
from inboxd.progress import ProgressDisplay

INBOXD = Path(sys.executable).parent / "inboxd"

MINIMAL_CONFIG = """
[database]
url = "{db_url}"
[secrets]
key_file = "{dir}/secret.key"
[providers.local]
kind = "imap"
imap_host = "127.0.0.1"
imap_port = {imap_port}
imap_tls = "plain"
auth = "oauth2"
token_uri = "http://127.0.0.1:1/token"
client_id = "id"
client_secret = "secret"
{extra}
"""


@dataclass
class Result:
    code: int
    out: str
    err: str


@dataclass
class Cli:
    """Runs `inboxd --config CONFIG ...` in-process and keeps every byte it printed (for the no-secret-leak checks)."""

    capsys: pytest.CaptureFixture[str]
    config: Path | None = None
    transcript: list[str] = field(default_factory=list)

    def __call__(self, *args: str) -> Result:
        argv = ["--config", str(self.config), *args] if self.config else list(args)
        code = main(argv)
        out, err = self.capsys.readouterr()
        self.transcript += [out, err]
        return Result(code, out, err)

    def json(self, *args: str) -> Any:
        result = self(*args, "--json")
        assert result.code == 0, result
        return json.loads(result.out)

    def record(self, proc: subprocess.CompletedProcess[str]) -> None:
        self.transcript += [proc.stdout, proc.stderr]

    def assert_never_printed(self, secret: str) -> None:
        assert self.transcript, "nothing was run"
        leaks = [text for text in self.transcript if secret in text]
        assert not leaks, f"secret printed: {leaks!r}"


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(capsys)


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The installed console script, as ops run it."""
    base = {k: v for k, v in os.environ.items() if k != "INBOXD_CONFIG"}
    return subprocess.run(
        [str(INBOXD), *args], env={**base, **(env or {})}, capture_output=True, text=True, timeout=120, check=False
    )


def minimal_config(tmp_path: Path, *, db_url: str | None = None, imap_port: int | str = 143, extra: str = "") -> Path:
    """A valid config (one loopback IMAP provider `local`) that needs no running servers."""
    path = tmp_path / "inboxd.toml"
    url = db_url or f"sqlite:///{tmp_path / 'inboxd.db'}"
    path.write_text(MINIMAL_CONFIG.format(dir=tmp_path, db_url=url, imap_port=imap_port, extra=extra))
    return path


# --- config -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["--config", "INBOXD_CONFIG"])
def test_bad_imap_port_exits_2_naming_file_and_key(
    via: str, tmp_path: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config error exits 2 and names the file, the dotted key and the problem, whichever way the file is given."""
    path = minimal_config(tmp_path, imap_port=99999)
    if via == "INBOXD_CONFIG":
        monkeypatch.setenv("INBOXD_CONFIG", str(path))
    else:
        cli.config = path
    result = cli("status")
    assert result.code == 2
    assert str(path) in result.err
    assert "providers.local.imap_port" in result.err
    assert "99999" in result.err
    assert result.out == ""


def test_unknown_config_key_exits_2_naming_file_and_key(tmp_path: Path, cli: Cli) -> None:
    """A misspelt key is an error (not silently ignored): exit 2 with file and key."""
    cli.config = minimal_config(tmp_path, extra="[sync]\nintervall = '5m'\n")
    result = cli("status")
    assert result.code == 2
    assert str(cli.config) in result.err
    assert "sync.intervall" in result.err and "unknown key" in result.err


def test_missing_config_exits_2_with_hint(cli: Cli) -> None:
    """Neither --config nor INBOXD_CONFIG: exit 2 and say how to name the config."""
    result = cli("status")
    assert result.code == 2
    assert "--config" in result.err and "INBOXD_CONFIG" in result.err


def test_config_file_not_found_exits_2_naming_it(tmp_path: Path, cli: Cli) -> None:
    """A --config path that does not exist: exit 2 and the message names that path."""
    cli.config = tmp_path / "nope.toml"
    result = cli("status")
    assert result.code == 2
    assert str(tmp_path / "nope.toml") in result.err and "not found" in result.err


def test_console_script_exits_2_on_config_errors(tmp_path: Path) -> None:
    """The installed `inboxd` script turns config errors into exit status 2 (no config; bad key via INBOXD_CONFIG)."""
    missing = run_script("status")
    assert missing.returncode == 2, missing
    assert "INBOXD_CONFIG" in missing.stderr

    path = minimal_config(tmp_path, imap_port='"imap"')
    bad = run_script("status", env={"INBOXD_CONFIG": str(path)})
    assert bad.returncode == 2, bad
    assert str(path) in bad.stderr and "providers.local.imap_port" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_console_script_flushes_what_it_printed_before_its_fast_exit(tmp_path: Path) -> None:
    """`inboxd` leaves by os._exit after main() (cli.entry): what it printed into a pipe (block-buffered, as under
    systemd; PYTHONUNBUFFERED taken out) still arrives whole, and its exit status is main's."""
    env = {k: v for k, v in os.environ.items() if k not in ("INBOXD_CONFIG", "PYTHONUNBUFFERED")}
    env["INBOXD_CONFIG"] = str(minimal_config(tmp_path))

    def script(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(INBOXD), *args], env=env, capture_output=True, text=True, timeout=120, check=False)

    created = script("secrets", "init")
    assert created.returncode == 0, created
    assert created.stdout.startswith("created ") and created.stdout.endswith("credentials are lost\n")
    upgraded = script("db", "upgrade")
    assert upgraded.returncode == 0, upgraded
    assert upgraded.stdout.startswith("database at schema "), upgraded
    listed = script("accounts", "list", "--json")
    assert listed.returncode == 0, listed
    assert json.loads(listed.stdout) == []
    unknown = script("run", "--once", "--account", "nobody@example.test")
    assert unknown.returncode == 2, unknown
    assert "nobody@example.test" in unknown.stderr


UMASK_AFTER_MAIN = """
import hashlib, os, pathlib, sys
from inboxd.blobs import BlobStore
from inboxd.cli import main
os.umask(int(sys.argv[1], 8))
assert main(["secrets", "init"]) == 0
digest = hashlib.sha256(b"x").hexdigest()
BlobStore(pathlib.Path(sys.argv[2])).put(digest, b"x")
print(oct(os.stat(os.path.join(sys.argv[2], digest[:2])).st_mode & 0o777))
"""


@pytest.mark.parametrize(
    ("inherited", "directory"),
    [("0027", "0o750"), ("0022", "0o750"), ("0007", "0o770"), ("0077", "0o700"), ("0000", "0o770")],
)
def test_the_services_umask_decides_the_groups_access_never_others(
    tmp_path: Path, inherited: str, directory: str
) -> None:
    """inboxd adds 007 to the umask it inherits: nothing it creates is readable by others, and the group gets what
    the service's UMask gives it (0007: the HR app's group may write into new attachment directories, docs/ops.md).
    It used to set 027 outright, so UMask=0007 gave 0750 directories the HR app could not write into."""
    env = {k: v for k, v in os.environ.items() if k != "INBOXD_CONFIG"}
    env["INBOXD_CONFIG"] = str(minimal_config(tmp_path))
    blobs = tmp_path / "blobs"
    run = subprocess.run(
        [sys.executable, "-c", UMASK_AFTER_MAIN, inherited, str(blobs)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == directory
    key = tmp_path / "secret.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


NO_PSYCOPG_ON_SQLITE = """
import sys
from inboxd.cli import main
assert main(["secrets", "init"]) == 0 and main(["db", "upgrade"]) == 0 and main(["run", "--once"]) == 0
print(sorted(m for m in sys.modules if m.split(".")[0] == "psycopg"))
"""


def test_a_command_on_sqlite_does_not_import_psycopg(tmp_path: Path) -> None:
    """Importing psycopg takes about 0.1 s, a fifth of a command's start-up: only PostgreSQL needs it."""
    env = {k: v for k, v in os.environ.items() if k != "INBOXD_CONFIG"}
    env["INBOXD_CONFIG"] = str(minimal_config(tmp_path))
    run = subprocess.run(
        [sys.executable, "-c", NO_PSYCOPG_ON_SQLITE], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "[]"


# --- secrets ------------------------------------------------------------------------------------------------


def test_secrets_init_creates_0600_key_and_refuses_overwrite_without_force(tmp_path: Path, cli: Cli) -> None:
    """`secrets init` writes a mode-0600 key; a second run exits 2 and keeps the key; --force replaces it."""
    cli.config = minimal_config(tmp_path)
    key = tmp_path / "secret.key"
    first = cli("secrets", "init")
    assert first.code == 0, first
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    original = key.read_bytes()
    assert len(original.strip()) >= 32

    again = cli("secrets", "init")
    assert again.code == 2
    assert str(key) in again.err and "already exists" in again.err
    assert key.read_bytes() == original

    script = run_script("--config", str(cli.config), "secrets", "init")
    assert script.returncode == 2, script
    assert key.read_bytes() == original

    forced = cli("secrets", "init", "--force")
    assert forced.code == 0, forced
    assert key.read_bytes() != original
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


# --- database schema ----------------------------------------------------------------------------------------


def test_commands_refuse_unmigrated_database_until_db_upgrade(empty_db_url: str, tmp_path: Path, cli: Cli) -> None:
    """Every command but `db upgrade` exits 2 on an un-migrated database and says to run `inboxd db upgrade`;
    `db upgrade` is idempotent and afterwards the commands work."""
    cli.config = minimal_config(tmp_path, db_url=empty_db_url)
    assert cli("secrets", "init").code == 0
    token_file = tmp_path / "token"
    token_file.write_text("some-refresh-token\n")
    for args in (
        ["status"],
        ["accounts", "list"],
        ["accounts", "add", "a@example.test", "--provider", "local", "--refresh-token-file", str(token_file)],
        ["run", "--once"],
    ):
        result = cli(*args)
        assert result.code == 2, (args, result)
        assert "inboxd db upgrade" in result.err, (args, result)

    for _ in range(2):
        upgraded = cli("db", "upgrade")
        assert upgraded.code == 0, upgraded
        assert f"database at schema {db.head_revision()}" in upgraded.out
    assert cli("status").code == 0
    assert cli.json("accounts", "list") == []


# --- accounts -----------------------------------------------------------------------------------------------


@pytest.fixture
def db_cli(db_url: str, tmp_path: Path, cli: Cli) -> Cli:
    """A CLI on a migrated database (SQLite and PostgreSQL) with the key created; no mail servers needed."""
    cli.config = minimal_config(tmp_path, db_url=db_url)
    assert cli("secrets", "init").code == 0
    return cli


@pytest.fixture
def stack_cli(db_url: str, tmp_path: Path, cli: Cli, mailstack: MailStack) -> Cli:
    """A CLI whose config points at the mail stack and a migrated database (SQLite and PostgreSQL), key created."""
    cli.config = write_stack_config(tmp_path, db_url, mailstack)
    assert cli("secrets", "init").code == 0
    return cli


def add_account(cli: Cli, stack: MailStack, tmp_path: Path, email: str) -> str:
    """Connect ``email`` through the CLI with a fresh refresh token; return the token."""
    token = stack.refresh_token(email)
    token_file = tmp_path / f"{email}.token"
    token_file.write_text(token + "\n")
    result = cli("accounts", "add", email, "--provider", "local", "--refresh-token-file", str(token_file))
    assert result.code == 0, result
    return token


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing token file", "cannot read refresh token file"),
        ("empty token file", "is empty"),
        ("unknown provider", "--provider 'nosuch' is not in the config (providers: local)"),
        ("invalid email", "'not-an-email' is not an email address"),
        ("password on oauth2 provider", "uses auth = 'oauth2'; pass --refresh-token-file"),
        ("two @ signs", "'ana@@example.test' is not an email address"),
        ("token file not UTF-8", "refresh token file"),
    ],
)
def test_accounts_add_rejects_bad_input_with_exit_2(case: str, expected: str, db_cli: Cli, tmp_path: Path) -> None:
    """`accounts add` exits 2 with a clear message for each kind of bad input, and stores no account."""
    token_file = tmp_path / "token"
    token_file.write_text("refresh-token-value\n")
    email, provider, cred = "ana@example.test", "local", ["--refresh-token-file", str(token_file)]
    if case == "missing token file":
        cred = ["--refresh-token-file", str(tmp_path / "missing")]
    elif case == "empty token file":
        token_file.write_text("\n")
    elif case == "unknown provider":
        provider = "nosuch"
    elif case == "invalid email":
        email = "not-an-email"
    elif case == "password on oauth2 provider":
        cred = ["--password-file", str(token_file)]
    elif case == "two @ signs":
        email = "ana@@example.test"
    elif case == "token file not UTF-8":
        token_file.write_bytes(b"refresh-token-value\xff\n")
    result = db_cli("accounts", "add", email, "--provider", provider, *cred)
    assert result.code == 2, result
    assert expected in result.err
    if case == "token file not UTF-8":
        assert result.err.strip().endswith("is not UTF-8 text")
    assert db_cli.json("accounts", "list") == []
    db_cli.assert_never_printed("refresh-token-value")


def test_accounts_add_and_list_json_never_expose_the_token(db_cli: Cli, tmp_path: Path, db_url: str) -> None:
    """A connected account is listed (--json shape, email lowercased); the refresh token is in no output and is
    stored encrypted (not a substring of inboxd_credentials.secret)."""
    token = "1//rt-" + secrets.token_urlsafe(32)
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    added = db_cli(
        "accounts", "add", "Ana@Example.test", "--provider", "local", "--refresh-token-file", str(token_file)
    )
    assert added.code == 0, added
    assert "ana@example.test" in added.out

    listed = db_cli.json("accounts", "list")
    assert len(listed) == 1
    (account,) = listed
    assert set(account) == {
        "id",
        "email",
        "provider",
        "enabled",
        "state",
        "state_reason",
        "last_sync_at",
        "last_error",
        "hr_user_ref",
    }
    assert account["email"] == "ana@example.test"
    assert account["provider"] == "local"
    assert account["enabled"] is True
    assert account["state"] == "active"
    assert account["last_sync_at"] is None
    assert isinstance(account["id"], int)

    table = db_cli("accounts", "list")
    assert table.code == 0 and "ana@example.test" in table.out

    db_cli("status")
    db_cli("status", "--json")
    db_cli.assert_never_printed(token)

    engine = db.create_engine(db_url)
    try:
        with engine.connect() as conn:
            stored = [bytes(row[0]) for row in conn.execute(sa.text("SELECT secret FROM inboxd_credentials"))]
    finally:
        engine.dispose()
    assert len(stored) == 1
    assert token.encode() not in stored[0]


# --- run --once against the mail stack ----------------------------------------------------------------------


def deliver(stack: MailStack, to: str, subject: str) -> None:
    stack.deliver(to, make_message("Cand <cand@example.org>", to, subject, "hello"))


def by_email(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["email"]: a for a in status["accounts"]}


@pytest.mark.mailstack
def test_run_once_syncs_every_account_and_status_shows_counts(
    stack_cli: Cli, tmp_path: Path, mailstack: MailStack
) -> None:
    """All accounts sync: exit 0, one summary line per account; `status` (table and --json) shows the message counts
    and last_sync_at."""
    ana, bo = mailstack.new_user("ana"), mailstack.new_user("bo")
    tokens = [add_account(stack_cli, mailstack, tmp_path, email) for email in (ana, bo)]
    deliver(mailstack, ana, "one")
    deliver(mailstack, ana, "two")
    deliver(mailstack, bo, "three")

    result = stack_cli("run", "--once")
    assert result.code == 0, result
    lines = result.out.splitlines()
    ana_line = next(line for line in lines if line.startswith(ana))
    bo_line = next(line for line in lines if line.startswith(bo))
    assert "ok" in ana_line and "2 new" in ana_line
    assert "ok" in bo_line and "1 new" in bo_line
    assert "2 of 2 accounts ok" in result.out

    full = stack_cli.json("status")
    status = by_email(full)
    assert (status[ana]["messages"], status[bo]["messages"]) == (2, 1)
    assert status[ana]["state"] == status[bo]["state"] == "active"
    assert status[ana]["last_sync_at"] and status[bo]["last_sync_at"]
    assert 0 <= status[ana]["lag_seconds"] < 60, "the same lag /metrics reports"
    assert status[ana]["node"] is None, "run --once holds no lease"
    assert (status[ana]["import_done"], status[ana]["import_total"]) == (2, 2), "the first sync's last numbers"
    assert (full["outbox_depth"], full["outbox_failed"]) == (0, 0)

    table = stack_cli("status")
    assert table.code == 0
    header, *rows = table.out.splitlines()[:-1]
    assert "MESSAGES" in header and "LAST SYNC" in header and "LAG" in header
    assert table.out.splitlines()[-1] == "outbox: 0 queued or sending, 0 failed"
    ana_row = next(r for r in rows if r.startswith(ana)).split()
    assert ana_row[1:4] == ["active", "2", status[ana]["last_sync_at"]]

    again = stack_cli("run", "--once")
    assert again.code == 0 and "0 new" in again.out, again
    for token in tokens:
        stack_cli.assert_never_printed(token)


@pytest.mark.mailstack
def test_run_once_exits_1_when_a_refresh_token_is_revoked(stack_cli: Cli, tmp_path: Path, mailstack: MailStack) -> None:
    """One revoked refresh token: the console script exits 1, that account is needs_reauth with an invalid_grant
    reason, the other account syncs; the next run still reports the account as failed."""
    ok_user, revoked_user = mailstack.new_user("ok"), mailstack.new_user("revoked")
    ok_token = add_account(stack_cli, mailstack, tmp_path, ok_user)
    revoked_token = add_account(stack_cli, mailstack, tmp_path, revoked_user)
    deliver(mailstack, ok_user, "still arrives")
    deliver(mailstack, revoked_user, "never synced")
    mailstack.revoke(revoked_token)

    proc = run_script("--config", str(stack_cli.config), "run", "--once")
    stack_cli.record(proc)
    assert proc.returncode == 1, proc
    assert "1 of 2 accounts ok" in proc.stdout
    revoked_line = next(line for line in proc.stdout.splitlines() if line.startswith(revoked_user))
    assert "FAILED" in revoked_line and "needs_reauth" in revoked_line

    status = by_email(stack_cli.json("status"))
    assert status[revoked_user]["state"] == "needs_reauth"
    assert "invalid_grant" in status[revoked_user]["state_reason"]
    assert status[revoked_user]["messages"] == 0
    assert status[ok_user]["state"] == "active"
    assert status[ok_user]["messages"] == 1

    # Still needs a human: a later cycle must not report it as ok.
    again = stack_cli("run", "--once")
    assert again.code == 1, again
    assert "1 of 2 accounts ok" in again.out
    for token in (ok_token, revoked_token):
        stack_cli.assert_never_printed(token)


@pytest.mark.mailstack
def test_run_once_account_option_limits_to_that_account(stack_cli: Cli, tmp_path: Path, mailstack: MailStack) -> None:
    """`--account EMAIL` (any case) syncs only that mailbox; an unknown --account exits 2 and syncs nothing."""
    ana, bo = mailstack.new_user("ana"), mailstack.new_user("bo")
    for email in (ana, bo):
        add_account(stack_cli, mailstack, tmp_path, email)
        deliver(mailstack, email, "hi")

    unknown = stack_cli("run", "--once", "--account", "nobody@example.test")
    assert unknown.code == 2
    assert "nobody@example.test" in unknown.err and "no such account" in unknown.err
    empty = stack_cli("run", "--once", "--account", "")  # was taken for no --account at all: every account synced
    assert empty.code == 2
    assert "no such account" in empty.err

    result = stack_cli("run", "--once", "--account", ana.upper())
    assert result.code == 0, result
    assert ana in result.out and bo not in result.out
    assert "1 of 1 accounts ok" in result.out

    status = by_email(stack_cli.json("status"))
    assert status[ana]["messages"] == 1 and status[ana]["last_sync_at"]
    assert status[bo]["messages"] == 0 and status[bo]["last_sync_at"] is None


@pytest.mark.mailstack
def test_run_once_skips_account_paused_in_config(db_url: str, tmp_path: Path, cli: Cli, mailstack: MailStack) -> None:
    """`[accounts."EMAIL"] paused = true` skips that mailbox (exit 0) and status shows 'paused' with the reason."""
    paused, active = mailstack.new_user("paused"), mailstack.new_user("active")
    extra = f'[accounts."{paused}"]\npaused = true\nreason = "left the company"\n'
    cli.config = write_stack_config(tmp_path, db_url, mailstack, extra=extra)
    assert cli("secrets", "init").code == 0
    for email in (paused, active):
        add_account(cli, mailstack, tmp_path, email)
        deliver(mailstack, email, "hi")

    result = cli("run", "--once")
    assert result.code == 0, result
    paused_line = next(line for line in result.out.splitlines() if line.startswith(paused))
    assert "paused" in paused_line and "left the company" in paused_line

    status = by_email(cli.json("status"))
    assert status[paused]["state"] == "paused"
    assert status[paused]["state_reason"] == "left the company"
    assert status[paused]["paused_in_config"] is True
    assert status[paused]["messages"] == 0 and status[paused]["last_sync_at"] is None
    assert status[active]["state"] == "active" and status[active]["messages"] == 1


@pytest.mark.mailstack
def test_run_once_skips_account_disabled_by_hr_app(
    stack_cli: Cli, tmp_path: Path, db_url: str, mailstack: MailStack
) -> None:
    """mail_accounts.enabled = false (set by the HR app with plain SQL) skips the mailbox: exit 0, state 'disabled'."""
    disabled, active = mailstack.new_user("disabled"), mailstack.new_user("active")
    for email in (disabled, active):
        add_account(stack_cli, mailstack, tmp_path, email)
        deliver(mailstack, email, "hi")
    engine = db.create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE mail_accounts SET enabled = false WHERE email = :e"), {"e": disabled})
    finally:
        engine.dispose()

    result = stack_cli("run", "--once")
    assert result.code == 0, result
    assert "2 of 2 accounts ok" in result.out

    status = by_email(stack_cli.json("status"))
    assert status[disabled]["state"] == "disabled"
    assert status[disabled]["enabled"] is False
    assert status[disabled]["messages"] == 0 and status[disabled]["last_sync_at"] is None
    assert status[active]["messages"] == 1


# --- progress display ---------------------------------------------------------------------------------------


class TtyStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_tty_renders_done_total_and_rate() -> None:
    """On a terminal each update redraws one line with done/total, percent and messages per second (FakeClock),
    throttled to min_interval except for the final update; finish() ends the line."""
    clock, stream = FakeClock(), TtyStream()
    display = ProgressDisplay(clock, stream, min_interval=0.2)
    display.update("ana@example.test", 0, 100)
    clock.advance(2)
    display.update("ana@example.test", 50, 100)
    assert stream.getvalue().endswith("\r\x1b[2Kana@example.test: 50/100 msgs 50% 25/s")

    before = stream.getvalue()
    clock.advance(0.1)
    display.update("ana@example.test", 60, 100)
    assert stream.getvalue() == before, "redraws are throttled"

    clock.advance(0.1)
    display.update("ana@example.test", 100, 100)
    assert stream.getvalue().endswith("ana@example.test: 100/100 msgs 100% 45/s")
    display.finish()
    assert stream.getvalue().endswith("\n")


def test_progress_rate_of_an_import_resumed_counts_this_runs_messages() -> None:
    """An import resumed reports from what its earlier attempts processed (6000 of 10000): the rate is of the
    messages this run processed (100 in 2 s), not 3050/s."""
    clock, stream = FakeClock(), TtyStream()
    display = ProgressDisplay(clock, stream, min_interval=0)
    display.update("ana@example.test", 6000, 10000)
    clock.advance(2)
    display.update("ana@example.test", 6100, 10000)
    assert stream.getvalue().endswith("\r\x1b[2Kana@example.test: 6100/10000 msgs 61% 50/s")


def test_progress_shows_every_account_on_one_line() -> None:
    """Two accounts syncing at once share the line, each with its own done/total."""
    clock, stream = FakeClock(), TtyStream()
    display = ProgressDisplay(clock, stream, min_interval=0)
    display.update("a@example.test", 0, 10)
    display.update("b@example.test", 0, 4)
    clock.advance(1)
    display.update("b@example.test", 4, 4)
    last = stream.getvalue().rsplit("\r\x1b[2K", 1)[-1]
    assert last == "a@example.test: 0/10 msgs 0% 0/s | b@example.test: 4/4 msgs 100% 4/s"


def test_progress_writes_nothing_when_not_a_tty() -> None:
    """Off a terminal (systemd, CI) the display is silent, finish() included."""
    clock, stream = FakeClock(), io.StringIO()
    display = ProgressDisplay(clock, stream)
    display.update("ana@example.test", 1, 100)
    clock.advance(5)
    display.update("ana@example.test", 100, 100)
    display.finish()
    assert stream.getvalue() == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config", "", "status"], "argument --config: expected the path of the config file, got an empty string"),
        (["--config", "x.toml", "connect", "a@example.test", "--timeout", "1e-9"], "expected 1 to 3600 seconds"),
        (["--config", "x.toml", "connect", "a@example.test", "--timeout", "nan"], "expected 1 to 3600 seconds"),
    ],
)
def test_bad_arguments_exit_2_naming_the_argument(args: list[str], message: str) -> None:
    """--config "" read the current directory ("Is a directory"); a timeout of 1e-9 or nan was accepted although
    the message says 1 to 3600."""
    result = run_script(*args)
    assert result.returncode == 2
    assert message in result.stderr


def test_status_shows_how_far_an_unfinished_import_got() -> None:
    """LAST SYNC of an account whose first sync has not finished: "never" before it starts, then its progress."""
    assert _importing({"import_done": None, "import_total": None}) == "never"
    assert _importing({"import_done": 1200, "import_total": 5000}) == "importing 1200/5000"
