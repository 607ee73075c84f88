"""Submitting jobs (``POST /jobs``, ``POST /jobs/batch``): check, build the rows, store
them, then publish. The routers parse and render; everything between is here."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from service import errors, jobs, waiting
from service.auth import Principal
from service.idempotency import Submitted
from service.isolation import refusing_unstorable
from service.models import JobValues
from service.runtime import Runtime
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
) -> Submitted:
    """One job; with an idempotency key, the job an earlier identical request stored."""
    principal.check_queue(spec.queue)
    limit = runtime.settings.max_payload_bytes
    check_payload(limit, request_length, "args and kwargs", spec.args, spec.kwargs)
    row = jobs.new_job(spec, runtime.clock.now(), runtime.defaults)
    if idempotency_key is not None:  # stored in the same group commit as unkeyed jobs
        key = jobs.scoped_idempotency_key(principal.key_id, idempotency_key)
        row.update({"idempotency_key": key, "request_hash": jobs.request_hash(spec)})
    return await runtime.submits.submit(row)


async def submit_and_wait(
    runtime: Runtime,
    principal: Principal,
    spec: JobSubmit,
    idempotency_key: str | None,
    request_length: int | None,
    wait: float,
) -> tuple[Submitted, Waited]:
    """``POST /jobs?wait=S``, for callers that want the result in one call: the job is
    committed exactly as by ``submit_one`` (a replay included), then the request waits as
    ``GET /jobs/{id}?wait=S`` does. Over a long-poll cap the job is still committed and
    answered at once (``Waited.refused``): the submit itself is never refused."""
    done = await submit_one(runtime, principal, spec, idempotency_key, request_length)
    return done, await waiting.wait_admitted(runtime, principal, done.row["id"], wait)


async def submit_batch(
    runtime: Runtime, principal: Principal, specs: Sequence[JobSubmit], request_length: int | None
) -> list[JobValues]:
    """Up to ``max_batch_jobs`` jobs in one transaction: all stored, or none."""
    limit = runtime.settings.max_batch_jobs
    if len(specs) > limit:
        raise errors.PayloadTooLarge(
            f"the batch has {len(specs)} jobs; the limit is {limit} "
            "(CELERIAC_MAX_BATCH_JOBS). Split it into several requests."
        )
    jobs.check_queues(principal, (spec.queue for spec in specs))
    rows = _batch_rows(runtime, specs, request_length)
    with refusing_unstorable("a job of the batch"):  # 422, not 500 (issue 12)
        await runtime.db.run(lambda session: jobs.insert_jobs(session, rows))
    await runtime.after_submit(rows)
    return rows


def _batch_rows(
    runtime: Runtime, specs: Sequence[JobSubmit], request_length: int | None
) -> list[JobValues]:
    """The rows of a batch; a problem names the job it is about (``jobs[3]: …``)."""
    now, limit = runtime.clock.now(), runtime.settings.max_payload_bytes
    rows = []
    for index, spec in enumerate(specs):
        try:
            what = f"jobs[{index}] args and kwargs"
            check_payload(limit, request_length, what, spec.args, spec.kwargs)
            rows.append(jobs.new_job(spec, now, runtime.defaults))
        except errors.ProblemError as exc:
            exc.detail = f"jobs[{index}]: {exc.detail}"
            raise
    return rows
