"""Operations: queue statistics, liveness and readiness."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from service import jobs
from service.routers.deps import get_runtime, require
from service.runtime import Runtime
from service.schemas import Health, QueueList

router = APIRouter(tags=["operations"])
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
log = logging.getLogger("celeriac.ready")


@router.get("/queues", response_model=QueueList, dependencies=[Depends(require("read"))])
async def list_queues(runtime: RuntimeDep) -> JSONResponse:
    now = runtime.clock.now()
    stats = await runtime.db.read(jobs.queue_stats)
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
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        await runtime.broker.ping()
        checks["broker"] = "ok"
    except Exception as exc:  # readiness reports any failure; it must not raise
        log.warning("broker not ready: %s", type(exc).__name__)
        checks["broker"] = f"unavailable: {type(exc).__name__}"
    try:
        await runtime.db.read(lambda session: session.connection().exec_driver_sql("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        log.warning("database not ready: %s", type(exc).__name__)
        checks["database"] = f"unavailable: {type(exc).__name__}"
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks},
        status_code=200 if ready else 503,
    )
