"""Submitting jobs (``POST /jobs``, ``POST /jobs/batch``): check, build the rows, store
them, then publish. The routers parse and render; everything between is here."""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import partial
from typing import Any

from sqlalchemy.orm import Session

from service import bulk, errors, flow, jobs, waiting
from service.auth import Principal
from service.effects import Effects
from service.idempotency import Submitted
from service.ids import uuid7s
from service.isolation import refusing_unstorable
from service.models import JobValues
from service.pg_direct import Refused
from service.runtime import Runtime, submitted_effects
from service.schemas import JobSubmit
from service.waiting import Waited


def check_payload(limit: int, request_length: int | None, what: str, *values: Any) -> None:
    """Enforce the per-job (or per-result) JSON size limit. The request's own length is
    an upper bound, so the common small request costs no extra serialisation."""
    if request_length is not None and request_length <= limit:
        return
    size = sum(len(json.dumps(v, separators=(",", ":"))) for v in values)
    if size > limit:
        raise errors.PayloadTooLarge(
            f"{what} is {size} bytes of JSON; the limit is {limit} "
            "(CELERIAC_MAX_PAYLOAD_BYTES). Store large inputs elsewhere and pass a reference."
        )


async def submit_one(
    runtime: Runtime,
    principal: Principal,
    spec: JobSubmit,
    idempotency_key: str | None,
    request_length: int | None,
    traceparent: str | None = None,
) -> Submitted:
    """One job; with an idempotency key, the job an earlier identical request stored.
    ``traceparent``: the caller's W3C trace context (service/tracing.py)."""
    with runtime.tracing.submit(traceparent, jobs=1) as stored:
        row = _new_row(runtime, principal, spec, idempotency_key, request_length)
        row["traceparent"] = stored
        return await flow.store(runtime, row, spec)  # unique/debounce: their own transaction


def _new_row(
    runtime: Runtime,
    principal: Principal,
    spec: JobSubmit,
    idempotency_key: str | None,
    request_length: int | None,
) -> JobValues:
    principal.check_queue(spec.queue)
    limit = runtime.settings.max_payload_bytes
    check_payload(limit, request_length, "args and kwargs", spec.args, spec.kwargs)
    row = jobs.new_job(spec, runtime.clock.now(), runtime.defaults)
    if idempotency_key is not None:  # stored in the same group commit as unkeyed jobs
        key = jobs.scoped_idempotency_key(principal.key_id, idempotency_key)
        row.update({"idempotency_key": key, "request_hash": jobs.request_hash(spec)})
    return row


async def submit_and_wait(
    runtime: Runtime,
    principal: Principal,
    spec: JobSubmit,
    idempotency_key: str | None,
    request_length: int | None,
    wait: float,
    traceparent: str | None = None,
) -> tuple[Submitted, Waited]:
    """``POST /jobs?wait=S``, for callers that want the result in one call: the job is
    committed exactly as by ``submit_one`` (a replay included), then the request waits as
    ``GET /jobs/{id}?wait=S`` does. Over a long-poll cap the job is still committed and
    answered at once (``Waited.refused``): the submit itself is never refused."""
    row = _new_row(runtime, principal, spec, idempotency_key, request_length)
    # Waiting on the new id before its commit: the row as inserted is then the job's
    # state at the start of the wait (no read back), and no finish can slip in between.
    waiter = runtime.signals.finished_waiter(row["id"])
    try:
        with runtime.tracing.submit(traceparent, jobs=1) as stored:
            row["traceparent"] = stored
            done = await flow.store(runtime, row, spec)
    except BaseException:
        runtime.signals.drop_finished_waiter(row["id"], waiter)
        raise
    if done.replayed or done.row["id"] != row["id"]:
        # An earlier job (a replay, a unique or debounced submit): read it as
        # GET /jobs/{id}?wait= would.
        runtime.signals.drop_finished_waiter(row["id"], waiter)
        return done, await waiting.wait_admitted(runtime, principal, done.row["id"], wait)
    found = await waiting.wait_admitted(
        runtime, principal, row["id"], wait, waiter=waiter, known=done.row
    )
    return done, found


async def submit_batch(
    runtime: Runtime,
    principal: Principal,
    specs: Sequence[JobSubmit],
    request_length: int | None,
    traceparent: str | None = None,
) -> list[JobValues]:
    """Up to ``max_batch_jobs`` jobs in one transaction: all stored, or none."""
    with runtime.tracing.submit(traceparent, jobs=len(specs)) as stored:
        return await _submit_batch(runtime, principal, specs, request_length, stored)


async def _submit_batch(
    runtime: Runtime,
    principal: Principal,
    specs: Sequence[JobSubmit],
    request_length: int | None,
    traceparent: str | None,
) -> list[JobValues]:
    limit = runtime.settings.max_batch_jobs
    if len(specs) > limit:
        raise errors.PayloadTooLarge(
            f"the batch has {len(specs)} jobs; the limit is {limit} "
            "(CELERIAC_MAX_BATCH_JOBS). Split it into several requests."
        )
    jobs.check_queues(principal, (spec.queue for spec in specs))
    flow.refuse_keyed_in_batch(specs)
    rows = _batch_rows(runtime, specs, request_length)
    if traceparent is not None:
        for row in rows:
            row["traceparent"] = traceparent
    with refusing_unstorable("a job of the batch"):  # 422, not 500 (issue 12)
        effects = await _store_batch_direct(runtime, rows)
        if effects is None:
            effects = await runtime.db.run(partial(_store_batch, runtime, rows=rows))
    # Published before the answer (as a batch always was): the 202 means leasable too.
    await runtime.after_submit(rows, effects)
    return rows


def _store_batch(runtime: Runtime, session: Session, rows: list[JobValues]) -> Effects:
    """The batch's one transaction: its rows, and the broker's part that rides the commit
    (on PostgreSQL the SQL broker's NOTIFY)."""
    jobs.insert_jobs(session, rows)
    return runtime.announce_submitted(session, rows)


async def _store_batch_direct(runtime: Runtime, rows: list[JobValues]) -> Effects | None:
    """``_store_batch`` as one statement from the event loop on PostgreSQL, the broker's
    NOTIFY in its implicit transaction (service/pg_direct.py); None if it did not commit
    (a row the database refuses: the pool's path stores the batch again and says which)."""
    direct = runtime.direct
    if direct is None:
        return None
    columns = tuple(rows[0])
    read, statement = bulk.recordset_insert(columns)
    compiled = direct.compiled(("insert jobs", columns), lambda: statement)
    try:
        values = {"rows": read.rows_json(rows)}
    except (ValueError, TypeError, OverflowError):  # a date past 9999 once moved to UTC
        return None
    effects = submitted_effects(rows)
    notices = runtime.broker.commit_notices(effects)
    try:
        await direct.fetch(compiled, values, notices)
    except Refused:
        return None
    return effects


def _batch_rows(
    runtime: Runtime, specs: Sequence[JobSubmit], request_length: int | None
) -> list[JobValues]:
    """The rows of a batch; a problem names the job it is about (``jobs[3]: …``)."""
    now, limit = runtime.clock.now(), runtime.settings.max_payload_bytes
    rows = []
    for index, (spec, job_id) in enumerate(zip(specs, uuid7s(len(specs)), strict=True)):
        try:
            what = f"jobs[{index}] args and kwargs"
            check_payload(limit, request_length, what, spec.args, spec.kwargs)
            rows.append(jobs.new_job(spec, now, runtime.defaults, job_id))
        except errors.ProblemError as exc:
            exc.detail = f"jobs[{index}]: {exc.detail}"
            raise
    return rows
