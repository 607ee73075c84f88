"""celeriac: define tasks, submit jobs, and run a worker for a celeriac service.

from celeriac import Celeriac

app = Celeriac("proj")

@app.task
def add(x: int, y: int) -> int:
    return x + y

add.delay(2, 3).get(timeout=10)  # 5, once a worker runs: celeriac worker -A proj:app
"""

from .app import Celeriac
from .canvas import Signature, WorkflowHandle, chain, chord, group
from .client import AsyncClient, Client
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
