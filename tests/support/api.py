"""The HTTP helper: an httpx client bound to one service with the calls the tests make
most, and the assertions on statuses and RFC 9457 problems."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx

FINISHED = frozenset({"succeeded", "failed", "cancelled", "expired"})


def expect(response: httpx.Response, status: int) -> Any:
    """Assert the status (showing the body when it differs) and return the JSON body."""
    assert response.status_code == status, (
        f"{response.request.method} {response.request.url.path} -> "
        f"{response.status_code}, expected {status}: {response.text}"
    )
    return response.json() if response.content else None


def assert_problem(
    response: httpx.Response, status: int, slug: str | None = None
) -> dict[str, Any]:
    """An RFC 9457 problem: the status, application/problem+json, type/title/status/detail."""
    assert response.status_code == status, (
        f"{response.request.method} {response.request.url.path} -> "
        f"{response.status_code}, expected {status}: {response.text}"
    )
    assert response.headers["content-type"].startswith("application/problem+json"), (
        response.headers.get("content-type")
    )
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    assert body["type"].startswith("urn:celeriac:problem:"), body
    if slug is not None:
        assert body["type"] == f"urn:celeriac:problem:{slug}", body
    return body


class Api:
    """httpx.Client bound to one service, with the calls the tests make most."""

    def __init__(self, base_url: str, *, headers: Mapping[str, str] | None = None) -> None:
        self.base_url = base_url
        # Long-polls hold requests for up to 30 s (leases) or 60 s (results).
        self.http = httpx.Client(base_url=base_url, headers=dict(headers or {}), timeout=75.0)

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # jobs
    def submit(self, **job: Any) -> dict[str, Any]:
        job.setdefault("task", "tests.noop")
        response = self.http.post("/jobs", json=job)
        body: dict[str, Any] = expect(response, 202)
        assert response.headers["location"] == f"/jobs/{body['id']}"
        return body

    def submit_batch(self, jobs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        specs = [{"task": "tests.noop", **job} for job in jobs]
        body = expect(self.http.post("/jobs/batch", json={"jobs": specs}), 202)
        return list(body["jobs"])

    def get(self, job_id: str, wait: float | None = None) -> dict[str, Any]:
        params = {} if wait is None else {"wait": wait}
        result: dict[str, Any] = expect(self.http.get(f"/jobs/{job_id}", params=params), 200)
        return result

    def list_jobs(self, **params: Any) -> dict[str, Any]:
        result: dict[str, Any] = expect(self.http.get("/jobs", params=params), 200)
        return result

    def queue_counts(self, queue: str) -> dict[str, int]:
        for entry in expect(self.http.get("/queues"), 200)["queues"]:
            if entry["name"] == queue:
                return dict(entry["counts"])
        return {}

    def total_jobs(self) -> int:
        queues = expect(self.http.get("/queues"), 200)["queues"]
        return sum(sum(entry["counts"].values()) for entry in queues)

    def cancel(self, job_id: str) -> httpx.Response:
        return self.http.post(f"/jobs/{job_id}/cancel")

    def retry(self, job_id: str) -> httpx.Response:
        return self.http.post(f"/jobs/{job_id}/retry")

    # worker protocol
    def lease(
        self,
        queues: str | Sequence[str],
        max_jobs: int = 1,
        wait: float = 0.0,
        *,
        worker: str = "test-worker",
        lease_seconds: float | None = None,
    ) -> list[dict[str, Any]]:
        body: dict[str, Any] = {
            "worker": worker,
            "queues": [queues] if isinstance(queues, str) else list(queues),
            "max_jobs": max_jobs,
            "wait": wait,
        }
        if lease_seconds is not None:
            body["lease_seconds"] = lease_seconds
        return list(expect(self.http.post("/leases", json=body), 200)["jobs"])

    def lease_one(
        self, queue: str | Sequence[str], wait: float = 5.0, **kwargs: Any
    ) -> dict[str, Any]:
        jobs = self.lease(queue, 1, wait, **kwargs)
        assert len(jobs) == 1, f"expected a job from {queue} within {wait}s, got {jobs}"
        return jobs[0]

    def heartbeat(self, leased: Mapping[str, Any], **body: Any) -> httpx.Response:
        body["token"] = leased["lease"]["token"]
        return self.http.post(f"/jobs/{leased['id']}/heartbeat", json=body)

    def complete(self, leased: Mapping[str, Any], result: Any = None) -> httpx.Response:
        token = leased["lease"]["token"]
        return self.http.post(
            f"/jobs/{leased['id']}/complete", json={"token": token, "result": result}
        )

    def fail(
        self,
        leased: Mapping[str, Any],
        error_type: str = "Boom",
        message: str = "it broke",
        **extra: Any,
    ) -> httpx.Response:
        body = {
            "token": leased["lease"]["token"],
            "error": {"type": error_type, "message": message},
            **extra,
        }
        return self.http.post(f"/jobs/{leased['id']}/fail", json=body)

    def release(self, leased: Mapping[str, Any]) -> httpx.Response:
        token = leased["lease"]["token"]
        return self.http.post(f"/jobs/{leased['id']}/release", json={"token": token})

    # waiting
    def wait_finished(self, job_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """One long-poll: the service answers the moment the job finishes."""
        job = self.get(job_id, wait=timeout)
        assert job["status"] in FINISHED, f"job {job_id} not finished within {timeout}s: {job}"
        return job

    def wait_for(
        self,
        predicate: Callable[..., Any],
        timeout: float = 10.0,
        *,
        job_id: str | None = None,
        what: str = "the condition",
        slice_seconds: float = 0.25,
    ) -> Any:
        """Wait until ``predicate`` holds. With ``job_id`` it is given the job, read with
        ``GET /jobs/{id}?wait=`` so a finish wakes us at once; other states (no event
        exists for them) are re-read every ``slice_seconds`` until the deadline. Without
        ``job_id`` it is called with no arguments and its truthy result returned."""
        deadline = time.monotonic() + timeout
        while True:
            started = time.monotonic()
            if job_id is not None:
                remaining = max(0.0, min(slice_seconds, deadline - started))
                value = self.get(job_id, wait=remaining)
                holds = bool(predicate(value))
            else:
                value = predicate()
                holds = bool(value)
            if holds:
                return value
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what}; last: {value!r}"
                )
            if time.monotonic() - started < 0.05:  # the read did not wait: don't spin
                time.sleep(0.05)
