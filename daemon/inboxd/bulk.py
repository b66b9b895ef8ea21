"""Statements over many rows: IN lists cut to a safe size, and inserting many rows while learning their ids, the
fastest way each database allows.

SQLite: one ``INSERT ... RETURNING`` over all rows (SQLAlchemy's "insertmanyvalues"). PostgreSQL: that statement
grows with the rows (22 columns x 200 messages: 4,400 placeholders) and psycopg re-parses such a long query on every
batch (0.15 ms per message, a quarter of a batch's client time); instead the ids are drawn from the table's sequence
in one query, and the rows go through psycopg's pipelined executemany of one short, prepared INSERT.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa

# Keep IN (...) lists well under SQLite's bound-parameter limit.
_CHUNK = 500


def chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def insert_returning_ids(conn: sa.Connection, table: sa.Table, rows: Sequence[dict[str, Any]]) -> list[int]:
    """Insert ``rows`` (dicts with the same keys, no ``id``) into ``table``; their new ids, in order."""
    if not rows:
        return []
    if conn.dialect.name == "postgresql":
        sequence = sa.func.pg_get_serial_sequence(table.name, "id")
        ids = [
            int(i)
            for i in conn.execute(
                sa.select(sa.func.nextval(sequence)).select_from(sa.func.generate_series(1, len(rows)))
            ).scalars()
        ]
        conn.execute(table.insert(), [{**row, "id": i} for row, i in zip(rows, ids, strict=True)])
        return ids
    result = conn.execute(table.insert().returning(table.c.id, sort_by_parameter_order=True), list(rows))
    return [int(i) for i in result.scalars()]
