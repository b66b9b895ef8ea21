"""Planner statistics of young tables on PostgreSQL: ANALYZE a lookup table once it has outgrown its statistics.

The sync looks rows up by key in batches (identities, Message-IDs, In-Reply-To, thread keys, UIDs: ``= ANY`` of a
few hundred values). On a table that has never been analyzed, or has grown far past what its statistics say, the
planner misjudges those lookups: in a first sync on a new database it scanned all of the account's 20,000 messages
through an index on account_id for every batch (11.6 ms a lookup), where the unique index answers in 0.7 ms.
Autovacuum fixes that eventually, but only at its next round (``autovacuum_naptime``, a minute by default) and after
10% growth; a first sync fills these tables from nothing in that minute. So after writing a batch the store asks
``pg_stat_user_tables`` and analyzes a table that has at least doubled since its statistics were made (at 1k, 2k,
4k, ... rows: a 100k-message first sync analyzes each table about seven times, tens of ms each).

SQLite needs none of this: its planner prefers an index for equality lookups without statistics.
"""

from __future__ import annotations

import threading
import time

import sqlalchemy as sa
import structlog

log = structlog.get_logger(__name__)

# the tables the sync path looks up by key while it fills them
LOOKUP_TABLES = ("mail_messages", "mail_threads", "inboxd_locations")
# fewer changed rows than this: the planner's picture cannot be far off, whatever the ratio
MIN_CHANGES = 1000


def analyze_due(live_rows: int, changed_rows: int, analyzed_at_rows: int | None) -> bool:
    """Whether to ANALYZE a table now: at least MIN_CHANGES rows changed since its statistics were made, and they
    are more than half of its rows (it has at least doubled since); and this process has not analyzed it since it
    last doubled (``analyzed_at_rows``: the live rows when it did), so an ANALYZE that did nothing (a role that
    does not own the table gets a warning, not an error) is not repeated after every batch."""
    if changed_rows < MIN_CHANGES or 2 * changed_rows <= live_rows:
        return False
    return analyzed_at_rows is None or live_rows >= 2 * analyzed_at_rows


class TableStats:
    """Keeps LOOKUP_TABLES' statistics in step with their growth (see the module docstring); a no-op on SQLite."""

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine
        self._enabled = engine.dialect.name == "postgresql"
        self._analyzed_at: dict[str, int] = {}
        self._busy = threading.Lock()  # one thread analyzes; the others go on storing

    def after_write(self) -> list[str]:
        """Analyze the lookup tables that are due; returns their names. Never raises: statistics are an
        optimization, and a failure here must not fail the batch that was just committed."""
        if not self._enabled or not self._busy.acquire(blocking=False):
            return []
        try:
            return self._analyze_due()
        except sa.exc.SQLAlchemyError as exc:
            log.warning("db.analyze_failed", error=type(exc).__name__)
            return []
        finally:
            self._busy.release()

    def _analyze_due(self) -> list[str]:
        with self._engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT relname, n_live_tup, n_mod_since_analyze FROM pg_stat_user_tables"
                    " WHERE relid = ANY(CAST(:tables AS regclass[]))"
                ),
                {"tables": list(LOOKUP_TABLES)},
            ).all()
            done: list[str] = []
            for name, live, changed in rows:
                if not analyze_due(int(live), int(changed), self._analyzed_at.get(name)):
                    continue
                started = time.monotonic()
                conn.execute(sa.text(f'ANALYZE "{name}"'))  # a name from LOOKUP_TABLES, not input
                conn.commit()
                self._analyzed_at[name] = int(live)
                done.append(name)
                log.info("db.analyzed", table=name, rows=int(live), ms=round((time.monotonic() - started) * 1000, 1))
            return done
