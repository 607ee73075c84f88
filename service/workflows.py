"""Workflows (docs/workflows.md): jobs that run after other jobs, settled by SQL.

A dependency is a row (``workflow_edges``); each job of a workflow has a row of its own
(``workflow_jobs``) that counts its parents not yet finished. The transaction that
settles a job for good also settles what hangs off it (``on_finished``): it decrements
its children's counters, queues the children that reach 0 (with their parents' results,
``jobs.parents``), cancels everything downstream of a failure when the workflow says so,
and counts the job against its workflow, which finishes with its last job. Constant work
per settled job: no scan of siblings, nothing in Redis, nothing lost to a crash; the
row lock of a counter's UPDATE orders concurrent settles of a child's parents, on any
number of replicas, so exactly one of them queues the child.

Plain functions over a Session; the caller owns the transaction. A job outside a
workflow never gets here: the settle paths call ``on_finished`` only when a settled row
has a ``workflow_id``. This module must not import ``service.jobs`` or
``service.leases``: they import it."""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import Field
from sqlalchemy.orm import Session

from service import errors
from service.bulk import update_each
from service.effects import Dispatch, Effects, Ended
from service.ids import is_job_id, uuid7
from service.models import (
    DELIVERIES_TABLE,
    JOBS_TABLE,
    WORKFLOW_EDGES_TABLE,
    WORKFLOW_JOBS_TABLE,
    WORKFLOWS_TABLE,
    JobValues,
)
from service.schemas import JobSubmit, Name, Strict, WebhookSpec
from service.states import FINISHED, JobStatus, WorkflowStatus
from service.webhooks import FAILED, PENDING, record_finished, storable_url

jobs_c = JOBS_TABLE.c
flows_c = WORKFLOWS_TABLE.c
members_c = WORKFLOW_JOBS_TABLE.c
edges_c = WORKFLOW_EDGES_TABLE.c

# Ids per IN (…) list: bounded statements however wide a workflow is.
CHUNK = 1000
# Dependencies in one workflow: every one is a row written in the submit's transaction.
MAX_EDGES = 100_000
OnFailure = Literal["cancel_dependents", "continue"]
CANCEL_DEPENDENTS: OnFailure = "cancel_dependents"
CONTINUE: OnFailure = "continue"


# --- the request --------------------------------------------------------------------------


class WorkflowJobSubmit(JobSubmit):
    """One job of a workflow: a job (``POST /jobs``'s body) with a name in the workflow
    and the jobs it runs after."""

    ref: Name = Field(description="its name within the workflow, for `after` and `parents`")
    after: list[Name] = Field(
        default_factory=list,
        description="refs of the jobs it runs after: it waits (status `waiting`) until "
        "every one has succeeded, then is queued; its lease carries their results",
    )
    parents_arg: Literal["one", "list"] | None = Field(
        None,
        description="put the parents' results first in its args when it is queued: `one` "
        "the single parent's result, `list` the list of the parents' results in `after` "
        "order (Celery's chain and chord)",
    )


class WorkflowSubmit(Strict):
    jobs: list[WorkflowJobSubmit] = Field(min_length=1)
    on_failure: OnFailure = Field(
        CANCEL_DEPENDENTS,
        description="when a job fails for good (or is cancelled or expires): cancel every "
        "job downstream of it, or run them anyway (they see its status in `parent_status`)",
    )
    webhook: WebhookSpec | None = Field(
        None,
        description="signed callback when the workflow finishes: `workflow.succeeded`, "
        "`workflow.failed` or `workflow.cancelled` (`events` filters by those statuses)",
    )


def check_graph(specs: Sequence[WorkflowJobSubmit]) -> None:
    """422 naming the problem: a ref used twice, an unknown ref, a cycle, or an option a
    job with parents cannot have."""
    index: dict[str, int] = {}
    for position, spec in enumerate(specs):
        where = f"jobs[{position}] ({spec.ref!r})"
        if spec.ref in index:
            raise errors.ValidationFailed(f"{where}: ref {spec.ref!r} is used twice")
        index[spec.ref] = position
        if len(set(spec.after)) != len(spec.after):
            raise errors.ValidationFailed(f"{where}: after names a ref twice")
        if spec.after and (spec.delay is not None or spec.run_at is not None):
            raise errors.ValidationFailed(
                f"{where}: a job with after starts when its parents "
                "finish; delay and run_at are for jobs without"
            )
        if spec.parents_arg is not None and not spec.after:
            raise errors.ValidationFailed(f"{where}: parents_arg needs after")
        if spec.unique is not None or spec.debounce is not None:
            raise errors.ValidationFailed(f"{where}: unique and debounce are for single submits")
    for position, spec in enumerate(specs):
        for ref in spec.after:
            if ref not in index:
                raise errors.ValidationFailed(
                    f"jobs[{position}] ({spec.ref!r}): after names unknown ref {ref!r}"
                )
    edges = sum(len(spec.after) for spec in specs)
    if edges > MAX_EDGES:
        raise errors.ValidationFailed(
            f"the workflow has {edges} dependencies (after entries); the limit is {MAX_EDGES}"
        )
    cycle = find_cycle({spec.ref: spec.after for spec in specs})
    if cycle:
        raise errors.ValidationFailed(f"the workflow has a cycle: {' → '.join(cycle)}")


