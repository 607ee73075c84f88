"""Tasks the integration tests run on a real ``celeriac worker`` process
(``celeriac worker --app tasks_for_tests:app``; tests/ is on its PYTHONPATH)."""

from __future__ import annotations

import logging
import time

from celeriac import Celeriac, current_job

app = Celeriac("tests")


@app.task(name="tests.hang_first_attempt")
def hang_first_attempt(label: str) -> str:
    """Hangs on its first attempt (the test kills the worker with SIGKILL meanwhile) and
    succeeds on any later one."""
    if current_job.attempt == 1:
        while True:
            time.sleep(0.2)
    return f"{label}: done on attempt {current_job.attempt}"


@app.task(name="tests.add")
def add(a: float, b: float) -> float:
    """Quick: for the tests that wait for a result in one call (``POST /jobs?wait=``)."""
    return a + b


@app.task(name="tests.chatty", retry_backoff={"base": 0.05, "max": 0.05, "jitter": False})
def chatty(lines: int, fail_first: bool) -> int:
    """Logs ``lines`` lines per attempt (issue 16, per-attempt job logs); its first attempt
    fails when ``fail_first``."""
    log = logging.getLogger("tests.chatty")
    for index in range(lines):
        log.warning("attempt %d line %d \x1b[31mred\x1b[0m", current_job.attempt, index)
    if fail_first and current_job.attempt == 1:
        raise RuntimeError("first attempt fails")
    return current_job.attempt


_failed_once: set[str] = set()


@app.task(name="tests.fail_first")
def fail_first(label: str) -> str:
    """Fails the first time this worker process runs it for ``label`` (the dashboard tests
    submit it with no retries, so it ends ``failed``, with a traceback); a retry succeeds.
    (A retry starts the job's attempts over, so the attempt number cannot tell.)"""
    if label not in _failed_once:
        _failed_once.add(label)
        raise ValueError(f"{label}: the first attempt always fails")
    return f"{label}: ok on attempt {current_job.attempt}"
