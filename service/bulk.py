"""Write many rows' different new values in one statement.

The generic path is an executemany of ``UPDATE jobs SET … WHERE id = ?``. On PostgreSQL a
single ``UPDATE … FROM unnest(<one array per column>)`` does the same work in one round
trip and one plan, several times faster for the batches the worker protocol settles.
New rows go the same way (``insert_each``): ``INSERT … SELECT … FROM unnest(…)``."""

from __future__ import annotations

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
        _update_unnest(session, columns, changes)
    else:
        _update_executemany(session, columns, changes)


def insert_each(session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
    """INSERT INTO jobs each of ``rows`` (all with the same keys). On PostgreSQL, several
    rows are one statement over one array per column: one plan and one execution, not one
    per row as in an executemany, and less Python per row than SQLAlchemy's binding."""
    if not rows:
        return
    if len(rows) > 1 and session.get_bind().dialect.name == "postgresql":
        _insert_unnest(session, list(rows[0]), rows)
    else:
        session.connection().execute(sa.insert(JOBS_TABLE), rows[0] if len(rows) == 1 else rows)


def _insert_unnest(
    session: Session, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]
) -> None:
    arrays: dict[str, list[Any]] = {}
    unnests, values = [], []
    for name in columns:
        array_type, cast_back, convert = _pg_array_type(jobs_c[name])
        arrays[f"p_{name}"] = [convert(row[name]) for row in rows]
        unnests.append(f"CAST(:p_{name} AS {array_type})")
        values.append(f"v.{name}{cast_back}")
    # Column names come from the table definition (``jobs_c`` refuses any other).
    statement = sa.text(
        f"INSERT INTO jobs ({', '.join(columns)}) "  # noqa: S608
        f"SELECT {', '.join(values)} FROM unnest({', '.join(unnests)}) AS v({', '.join(columns)})"
    )
    session.execute(statement, arrays)


def _update_executemany(
    session: Session, columns: Sequence[str], changes: Sequence[Mapping[str, Any]]
) -> None:
    statement = (
        sa.update(JOBS_TABLE)
        .where(jobs_c.id == sa.bindparam("match_id"))
        .values({name: sa.bindparam(f"new_{name}", type_=jobs_c[name].type) for name in columns})
    )
    session.execute(
        statement,
        [{"match_id": c["id"], **{f"new_{name}": c[name] for name in columns}} for c in changes],
    )


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


def _pg_array_type(column: sa.Column[Any]) -> tuple[str, str, Callable[[Any], Any]]:
    """(array type of the parameter, cast back in SET, value conversion)."""
    kind = column.type
    if isinstance(kind, UTCDateTime):
        return "timestamp[]", "", _naive_utc
    if isinstance(kind, sa.JSON):
        return "text[]", "::json", _json_text if kind.none_as_null else _json_dumps
    if isinstance(kind, sa.Boolean):
        return "boolean[]", "", bool
    if isinstance(kind, sa.Integer):
        return "bigint[]", "", lambda v: v
    if isinstance(kind, sa.Float):
        return "float8[]", "", lambda v: v
    return "text[]", "", lambda v: v


def _update_unnest(
    session: Session, columns: Sequence[str], changes: Sequence[Mapping[str, Any]]
) -> None:
    arrays: dict[str, list[Any]] = {"p_id": [c["id"] for c in changes]}
    unnests = ["CAST(:p_id AS text[])"]
    sets = []
    for name in columns:
        array_type, cast_back, convert = _pg_array_type(jobs_c[name])
        arrays[f"p_{name}"] = [convert(c[name]) for c in changes]
        unnests.append(f"CAST(:p_{name} AS {array_type})")
        sets.append(f"{name} = v.{name}{cast_back}")
    # Column names come from the table definition, never from input.
    statement = sa.text(
        f"UPDATE jobs SET {', '.join(sets)} "  # noqa: S608
        f"FROM unnest({', '.join(unnests)}) AS v(id, {', '.join(columns)}) "
        "WHERE jobs.id = v.id"
    )
    session.execute(statement, arrays)