def find_cycle(after: dict[str, list[str]]) -> list[str]:
    """A cycle of the graph (``[a, b, a]``: a after b after a), or [] if it has none.
    Iterative depth-first search: a chain of 10,000 does not hit the recursion limit."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in after:
        if state.get(start):
            continue
        path: list[str] = [start]
        stack: list[Iterator[str]] = [iter(after[start])]
        state[start] = 1
        while stack:
            parent = next(stack[-1], None)
            if parent is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(parent) == 1:
                return [*path[path.index(parent) :], parent]
            elif not state.get(parent):
                state[parent] = 1
                path.append(parent)
                stack.append(iter(after[parent]))
    return []


# --- create -------------------------------------------------------------------------------


@dataclass(slots=True)
class Created:
    id: str
    rows: list[JobValues]  # in the submitted order
    roots: list[JobValues] = field(default_factory=list)  # those without parents


def build(
    spec: WorkflowSubmit, rows: list[JobValues], now: datetime
) -> tuple[Created, dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows of a new workflow, from its jobs' rows (``jobs.new_job``, in order): the
    jobs with parents wait; the others are as submitted."""
    workflow_id = uuid7()
    ids = {job.ref: row["id"] for job, row in zip(spec.jobs, rows, strict=True)}
    created = Created(workflow_id, rows)
    members, edges = [], []
    for position, (job, row) in enumerate(zip(spec.jobs, rows, strict=True)):
        row["workflow_id"] = workflow_id
        row["parents"] = None
        if job.after:
            row["status"] = JobStatus.waiting
        else:
            created.roots.append(row)
        members.append(
            {
                "job_id": row["id"],
                "workflow_id": workflow_id,
                "ref": job.ref,
                "position": position,
                "pending_parents": len(job.after),
                "parents_arg": job.parents_arg,
                "settled": False,
            }
        )
        edges += [
            {"parent_id": ids[ref], "child_id": row["id"], "position": place}
            for place, ref in enumerate(job.after)
        ]
    flow = {
        "id": workflow_id,
        "status": WorkflowStatus.running,
        "on_failure": spec.on_failure,
        "jobs_total": len(rows),
        "unfinished": len(rows),
        "failures": 0,
        "cancel_requested": False,
        "webhook": None if spec.webhook is None else spec.webhook.model_dump(),
        "created_at": now,
        "finished_at": None,
    }
    return created, flow, members, edges


def insert(
    session: Session,
    flow: dict[str, Any],
    members: list[dict[str, Any]],
    edges: list[dict[str, Any]],
) -> None:
    """The workflow's own rows (its jobs are inserted by the caller, in the same
    transaction)."""
    session.execute(sa.insert(WORKFLOWS_TABLE), [flow])
    session.execute(sa.insert(WORKFLOW_JOBS_TABLE), members)
    if edges:
        session.execute(sa.insert(WORKFLOW_EDGES_TABLE), edges)


# --- read ---------------------------------------------------------------------------------


def read(session: Session, workflow_id: str) -> tuple[Any, list[Any]]:
    """The workflow's row and its jobs (ref, id, status, queue, result, error), in the
    submitted order; 404 if there is none."""
    if not is_job_id(workflow_id):
        raise errors.NotFound(f"no workflow has id {workflow_id!r}")
    flow = session.execute(sa.select(WORKFLOWS_TABLE).where(flows_c.id == workflow_id)).first()
    if flow is None:
        raise errors.NotFound(f"no workflow has id {workflow_id!r}")
    members = session.execute(
        sa.select(
            members_c.ref,
            jobs_c.id,
            jobs_c.status,
            jobs_c.queue,
            jobs_c.task,
            jobs_c.result,
            jobs_c.error,
            jobs_c.finished_at,
        )
        .join(JOBS_TABLE, jobs_c.id == members_c.job_id)
        .where(members_c.workflow_id == workflow_id)
        .order_by(members_c.position)
    ).all()
    return flow, list(members)


