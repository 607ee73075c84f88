"""Tasks: functions registered on a ``Celeriac`` app, callable as before and submittable
as jobs with ``.delay()`` / ``.apply_async()``."""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, cast

from .canvas import Signature
from .client import Job, RetryBackoff, SubmitOptions
from .handle import JobHandle

if TYPE_CHECKING:
    from .app import Celeriac

P = ParamSpec("P")
R = TypeVar("R")

NAME_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


def check_name(kind: str, value: str) -> str:
    if not NAME_PATTERN.fullmatch(value):
        raise ValueError(f"{kind} {value!r} must match [A-Za-z0-9_.:-]{{1,128}}")
    return value


@dataclass(frozen=True)
class TaskOptions:
    """Defaults for the task's jobs (``None``: the service default) and how the worker
    treats its exceptions."""

    queue: str | None = None
    priority: int | None = None
    max_retries: int | None = None
    retry_backoff: RetryBackoff | None = None
    timeout: float | None = None
    # Non-empty: only these exceptions ask for a retry; others fail the job at once.
    autoretry_for: tuple[type[BaseException], ...] = ()
    # Seconds; None: the worker's --soft-time-limit / --time-limit (docs/python.md).
    soft_time_limit: float | None = None
    time_limit: float | None = None
    # Flow control (docs/flow-control.md).
    limits: tuple[str, ...] = ()
    unique: dict[str, Any] | None = None
    debounce: dict[str, Any] | None = None

    def submit_defaults(self) -> SubmitOptions:
        options = SubmitOptions()
        if self.queue is not None:
            options["queue"] = self.queue
        if self.priority is not None:
            options["priority"] = self.priority
        if self.max_retries is not None:
            options["max_retries"] = self.max_retries
        if self.retry_backoff is not None:
            options["retry_backoff"] = self.retry_backoff
        if self.timeout is not None:
            options["timeout"] = self.timeout
        if self.limits:
            options["limits"] = list(self.limits)
        if self.unique is not None:
            options["unique"] = self.unique
        if self.debounce is not None:
            options["debounce"] = self.debounce
        return options

    def retries(self, exc: BaseException) -> bool:
        """Whether an attempt that raised ``exc`` may be retried; the service decides
        whether it is, by the job's ``max_retries``."""
        return not self.autoretry_for or isinstance(exc, self.autoretry_for)


def unique_option(unique: bool | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``unique=True``: the default key (a hash of task, queue and arguments); a mapping:
    ``{"key", "for", "while"}`` as ``POST /jobs`` takes it."""
    if unique is None or unique is False:
        return None
    return {} if unique is True else dict(unique)


def debounce_option(key: str | None, period: float | None) -> dict[str, Any] | None:
    if key is None and period is None:
        return None
    if key is None or period is None:
        raise ValueError("debounce needs both a key and a period (seconds)")
    return {"key": key, "period": period}


def _merge(defaults: SubmitOptions, **overrides: Any) -> SubmitOptions:
    """The task's defaults overridden by whatever the call gave (``None``: not given)."""
    given = {key: value for key, value in overrides.items() if value is not None}
    return cast(SubmitOptions, {**defaults, **given})


class BaseTask(Generic[P, R]):
    """What sync and async tasks share: a name, job defaults and submission."""

    is_async = False

    def __init__(
        self, app: Celeriac, func: Callable[..., Any], name: str, options: TaskOptions
    ) -> None:
        # Keep __name__, __doc__, __module__, __wrapped__ of the function for tools.
        functools.update_wrapper(cast(Any, self), func)
        self.app = app
        self.func = func
        self.name = check_name("task name", name)
        self.options = options

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> JobHandle[R]:
        """Submit a job with these arguments and the task's default options."""
        return self.apply_async(args, kwargs)

    def apply_async(
        self,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        delay: float | None = None,
        run_at: datetime | str | None = None,
        queue: str | None = None,
        priority: int | None = None,
        idempotency_key: str | None = None,
        max_retries: int | None = None,
        expires_at: datetime | str | None = None,
        timeout: float | None = None,
        limits: Sequence[str] | None = None,
        unique: bool | Mapping[str, Any] | None = None,
        debounce: Mapping[str, Any] | None = None,
    ) -> JobHandle[R]:
        """Submit a job, overriding the task's options; arguments are not type-checked
        here (use ``delay`` for that). ``limits``, ``unique`` and ``debounce``: flow
        control (docs/flow-control.md)."""
        options = _merge(
            self.options.submit_defaults(), delay=delay, run_at=run_at, queue=queue,
            priority=priority, max_retries=max_retries, expires_at=expires_at, timeout=timeout,
            limits=None if limits is None else list(limits), unique=unique_option(unique),
            debounce=None if debounce is None else dict(debounce),
        )  # fmt: skip
        if unique is False:  # this call opts out of the task's unique default
            options.pop("unique", None)
        job = self.app.client.submit(
            self.name, args, kwargs, idempotency_key=idempotency_key, **options
        )
        return self._handle(job)

    async def adelay(self, *args: P.args, **kwargs: P.kwargs) -> JobHandle[R]:
        """``delay`` for asyncio code."""
        return await self.aapply_async(args, kwargs)

    async def aapply_async(
        self,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        delay: float | None = None,
        run_at: datetime | str | None = None,
        queue: str | None = None,
        priority: int | None = None,
        idempotency_key: str | None = None,
        max_retries: int | None = None,
        expires_at: datetime | str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the job's lease length, not ours
        limits: Sequence[str] | None = None,
        unique: bool | Mapping[str, Any] | None = None,
        debounce: Mapping[str, Any] | None = None,
    ) -> JobHandle[R]:
        """``apply_async`` for asyncio code."""
        options = _merge(
            self.options.submit_defaults(), delay=delay, run_at=run_at, queue=queue,
            priority=priority, max_retries=max_retries, expires_at=expires_at, timeout=timeout,
            limits=None if limits is None else list(limits), unique=unique_option(unique),
            debounce=None if debounce is None else dict(debounce),
        )  # fmt: skip
        if unique is False:  # this call opts out of the task's unique default
            options.pop("unique", None)
        job = await self.app.async_client().submit(
            self.name, args, kwargs, idempotency_key=idempotency_key, **options
        )
        return self._handle(job)

    def _handle(self, job: Job) -> JobHandle[R]:
        return JobHandle(self.app, job["id"], job)

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A signature for the canvas (docs/workflows.md): in a chain it gets the previous
        step's result as its first argument, in a chord's callback the group's results."""
        return Signature(self, args, kwargs)

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        """An immutable signature: only these arguments, whatever ran before it."""
        return Signature(self, args, kwargs, immutable=True)


class Task(BaseTask[P, R]):
    """A ``def`` task: calling it runs the function here and now."""

    def __init__(
        self, app: Celeriac, func: Callable[P, R], name: str, options: TaskOptions
    ) -> None:
        super().__init__(app, func, name, options)
        self._call = func

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._call(*args, **kwargs)


class AsyncTask(BaseTask[P, R]):
    """An ``async def`` task: calling it returns the coroutine, as the function would."""

    is_async = True

    def __init__(
        self, app: Celeriac, func: Callable[P, Awaitable[R]], name: str, options: TaskOptions
    ) -> None:
        super().__init__(app, func, name, options)
        self._call = func

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Awaitable[R]:
        return self._call(*args, **kwargs)
