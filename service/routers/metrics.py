"""``GET /metrics``: the Prometheus text format (docs/operations.md, Metrics)."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import errors
from service.auth import Principal
from service.metrics import Metrics, key_matches
from service.routers.deps import GuardedRoute, get_principal, get_runtime
from service.routers.problems import GATE_STATUSES, problem_responses
from service.runtime import Runtime

router = APIRouter(route_class=GuardedRoute, tags=["operations"])
log = logging.getLogger("celeriac.service")

EXPOSITION: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Prometheus text exposition format 0.0.4",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}


def _presented(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value:
        return value.strip()
    return request.headers.get("x-api-key")


def _check_access(request: Request, runtime: Runtime, principal: Principal) -> None:
    """A key with the read scope, or the metrics key (the route itself is public to the
    gate, which knows nothing of the metrics key)."""
    settings = runtime.settings
    # The metrics name every queue and task: not for a key confined to some queues.
    if not settings.auth_enabled or (principal.has("read") and principal.queues is None):
        return
    if key_matches(settings.metrics_key, _presented(request)):
        return
    if principal.key_id and principal.has("read"):
        raise errors.Forbidden(
            "this API key is restricted to some queues, and /metrics shows every queue: "
            "use a key for all queues, or CELERIAC_METRICS_KEY"
        )
    if principal.key_id:
        raise errors.Forbidden("this API key lacks the 'read' scope")
    raise errors.Unauthorized(
        "send an API key with the read scope, or CELERIAC_METRICS_KEY, as "
        "'Authorization: Bearer <key>'"
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    description="Counters of what this process committed, and queue gauges from SQL "
    "(refreshed at most every CELERIAC_METRICS_REFRESH_SECONDS). With API keys set, it "
    "needs a key with the read scope for every queue (not one restricted to some queues: "
    "the metrics name them all), or CELERIAC_METRICS_KEY.",
    response_class=Response,
    responses={**EXPOSITION, **problem_responses(*GATE_STATUSES)},
)
async def metrics(
    request: Request,
    runtime: Annotated[Runtime, Depends(get_runtime)],
    principal: Annotated[Principal, Depends(get_principal)],
) -> Response:
    _check_access(request, runtime, principal)
    collected: Metrics = request.app.state.metrics
    try:
        await collected.refresh_queues(runtime.db.read, runtime.clock.now)
    except Exception as exc:  # the counters are still worth serving; gauges stay as they were
        log.debug("metrics: queue gauges not refreshed: %r", exc)
    return Response(generate_latest(collected.registry), media_type=CONTENT_TYPE_LATEST)
