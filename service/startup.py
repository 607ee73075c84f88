"""Start-up while the database (or the broker) is still down, as compose and Kubernetes
expect: the HTTP server answers at once (``/healthz`` 200, ``/readyz`` and every route
that needs SQL 503 with Retry-After), and what needs the database — the clock, the broker,
the schedules file, the background loops — starts once it answers. Waiting is retried with
backoff, and logged at most once every ``LOG_EVERY_SECONDS``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar

from redis.exceptions import RedisError

from service import errors, flow
from service.brokers.base import BrokerHooks
from service.migrate import SchemaBehind, schema_problem, script_revisions
from service.outage import describe, is_unreachable
from service.runtime import Runtime

log = logging.getLogger("celeriac.service")
T = TypeVar("T")

BACKOFF_MIN, BACKOFF_MAX = 0.25, 5.0
LOG_EVERY_SECONDS = 5.0
BROKER_START_SECONDS = 10.0  # a broker host that does not answer must not hang the start
# What "not up yet" looks like: anything else is a bug and is logged with its traceback.
_NOT_UP = (errors.DatabaseUnavailable, RedisError, OSError, TimeoutError, SchemaBehind)


def starting(runtime: Runtime) -> errors.DatabaseUnavailable:
    """The 503 every route answers until start-up has finished."""
    waiting = runtime.startup_problem or "waits for its database (and broker)"
    return runtime.db.outage.unavailable(
        f"the service is starting: {waiting}; retry in {runtime.db.outage.retry_after()}s"
    )


async def check_schema(runtime: Runtime) -> None:
    """Serve only a database migrated as far as this code needs: before, every route
    would fail on a missing table or column. Checked again until someone migrates it."""
    revisions = await asyncio.to_thread(script_revisions)
    if revisions is None:
        return
    heads, known = revisions
    problem = await runtime.db.read(lambda session: schema_problem(session, heads, known))
    runtime.startup_problem = problem
    if problem is not None:
        raise SchemaBehind(problem)


async def with_backoff(step: Callable[[], Awaitable[T]], what: str) -> T:
    """Run ``step`` until it succeeds."""
    delay, attempts, logged = BACKOFF_MIN, 0, float("-inf")
    while True:
        try:
            return await step()
        except Exception as exc:
            attempts += 1
            if time.monotonic() - logged >= LOG_EVERY_SECONDS:
                logged = time.monotonic()
                expected = isinstance(exc, _NOT_UP) or is_unreachable(exc)
                log.warning(
                    "start-up: %s not possible yet (attempt %d: %s); retrying",
                    what, attempts, describe(exc),
                    exc_info=not expected,
                )  # fmt: skip
        await asyncio.sleep(delay)
        delay = min(delay * 2, BACKOFF_MAX)


async def start_broker(runtime: Runtime) -> None:
    """Start the broker, bounded; a failed start is closed before it is tried again."""
    broker = runtime.broker
    try:
        await asyncio.wait_for(
            broker.start(
                BrokerHooks(
                    now=runtime.clock.now,
                    apply=runtime.apply,
                    direct=runtime.direct,
                    flow_active=partial(flow.active_now, runtime),
                )
            ),
            BROKER_START_SECONDS,
        )
    except Exception:  # (a cancellation is shutdown: the lifespan closes the broker)
        await broker.close()
        raise


async def start_when_reachable(
    runtime: Runtime, start_loops: Callable[[], Awaitable[None]]
) -> None:
    """Wait for the database, measure its clock, start the broker, then ``start_loops``
    (which may use the database again, so it too is retried); then serve."""
    await with_backoff(lambda: runtime.db.read(runtime.clock.measure), "connecting to the database")
    await with_backoff(lambda: check_schema(runtime), "serving the database's schema")
    await with_backoff(lambda: start_broker(runtime), f"starting the {runtime.broker.name} broker")
    await with_backoff(start_loops, "starting the background loops")
    runtime.started = True
    log.info("celeriac ready: database=%s broker=%s", runtime.db.dialect, runtime.broker.name)
