"""OpenTelemetry traces across submit -> lease -> run -> settle (issue 16), optional.

A W3C ``traceparent`` header on ``POST /jobs`` (or ``/jobs/batch``) is stored with the job
and handed to the worker with its lease, so the worker's span around the task continues
the submitter's trace, in any language. With ``CELERIAC_TRACING=true`` and the ``otel``
extra installed, the service adds spans of its own — ``celeriac submit`` (its context is
what the job stores), ``celeriac lease`` and ``celeriac settle`` — through the global
tracer provider, which the deployment configures (``opentelemetry-instrument``, or the SDK
in a wrapper). Off (the default), nothing is imported and each call is a test of a flag.

A malformed ``traceparent`` is ignored, as the W3C spec asks of every participant."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

# version 00, a trace id and a parent id (neither all zeros), flags.
_TRACEPARENT = re.compile(r"^00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$")


def valid_traceparent(value: str | None) -> str | None:
    """The header if it is a well-formed version-00 ``traceparent``, else None."""
    if value is None or len(value) != 55:
        return None
    return value if _TRACEPARENT.match(value) else None


class Tracing:
    """The service's spans; every method is a no-op when tracing is off."""

    def __init__(self, enabled: bool) -> None:
        self._tracer: Any = None
        self._propagator: Any = None
        if enabled:
            self._start()

    def _start(self) -> None:
        try:
            from opentelemetry import trace
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )
        except ImportError as exc:  # pragma: no cover - the extra is in every lock
            raise RuntimeError(
                "CELERIAC_TRACING=true needs the otel extra: pip install 'celeriac-server[otel]'"
            ) from exc
        self._trace = trace
        self._tracer = trace.get_tracer("celeriac.service")
        self._propagator = TraceContextTextMapPropagator()

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    @contextmanager
    def submit(self, traceparent: str | None, jobs: int) -> Iterator[str | None]:
        """Around a submit: yields the ``traceparent`` to store with its jobs."""
        if self._tracer is None:
            yield traceparent
            return
        attributes = {"celeriac.jobs": jobs}
        with self._tracer.start_as_current_span(
            "celeriac submit",
            context=self._context(traceparent),
            kind=self._trace.SpanKind.PRODUCER,
            attributes=attributes,
        ) as span:
            yield self._header_of(span)

    def record(
        self,
        name: str,
        jobs: Iterable[Mapping[str, Any]],
        started_ns: int,
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        """One span named ``name`` per job that carries a ``traceparent``, from
        ``started_ns`` (``time.time_ns()``) until now: the lease grant, the settle."""
        if self._tracer is None:
            return
        ended = time.time_ns()
        for job in jobs:
            parent = job.get("traceparent")
            if not parent:
                continue
            span = self._tracer.start_span(
                name,
                context=self._context(parent),
                start_time=started_ns,
                attributes={"celeriac.job_id": job["id"], **(attributes or {})},
            )
            span.end(end_time=ended)

    def _context(self, traceparent: str | None) -> Any:
        if not traceparent:
            return None
        return self._propagator.extract({"traceparent": traceparent})

    def _header_of(self, span: Any) -> str | None:
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=self._trace.set_span_in_context(span))
        return carrier.get("traceparent")
