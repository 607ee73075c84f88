"""``Celeriac``: the application object that tasks are registered on (like Celery's)."""

from __future__ import annotations

import inspect
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, Unpack, overload

from .client import (
    Client,
    RetryBackoff,
    SubmitOptions,
    resolve_api_key,
    resolve_server,
)
from .handle import JobHandle
from .task import AsyncTask, BaseTask, Task, TaskOptions, check_name, unique_option

if TYPE_CHECKING:
    import asyncio

    from ._async_client import AsyncClient

P = ParamSpec("P")
R = TypeVar("R")

AnyTask = BaseTask[Any, Any]


class TaskDecorator:
    """What ``@app.task(...)`` returns: applied to the function, it registers the task."""

    def __init__(self, app: Celeriac, name: str | None, options: TaskOptions) -> None:
        self._app = app
        self._name = name
        self._options = options

    # An async function also matches the second overload; the first, narrower one wins.
    @overload
    def __call__(  # type: ignore[overload-overlap]
        self, func: Callable[P, Coroutine[Any, Any, R]], /
    ) -> AsyncTask[P, R]: ...
    @overload
    def __call__(self, func: Callable[P, R], /) -> Task[P, R]: ...
    def __call__(self, func: Callable[..., Any], /) -> AnyTask:
        return self._app.register(func, self._name, self._options)


def _backoff(value: float | RetryBackoff | None) -> RetryBackoff | None:
    if value is None or isinstance(value, dict):
        return value
    return RetryBackoff(base=float(value))


def _positive(name: str, value: float | None) -> float | None:
    if value is not None and value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
    return value


