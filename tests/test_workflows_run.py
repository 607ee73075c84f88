"""Issue 18: workflows run by real workers — the Python canvas (chain, group, chord,
nesting) on ``celeriac worker`` processes, failure both ways, a cancel mid-way, a chord
of 1,000 under a kill storm, and the diamond driven by the curl/sh worker."""

from __future__ import annotations

import shutil
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tasks_for_workflows as wf
from celeriac import JobFailed, chain, chord, group
from conftest import REPO, Api, Process, Service, Spawner, expect

# The backends this feature's behaviour depends on (the suite stays under 15 minutes).
pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.only_backends("sqlite-sql", "postgres-redis", "mariadb-sql"),
]
# The kill storm and the sh worker cost seconds each: run on the embedded default and on
# PostgreSQL + Redis (the settle's SQL is the same on every backend; tests/test_workflows.py
# drives it on all of them).
HEAVY_BACKENDS = ("sqlite-sql", "postgres-redis")


def heavy(service: Service) -> None:
    if service.backend is not None and service.backend.name not in HEAVY_BACKENDS:
        pytest.skip(f"runs on {' and '.join(HEAVY_BACKENDS)} (kept off the rest of the matrix)")


def worker_command(url: str, queue: str, concurrency: int = 8, name: str = "wf") -> list[str]:
    return [
        sys.executable, "-m", "celeriac", "worker",
        "--app", "tasks_for_workflows:app",
        "--server", url,
        "-c", str(concurrency), "-Q", queue, "-l", "warning",
        "--hostname", name, "--poll-wait", "1",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def shared_queue() -> str:
    """The queue of the module's worker (one per backend: starting one per test would
    cost a second each)."""
    return f"q_wf_{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def worker(service: Service, module_spawner: Spawner, shared_queue: str) -> Iterator[Process]:
    process = module_spawner.process(worker_command(service.url, shared_queue), "wf-worker")
    yield process
    assert process.stop() == 0, process.log()


@pytest.fixture
def app(service: Service, shared_queue: str) -> Iterator[Any]:
    """The tasks' app pointed at this service, every task on the shared worker's queue."""
    wf.app.configure(server=service.url)
    yield lambda sig: sig.set(queue=shared_queue)
    wf.app.close()


def test_a_chain_passes_each_result_on(app: Any, worker: Process) -> None:
    flow = chain(app(wf.add.s(2, 2)), app(wf.add.s(4)), app(wf.mul.s(10))).apply_async()
    assert flow.get(timeout=30) == 80, worker.log()  # (2 + 2 + 4) * 10
    assert flow.status == "succeeded"


def test_a_chain_of_100(app: Any, worker: Process) -> None:
    flow = chain(app(wf.echo.s(0)), *(app(wf.inc.s()) for _ in range(99))).apply_async()
    assert flow.get(timeout=60) == 99, worker.log()


def test_a_group_answers_its_results_in_order(app: Any, worker: Process) -> None:
    flow = group(app(wf.add.s(i, i)) for i in range(30)).apply_async()
    assert flow.get(timeout=30) == [2 * i for i in range(30)], worker.log()


def test_a_chord_and_nesting(app: Any, worker: Process) -> None:
    flow = chord(group(app(wf.add.s(i, i)) for i in range(10)), app(wf.tsum.s())).apply_async()
    assert flow.get(timeout=30) == 90, worker.log()
    # A group inside a chain: each member gets 2, the callback their list; a chain in a
    # chord's header; .si() ignores what came before.
    nested = chain(
        app(wf.add.s(1, 1)),
        group(app(wf.mul.s(2)), app(wf.mul.s(3)), chain(app(wf.inc.s()), app(wf.inc.s()))),
        app(wf.collect.s()),
    ).apply_async()
    assert nested.get(timeout=30) == [4, 6, 4], worker.log()
    immutable = chain(app(wf.add.s(1, 1)), app(wf.echo.si("fresh"))).apply_async()
    assert immutable.get(timeout=30) == "fresh"


def test_the_diamond_sees_its_parents_results(api: Api, shared_queue: str, worker: Process) -> None:
    queue = shared_queue
    spec = {"jobs": [
        {"ref": "a", "task": "wf.echo", "args": ["A"], "queue": queue},
        {"ref": "b", "task": "wf.add", "args": ["+b"], "after": ["a"], "queue": queue,
         "parents_arg": "one"},
        {"ref": "c", "task": "wf.add", "args": ["+c"], "after": ["a"], "queue": queue,
         "parents_arg": "one"},
        {"ref": "d", "task": "wf.collect", "after": ["c", "b"], "queue": queue,
         "parents_arg": "list"},
        {"ref": "e", "task": "wf.seen", "after": ["b", "c"], "queue": queue},
    ]}  # fmt: skip
    flow = expect(api.http.post("/workflows", json=spec), 202)
    d = api.wait_finished(flow["jobs"][3]["id"], timeout=30)
    assert (d["status"], d["result"]) == ("succeeded", ["A+c", "A+b"]), worker.log()
    e = api.wait_finished(flow["jobs"][4]["id"], timeout=30)  # current_job.parents
    assert e["result"] == {"parents": {"b": "A+b", "c": "A+c"},
                           "status": {"b": "succeeded", "c": "succeeded"}}  # fmt: skip
    assert expect(api.http.get(f"/workflows/{flow['id']}"), 200)["status"] == "succeeded"


def test_a_failure_cancels_downstream_or_continues(app: Any, api: Api, worker: Process) -> None:
    failing = chain(app(wf.boom.s("x")), app(wf.echo.s()), app(wf.echo.s())).apply_async()
    with pytest.raises(JobFailed):
        failing.get(timeout=30)
    state = failing.refresh()
    assert state["status"] == "failed"
    assert [job["status"] for job in state["jobs"]] == ["failed", "cancelled", "cancelled"]
    assert state["jobs"][1]["error"]["type"] == "ParentFailed"
    # on_failure="continue": the callback runs and gets None for the failed member.
    going = chord(group(app(wf.boom.s("y")), app(wf.echo.s(7))), app(wf.collect.s()))
    handle = going.apply_async(on_failure="continue")
    assert handle.get(timeout=30) == [None, 7], worker.log()
    assert handle.status == "failed"


def test_cancel_midway(app: Any, api: Api, worker: Process) -> None:
    flow = chain(app(wf.wait_for_cancel.s(30)), app(wf.echo.s()), app(wf.echo.s())).apply_async()
    first = flow.job_ids[next(iter(flow.job_ids))]
    api.wait_for(lambda job: job["status"] == "running", job_id=first, what="the first running")
    answer = flow.cancel()
    assert [job["status"] for job in answer["jobs"]][1:] == ["cancelled", "cancelled"]
    assert api.wait_finished(first, timeout=15)["status"] == "cancelled", worker.log()
    assert flow.status == "cancelled"


def test_a_chord_of_1000_under_a_kill_storm(
    api: Api, service: Service, spawner: Spawner, queue: str, tmp_path: Path
) -> None:
    """The header's workers are SIGKILLed every 2 s (their leases, 2 s, are reclaimed);
    the callback, on a queue of its own with a worker left alone, runs exactly once, with
    the 1,000 results in order."""
    heavy(service)
    wf.app.configure(server=service.url)

    def app(sig: Any) -> Any:  # on this test's queue, which only the storm's workers serve
        return sig.set(queue=queue)

    record = tmp_path / "callback-runs"
    nap = 0.08  # 1,000 x 80 ms over 16 threads: 5 s at least, so the storm hits jobs
    header = group(app(wf.nap.s(i, nap)).set(timeout=2, max_retries=50) for i in range(1000))
    callback = wf.collect.s(record=str(record)).set(queue=f"{queue}-cb")
    flow = chord(header, callback).apply_async()
    calm = spawner.process(worker_command(service.url, f"{queue}-cb", 1, "calm"), "calm")
    stop = threading.Event()
    kills = []

    def storm() -> None:
        workers = [spawner.process(worker_command(service.url, queue, 8, f"s{i}"), "storm")
                   for i in range(2)]  # fmt: skip
        turn = 0
        while not stop.wait(2.0):
            victim = workers[turn % 2]
            victim.kill()
            kills.append(victim.pid)
            workers[turn % 2] = spawner.process(
                worker_command(service.url, queue, 8, f"s{turn + 2}"), "storm"
            )
            turn += 1

    storming = threading.Thread(target=storm, daemon=True)
    storming.start()
    try:
        result = flow.get(timeout=90)
    finally:
        stop.set()
        storming.join(10)
    assert result == list(range(1000)), calm.log()
    assert len(kills) >= 2, "the storm killed fewer than two workers"
    runs = record.read_text().splitlines()
    assert len(runs) == 1, runs  # released once, run once
    assert runs[0].split()[2] == "1000"
    assert flow.status == "succeeded"
    attempts, cursor = [], None
    while True:  # the header's jobs, 500 a page
        page = api.list_jobs(queue=queue, limit=500, **({"cursor": cursor} if cursor else {}))
        attempts += [job["attempt"] for job in page["jobs"]]
        if not (cursor := page["next_cursor"]):
            break
    assert len(attempts) == 1000
    assert max(attempts) > 1, "no job was reclaimed: the storm hit nothing"


def test_the_diamond_with_the_shell_worker(api: Api, service: Service, spawner: Spawner,
                                           queue: str, tmp_path: Path) -> None:  # fmt: skip
    heavy(service)
    for tool in ("sh", "curl", "jq"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    tasks = tmp_path / "wf-tasks.sh"
    tasks.write_text(
        "task_wf_const() { printf '%s' \"$1\"; }\n"
        "task_wf_parents() { printf '%s' \"$CELERIAC_JOB_PARENTS\"; }\n"
    )
    env = {
        "CELERIAC_SERVER_URL": service.url,
        "CELERIAC_QUEUES": queue,
        "CELERIAC_POLL_WAIT": "1",
        "CELERIAC_LEASE_SECONDS": "5",
        "CELERIAC_TASKS_FILE": str(tasks),
        "CELERIAC_TASKS_DIR": str(tmp_path),
    }
    worker = spawner.process(["sh", str(REPO / "workers" / "shell" / "worker.sh")], "sh", env)
    spec = {"jobs": [
        {"ref": "a", "task": "wf.const", "args": ["A"], "queue": queue},
        {"ref": "b", "task": "wf.parents", "after": ["a"], "queue": queue},
        {"ref": "c", "task": "wf.const", "args": ["C"], "after": ["a"], "queue": queue},
        {"ref": "d", "task": "wf.parents", "after": ["b", "c"], "queue": queue},
    ]}  # fmt: skip
    flow = expect(api.http.post("/workflows", json=spec), 202)
    d = api.wait_finished(flow["jobs"][3]["id"], timeout=60)
    assert d["status"] == "succeeded", worker.log()
    assert d["result"] == {"b": {"a": "A"}, "c": "C"}


def test_a_chord_over_the_redis_worker_protocol(
    service: Service, spawner: Spawner, queue: str
) -> None:
    """Released jobs reach Redis-protocol workers too: their envelopes are read from SQL
    with the args the service gave them (and ``parents``)."""
    backend = service.backend
    if backend is None or backend.broker != "redis":
        pytest.skip("the Redis worker protocol needs the redis broker")
    command = [*worker_command(service.url, queue), "--broker", backend.broker_url,
               "--redis-prefix", backend.redis_prefix]  # fmt: skip
    worker = spawner.process(command, "wf-redis-worker")
    wf.app.configure(server=service.url)

    def app(sig: Any) -> Any:  # on this test's queue: only the Redis-protocol worker
        return sig.set(queue=queue)

    flow = chord(group(app(wf.add.s(i, i)) for i in range(20)), app(wf.collect.s()))
    assert flow.apply_async().get(timeout=30) == [2 * i for i in range(20)], worker.log()
    chained = chain(app(wf.add.s(1, 2)), app(wf.mul.s(5))).apply_async()
    assert chained.get(timeout=30) == 15, worker.log()
