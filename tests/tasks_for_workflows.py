"""Tasks the workflow tests (tests/test_workflows_run.py) run on real ``celeriac worker``
processes (``--app tasks_for_workflows:app``; tests/ is on their PYTHONPATH)."""

from __future__ import annotations

import os
import time
from typing import Any

from celeriac import Celeriac, current_job

app = Celeriac("workflow-tests")


@app.task(name="wf.add")
def add(a: float, b: float) -> float:
    return a + b


@app.task(name="wf.mul")
def mul(a: float, b: float) -> float:
    return a * b


@app.task(name="wf.inc")
def inc(a: int) -> int:
    return a + 1


@app.task(name="wf.echo")
def echo(value: Any) -> Any:
    return value


@app.task(name="wf.nap")
def nap(value: Any, seconds: float) -> Any:
    time.sleep(seconds)
    return value


@app.task(name="wf.tsum")
def tsum(values: list[float]) -> float:
    return sum(values)


@app.task(name="wf.collect")
def collect(values: list[Any], record: str = "") -> list[Any]:
    """Returns what it was given; with ``record``, appends a line to that file per run
    (the kill-storm test counts the callback's runs)."""
    if record:
        with open(record, "a") as out:
            out.write(f"{current_job.job_id} {current_job.attempt} {len(values)}\n")
    return values


@app.task(name="wf.seen")
def seen() -> dict[str, Any]:
    """What the lease said of its parents (``current_job.parents`` and statuses)."""
    return {"parents": dict(current_job.parents), "status": dict(current_job.parent_status)}


@app.task(name="wf.boom", max_retries=0)
def boom(label: str) -> None:
    raise RuntimeError(f"{label} broke")


@app.task(name="wf.wait_for_cancel")
def wait_for_cancel(seconds: float) -> str:
    """Runs until its cancellation arrives (or ``seconds`` pass): a job to cancel mid-way."""
    current_job.wait_cancelled(seconds)
    current_job.raise_if_cancelled()
    return f"not cancelled in process {os.getpid()}"
