"""Issue 12, findings 1 and 2: the gate. A caller without a key cannot make the service
read a body; each route takes a body of its own size within a time limit; every body is
strict JSON (no NaN/Infinity, no duplicate keys, no NUL, no lone surrogates, nesting at
most 32 deep). Each hostile input gets its own 4xx, nothing is stored, and the others
keep being served."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import Api, Service, Spawner, assert_problem, expect

SUBMIT_KEY = "gate-submit-key-0123456789abcdef"
WORK_KEY = "gate-work-key-0123456789abcdef00"
READ_KEY = "gate-read-key-0123456789abcdef00"
ADMIN_KEY = "gate-admin-key-0123456789abcdef0"
KEYS = f"{SUBMIT_KEY}:submit,{WORK_KEY}:work,{READ_KEY}:read,{ADMIN_KEY}:admin"
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def gated(module_spawner: Spawner) -> Service:
    return module_spawner.service(
        extra={"CELERIAC_API_KEYS": KEYS, "CELERIAC_BODY_READ_TIMEOUT_SECONDS": "1.5"}
    )


@pytest.fixture
def admin(gated: Service) -> Iterator[Api]:
    with Api(gated.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as api:
        yield api


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def raw_request(url: str, head: str, body: bytes = b"", read_timeout: float = 10.0) -> bytes:
    """Send a request head and part of a body on a raw socket; return what comes back
    (the connection is left for the server to close)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        received = b""
        try:
            while b"\r\n\r\n" not in received or len(received) < 200:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except (TimeoutError, ConnectionResetError):
            # A server that answers early and closes with unread bytes pending resets.
            pass
        return received


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def test_no_key_is_refused_before_the_body_is_read(gated: Service) -> None:
    """32 MiB without a key: 401 at once, and the service does not grow by the body."""
    before = rss_kib(gated.pid)
    started = time.monotonic()
    with httpx.Client(timeout=30) as client:
        response = client.post(
            f"{gated.url}/jobs",
            content=b"[" + b"1," * (16 * MiB) + b"1]",
            headers={"content-type": "application/json"},
        )
    assert_problem(response, 401, "unauthorized")
    assert time.monotonic() - started < 5
    assert rss_kib(gated.pid) - before < 20 * 1024, "the service buffered the body"
    # A declared 60 MB with a kilobyte sent: answered without waiting for the rest.
    head = (
        "POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {60 * MiB}\r\n"
    )
    started = time.monotonic()
    assert status_of(raw_request(gated.url, head, b"{" * 1024)) == 401
    assert time.monotonic() - started < 3


def test_each_route_has_its_own_body_limit(gated: Service, admin: Api) -> None:
    big_args = ["x" * 1000] * 2100  # about 2 MiB: over one job, fine for a batch
    response = admin.http.post("/jobs", json={"task": "t", "args": big_args})
    assert_problem(response, 413, "payload-too-large")
    # The limit is known from the declared length: refused before the body arrives.
    head = (
        "POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {SUBMIT_KEY}\r\nContent-Length: {60 * MiB}\r\n"
    )
    started = time.monotonic()
    assert status_of(raw_request(gated.url, head, b"{")) == 413
    assert time.monotonic() - started < 3
    # A lease request is small: 100 KiB of queue names is refused.
    worker = {"Authorization": f"Bearer {WORK_KEY}"}
    body = {"worker": "w", "queues": ["q" * 100] * 1000}
    assert_problem(httpx.post(f"{gated.url}/leases", json=body, headers=worker), 413)
    queue = f"q_gate_{uuid.uuid4().hex[:8]}"
    small = [{"task": "t", "queue": queue, "args": ["x" * 1000] * 10} for _ in range(300)]
    assert len(expect(admin.http.post("/jobs/batch", json={"jobs": small}), 202)["jobs"]) == 300


