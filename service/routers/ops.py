"""Operations: queue statistics, liveness and readiness."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from sqlalchemy.orm import Session

from service import jobs
from service.auth import Principal
from service.routers.deps import GuardedRoute, get_principal, get_runtime, require
from service.routers.problems import GATE
from service.runtime import Runtime
from service.schemas import Health, QueueList
from service.serialize import JSONResponse

router = APIRouter(route_class=GuardedRoute, tags=["operations"])
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
READY_TIMEOUT_SECONDS = 2.0


@router.get(
    "/queues", response_model=QueueList, responses=GATE, dependencies=[Depends(require("read"))]
)
async def list_queues(
    runtime: RuntimeDep, principal: Annotated[Principal, Depends(get_principal)]
) -> JSONResponse:
    now = runtime.clock.now()
    # Only the queues the caller's key may use (docs/security.md).
    stats = await runtime.db.read(lambda session: jobs.queue_stats(session, principal))
    return JSONResponse(
        {
            "queues": [
                {
                    "name": s["name"],
                    "counts": s["counts"],
                    "oldest_queued_age_seconds": None
                    if s["oldest_queued_at"] is None
                    else max((now - s["oldest_queued_at"]).total_seconds(), 0.0),
                }
                for s in stats
            ]
        }
    )


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok", "checks": {}})


@router.get(
    "/readyz",
    response_model=Health,
    responses={503: {"model": Health}},
    summary="Readiness: SQL and the broker answer",
)
async def readyz(request: Request) -> JSONResponse:
    # Not RuntimeDep: that answers a problem while the service starts; this reports why.
    runtime: Runtime = request.app.state.runtime
    database, broker = await asyncio.gather(
        _probe(runtime.db.read(_select_one)),
        _probe(runtime.broker.ping()) if runtime.started else _waiting(),
    )
    if runtime.startup_problem is not None and database == "ok":  # answers, cannot serve
        database = f"unavailable: {runtime.startup_problem}"
    checks = {"database": database, "broker": broker}
    ready = runtime.started and database == broker == "ok"
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks},
        status_code=200 if ready else 503,
    )


def _select_one(session: Session) -> object:
    return session.connection().exec_driver_sql("SELECT 1").scalar()


async def _waiting() -> str:
    return "starting: waiting for the database and the broker"


async def _probe(check: Awaitable[object]) -> str:
    """One check, given ``READY_TIMEOUT_SECONDS``: a database that does not answer makes
    the service unready at once, instead of holding the probe (and a thread) until the
    kubelet gives up. Not logged: an outage is logged once, by service/outage.py."""
    task = asyncio.ensure_future(check)
    # Not wait_for: it waits for the cancellation, which a thread cannot honour.
    done, _ = await asyncio.wait({task}, timeout=READY_TIMEOUT_SECONDS)
    if not done:
        task.cancel()
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved
        return f"unavailable: no answer within {READY_TIMEOUT_SECONDS}s"
    exc = task.exception()
    return "ok" if exc is None else f"unavailable: {type(exc).__name__}"
