"""HTTP clients for API v1: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

``Client`` runs on ``http.client`` with one kept-alive connection per calling thread
(the worker's own ``_http.HttpSession``): a submit from a web app's request thread costs
about a tenth of the client CPU that httpx takes. ``AsyncClient`` (``_async_client.py``,
imported on first use, so that importing ``celeriac`` does not import httpx) keeps one
``httpx.AsyncClient``. Every error answer becomes a ``CeleriacError``; no answer at all
becomes ``ServerUnreachable``.

Both retry a blip (_retry.py): reads and submits on no answer and on 429/502/503/504,
anything else only when the connection could not be opened. Every ``submit`` carries an
``Idempotency-Key``, the caller's or a random one kept across its retries, so a submit
whose answer was lost and that is sent again gives back the job it created instead of a
second one.
"""

from __future__ import annotations

import json as json_module
import os
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Self, TypedDict, Unpack
from urllib.parse import quote, urlencode

from ._retry import (
    RetryPolicy,
    is_safe,
    monotonic_deadline,
    note_retry,
)
from .errors import CeleriacError, ServerUnreachable

if TYPE_CHECKING:
    pass

DEFAULT_SERVER = "http://127.0.0.1:8000"
FINISHED = frozenset({"succeeded", "failed", "cancelled", "expired"})
# The service holds a result long-poll at most 60 s by default; ask for less per call.
LONG_POLL_CHUNK = 30.0

Job = dict[str, Any]
JobList = list[Job]


class RetryBackoff(TypedDict, total=False):
    base: float
    max: float
    jitter: bool


class SubmitOptions(TypedDict, total=False):
    """Per-job options of ``POST /jobs``; anything left out takes the service default."""

    queue: str
    priority: int
    delay: float
    run_at: datetime | str
    expires_at: datetime | str
    max_retries: int
    retry_backoff: RetryBackoff
    timeout: float
    # Flow control (docs/flow-control.md): limit keys the job counts against, and
    # {"key", "for", "while"} / {"key", "period"}.
    limits: list[str]
    unique: dict[str, Any]
    debounce: dict[str, Any]


class JobPage(TypedDict):
    jobs: JobList
    next_cursor: str | None


def resolve_server(server: str | None) -> str:
    return (server or os.environ.get("CELERIAC_SERVER_URL") or DEFAULT_SERVER).rstrip("/")


def resolve_api_key(api_key: str | None) -> str | None:
    return api_key or os.environ.get("CELERIAC_API_KEY") or None


def job_spec(
    task: str,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    **options: Unpack[SubmitOptions],
) -> dict[str, Any]:
    """The JSON body of one job submission (also an item of ``submit_batch``)."""
    body: dict[str, Any] = {"task": task, "args": list(args), "kwargs": dict(kwargs or {})}
    for key, value in options.items():
        if value is not None:
            body[key] = value.isoformat() if isinstance(value, datetime) else value
    return body


def _job_path(job_id: str, action: str = "") -> str:
    # Quoted: an id typed by a user must not be able to name another path.
    path = f"/jobs/{quote(job_id, safe='')}"
    return f"{path}/{action}" if action else path


def _limit_path(name: str) -> str:
    return f"/limits/{quote(name, safe='*')}"


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"Accept": "application/json", "User-Agent": "celeriac-python"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def _idempotency(key: str | None, policy: RetryPolicy) -> dict[str, str] | None:
    """The submit's Idempotency-Key: the caller's as given; else, when retries are on, a
    fresh random one that all retries of this submit share."""
    if not key and policy.enabled:
        key = str(uuid.uuid4())
    return {"Idempotency-Key": key} if key else None


def _wait_params(wait: float | None) -> dict[str, float] | None:
    # ``wait=0`` is sent too: the service then reads the job back (a stored result with it).
    return None if wait is None else {"wait": wait}


