"""The events stream: ``GET /events`` (Server-Sent Events; service/events.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from service.auth import Principal
from service.events import KINDS, EventHub, Subscription, TooManyStreams, stream
from service.longpoll import RETRY_AFTER
from service.routers.deps import (
    GuardedRoute,
    get_principal,
    get_runtime,
    require,
    until_client_leaves,
)
from service.routers.problems import GATE
from service.runtime import Runtime

router = APIRouter(route_class=GuardedRoute, tags=["events"])
MAX_QUEUES = 100

STREAM_DESCRIPTION = """Server-Sent Events of job state changes, as they commit:
`submitted`, `started`, `progress` and `finished`, each `data:` a JSON object
`{"event", "id", "queue", "task", "status", "attempt", "at"}` (plus `progress` for
progress). A client that reads too slowly loses the oldest of its
buffered events (1000) and gets a `dropped` event with their count instead. A stream
holds a long-poll slot (503 with Retry-After over the caps) and ends after
`CELERIAC_EVENTS_MAX_SECONDS`; EventSource clients reconnect by themselves. Finishes
committed by other replicas are included where the broker announces them (PostgreSQL
NOTIFY, Redis, RabbitMQ); submits, starts and progress only from this replica."""


# One event of the stream (OpenAPI 3.1: the schema of a text/event-stream describes each
# event as parsed: its ``event`` name and its ``data`` text, here a JSON object).
EVENT_SCHEMA = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "enum": [*KINDS, "dropped"]},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {
                "type": "object",
                "required": ["event"],
                "properties": {
                    "event": {"type": "string"},
                    "id": {"type": "string"},
                    "queue": {"type": "string"},
                    "task": {"type": ["string", "null"]},
                    "status": {"type": "string"},
                    "attempt": {"type": ["integer", "null"]},
                    "at": {"type": "string", "format": "date-time"},
                    "progress": {},
                    "dropped": {"type": "integer", "description": "events lost (dropped)"},
                },
            },
        },
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}


@router.get(
    "/events",
    response_class=StreamingResponse,
    responses={
        **GATE,
        200: {
            "description": "The stream: one SSE event per job change",
            "content": {"text/event-stream": {"schema": EVENT_SCHEMA}},
        },
    },
    dependencies=[Depends(require("read"))],
    summary="Stream job state changes (Server-Sent Events)",
    description=STREAM_DESCRIPTION,
)
async def events(
    request: Request,
    runtime: Annotated[Runtime, Depends(get_runtime)],
    principal: Annotated[Principal, Depends(get_principal)],
    queue: Annotated[
        list[Annotated[str, Query(min_length=1, max_length=128)]] | None,
        Query(max_length=MAX_QUEUES, description="only these queues (repeat it); all when absent"),
    ] = None,
) -> StreamingResponse:
    for name in queue or ():
        principal.check_queue(name)
    hub: EventHub = request.app.state.events
    key_id = principal.key_id
    if not runtime.long_polls.try_enter(key_id):
        raise TooManyStreams(
            "too many long-polls and event streams are open (CELERIAC_MAX_LONG_POLLS, "
            "CELERIAC_MAX_LONG_POLLS_PER_KEY); try again later",
            headers=RETRY_AFTER,
        )
    subscription = Subscription(None if not queue else frozenset(queue), principal.allows_queue)

    seconds = runtime.settings.events_max_seconds
    gone = partial(until_client_leaves, request)  # nothing else is read

    async def frames() -> AsyncIterator[str]:
        try:
            async for frame in stream(hub, subscription, seconds, gone):
                yield frame
        finally:
            runtime.long_polls.leave(key_id)

    return StreamingResponse(
        frames(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
