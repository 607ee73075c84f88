"""Issue 16, traces: one trace from submit to result. A caller's span sends its
``traceparent`` with ``POST /jobs``; the service (in this process, ``CELERIAC_TRACING``
on, the SDK's in-memory exporter behind the global provider) adds ``celeriac submit``,
``celeriac lease`` and ``celeriac settle``; a real ``celeriac worker`` process (its
provider exporting to a file) runs the task in ``celeriac run <task>``. Every span shares
the caller's trace id, and each has the parent the design says."""

from __future__ import annotations

import json
import socket
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from conftest import Spawner, expect
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace.propagation.tracecontext import (
    TraceContextTextMapPropagator,
)

from service.app import create_app
from service.migrate import upgrade
from service.settings import Settings

pytestmark = pytest.mark.timeout(60)

# The worker process: the SDK's provider, exporting each ended span as a line of JSON.
WORKER_MAIN = textwrap.dedent(
    """
    import json, sys
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    PATH = sys.argv[1]

    class ToFile(SpanExporter):
        def export(self, spans):
            with open(PATH, "a") as out:
                for span in spans:
                    out.write(json.dumps({
                        "name": span.name,
                        "trace_id": format(span.context.trace_id, "032x"),
                        "span_id": format(span.context.span_id, "016x"),
                        "parent": format(span.parent.span_id, "016x") if span.parent else None,
                        "attributes": dict(span.attributes),
                    }) + "\\n")
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(ToFile()))
    trace.set_tracer_provider(provider)
    from celeriac.cli import main
    sys.argv = ["celeriac", "worker", *sys.argv[2:]]
    main()
    """
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # once per process: no other test sets one
    return exporter


@pytest.fixture(scope="module")
def traced_service(
    spans: InMemorySpanExporter, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """``celeriac serve``'s app in this process (so its spans reach the in-memory
    exporter), on a real port with uvicorn, SQLite and the SQL broker."""
    workdir = tmp_path_factory.mktemp("tracing")
    url = f"sqlite:///{workdir / 'traced.db'}"
    upgrade(url)
    app = create_app(Settings(database_url=url, tracing=True, _env_file=None))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="traced-service", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the service did not start"
        time.sleep(0.05)
    yield base
    server.should_exit = True
    thread.join(10)


def _by_name(spans: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [s for s in spans if s["name"] == name]
    assert len(found) == 1, (name, spans)
    return found[0]


def test_one_trace_from_submit_to_result(
    traced_service: str, spans: InMemorySpanExporter, spawner: Spawner, tmp_path: Path
) -> None:
    exported = tmp_path / "worker-spans.jsonl"
    main = tmp_path / "traced_worker.py"
    main.write_text(WORKER_MAIN)
    command = [
        sys.executable, str(main), str(exported),
        "--app", "tasks_for_tests:app", "--server", traced_service,
        "-c", "1", "-Q", "traced", "-l", "warning", "--poll-wait", "1",
    ]  # fmt: skip
    worker = spawner.process(command, "traced-worker")

    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("caller") as caller:
        headers: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(headers)
        spec = {"task": "tests.add", "args": [20, 22], "queue": "traced"}
        with httpx.Client(base_url=traced_service, timeout=30) as http:
            job = expect(http.post("/jobs", params={"wait": 20}, json=spec, headers=headers), 202)
    assert (job["status"], job["result"]) == ("succeeded", 42), worker.log()

    trace_id = format(caller.get_span_context().trace_id, "032x")
    service_spans = [
        {
            "name": s.name,
            "trace_id": format(s.context.trace_id, "032x"),
            "span_id": format(s.context.span_id, "016x"),
            "parent": format(s.parent.span_id, "016x") if s.parent else None,
            "attributes": dict(s.attributes or {}),
        }
        for s in spans.get_finished_spans()
        if s.context.trace_id == caller.get_span_context().trace_id
    ]
    deadline = time.monotonic() + 10  # the worker exports its span as the task ends
    while not exported.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    worker_spans = [json.loads(line) for line in exported.read_text().splitlines()]
    every = service_spans + worker_spans
    assert {s["trace_id"] for s in every} == {trace_id}, every

    caller_id = format(caller.get_span_context().span_id, "016x")
    submit = _by_name(every, "celeriac submit")
    lease = _by_name(every, "celeriac lease")
    run = _by_name(every, "celeriac run tests.add")
    settle = _by_name(every, "celeriac settle")
    assert submit["parent"] == caller_id
    # What the job stored is the submit span's context: the rest hang under it.
    assert lease["parent"] == run["parent"] == settle["parent"] == submit["span_id"]
    assert run["attributes"]["celeriac.job_id"] == job["id"]
    assert settle["attributes"]["celeriac.job_id"] == job["id"]


def test_a_malformed_traceparent_is_ignored(traced_service: str) -> None:
    spec = {"task": "tests.add", "args": [1, 1], "queue": "untraced"}
    with httpx.Client(base_url=traced_service, timeout=10) as http:
        for bad in ("00-zz-11", "00-" + "0" * 32 + "-" + "1" * 16 + "-01", "x" * 55):
            response = http.post("/jobs", json=spec, headers={"traceparent": bad})
            assert expect(response, 202)["status"] == "queued"
