"""Issue 16, item 5: retention. Finished jobs are deleted once past their status's
period (``CELERIAC_RETENTION``), with their stored results, webhook deliveries and logs;
idempotency keys are given up after ``CELERIAC_IDEMPOTENCY_TTL_SECONDS``; the table stays
bounded while jobs keep passing through (a small soak: 5,000 jobs with half a second of
retention; bench/retention_soak.py runs the 200,000 one)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import (
    SELECTED_BACKENDS,
    Api,
    Backend,
    Spawner,
    assert_problem,
    child_env,
    expect,
    service_command,
)
from support.processes import spawn

from service.retention import parse_retention

SOAK_JOBS = 5000
SOAK_ROUND = 250
SOAK_PACE = 0.15  # seconds between rounds: 20 rounds span several retention periods


# Each test starts a service on a fresh database: SQLite with the SQL broker and
# PostgreSQL with Redis (of those selected), not the whole matrix.
PAIRS = [name for name in ("sqlite-sql", "postgres-redis") if name in SELECTED_BACKENDS]


@pytest.fixture(scope="module", params=PAIRS)
def pruning(
    request: pytest.FixtureRequest,
    module_spawner: Spawner,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Api, Backend, Path]]:
    """A service of its own (for this module) on a fresh database, keeping finished jobs
    half a second, results in files."""
    fresh = module_spawner.backend(*str(request.param).split("-"))
    store = tmp_path_factory.mktemp("retention") / "results"
    service = module_spawner.service(
        fresh,
        {
            "CELERIAC_RETENTION": "succeeded=0.5s,failed=0.5s,cancelled=0.5s,expired=0.5s",
            "CELERIAC_RETENTION_INTERVAL_SECONDS": "0.2",
            "CELERIAC_RETENTION_BATCH": "500",
            "CELERIAC_IDEMPOTENCY_TTL_SECONDS": "1",
            "CELERIAC_RESULT_STORE": store.as_uri(),
            "CELERIAC_RESULT_INLINE_MAX_BYTES": "16",
            # The webhook's receiver is gone: its delivery gives up at the first failure.
            "CELERIAC_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
            "CELERIAC_WEBHOOK_RETRY_WINDOW_SECONDS": "0",
        },
    )
    with Api(service.url) as api:
        yield api, fresh, store


def _run_all(api: Api, queue: str, count: int, result: object = None) -> None:
    leased = api.lease(queue, count, wait=5)
    reports = [
        {"id": job["id"], "token": job["lease"]["token"], "outcome": "succeeded", "result": result}
        for job in leased
    ]
    expect(api.http.post("/leases/report", json={"reports": reports}), 200)


def _rows(backend: Backend, query: str) -> int:
    engine = sa.create_engine(backend.database_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(query)).scalar_one())
    finally:
        engine.dispose()


def _wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "retention did not catch up in time"
        time.sleep(0.1)  # the pruner runs every 0.2 s: poll the observable outcome


def test_prunes_jobs_results_deliveries_and_keys(
    pruning: tuple[Api, Backend, Path], queue: str
) -> None:
    api, backend, store = pruning
    hook = {"url": "http://127.0.0.1:9/hook", "events": ["succeeded"]}
    jobs = api.submit_batch([{"queue": queue, "webhook": hook} for _ in range(3)])
    keyed = expect(api.http.post("/jobs", json={"task": "t", "queue": "keys-" + queue},
                                 headers={"Idempotency-Key": "k-" + queue}), 202)  # fmt: skip
    _run_all(api, queue, 3, result={"large": "x" * 100})
    assert len(list(store.rglob("*.json"))) == 3
    # (A pending delivery would hold its job back; these fail at once and give up.)
    _wait_for(lambda: api.queue_counts(queue) == {})
    assert_problem(api.http.get(f"/jobs/{jobs[0]['id']}"), 404, "job-not-found")
    assert _rows(backend, "SELECT count(*) FROM webhook_deliveries") == 0
    assert not list(store.rglob("*.json"))
    # The keyed job is still queued (not finished), but its key is given up after 1 s.
    _wait_for(lambda: _rows(backend, "SELECT count(*) FROM jobs WHERE idempotency_key "
                                     "IS NOT NULL") == 0)  # fmt: skip
    assert api.get(keyed["id"])["status"] == "queued"


def test_table_stays_bounded(pruning: tuple[Api, Backend, Path], queue: str) -> None:
    """5,000 jobs pass through at a steady pace over several retention periods; the table
    holds what finished within about one period (plus the pruner's pace), never the
    whole stream, and ends empty."""
    api, _backend, _store = pruning
    sizes = []
    for _ in range(SOAK_JOBS // SOAK_ROUND):
        api.submit_batch([{"queue": queue} for _ in range(SOAK_ROUND)])
        _run_all(api, queue, SOAK_ROUND)
        sizes.append(sum(api.queue_counts(queue).values()))
        time.sleep(SOAK_PACE)  # a steady producer, not a burst
    print("jobs in the table after each round:", sizes)
    assert max(sizes) <= SOAK_JOBS * 0.4, sizes
    _wait_for(lambda: api.queue_counts(queue) == {})


def test_retention_setting_is_checked(tmp_path: Path) -> None:
    assert parse_retention("succeeded=2h,failed=forever")["failed"] is None
    assert parse_retention("")["succeeded"].total_seconds() == 7 * 86400
    assert parse_retention("")["failed"].total_seconds() == 30 * 86400
    assert set(parse_retention("off").values()) == {None}
    env = child_env({"CELERIAC_DATABASE_URL": f"sqlite:///{tmp_path}/c.db",
                     "CELERIAC_RETENTION": "finished=7d"})  # fmt: skip
    process = spawn(service_command(0), env, tmp_path, "bad-retention")
    assert process.proc.wait(30) != 0
    assert "CELERIAC_RETENTION" in process.log() and "finished=7d" in process.log()
