"""Issue 18: workflows over HTTP, driven by hand through the worker protocol (lease,
complete, fail) so each step is observed: the waiting status, fan-in, the parents'
results in the lease, both failure policies, cancel, and the 422s that name the problem.
Over the whole backend matrix; the tests with real workers are tests/test_workflows_run.py."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
from conftest import Api, Spawner, assert_problem, expect
from test_webhooks import FAST, Receiver, verify

# The backends this feature's behaviour depends on (the suite stays under 15 minutes).
pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.only_backends("sqlite-sql", "postgres-sql", "postgres-redis", "mariadb-sql"),
]


def _submit(api: Api, jobs: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
    response = api.http.post("/workflows", json={"jobs": jobs, **options})
    body: dict[str, Any] = expect(response, 202)
    assert response.headers["location"] == f"/workflows/{body['id']}"
    return body


def _ids(flow: dict[str, Any]) -> dict[str, str]:
    return {job["ref"]: job["id"] for job in flow["jobs"]}


def _workflow(api: Api, workflow_id: str) -> dict[str, Any]:
    body: dict[str, Any] = expect(api.http.get(f"/workflows/{workflow_id}"), 200)
    return body


def _statuses(api: Api, workflow_id: str) -> dict[str, str]:
    return {job["ref"]: job["status"] for job in _workflow(api, workflow_id)["jobs"]}


def _run(api: Api, queue: str, result_of: Any) -> dict[str, Any]:
    """Lease one job and complete it with ``result_of(job)``; the leased job."""
    leased = api.lease_one(queue)
    expect(api.complete(leased, result_of(leased)), 200)
    return leased


def _diamond(queue: str) -> list[dict[str, Any]]:
    return [
        {"ref": "a", "task": "t.a", "queue": queue, "args": [1]},
        {"ref": "b", "task": "t.b", "queue": queue, "after": ["a"]},
        {"ref": "c", "task": "t.c", "queue": queue, "after": ["a"]},
        {"ref": "d", "task": "t.d", "queue": queue, "after": ["b", "c"], "max_retries": 0},
    ]


def test_a_diamond_releases_each_job_once_its_parents_succeeded(api: Api, queue: str) -> None:
    flow = _submit(api, _diamond(queue))
    ids = _ids(flow)
    assert [job["status"] for job in flow["jobs"]] == ["queued", "waiting", "waiting", "waiting"]
    assert flow["status"] == "running"
    assert api.get(ids["b"])["status"] == "waiting"  # GET /jobs/{id} shows it
    a = _run(api, queue, lambda job: "A")
    assert a["id"] == ids["a"] and "parents" not in a  # a root carries no parents
    leased = {job["task"]: job for job in api.lease(queue, 10, wait=5)}
    assert set(leased) == {"t.b", "t.c"}, leased  # both released by a's settle
    assert leased["t.b"]["parents"] == {"a": "A"}
    assert leased["t.b"]["parent_status"] == {"a": "succeeded"}
    expect(api.complete(leased["t.b"], "B"), 200)
    assert api.lease(queue, 1, wait=0.2) == []  # d still waits for c
    assert _statuses(api, flow["id"])["d"] == "waiting"
    expect(api.complete(leased["t.c"], {"c": 3}), 200)
    d = api.lease_one(queue)
    assert d["id"] == ids["d"]
    assert d["parents"] == {"b": "B", "c": {"c": 3}}
    assert _workflow(api, flow["id"])["status"] == "running"
    expect(api.complete(d, "D"), 200)
    done = _workflow(api, flow["id"])
    assert done["status"] == "succeeded" and done["finished_at"] is not None
    assert [(j["ref"], j["status"], j["result"]) for j in done["jobs"]] == [
        ("a", "succeeded", "A"),
        ("b", "succeeded", "B"),
        ("c", "succeeded", {"c": 3}),
        ("d", "succeeded", "D"),
    ]


def test_parents_arg_puts_the_results_first_in_args(api: Api, queue: str) -> None:
    flow = _submit(
        api,
        [
            {"ref": "x", "task": "t.x", "queue": queue},
            {"ref": "y", "task": "t.y", "queue": queue},
            {"ref": "one", "task": "t.one", "queue": queue, "args": [5], "after": ["x"],
             "parents_arg": "one"},
            {"ref": "all", "task": "t.all", "queue": queue, "args": [6], "after": ["y", "x"],
             "parents_arg": "list"},
        ],
    )  # fmt: skip
    for job in api.lease(queue, 2, wait=5):
        expect(api.complete(job, job["task"]), 200)
    leased = {job["task"]: job for job in api.lease(queue, 2, wait=5)}
    if len(leased) < 2:
        leased |= {job["task"]: job for job in api.lease(queue, 2, wait=5)}
    assert leased["t.one"]["args"] == ["t.x", 5]
    assert leased["t.all"]["args"] == [["t.y", "t.x"], 6]  # in `after` order
    assert api.get(_ids(flow)["all"])["args"] == [["t.y", "t.x"], 6]


def test_a_failure_cancels_everything_downstream(api: Api, queue: str) -> None:
    jobs = [*_diamond(queue), {"ref": "e", "task": "t.e", "queue": queue, "after": ["d"]}]
    jobs[1]["max_retries"] = 0
    flow = _submit(api, jobs)
    ids = _ids(flow)
    _run(api, queue, lambda job: 1)
    leased = {job["task"]: job for job in api.lease(queue, 2, wait=5)}
    expect(api.fail(leased["t.b"], "Boom", "b broke", retry=False), 200)
    statuses = _statuses(api, flow["id"])
    assert statuses == {"a": "succeeded", "b": "failed", "c": "running", "d": "cancelled",
                        "e": "cancelled"}  # fmt: skip
    d = api.get(ids["d"])
    assert d["error"]["type"] == "ParentFailed"
    assert "'b'" in d["error"]["message"] and ids["b"] in d["error"]["message"]
    assert "'b'" in api.get(ids["e"])["error"]["message"]  # names the job upstream
    assert _workflow(api, flow["id"])["status"] == "running"  # c still runs
    expect(api.complete(leased["t.c"], 2), 200)  # releases nothing: d is cancelled
    assert api.lease(queue, 1, wait=0.2) == []
    assert _workflow(api, flow["id"])["status"] == "failed"


def test_continue_runs_the_children_with_the_parents_status(api: Api, queue: str) -> None:
    jobs = _diamond(queue)
    jobs[1]["max_retries"] = 0
    flow = _submit(api, jobs, on_failure="continue")
    _run(api, queue, lambda job: 1)
    leased = {job["task"]: job for job in api.lease(queue, 2, wait=5)}
    expect(api.fail(leased["t.b"], retry=False), 200)
    expect(api.complete(leased["t.c"], "C"), 200)
    d = api.lease_one(queue)
    assert d["parents"] == {"b": None, "c": "C"}
    assert d["parent_status"] == {"b": "failed", "c": "succeeded"}
    expect(api.complete(d, "D"), 200)
    assert _workflow(api, flow["id"])["status"] == "failed"  # one of its jobs failed


def test_cancel_midway_cancels_what_has_not_finished(api: Api, queue: str) -> None:
    flow = _submit(api, _diamond(queue))
    a = api.lease_one(queue)
    cancelled = expect(api.http.post(f"/workflows/{flow['id']}/cancel"), 200)
    assert {j["ref"]: j["status"] for j in cancelled["jobs"]} == {
        "a": "running", "b": "cancelled", "c": "cancelled", "d": "cancelled"
    }  # fmt: skip
    assert cancelled["status"] == "running"  # a still runs, told at its next heartbeat
    assert expect(api.heartbeat(a), 200)["cancel_requested"] is True
    expect(api.complete(a, "A"), 200)  # finished anyway: releases nothing
    assert api.lease(queue, 1, wait=0.2) == []
    assert _workflow(api, flow["id"])["status"] == "cancelled"


def test_cancelling_one_waiting_job_cancels_its_dependents(api: Api, queue: str) -> None:
    flow = _submit(api, _diamond(queue))
    ids = _ids(flow)
    expect(api.cancel(ids["b"]), 200)
    assert _statuses(api, flow["id"]) == {
        "a": "queued", "b": "cancelled", "c": "waiting", "d": "cancelled"
    }  # fmt: skip


def test_the_graph_is_checked_and_the_problem_named(api: Api, queue: str) -> None:
    def refused(jobs: list[dict[str, Any]], *words: str) -> None:
        response = api.http.post("/workflows", json={"jobs": jobs})
        assert_problem(response, 422)
        for word in words:
            assert word in response.json()["detail"], response.json()

    job = {"task": "t", "queue": queue}
    refused([{**job, "ref": "a", "after": ["b"]}, {**job, "ref": "b", "after": ["a"]}],
            "cycle", "a → b → a")  # fmt: skip
    refused([{**job, "ref": "a", "after": ["a"]}], "cycle", "a → a")
    refused([{**job, "ref": "a"}, {**job, "ref": "b", "after": ["zz"]}], "unknown ref 'zz'")
    refused([{**job, "ref": "a"}, {**job, "ref": "a"}], "used twice")
    refused([{**job, "ref": "a"}, {**job, "ref": "b", "after": ["a"], "delay": 5}], "delay")
    assert api.list_jobs(queue=queue)["jobs"] == []  # nothing stored


def test_a_wide_fan_in_is_released_once_by_its_last_parent(api: Api, queue: str) -> None:
    width = 300
    jobs = [{"ref": f"p{i}", "task": "t.p", "queue": queue, "args": [i]} for i in range(width)]
    jobs.append({"ref": "sum", "task": "t.sum", "queue": queue, "after": [f"p{i}" for i in
                 range(width)], "parents_arg": "list"})  # fmt: skip
    flow = _submit(api, jobs)
    done = 0
    while done < width:
        batch = api.lease(queue, 100, wait=5)
        assert all(job["task"] == "t.p" for job in batch)
        reports = [{"id": j["id"], "token": j["lease"]["token"], "outcome": "succeeded",
                    "result": j["args"][0]} for j in batch]  # fmt: skip
        expect(api.http.post("/leases/report", json={"reports": reports}), 200)
        done += len(batch)
    final = api.lease(queue, 10, wait=5)
    assert len(final) == 1 and final[0]["task"] == "t.sum"
    assert final[0]["args"] == [list(range(width))]
    assert _workflow(api, flow["id"])["status"] == "running"


@pytest.mark.parametrize("database", ["postgres", "mariadb"])
def test_parents_settled_at_once_on_two_replicas_release_the_child_once(
    spawner: Spawner, database: str
) -> None:
    """200 parents settled by 20 threads through two replicas at once: the child is
    queued by the last settle only, so its lease sees every parent succeeded."""
    replicas = spawner.replicas(spawner.backend(database, "sql"), 2)
    queue, width = f"q_{uuid.uuid4().hex[:8]}", 200
    jobs = [{"ref": f"p{i}", "task": "t.p", "queue": queue, "args": [i]} for i in range(width)]
    jobs.append({"ref": "child", "task": "t.child", "queue": f"{queue}-c",
                 "after": [f"p{i}" for i in range(width)]})  # fmt: skip
    api = spawner.api(replicas[0].url)
    _submit(api, jobs)
    leased = api.lease(queue, width, wait=5, lease_seconds=120)
    assert len(leased) == width
    start = threading.Barrier(20)
    began = time.monotonic()

    def settle(sender: int) -> None:
        mine = leased[sender::20]
        reports = [{"id": j["id"], "token": j["lease"]["token"], "outcome": "succeeded",
                    "result": j["args"][0]} for j in mine]  # fmt: skip
        with Api(replicas[sender % 2].url) as client:
            start.wait(timeout=30)
            for report in reports:  # one report per request: as many transactions
                answer = expect(client.http.post("/leases/report", json={"reports": [report]}), 200)
                assert answer["reports"][0]["ok"], answer

    threads = [threading.Thread(target=settle, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    took = time.monotonic() - began
    child = api.lease(f"{queue}-c", 10, wait=5)
    assert len(child) == 1, f"settles took {took:.1f} s"
    assert child[0]["parent_status"] == {f"p{i}": "succeeded" for i in range(width)}
    assert child[0]["parents"] == {f"p{i}": i for i in range(width)}
    assert api.lease(f"{queue}-c", 10, wait=0.5) == []


def test_a_workflow_webhook_fires_when_it_finishes(spawner: Spawner) -> None:
    receiver = Receiver()
    try:
        service = spawner.service(extra=FAST)
        api, queue = spawner.api(service.url), f"q_{uuid.uuid4().hex[:8]}"
        hook = {"url": receiver.url(f"/{queue}/done")}
        flow = _submit(api, _diamond(queue)[:2], webhook=hook)
        for _ in range(2):
            _run(api, queue, lambda job: job["task"])
        [got] = receiver.wait(f"/{queue}/done")
        payload = verify(got)
        assert payload["type"] == "workflow.succeeded"
        assert payload["data"]["workflow_id"] == flow["id"]
        assert payload["data"]["status"] == "succeeded"
        assert payload["data"]["last_job"]["id"] == _ids(flow)["b"]
        # events filters by the workflow's final status; a failure cancels b, which
        # finishes the workflow in the same transaction.
        only = {"url": receiver.url(f"/{queue}/failed"), "events": ["failed"]}
        failing = _submit(api, _diamond(queue)[:2], webhook=only)
        expect(api.fail(api.lease_one(queue), retry=False), 200)
        [got] = receiver.wait(f"/{queue}/failed")
        assert verify(got)["data"] == {
            "workflow_id": failing["id"], "status": "failed",
            "last_job": api.get(_ids(failing)["b"]),
        }  # fmt: skip
        assert receiver.at(f"/{queue}/done") != [] and len(receiver.at(f"/{queue}/done")) == 1
    finally:
        receiver.close()