class Celeriac:
    """Tasks and the connection to a celeriac service.

    ``server`` defaults to ``$CELERIAC_SERVER_URL`` (else http://127.0.0.1:8000) and
    ``api_key`` to ``$CELERIAC_API_KEY``; both are read when the first request is made,
    not at import. ``client_retries`` is the clients' ``retries`` (default
    ``$CELERIAC_CLIENT_RETRIES``, else 5; 0: a blip fails ``.delay()`` at once).
    """

    def __init__(
        self,
        main: str | None = None,
        *,
        server: str | None = None,
        api_key: str | None = None,
        client_retries: int | None = None,
    ) -> None:
        self.main = main
        self.tasks: dict[str, AnyTask] = {}
        self._server = server
        self._api_key = api_key
        self._retries = client_retries
        self._lock = threading.Lock()
        self._client: Client | None = None
        # httpx async connections belong to one event loop: one AsyncClient per loop.
        self._async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncClient] = (
            weakref.WeakKeyDictionary()
        )

    def __repr__(self) -> str:
        return f"<Celeriac {self.main or '?'} tasks={len(self.tasks)}>"

    @property
    def server(self) -> str:
        return resolve_server(self._server)

    @property
    def api_key(self) -> str | None:
        return resolve_api_key(self._api_key)

    def configure(self, *, server: str | None = None, api_key: str | None = None) -> None:
        """Point the app at another service (e.g. from settings loaded at startup)."""
        self.close()
        self._server = server or self._server
        self._api_key = api_key or self._api_key

    @property
    def client(self) -> Client:
        """The app's blocking client, created on first use and shared by all threads."""
        with self._lock:
            if self._client is None:
                self._client = Client(self._server, self._api_key, retries=self._retries)
            return self._client

    def new_client(self) -> Client:
        """A separate blocking client with the app's server and key (the worker's own)."""
        return Client(self._server, self._api_key, retries=self._retries)

    def async_client(self) -> AsyncClient:
        """The app's asyncio client for the running event loop."""
        import asyncio  # here: a worker running plain functions never needs it

        loop = asyncio.get_running_loop()
        client = self._async_clients.get(loop)
        if client is None:
            from ._async_client import AsyncClient  # on first use: it brings httpx

            client = AsyncClient(self._server, self._api_key, retries=self._retries)
            self._async_clients[loop] = client
        return client

    def close(self) -> None:
        """Close the blocking client (async ones: ``await app.aclose()`` in their loop)."""
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    async def aclose(self) -> None:
        import asyncio

        client = self._async_clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    @overload
    def task(  # type: ignore[overload-overlap]  # narrower first, as in TaskDecorator
        self, func: Callable[P, Coroutine[Any, Any, R]], /
    ) -> AsyncTask[P, R]: ...
    @overload
    def task(self, func: Callable[P, R], /) -> Task[P, R]: ...
    @overload
    def task(
        self,
        /,
        *,
        name: str | None = None,
        queue: str | None = None,
        priority: int | None = None,
        max_retries: int | None = None,
        retry_backoff: float | RetryBackoff | None = None,
        timeout: float | None = None,
        autoretry_for: Sequence[type[BaseException]] = (),
        soft_time_limit: float | None = None,
        time_limit: float | None = None,
        limits: Sequence[str] = (),
        unique: bool | Mapping[str, Any] | None = None,
        debounce: Mapping[str, Any] | None = None,
    ) -> TaskDecorator: ...
    def task(
        self,
        func: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        queue: str | None = None,
        priority: int | None = None,
        max_retries: int | None = None,
        retry_backoff: float | RetryBackoff | None = None,
        timeout: float | None = None,
        autoretry_for: Sequence[type[BaseException]] = (),
        soft_time_limit: float | None = None,
        time_limit: float | None = None,
        limits: Sequence[str] = (),
        unique: bool | Mapping[str, Any] | None = None,
        debounce: Mapping[str, Any] | None = None,
    ) -> AnyTask | TaskDecorator:
        """Register a task: ``@app.task`` or ``@app.task(name=..., queue=..., ...)``.

        The job options are defaults for ``.delay()``; ``retry_backoff`` is the first
        backoff in seconds or a full ``{"base", "max", "jitter"}`` dict. With
        ``autoretry_for`` only those exceptions are retried (others fail the job at once);
        without it every exception is, until ``max_retries`` runs out.
        ``soft_time_limit`` raises ``SoftTimeLimitExceeded`` in the task after that many
        seconds; ``time_limit`` stops it for good (what each pool can enforce:
        docs/python.md, "Pools and time limits"). Both override the worker's defaults.
        ``limits`` (limit keys), ``unique`` (True, or ``{"key", "for", "while"}``) and
        ``debounce`` (``{"key", "period"}``) are flow control, enforced by the service
        (docs/flow-control.md).
        """
        options = TaskOptions(
            queue=None if queue is None else check_name("queue", queue),
            priority=priority,
            max_retries=max_retries,
            retry_backoff=_backoff(retry_backoff),
            timeout=timeout,
            autoretry_for=tuple(autoretry_for),
            soft_time_limit=_positive("soft_time_limit", soft_time_limit),
            time_limit=_positive("time_limit", time_limit),
            limits=tuple(check_name("limit", limit) for limit in limits),
            unique=unique_option(unique),
            debounce=None if debounce is None else dict(debounce),
        )
        decorator = TaskDecorator(self, name, options)
        return decorator if func is None else decorator(func)

    def register(self, func: Callable[..., Any], name: str | None, options: TaskOptions) -> AnyTask:
        name = name or f"{func.__module__}.{func.__qualname__}"
        if "<locals>" in name:
            raise ValueError(f"{name}: a nested function needs an explicit @app.task(name=...)")
        task: AnyTask
        if inspect.iscoroutinefunction(func):
            task = AsyncTask(self, func, name, options)
        else:
            task = Task(self, func, name, options)
        self._check_unique(task)
        self.tasks[task.name] = task
        return task

    def _check_unique(self, task: AnyTask) -> None:
        existing = self.tasks.get(task.name)
        # The same function registered again (a module imported twice) just replaces it.
        if existing is not None and _origin(existing.func) != _origin(task.func):
            raise ValueError(f"task name {task.name!r} is already used by {existing.func!r}")

    def send_task(
        self,
        name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        **options: Unpack[SubmitOptions],
    ) -> JobHandle[Any]:
        """Submit a job by task name: for tasks this process does not import."""
        job = self.client.submit(name, args, kwargs, idempotency_key=idempotency_key, **options)
        return JobHandle(self, job["id"], job)

    async def asend_task(
        self,
        name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        **options: Unpack[SubmitOptions],
    ) -> JobHandle[Any]:
        client = self.async_client()
        job = await client.submit(name, args, kwargs, idempotency_key=idempotency_key, **options)
        return JobHandle(self, job["id"], job)

    def job(self, job_id: str) -> JobHandle[Any]:
        """A handle on an existing job (Celery's ``AsyncResult(id)``)."""
        return JobHandle(self, job_id)


def _origin(func: Callable[..., Any] | Callable[..., Awaitable[Any]]) -> tuple[str, str]:
    return (func.__module__, func.__qualname__)
