"""Issue 16: Prometheus metrics and structured logs, end to end.

A real ``celeriac serve`` (JSON logs, API keys, a metrics key) and a real ``celeriac
worker`` (JSON logs, ``--metrics-port``) run 10 jobs, 7 that succeed and 3 that fail; the
service's and the worker's ``/metrics`` are read with prometheus_client's own parser and
must say exactly that. On PostgreSQL with Redis the worker takes the Redis protocol, so
the counts also come through the service's event ingest. A lease left to run out shows
the reclaim counter and the service's one JSON log line about that job. Neither log may
hold a credential."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from conftest import (
    REDIS_HOST,
    REDIS_PORT,
    SELECTED_BACKENDS,
    SERVICE_TUNING,
    Process,
    Service,
    Spawner,
    expect,
    free_port,
    service_command,
    wait_ready,
)
from prometheus_client.parser import text_string_to_metric_families

from service.effects import Effects, Ended
from service.metrics import FINAL_EVERY, MAX_SERIES, OTHER, Metrics

T = TypeVar("T")

ADMIN_KEY = "ops-admin-key-0123456789abcdefgh"
WORKER_KEY = "ops-worker-key-0123456789abcdefg"
READ_KEY = "ops-read-key-0123456789abcdefghi"
METRICS_KEY = "ops-metrics-key-0123456789abcdef"
TENANT_KEY = "ops-tenant-key-0123456789abcdefg"
SECRETS = (ADMIN_KEY, WORKER_KEY, READ_KEY, METRICS_KEY, TENANT_KEY)
TASKS = """
import logging
from celeriac import Celeriac

app = Celeriac("ops")


@app.task(name="ops.work")
def work(n: int, fail: bool) -> int:
    logging.getLogger("ops.tasks").warning("working on %d", n)
    if fail:
        raise RuntimeError(f"job {n} fails as asked")
    return n
