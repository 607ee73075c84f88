"""Write many rows' different new values in one statement.

The generic path is an executemany of ``UPDATE jobs SET … WHERE id = ?``. On PostgreSQL a
single ``UPDATE … FROM json_to_recordset(<the rows as one JSON array>)`` does the same
work in one round trip and one plan, several times faster for the batches the worker
protocol settles. New rows go the same way (``insert_each``): ``INSERT … SELECT … FROM
json_to_recordset(…)``. One JSON parameter, not one array per column: orjson writes it in
one call, where psycopg dumped each array value with a Python call of its own."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.models import JOBS_TABLE, UTCDateTime

jobs_c = JOBS_TABLE.c


def update_each(
    session: Session, columns: Sequence[str], changes: Sequence[Mapping[str, Any]]
) -> None:
    """UPDATE jobs SET <columns> = change[column] WHERE id = change["id"], for each change."""
    if not changes:
        return
    if session.get_bind().dialect.name == "postgresql":
        _update_recordset(session, columns, changes)
    else:
        _update_executemany(session, columns, changes)


def insert_each(session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
    """INSERT INTO jobs each of ``rows`` (all with the same keys). On PostgreSQL, several
    rows are one statement over one array per column: one plan and one execution, not one
    per row as in an executemany, and less Python per row than SQLAlchemy's binding."""
    if not rows:
        return
    if len(rows) > 1 and session.get_bind().dialect.name == "postgresql":
        _insert_recordset(session, list(rows[0]), rows)
    else:
        session.connection().execute(sa.insert(JOBS_TABLE), rows[0] if len(rows) == 1 else rows)


def _insert_recordset(
    session: Session, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]
) -> None:
    read, statement = recordset_insert(tuple(columns))
    session.execute(statement, {"rows": read.rows_json(rows)})


@functools.lru_cache(maxsize=64)
def recordset_insert(columns: tuple[str, ...]) -> tuple[Recordset, sa.TextClause]:
    """``INSERT INTO jobs (<columns>) SELECT … FROM json_to_recordset(:rows)``, and the
    recordset that writes ``:rows`` (PostgreSQL): once per set of columns."""
    read = Recordset(columns)
    # Column names come from the table definition (``jobs_c`` refuses any other).
    statement = sa.text(
        f"INSERT INTO jobs ({', '.join(columns)}) "  # noqa: S608
        f"SELECT {', '.join(read.values)} FROM {read.source}"
    )
    return read, statement


def _update_executemany(
    session: Session, columns: Sequence[str], changes: Sequence[Mapping[str, Any]]
) -> None:
    session.execute(
        _update_by_id(tuple(columns)),
        [{"match_id": c["id"], **{f"new_{name}": c[name] for name in columns}} for c in changes],
    )


@functools.lru_cache(maxsize=64)
def _update_by_id(columns: tuple[str, ...]) -> sa.Update:
    """``UPDATE jobs SET <column> = :new_<column>, … WHERE id = :match_id``, once per set
    of columns (built anew each time, it cost more than SQLite took to run it)."""
    return (
        sa.update(JOBS_TABLE)
        .where(jobs_c.id == sa.bindparam("match_id"))
        .values({name: sa.bindparam(f"new_{name}", type_=jobs_c[name].type) for name in columns})
    )


