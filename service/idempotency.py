"""Idempotency keys inside the group commit: one transaction stores the jobs of many
concurrent ``POST /jobs`` requests, keyed or not. The group's keys are looked up in one
query; a request whose key a live job holds is a replay of it (or a mismatch, when its
body differs), and within the group the first request with a key wins and the later ones
replay it. Keys are scoped per API key (``jobs.scoped_idempotency_key``) before they get
here, and a job older than CELERIAC_IDEMPOTENCY_TTL_SECONDS gives its key up."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from service import errors
from service.jobs import insert_jobs
from service.models import JOBS_TABLE, JobRow, JobValues, values_of
from service.sqlite_direct import DirectSqlite


@dataclass(frozen=True, slots=True)
class Submitted:
    row: JobValues
    # An earlier request with the same idempotency key stored this row (200, not 202).
    replayed: bool = False


# What one request of a group gets: its job, or the problem to answer with.
Outcome = Submitted | errors.ProblemError


def store_group(session: Session, rows: Sequence[JobValues], ttl_seconds: float) -> list[Outcome]:
    """Insert the rows that are new; the outcome of each row, in order. A row's
    ``idempotency_key`` and ``request_hash`` are None when its request had no key.

    Where the database can skip a conflicting row (PostgreSQL, SQLite), the group is
    inserted at once and only the keys it found taken are looked up: the common case, all
    keys new, is one statement. Elsewhere (MariaDB, whose key comparison is looser than
    Python's) the keys are looked up first."""
    if not any(row["idempotency_key"] is not None for row in rows):
        insert_jobs(session, list(rows))
        return [Submitted(row) for row in rows]
    if session.get_bind().dialect.name in SKIPS_CONFLICTS:
        return _insert_then_resolve(session, rows, ttl_seconds)
    return _resolve_then_insert(session, rows, ttl_seconds)


# Dialects with INSERT … ON CONFLICT (idempotency_key) DO NOTHING.
SKIPS_CONFLICTS = ("postgresql", "sqlite")


def _resolve_then_insert(
    session: Session, rows: Sequence[JobValues], ttl_seconds: float
) -> list[Outcome]:
    holders = live_holders(session, rows, ttl_seconds)
    outcomes: list[Outcome] = []
    fresh: list[JobValues] = []
    for row in rows:
        key = row["idempotency_key"]
        holder = None if key is None else holders.get(key)
        if holder is not None:
            outcomes.append(replay_or_reject(holder, row.get("request_hash") or ""))
            continue
        if key is not None:
            holders[key] = row  # first wins: later rows of the group with this key replay it
        fresh.append(row)
        outcomes.append(Submitted(row))
    if fresh:
        insert_jobs(session, fresh)
    return outcomes


def _insert_then_resolve(
    session: Session, rows: Sequence[JobValues], ttl_seconds: float
) -> list[Outcome]:
    """The first row of the group with each key is inserted unless the key is taken; a
    taken key is a replay of its live holder, or is released (expired) and its row
    inserted after all. Later rows with a key replay whichever row holds it."""
    winners: dict[str, JobValues] = {}  # key -> the row that holds it once we commit
    fresh: list[JobValues] = []
    for row in rows:
        key = row["idempotency_key"]
        if key is None or key not in winners:
            fresh.append(row)
            if key is not None:
                winners[key] = row
    taken = _insert_skipping_taken(session, fresh)
    if taken:
        holders = live_holders(session, taken, ttl_seconds)
        retry = []
        for row in taken:
            holder = holders.get(row["idempotency_key"] or "")
            if holder is None:
                retry.append(row)  # expired and released just now (or gone): insert it
            else:
                winners[row["idempotency_key"] or ""] = holder
        if retry:  # a concurrent group taking one of these keys fails this one: it looks again
            insert_jobs(session, retry)
    outcomes: list[Outcome] = []
    for row in rows:
        winner = winners.get(row["idempotency_key"] or "")
        if winner is None or winner is row:
            outcomes.append(Submitted(row))
        else:
            outcomes.append(replay_or_reject(winner, row.get("request_hash") or ""))
    return outcomes


def _insert_skipping_taken(session: Session, rows: list[JobValues]) -> list[JobValues]:
    """Insert ``rows``, skipping those whose key is taken (committed, or by a concurrent
    transaction that then commits); the skipped rows, in order. One executemany without
    RETURNING (a pipelined, prepared statement), then a look-up only when it fell short."""
    statement = _skipping_taken_keys(session.get_bind().dialect.name)
    statement = statement.execution_options(preserve_rowcount=True)  # SQLAlchemy drops it
    connection = session.connection()
    result = connection.execute(statement, rows[0] if len(rows) == 1 else rows)
    if result.rowcount == len(rows):
        return []
    ids = [row["id"] for row in rows]  # ours alone: a fresh UUIDv7 each
    query = sa.select(JOBS_TABLE.c.id).where(JOBS_TABLE.c.id.in_(ids))
    inserted = set(connection.execute(query).scalars())
    return [row for row in rows if row["id"] not in inserted]


async def insert_skipping_taken_direct(direct: DirectSqlite, rows: Sequence[JobValues]) -> set[str]:
    """``_insert_skipping_taken`` on SQLite's connection on the event loop
    (service/sqlite_direct.py): the group's rows in one transaction, an ``INSERT … ON
    CONFLICT (idempotency_key) DO NOTHING RETURNING id`` each, compiled once; the ids of
    the rows skipped because their key was taken (as ``SubmitPipeline.insert`` on
    PostgreSQL). ``Refused``: nothing committed (the write lock held elsewhere, a row the
    database or a binding refuses), and the pool's path stores the group."""
    keys = tuple(rows[0])

    def build() -> sa.ClauseElement:
        return _skipping_taken_keys("sqlite").returning(JOBS_TABLE.c.id)

    insert = direct.compiled(("insert skipping taken keys", keys), build, column_keys=keys)
    return await direct.transact(lambda run: {row["id"] for row in rows if not run(insert, row)})


def _skipping_taken_keys(dialect: str) -> sa.Insert:
    if dialect == "postgresql":
        return postgresql.insert(JOBS_TABLE).on_conflict_do_nothing(
            index_elements=["idempotency_key"]
        )
    return sqlite.insert(JOBS_TABLE).on_conflict_do_nothing(index_elements=["idempotency_key"])


def live_holders(
    session: Session, rows: Sequence[JobValues], ttl_seconds: float
) -> dict[str, JobValues]:
    """The jobs holding the group's keys within the TTL, by key. Older ones give their
    keys up in this transaction (one UPDATE), so the rows inserted after this may take
    them (a TTL of 0 remembers keys for ever)."""
    asked: dict[str, datetime] = {}
    for row in rows:
        if row["idempotency_key"] is not None:  # expiry is judged at the first asker's time
            asked.setdefault(row["idempotency_key"], row["created_at"])
    live: dict[str, JobValues] = {}
    expired: list[str] = []
    for key, job in holders(session, list(asked)).items():
        oldest_live = asked[key] - timedelta(seconds=ttl_seconds)
        if ttl_seconds <= 0 or job.created_at > oldest_live:
            live[key] = values_of(job)
        else:
            expired.append(job.id)
    if expired:
        release = JOBS_TABLE.update().where(JOBS_TABLE.c.id.in_(expired))
        session.execute(release.values(idempotency_key=None, request_hash=None))
    return live


def holders(session: Session, keys: list[str]) -> dict[str, JobRow]:
    """The job holding each of ``keys``, in one query. The database may compare keys more
    loosely than Python (MariaDB ignores trailing spaces, a _ci collation case): when a
    key found is none of those asked, each is looked up alone, as the database sees it."""
    if not keys:
        return {}
    by_key = JobRow.idempotency_key
    found = {
        job.idempotency_key: job
        for job in session.scalars(sa.select(JobRow).where(by_key.in_(keys)))
    }
    if found.keys() <= set(keys):
        return {key: job for key, job in found.items() if key is not None}
    alone = ((key, session.scalars(sa.select(JobRow).where(by_key == key)).first()) for key in keys)
    return {key: job for key, job in alone if job is not None}


def replay_or_reject(holder: JobValues, body_hash: str) -> Outcome:
    if holder["request_hash"] != body_hash:
        return errors.IdempotencyMismatch(
            "this Idempotency-Key was used with a different request body; "
            "use a new key for a new job"
        )
    return Submitted(holder, replayed=True)
