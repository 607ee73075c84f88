"""The worker protocol's requests for leases: lease (a long-poll that may outlive its
client), claim by id, and heartbeats. Granting itself is ``service.dispatch``'s."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from service import errors, flow, flow_redis
from service.auth import Principal
from service.leases import HeartbeatOutcome, LeaseTerms, Settle, claim_by_ids, heartbeat, new_token
from service.models import JobValues
from service.reports import raise_problem, settle_many
from service.runtime import Runtime
from service.schemas import Heartbeat, LeaseClaim, LeaseRequest
from service.states import Outcome


class Client(Protocol):
    """The caller of a long-poll, as far as the domain cares: whether it is still there."""

    async def gone(self) -> None:
        """Return when the client has closed its connection."""

    async def is_gone(self) -> bool:
        """Whether it has, without waiting."""


@dataclass(frozen=True, slots=True)
class Leased:
    rows: list[JobValues]
    # Refused a wait (a long-poll cap) and found nothing: come back later, not at once.
    refused: bool = False


def terms(runtime: Runtime, worker: str, lease_seconds: float | None, key_id: str) -> LeaseTerms:
    settings = runtime.settings
    if lease_seconds is not None and lease_seconds > settings.max_lease_seconds:
        raise errors.ValidationFailed(
            f"lease_seconds may be at most {settings.max_lease_seconds:g} "
            "(CELERIAC_MAX_LEASE_SECONDS)"
        )
    return LeaseTerms(
        worker=worker,
        token=new_token(),
        now=runtime.clock.now(),
        lease_seconds=lease_seconds,
        default_seconds=settings.default_lease_seconds,
        key_id=key_id,
        slot_arbiter=flow_redis.arbiter(runtime.broker),  # Redis workers share the limits
    )


def check(runtime: Runtime, principal: Principal, body: LeaseRequest) -> list[str]:
    """The request's queues, once its limits and the caller's queues are checked."""
    settings = runtime.settings
    if body.max_jobs > settings.max_lease_jobs:
        raise errors.ValidationFailed(f"max_jobs may be at most {settings.max_lease_jobs}")
    if body.wait > settings.max_lease_wait_seconds:
        raise errors.ValidationFailed(
            f"wait may be at most {settings.max_lease_wait_seconds:g} seconds"
        )
    terms(runtime, body.worker, body.lease_seconds, principal.key_id)  # validate before waiting
    queues = list(dict.fromkeys(body.queues))
    for name in queues:
        principal.check_queue(name)
    return queues


async def lease(
    runtime: Runtime, principal: Principal, body: LeaseRequest, client: Client
) -> Leased:
    """``POST /leases``: up to ``max_jobs`` jobs, waiting up to ``wait`` seconds for one.
    Jobs granted to a client that has gone are handed straight back."""
    queues = check(runtime, principal, body)
    key_id = principal.key_id
    # Over a long-poll cap (service/longpoll.py) the request does not wait, but still
    # makes one attempt, so a busy service keeps handing out ready work.
    admitted = body.wait > 0 and runtime.long_polls.try_enter(key_id)
    attempted_ns = [0]  # when the attempt that granted began (the lease spans' start)

    def lease_terms() -> LeaseTerms:
        attempted_ns[0] = time.time_ns()
        return terms(runtime, body.worker, body.lease_seconds, key_id)

    granting = asyncio.ensure_future(
        flow.lease_unpaused(  # the dispatcher's lease, minus paused queues
            runtime,
            queues,
            body.max_jobs,
            body.wait if admitted else 0.0,
            lease_terms,
            lambda rows: _release(runtime, rows, key_id),
        )
    )
    if admitted:  # a long-poll: it may outlive its client
        # Its slot is held until the broker's wait ends, even when the client has gone:
        # an abandoned wait still costs what the cap bounds.
        granting.add_done_callback(lambda _: runtime.long_polls.leave(key_id))
        if not await _outlived(runtime, granting, client, key_id):
            return Leased([])
    rows = await granting
    if rows and await client.is_gone():
        # Gone just as jobs were granted: the same, hand them back rather than leave
        # them leased to nobody until the deadline.
        await _release(runtime, rows, key_id)
        rows = []
    runtime.observer.leased(rows)
    worker = {"celeriac.worker": body.worker}
    runtime.tracing.record("celeriac lease", rows, attempted_ns[0], worker)
    return Leased(rows, refused=body.wait > 0 and not admitted and not rows)


async def _outlived(
    runtime: Runtime, granting: asyncio.Task[list[JobValues]], client: Client, key_id: str
) -> bool:
    """Wait for the lease or the client's departure; False if the client left first."""
    gone = asyncio.ensure_future(client.gone())
    await asyncio.wait({granting, gone}, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if granting.done():
        return True
    # The worker gave up on this long-poll (it died, or stopped): end the request now
    # rather than hold it (and a stopping service) until the wait runs out. The lease is
    # not cancelled, as it may be claiming rows this very moment: whatever it claims is
    # handed straight back.
    runtime.spawn(_release_when_done(runtime, granting, key_id), name="celeriac-abandoned-lease")
    return False


async def _release(runtime: Runtime, rows: list[JobValues], key_id: str) -> None:
    reports = [Settle(row["id"], row["lease_token"] or "", Outcome.released) for row in rows]
    await settle_many(runtime, reports, key_id)


async def _release_when_done(
    runtime: Runtime, granting: asyncio.Future[list[JobValues]], key_id: str
) -> None:
    if rows := await granting:
        await _release(runtime, rows, key_id)


async def claim(runtime: Runtime, principal: Principal, body: LeaseClaim) -> list[JobValues]:
    """``POST /leases/claim``: the jobs among ``ids`` still queued, in the caller's queues,
    leased exactly as ``POST /leases`` does; the others are left out, never an error."""
    if len(body.ids) > runtime.settings.max_lease_jobs:
        raise errors.ValidationFailed(f"ids may hold at most {runtime.settings.max_lease_jobs}")
    granted = terms(runtime, body.worker, body.lease_seconds, principal.key_id)
    ids = list(dict.fromkeys(body.ids))
    allows = None if principal.queues is None else principal.allows_queue
    rows = await runtime.db.run(
        lambda session: claim_by_ids(session, ids, granted, allows),
        rows=len(ids),
    )
    runtime.observer.leased(rows)
    return rows


async def extend(
    runtime: Runtime,
    items: Sequence[tuple[str, str, Any]],
    lease_seconds: float | None,
    key_id: str,
) -> list[HeartbeatOutcome]:
    """Heartbeats: extend leases (and store progress). items: (job id, token, progress)."""
    extended = terms(runtime, "", lease_seconds, key_id)
    outcomes = await runtime.db.run(
        lambda session: heartbeat(session, items, extended), rows=len(items)
    )
    with_progress = {job_id for job_id, _token, progress in items if progress is not None}
    if with_progress:  # GET /events
        stored = [o.id for o in outcomes if o.id in with_progress and o.problem is None]
        runtime.observer.progressed(stored)
    return outcomes


async def extend_one(
    runtime: Runtime, job_id: str, body: Heartbeat, key_id: str
) -> HeartbeatOutcome:
    """One heartbeat; a stale or unknown lease is its problem (409, 404)."""
    items = [(job_id, body.token, body.progress)]
    [outcome] = await extend(runtime, items, body.lease_seconds, key_id)
    raise_problem(job_id, outcome.problem)
    return outcome
