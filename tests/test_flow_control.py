"""Issue 15, flow control enforced by the service (docs/flow-control.md): named limits
and patterns, queue settings (pause, a queue's own limits), unique and debounced submits.
Against a real ``celeriac serve`` over the backend matrix; the invariants under real
workers are in tests/test_flow_invariants.py."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from conftest import Api, Service, assert_problem, expect

# The backends this feature's behaviour depends on (the suite stays under 15 minutes).
pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.only_backends("sqlite-sql", "postgres-redis", "mariadb-sql"),
]


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_limits_put_get_list_delete(api: Api) -> None:
    name = _name("stripe")
    body = expect(api.http.put(f"/limits/{name}", json={"max_running": 2}), 200)
    assert body == {"name": name, "max_running": 2, "rate": None, "pattern": False, "running": 0}
    rate = {"limit": 100, "period": 60.0}
    body = expect(api.http.put(f"/limits/{name}", json={"rate": rate}), 200)
    assert (body["max_running"], body["rate"]) == (None, rate)  # PUT replaces
    assert expect(api.http.get(f"/limits/{name}"), 200) == body
    pattern = _name("customer") + "-*"
    assert expect(api.http.put(f"/limits/{pattern}", json={"max_running": 1}), 200)["pattern"]
    names = [limit["name"] for limit in expect(api.http.get("/limits"), 200)["limits"]]
    assert {name, pattern} <= set(names)
    assert api.http.delete(f"/limits/{name}").status_code == 204
    assert_problem(api.http.get(f"/limits/{name}"), 404)
    assert_problem(api.http.delete(f"/limits/{name}"), 404)


def test_limit_input_is_checked(api: Api) -> None:
    assert_problem(api.http.put("/limits/x", json={}), 422)  # neither field
    assert_problem(api.http.put("/limits/x", json={"max_running": 0}), 422)
    assert_problem(api.http.put("/limits/x", json={"rate": {"limit": 1, "period": 0}}), 422)
    assert_problem(api.http.put("/limits/a*b", json={"max_running": 1}), 422)
    assert_problem(api.http.put("/limits/x", json={"max_running": 1, "extra": 1}), 422)
    assert_problem(api.http.post("/jobs", json={"task": "t", "limits": ["no spaces"]}), 422)
    unique_and_debounce = {"unique": {"key": "k"}, "debounce": {"key": "k", "period": 1}}
    assert_problem(api.http.post("/jobs", json={"task": "t", **unique_and_debounce}), 422)
    batch = {"jobs": [{"task": "t", "unique": {"key": "k"}}]}
    assert_problem(api.http.post("/jobs/batch", json=batch), 422)


def test_queue_settings_patch_and_get(api: Api, queue: str) -> None:
    api.submit(queue=queue)
    body = expect(api.http.get(f"/queues/{queue}"), 200)
    assert body == {"name": queue, "paused": False, "max_running": None, "rate": None,
                    "counts": {"queued": 1}}  # fmt: skip
    body = expect(api.http.patch(f"/queues/{queue}", json={"paused": True, "max_running": 3}), 200)
    assert (body["paused"], body["max_running"]) == (True, 3)
    body = expect(api.http.patch(f"/queues/{queue}", json={"max_running": None}), 200)
    assert (body["paused"], body["max_running"]) == (True, None)  # only what was given
    assert_problem(api.http.patch(f"/queues/{queue}", json={"paused": None}), 422)
    assert_problem(api.http.patch("/queues/bad name", json={"paused": True}), 422)
    expect(api.http.patch(f"/queues/{queue}", json={"paused": False}), 200)


def test_a_paused_queue_accepts_jobs_and_leases_nothing(api: Api, queue: str) -> None:
    expect(api.http.patch(f"/queues/{queue}", json={"paused": True}), 200)
    job = api.submit(queue=queue)
    time.sleep(0.6)  # past every replica's view of the paused queues (PAUSED_VIEW_SECONDS)
    assert api.lease(queue, wait=0) == []
    assert api.get(job["id"])["blocked_by"] == [f"queue/{queue}"]
    expect(api.http.patch(f"/queues/{queue}", json={"paused": False}), 200)
    assert api.lease_one(queue, wait=5)["id"] == job["id"]


def test_resume_wakes_a_waiting_long_poll(api: Api, service: object, queue: str) -> None:
    expect(api.http.patch(f"/queues/{queue}", json={"paused": True}), 200)
    job = api.submit(queue=queue)
    got: list[object] = []
    with Api(api.base_url) as other:
        poll = threading.Thread(target=lambda: got.extend(other.lease(queue, wait=20)))
        poll.start()
        time.sleep(1.0)  # the long-poll is waiting on the paused queue
        assert got == []
        resumed = time.monotonic()
        expect(api.http.patch(f"/queues/{queue}", json={"paused": False}), 200)
        poll.join(15)
    assert [j["id"] for j in got] == [job["id"]]  # type: ignore[index]
    assert time.monotonic() - resumed < 2.0


def test_unique_answers_the_existing_job_with_200(api: Api, queue: str) -> None:
    spec = {"task": "tests.noop", "queue": queue, "unique": {"key": _name("report")}}
    first = api.submit(**spec)
    response = api.http.post("/jobs", json={**spec, "args": [1]})
    again = expect(response, 200)
    assert again["id"] == first["id"] and again["unique_key"] == spec["unique"]["key"]
    # The default key is a hash of task, queue, args and kwargs.
    plain = {"task": "tests.noop", "queue": queue, "args": [7], "unique": {}}
    made = api.submit(**plain)
    assert expect(api.http.post("/jobs", json=plain), 200)["id"] == made["id"]
    assert api.submit(**{**plain, "args": [8]})["id"] != made["id"]
    # Once the job has left the states the key holds in, a submit makes a new one.
    leased = api.lease_one(queue, wait=5)
    expect(api.complete(leased), 200)
    finished = first if leased["id"] == first["id"] else made
    key_spec = spec if finished is first else plain
    assert api.submit(**key_spec)["id"] != finished["id"]


def test_unique_for_holds_after_the_job_finished(api: Api, queue: str) -> None:
    spec = {"task": "tests.noop", "queue": queue, "unique": {"key": _name("u"), "for": 60}}
    first = api.submit(**spec)
    expect(api.complete(api.lease_one(queue, wait=5)), 200)
    assert expect(api.http.post("/jobs", json=spec), 200)["id"] == first["id"]


def test_debounce_replaces_args_and_pushes_the_start(api: Api, queue: str) -> None:
    key = _name("reindex")
    spec = {"task": "tests.noop", "queue": queue, "debounce": {"key": key, "period": 30}}
    first = api.submit(**spec, args=[1])
    assert first["status"] == "scheduled" and first["debounce_key"] == key
    time.sleep(0.05)
    again = expect(api.http.post("/jobs", json={**spec, "args": [2]}), 200)
    assert again["id"] == first["id"] and again["args"] == [2]
    assert again["run_at"] > first["run_at"]
    # Once due (here: a short period), the job runs with the last arguments, and the next
    # submit makes a new job.
    short = {**spec, "debounce": {"key": key, "period": 0.2}, "args": [3]}
    expect(api.http.post("/jobs", json=short), 200)
    leased = api.lease_one(queue, wait=10)
    assert (leased["id"], leased["args"]) == (first["id"], [3])
    assert api.submit(**spec)["id"] != first["id"]


def test_concurrent_unique_submits_make_one_job(api: Api, queue: str) -> None:
    spec = {"task": "tests.noop", "queue": queue, "unique": {"key": _name("race")}}
    answers: list[tuple[int, str]] = []

    def submit() -> None:
        with Api(api.base_url) as own:
            response = own.http.post("/jobs", json=spec)
            answers.append((response.status_code, response.json()["id"]))

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len({job_id for _, job_id in answers}) == 1, answers
    assert sorted(code for code, _ in answers) == [200] * 7 + [202]


def test_the_python_api_sends_flow_options(service: Service, api: Api, queue: str) -> None:
    from celeriac import Celeriac, Client
    from celeriac.cli import cli
    from typer.testing import CliRunner

    app = Celeriac("flowapi", server=service.url)
    try:

        @app.task(name="flowapi.report", queue=queue, limits=["py-a"], unique=True)
        def report(n: int) -> int:
            return n

        first = report.delay(1)
        assert first.refresh()["limits"] == ["py-a"]
        assert report.delay(1).id == first.id  # unique: the same job (200)
        other = report.apply_async([2], limits=["py-b"], unique=False)
        assert api.get(other.id)["limits"] == ["py-b"]
        key = _name("py-debounce")
        made = report.apply_async([3], unique=False, debounce={"key": key, "period": 30})
        again = report.apply_async([4], unique=False, debounce={"key": key, "period": 30})
        assert again.id == made.id and api.get(made.id)["args"] == [4]
    finally:
        app.close()
    with Client(service.url) as client:
        assert client.set_limit("py-a", max_running=1)["max_running"] == 1
        assert "py-a" in {limit["name"] for limit in client.limits()}
        client.delete_limit("py-a")
    runner = CliRunner()
    paused = runner.invoke(cli, ["queues", "pause", queue, "--server", service.url])
    assert paused.exit_code == 0 and '"paused": true' in paused.output, paused.output
    resumed = runner.invoke(cli, ["queues", "resume", queue, "--server", service.url])
    assert resumed.exit_code == 0 and '"paused": false' in resumed.output, resumed.output
