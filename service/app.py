"""The app factory and its lifespan: the one place that creates the engine, the broker
and the background loops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import errors
from service.brokers.amqp import AmqpBroker, Layout
from service.brokers.base import Broker, BrokerHooks
from service.brokers.redis import RedisBroker
from service.brokers.sql import SqlBroker
from service.db import Database, create_engine
from service.maintenance import maintenance_loop
from service.results import ResultCleaner
from service.routers import jobs, leases, ops, results, schedules, webhooks, workers
from service.runtime import Runtime
from service.scheduler import start_scheduler
from service.settings import Settings
from service.signals import Signals
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
            fallback_seconds=settings.sql_poll_fallback_seconds,
        )
    return SqlBroker(db, signals, fallback_seconds=settings.sql_poll_fallback_seconds)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database(create_engine(settings.database_url))
        signals = Signals()
        broker = build_broker(settings, db, signals)
        runtime = Runtime(settings=settings, db=db, signals=signals, broker=broker)
        await broker.start(BrokerHooks(now=runtime.clock.now, apply=runtime.apply))
        app.state.runtime = runtime
        runtime.background.append(
            asyncio.create_task(maintenance_loop(runtime), name="celeriac-maintenance")
        )
        runtime.background.append(await start_scheduler(runtime))
        # Webhook deliveries and result expiry; both check their settings here,
        # so a malformed secret or result store fails start-up, not the first delivery.
        webhook_client = http_client(settings)
        runtime.background += [
            asyncio.create_task(Deliverer(runtime, webhook_client).run(), name="celeriac-webhooks"),
            asyncio.create_task(ResultCleaner(runtime).run(), name="celeriac-results"),
        ]
        log.info("celeriac ready: database=%s broker=%s", db.dialect, broker.name)
        try:
            yield
        finally:
            loops = runtime.background + runtime.spawned()
            for task in loops:
                task.cancel()
            await _bounded(asyncio.gather(*loops, return_exceptions=True), "background loops")
            await _bounded(webhook_client.aclose(), "the webhook client")
            await _bounded(broker.close(), "the broker")
            db.engine.dispose()

    app = FastAPI(
        title="celeriac",
        version=API_VERSION,
        summary="A job queue: submit over HTTP, work from any language, results in SQL.",
        lifespan=lifespan,
    )
    app.include_router(jobs.router)
    app.include_router(leases.router)
    app.include_router(ops.router)
    app.include_router(schedules.router)
    app.include_router(webhooks.router)
    app.include_router(results.router)
    app.include_router(workers.router)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=request_body_limit(settings))
    return app


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


def request_body_limit(settings: Settings) -> int:
    """The largest body any route accepts: a full batch of jobs at the per-job limit (up
    to CELERIAC_MAX_REQUEST_BYTES), and never less than one job or one result needs."""
    envelope_room = 64 * 1024
    batch = min(settings.max_payload_bytes * settings.max_batch_jobs, settings.max_request_bytes)
    single = max(settings.max_payload_bytes, settings.result_max_bytes) + envelope_room
    return max(batch, single)


def problem_response(error: errors.ProblemError) -> JSONResponse:
    return JSONResponse(
        error.to_problem(), status_code=error.status, media_type=errors.PROBLEM_JSON
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

    async def on_http(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        by_status: dict[int, type[errors.ProblemError]] = {
            404: errors.NotFound,
            405: errors.MethodNotAllowed,
        }
        problem_type = by_status.get(exc.status_code, errors.ProblemError)
        error = problem_type(str(exc.detail))
        error.status = exc.status_code
        return problem_response(error)

    app.add_exception_handler(errors.ProblemError, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)


def _describe(error: Any) -> dict[str, Any]:
    location = ".".join(str(part) for part in error.get("loc", ()))
    return {"location": location, "message": error.get("msg", ""), "type": error.get("type")}


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes before they are read whole. A declared
    length is checked up front; a chunked body is read up to the limit, then replayed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.limit:
                await self._refuse(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        body = await self._read_chunked(receive)
        if body is None:
            await self._refuse(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_chunked(self, receive: Receive) -> bytes | None:
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(parts)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return None
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = errors.PayloadTooLarge(f"the request body exceeds {self.limit} bytes")
        await problem_response(error)(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()  # disconnects and the like, after the body
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
