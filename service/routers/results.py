"""A job's result on its own: JSON, streamed from the result store when it lives there."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response, StreamingResponse

from service import jobs, results
from service.routers.deps import get_runtime, require
from service.routers.jobs import PROBLEMS
from service.runtime import Runtime
from service.schemas import Problem

router = APIRouter(tags=["jobs"])
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
RESULT_RESPONSES: dict[int | str, dict[str, Any]] = {
    **PROBLEMS,
    200: {"content": {"application/json": {"schema": {}}}, "description": "the result's JSON"},
    410: {"model": Problem, "content": {"application/problem+json": {}}},
}


@router.get(
    "/jobs/{job_id}/result",
    response_class=Response,
    responses=RESULT_RESPONSES,
    dependencies=[Depends(require("read"))],
    summary="A succeeded job's result (410 once it expired)",
)
async def get_result(job_id: str, runtime: RuntimeDep) -> Response:
    row = await runtime.db.read(lambda session: jobs.get_job(session, job_id))
    found = await results.open_result(runtime, row)
    headers = {"content-length": str(found.size)}
    if found.chunks is not None:
        return StreamingResponse(found.chunks, media_type="application/json", headers=headers)
    return Response(found.data, media_type="application/json", headers=headers)
