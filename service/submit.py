"""Submitting jobs (``POST /jobs``, ``POST /jobs/batch``): check, build the rows, store
them, then publish. The routers parse and render; everything between is here."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import errors, jobs
from service.auth import Principal
from service.isolation import refusing_unstorable
from service.models import JobValues, values_of
from service.runtime import Runtime
from service.schemas import JobSubmit


@dataclass(frozen=True, slots=True)
class Submitted:
    row: JobValues
    # An earlier request with the same idempotency key stored this row (200, not 202).
    replayed: bool = False


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
    if idempotency_key is None:
        await runtime.submits.submit(row)
        return Submitted(row)
    key = jobs.scoped_idempotency_key(principal.key_id, idempotency_key)
    return await submit_idempotent(runtime, row, key, spec)


async def submit_idempotent(
    runtime: Runtime, row: JobValues, key: str, spec: JobSubmit
) -> Submitted:
    """Store ``row`` under ``key`` unless a live job holds the key: that job is replayed
    (or the request refused, when its body differs)."""
    body_hash = jobs.request_hash(spec)
    row.update(idempotency_key=key, request_hash=body_hash)
    ttl = runtime.settings.idempotency_ttl_seconds

    def work(session: Session) -> Submitted:
        existing = jobs.find_by_idempotency_key(session, key, row["created_at"], ttl)
        if existing is not None:
            return Submitted(values_of(jobs.replay_or_reject(existing, body_hash)), True)
        jobs.insert_jobs(session, [row])
        return Submitted(row)

    with refusing_unstorable():  # a value the database refuses: 422, not 500 (issue 12)
        try:
            submitted = await runtime.db.run(work)
        except IntegrityError:  # a concurrent request with the same key won the insert
            submitted = await runtime.db.run(work)
    if not submitted.replayed:
        await runtime.after_submit([submitted.row])
    return submitted


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
