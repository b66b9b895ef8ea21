"""Statements over many rows: IN lists cut to a safe size, and inserting many rows (learning their ids), the
fastest way each database allows.

Both databases get the rows' values converted by each column type's own bind processor (JSON, UTC timestamps),
exactly as a SQLAlchemy INSERT would have them, and sent by the driver directly: SQLAlchemy's per-row parameter
handling cost more than the database's own work (SQLite: 85 us a message row through an ``INSERT ... RETURNING``
executemany, 40 us this way, both including SQLite's).
SQLite: one ``executemany`` of a plain INSERT on the connection's cursor; the ids are consecutive up to
``last_insert_rowid()`` (the write lock is held from the first row to the commit, and a new rowid is the largest
plus one).
PostgreSQL: the ids are drawn from the table's sequence in one query, and the rows go in by ``COPY ... FROM STDIN``.
A multi-row INSERT grows with the rows (22 columns x 200 messages: 4,400 placeholders, re-parsed by psycopg on every
batch); an executemany of one prepared INSERT is planned again for every row (the sessions run with
plan_cache_mode = force_custom_plan, see db.py). COPY has neither.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import sqlalchemy as sa

_NOTHING = object()

# Keep IN (...) lists well under SQLite's bound-parameter limit.
_CHUNK = 500


def chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def among(
    conn: sa.Connection, column: sa.ColumnElement[Any], values: Sequence[Any]
) -> Iterator[sa.ColumnElement[bool]]:
    """``column IN values`` as the WHERE conditions of the statements to run, one per statement (none when
    ``values`` is empty). PostgreSQL: one ``column = ANY(array)``, a single parameter whatever the count, so the
    statement text stays the same (SQLAlchemy renders no per-value placeholder, psycopg splits no long query and
    prepares it once; a batch's identity lookup took 2-6 ms of server parse and bind as a 200-value IN list).
    Elsewhere IN lists of at most _CHUNK values (SQLite's bound-parameter limit). An expression needs its type
    (``sa.func.lower(c, type_=sa.String())``): the array parameter is typed by it."""
    if not values:
        return
    if conn.dialect.name == "postgresql":
        yield column == sa.any_(sa.bindparam(None, list(values), type_=sa.ARRAY(column.type)))
        return
    for chunk in chunks(values):
        yield column.in_(chunk)


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
        _copy(conn, table, [{**row, "id": i} for row, i in zip(rows, ids, strict=True)])
        return ids
    if conn.dialect.name == "sqlite":
        _executemany(conn, table, rows)
        last = int(conn.exec_driver_sql("SELECT last_insert_rowid()").scalar_one())
        return list(range(last - len(rows) + 1, last + 1))
    result = conn.execute(table.insert().returning(table.c.id, sort_by_parameter_order=True), list(rows))
    return [int(i) for i in result.scalars()]


def insert_rows(conn: sa.Connection, table: sa.Table, rows: Sequence[dict[str, Any]]) -> None:
    """Insert ``rows`` (dicts with the same keys) into ``table``: COPY on PostgreSQL, an executemany on SQLite."""
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        _copy(conn, table, rows)
    elif conn.dialect.name == "sqlite":
        _executemany(conn, table, rows)
    else:
        conn.execute(table.insert(), list(rows))


def _copy(conn: sa.Connection, table: sa.Table, rows: Sequence[dict[str, Any]]) -> None:
    """``COPY table (columns) FROM STDIN`` in the connection's transaction."""
    names, values = _converted(conn, table, rows)
    quoted = ", ".join(conn.dialect.identifier_preparer.quote(n) for n in names)
    target = conn.dialect.identifier_preparer.format_table(table)
    raw = conn.connection.driver_connection
    with raw.cursor() as cursor, cursor.copy(f"COPY {target} ({quoted}) FROM STDIN") as copy:  # type: ignore[union-attr]
        for row in values:
            copy.write_row(row)


def _executemany(conn: sa.Connection, table: sa.Table, rows: Sequence[dict[str, Any]]) -> None:
    """One ``INSERT INTO table (columns) VALUES (?, ...)`` for all rows on the driver's cursor, in the connection's
    transaction."""
    names, values = _converted(conn, table, rows)
    quoted = ", ".join(conn.dialect.identifier_preparer.quote(n) for n in names)
    target = conn.dialect.identifier_preparer.format_table(table)
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        sql = f"INSERT INTO {target} ({quoted}) VALUES ({', '.join('?' * len(names))})"  # noqa: S608 (quoted names from the table)
        cursor.executemany(sql, values)
    finally:
        cursor.close()


def _converted(
    conn: sa.Connection, table: sa.Table, rows: Sequence[dict[str, Any]]
) -> tuple[list[str], Iterator[list[Any]]]:
    """The rows' column names, and their values as the driver takes them: each converted by its column type's
    bind processor, as SQLAlchemy would. Columns left out get their server default, as with an INSERT; a column
    with a client-side default must be given (only SQLAlchemy's own INSERT would apply it)."""
    names = list(rows[0])
    for column in table.columns:
        if column.name not in rows[0] and column.default is not None and not column.primary_key:
            raise ValueError(f"{table.name}.{column.name} has a client-side default: give it in the rows")
    dialect = conn.dialect
    processors = [(i, p) for i, n in enumerate(names) if (p := _processor(table.c[n].type, dialect))]

    def values() -> Iterator[list[Any]]:
        # a value that is the same object as the row before's in that column (created_at and updated_at: one
        # timestamp for the whole batch) is not converted again; the rows are not changed while they are inserted
        last: list[tuple[Any, Any]] = [(_NOTHING, None)] * len(processors)
        for row in rows:
            converted = [row[n] for n in names]
            for k, (i, process) in enumerate(processors):
                value = converted[i]
                seen, out = last[k]
                if value is not seen:
                    out = process(value)
                    last[k] = (value, out)
                converted[i] = out
            yield converted

    return names, values()


def _processor(column_type: sa.types.TypeEngine[Any], dialect: sa.Dialect) -> Any:
    """The column type's bind processor, or the one-step equivalent it offers for bulk use (bulk_bind_processor,
    see models.UTCDateTime)."""
    bulk = getattr(column_type, "bulk_bind_processor", None)
    if bulk is not None:
        return bulk(dialect)
    return column_type.dialect_impl(dialect).bind_processor(dialect)
