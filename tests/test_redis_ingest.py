"""Issue 14: how the service applies a Redis worker's events to PostgreSQL. In process,
wired as ``celeriac serve`` wires it (``startup.start_broker``), on a real migrated
database and Redis; the events come from the protocol's own functions (FCALL).

- A service whose workers all lease from Redis takes the direct path (it used to assume
  flow control forever, since only a claim through SQL ever looked).
- A batch that leases jobs without reporting them waits ``LINGER_MS`` for their reports,
  and no longer: a lease alone still reaches SQL.
- A lease and its report read together commit once: one statement after the other in one
  transaction."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import REDIS_HOST, REDIS_PORT, Backend, make_backend, redis_client, selected_databases

from service import flow, waiting
from service.brokers import redis_protocol
from service.brokers.redis import RedisBroker
from service.db import Database, create_engine
from service.jobs import insert_jobs, new_job
from service.models import JOBS_TABLE
from service.runtime import Runtime
from service.schemas import JobSubmit
from service.settings import Settings
from service.signals import Signals
from service.startup import start_broker

pytestmark = pytest.mark.skipif(
    "postgres" not in selected_databases(), reason="the direct path is PostgreSQL's"
)
QUEUE = "q_ingest"


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[Backend]:
    with make_backend("postgres", "redis", tmp_path) as own:
        yield own


@dataclass
class Ingest:
    runtime: Runtime
    broker: RedisBroker
    client: Any  # redis-py, as a worker in any language would call the functions
    applied: list[list[str]]  # the event kinds of each batch the service applied
    statements: list[tuple[str, int]]  # each direct write: its verb, statements before it

    @property
    def tag(self) -> str:
        return "{" + self.broker.layout.prefix + "}"

    async def submit(self) -> str:
        spec = JobSubmit(task="ingest.noop", queue=QUEUE)
        row = new_job(spec, self.runtime.clock.now(), self.runtime.defaults)
        await self.runtime.db.run(lambda session: insert_jobs(session, [row]))
        await self.runtime.after_submit([row])
        return row["id"]

    def lease_call(self, pipe: Any) -> None:
        pipe.fcall("celeriac_v1_lease", 2, f"{self.tag}:events", f"{self.tag}:ready:{QUEUE}",
                   "1", "ingest-test", "1", "30000")  # fmt: skip

    def complete_call(self, pipe: Any, job_id: str, token: str) -> None:
        pipe.fcall("celeriac_v1_complete", 2, f"{self.tag}:events", f"{self.tag}:job:{job_id}",
                   "1", job_id, token, "7")  # fmt: skip

    async def lease(self) -> str:
        """The job's lease token, leased from Redis (once the submit's push landed)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with self.client.pipeline(transaction=False) as pipe:
                self.lease_call(pipe)
                [leased] = pipe.execute()
            if leased:
                return str(json.loads(leased[0])["lease"]["token"])
            await asyncio.sleep(0.01)
        raise AssertionError("the job never reached the Redis index")

    async def row(self, job_id: str) -> dict[str, Any]:
        query = sa.select(JOBS_TABLE).where(JOBS_TABLE.c.id == job_id)
        return dict(await self.runtime.db.read(lambda s: s.execute(query).mappings().one()))

    async def finished(self, job_id: str) -> dict[str, Any]:
        job = await waiting.wait_for_finish(self.runtime, job_id, 10.0)
        assert job["status"] == "succeeded", job
        return dict(job)


@contextlib.asynccontextmanager
async def ingest(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Ingest]:
    applied: list[list[str]] = []
    original_apply = redis_protocol.EventIngest._apply

    async def recording_apply(self: Any, entries: list[redis_protocol.Entry]) -> None:
        applied.append([fields.get("k", "") for _id, fields in entries])
        await original_apply(self, entries)

    monkeypatch.setattr(redis_protocol.EventIngest, "_apply", recording_apply)
    db = Database(create_engine(backend.database_url))
    signals = Signals()
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{backend.redis_db}"
    broker = RedisBroker(db, signals, url=url, prefix=backend.redis_prefix,
                         reconcile_age_seconds=0.0, serve_workers=True)  # fmt: skip
    runtime = Runtime(Settings(database_url=backend.database_url), db, signals, broker)
    statements: list[tuple[str, int]] = []
    direct = runtime.direct
    assert direct is not None
    fetch = direct.fetch

    async def recording_fetch(
        compiled: Any, values: Any, notices: Any = (), first: Any = ()
    ) -> Any:
        if not compiled.sql.startswith("SELECT"):  # (a job read: the test's own waits)
            statements.append((compiled.sql.split()[0], len(first)))
        return await fetch(compiled, values, notices, first)

    monkeypatch.setattr(direct, "fetch", recording_fetch)
    client = redis_client(backend.redis_db)
    await start_broker(runtime)  # as the app starts it: with the service's hooks
    try:
        yield Ingest(runtime, broker, client, applied, statements)
    finally:
        client.close()
        await broker.close()
        if runtime.direct is not None:
            await runtime.direct.close()
        db.dispose()


def run(backend: Backend, monkeypatch: pytest.MonkeyPatch,
        scenario: Callable[[Ingest], Awaitable[None]]) -> None:  # fmt: skip
    async def main() -> None:
        async with ingest(backend, monkeypatch) as it:
            await asyncio.wait_for(scenario(it), 30)

    asyncio.run(main())


def test_a_lease_read_alone_waits_for_its_report_and_both_commit_once_directly(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(it: Ingest) -> None:
        monkeypatch.setattr(redis_protocol, "LINGER_MS", 5000)
        assert flow.active(it.runtime.db.engine), "until it has looked, it assumes flow control"
        job_id = await it.submit()
        token = await it.lease()
        await _read_by_the_service(it)  # the lease event, alone: the service lingers
        started = time.monotonic()
        it.complete_call(it.client, job_id, token)
        done = await it.finished(job_id)
        assert time.monotonic() - started < 4, "the report ends the wait"
        assert (done["attempt"], done["result"]) == (1, 7), done
        assert done["started_at"] is not None and done["lease_worker"] == "ingest-test", done
        assert it.applied == [["L", "C"]], it.applied  # one batch
        # One statement, the lease's ahead of it in its transaction: one commit. Nothing
        # through the pool: flow control was looked up, and none is configured.
        assert it.statements == [("UPDATE", 1)], it.statements
        assert not flow.active(it.runtime.db.engine)

    run(backend, monkeypatch, scenario)


def test_a_lease_whose_report_does_not_come_reaches_sql_after_the_linger(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(it: Ingest) -> None:
        monkeypatch.setattr(redis_protocol, "LINGER_MS", 300)
        job_id = await it.submit()
        await it.lease()
        leased = time.monotonic()
        while (await it.row(job_id))["status"] != "running":
            assert time.monotonic() - leased < 10, "the lease never reached SQL"
            await asyncio.sleep(0.02)
        assert time.monotonic() - leased >= 0.25  # it waited for a report first
        assert it.applied == [["L"]], it.applied
        assert it.statements == [("UPDATE", 0)], it.statements

    run(backend, monkeypatch, scenario)


async def _read_by_the_service(it: Ingest) -> None:
    """Until the service's consumer has read the stream's entry (pending, unacknowledged)."""
    stream = f"{it.tag}:events"
    deadline = time.monotonic() + 10
    while not it.client.xpending(stream, redis_protocol.GROUP)["pending"]:
        assert time.monotonic() < deadline, "the service never read the lease event"
        await asyncio.sleep(0.005)
