"""``JobHandle``: a submitted job, to ask about or wait for (Celery's ``AsyncResult``)."""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .client import FINISHED, Job
from .errors import JobFailed

if TYPE_CHECKING:
    from .app import Celeriac

R = TypeVar("R")


def _result(job: Job) -> Any:
    if job["status"] != "succeeded":
        raise JobFailed(job)
    return job.get("result")


class JobHandle(Generic[R]):
    """``R`` is the task's return type, so ``handle.get()`` type-checks as the task's
    result (as decoded from JSON: tuples come back as lists)."""

    def __init__(self, app: Celeriac, job_id: str, job: Job | None = None) -> None:
        self.app = app
        self.id = job_id
        # The job as last seen; ``submitted`` keeps what POST /jobs answered.
        self.submitted = job

    def __repr__(self) -> str:
        task = f" {self.submitted['task']}" if self.submitted else ""
        return f"<JobHandle{task} {self.id}>"

    def refresh(self) -> Job:
        """The job's current state (one GET)."""
        return self.app.client.get(self.id)

    @property
    def status(self) -> str:
        """Fresh from the service on every access."""
        return str(self.refresh()["status"])

    def ready(self) -> bool:
        return self.status in FINISHED

    def wait(self, timeout: float | None = None) -> Job:
        """Block until the job is finished and return it; ``TimeoutError`` after
        ``timeout`` seconds."""
        return self.app.client.wait(self.id, timeout)

    def get(self, timeout: float | None = None) -> R:
        """The task's result; ``JobFailed`` if it failed, was cancelled or expired."""
        result: R = _result(self.wait(timeout))
        return result

    def cancel(self) -> Job:
        return self.app.client.cancel(self.id)

    def retry(self) -> Job:
        return self.app.client.retry(self.id)

    async def await_(self, timeout: float | None = None) -> Job:  # noqa: ASYNC109 - see AsyncClient.wait
        """``wait`` for asyncio code."""
        return await self.app.async_client().wait(self.id, timeout)

    async def aget(self, timeout: float | None = None) -> R:  # noqa: ASYNC109 - see AsyncClient.wait
        """``get`` for asyncio code."""
        result: R = _result(await self.await_(timeout))
        return result

    def __await__(self) -> Generator[Any, None, R]:
        """``await handle`` is ``await handle.aget()``."""
        return self.aget().__await__()
