"""Issue 14: the per-request fast paths answer exactly as the general ones.

``service/endpoint_plan.py`` hands each route its arguments from a plan made once, instead
of FastAPI's per-request dependency solving: every request below is sent twice to one
in-process service, once through the plan and once through FastAPI's own handler (an app
with ``dependency_overrides`` takes that path), and both answers must be the same, errors
included. ``strict_loads`` parses with orjson first: on generated documents (duplicate
keys, escapes, colons inside strings, huge integers, NaN) it agrees with the careful
standard-library parse, in the value or in the error."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.routing import APIRoute
from hypothesis import given, settings
from hypothesis import strategies as st

from service import errors
from service.app import create_app
from service.endpoint_plan import EndpointPlan, plan_for
from service.gate import _careful_loads, strict_loads
from service.migrate import upgrade
from service.settings import Settings


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FastAPI, str]]:
    """The service's app in this process (so the test can switch it to FastAPI's own
    handlers), on a real port with uvicorn, SQLite and the SQL broker."""
    url = f"sqlite:///{tmp_path_factory.mktemp('plan') / 'plan.db'}"
    upgrade(url)
    app = create_app(Settings(database_url=url, _env_file=None))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="plan-service", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the service did not start"
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=10) as http:
        while http.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the service did not become ready"
            time.sleep(0.05)
    yield app, base
    server.should_exit = True
    thread.join(10)


def _never_called() -> None:  # its override sends every request through FastAPI's handler
    raise AssertionError("not a dependency of any route")


LONG = "x" * 300
# (method, path, query, headers, JSON body or raw bytes)
REQUESTS: list[tuple[str, str, dict[str, Any], dict[str, str], Any]] = [
    ("POST", "/jobs", {}, {}, {"task": "plan.ok", "args": [1], "kwargs": {"a": None}}),
    ("POST", "/jobs", {"wait": "0"}, {}, {"task": "plan.ok"}),
    ("POST", "/jobs", {}, {"Idempotency-Key": "plan-key-1"}, {"task": "plan.ok"}),
    ("POST", "/jobs", {}, {"Idempotency-Key": "plan-key-1"}, {"task": "plan.other"}),
    ("POST", "/jobs", {}, {"Idempotency-Key": LONG}, {"task": "plan.ok"}),
    ("POST", "/jobs", {"wait": "-1"}, {}, {"task": "plan.ok"}),
    ("POST", "/jobs", {"wait": "abc"}, {}, {"task": "plan.ok"}),
    ("POST", "/jobs", {"wait": "61"}, {}, {"task": "bad name!"}),
    ("POST", "/jobs", {}, {}, {"task": ""}),
    ("POST", "/jobs", {}, {}, {"task": "plan.ok", "priority": 10, "unknown": 1}),
    ("POST", "/jobs", {}, {}, {"task": "plan.ok", "priority": True, "delay": "1"}),
    ("POST", "/jobs", {}, {}, {"task": "plan.ok", "delay": 1, "run_at": "2030-01-01T00:00:00Z"}),
    ("POST", "/jobs", {}, {}, {}),
    ("POST", "/jobs", {}, {}, []),
    ("POST", "/jobs", {}, {}, "a string"),
    ("POST", "/jobs", {}, {}, b""),
    ("POST", "/jobs/batch", {}, {}, {"jobs": [{"task": "plan.ok"}, {"task": "plan.b"}]}),
    ("POST", "/jobs/batch", {}, {}, {"jobs": [{"task": "plan.ok"}, {"task": ""}]}),
    ("POST", "/jobs/batch", {}, {}, {"jobs": "x"}),
    ("GET", "/jobs/no-such-job", {}, {}, None),
    ("GET", "/jobs/no-such-job", {"wait": "-1"}, {}, None),
    ("GET", "/jobs", {"status": "bogus", "limit": "0"}, {}, None),
    ("GET", "/jobs", {"limit": "abc", "queue": LONG}, {}, None),
    ("GET", "/jobs", {"cursor": "not-a-cursor"}, {}, None),
    ("GET", "/jobs", {"status": "failed", "limit": "5"}, {}, None),
    ("POST", "/jobs/no-such-job/cancel", {}, {}, None),
    ("POST", "/leases", {}, {}, {"queues": [], "worker": ""}),
    ("POST", "/leases", {}, {}, {"queues": ["plan-empty"], "worker": "w", "wait": 0}),
    ("POST", "/leases", {}, {}, {}),
    ("POST", "/leases/report", {}, {}, {"reports": "x"}),
    ("POST", "/leases/report", {}, {}, {"reports": []}),
    ("POST", "/leases/heartbeat", {}, {}, {"leases": [{"id": "j", "token": "t"}]}),
    ("POST", "/jobs/no-such-job/complete", {}, {}, {"token": "t", "result": 1}),
    ("POST", "/jobs/no-such-job/fail", {}, {}, {"token": "t"}),
    ("POST", "/jobs/no-such-job/heartbeat", {}, {}, {}),
    ("POST", "/schedules", {}, {}, {"name": "", "task": "plan.ok"}),
    ("GET", "/schedules/no-such-schedule", {}, {}, None),
    ("PATCH", "/schedules/no-such-schedule", {}, {}, {"paused": "yes"}),
    ("POST", "/workers", {}, {}, {}),
    ("POST", "/workers/no-such-worker/heartbeat", {}, {}, {"running": "x"}),
    ("GET", "/queues", {}, {}, None),
    ("GET", "/healthz", {}, {}, None),
]
# Values that differ between two requests that both succeed.
VARYING = {"id", "created_at", "run_at", "expires_at", "worker_id", "oldest_queued_age_seconds"}


def _steady(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: "…" if k in VARYING else _steady(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_steady(v) for v in value]
    return value


def _send(http: httpx.Client, request: tuple[str, str, dict[str, Any], dict[str, str], Any]) -> Any:
    method, path, query, headers, body = request
    content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    sent = {"Content-Type": "application/json", **headers} if content is not None else headers
    answer = http.request(method, path, params=query, headers=sent, content=content)
    payload = answer.json() if answer.content else None
    if 200 <= answer.status_code < 300:
        payload = _steady(payload)
    kept = ("content-type", "location", "idempotent-replayed", "retry-after", "allow")
    head = {k: v for k, v in answer.headers.items() if k in kept and k != "location"}
    return answer.status_code, head, payload


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: f"{r[0]} {r[1]} {r[2]}")
def test_the_plan_answers_as_fastapi_does(
    served: tuple[FastAPI, str],
    request_: tuple[str, str, dict[str, Any], dict[str, str], Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app, base = served
    calls: list[str] = []
    planned_call = EndpointPlan.call

    async def counted(plan: EndpointPlan, request: Any, body: Any) -> Any:
        calls.append(request.url.path)
        return await planned_call(plan, request, body)

    monkeypatch.setattr(EndpointPlan, "call", counted)
    with httpx.Client(base_url=base, timeout=10) as http:
        app.dependency_overrides.clear()
        planned = _send(http, request_)
        through_plan = len(calls)
        app.dependency_overrides[_never_called] = _never_called
        try:
            general = _send(http, request_)
        finally:
            app.dependency_overrides.clear()
    assert len(calls) == through_plan, "with overrides, FastAPI's own handler answers"
    assert through_plan == 1 or planned[0] in (401, 403, 413, 415), "the plan answered"
    if request_[4] is not None and request_[3].get("Idempotency-Key") == "plan-key-1":
        # Sent twice, so the second of each pair is a replay or a mismatch: both agree.
        assert planned[0] in (200, 202, 422) and general[0] in (200, 422)
        return
    assert planned == general


def test_the_hot_routes_have_a_plan(served: tuple[FastAPI, str]) -> None:
    app, _ = served
    planned = {
        (method, route.path)
        for route in _api_routes(app)
        for method in route.methods
        if plan_for(route) is not None
    }
    hot = {
        ("POST", "/jobs"),
        ("POST", "/jobs/batch"),
        ("GET", "/jobs/{job_id}"),
        ("POST", "/leases"),
        ("POST", "/leases/report"),
        ("POST", "/leases/heartbeat"),
        ("POST", "/jobs/{job_id}/complete"),
    }
    assert hot <= planned, hot - planned


def _api_routes(app: FastAPI) -> Iterator[APIRoute]:
    from service.routers import jobs, leases

    for router in (jobs.router, leases.router):
        for route in router.routes:
            if isinstance(route, APIRoute):
                yield route


# --- strict JSON: the orjson path against the careful one -----------------------------------

_keys = st.sampled_from(["a", "b", "a:b", 'q"uote', "back\\slash", "é", "\\", ":", ""])
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(alphabet=st.sampled_from('ab:"\\{}[],é\n\t\u2028'), max_size=8),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(st.tuples(_keys, inner), max_size=4),  # pairs: duplicate keys allowed
    ),
    max_leaves=12,
)


def _render(value: Any) -> str:
    """JSON text, writing a list of pairs as an object (so duplicates reach the text)."""
    if isinstance(value, list) and value and all(isinstance(v, tuple) for v in value):
        members = ",".join(f"{json.dumps(k)}:{_render(v)}" for k, v in value)
        return "{" + members + "}"
    if isinstance(value, list):
        return "[" + " , ".join(_render(v) for v in value) + "]"
    if isinstance(value, tuple):
        return _render(list(value))
    return json.dumps(value)


def _outcome(parse: Any, body: bytes) -> tuple[str, Any]:
    try:
        return "value", parse(body)
    except errors.InvalidJson as exc:
        return "error", exc.detail


@settings(max_examples=400, deadline=None)
@given(_values, st.sampled_from(["", " ", "\n"]))
def test_quick_parse_agrees_with_the_careful_one(value: Any, space: str) -> None:
    body = (space + _render(value) + space).encode()
    assert _outcome(strict_loads, body) == _outcome(_careful_loads, body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"a":1,"a":2}',
        b'{"a":{"b":[{"c":1,"c":1}]}}',
        b'{"k\\\\":1,"k\\\\":2}',
        b'{"x":"a\\"b:c","x":1}',
        b"[NaN]",
        b'{"a":-Infinity}',
        b"[1e400]",
        b'["\\ud800"]',
        b'["a\\u0000"]',
        b"[123456789012345678901234567890]",
        b"[-9223372036854775809]",
        b'\xef\xbb\xbf{"a":1}',
        b'{"a":1,}',
    ],
)
def test_quick_parse_refuses_or_keeps_what_the_careful_one_does(body: bytes) -> None:
    if b"\\u0000" in body:
        with pytest.raises(errors.InvalidJson, match="NUL"):
            strict_loads(body)
        return
    assert _outcome(strict_loads, body) == _outcome(_careful_loads, body)
