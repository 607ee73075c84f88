"""The app factory and its lifespan: the one place that creates the engine, the broker
and the background plugins."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.telemetry import TelemetryConfig
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import errors, flow, ui
from service.brokers.amqp import AmqpBroker, Layout
from service.brokers.base import Broker
from service.brokers.redis import RedisBroker
from service.brokers.sql import SqlBroker
from service.db import Database, create_engine
from service.events import EventHub, Observers
from service.flow import FlowSync
from service.loops import Plugin, launch
from service.maintenance import ClockRefresh, Maintenance
from service.metrics import Metrics, RequestCounter
from service.results import ResultCleaner
from service.retention import Pruner
from service.routers import bulk_actions as bulk_router
from service.routers import events as events_router
from service.routers import flow as flow_router
from service.routers import (
    joblogs,
    jobs,
    leases,
    ops,
    results,
    schedules,
    webhooks,
    workers,
)
from service.routers import metrics as metrics_router
from service.routers import workflows as workflows_router
from service.routers.problems import allowed_methods, declare_api_keys
from service.runtime import Runtime
from service.scheduler import Scheduler, load_schedules_file, prepare_scheduler
from service.settings import Settings
from service.signals import Signals
from service.startup import start_when_reachable
from service.webhook_delivery import Deliverer, http_client

API_VERSION = "1.0.0"
SHUTDOWN_STEP_SECONDS = 3.0
log = logging.getLogger("celeriac.service")


def build_broker(settings: Settings, db: Database, signals: Signals) -> Broker:
    if settings.broker_kind == "redis":
        return RedisBroker(
            db,
            signals,
            url=settings.broker_url,
            prefix=settings.redis_prefix,
            reconcile_age_seconds=settings.reconcile_interval_seconds,
            serve_workers=settings.redis_workers,
        )
    if settings.broker_kind == "amqp":
        return AmqpBroker(
            db,
            signals,
            url=settings.broker_url,
            layout=Layout(settings.amqp_prefix, settings.amqp_quorum),
            reconcile_age_seconds=settings.reconcile_interval_seconds,
        )
    return SqlBroker(db, signals, fallback_seconds=settings.sql_poll_fallback_seconds)


def background_plugins(runtime: Runtime, webhook_client: httpx.AsyncClient) -> list[Plugin]:
    """What every replica runs in the background, one loop each (service/loops.py;
    docs/architecture.md, "Background plugins")."""
    return [
        Maintenance(runtime),
        ClockRefresh(),
        Scheduler(runtime),
        Deliverer(runtime, webhook_client),
        ResultCleaner(runtime),
        Pruner(runtime),
        FlowSync(runtime),
    ]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics(settings.metrics_refresh_seconds)  # this app's own registry

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database(create_engine(settings.database_url))
        signals = Signals()
        broker = build_broker(settings, db, signals)
        # A broker's index drops the jobs a claim hands back blocked: offer them again
        # as their keys' slots free (service/flow.py, ``freed``).
        flow.state_of(db.engine).reoffers = broker.holds_index
        events = EventHub(db, signals)  # GET /events (service/events.py)
        runtime = Runtime(
            settings=settings, db=db, signals=signals, broker=broker,
            observer=Observers(metrics, events),
        )  # fmt: skip
        app.state.runtime = runtime
        app.state.events = events
        # Webhook deliveries, result expiry and the schedules file check their settings
        # here, so a malformed secret, result store or file fails start-up at once.
        webhook_client = http_client(settings)
        plugins = background_plugins(runtime, webhook_client)
        if settings.schedules_file:
            load_schedules_file(Path(settings.schedules_file))

        async def start_loops() -> None:
            await prepare_scheduler(runtime)  # the step that needs the database
            runtime.background += launch(runtime, plugins)

        # The database may be down still: serve now (/healthz 200, the rest 503), and
        # start what needs it once it answers (service/startup.py).
        start = asyncio.create_task(
            start_when_reachable(runtime, start_loops), name="celeriac-start"
        )
        freeze_start_up_objects()
        try:
            with drain_on_stop_signal(signals):
                yield
        finally:
            loops = [start, *runtime.background, *runtime.spawned()]
            for task in loops:
                task.cancel()
            await _bounded(asyncio.gather(*loops, return_exceptions=True), "background loops")
            await _bounded(webhook_client.aclose(), "the webhook client")
            await _bounded(broker.close(), "the broker")
            await _bounded(runtime.close(), "the event loop's database connections")
            db.dispose()

    app = FastAPI(
        title="celeriac",
        version=API_VERSION,
        summary="A job queue: submit over HTTP, work from any language, results in SQL.",
        lifespan=lifespan,
        # The interactive pages load their scripts from a CDN: fine on a developer's
        # loopback service, not on one that holds API keys (a third party's script would
        # run where keys are typed). /openapi.json stays: it is the public contract.
        docs_url=None if settings.auth_enabled else "/docs",
        redoc_url=None if settings.auth_enabled else "/redoc",
        # FastAPI's own OpenTelemetry only with ours (CELERIAC_TRACING, docs/operations.md):
        # off, no request looks up a provider, as the docs promise.
        telemetry=None if settings.tracing else NO_FASTAPI_TELEMETRY,
    )
    for router in (
        jobs.router,
        leases.router,
        ops.router,
        schedules.router,
        webhooks.router,
        results.router,
        joblogs.router,
        workers.router,
        bulk_router.router,
        events_router.router,
        metrics_router.router,
        flow_router.router,
        workflows_router.router,  # docs/workflows.md
        ui.router,  # the dashboard at /ui (docs/dashboard.md)
    ):
        add_routes(app, router)
    app.state.ui_overview = ui.Overview()
    app.state.metrics = metrics
    app.add_middleware(RequestCounter, metrics=metrics)
    install_error_handlers(app)
    declare_api_keys(app)
    return app


def add_routes(app: FastAPI, router: APIRouter) -> None:
    """The router's routes join the app's own list, as routes declared on the app do.
    ``include_router`` would add a layer that FastAPI 0.165 matches twice per request
    (each included router tries its routes once to select, once to handle): about a third
    of routing's cost, 7 to 22 µs a request on the hot routes (docs/benchmarks.md, issue
    14, eleventh pass). Our routers take no prefix, dependencies, lifespan or other
    options at inclusion, so the routes are the same; the OpenAPI drift test holds the
    contract to that."""
    app.router.routes.extend(router.routes)


NO_FASTAPI_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def drain_on_stop_signal(signals: Signals) -> Iterator[None]:
    """While serving under ``celeriac serve``: a SIGTERM or SIGINT first ends this
    process's long-polls (``Signals.drain``), then goes on to the handler it had (uvicorn's,
    which stops accepting and waits for requests in flight). Without it a long-poll waits
    out the server's graceful-shutdown timeout and is cut off with a 500. Only in the main
    thread, where the server's handlers are; elsewhere (an in-process test client) as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {int(sig): signal.getsignal(sig) for sig in STOP_SIGNALS}

    def stopping(sig: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(signals.drain)  # a handler may interrupt the loop itself
        handler = previous[sig]
        if callable(handler):
            handler(sig, frame)
        elif handler == signal.SIG_DFL:  # nobody handled it: the default (exit)
            signal.signal(sig, signal.SIG_DFL)
            signal.raise_signal(sig)

    for sig in STOP_SIGNALS:
        signal.signal(sig, stopping)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def freeze_start_up_objects() -> None:
    """Under ``celeriac serve`` (the main thread): what start-up built (the imported
    modules, the app with its routes and schemas, SQLAlchemy's metadata: about 190,000
    objects) lives as long as the process, and every full pass of the cyclic garbage
    collector walked all of it: 60 to 90 ms on this project's machine, a pause that every
    request in flight felt. Frozen, a full pass walks only what came since (a few ms;
    docs/benchmarks.md, issue 14, sixth pass). Not for an in-process test client, which
    builds many apps in one process: frozen, their reference cycles would never be freed."""
    if threading.current_thread() is not threading.main_thread():
        return
    gc.collect()  # garbage from start-up is freed, not frozen
    gc.freeze()


async def _bounded(step: Awaitable[object], what: str) -> None:
    """One shutdown step, given ``SHUTDOWN_STEP_SECONDS``: a broker that does not answer
    its close, or a database call that cannot be cancelled, must not keep a stopping
    service (and its pidfile, and its port) alive; nothing is lost by leaving it, as
    leases simply expire."""
    # Not wait_for: on a timeout it waits for the cancellation, which a thread cannot honour.
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=SHUTDOWN_STEP_SECONDS)
    if not done:
        task.cancel()
        log.warning("shutdown: %s still busy after %ss; leaving it", what, SHUTDOWN_STEP_SECONDS)
    elif not task.cancelled() and (exc := task.exception()) is not None:
        log.error("shutdown: closing %s failed: %r", what, exc)


