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
from sqlalchemy.orm import Session

from service import errors
from service.jobs import insert_jobs
from service.models import JOBS_TABLE, JobRow, JobValues, values_of


@dataclass(frozen=True, slots=True)
class Submitted:
    row: JobValues
    # An earlier request with the same idempotency key stored this row (200, not 202).
    replayed: bool = False


# What one request of a group gets: its job, or the problem to answer with.
Outcome = Submitted | errors.ProblemError


def store_group(session: Session, rows: Sequence[JobValues], ttl_seconds: float) -> list[Outcome]:
    """Insert the rows that are new, in one statement; the outcome of each row, in order.
    A row's ``idempotency_key`` and ``request_hash`` are None when its request had no key."""
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
