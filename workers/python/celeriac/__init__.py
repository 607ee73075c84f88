"""celeriac: define tasks, submit jobs, and run a worker for a celeriac service.

from celeriac import Celeriac

app = Celeriac("proj")

@app.task
def add(x: int, y: int) -> int:
    return x + y

add.delay(2, 3).get(timeout=10)  # 5, once a worker runs: celeriac worker -A proj:app
"""

from typing import TYPE_CHECKING, Any

# The distribution's version (workers/python/pyproject.toml; a test keeps them equal), here
# so that a worker reporting it need not import importlib.metadata (about 11 ms).
__version__ = "0.1.0"

from .app import Celeriac
from .canvas import Signature, WorkflowHandle, chain, chord, group
from .client import Client
from .context import JobContext, current_job, get_current_job
from .errors import (
    Cancelled,
    CeleriacError,
    ConnectFailed,
    JobFailed,
    Retry,
    ServerUnreachable,
    SoftTimeLimitExceeded,
    TimeLimitExceeded,
)
from .handle import JobHandle
from .task import AsyncTask, Task

if TYPE_CHECKING:
    from ._async_client import AsyncClient

__all__ = [
    "AsyncClient",
    "AsyncTask",
    "Cancelled",
    "Celeriac",
    "CeleriacError",
    "Client",
    "ConnectFailed",
    "JobContext",
    "JobFailed",
    "JobHandle",
    "Retry",
    "ServerUnreachable",
    "Signature",
    "SoftTimeLimitExceeded",
    "Task",
    "TimeLimitExceeded",
    "WorkflowHandle",
    "chain",
    "chord",
    "current_job",
    "get_current_job",
    "group",
]


def __getattr__(name: str) -> Any:
    """``AsyncClient`` is imported on first use: it brings httpx, which a worker and a
    blocking submitter never need (about 0.1 s of start-up)."""
    if name == "AsyncClient":
        from ._async_client import AsyncClient

        return AsyncClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
