"""Tasks the integration tests run on a real ``celeriac worker`` process
(``celeriac worker --app tasks_for_tests:app``; tests/ is on its PYTHONPATH)."""

from __future__ import annotations

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
