"""Reading a job, optionally waiting for it to finish (``GET /jobs/{id}?wait=S``, and
``POST /jobs?wait=S`` after the submit).

A settle in this process hands the finished job to its waiters with the wake-up
(``Signals.jobs_finished``), so the common case reads the job once at most: never after
the wake, and not at all for ``POST /jobs?wait=``, which knows the row it just inserted.
A wake-up from another process (NOTIFY, pub/sub, the shared poll) carries no row: the
waiter reads it then."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import cast

from sqlalchemy.orm import Session

from service import jobs
from service.auth import Principal
from service.ids import is_job_id
from service.models import JobValues
from service.pg_direct import Refused
from service.runtime import Runtime
from service.signals import FinishedWaiter
from service.states import FINISHED


@dataclass(frozen=True, slots=True)
class Waited:
    job: JobValues
    # Over a long-poll cap (service/longpoll.py) and not finished: come back later.
    refused: bool


async def read_job(runtime: Runtime, principal: Principal, job_id: str, wait: float) -> Waited:
    """The job, once it finished or ``wait`` seconds passed (capped by the settings)."""
    if principal.queues is not None:  # another tenant's job is not found (nor waited on)
        await runtime.db.read(
            lambda session: jobs.check_visible(session, job_id, principal), rows=1
        )
    return await wait_admitted(runtime, principal, job_id, wait)


async def wait_admitted(
    runtime: Runtime,
    principal: Principal,
    job_id: str,
    wait: float,
    *,
    waiter: FinishedWaiter | None = None,
    known: JobValues | None = None,
) -> Waited:
    """As ``read_job`` for a job the caller is known to see (``POST /jobs?wait=``: it has
    just submitted it), so without the visibility check. ``known``: the job as it was
    committed, with ``waiter`` registered before that commit (no finish can be missed
    between them): it stands for the first read."""
    wait = min(wait, runtime.settings.max_result_wait_seconds)
    # Over a long-poll cap: the job as it is now.
    admitted = wait > 0 and runtime.long_polls.try_enter(principal.key_id)
    try:
        job = await wait_for_finish(
            runtime, job_id, wait if admitted else 0.0, waiter=waiter, known=known
        )
    finally:
        if admitted:
            runtime.long_polls.leave(principal.key_id)
    return Waited(job, refused=wait > 0 and not admitted and job["status"] not in FINISHED)


async def wait_for_finish(
    runtime: Runtime,
    job_id: str,
    wait: float,
    *,
    waiter: FinishedWaiter | None = None,
    known: JobValues | None = None,
) -> JobValues:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    event = waiter if waiter is not None else runtime.signals.finished_waiter(job_id)
    job = known if waiter is not None else None  # without a prior waiter, read first
    try:
        while True:
            if event.job is not None:  # settled here: the job as committed
                return event.job
            current = None if event.is_set() else job  # woken: ``job`` is out of date
            if current is None:
                # Clear before reading, never after: a finish that lands between the read
                # and the wait must still wake us.
                event.clear()
                current = await read_values(runtime, job_id)
            remaining = deadline - loop.time()
            if current["status"] in FINISHED or remaining <= 0 or runtime.signals.draining:
                return current
            # No re-read on a timer: a finish anywhere sets the event (this process's
            # commits, NOTIFY or pub/sub, or the SQL broker's one shared poll for all
            # waiters on a database without notifications, service/brokers/sql.py).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):  # no task of its own (unlike wait_for)
                    await event.wait()
            job = None
    finally:
        runtime.signals.drop_finished_waiter(job_id, event)


async def read_values(runtime: Runtime, job_id: str) -> JobValues:
    """The job as stored (``JobNotFound`` if there is none): on PostgreSQL and SQLite one
    statement from the event loop, else (or if that fails) through the pool."""
    direct = runtime.loop_direct
    if direct is not None and is_job_id(job_id):
        with contextlib.suppress(Refused):
            rows = await direct.fetch(direct.compiled("job by id", jobs.by_id), {"job_id": job_id})
            if not rows:
                raise jobs.not_found(job_id)
            return cast(JobValues, rows[0])
    return await runtime.db.read(lambda session: _read(session, job_id), rows=1)


def _read(session: Session, job_id: str) -> JobValues:
    """Core, not the ORM: a job read whole, without an identity map to fill."""
    if not is_job_id(job_id):
        raise jobs.not_found(job_id)
    row = session.execute(jobs.by_id(), {"job_id": job_id}).mappings().first()
    if row is None:
        raise jobs.not_found(job_id)
    return cast(JobValues, dict(row))
