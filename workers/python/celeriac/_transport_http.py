"""The HTTP worker protocol (docs/protocol.md): ``POST /leases`` (long-poll),
``POST /leases/heartbeat`` and ``POST /leases/report``, over ``_http.HttpSession``."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from ._execution import Report, dumps
from ._http import HttpSession
from ._transport import BeatAnswer, BeatItem, Grant, Settled, release_all
from .errors import CeleriacError

MAX_LEASE_JOBS = 1000  # the API's limit on one POST /leases
# How long to hold off after the service refused to hold a long-poll (it answers at once,
# with nothing and Retry-After, when it holds its cap of them: docs/protocol.md).
REFUSED_BACKOFF = 5.0


class HttpTransport:
    name = "http"

    def __init__(
        self,
        http: HttpSession,
        *,
        worker: str,
        queues: Sequence[str],
        lease_seconds: float | None,
        poll_wait: float,
    ) -> None:
        self._http = http
        self._worker = worker
        self._queues = list(queues)
        self._lease_seconds = lease_seconds
        self._poll_wait = poll_wait
        self._ended = threading.Event()
        self._fetches = True  # until a service refuses report-and-fetch

    def lease(self, max_jobs: int) -> list[Grant]:
        body = self._lease_body(max_jobs, self._poll_wait)
        started = time.monotonic()
        answer = self._http.call("POST", "/leases", _encode(body), wait=self._poll_wait)
        if not answer["jobs"] and time.monotonic() - started < self._poll_wait / 2:
            # Nothing, long before the wait ran out: the service did not hold the poll
            # (its long-poll cap). Asking again at once would be a polling loop.
            self._ended.wait(REFUSED_BACKOFF)
        return self._grants(answer["jobs"])

    def _lease_body(self, max_jobs: int, wait: float) -> dict[str, Any]:
        body: dict[str, Any] = {
            "worker": self._worker,
            "queues": self._queues,
            "max_jobs": min(max_jobs, MAX_LEASE_JOBS),
            "wait": wait,
        }
        if self._lease_seconds:
            body["lease_seconds"] = self._lease_seconds
        return body

    def _grants(self, jobs: list[dict[str, Any]]) -> list[Grant]:
        left = _LeaseClock()
        return [
            Grant(job, job["lease"]["token"], left(job["lease"]["expires_at"]), self._lease_seconds)
            for job in jobs
        ]

    def heartbeat(self, items: Sequence[BeatItem]) -> list[BeatAnswer]:
        leases = []
        for item in items:
            ref: dict[str, Any] = {"id": item.job_id, "token": item.token}
            if item.progress is not None:
                ref["progress"] = item.progress
            leases.append(ref)
        body: dict[str, Any] = {"leases": leases}
        if self._lease_seconds:
            body["lease_seconds"] = self._lease_seconds
        answer = self._http.call("POST", "/leases/heartbeat", _encode(body))
        left = _LeaseClock()
        return [
            BeatAnswer(
                entry["id"],
                entry["ok"],
                left(entry["expires_at"]) if entry.get("expires_at") else None,
                bool(entry.get("cancel_requested")),
            )
            for entry in answer["leases"]
        ]

    def report(self, reports: Sequence[Report]) -> list[Settled]:
        body = '{"reports":[' + ",".join(map(report_json, reports)) + "]}"
        answer = self._http.call("POST", "/leases/report", body.encode())
        return _settled(answer)

    def report_and_lease(
        self, reports: Sequence[Report], max_jobs: int
    ) -> tuple[list[Settled], list[Grant]]:
        """One ``POST /leases/report`` with ``next`` (report-and-fetch, docs/protocol.md):
        one request per batch instead of two. A service without it (422 on ``next``) is
        asked the old way from then on."""
        if max_jobs <= 0 or not self._fetches:
            return self.report(reports), []
        items = ",".join(map(report_json, reports))
        body = f'{{"reports":[{items}],"next":{_encode(self._lease_body(max_jobs, 0)).decode()}}}'
        try:
            answer = self._http.call("POST", "/leases/report", body.encode())
        except CeleriacError as exc:
            if exc.status != 422:
                raise
            self._fetches = False  # an older service; a report it refuses is refused again
            return self.report(reports), []
        return _settled(answer), self._grants(answer.get("jobs") or [])

    def release(self, grants: Sequence[tuple[str, str]]) -> list[Settled]:
        return release_all(self, grants)

    def end_wait(self) -> None:
        self._ended.set()
        self._http.end_waits()

    def close(self) -> None:
        self._http.close()


def _settled(answer: dict[str, Any]) -> list[Settled]:
    return [Settled(item["id"], item["ok"], item.get("detail")) for item in answer["reports"]]


def _encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def report_json(report: Report) -> str:
    """One item of ``reports``; the result is spliced in as the JSON text it already is."""
    head = f'{{"id":{dumps(report.job_id)},"token":{dumps(report.token)}'
    if report.logs is not None:
        head += f',"logs":{dumps(report.logs)}'
    if report.outcome == "succeeded":
        return f'{head},"outcome":"succeeded","result":{report.result}}}'
    if report.outcome == "released":
        return f'{head},"outcome":"released"}}'
    tail: dict[str, Any] = {"outcome": "failed", "error": report.error, "retry": report.retry}
    if report.retry_in is not None:
        tail["retry_in"] = report.retry_in
    return f"{head},{dumps(tail)[1:]}"


class _LeaseClock:
    """Seconds left on a lease from its ``expires_at`` (service clock). Jobs of one answer
    mostly share it: each distinct value is parsed once."""

    def __init__(self) -> None:
        self._now = datetime.now(UTC)
        self._seen: dict[str, float] = {}

    def __call__(self, expires_at: str) -> float:
        left = self._seen.get(expires_at)
        if left is None:
            left = (datetime.fromisoformat(expires_at) - self._now).total_seconds()
            self._seen[expires_at] = left
        return left
