"""``AsyncClient``: the asyncio twin of ``client.Client``, on ``httpx.AsyncClient``.

A module of its own so that ``import celeriac`` (a worker, a web app's submitter) does not
import httpx: it took about 0.1 s of a worker's start-up, and the blocking client and
the worker's transports speak HTTP through ``http.client`` (``_http.py``). ``celeriac``
and ``celeriac.client`` still export ``AsyncClient``, importing this module on first use.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Self, Unpack

import httpx

from ._retry import RetryPolicy, is_safe, monotonic_deadline, note_retry, parse_retry_after
from .client import (
    Job,
    JobList,
    JobPage,
    SubmitOptions,
    _capped_pause,
    _headers,
    _idempotency,
    _job_path,
    _list_params,
    _wait_chunk,
    _wait_over,
    _wait_params,
    job_spec,
    resolve_api_key,
    resolve_server,
)
from .errors import CeleriacError, ConnectFailed, ServerUnreachable


def decode(response: httpx.Response) -> Any:
    """The JSON body of a 2xx answer; a ``CeleriacError`` for anything else."""
    if response.is_success:
        return response.json() if response.content else None
    try:
        problem = response.json()
    except ValueError:
        problem = None
    if not isinstance(problem, dict):
        # Not from the service itself (a proxy, a crash page): keep a readable excerpt.
        problem = {"title": response.reason_phrase, "detail": response.text[:500]}
    title = str(problem.get("title") or "Error")
    raise CeleriacError(
        response.status_code, title, str(problem.get("detail") or ""), problem,
        retry_after=parse_retry_after(response.headers.get("Retry-After")),
    )  # fmt: skip


# httpx raises these before a byte of the request is written.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def _unreachable(request: httpx.Request, exc: httpx.TransportError) -> ServerUnreachable:
    kind = ConnectFailed if isinstance(exc, NOT_SENT) else ServerUnreachable
    return kind(
        f"{request.method} {request.url.copy_with(query=None)}: {type(exc).__name__}: {exc}"
    )


class AsyncClient:
    """The asyncio twin of ``Client``: same methods, awaitable. Use it from one event
    loop only (its connections belong to that loop)."""

    def __init__(
        self,
        server: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int | None = None,
        retry_budget: float | None = None,
    ) -> None:
        self.server = resolve_server(server)
        self._timeout = timeout
        self.retry_policy = RetryPolicy.resolve(retries, retry_budget)
        self._http = httpx.AsyncClient(
            base_url=self.server, headers=_headers(resolve_api_key(api_key)), timeout=timeout
        )

    def __repr__(self) -> str:
        return f"AsyncClient({self.server!r})"

    async def request(
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
        request = self._http.build_request(
            method, path, json=json, content=content, params=params, headers=headers,
            timeout=self._timeout + wait,
        )  # fmt: skip
        safe = is_safe(method, headers)
        policy = self.retry_policy
        deadline = monotonic_deadline(policy)
        retry = 0
        while True:
            try:
                return await self._send(request)
            except (CeleriacError, ServerUnreachable) as exc:
                pause = policy.wait_before(retry, exc, safe=safe, deadline=deadline)
                if pause is None:
                    raise
                note_retry(f"{method} {path}", exc, retry, policy, pause)
            await asyncio.sleep(pause)
            retry += 1

    async def _send(self, request: httpx.Request) -> Any:
        try:
            response = await self._http.send(request)
        except httpx.TransportError as exc:
            raise _unreachable(request, exc) from exc
        return decode(response)

    async def submit(
        self,
        task: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        wait: float | None = None,
        **options: Unpack[SubmitOptions],
    ) -> Job:
        body = job_spec(task, args, kwargs, **options)
        headers = _idempotency(idempotency_key, self.retry_policy)
        params = _wait_params(wait)
        job: Job = await self.request(
            "POST", "/jobs", json=body, params=params, headers=headers, wait=wait or 0.0
        )
        return job

    async def submit_batch(self, jobs: Iterable[Mapping[str, Any]]) -> JobList:
        """As ``Client.submit_batch``: sent again only when its connection failed."""
        answer = await self.request("POST", "/jobs/batch", json={"jobs": [dict(j) for j in jobs]})
        result: JobList = answer["jobs"]
        return result

    async def get(self, job_id: str, wait: float | None = None) -> Job:
        params = {"wait": wait} if wait else None
        job: Job = await self.request("GET", _job_path(job_id), params=params, wait=wait or 0.0)
        return job

    # A timeout parameter rather than asyncio.timeout(): it plans the server-side long-polls,
    # so the service ends each wait cleanly instead of us cancelling a request mid-flight.
    async def wait(self, job_id: str, timeout: float | None = None) -> Job:  # noqa: ASYNC109
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            asked, started = _wait_chunk(deadline), time.monotonic()
            job = await self.get(job_id, wait=asked)
            if _wait_over(job, deadline, job_id):
                return job
            await asyncio.sleep(_capped_pause(asked, started, deadline))

    async def cancel(self, job_id: str) -> Job:
        job: Job = await self.request("POST", _job_path(job_id, "cancel"))
        return job

    async def retry(self, job_id: str) -> Job:
        job: Job = await self.request("POST", _job_path(job_id, "retry"))
        return job

    async def bulk(self, action: str, **filter: Any) -> dict[str, int]:
        answer: dict[str, int] = await self.request(
            "POST", "/jobs/bulk", json={"action": action, "filter": filter}
        )
        return answer

    async def queues(self) -> list[dict[str, Any]]:
        answer = await self.request("GET", "/queues")
        queues: list[dict[str, Any]] = answer["queues"]
        return queues

    async def list(
        self,
        *,
        status: str | None = None,
        queue: str | None = None,
        task: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> JobPage:
        params = _list_params(status, queue, task, limit, cursor)
        page: JobPage = await self.request("GET", "/jobs", params=params)
        return page

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
