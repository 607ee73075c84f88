"""What the workflow routes do (``POST /workflows``, ``GET /workflows/{id}``,
``POST /workflows/{id}/cancel``), as plain functions the router calls once; the graph's
rules and the settle live in ``service/workflows.py``."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service import errors, jobs, workflows
from service.auth import Principal
from service.effects import Effects
from service.isolation import refusing_unstorable
from service.models import JobRow
from service.runtime import Runtime
from service.serialize import iso
from service.states import WorkflowStatus
from service.submit import check_payload
from service.workflows import WorkflowSubmit


async def create(
    runtime: Runtime, principal: Principal, spec: WorkflowSubmit, request_length: int | None
) -> dict[str, Any]:
    """Every job of the workflow and its dependencies in one transaction: all stored, or
    none. The jobs without parents are published after the commit, as a batch's are."""
    limit = runtime.settings.max_workflow_jobs
    if len(spec.jobs) > limit:
        raise errors.PayloadTooLarge(
            f"the workflow has {len(spec.jobs)} jobs; the limit is {limit} "
            "(CELERIAC_MAX_WORKFLOW_JOBS)"
        )
    jobs.check_queues(principal, (job.queue for job in spec.jobs))
    workflows.check_graph(spec.jobs)
    now, payload_max = runtime.clock.now(), runtime.settings.max_payload_bytes
    rows = []
    for index, job in enumerate(spec.jobs):
        what = f"jobs[{index}] args and kwargs"
        check_payload(payload_max, request_length, what, job.args, job.kwargs)
        rows.append(jobs.new_job(job, now, runtime.defaults))
    created, flow, members, edges = workflows.build(spec, rows, now)

    def store(session: Session) -> Effects:
        workflows.insert(session, flow, members, edges)
        jobs.insert_jobs(session, rows)
        return runtime.announce_submitted(session, created.roots)

    with refusing_unstorable("a job of the workflow"):  # 422, not 500
        effects = await runtime.db.run(store)
    # Every job counts as submitted (metrics, GET /events: the waiting ones with status
    # waiting); only the roots are dispatched.
    await runtime.after_submit(rows, effects)
    return {
        "id": created.id,
        "status": WorkflowStatus.running,
        "on_failure": spec.on_failure,
        "created_at": iso(now),
        "finished_at": None,
        "jobs": [
            {"ref": job.ref, "id": row["id"], "status": row["status"]}
            for job, row in zip(spec.jobs, rows, strict=True)
        ],
    }


async def get(runtime: Runtime, principal: Principal, workflow_id: str) -> dict[str, Any]:
    flow, members = await runtime.db.run(lambda session: workflows.read(session, workflow_id))
    if not all(principal.allows_queue(member.queue) for member in members):
        raise errors.NotFound(f"no workflow has id {workflow_id!r}")  # another tenant's
    return _body(flow, members)


def _body(flow: Any, members: list[Any]) -> dict[str, Any]:
    return {
        "id": flow.id,
        "status": flow.status,
        "on_failure": flow.on_failure,
        "created_at": iso(flow.created_at),
        "finished_at": iso(flow.finished_at),
        "jobs": [
            {
                "ref": m.ref,
                "id": m.id,
                "task": m.task,
                "status": m.status,
                "result": m.result,
                "error": m.error,
                "finished_at": iso(m.finished_at),
            }
            for m in members
        ],
    }


async def cancel(runtime: Runtime, principal: Principal, workflow_id: str) -> dict[str, Any]:
    """Cancel what has not finished: waiting and queued jobs now, running ones at their
    worker's next heartbeat (through the one-job rules). A finished workflow is
    answered as it is."""
    await get(runtime, principal, workflow_id)  # 404 for another tenant's

    def work(session: Session, effects: Effects) -> tuple[Any, list[Any]]:
        ids = workflows.request_cancel(session, workflow_id)
        if ids:
            rows = list(
                session.scalars(
                    sa.select(JobRow)
                    .where(JobRow.id.in_(ids))
                    .order_by(JobRow.id)
                    .with_for_update()
                )
            )
            cancelled = jobs.cancel_rows(session, rows, runtime.clock.now(), effects)
            effects.finished += [row.id for row in cancelled]
        return workflows.read(session, workflow_id)

    flow, members = await runtime.transact(work)
    return _body(flow, members)
