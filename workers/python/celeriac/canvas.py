"""The canvas: Celery's ``chain``, ``group`` and ``chord`` over celeriac workflows
(docs/workflows.md). A canvas is compiled into the jobs of one ``POST /workflows``
(each with the refs it runs ``after``), so the service, not a result backend, decides
when each job may run: nothing is counted in Redis and nothing is lost to a crash.

As in Celery, a mutable signature (``task.s(...)``) in a chain receives the previous
step's result as its first argument, and a chord's callback the list of its group's
results, in order; the service puts them there when it queues the job
(``parents_arg``), so workers in any language see the same arguments. ``task.si(...)``
is immutable: it gets only its own arguments."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .client import FINISHED, Job
from .errors import JobFailed
from .handle import JobHandle

if TYPE_CHECKING:
    from .app import Celeriac
    from .task import BaseTask

OnFailure = Literal["cancel_dependents", "continue"]


@dataclass(frozen=True)
class _Output:
    """Where a placed canvas's result comes from: the refs of the jobs whose results it
    is, and whether it is one result (a task, a chain, a chord) or a list (a group)."""

    refs: list[str]
    many: bool


@dataclass
class _Plan:
    """The jobs of the workflow being compiled."""

    jobs: list[dict[str, Any]] = field(default_factory=list)
    counter: itertools.count[int] = field(default_factory=itertools.count)
    app: Celeriac | None = None

    def ref(self, task: str) -> str:
        return f"{next(self.counter)}.{task}"[:128]


class Canvas:
    """What every canvas shape can do: compose with ``|``, and be submitted."""

    def _place(self, plan: _Plan, after: _Output | None) -> _Output:
        raise NotImplementedError

    def __or__(self, other: Canvas) -> chain:
        return chain(self, other)

    def apply_async(
        self,
        *,
        app: Celeriac | None = None,
        on_failure: OnFailure = "cancel_dependents",
        webhook: Mapping[str, Any] | None = None,
    ) -> WorkflowHandle:
        """Submit the whole canvas as one workflow (one transaction). ``webhook``:
        ``{"url", "events"?}``, called once the workflow finished (docs/workflows.md)."""
        plan = _Plan(app=app)
        output = self._place(plan, None)
        if plan.app is None:
            raise ValueError("the canvas has no task to take the app from; pass app=")
        body: dict[str, Any] = {"jobs": plan.jobs, "on_failure": on_failure}
        if webhook is not None:
            body["webhook"] = dict(webhook)
        answer = plan.app.client.request("POST", "/workflows", json=body)
        return WorkflowHandle(plan.app, answer, output, self)

    def delay(self) -> WorkflowHandle:
        return self.apply_async()


class Signature(Canvas):
    """A task with its arguments and job options, not yet submitted (``task.s(...)``)."""

    def __init__(
        self,
        task: BaseTask[Any, Any],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        immutable: bool = False,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        self.task = task
        self.args = list(args)
        self.kwargs = dict(kwargs or {})
        self.immutable = immutable
        self.options: dict[str, Any] = dict(options or {})

    def __repr__(self) -> str:
        mark = "si" if self.immutable else "s"
        return f"{self.task.name}.{mark}({self.args!r}, {self.kwargs!r})"

    def set(self, **options: Any) -> Signature:
        """A copy with these job options (queue, priority, max_retries, timeout, ...)."""
        merged = {**self.options, **options}
        return Signature(self.task, self.args, self.kwargs, immutable=self.immutable,
                         options=merged)  # fmt: skip

    def link(self, callback: Canvas) -> chain:
        """Celery's ``link``: run ``callback`` after this one succeeds (a chain)."""
        return chain(self, callback)

    def _place(self, plan: _Plan, after: _Output | None) -> _Output:
        plan.app = plan.app or self.task.app
        ref = plan.ref(self.task.name)
        job: dict[str, Any] = {
            "ref": ref,
            "task": self.task.name,
            "args": self.args,
            "kwargs": self.kwargs,
            **self.task.options.submit_defaults(),
            **self.options,
        }
        if after is not None and after.refs:
            job["after"] = after.refs
            if not self.immutable:
                job["parents_arg"] = "list" if after.many else "one"
        plan.jobs.append(job)
        return _Output([ref], many=False)