def _list_params(
    status: str | None, queue: str | None, task: str | None, limit: int | None, cursor: str | None
) -> dict[str, str | int]:
    given = {"status": status, "queue": queue, "task": task, "limit": limit, "cursor": cursor}
    return {key: value for key, value in given.items() if value is not None}


def _wait_chunk(deadline: float | None) -> float:
    if deadline is None:
        return LONG_POLL_CHUNK
    return max(0.0, min(LONG_POLL_CHUNK, deadline - time.monotonic()))


# A long-poll answered well before its wait with the job unfinished means the service
# would not hold it (its long-poll cap, answered with Retry-After): pause before asking
# again rather than loop at full speed.
CAPPED_WAIT_PAUSE = 1.0


def _capped_pause(asked: float, started: float, deadline: float | None) -> float:
    if asked < 1.0 or time.monotonic() - started >= asked / 2:
        return 0.0
    left = CAPPED_WAIT_PAUSE if deadline is None else deadline - time.monotonic()
    return max(0.0, min(CAPPED_WAIT_PAUSE, left))


def _wait_over(job: Job, deadline: float | None, job_id: str) -> bool:
    if job["status"] in FINISHED:
        return True
    if deadline is not None and time.monotonic() >= deadline:
        raise TimeoutError(f"job {job_id} still {job['status']} when the wait ran out")
    return False