def request_cancel(session: Session, workflow_id: str) -> list[str]:
    """Mark the workflow cancelled and lock its unfinished jobs; their ids (the caller
    cancels them through the one-job rules, which call ``on_finished``)."""
    done = session.execute(
        sa.update(WORKFLOWS_TABLE)
        .where(flows_c.id == workflow_id, flows_c.status == WorkflowStatus.running)
        .values(cancel_requested=True)
    )
    if getattr(done, "rowcount", 0) != 1:
        return []
    return list(
        session.scalars(
            sa.select(members_c.job_id)
            .join(JOBS_TABLE, jobs_c.id == members_c.job_id)
            .where(members_c.workflow_id == workflow_id, jobs_c.status.not_in(FINISHED))
            .order_by(members_c.job_id)
        )
    )


# --- settle: called in the transaction that finished jobs of a workflow -------------------


@dataclass(slots=True)
class _Tally:
    """What one transaction finished of each workflow."""

    finished: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    failures: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    last_job: dict[str, str] = field(default_factory=dict)  # what a webhook names

    def add(self, workflow_id: str, job_id: str, status: str) -> None:
        self.finished[workflow_id] += 1
        self.last_job[workflow_id] = job_id
        if status != JobStatus.succeeded:
            self.failures[workflow_id] += 1


def on_finished(
    session: Session, changes: Iterable[JobValues], now: datetime, effects: Effects | None
) -> None:
    """Settle what hangs off the jobs in ``changes`` (dicts with id, status, workflow_id,
    already written) that reached a final status: each job is counted once, even if it
    is retried by hand and finishes again."""
    statuses = {
        change["id"]: str(change["status"])
        for change in changes
        if change.get("workflow_id") is not None and change["status"] in FINISHED
    }
    if not statuses:
        return
    effects = Effects() if effects is None else effects
    counted = _first_finishes(session, list(statuses))
    if not counted:
        return
    tally = _Tally()
    releasing, failing = [], []
    for job_id, (workflow_id, ref, policy) in counted.items():
        status = statuses[job_id]
        tally.add(workflow_id, job_id, status)
        if status == JobStatus.succeeded or policy == CONTINUE:
            releasing.append(job_id)
        else:
            failing.append((job_id, ref, status))
    if failing:
        _cancel_downstream(session, failing, now, effects, tally)
    if releasing:
        _release_children(session, releasing, effects)
    effects.deliveries += _count(session, tally, now)


def on_set_aside(session: Session, job_id: str, now: datetime, effects: Effects) -> None:
    """``on_finished`` for a job maintenance failed as unprocessable (leases.set_aside)."""
    workflow_id = session.scalar(sa.select(jobs_c.workflow_id).where(jobs_c.id == job_id))
    if workflow_id is not None:
        change: JobValues = {"id": job_id, "status": JobStatus.failed, "workflow_id": workflow_id}
        on_finished(session, [change], now, effects)


def _first_finishes(session: Session, ids: list[str]) -> dict[str, tuple[str, str, str]]:
    """Of ``ids``, the jobs finishing for the first time, marked as counted: id →
    (workflow, ref, its on_failure). Their rows are locked by the caller's settle."""
    counted: dict[str, tuple[str, str, str]] = {}
    for chunk in _chunks(ids):
        for job_id, workflow_id, ref, policy in session.execute(
            sa.select(members_c.job_id, members_c.workflow_id, members_c.ref, flows_c.on_failure)
            .join(WORKFLOWS_TABLE, flows_c.id == members_c.workflow_id)
            .where(members_c.job_id.in_(chunk), members_c.settled.is_(False))
        ):
            counted[job_id] = (workflow_id, ref, policy)
    for chunk in _chunks(sorted(counted)):
        session.execute(
            sa.update(WORKFLOW_JOBS_TABLE).where(members_c.job_id.in_(chunk)).values(settled=True)
        )
    return counted


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]