class chain(Canvas):  # Celery's name
    """Each step runs after the previous one; a mutable step gets its result first."""

    def __init__(self, *steps: Canvas | Iterable[Canvas]) -> None:
        self.steps = _flatten(steps)
        if not self.steps:
            raise ValueError("a chain needs at least one step")

    def _place(self, plan: _Plan, after: _Output | None) -> _Output:
        for step in self.steps:
            after = step._place(plan, after)
        assert after is not None
        return after


class group(Canvas):  # Celery's name
    """Its members run in parallel (each after what precedes the group); its result is
    the list of theirs, in order."""

    def __init__(self, *members: Canvas | Iterable[Canvas]) -> None:
        self.members = _flatten(members)
        if not self.members:
            raise ValueError("a group needs at least one member")

    def _place(self, plan: _Plan, after: _Output | None) -> _Output:
        refs: list[str] = []
        for member in self.members:
            refs += member._place(plan, after).refs
        return _Output(refs, many=True)


class chord(Canvas):  # Celery's name
    """A group, then ``body`` with the list of the group's results (first argument)."""

    def __init__(self, header: group | Iterable[Canvas], body: Canvas) -> None:
        self.header = header if isinstance(header, group) else group(header)
        self.body = body

    def _place(self, plan: _Plan, after: _Output | None) -> _Output:
        results = self.header._place(plan, after)
        return self.body._place(plan, _Output(results.refs, many=True))


def _flatten(items: Sequence[Canvas | Iterable[Canvas]]) -> list[Canvas]:
    """``group(sig for ...)`` and ``group(a, b)`` alike."""
    flat: list[Canvas] = []
    for item in items:
        if isinstance(item, Canvas):
            flat.append(item)
        else:
            flat.extend(item)
    return flat


class WorkflowHandle:
    """A submitted canvas: its workflow, and its result (``get``) in the canvas's shape:
    a group's list in order, a chain's last result, a chord's callback's result."""

    def __init__(self, app: Celeriac, answer: Job, output: _Output, canvas: Canvas) -> None:
        self.app = app
        self.id: str = answer["id"]
        self.submitted = answer
        self.job_ids: dict[str, str] = {job["ref"]: job["id"] for job in answer["jobs"]}
        self._output = output
        self._canvas = canvas

    def __repr__(self) -> str:
        return f"<WorkflowHandle {self.id}>"

    def refresh(self) -> Job:
        """The workflow as the service has it: status and each job's (one GET)."""
        answer: Job = self.app.client.request("GET", f"/workflows/{self.id}")
        return answer

    @property
    def status(self) -> str:
        return str(self.refresh()["status"])

    def handles(self) -> list[JobHandle[Any]]:
        """The jobs whose results make the canvas's result, in order."""
        return [JobHandle(self.app, self.job_ids[ref]) for ref in self._output.refs]

    def get(self, timeout: float | None = None) -> Any:
        """The canvas's result; ``JobFailed`` if a job it needs failed or was cancelled;
        ``TimeoutError`` after ``timeout`` seconds. Waits on one unfinished job at a time
        (a long-poll), then reads the whole workflow again: a group of 1,000 is a few
        requests, not 1,000."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            jobs = {job["ref"]: job for job in self.refresh()["jobs"]}
            needed = [jobs[ref] for ref in self._output.refs]
            waiting = next((job for job in needed if job["status"] not in FINISHED), None)
            if waiting is None:
                break
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            self.app.client.wait(waiting["id"], left)
        for job in needed:
            if job["status"] != "succeeded":
                raise JobFailed(job)
        results = [job["result"] for job in needed]
        return results if self._output.many else results[0]

    def cancel(self) -> Job:
        """Cancel what has not finished (running jobs at their next heartbeat)."""
        answer: Job = self.app.client.request("POST", f"/workflows/{self.id}/cancel")
        return answer