class Client:
    """Blocking client. ``server`` defaults to ``$CELERIAC_SERVER_URL``, then
    http://127.0.0.1:8000; ``api_key`` to ``$CELERIAC_API_KEY``. ``timeout`` bounds every
    request (long-polls get their wait on top). ``retries`` (default
    ``$CELERIAC_CLIENT_RETRIES``, else 5; 0 turns retrying and the automatic
    Idempotency-Key off) and ``retry_budget`` (seconds, default
    ``$CELERIAC_CLIENT_RETRY_BUDGET``, else 10) bound the retries of one call."""

    def __init__(
        self,
        server: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int | None = None,
        retry_budget: float | None = None,
    ) -> None:
        from ._http import HttpSession  # it imports this module's resolve_* helpers

        self.server = resolve_server(server)
        self.retry_policy = RetryPolicy.resolve(retries, retry_budget)
        self._http = HttpSession(
            self.server, api_key, timeout=timeout, user_agent="celeriac-python-client"
        )

    def __repr__(self) -> str:
        return f"Client({self.server!r})"

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        params: Mapping[str, str | int | float] | None = None,
        headers: Mapping[str, str] | None = None,
        wait: float = 0.0,
    ) -> Any:
        """One API call; ``wait`` is how long the service may hold it (long-poll). Safe
        to call from several threads at once. Retried as the module docstring says."""
        if json is not None:
            content = json_module.dumps(json, separators=(",", ":")).encode()
        if params:
            path = f"{path}?{urlencode(params)}"
        sent = dict(headers) if headers else None
        safe = is_safe(method, sent)
        policy = self.retry_policy
        deadline = monotonic_deadline(policy)
        retry = 0
        while True:
            try:
                return self._http.call(method, path, content, wait=wait, headers=sent, resend=safe)
            except (CeleriacError, ServerUnreachable) as exc:
                pause = policy.wait_before(retry, exc, safe=safe, deadline=deadline)
                if pause is None:
                    raise
                note_retry(f"{method} {path}", exc, retry, policy, pause)
            time.sleep(pause)
            retry += 1

    def submit(
        self,
        task: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        wait: float | None = None,
        **options: Unpack[SubmitOptions],
    ) -> Job:
        """Submit a job. With ``wait`` the service holds the answer until the job
        finishes or ``wait`` seconds pass (RPC style: the result in one call); the job is
        committed either way, and is answered unfinished when the wait ran out."""
        body = job_spec(task, args, kwargs, **options)
        headers = _idempotency(idempotency_key, self.retry_policy)
        params = _wait_params(wait)
        job: Job = self.request(
            "POST", "/jobs", json=body, params=params, headers=headers, wait=wait or 0.0
        )
        return job

    def submit_batch(self, jobs: Iterable[Mapping[str, Any]]) -> JobList:
        """Submit many jobs in one transaction; items are ``job_spec(...)`` dicts. The
        service has no Idempotency-Key for batches: a batch is sent again only when its
        connection could not be opened, and a ``ServerUnreachable`` otherwise leaves it
        unknown whether the batch was committed."""
        answer = self.request("POST", "/jobs/batch", json={"jobs": [dict(j) for j in jobs]})
        result: JobList = answer["jobs"]
        return result

    def get(self, job_id: str, wait: float | None = None) -> Job:
        """The job; with ``wait`` the service holds the answer until it finishes or
        ``wait`` seconds pass."""
        params = {"wait": wait} if wait else None
        job: Job = self.request("GET", _job_path(job_id), params=params, wait=wait or 0.0)
        return job

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job is finished; ``TimeoutError`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            asked, started = _wait_chunk(deadline), time.monotonic()
            job = self.get(job_id, wait=asked)
            if _wait_over(job, deadline, job_id):
                return job
            time.sleep(_capped_pause(asked, started, deadline))

    def cancel(self, job_id: str) -> Job:
        job: Job = self.request("POST", _job_path(job_id, "cancel"))
        return job

    def retry(self, job_id: str) -> Job:
        job: Job = self.request("POST", _job_path(job_id, "retry"))
        return job

    def bulk(self, action: str, **filter: Any) -> dict[str, int]:
        """``POST /jobs/bulk`` (admin key): ``action`` retry, cancel or delete on every job
        the filter selects (``status``, ``queue``, ``task``, ``finished_before``, ``ids``);
        returns ``{"matched": n, "changed": n}``. Not retried: a lost answer leaves it
        unknown how far the action got (sending it again is harmless)."""
        answer: dict[str, int] = self.request(
            "POST", "/jobs/bulk", json={"action": action, "filter": filter}
        )
        return answer

    def queues(self) -> list[dict[str, Any]]:
        answer = self.request("GET", "/queues")
        queues: list[dict[str, Any]] = answer["queues"]
        return queues

    def set_queue(self, name: str, **settings: Any) -> dict[str, Any]:
        """``PATCH /queues/{name}``: ``paused=True|False``, ``max_running=N|None``,
        ``rate={"limit", "period"}|None`` (admin key)."""
        path = f"/queues/{quote(name, safe='')}"
        answer: dict[str, Any] = self.request("PATCH", path, json=settings)
        return answer

    def pause_queue(self, name: str) -> dict[str, Any]:
        return self.set_queue(name, paused=True)

    def resume_queue(self, name: str) -> dict[str, Any]:
        return self.set_queue(name, paused=False)

    def set_limit(
        self, name: str, *, max_running: int | None = None, rate: Mapping[str, float] | None = None
    ) -> dict[str, Any]:
        """``PUT /limits/{name}`` (a name ending in ``*`` sets a pattern's defaults)."""
        body = {"max_running": max_running, "rate": None if rate is None else dict(rate)}
        answer: dict[str, Any] = self.request("PUT", _limit_path(name), json=body)
        return answer

    def limits(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.request("GET", "/limits")["limits"]
        return found

    def delete_limit(self, name: str) -> None:
        self.request("DELETE", _limit_path(name))

    def list(
        self,
        *,
        status: str | None = None,
        queue: str | None = None,
        task: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> JobPage:
        """One page of jobs, newest first; pass ``next_cursor`` back for the next."""
        params = _list_params(status, queue, task, limit, cursor)
        page: JobPage = self.request("GET", "/jobs", params=params)
        return page

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def __getattr__(name: str) -> Any:
    """``celeriac.client.AsyncClient``, imported on first use (it brings httpx)."""
    if name == "AsyncClient":
        from ._async_client import AsyncClient

        return AsyncClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
