"""The worker's span around each task, continuing the submitter's trace (issue 16).

A leased job may carry a W3C ``traceparent`` (what ``POST /jobs`` was given). When the
``opentelemetry-api`` package is importable (the SDK's ``otel`` extra), the task runs
inside a ``celeriac run <task>`` span whose parent is that context, through the global
tracer provider the worker's process configured (for example with
``opentelemetry-instrument celeriac worker …``). Without the package, or without a
provider, this costs one attribute test per job."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

_api: Any = None  # (trace, propagator) once imported; False when not installed


def _load() -> Any:
    global _api
    if _api is None:
        try:
            from opentelemetry import trace
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )
        except ImportError:
            _api = False
        else:
            _api = (trace, TraceContextTextMapPropagator())
    return _api


@contextlib.contextmanager
def task_span(job: dict[str, Any]) -> Iterator[None]:
    """Run the body inside the job's span (a no-op without a traceparent or the API)."""
    traceparent = job.get("traceparent")
    api: Any = _load() if traceparent else False
    if not api:
        yield
        return
    trace, propagator = api
    parent = propagator.extract({"traceparent": traceparent})
    tracer = trace.get_tracer("celeriac.worker")
    attributes = {
        "celeriac.job_id": job["id"],
        "celeriac.task": job["task"],
        "celeriac.queue": job.get("queue", ""),
        "celeriac.attempt": job.get("attempt", 0),
    }
    with tracer.start_as_current_span(
        f"celeriac run {job['task']}",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes=attributes,
    ):
        yield
