"""The `inboxd` command line: secrets, database, accounts, one-shot and looping sync, status.

Exit codes: 0 success, 1 some account failed to sync, 2 bad config, arguments or environment.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import sqlalchemy as sa
import structlog

from inboxd import __version__, db, logs
from inboxd.blobs import BlobStore
from inboxd.clock import SystemClock
from inboxd.config import Config, load_config
from inboxd.connect import ConnectEndpoints, connect_interactive, consent_provider, normalize_email
from inboxd.connect_state import StateCodec
from inboxd.connections import delegated_token_source
from inboxd.crypto import SecretBox, init_key_file
from inboxd.daemon import Daemon
from inboxd.db_clock import DatabaseClock
from inboxd.disconnect import disconnect
from inboxd.errors import ConfigError, InboxdError, SecretsError, UsageError
from inboxd.forget import ForgetReport, forget_contact
from inboxd.http import HrEndpoints, database_health, start_ops_server
from inboxd.kept_sessions import KeptSessions
from inboxd.leases import Leases, renewed
from inboxd.metrics import Metrics
from inboxd.outbox import Outbox
from inboxd.outbox_policy import RetryPolicy
from inboxd.outbox_store import OutboxStore
from inboxd.parsing import ParserPool
from inboxd.progress import ProgressDisplay
from inboxd.rekey import prune_command, rotate_command
from inboxd.runner import AccountResult, Runner
from inboxd.sdnotify import Notifier
from inboxd.store import DELEGATED, Account, Credential, Store

log = structlog.get_logger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inboxd", description="Mailbox sync daemon for HR and recruiting apps.")
    parser.add_argument("--config", type=_config_path, help="config file (default: $INBOXD_CONFIG)")
    parser.add_argument("--version", action="version", version=f"inboxd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    secrets = sub.add_parser("secrets", help="manage the key that encrypts stored credentials")
    secrets_sub = secrets.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = secrets_sub.add_parser("init", help="create the key file (random key, mode 0600)")
    init.add_argument("--force", action="store_true", help="overwrite an existing key (stored credentials are lost)")
    secrets_sub.add_parser(
        "rotate", help="add a new key on top of the key file and re-encrypt every stored credential with it"
    )
    secrets_sub.add_parser("prune", help="remove the old keys once every credential uses the newest one")

    database = sub.add_parser("db", help="database schema")
    db_sub = database.add_subparsers(dest="action", required=True, metavar="ACTION")
    db_sub.add_parser("upgrade", help="create or migrate the schema to this version (idempotent)")

    accounts = sub.add_parser("accounts", help="connected mailboxes")
    acc_sub = accounts.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = acc_sub.add_parser("add", help="connect a mailbox (or replace its credentials)")
    add.add_argument("email")
    add.add_argument("--provider", required=True, help="a [providers.NAME] of the config")
    cred = add.add_mutually_exclusive_group(required=True)
    cred.add_argument("--refresh-token-file", type=Path, help="file holding an OAuth2 refresh token")
    cred.add_argument("--password-file", type=Path, help="file holding the IMAP password (generic IMAP only)")
    cred.add_argument(
        "--delegated",
        action="store_true",
        help="no consent: the provider's Workspace service account or Microsoft 365 app-only grant",
    )
    add.add_argument("--hr-user-ref", help="the HR app's id for this recruiter")
    add.add_argument("--no-verify", action="store_true", help="--delegated: store without fetching a token first")
    lst = acc_sub.add_parser("list", help="list connected mailboxes")
    lst.add_argument("--json", action="store_true")

    connect = sub.add_parser("connect", help="connect a mailbox with the owner's consent (OAuth, loopback redirect)")
    connect.add_argument("email")
    connect.add_argument("--provider", help="a [providers.NAME] of the config (default: the only OAuth one)")
    connect.add_argument("--hr-user-ref", help="the HR app's id for this recruiter")
    connect.add_argument("--timeout", type=_seconds, default=300.0, help="seconds to wait for consent (300)")
    connect.add_argument("--port", type=int, default=0, help="loopback port for the redirect (default: any free)")

    disconnect = sub.add_parser(
        "disconnect", help="revoke and delete a mailbox's credentials and stop syncing it (mail is kept)"
    )
    disconnect.add_argument("email")
    disconnect.add_argument(
        "--purge", action="store_true", help="also delete the account and all its mail, threads and attachments"
    )
    disconnect.add_argument("--yes", action="store_true", help="--purge: do not ask for confirmation")

    run = sub.add_parser("run", help="sync mailboxes")
    run.add_argument("--once", action="store_true", help="one cycle of every active account, then exit")
    run.add_argument("--account", help="only this mailbox")

    status = sub.add_parser("status", help="account states and last sync")
    status.add_argument("--json", action="store_true")

    contacts = sub.add_parser("contacts", help="the HR app's contacts (mail_contacts)")
    contacts_sub = contacts.add_subparsers(dest="action", required=True, metavar="ACTION")
    forget = contacts_sub.add_parser(
        "forget", help="erase a contact and their mail (GDPR): messages, participants, attachments and their files"
    )
    forget.add_argument("email")
    forget.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    _add_attachments_parser(sub)
    return parser


def _add_attachments_parser(sub: Any) -> None:
    attachments = sub.add_parser("attachments", help="the attachment store (sync.attachments_dir)")
    attachments_sub = attachments.add_subparsers(dest="action", required=True, metavar="ACTION")
    gc_cmd = attachments_sub.add_parser(
        "gc", help="delete the files no message or outbox row names (inboxd run does it once a day)"
    )
    gc_cmd.add_argument("--dry-run", action="store_true", help="count what would go, delete nothing")
    gc_cmd.add_argument("--json", action="store_true")


def _config_path(value: str) -> Path:
    if not value.strip():
        raise argparse.ArgumentTypeError("expected the path of the config file, got an empty string")
    return Path(value)


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {value!r}") from None
    if not 1 <= seconds <= 3600:  # also NaN
        raise argparse.ArgumentTypeError(f"expected 1 to 3600 seconds, got {value!r}")
    return seconds


def _restrict_umask() -> None:
    """Nothing inboxd creates (the database, the key file, attachment files and directories) is readable by others:
    the inherited umask gains 007. The group's bits stay as the service set them: 027 by default (systemd
    ``UMask=0027``, or a shell's 022), 007 where ops give the HR app's group write access to the attachment store
    (docs/ops.md). Setting 027 outright, as before, undid that: new directories were 0750 whatever UMask said."""
    inherited = os.umask(0o077)
    os.umask(inherited | 0o007)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _restrict_umask()
    try:
        config = load_config(args.config, env=os.environ)
    except ConfigError as exc:
        print(f"inboxd: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure(config.log_level)
    try:
        return _dispatch(args, config)
    except (ConfigError, UsageError, SecretsError, db.DatabaseError) as exc:
        print(f"inboxd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except InboxdError as exc:
        print(f"inboxd: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace, config: Config) -> int:
    if args.command == "secrets" and args.action == "init":
        init_key_file(config.secrets.key_file, overwrite=args.force)
        print(f"created {config.secrets.key_file} (mode 0600); keep a backup: without it stored credentials are lost")
        return EXIT_OK
    engine = db.create_engine(config.database.url)
    try:
        return _dispatch_db(args, config, engine)
    finally:
        engine.dispose()  # close pooled connections now, not whenever the GC gets to them


def _dispatch_db(args: argparse.Namespace, config: Config, engine: sa.Engine) -> int:
    if args.command == "db":
        db.upgrade(engine)
        print(f"database at schema {db.current_revision(engine)}")
        return EXIT_OK
    db.check_schema(engine)
    if args.command == "secrets":
        print(rotate_command(config, engine) if args.action == "rotate" else prune_command(config, engine))
        return EXIT_OK
    clock = SystemClock()
    needs_key = args.command in ("run", "connect", "disconnect") or (
        args.command == "accounts" and args.action == "add"
    )
    box = _secret_box(args, config) if needs_key else None
    store = Store(engine, clock=clock, secret_box=box, blobs=BlobStore(config.sync.attachments_dir))
    if args.command == "accounts":
        return _accounts_add(args, config, store) if args.action == "add" else _accounts_list(args, store)
    handlers = {
        "status": _status,
        "run": _run,
        "contacts": _contacts_forget,
        "attachments": _attachments_gc,
        "connect": _connect,
        "disconnect": _disconnect,
    }
    if args.command not in handlers:
        raise UsageError(f"unknown command {args.command}")
    return handlers[args.command](args, config, store)


def _secret_box(args: argparse.Namespace, config: Config) -> SecretBox | None:
    """The key, for the commands that read or write credentials. `disconnect` goes on without a key file that is
    gone: the refresh token cannot be read to revoke it (the report says so), but it is deleted, and a purge must
    not depend on a key that was lost. A key file that is there but unusable still stops it: fixed, it revokes."""
    key_file = config.secrets.key_file
    if args.command == "disconnect" and not key_file.exists():
        return None
    return SecretBox.from_key_file(key_file)


def _read_secret_file(path: Path, what: str) -> str:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UsageError(f"cannot read {what} file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError:
        raise UsageError(f"{what} file {path} is not UTF-8 text") from None
    if not value:
        raise UsageError(f"{what} file {path} is empty")
    if any(c in value for c in "\r\n"):
        raise UsageError(f"{what} file {path} must hold exactly one line")
    return value


def _accounts_add(args: argparse.Namespace, config: Config, store: Store) -> int:
    email = normalize_email(args.email)
    provider = config.providers.get(args.provider)
    if provider is None:
        known = ", ".join(sorted(config.providers)) or "none"
        raise UsageError(f"--provider {args.provider!r} is not in the config (providers: {known})")
    if args.delegated:
        if provider.delegation is None:
            raise UsageError(
                f"provider {args.provider!r} cannot connect mailboxes without consent: give it service_account_file "
                "(Google Workspace domain-wide delegation) or app_only = true (Microsoft 365)"
            )
        if not args.no_verify:
            # fail now, with the provider's reason, rather than at the first sync
            delegated_token_source(email, provider, clock=SystemClock()).access_token()
        credential = Credential(DELEGATED)
    elif args.refresh_token_file is not None:
        if provider.auth != "oauth2":
            raise UsageError(f"provider {args.provider!r} uses auth = {provider.auth!r}; pass --password-file")
        credential = Credential("oauth2_refresh", _read_secret_file(args.refresh_token_file, "refresh token"))
    else:
        if provider.auth != "password":
            raise UsageError(f"provider {args.provider!r} uses auth = {provider.auth!r}; pass --refresh-token-file")
        credential = Credential("password", _read_secret_file(args.password_file, "password"))
    account = store.add_account(email, args.provider, credential, hr_user_ref=args.hr_user_ref)
    print(f"account {account.email} (id {account.id}) connected via {args.provider}")
    return EXIT_OK


def _connect(args: argparse.Namespace, config: Config, store: Store) -> int:
    email = normalize_email(args.email)
    provider = consent_provider(config, args.provider)
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: expected 0 (any free port) to 65535")
    try:
        account = connect_interactive(
            config,
            store,
            email,
            provider,
            out=sys.stdout,
            timeout=args.timeout,
            port=args.port,
            hr_user_ref=args.hr_user_ref,
        )
    except OSError as exc:
        raise UsageError(f"cannot listen on 127.0.0.1:{args.port} for the redirect: {exc.strerror}") from None
    print(f"account {account.email} (id {account.id}) connected via {provider.name}")
    return EXIT_OK


def _disconnect(args: argparse.Namespace, config: Config, store: Store) -> int:
    email = normalize_email(args.email)
    if store.account(email) is None:
        raise UsageError(f"no account {email} (see `inboxd accounts list`)")
    if args.purge and not args.yes:
        if not sys.stdin.isatty():
            raise UsageError("--purge deletes the account's mail for good: pass --yes (stdin is not a terminal)")
        if input(f"delete {email} and all its mail? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing changed")
            return EXIT_OK
    report = disconnect(config, store, BlobStore(config.sync.attachments_dir), email, purge=args.purge)
    print(f"{report.email}: credentials deleted, syncing stopped; provider revocation: {report.revocation}")
    if report.outbox_failed:
        print(f"{report.outbox_failed} queued outbox message(s) failed: the account can no longer send")
    if report.purged:
        print("purged: " + ", ".join(f"{n} {what}" for what, n in report.purged.items()))
    else:
        print("its synced mail is kept; `inboxd disconnect --purge` deletes it")
    return EXIT_OK


def _account_dict(a: Account, config: Config | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": a.id,
        "email": a.email,
        "provider": a.provider,
        "enabled": a.enabled,
        "state": a.state,
        "state_reason": a.state_reason,
        "last_sync_at": _iso(a.last_sync_at),
        "last_error": a.last_error,
        "hr_user_ref": a.hr_user_ref,
    }
    if config is not None:
        policy = config.policy_for(a.email)
        out["paused_in_config"] = policy.paused
    return out


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _accounts_list(args: argparse.Namespace, store: Store) -> int:
    accounts = store.accounts()
    if args.json:
        print(json.dumps([_account_dict(a) for a in accounts], indent=2))
        return EXIT_OK
    _table(
        ["EMAIL", "PROVIDER", "ENABLED", "STATE"],
        [[a.email, a.provider, "yes" if a.enabled else "no", a.state] for a in accounts],
    )
    return EXIT_OK


def _status(args: argparse.Namespace, config: Config, store: Store) -> int:
    """Accounts with state, messages, last success and lag, who syncs them, and the outbox: what /metrics shows."""
    now = SystemClock().now()
    accounts = store.accounts()
    rows = [_account_dict(a, config) for a in accounts]
    counts = store.message_counts()
    leases = store.lease_holders()
    outbox = OutboxStore(store.engine, clock=SystemClock(), policy=RetryPolicy())
    for row, account in zip(rows, accounts, strict=True):
        row["messages"] = counts.get(row["id"], 0)
        row["lag_seconds"] = round((now - account.last_sync_at).total_seconds()) if account.last_sync_at else None
        row["retry_at"] = _iso(account.retry_at)
        row["node"] = leases.get(row["id"])
        row["import_done"], row["import_total"] = account.import_done, account.import_total
    summary = {"outbox_depth": outbox.depth(), "outbox_failed": outbox.count("failed")}
    if args.json:
        print(json.dumps({"version": __version__, "accounts": rows, **summary}, indent=2))
        return EXIT_OK
    _table(
        ["EMAIL", "STATE", "MESSAGES", "LAST SYNC", "LAG", "NODE", "REASON"],
        [
            [
                r["email"],
                r["state"],
                str(r["messages"]),
                r["last_sync_at"] or _importing(r),
                f"{r['lag_seconds']}s" if r["lag_seconds"] is not None else "-",
                r["node"] or "-",
                r["state_reason"] or r["last_error"] or "",
            ]
            for r in rows
        ],
    )
    print(f"outbox: {summary['outbox_depth']} queued or sending, {summary['outbox_failed']} failed")
    return EXIT_OK


def _importing(row: dict[str, Any]) -> str:
    """LAST SYNC of an account whose first sync has not finished: how far its import got, if it started."""
    if row["import_total"] is None:
        return "never"
    return f"importing {row['import_done']}/{row['import_total']}"


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    for line in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


def _contacts_forget(args: argparse.Namespace, config: Config, store: Store) -> int:
    """Erase one contact's mail; with scope "all" that would not last (the sync stores every message again)."""
    if config.sync.scope == "all":
        raise UsageError(
            'sync.scope is "all": inboxd stores every message whatever mail_contacts holds, so forgotten mail would '
            'come back; forgetting needs sync.scope = "contacts"'
        )
    if "@" not in args.email:
        raise UsageError(f"{args.email!r} is not an email address")
    blobs = BlobStore(config.sync.attachments_dir)
    preview = forget_contact(store.engine, blobs, args.email, dry_run=True)
    if not preview.found:
        raise UsageError(f"no contact and no stored mail for {args.email.strip().lower()}: nothing to forget")
    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError("contacts forget deletes mail for good: pass --yes (stdin is not a terminal)")
        _print_forget(preview)
        if input("delete all of this? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return EXIT_OK
    _print_forget(forget_contact(store.engine, blobs, args.email))
    return EXIT_OK


def _attachments_gc(args: argparse.Namespace, config: Config, store: Store) -> int:
    report = store.collect_attachment_garbage(dry_run=args.dry_run)
    if report is None:
        raise UsageError(f"the attachment store {config.sync.attachments_dir} could not be read: see the log above")
    if args.json:
        print(json.dumps(report.as_dict()))
        return EXIT_OK
    verb = "would delete" if report.dry_run else "deleted"
    print(
        f"{report.files_checked} files in {config.sync.attachments_dir}: {verb} {report.files_deleted} "
        f"({report.bytes_freed / 1e6:.1f} MB) that no message or outbox row names"
    )
    if report.files_recent:
        print(f"{report.files_recent} unnamed file(s) written within the last hour kept: a sync may be storing them")
    if report.temporary_deleted:
        print(f"{verb} {report.temporary_deleted} temporary file(s) of writes that never finished")
    if report.files_failed:
        print(f"{report.files_failed} file(s) could not be deleted: see the log (store.attachment_gc_file_failed)")
    return EXIT_OK


def _print_forget(report: ForgetReport) -> None:
    verb = "would delete" if report.dry_run else "deleted"
    print(f"{verb} for {report.address_key} (Gmail dot/+tag variants included):")
    _table(["WHAT", "COUNT"], [[name, str(count)] for name, count in report.counts().items()])
    if report.shared_kept:
        print(f"{report.shared_kept} message(s) kept: another contact is on them too")
    print("mail_quarantine (unparseable messages) is not linked to contacts and was not searched")


def _run(args: argparse.Namespace, config: Config, store: Store) -> int:
    clock = SystemClock()
    metrics = Metrics()
    stop = threading.Event()  # SIGTERM/SIGINT in `run`: finish the batch or send in flight, then exit
    # bodies are parsed in worker processes, on the other cores (the sync threads share one: the GIL), within a time
    # limit; they stage the attachments they decode in the store's blob directory themselves (the store adopts them)
    workers = config.sync.parse_workers
    parser = None
    if workers:
        limit = config.sync.parse_time_limit.total_seconds()
        parser = ParserPool(workers, blob_dir=config.sync.attachments_dir, time_limit=limit)
        parser.prestart()
    store.sweep_staged_attachments()  # left by runs that a stop or a crash kept from being stored
    # what start-up built (imported modules, the schema, config) lives as long as the process: out of the cyclic
    # collector's walks during the first cycle too (the daemon's settle_heap does the same after each cycle)
    gc.freeze()
    try:
        return _run_with(args, config, store, clock=clock, metrics=metrics, stop=stop, parser=parser)
    finally:
        if parser is not None:
            parser.close()
        gc.unfreeze()  # for a caller that goes on (the tests run main() in their own process)


def _run_with(
    args: argparse.Namespace,
    config: Config,
    store: Store,
    *,
    clock: SystemClock,
    metrics: Metrics,
    stop: threading.Event,
    parser: ParserPool | None,
) -> int:
    # the daemon keeps each sync's IMAP session open a while for the account's next sync; a one-off run logs out
    kept = None if args.once else KeptSessions(clock=clock, keep=config.sync.keep_session)
    if kept is not None:
        metrics.watch_kept_sessions(kept.__len__)
    runner = Runner(
        config,
        store,
        clock=clock,
        metrics=metrics,
        stop=stop,
        parser=parser,
        kept=kept,
        max_workers=config.sync.parallel_syncs,  # run --once; the daemon's lanes read the config at each start
    )
    # claims, retry and hold times on the database's clock, as every node and the HR app see it
    db_clock = DatabaseClock(store.engine, clock)
    outbox_store = OutboxStore(store.engine, clock=db_clock, policy=RetryPolicy())
    metrics.watch(store.accounts, outbox_store.depth, clock=clock)
    outbox = Outbox(
        config,
        store,
        outbox_store,
        runner.connections,
        BlobStore(config.sync.attachments_dir),
        clock=db_clock,
        metrics=metrics,
    )
    if args.account is not None and store.account(args.account) is None:
        raise UsageError(f"--account {args.account}: no such account (see `inboxd accounts list`)")
    if args.once:
        # leases as a node would take them, so that a one-off run never syncs an account a daemon is syncing
        # (expiries on the database's clock, renewed while the syncs run: a first sync outlasts many leases)
        # not a member: it takes no share and counts as no live node (the daemons keep theirs)
        leases = Leases(store.engine, clock=db_clock, lease=config.sync.lease, member=False)
        ids = {a.id for a in store.accounts() if args.account is None or a.email == args.account.strip().lower()}
        owned = leases.take(ids)
        display = ProgressDisplay(clock)
        try:
            with renewed(leases, owned, on_lost=runner.interrupt):
                results = runner.sync_once(only=args.account, progress=display.update, account_ids=owned)
        finally:
            leases.release(owned)
        display.finish()
        held = store.lease_holders()
        for account in store.accounts():
            if account.id in ids - owned:
                results.append(
                    AccountResult(
                        account.email,
                        ok=True,
                        state=account.state,
                        skipped=True,
                        reason=f"synced by node {held.get(account.id, 'another node')}",
                    )
                )
        _print_summary(results)
        sent = outbox.drain()
        if sent:
            counts = {s: sum(r.status == s for r in sent) for s in ("sent", "queued", "held", "failed")}
            print("outbox: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
        return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED
    return _loop(runner, outbox, config, store, args.account, stop=stop)


def _loop(
    runner: Runner, outbox: Outbox, config: Config, store: Store, only: str | None, *, stop: threading.Event
) -> int:
    """`inboxd run` until SIGTERM/SIGINT: see daemon.py."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    # SIGHUP (the unit's ExecReload=) reloads the config; the handler only sets a flag: logging or socket I/O
    # inside a signal handler can deadlock on structlog's lock.
    reload_requested = threading.Event()
    signal.signal(signal.SIGHUP, lambda *_: reload_requested.set())
    clock = SystemClock()
    daemon = Daemon(
        config,
        store,
        runner,
        outbox,
        clock=clock,
        notifier=Notifier.from_env(),
        stop=stop,
        reload_requested=reload_requested,
        only=only,
        outbox_depth=OutboxStore(store.engine, clock=clock, policy=RetryPolicy()).depth,
    )
    log.info("daemon.started", interval_s=config.sync.interval.total_seconds())
    health = database_health(store.engine, threads={"outbox sender": daemon.sender})
    ops = start_ops_server(config.http.listen, metrics=runner.metrics, health=health, hr=_hr_endpoints(daemon, store))
    try:
        daemon.run()
    finally:
        if ops is not None:
            ops.close()
    log.info("daemon.stopped")
    return EXIT_OK


def _hr_endpoints(daemon: Daemon, store: Store) -> HrEndpoints:
    """The HR app's connect/disconnect endpoints, on the daemon's config (reloads included)."""
    clock = SystemClock()
    # derived at each seal and open: after `secrets rotate` and `prune` every node uses the key file's keys
    box = store.secret_box
    codec = StateCodec(lambda: box.derived("inboxd connect state"), clock=clock)
    blobs = BlobStore(daemon.config.sync.attachments_dir)
    return HrEndpoints(
        connect=ConnectEndpoints(lambda: daemon.config, store, codec, clock=clock),
        disconnect=lambda email, purge: disconnect(daemon.config, store, blobs, email, purge=purge),
        api_token=lambda: daemon.config.http.api_token,
    )


def _print_summary(results: list[AccountResult]) -> None:
    if not results:
        print("no accounts to sync")
        return
    rows = []
    for r in results:
        s = r.stats
        detail = r.reason or ""
        if not r.skipped and r.ok:
            detail = (
                f"{s.new_messages} new, {s.remapped} re-mapped, {s.flag_changes} flag changes, "
                f"{s.expunged} expunged, {s.quarantined} quarantined"
            )
        rows.append([r.email, "ok" if r.ok else "FAILED", r.state, detail])
    _table(["ACCOUNT", "RESULT", "STATE", "DETAIL"], rows)
    failed = sum(not r.ok for r in results)
    print(f"{len(results) - failed} of {len(results)} accounts ok")


def entry() -> NoReturn:
    """The ``inboxd`` console script: main(), then an exit without the interpreter's teardown of its modules.

    Freeing the imported module graph (SQLAlchemy, SQLModel, pydantic, google-auth and inboxd) took 0.13 s at the
    end of every command, a fifth of a short one's time. By the time main() returns it has closed what it opened:
    the database engine is disposed, the parser workers are stopped, IMAP and SMTP sessions are closed, and
    every batch was committed with its cursor. What remains of an ordinary exit is done here: the standard streams
    and the logging handlers are flushed (atexit runs nothing else in inboxd or its libraries). Idle threads go with
    the process; a thread still busy is cut off as by kill -9, which a sync survives (its batch is rolled back)."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (inboxd ... | head): Python's own exit gives 120 then
            code = code or 120
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    entry()
