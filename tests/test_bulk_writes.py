"""Many rows in one statement (service/bulk.py): on PostgreSQL the rows go as one JSON
parameter read by ``json_to_recordset``, elsewhere as an executemany. Whatever the path,
a row reads back as it was written: JSON values as their text was (key order, integers
beyond 64 bits, escapes, a NUL, which PostgreSQL's json holds as an escape), timestamps
at the same instant whatever their offset, JSON null kept apart from SQL NULL where the
column says so. In process, on every database."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import migrated_database, selected_databases

from service.bulk import insert_each, update_each
from service.db import Database
from service.jobs import Defaults, new_job
from service.models import JOBS_TABLE, JobRow
from service.schemas import JobSubmit

TOKYO = timezone(timedelta(hours=9))
ODD_KWARGS = {"z": 1, "a": [2**70, -(2**65), 1.5e300], 'é"\\': "\u2603 \n\t", "m": None}


@pytest.fixture(params=selected_databases())
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    with migrated_database(str(request.param), tmp_path) as database:
        yield database


def rows(count: int) -> list[dict[str, object]]:
    now = datetime(2026, 12, 6, 4, 31, 0, 123456, tzinfo=UTC)
    made = []
    for index in range(count):
        spec = JobSubmit(task="tests.bulk", queue="q_bulk", args=[index], kwargs=ODD_KWARGS)
        row = dict(new_job(spec, now, Defaults(max_retries=0)))
        row["run_at"] = (now + timedelta(seconds=index)).astimezone(TOKYO)  # same instant
        made.append(row)
    return made


def test_rows_read_back_as_written(db: Database) -> None:
    written = rows(3)  # more than one: PostgreSQL's one-statement path
    db.run_sync(lambda session: insert_each(session, written))
    stored = db.run_sync(lambda s: {r.id: r for r in s.scalars(sa.select(JobRow)).all()})
    for row in written:
        job = stored[str(row["id"])]
        assert job.kwargs == ODD_KWARGS and list(job.kwargs) == list(ODD_KWARGS)
        assert job.run_at == row["run_at"]  # UTCDateTime reads back aware, in UTC
        assert job.result is None and job.webhook is None
    if db.dialect == "postgresql":  # the JSON text itself, and JSON null against SQL NULL
        query = sa.select(
            sa.cast(JOBS_TABLE.c.kwargs, sa.Text),
            sa.cast(JOBS_TABLE.c.result, sa.Text),
            JOBS_TABLE.c.webhook.is_(None),
        )
        for kwargs_text, result_text, no_webhook in db.run_sync(lambda s: s.execute(query).all()):
            assert kwargs_text.startswith('{"z":1,"a":[1180591620717411303424,'), kwargs_text
            assert (result_text, no_webhook) == ("null", True)


def test_an_update_of_many_rows_writes_each_its_own_values(db: Database) -> None:
    written = rows(3)
    db.run_sync(lambda session: insert_each(session, written))
    finished = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=TOKYO)
    changes = [
        {"id": row["id"], "status": "succeeded", "result": {"n": i, "big": 2**80, "nul": "a\x00b"},
         "finished_at": finished + timedelta(seconds=i)}
        for i, row in enumerate(written)
    ]  # fmt: skip
    columns = ("status", "result", "finished_at")
    db.run_sync(lambda session: update_each(session, columns, changes))
    stored = db.run_sync(lambda s: {r.id: r for r in s.scalars(sa.select(JobRow)).all()})
    for change in changes:
        job = stored[str(change["id"])]
        assert (job.status, job.result, job.finished_at) == (
            "succeeded", change["result"], change["finished_at"]
        )  # fmt: skip
