"""The submit group commit's publish (service/runtime.py, ``SubmitBatcher``): each group is
published after its commit and beside the next group's commit, not ahead of it, with at
most ``PUBLISHES_IN_FLIGHT`` publishes in flight (then the next commit waits for one); a
failed publish fails no submit and is logged once. In process, on a real migrated
database, with a broker whose publish waits until the test lets it go."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import migrated_database, selected_databases

from service.brokers.sql import SqlBroker
from service.db import Database
from service.effects import Dispatch
from service.jobs import Defaults, new_job
from service.models import JOBS_TABLE, JobValues
from service.runtime import PUBLISHES_IN_FLIGHT, Clock, Runtime
from service.schemas import JobSubmit
from service.settings import Settings
from service.signals import Signals

QUEUE = "q_batcher"


@pytest.fixture(params=selected_databases())
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    with migrated_database(str(request.param), tmp_path) as database:
        yield database


class HeldBroker(SqlBroker):
    """Publishes only once ``release`` is set (or fails, with ``failing``). Never started:
    no NOTIFY rides a commit, so every publish runs after it."""

    def __init__(self, db: Database, signals: Signals) -> None:
        super().__init__(db, signals, fallback_seconds=1.0)
        self.release = asyncio.Event()
        self.failing = False
        self.published: list[str] = []
        self.all_published = asyncio.Event()
        self.expected = 0

    async def publish(self, jobs: Sequence[Dispatch]) -> None:
        await self.release.wait()
        if self.failing:
            raise RuntimeError("the broker refused")
        self.published += [job.id for job in jobs]
        if len(self.published) >= self.expected:
            self.all_published.set()


def row() -> JobValues:
    return new_job(JobSubmit(task="tests.batcher", queue=QUEUE), Clock().now(), Defaults(0))


def stored(db: Database) -> int:
    query = sa.select(sa.func.count()).where(JOBS_TABLE.c.queue == QUEUE)
    return int(db.run_sync(lambda session: session.scalar(query)))


def runtime_with(db: Database) -> tuple[Runtime, HeldBroker]:
    signals = Signals()
    broker = HeldBroker(db, signals)
    return Runtime(Settings(), db, signals, broker), broker


def test_a_publish_in_flight_holds_up_no_commit_until_too_many(db: Database) -> None:
    async def scenario() -> None:
        runtime, broker = runtime_with(db)
        # One client submitting in a loop: every submit commits (and is answered) while
        # the publishes of the earlier ones are still held.
        for _ in range(PUBLISHES_IN_FLIGHT + 1):
            await asyncio.wait_for(runtime.submits.submit(row()), 10)
        assert stored(db) == PUBLISHES_IN_FLIGHT + 1 and broker.published == []
        # All publish slots are taken, so the next group waits for one before it commits.
        late = asyncio.create_task(runtime.submits.submit(row()))
        await asyncio.sleep(0.1)
        assert not late.done() and stored(db) == PUBLISHES_IN_FLIGHT + 1
        broker.expected = PUBLISHES_IN_FLIGHT + 2
        broker.release.set()
        done = await asyncio.wait_for(late, 10)
        await asyncio.wait_for(broker.all_published.wait(), 10)
        assert done.row["id"] in broker.published and stored(db) == PUBLISHES_IN_FLIGHT + 2

    asyncio.run(scenario())


def test_a_failed_publish_fails_no_submit_and_is_logged_once(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        runtime, broker = runtime_with(db)
        broker.failing = True
        broker.release.set()
        for _ in range(3):
            await asyncio.wait_for(runtime.submits.submit(row()), 10)
        await asyncio.wait_for(_publishes_ended(runtime), 10)
        assert stored(db) == 3

    with caplog.at_level(logging.WARNING, logger="celeriac.submit"):
        asyncio.run(scenario())
    failures = [r for r in caplog.records if "reconcile will index them" in r.getMessage()]
    assert len(failures) == 1, caplog.text


async def _publishes_ended(runtime: Runtime) -> None:
    """Every spawned publish has ended (they are the runtime's only spawned tasks here)."""
    while tasks := runtime.spawned():
        await asyncio.wait(tasks)
