"""The problem responses routes declare in the OpenAPI document.

A client, a generated SDK and the fuzz run (tests/test_fuzz.py) learn from the document
which statuses an operation can answer; one it does not declare is a broken contract.
Every guarded route can answer these before its handler runs: the gate (service/gate.py)
refuses a missing or unknown key (401), a key without the scope or queue (403), a slow
body (408), a body over the route's limit (413), a body that is not JSON (415) or not
strict JSON (400); FastAPI refuses invalid parameters (422); and while the database or
the broker is unreachable, or the service is still starting, every route answers 503
with ``Retry-After`` (service/outage.py). Routes add what their handler raises (404,
409, 410) from the same table."""

from __future__ import annotations

import functools
import re
from typing import Any

from fastapi import FastAPI, Request

from service.errors import PROBLEM_JSON
from service.schemas import Job, Problem

Responses = dict[int | str, dict[str, Any]]

_DESCRIPTIONS = {
    400: "The body is not strict JSON (NaN, a duplicate key, NUL, nesting too deep), or a "
    "parameter such as a cursor cannot be read",
    401: "No API key, or an unknown one",
    403: "The API key lacks the scope, or may not use this queue",
    404: "No such job (or schedule, or worker)",
    408: "The request body did not arrive within CELERIAC_BODY_READ_TIMEOUT_SECONDS",
    409: "The request conflicts with the resource's state (a stale lease token, a "
    "finished job, an existing name)",
    410: "The result expired and was deleted",
    413: "The body exceeds this route's limit (docs/api.md, Limits)",
    415: "The body is not application/json",
    422: "A parameter or a field of the body is not valid",
    503: "The database or the broker is unreachable, or the service is starting; retry "
    "after Retry-After seconds",
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying",
        "schema": {"type": "integer", "minimum": 0},
    }
}


def problem_responses(*statuses: int) -> Responses:
    """``responses=`` entries for these statuses: an RFC 9457 body, as
    application/problem+json (the ``model`` also registers the Problem component)."""
    declared: Responses = {}
    for status in statuses:
        entry: dict[str, Any] = {
            "model": Problem,
            "description": _DESCRIPTIONS[status],
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        if status == 503:
            entry["headers"] = _RETRY_AFTER
        declared[status] = entry
    return declared


# What any guarded route may answer besides its own outcomes (see the module docstring).
GATE_STATUSES = (400, 401, 403, 408, 413, 415, 422, 503)
GATE = problem_responses(*GATE_STATUSES)
# Routes that name a job, schedule or worker, or change one: also 404 and 409.
PROBLEMS = problem_responses(*GATE_STATUSES, 404, 409)


# POST /jobs: 202 when committed; 200 when an Idempotency-Key replays the job it created.
_LOCATION = {
    "Location": {
        "description": "The job: /jobs/{id}",
        "required": True,
        "schema": {"type": "string"},
    }
}
SUBMIT: Responses = {
    **PROBLEMS,
    202: {
        "description": "Committed: the job is in SQL (with ?wait=, as it is when it "
        "finished or the wait ran out: still 202 when it already succeeded)",
        "headers": _LOCATION,
    },
    200: {
        "model": Job,
        "description": "The Idempotency-Key was used before, with the same body: the job "
        "that request created, unchanged",
        "headers": {
            **_LOCATION,
            "Idempotent-Replayed": {
                "description": "Always 'true'",
                "required": True,
                "schema": {"type": "string", "enum": ["true"]},
            },
        },
    },
}


def allowed_methods(request: Request, fallback: str = "") -> str:
    """The ``Allow`` header of a 405: the methods the document gives the requested path.
    FastAPI has one route per method, and Starlette's 405 names only the first route that
    matched, where RFC 9110 asks for all the resource's methods. As OpenAPI matches URLs,
    a concrete path wins over a template (``/jobs/batch`` is not ``/jobs/{job_id}``).
    ``fallback``: Starlette's own answer, for paths outside the document."""
    paths: dict[str, dict[str, Any]] = request.app.openapi().get("paths", {})
    path = request.scope["path"]
    item = paths.get(path)
    if item is None:
        item = next((v for k, v in paths.items() if _template(k).fullmatch(path)), None)
    return fallback if item is None else ", ".join(sorted(m.upper() for m in item))


@functools.cache
def _template(path: str) -> re.Pattern[str]:
    """``/jobs/{job_id}`` as a pattern: each parameter is one path segment."""
    parts = re.split(r"\{[^/{}]+\}", path)
    return re.compile("[^/]+".join(re.escape(part) for part in parts))


# The two ways service/auth.py accepts a key; either one will do.
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "An API key (docs/security.md)"},
    "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}


def declare_api_keys(app: FastAPI) -> None:
    """Name the API key in the document, on every operation that can answer 401 (all but
    the health checks): clients and generated SDKs learn to send it, and the fuzz run
    checks that the service refuses a request without it. The gate, not this, enforces
    it; with no CELERIAC_API_KEYS every request is allowed."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        document = generate()  # built once, then cached by FastAPI
        document.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
        for operations in document.get("paths", {}).values():
            for operation in operations.values():
                if "401" in operation.get("responses", {}):
                    operation["security"] = [{"bearer": []}, {"apiKeyHeader": []}]
        return document

    app.openapi = openapi  # type: ignore[method-assign]
