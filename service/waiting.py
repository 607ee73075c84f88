"""Reading a job, optionally waiting for it to finish (``GET /jobs/{id}?wait=S``, and
``POST /jobs?wait=S`` after the submit)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from service import jobs
from service.auth import Principal
from service.models import JobRow
from service.runtime import Runtime
from service.states import FINISHED


@dataclass(frozen=True, slots=True)
class Waited:
    row: JobRow
    # Over a long-poll cap (service/longpoll.py) and not finished: come back later.
    refused: bool


async def read_job(runtime: Runtime, principal: Principal, job_id: str, wait: float) -> Waited:
    """The job, once it finished or ``wait`` seconds passed (capped by the settings)."""
    if principal.queues is not None:  # another tenant's job is not found (nor waited on)
        await runtime.db.read(lambda session: jobs.check_visible(session, job_id, principal))
    return await wait_admitted(runtime, principal, job_id, wait)


async def wait_admitted(runtime: Runtime, principal: Principal, job_id: str, wait: float) -> Waited:
    """As ``read_job`` for a job the caller is known to see (``POST /jobs?wait=``: it has
    just submitted it), so without the visibility check."""
    wait = min(wait, runtime.settings.max_result_wait_seconds)
    # Over a long-poll cap: the job as it is now.
    admitted = wait > 0 and runtime.long_polls.try_enter(principal.key_id)
    try:
        row = await wait_for_finish(runtime, job_id, wait if admitted else 0.0)
    finally:
        if admitted:
            runtime.long_polls.leave(principal.key_id)
    return Waited(row, refused=wait > 0 and not admitted and row.status not in FINISHED)


async def wait_for_finish(runtime: Runtime, job_id: str, wait: float) -> JobRow:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    event = runtime.signals.finished_waiter(job_id)
    try:
        while True:
            # Clear before reading, never after: a finish that lands between the read and
            # the wait must still wake us.
            event.clear()
            row = await runtime.db.read(lambda session: jobs.get_job(session, job_id))
            remaining = deadline - loop.time()
            if row.status in FINISHED or remaining <= 0:
                return row
            # No re-read on a timer: a finish anywhere sets the event (this process's
            # commits, NOTIFY or pub/sub, or the SQL broker's one shared poll for all
            # waiters on a database without notifications, service/brokers/sql.py).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)
    finally:
        runtime.signals.drop_finished_waiter(job_id, event)
