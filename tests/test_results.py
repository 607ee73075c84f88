"""Results (issue 5): inline or in the result store, read back identically, streamed, and
expired by the cleanup loop; Celery's ``db+…`` result-backend URLs as the database URL.

The module's services run on each database *through a Celery-style URL*
(``db+sqlite:///…``, ``db+postgresql://…``, ``db+mysql://…`` against MariaDB), with a
file store in a temporary folder and a 1 KiB inline limit, so modest results exercise
the store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import (
    DATABASES,
    SELECTED_BACKENDS,
    Api,
    Backend,
    Service,
    Spawner,
    assert_problem,
    expect,
)

from service.settings import Settings, normalise_database_url

pytestmark = pytest.mark.timeout(120)

INLINE_MAX = 1024
RESULT_MAX = 512 * 1024
RESULTS = {
    "CELERIAC_RESULT_INLINE_MAX_BYTES": str(INLINE_MAX),
    "CELERIAC_RESULT_MAX_BYTES": str(RESULT_MAX),
    "CELERIAC_RESULT_EXPIRES_SECONDS": "3600",
    "CELERIAC_RESULT_CLEANUP_BATCH": "2",  # several batches for a handful of jobs
    "CELERIAC_RESULT_CLEANUP_INTERVAL_SECONDS": "0.2",
}


def large(rows: int = 2000) -> dict[str, Any]:
    """About 150 KB of JSON with non-ASCII text, nulls, floats and nesting."""
    return {
        "rows": [
            {"i": i, "text": "é€ü" * 10, "x": i / 7, "nested": [i, None, True, {"k": []}]}
            for i in range(rows)
        ],
        "done": True,
    }


# --- Celery result-backend URLs ------------------------------------------------------------


@pytest.mark.parametrize(
    ("celery", "ours"),
    [
        ("db+sqlite:///results.db", "sqlite:///results.db"),
        ("db+sqlite:////var/lib/celeriac/results.db", "sqlite:////var/lib/celeriac/results.db"),
        ("db+mysql://scott:tiger@localhost/foo", "mysql+pymysql://scott:tiger@localhost/foo"),
        (
            "db+postgresql://scott:tiger@localhost/db",
            "postgresql+psycopg://scott:tiger@localhost/db",
        ),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
    ],
)
def test_celery_database_urls(celery: str, ours: str) -> None:
    assert normalise_database_url(celery) == ours
    assert Settings(database_url=celery).database_url == ours


def _celery_url(backend: Backend) -> str:
    url = backend.database_url
    for ours, celery in (
        ("sqlite:", "db+sqlite:"),
        ("postgresql+psycopg:", "db+postgresql:"),
        ("mariadb+pymysql:", "db+mysql:"),
    ):
        if url.startswith(ours):
            return celery + url[len(ours) :]
    raise AssertionError(url)


# --- fixtures ---------------------------------------------------------------------------------


def _databases() -> list[str]:
    return [d for d in DATABASES if any(b.startswith(f"{d}-") for b in SELECTED_BACKENDS)]


@pytest.fixture(scope="module", params=_databases())
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Service, Path]]:
    workdir = tmp_path_factory.mktemp(f"results-{request.param}")
    spawner = Spawner(workdir)
    try:
        backend = spawner.backend(str(request.param), "sql")
        store = workdir / "store"
        extra = {
            **RESULTS,
            "CELERIAC_DATABASE_URL": _celery_url(backend),
            "CELERIAC_RESULT_STORE": store.as_uri(),
        }
        yield spawner.service(backend, extra), store
    finally:
        spawner.close()


@pytest.fixture(scope="module")
def service(stack: tuple[Service, Path]) -> Service:
    return stack[0]


@pytest.fixture(scope="module")
def store(stack: tuple[Service, Path]) -> Path:
    return stack[1]


def files_of(store: Path, job_id: str) -> list[Path]:
    return sorted(store.glob(f"*/{job_id}.*"))


def complete(api: Api, queue: str, result: Any, **spec: Any) -> dict[str, Any]:
    api.submit(queue=queue, **spec)
    leased = api.lease_one(queue)
    return dict(expect(api.complete(leased, result), 200))


# --- storage -------------------------------------------------------------------------------------


def test_large_result_goes_to_the_store_and_reads_back_identically(
    api: Api, queue: str, store: Path
) -> None:
    result = large()
    done = complete(api, queue, result)
    assert done["status"] == "succeeded"
    assert done["result"] is None and done["result_stored"] is True  # not echoed back
    [stored] = files_of(store, done["id"])
    assert stored.stat().st_size > INLINE_MAX

    job = api.get(done["id"])
    assert job["result"] == result and job["result_stored"] is True
    assert api.get(done["id"], wait=1)["result"] == result

    response = api.http.get(f"/jobs/{done['id']}/result")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["content-length"]) == stored.stat().st_size
    assert response.json() == result
    listed = api.list_jobs(queue=queue)["jobs"][0]
    assert listed["result"] is None and listed["result_stored"] is True


def test_small_result_stays_in_the_row(api: Api, queue: str, store: Path) -> None:
    done = complete(api, queue, {"small": [1, 2, 3]})
    assert done["result"] == {"small": [1, 2, 3]} and done["result_stored"] is False
    assert files_of(store, done["id"]) == []
    assert api.http.get(f"/jobs/{done['id']}/result").json() == {"small": [1, 2, 3]}
    nothing = complete(api, queue, None)
    response = api.http.get(f"/jobs/{nothing['id']}/result")
    assert response.status_code == 200 and response.content == b"null"


def test_batch_reports_store_results_and_stale_ones_leave_no_file(
    api: Api, queue: str, store: Path
) -> None:
    api.submit_batch([{"queue": queue}, {"queue": queue}])
    first, second = api.lease(queue, 2, wait=5)
    reports = [
        {"id": first["id"], "token": first["lease"]["token"], "outcome": "succeeded",
         "result": large(300)},
        {"id": second["id"], "token": "not-the-token", "outcome": "succeeded",
         "result": large(300)},
    ]  # fmt: skip
    answer = expect(api.http.post("/leases/report", json={"reports": reports}), 200)
    assert [r["ok"] for r in answer["reports"]] == [True, False]
    assert len(files_of(store, first["id"])) == 1
    assert files_of(store, second["id"]) == [], "the stale report's file was deleted"
    assert api.get(first["id"])["result"] == large(300)
    # A single stale completion cleans up too.
    assert_problem(api.complete({**second, "lease": {"token": "stale"}}, large(300)), 409)
    assert files_of(store, second["id"]) == []


def test_result_over_the_store_limit_is_refused(api: Api, queue: str, store: Path) -> None:
    api.submit(queue=queue)
    leased = api.lease_one(queue)
    response = api.complete(leased, {"blob": "x" * (RESULT_MAX + 10)})
    assert (
        "CELERIAC_RESULT_MAX_BYTES" in assert_problem(response, 413, "payload-too-large")["detail"]
    )
    assert files_of(store, leased["id"]) == []
    assert api.get(leased["id"])["status"] == "running"  # nothing changed


def test_result_endpoint_without_a_result(api: Api, queue: str) -> None:
    queued = api.submit(queue=queue)
    assert_problem(api.http.get(f"/jobs/{queued['id']}/result"), 409, "no-result")
    leased = api.lease_one(queue)
    expect(api.fail(leased, retry=False), 200)
    assert "failed" in assert_problem(api.http.get(f"/jobs/{queued['id']}/result"), 409)["detail"]
    assert_problem(api.http.get("/jobs/0190c3a5-0000-7000-8000-000000000000/result"), 404)


# --- expiry ---------------------------------------------------------------------------------


def test_expired_results_are_deleted_in_batches(
    api: Api, queue: str, store: Path, service: Service
) -> None:
    jobs = []
    for index in range(5):  # with CELERIAC_RESULT_CLEANUP_BATCH=2: three batches
        result = large(200) if index % 2 == 0 else {"small": index}
        job = complete(api, queue, result, result_ttl=1.5)
        assert job["result_expires_at"] is not None and job["result_expired"] is False
        assert api.get(job["id"])["result"] == result  # (well within its 1.5 s)
        assert len(files_of(store, job["id"])) == (1 if index % 2 == 0 else 0)
        jobs.append((job, result))

    api.wait_for(
        lambda: all(api.get(job["id"])["result_expired"] for job, _ in jobs),
        10,
        what="every result to expire",
    )
    for job, _ in jobs:  # expired at once, whether or not the cleanup ran yet
        body = api.get(job["id"])
        assert body["status"] == "succeeded" and body["result"] is None
        assert body["result_expired"] is True and body["result_stored"] is False
        problem = assert_problem(api.http.get(f"/jobs/{job['id']}/result"), 410, "result-expired")
        assert "succeeded" in problem["detail"]

    def cleaned() -> bool:
        rows = _rows(service, [job["id"] for job, _ in jobs])
        return all(r.result_ref is None and r.result_expired for r in rows)

    api.wait_for(cleaned, 10, what="the cleanup loop")
    for job, _ in jobs:
        assert files_of(store, job["id"]) == [], "the stored files were deleted"
        assert api.get(job["id"])["result_expires_at"] is None


def _rows(service: Service, ids: list[str]) -> list[Any]:
    assert service.backend is not None
    engine = sa.create_engine(service.backend.database_url)
    try:
        with engine.connect() as conn:
            return list(
                conn.execute(
                    sa.text(
                        "SELECT result_ref, result_expired, result_expires_at FROM jobs "
                        "WHERE id IN :ids"
                    ).bindparams(sa.bindparam("ids", expanding=True)),
                    {"ids": ids},
                )
            )
    finally:
        engine.dispose()


def test_result_ttl_default_and_forever(api: Api, queue: str) -> None:
    default = complete(api, queue, 1)
    assert default["result_ttl"] == 3600
    from datetime import datetime

    kept = datetime.fromisoformat(default["result_expires_at"]) - datetime.fromisoformat(
        default["finished_at"]
    )
    assert kept.total_seconds() == pytest.approx(3600, abs=1)
    forever = complete(api, queue, 2, result_ttl=0)
    assert forever["result_ttl"] is None and forever["result_expires_at"] is None
    assert_problem(api.http.post("/jobs", json={"task": "t", "result_ttl": -1}), 422)


# --- without a configured store ----------------------------------------------------------------


def test_without_a_store_large_results_are_refused_as_before(spawner: Spawner) -> None:
    backend = spawner.backend("sqlite", "sql")
    limits = {"CELERIAC_MAX_PAYLOAD_BYTES": "4096", "CELERIAC_RESULT_INLINE_MAX_BYTES": "1024"}
    service = spawner.service(backend, {**limits, "CELERIAC_RESULT_STORE": "none"})
    with Api(service.url) as api:
        # Up to max_payload_bytes a result is inline, as it always was ...
        done = complete(api, "q", {"blob": "x" * 3000})
        assert done["result"] == {"blob": "x" * 3000} and done["result_stored"] is False
        # ... and beyond it, 413 names the setting that would help.
        api.submit(queue="q")
        leased = api.lease_one("q")
        problem = assert_problem(api.complete(leased, {"blob": "x" * 5000}), 413)
        assert "CELERIAC_RESULT_STORE" in problem["detail"]


def test_default_store_is_beside_the_sqlite_file(spawner: Spawner) -> None:
    backend = spawner.backend("sqlite", "sql")
    service = spawner.service(backend, {"CELERIAC_RESULT_INLINE_MAX_BYTES": "1024"})
    folder = Path(sa.engine.make_url(backend.database_url).database or "").parent / "results"
    with Api(service.url) as api:
        done = complete(api, "q", large(100))
        assert len(files_of(folder, done["id"])) == 1
        assert api.get(done["id"])["result"] == large(100)
