"""The tasks behind ``celeriac demo``, written the way you would write your own.

Run a worker for them with ``celeriac worker -A celeriac.examples.demo:app``.
"""

from __future__ import annotations

import asyncio

from celeriac import Cancelled, Celeriac, current_job

app = Celeriac("demo")


@app.task(name="math.add")
def add(x: float, y: float) -> float:
    return x + y


@app.task(name="text.shout")
async def shout(text: str) -> str:
    """An ``async def`` task: it runs on the worker's event loop."""
    await asyncio.sleep(0.2)
    return text.upper() + "!"


# A 3-second lease makes the worker heartbeat every second, so progress shows up live.
@app.task(name="demo.slow", timeout=3)
def slow(seconds: float = 3.0, steps: int = 6) -> str:
    for step in range(steps):
        current_job.report_progress(step, steps, "working")
        if current_job.wait_cancelled(seconds / steps):
            raise Cancelled("stopped on request")
    current_job.report_progress(steps, steps, "done")
    return f"slept {seconds:g}s"


@app.task(
    name="demo.flaky",
    max_retries=3,
    retry_backoff={"base": 0.5, "max": 2.0, "jitter": False},
    autoretry_for=(ConnectionError,),
)
def flaky(succeed_on_attempt: int = 3) -> str:
    """Fails until its ``succeed_on_attempt``-th attempt, like a call to a service
    that is still starting up."""
    if current_job.attempt < succeed_on_attempt:
        raise ConnectionError(f"attempt {current_job.attempt}: upstream not ready yet")
    return f"succeeded on attempt {current_job.attempt}"