def test_a_slow_body_times_out_and_others_are_served(gated: Service, admin: Api) -> None:
    """A client that declares 500 KB and sends 1 KB gets 408 after the read timeout;
    meanwhile other clients are answered as usual."""
    head = (
        "POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {SUBMIT_KEY}\r\nContent-Length: {500 * 1024}\r\n"
    )
    results: dict[str, object] = {}

    def slow() -> None:
        started = time.monotonic()
        results["response"] = raw_request(gated.url, head, b'{"task":"t","args":["' + b"a" * 1024)
        results["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=slow)
    thread.start()
    for _ in range(5):
        expect(admin.http.get("/healthz"), 200)
        expect(admin.http.post("/jobs", json={"task": "t", "queue": "q_gate_other"}), 202)
    thread.join(15)
    response = results["response"]
    assert isinstance(response, bytes) and status_of(response) == 408, response[:300]
    assert b"request-timeout" in response
    seconds = results["seconds"]
    assert isinstance(seconds, float) and 1.0 < seconds < 8


HOSTILE_JOB_BODIES = {
    "NaN in args": '{"task":"evil","queue":"%s","args":[NaN]}',
    "Infinity in kwargs": '{"task":"evil","queue":"%s","kwargs":{"x":Infinity}}',
    "-Infinity": '{"task":"evil","queue":"%s","args":[-Infinity]}',
    "overflowing number": '{"task":"evil","queue":"%s","args":[1e400]}',
    "duplicate keys": '{"task":"evil","queue":"%s","task":"other"}',
    "duplicate nested keys": '{"task":"evil","queue":"%s","kwargs":{"a":1,"a":2}}',
    "NUL in args": '{"task":"evil","queue":"%s","args":["a\\u0000b"]}',
    "NUL in a key": '{"task":"evil","queue":"%s","kwargs":{"\\u0000":1}}',
    "lone surrogate": '{"task":"evil","queue":"%s","args":["\\ud800"]}',
    "lone low surrogate": '{"task":"evil","queue":"%s","kwargs":{"k":"x\\udc00"}}',
    "too deep": '{"task":"evil","queue":"%s","args":' + "[" * 950 + "]" * 950 + "}",
    "deeper than 32": '{"task":"evil","queue":"%s","args":' + "[" * 32 + "]" * 32 + "}",
    "not UTF-8": '{"task":"evil","queue":"%s","args":["\xff"]}',
    "huge integer literal": '{"task":"evil","queue":"%s","args":[' + "9" * 5000 + "]}",
}


def test_hostile_json_is_refused_and_stores_nothing(api: Api, queue: str) -> None:
    good: list[httpx.Response] = []

    def good_submits() -> None:
        good.extend(api.http.post("/jobs", json={"task": "ok", "queue": queue}) for _ in range(10))

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(good_submits) for _ in range(4)]
        for name, template in HOSTILE_JOB_BODIES.items():
            body = (template % queue).encode("utf-8", "surrogateescape")
            if name == "not UTF-8":
                body = body.replace("\xff".encode(), b"\xff")
            response = api.http.post(
                "/jobs", content=body, headers={"content-type": "application/json"}
            )
            problem = assert_problem(response, 400, "invalid-json")
            assert problem["detail"], name
        for future in futures:
            future.result()
    assert [r.status_code for r in good] == [202] * 40
    listed = api.list_jobs(queue=queue, limit=500)["jobs"]
    assert len(listed) == 40 and {job["task"] for job in listed} == {"ok"}
    expect(api.http.get("/jobs", params={"limit": 500}), 200)


def test_strict_json_still_takes_what_json_allows(api: Api, queue: str) -> None:
    """The literal text "\\u0000" (an escaped backslash), a proper surrogate pair, 32
    levels of nesting in all, big but finite numbers."""
    nested: object = []
    for _ in range(29):
        nested = [nested]
    args = ["\\u0000", "\U0001f600", nested, 1.7e308, -(2**62), "\\\\u0000"]
    job = expect(api.http.post("/jobs", json={"task": "ok", "queue": queue, "args": args}), 202)
    assert expect(api.http.get(f"/jobs/{job['id']}"), 200)["args"] == args


def test_hostile_reports_are_refused(api: Api, queue: str) -> None:
    """NaN in a result or progress never reaches SQL: the lease stays valid and the
    worker can still report properly."""
    job = api.submit(queue=queue)
    leased = api.lease_one(queue)
    token = leased["lease"]["token"]
    job_id = job["id"]
    for path, body in (
        (f"/jobs/{job_id}/complete", f'{{"token":"{token}","result":NaN}}'),
        (f"/jobs/{job_id}/heartbeat", f'{{"token":"{token}","progress":{{"p":Infinity}}}}'),
        (f"/jobs/{job_id}/complete", f'{{"token":"{token}","result":1,"result":2}}'),
        (
            "/leases/heartbeat",
            f'{{"leases":[{{"id":"{job_id}","token":"{token}","progress":NaN}}]}}',
        ),
    ):
        response = api.http.post(path, content=body, headers={"content-type": "application/json"})
        assert_problem(response, 400, "invalid-json")
    assert expect(api.http.get(f"/jobs/{job['id']}"), 200)["status"] == "running"
    expect(api.complete(leased, result={"ok": True}), 200)
    assert api.get(job["id"])["result"] == {"ok": True}


