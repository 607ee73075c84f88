"""A job's result on its own: JSON, streamed from the result store when it lives there."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response, StreamingResponse

from service import jobs, results
from service.auth import Principal
from service.routers.deps import GuardedRoute, get_principal, get_runtime, require
from service.routers.problems import PROBLEMS, problem_responses
from service.runtime import Runtime

router = APIRouter(route_class=GuardedRoute, tags=["jobs"])
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
RESULT_RESPONSES: dict[int | str, dict[str, Any]] = {
    **PROBLEMS,
    200: {"content": {"application/json": {"schema": {}}}, "description": "the result's JSON"},
    **problem_responses(410),
}


@router.get(
    "/jobs/{job_id}/result",
    response_class=Response,
    responses=RESULT_RESPONSES,
    dependencies=[Depends(require("read"))],
    summary="A succeeded job's result (410 once it expired)",
)
async def get_result(
    job_id: str, runtime: RuntimeDep, principal: Annotated[Principal, Depends(get_principal)]
) -> Response:
    # Another tenant's job is not found (docs/security.md).
    row = await runtime.db.read(lambda session: jobs.get_job(session, job_id, visible_to=principal))
    found = await results.open_result(runtime, row)
    headers = {"content-length": str(found.size)}
    if found.chunks is not None:
        return StreamingResponse(found.chunks, media_type="application/json", headers=headers)
    return Response(found.data, media_type="application/json", headers=headers)