def problem_response(error: errors.ProblemError) -> JSONResponse:
    return JSONResponse(
        error.to_problem(),
        status_code=error.status,
        media_type=errors.PROBLEM_JSON,
        headers=error.headers,  # Retry-After on a 503 (service/outage.py)
    )


def install_error_handlers(app: FastAPI) -> None:
    async def on_problem(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, errors.ProblemError)
        return problem_response(exc)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        media_type = request.headers.get("content-type", "application/json")
        body_errors = any(e.get("loc", ())[:1] == ("body",) for e in exc.errors())
        if body_errors and "json" not in media_type.lower():
            return problem_response(
                errors.UnsupportedMediaType(f"send the body as application/json, not {media_type}")
            )
        details = [_describe(e) for e in exc.errors()]
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            return problem_response(errors.InvalidJson("the body is not valid JSON"))
        summary = "; ".join(f"{d['location']}: {d['message']}" for d in details[:5])
        return problem_response(errors.ValidationFailed(summary, errors=details))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        by_status: dict[int, type[errors.ProblemError]] = {
            404: errors.NotFound,
            405: errors.MethodNotAllowed,
        }
        problem_type = by_status.get(exc.status_code, errors.ProblemError)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # RFC 9110: Allow lists every method of the resource
            headers["Allow"] = allowed_methods(request, headers.get("Allow", ""))
        error = problem_type(str(exc.detail), headers=headers or None)
        error.status = exc.status_code
        return problem_response(error)

    app.add_exception_handler(errors.ProblemError, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)


def _describe(error: Any) -> dict[str, Any]:
    location = ".".join(str(part) for part in error.get("loc", ()))
    return {"location": location, "message": error.get("msg", ""), "type": error.get("type")}
