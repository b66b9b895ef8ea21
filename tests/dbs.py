"""Database fixtures (a pytest plugin): every test that takes `engine` runs on SQLite and on PostgreSQL.

PostgreSQL isolation: one schema per test (search_path), migrated with the real Alembic migrations, dropped after.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

from inboxd import db
from inboxd.blobs import BlobStore
from inboxd.clock import FakeClock, SystemClock
from inboxd.crypto import SecretBox, init_key_file
from inboxd.store import Store

PG_URL = os.environ.get("INBOXD_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@contextmanager
def _postgres_schema() -> Iterator[str]:
    """A URL on a new, empty PostgreSQL schema, dropped afterwards."""
    schema = "t_" + uuid.uuid4().hex[:12]
    admin = sa.create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A reachable database with no inboxd schema at all."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    with _postgres_schema() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database; its URL."""
    sqlite = f"sqlite:///{tmp_path / 'inboxd.db'}"
    with contextlib.nullcontext(sqlite) if request.param == "sqlite" else _postgres_schema() as url:
        engine = db.create_engine(url)
        db.upgrade(engine)
        engine.dispose()
        yield url


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    eng = db.create_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def pg_engine() -> Iterator[sa.Engine]:
    """A migrated, empty PostgreSQL database only, for what SQLite does not have (LISTEN/NOTIFY)."""
    with _postgres_schema() as url:
        eng = db.create_engine(url)
        db.upgrade(eng)
        yield eng
        eng.dispose()


@pytest.fixture
def secret_box(tmp_path: Path) -> SecretBox:
    key = tmp_path / "secret.key"
    init_key_file(key)
    return SecretBox.from_key_file(key)


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(engine: sa.Engine, secret_box: SecretBox, tmp_path: Path) -> Store:
    """A Store on the real database, with the system clock (integration tests run against real servers)."""
    return Store(engine, clock=SystemClock(), secret_box=secret_box, blobs=BlobStore(tmp_path / "attachments"))