_DECREMENT = (
    sa.update(WORKFLOW_JOBS_TABLE)
    .where(members_c.job_id == sa.bindparam("child"))
    .values(pending_parents=members_c.pending_parents - sa.bindparam("n", type_=sa.Integer()))
)
_QUEUE = (
    sa.update(JOBS_TABLE)
    .where(jobs_c.id == sa.bindparam("job"), jobs_c.status == JobStatus.waiting)
    .values(
        status=JobStatus.queued,
        args=sa.bindparam("new_args", type_=jobs_c.args.type),
        parents=sa.bindparam("inputs", type_=jobs_c.parents.type),
    )
)


def _release_children(session: Session, parents: list[str], effects: Effects) -> None:
    """One less pending parent for each child of ``parents``; the children that reach 0
    (and still wait: not cancelled meanwhile) are queued with their parents' results.
    The UPDATE's row lock orders two transactions settling parents of one child: only
    the later one sees 0."""
    counts: dict[str, int] = defaultdict(int)
    for chunk in _chunks(parents):
        for child, n in session.execute(
            sa.select(edges_c.child_id, sa.func.count())
            .where(edges_c.parent_id.in_(chunk))
            .group_by(edges_c.child_id)
        ):
            counts[child] += n
    if not counts:
        return
    children = sorted(counts)  # one lock order for every transaction: no deadlock
    session.execute(_DECREMENT, [{"child": c, "n": counts[c]} for c in children])
    ready: list[Any] = []
    for chunk in _chunks(children):
        ready += session.execute(
            sa.select(
                members_c.job_id, members_c.parents_arg, jobs_c.queue, jobs_c.priority, jobs_c.args
            )
            .join(JOBS_TABLE, jobs_c.id == members_c.job_id)
            .where(
                members_c.job_id.in_(chunk),
                members_c.pending_parents <= 0,
                jobs_c.status == JobStatus.waiting,
            )
        ).all()
    if ready:
        inputs = _parents_of(session, [row.job_id for row in ready])
        session.execute(_QUEUE, [_queued(row, inputs[row.job_id]) for row in ready])
        effects.dispatch += [Dispatch(row.job_id, row.queue, row.priority) for row in ready]


def _parents_of(session: Session, children: list[str]) -> dict[str, list[Any]]:
    """Each child's parents (ref, status, result), in its ``after`` order."""
    found: dict[str, list[Any]] = defaultdict(list)
    for chunk in _chunks(children):
        for row in session.execute(
            sa.select(edges_c.child_id, members_c.ref, jobs_c.status, jobs_c.result)
            .join(WORKFLOW_JOBS_TABLE, members_c.job_id == edges_c.parent_id)
            .join(JOBS_TABLE, jobs_c.id == edges_c.parent_id)
            .where(edges_c.child_id.in_(chunk))
            .order_by(edges_c.child_id, edges_c.position)
        ):
            found[row.child_id].append(row)
    return found


def _queued(row: Any, parents: list[Any]) -> dict[str, Any]:
    """The values that queue a released child: what its lease adds (``parents``,
    ``parent_status``), and its args with the parents' results first if it asked."""
    results = [parent.result for parent in parents]
    args = list(row.args or [])
    if row.parents_arg == "one":
        args = [results[0] if len(results) == 1 else results, *args]
    elif row.parents_arg == "list":
        args = [results, *args]
    inputs = {
        "parents": {parent.ref: parent.result for parent in parents},
        "parent_status": {parent.ref: parent.status for parent in parents},
    }
    return {"job": row.job_id, "new_args": args, "inputs": inputs}


def _cancel_downstream(
    session: Session,
    failing: list[tuple[str, str, str]],
    now: datetime,
    effects: Effects,
    tally: _Tally,
) -> None:
    """Cancel every job downstream of the ``failing`` (id, ref, status), breadth first
    in bounded batches, each with an error naming the job upstream that did not
    succeed. Only waiting jobs: a job downstream of a failure can be nothing else."""
    frontier: deque[tuple[str, dict[str, Any]]] = deque()
    for job_id, ref, status in failing:
        error = {
            "type": "ParentFailed",
            "message": f"job {ref!r} ({job_id}) upstream of "
            f"this one is {status}; on_failure is cancel_dependents",
        }
        frontier.append((job_id, error))
    while frontier:
        batch = [frontier.popleft() for _ in range(min(CHUNK, len(frontier)))]
        errors_of = dict(batch)
        children: dict[str, dict[str, Any]] = {}
        for child, parent in session.execute(
            sa.select(edges_c.child_id, edges_c.parent_id).where(
                edges_c.parent_id.in_(list(errors_of))
            )
        ):
            children.setdefault(child, errors_of[parent])
        for chunk in _chunks(sorted(children)):
            for job_id, error in _cancel_waiting(session, chunk, children, now, effects, tally):
                frontier.append((job_id, error))