def test_non_json_bodies_get_415(gated: Service) -> None:
    headers = {"Authorization": f"Bearer {SUBMIT_KEY}"}
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        sent = dict(headers)
        if content_type:
            sent["content-type"] = content_type
        response = httpx.post(f"{gated.url}/jobs", content=b'{"task":"t"}', headers=sent)
        assert_problem(response, 415, "unsupported-media-type")
    ok = {**headers, "content-type": "application/json; charset=utf-8"}
    expect(httpx.post(f"{gated.url}/jobs", content=b'{"task":"t"}', headers=ok), 202)


def test_a_large_body_does_not_stall_others(gated: Service, admin: Api) -> None:
    """A batch near the 16 MiB limit is parsed off the event loop, at C speed: /healthz
    keeps answering quickly."""
    queue = f"q_gate_{uuid.uuid4().hex[:8]}"
    jobs = [{"task": "t", "queue": queue, "args": ["y" * 15000]} for _ in range(1000)]
    body = json.dumps({"jobs": jobs}).encode()
    latencies: list[float] = []
    done = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=gated.url, timeout=10) as client:
            while not done.is_set():
                started = time.monotonic()
                expect(client.get("/healthz"), 200)
                latencies.append(time.monotonic() - started)
                time.sleep(0.01)

    thread = threading.Thread(target=probe)
    thread.start()
    try:
        response = admin.http.post(
            "/jobs/batch", content=body, headers={"content-type": "application/json"}
        )
    finally:
        done.set()
        thread.join(10)
    expect(response, 202)
    assert latencies and max(latencies) < 1.5, sorted(latencies)[-5:]


def test_no_cdn_pages_when_keys_are_set(gated: Service) -> None:
    """/docs and /redoc load scripts from a CDN: off on a service that holds keys."""
    for path in ("/docs", "/redoc"):
        assert_problem(httpx.get(f"{gated.url}{path}"), 404)
    assert expect(httpx.get(f"{gated.url}/openapi.json"), 200)["info"]["title"] == "celeriac"


def test_a_huge_request_head_is_refused(gated: Service) -> None:
    """httptools buffers headers of any size: the service caps the head at 64 KiB
    (431, connection closed) before any key is checked, and keeps serving."""
    for head in (
        f"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * (1024 * 1024)}\r\n",
        f"GET /{'b' * (200 * 1024)} HTTP/1.1\r\nHost: x\r\n",
        "GET /healthz HTTP/1.1\r\nHost: x\r\n" + "X-Many: 1\r\n" * 20000,
    ):
        response = raw_request(gated.url, head)
        # 431, or a reset before the client could read it (the rest of its head unread).
        assert response.startswith(b"HTTP/1.1 431") or not response, response[:200]
    expect(httpx.get(f"{gated.url}/healthz"), 200)
    # A head of a few KiB, and a body far larger than 64 KiB in the same request, are fine.
    headers = {"Authorization": f"Bearer {ADMIN_KEY}", "X-Padding": "p" * 8000}
    jobs = [{"task": "t", "queue": "q_gate_head", "args": ["z" * 1000]} for _ in range(200)]
    response = httpx.post(f"{gated.url}/jobs/batch", json={"jobs": jobs}, headers=headers)
    expect(response, 202)


def test_control_characters_in_the_url_are_refused(api: Api, queue: str) -> None:
    """%00 in a path parameter or a query value would reach SQL as text (PostgreSQL
    cannot hold it): one 400 for every route, before any lookup."""
    for path in (
        "/jobs/%00",
        "/jobs/a%00b/complete",
        "/workers/%00/heartbeat",
        "/schedules/%00",
        "/jobs?queue=%00",
        "/jobs?task=%01",
        "/jobs?queue=a%7Fb",
    ):
        method = "POST" if path.endswith(("complete", "heartbeat")) else "GET"
        response = api.http.request(method, path, json={"token": "t"} if method == "POST" else None)
        assert_problem(response, 400, "bad-request")
    api.submit(queue=queue)
    assert len(api.list_jobs(queue=queue)["jobs"]) == 1