"""
SUCCEED, FAIL = 7, 3


def eventually(check: Callable[[], T], timeout: float = 20.0, what: str = "condition") -> T:
    """Poll ``check`` (the state lives in other processes: nothing to block on)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str, headers: dict[str, str] | None = None) -> Samples:
    """Every sample of ``url``'s /metrics, parsed by prometheus_client's own parser."""
    response = httpx.get(f"{url}/metrics", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def json_lines(process: Process) -> list[dict[str, Any]]:
    """The process's log, every line of which must be one JSON object."""
    lines = [line for line in process.log_path.read_text().splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON log line: {line!r}") from None
        assert isinstance(entry, dict) and {"ts", "level", "logger", "message"} <= set(entry)
        parsed.append(entry)
    return parsed


def start_json_service(spawner: Spawner, settings: dict[str, str]) -> Service:
    """``celeriac serve --log-format json`` (the flag, not the variable)."""
    port = free_port()
    command = service_command(port, "--log-format", "json")
    process = spawner.process(command, f"service-{port}", settings)
    service = Service(process.proc, process.log_path, f"http://127.0.0.1:{port}", None, settings)
    wait_ready(service)
    return service


COMBOS = [c for c in ("sqlite-sql", "postgres-redis") if c in SELECTED_BACKENDS]


@pytest.mark.skipif(not COMBOS, reason="needs sqlite-sql or postgres-redis selected")
@pytest.mark.parametrize("combo", COMBOS)
def test_metrics_and_json_logs_tell_what_happened(
    combo: str, spawner: Spawner, tmp_path: Path
) -> None:
    database, broker = combo.split("-")
    backend = spawner.backend(database, broker)
    keys = f"{ADMIN_KEY}:admin,{WORKER_KEY}:work,{READ_KEY}:read"
    settings = {**backend.env(), **SERVICE_TUNING, "CELERIAC_API_KEYS": keys,
                "CELERIAC_METRICS_KEY": METRICS_KEY, "CELERIAC_LOG_LEVEL": "info",
                "CELERIAC_METRICS_REFRESH_SECONDS": "0"}  # fmt: skip
    service = start_json_service(spawner, settings)
    admin = spawner.api(service.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    queue = f"ops_{combo.replace('-', '_')}_{int(time.time() * 1000) % 100000}"

    (tmp_path / "ops_tasks.py").write_text(TASKS)
    worker_args = ["-A", "ops_tasks:app", "-Q", queue, "-c", "4", "--poll-wait", "1",
                   "-n", f"ops-{combo}", "--metrics-port", "0"]  # fmt: skip
    worker_env = {"CELERIAC_SERVER_URL": service.url, "CELERIAC_API_KEY": WORKER_KEY,
                  "PYTHONPATH": str(tmp_path)}  # fmt: skip
    if broker == "redis":  # the Redis protocol, and the variable instead of the flag
        worker_args += ["--broker", f"redis://{REDIS_HOST}:{REDIS_PORT}/{backend.redis_db}",
                        "--redis-prefix", backend.redis_prefix]  # fmt: skip
        worker_env["CELERIAC_LOG_FORMAT"] = "json"
    else:
        worker_args += ["--log-format", "json"]
    worker = spawner.process(
        [sys.executable, "-m", "celeriac", "worker", *worker_args], "worker", worker_env
    )

    jobs = [admin.submit(task="ops.work", queue=queue, args=[n, n >= SUCCEED], max_retries=0)
            for n in range(SUCCEED + FAIL)]  # fmt: skip
    finished = [admin.get(job["id"], wait=20) for job in jobs]
    assert [j["status"] for j in finished] == ["succeeded"] * SUCCEED + ["failed"] * FAIL

    def counted() -> Samples | None:
        """The metrics once the last finish is counted: that happens right after its
        commit, which a waiter elsewhere (NOTIFY) may hear of a moment before."""
        samples = scrape(service.url, {"Authorization": f"Bearer {METRICS_KEY}"})
        done = value(samples, "celeriac_job_run_seconds_count", queue=queue, task="ops.work")
        return samples if done >= SUCCEED + FAIL else None

    metrics = eventually(counted, timeout=5, what="the finishes counted")
    assert value(metrics, "celeriac_jobs_submitted_total", queue=queue) == 10
    for status, count in (("succeeded", SUCCEED), ("failed", FAIL)):
        labels = {"queue": queue, "task": "ops.work"}
        assert value(metrics, "celeriac_jobs_finished_total", **labels, status=status) == count
        assert value(metrics, "celeriac_job_attempts_total", **labels, outcome=status) == count
        assert value(metrics, "celeriac_queue_jobs", queue=queue, status=status) == count
    assert value(metrics, "celeriac_queue_jobs", queue=queue, status="queued") == 0
    assert value(metrics, "celeriac_queue_oldest_age_seconds", queue=queue) == 0
    for histogram in ("celeriac_job_run_seconds", "celeriac_job_wait_seconds"):
        assert value(metrics, f"{histogram}_count", queue=queue, task="ops.work") == 10
        assert value(metrics, f"{histogram}_bucket", queue=queue, task="ops.work", le="+Inf") == 10
    if broker == "redis":
        assert value(metrics, "celeriac_redis_leases_recorded_total") >= 10
        assert value(metrics, "celeriac_leases_granted_total", queue=queue) == 0
    else:
        assert value(metrics, "celeriac_leases_granted_total", queue=queue) == 10
    routes = {dict(labels)["route"] for name, labels in metrics
              if name == "celeriac_http_requests_total"}  # fmt: skip
    assert value(metrics, "celeriac_http_requests_total", method="POST", route="/jobs",
                 status="202") == 10  # fmt: skip
    assert "/jobs/{job_id}" in routes and not any(job["id"] in r for r in routes for job in jobs)

    # The worker's own metrics, on the port it logged.
    worker_log = eventually(lambda: [e for e in json_lines(worker)
                                     if e["message"].startswith("metrics on http")],
                            what="the worker's metrics address")  # fmt: skip
    worker_url = worker_log[0]["message"].split()[-1].removesuffix("/metrics")
    own = scrape(worker_url)
    node = f"ops-{combo}"
    for outcome, count in (("succeeded", SUCCEED), ("failed", FAIL)):
        labels = {"worker": node, "task": "ops.work", "outcome": outcome}
        assert value(own, "celeriac_worker_jobs_total", **labels) == count
    assert value(own, "celeriac_worker_job_run_seconds_count", worker=node, task="ops.work") == 10
    assert value(own, "celeriac_worker_leased_jobs_total", worker=node) == 10
    assert value(own, "celeriac_worker_concurrency", worker=node) == 4

    # A lease left to run out: counted, and logged once with the job's fields.
    lost = admin.submit(task="ops.lost", queue=f"{queue}_lost")
    work = spawner.api(service.url, headers={"Authorization": f"Bearer {WORKER_KEY}"})
    [leased] = work.lease(f"{queue}_lost", worker="ops-vanishing", lease_seconds=0.3)
    assert leased["id"] == lost["id"]
    eventually(lambda: admin.get(lost["id"])["status"] == "queued", what="the reclaim")
    metrics = scrape(service.url, {"Authorization": f"Bearer {READ_KEY}"})
    assert value(metrics, "celeriac_leases_reclaimed_total", queue=f"{queue}_lost") == 1
    reclaim_lines = eventually(lambda: [e for e in json_lines(service)
                                        if e.get("job_id") == lost["id"]],
                               what="the reclaim's log line")  # fmt: skip
    assert reclaim_lines[0] | {"task": "ops.lost", "queue": f"{queue}_lost", "attempt": 1,
                               "worker": "ops-vanishing"} == reclaim_lines[0]  # fmt: skip

    # The worker's JSON lines about our jobs name them; no log holds a credential.
    worker.stop()
    entries = json_lines(worker)
    about = {e["job_id"]: e for e in entries if e.get("message", "").startswith("working on")}
    assert set(about) == {job["id"] for job in jobs}
    first = about[jobs[0]["id"]]
    assert (first["task"], first["queue"], first["attempt"], first["worker"]) == (
        "ops.work", queue, 1, node)  # fmt: skip
    failures = [e for e in entries if e["level"] == "warning" and "raised RuntimeError" in
                e["message"]]  # fmt: skip
    assert {e["job_id"] for e in failures} == {job["id"] for job in jobs[SUCCEED:]}
    for process in (service, worker):
        text = process.log_path.read_text()
        assert not any(secret in text for secret in SECRETS), "a key reached the log"


def test_metrics_access_with_keys(spawner: Spawner) -> None:
    keys = f"{ADMIN_KEY}:admin,{WORKER_KEY}:work,{READ_KEY}:read,{TENANT_KEY}:read@emails-*"
    service = spawner.service(
        extra={"CELERIAC_API_KEYS": keys, "CELERIAC_METRICS_KEY": METRICS_KEY}
    )
    with httpx.Client(base_url=service.url, timeout=10) as http:

        def status(key: str | None, path: str = "/metrics") -> int:
            headers = {} if key is None else {"Authorization": f"Bearer {key}"}
            return http.get(path, headers=headers).status_code

        assert status(None) == 401
        assert status("not-a-key-at-all-but-long-enough") == 401
        assert status(WORKER_KEY) == 403  # a key without the read scope
        assert status(TENANT_KEY) == 403  # confined to some queues: the metrics name all
        assert status(READ_KEY) == 200
        assert status(ADMIN_KEY) == 200
        assert status(METRICS_KEY) == 200
        assert http.get("/metrics", headers={"X-Api-Key": METRICS_KEY}).status_code == 200
        assert status(METRICS_KEY, "/queues") == 401  # it opens /metrics and nothing else
    assert METRICS_KEY not in service.log(100000)


@pytest.mark.first_backend_only
def test_metrics_open_without_keys_and_openapi_documents_it(service: Service) -> None:
    text = httpx.get(f"{service.url}/metrics", timeout=10).text
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {"celeriac_jobs_submitted", "celeriac_queue_jobs",
            "celeriac_queue_oldest_age_seconds", "celeriac_http_requests"} <= names  # fmt: skip
    document = expect(httpx.get(f"{service.url}/openapi.json", timeout=10), 200)
    assert "text/plain" in document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


def test_serve_refuses_an_unknown_log_format(spawner: Spawner) -> None:
    command = service_command(free_port(), "--log-format", "yaml")
    process = spawner.process(command, "bad-format", {"CELERIAC_DATABASE_URL": "sqlite://"})
    assert process.proc.wait(timeout=30) == 2
    assert "unknown log format 'yaml'" in process.log()


def test_worker_refuses_a_taken_metrics_port_and_an_unknown_log_format(
    spawner: Spawner, tmp_path: Path
) -> None:
    (tmp_path / "ops_tasks.py").write_text(TASKS)
    env = {"PYTHONPATH": str(tmp_path), "CELERIAC_SERVER_URL": "http://127.0.0.1:9"}
    worker = [sys.executable, "-m", "celeriac", "worker", "-A", "ops_tasks:app"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        busy = spawner.process([*worker, "--metrics-port", port], "busy-port", env)
        assert busy.proc.wait(timeout=30) == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in busy.log()
    bad = spawner.process([*worker, "--log-format", "yaml"], "bad-format", env)
    assert bad.proc.wait(timeout=30) == 2
    assert "unknown log format 'yaml'" in bad.log()


# --- in process: the cache and the label cap ------------------------------------------


def test_queue_gauges_are_read_once_per_interval_however_many_scrapes() -> None:
    metrics = Metrics(refresh_seconds=60.0)
    session = _FakeSession()

    async def read(work: Any) -> Any:
        await asyncio.sleep(0.05)  # a slow GROUP BY: every scrape meanwhile shares it
        return work(session)

    async def scrapes() -> None:
        now = datetime.now(UTC)
        await asyncio.gather(*(metrics.refresh_queues(read, lambda: now) for _ in range(50)))
        await metrics.refresh_queues(read, lambda: now)  # later, within the interval

    asyncio.run(scrapes())
    assert session.queries == {"active": 1, "final": 1}
    families = {f.name: f for f in text_string_to_metric_families(_exposition(metrics))}
    [age] = families["celeriac_queue_oldest_age_seconds"].samples
    assert age.labels == {"queue": "emails"} and age.value == pytest.approx(30.0, abs=1)

    # Past the interval the active statuses are read again; the finished ones (a scan of
    # the table's bulk) only every FINAL_EVERY reads, and kept meanwhile.
    metrics.refresh_seconds = 0
    for _ in range(FINAL_EVERY - 1):
        asyncio.run(metrics.refresh_queues(read, lambda: datetime.now(UTC)))
    assert session.queries == {"active": FINAL_EVERY, "final": 1}
    text = _exposition(metrics)
    assert 'celeriac_queue_jobs{queue="emails",status="succeeded"} 5.0' in text
    asyncio.run(metrics.refresh_queues(read, lambda: datetime.now(UTC)))
    assert session.queries == {"active": FINAL_EVERY + 1, "final": 2}


def test_labels_from_clients_are_capped() -> None:
    metrics = Metrics()
    ended = [Ended(f"id{n}", "q", f"task-{n}", "succeeded", 1) for n in range(MAX_SERIES + 50)]
    metrics.committed(Effects(ended=ended))
    families = {f.name: f for f in text_string_to_metric_families(_exposition(metrics))}
    samples = [s for s in families["celeriac_jobs_finished"].samples if s.name.endswith("_total")]
    assert len(samples) == MAX_SERIES + 1
    [other] = [s for s in samples if s.labels["task"] == OTHER]
    assert other.value == 50


class _FakeSession:
    """Stands in for the session the gauges' queries run on: one queue, five jobs
    succeeded and one queued 30 s ago; counts the queries."""

    def __init__(self) -> None:
        self.queries = {"active": 0, "final": 0}

    def execute(self, statement: Any) -> Any:
        if "min(" not in str(statement):  # the final statuses' counts
            self.queries["final"] += 1
            return [("emails", "succeeded", 5)]
        self.queries["active"] += 1
        return [("emails", "queued", 1, datetime.now(UTC) - timedelta(seconds=30))]


def _exposition(metrics: Metrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


def test_json_log_lines_mask_credentials_and_name_the_job() -> None:
    from celeriac._logging import JsonFormatter
    from celeriac.context import JobContext, set_current_job

    formatter = JsonFormatter("w1@host")

    def line(message: str, *args: object, exc: bool = False, **extra: object) -> dict[str, Any]:
        record = logging.LogRecord("t", logging.WARNING, __file__, 1, message, args, None)
        if exc:
            try:
                raise ValueError("redis://:hunter2@cache:6379/0 refused")
            except ValueError:
                record.exc_info = sys.exc_info()
        record.__dict__.update(extra)
        parsed: dict[str, Any] = json.loads(formatter.format(record))
        return parsed

    masked = line("connect %s failed; header Authorization: Bearer %s", "postgresql://u:s3cret@db/x",
                  "tok-123", exc=True)  # fmt: skip
    assert "s3cret" not in json.dumps(masked) and "tok-123" not in json.dumps(masked)
    assert "hunter2" not in masked["exc"] and "postgresql://u:***@db/x" in masked["message"]
    assert masked["node"] == "w1@host" and "job_id" not in masked

    set_current_job(JobContext("j1", "emails.send", 2, "emails", "w1@host"))
    try:
        inside = line("sending")
        given = line("about another", job_id="j2", task="t2", queue="q2", attempt=1, worker="w")
    finally:
        set_current_job(None)
    assert {k: inside[k] for k in ("job_id", "task", "queue", "attempt", "worker")} == {
        "job_id": "j1", "task": "emails.send", "queue": "emails", "attempt": 2,
        "worker": "w1@host"}  # fmt: skip
    assert given["job_id"] == "j2" and given["attempt"] == 1


def test_a_counting_failure_never_reaches_the_runtime(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    broken = Ended("id", "q", "t", "succeeded", 1, started_at=datetime.now(UTC),
                   ended_at=datetime.now())  # naive minus aware: a TypeError  # fmt: skip
    with caplog.at_level(logging.ERROR, "celeriac.service"):
        metrics.committed(Effects(ended=[broken]))
        metrics.committed(Effects(ended=[broken]))
    assert len([r for r in caplog.records if "metrics: counting" in r.getMessage()]) == 1