def _cancel_waiting(
    session: Session,
    ids: Sequence[str],
    errors_of: dict[str, dict[str, Any]],
    now: datetime,
    effects: Effects,
    tally: _Tally,
) -> list[tuple[str, dict[str, Any]]]:
    rows = session.execute(
        sa.select(
            jobs_c.id, jobs_c.queue, jobs_c.task, jobs_c.attempt, jobs_c.webhook, jobs_c.workflow_id
        )
        .where(jobs_c.id.in_(ids), jobs_c.status == JobStatus.waiting)
        .order_by(jobs_c.id)
        .with_for_update()
    ).all()
    if not rows:
        return []
    changes: list[JobValues] = [
        {
            "id": r.id,
            "status": JobStatus.cancelled,
            "finished_at": now,
            "error": errors_of[r.id],
            "webhook": r.webhook,
        }
        for r in rows
    ]
    update_each(session, ("status", "finished_at", "error"), changes)
    session.execute(
        sa.update(WORKFLOW_JOBS_TABLE)
        .where(members_c.job_id.in_([r.id for r in rows]))
        .values(settled=True)
    )
    record_finished(session, changes, now, effects)  # their webhooks
    effects.finished += [r.id for r in rows]
    effects.ended += [
        Ended(r.id, r.queue, r.task, JobStatus.cancelled, r.attempt, ended_at=now) for r in rows
    ]
    for r in rows:
        tally.add(r.workflow_id, r.id, JobStatus.cancelled)
    return [(r.id, errors_of[r.id]) for r in rows]


_COUNT = (
    sa.update(WORKFLOWS_TABLE)
    .where(flows_c.id == sa.bindparam("flow"))
    .values(
        unfinished=flows_c.unfinished - sa.bindparam("n", type_=sa.Integer()),
        failures=flows_c.failures + sa.bindparam("f", type_=sa.Integer()),
    )
)
_FINISH = (
    sa.update(WORKFLOWS_TABLE)
    .where(flows_c.id == sa.bindparam("flow"), flows_c.status == WorkflowStatus.running)
    .values(
        status=sa.bindparam("final"), finished_at=sa.bindparam("at", type_=flows_c.finished_at.type)
    )
)


def _count(session: Session, tally: _Tally, now: datetime) -> int:
    """Count the finished jobs against their workflows (one row each, updated last and
    in id order); a workflow whose last job finished gets its final status, and its
    webhook a delivery in the outbox. The number of deliveries written."""
    flows = sorted(tally.finished)
    session.execute(
        _COUNT,
        [{"flow": f, "n": tally.finished[f], "f": tally.failures.get(f, 0)} for f in flows],
    )
    done = session.execute(
        sa.select(flows_c.id, flows_c.failures, flows_c.cancel_requested, flows_c.webhook).where(
            flows_c.id.in_(flows),
            flows_c.unfinished <= 0,
            flows_c.status == WorkflowStatus.running,
        )
    ).all()
    if not done:
        return 0
    finals = {row.id: _final(row) for row in done}
    session.execute(
        _FINISH, [{"flow": f, "final": final, "at": now} for f, final in finals.items()]
    )
    deliveries = [
        _delivery(tally.last_job[row.id], finals[row.id], row.webhook, now)
        for row in done
        if isinstance(row.webhook, dict) and finals[row.id] in row.webhook.get("events", ())
    ]
    if deliveries:
        session.execute(sa.insert(DELIVERIES_TABLE), deliveries)
    return len(deliveries)


def _delivery(job_id: str, status: str, hook: dict[str, Any], now: datetime) -> dict[str, Any]:
    """A ``workflow.<status>`` row of the webhook outbox (service/webhooks.py). It names
    the job whose settle finished the workflow (the outbox's rows hang off a job); the
    payload carries the workflow's id (service/webhook_delivery.py)."""
    url, refused = storable_url(hook.get("url"))
    return {
        "id": uuid7(),
        "job_id": job_id,
        "event": f"workflow.{status}",
        "url": url,
        "status": PENDING if refused is None else FAILED,
        "attempts": 0,
        "next_attempt_at": now if refused is None else None,
        "last_status_code": None,
        "last_error": refused,
        "created_at": now,
        "updated_at": now,
    }


def _final(row: Any) -> str:
    if row.cancel_requested:
        return WorkflowStatus.cancelled
    return WorkflowStatus.failed if row.failures else WorkflowStatus.succeeded