class Recordset:
    """The rows as one JSON array parameter read by ``json_to_recordset``: written by
    orjson in one call, where psycopg's array dumpers made a Python call per value (a
    quarter of a batch submit's time). Only the named columns go.

    - A JSON column's value goes as its own JSON text, in a string, cast back to json:
      stored as written, JSON null included, and a ``\\u0000`` inside it (which a json
      column holds, and which ``json_to_recordset`` refuses to unescape anywhere in its
      document) stays an escape, so one such row cannot fail a sweep's whole batch.
    - A timestamp goes as the naive UTC the column holds, converted here as SQLAlchemy's
      binding converts it: one that overflows the calendar when moved to UTC is refused
      (a row error) rather than stored as a year PostgreSQL has and Python has not.
    - Integers beyond 64 bits, which orjson refuses, go through the standard library.

    ``key``: the column rows are matched on; ``match``: text values rows are matched on
    that no column holds under that name (``v.<name>``); neither is among ``values``."""

    def __init__(
        self, columns: Sequence[str], *, key: str | None = None, match: Sequence[str] = ()
    ) -> None:
        self.plan: list[tuple[str, Any]] = []
        declared, self.values = [], []
        for name in ([key] if key else []) + list(columns):
            pg_type, read, convert = _recordset_column(jobs_c[name])
            self.plan.append((name, convert))
            declared.append(f"{name} {pg_type}")
            self.values.append(read.format(f"v.{name}"))
        if key:
            self.values = self.values[1:]
        for name in match:
            self.plan.append((name, None))
            declared.append(f"{name} text")
        self.source = f"json_to_recordset(CAST(:rows AS json)) AS v({', '.join(declared)})"
        # A plain JSON column stores JSON null for None, not NULL: that text goes for it.
        self.json_nulls = {name: "null" for name, convert in self.plan if convert is _json_dumps}

    def rows_json(self, rows: Sequence[Mapping[str, Any]]) -> str:
        # A batch's rows share their timestamps (one ``now``): each converted once.
        plan = [
            (name, _once_per_value(convert) if convert is _naive_utc else convert)
            for name, convert in self.plan
        ]
        # A key left out reads as NULL, as a JSON null does: a new job's twenty-odd empty
        # columns are neither converted nor written, nor parsed again by PostgreSQL.
        shaped = [
            self.json_nulls
            | {
                name: value if convert is None else convert(value)
                for name, convert in plan
                if (value := row[name]) is not None
            }
            for row in rows
        ]
        try:
            return orjson.dumps(shaped).decode()
        except TypeError:  # orjson.JSONEncodeError included
            return json.dumps(shaped, separators=(",", ":"), default=_iso)


def _once_per_value(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``convert``, remembering its answer for each value object it was given."""
    seen: dict[int, tuple[Any, Any]] = {}  # id -> (the value, kept alive; its conversion)

    def converted(value: Any) -> Any:
        entry = seen.get(id(value))
        if entry is None or entry[0] is not value:
            entry = seen[id(value)] = (value, convert(value))
        return entry[1]

    return converted


def _iso(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _naive_utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC).replace(tzinfo=None)


def _json_text(value: Any) -> str | None:
    """SQL NULL for None (as a ``JSON(none_as_null=True)`` column stores it)."""
    return None if value is None else _json_dumps(value)


def _json_dumps(value: Any) -> str:
    """JSON text, ``null`` for None (as a plain ``JSON`` column stores it). orjson, or the
    standard library for what orjson refuses (integers beyond 64 bits)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # orjson.JSONEncodeError included
        return json.dumps(value, separators=(",", ":"))


def _recordset_column(column: sa.Column[Any]) -> tuple[str, str, Any]:
    """(the type ``json_to_recordset`` reads the column's value as, the expression that
    turns ``{}``, the value read, into what the column stores, the conversion of the
    value before it is written, if any)."""
    kind = column.type
    if isinstance(kind, UTCDateTime):  # moved to UTC here: past 9999 is refused, not stored
        return "timestamp", "{}", _naive_utc
    if isinstance(kind, sa.JSON):
        return "text", "CAST({} AS json)", _json_text if kind.none_as_null else _json_dumps
    if isinstance(kind, sa.Boolean):
        return "boolean", "{}", None
    if isinstance(kind, sa.Integer):
        return "bigint", "{}", None
    if isinstance(kind, sa.Float):
        return "float8", "{}", None
    return "text", "{}", None


def _update_recordset(
    session: Session, columns: Sequence[str], changes: Sequence[Mapping[str, Any]]
) -> None:
    read = Recordset(columns, key="id")
    sets = [f"{name} = {value}" for name, value in zip(columns, read.values, strict=True)]
    # Column names come from the table definition, never from input.
    statement = sa.text(
        f"UPDATE jobs SET {', '.join(sets)} FROM {read.source} "  # noqa: S608
        "WHERE jobs.id = v.id"
    )
    session.execute(statement, {"rows": read.rows_json(changes)})
