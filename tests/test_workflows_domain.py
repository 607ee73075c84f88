"""Issue 18, in process on a migrated database: what settling costs. A job outside a
workflow runs exactly the statements it ran before workflows existed (none touches a
workflow table); a member of a chord settles in a fixed number of statements however
wide the chord is (no scan of its siblings)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import migrated_database

from service.db import Database
from service.effects import Effects
from service.jobs import Defaults, insert_jobs, new_job
from service.leases import LeaseTerms, Settle, claim_by_ids, new_token, settle
from service.schemas import JobSubmit
from service.states import Outcome
from service.workflows import WorkflowSubmit, build, insert

QUEUE = "q_wf_domain"
WORKFLOW_TABLES = re.compile(r"\bworkflow(s|_jobs|_edges)\b")


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    with migrated_database("sqlite", tmp_path) as database:
        yield database


def _statements(db: Database) -> tuple[list[str], Any]:
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        seen.append(statement)

    sa.event.listen(db.engine, "before_cursor_execute", record)
    return seen, lambda: sa.event.remove(db.engine, "before_cursor_execute", record)


def _lease_and_settle(db: Database, job_ids: list[str], now: datetime) -> list[str]:
    """Lease the jobs, then settle each one in its own transaction; the statements of
    the last settle."""
    token = new_token()
    terms = LeaseTerms("w", token, now, 30.0, 30.0)
    db.run_sync(lambda session: claim_by_ids(session, job_ids, terms))
    statements: list[str] = []
    for job_id in job_ids:
        seen, stop = _statements(db)
        report = Settle(job_id, token, Outcome.succeeded, result=1)
        db.run_sync(lambda session, r=report: settle(session, [r], now, Effects()))
        stop()
        statements = seen
    return statements


def _chord(db: Database, width: int, now: datetime) -> list[str]:
    jobs = [{"ref": f"m{i}", "task": "t", "queue": QUEUE} for i in range(width)]
    jobs.append(
        {"ref": "cb", "task": "t", "queue": QUEUE, "after": [f"m{i}" for i in range(width)]}
    )
    spec = WorkflowSubmit.model_validate({"jobs": jobs})
    rows = [new_job(job, now, Defaults(max_retries=0)) for job in spec.jobs]
    created, flow, members, edges = build(spec, rows, now)

    def store(session: Any) -> None:
        insert(session, flow, members, edges)
        insert_jobs(session, rows)

    db.run_sync(store)
    return [row["id"] for row in created.roots]


def test_a_plain_settle_touches_no_workflow_table(db: Database) -> None:
    now = datetime.now(UTC)
    spec = JobSubmit.model_validate({"task": "t", "queue": QUEUE})
    row = new_job(spec, now, Defaults(max_retries=0))
    db.run_sync(lambda session: insert_jobs(session, [row]))
    statements = _lease_and_settle(db, [row["id"]], now)
    assert not [s for s in statements if WORKFLOW_TABLES.search(s)], statements
    assert len(statements) <= 3, statements  # lock and check, the write (and BEGIN)
    print(f"a plain job's settle: {len(statements)} statements")


def test_a_chord_member_settles_in_constant_statements(db: Database) -> None:
    now = datetime.now(UTC)
    narrow = _lease_and_settle(db, _chord(db, 3, now)[:2], now)  # not the last: no release
    wide = _lease_and_settle(db, _chord(db, 300, now)[:2], now)
    assert len(narrow) == len(wide), (narrow, wide)
    print(f"a chord member's settle: {len(wide)} statements")
