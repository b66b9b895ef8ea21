"""Database engine and schema migrations (Alembic), for SQLite and PostgreSQL alike.

`create_engine` is the only place that knows dialect quirks (SQLite pragmas); `upgrade` runs the packaged migrations.
Alembic is imported only to migrate: the daemon checks the schema version with one SELECT against SCHEMA_HEAD (Alembic
and the script directory cost 10 MB of every daemon's memory; tests/test_db.py keeps SCHEMA_HEAD equal to the head).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from inboxd.errors import ConfigError, InboxdError

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

MIGRATIONS = Path(__file__).with_name("migrations")
SCHEMA_HEAD = "0012"  # the newest migration's revision: bump it with every migration added


class DatabaseError(InboxdError):
    """The database cannot be reached or is not at the expected schema version."""


# libpq connection parameters inboxd sets unless database.url names them: a database host that does not answer (a
# failover, a partition) fails a connect within 10 s instead of the kernel's two minutes of SYN retries, and a
# connection that died under a query is noticed by TCP keepalives within about a minute instead of two hours, during
# which the sync using it held its account (and the loop's own queries would wait as long).
PG_CONNECT_DEFAULTS: dict[str, int] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}


def create_engine(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        path = sa.engine.make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # hide_parameters: a database error must not carry message bodies or addresses into the logs
        engine = sa.create_engine(url, connect_args={"timeout": 30}, hide_parameters=True)

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            # WAL: the HR app may read while inboxd writes; foreign keys: cascades work as on PostgreSQL.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    if url.startswith("postgresql"):
        given = sa.engine.make_url(url).query
        connect_args = {k: v for k, v in PG_CONNECT_DEFAULTS.items() if k not in given}
        engine = sa.create_engine(
            url,
            pool_pre_ping=True,
            pool_size=5,
            max_overflow=10,
            hide_parameters=True,
            connect_args=connect_args,
        )

        @sa.event.listens_for(engine, "connect")
        def _postgres_session(dbapi_conn: Any, _record: Any) -> None:
            # psycopg prepares a statement on its 5th run and PostgreSQL then may keep one generic plan for it. A
            # first sync fills empty tables within minutes, before autovacuum's first ANALYZE: the generic plan
            # made when mail_messages was empty (a sequential scan) stayed, and each batch's lookups read the whole
            # table (store time per message grew from 0.4 to 4.8 ms over 50k messages). A custom plan per run
            # sees the table as it is; planning these short queries costs microseconds.
            # Bodies over ~2 kB are compressed as they are stored (TOAST): with lz4 instead of the default pglz,
            # which was a sixth of the server's CPU in a first sync. Readers need nothing: PostgreSQL decompresses
            # either. Needs PostgreSQL 14 built with lz4 (Debian's and the PGDG packages are); else pglz stays.
            for setting in ("plan_cache_mode = force_custom_plan", "default_toast_compression = lz4"):
                with dbapi_conn.cursor() as cur:
                    try:
                        cur.execute(f"SET {setting}")
                    except Exception:  # an older server works as it always did
                        dbapi_conn.rollback()
                    else:
                        dbapi_conn.commit()

        return engine
    raise ConfigError(
        f"unsupported database url scheme {url.split(':', 1)[0]!r}; use sqlite:///PATH or postgresql+psycopg://...",
        key="database.url",
    )


def _alembic_config(connection: sa.Connection) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig  # noqa: PLC0415 (only migrations load Alembic)

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def upgrade(engine: sa.Engine, revision: str = "head") -> None:
    """Bring the schema to `revision` (idempotent)."""
    from alembic import command  # noqa: PLC0415 (only migrations load Alembic)

    with engine.begin() as conn:
        command.upgrade(_alembic_config(conn), revision)


def current_revision(engine: sa.Engine) -> str | None:
    """The revision Alembic recorded (its alembic_version table), None for a database it never migrated."""
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table("alembic_version"):
            return None
        versions = [row[0] for row in conn.execute(sa.text("SELECT version_num FROM alembic_version"))]
    if len(versions) > 1:
        raise DatabaseError(f"database schema has several heads ({', '.join(sorted(versions))}): not inboxd's")
    return versions[0] if versions else None


def head_revision() -> str | None:
    """The newest revision in the packaged migrations, read by Alembic (for migrating and for the test that keeps
    SCHEMA_HEAD right)."""
    from alembic.config import Config as AlembicConfig  # noqa: PLC0415 (only migrations load Alembic)
    from alembic.script import ScriptDirectory  # noqa: PLC0415 (only migrations load Alembic)

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(cfg).get_current_head()


def check_schema(engine: sa.Engine) -> None:
    """Refuse to run against a database that `inboxd db upgrade` has not brought to this version."""
    try:
        current = current_revision(engine)
    except sa.exc.OperationalError as exc:
        raise DatabaseError(f"cannot connect to the database: {exc.orig}") from exc
    head = SCHEMA_HEAD
    if current != head:
        raise DatabaseError(
            f"database schema is at {current or 'nothing'}, this inboxd needs {head}: run `inboxd db upgrade`"
        )
