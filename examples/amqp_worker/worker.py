"""A direct AMQP worker: jobs arrive from RabbitMQ, leases and results go over HTTP.

    CELERIAC_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2F \\
    CELERIAC_SERVER_URL=http://127.0.0.1:8000 python worker.py

The service must run with ``CELERIAC_BROKER_URL=amqp://…`` (docs/protocol.md, "AMQP
protocol"). A message is only a wake-up carrying a job id: the worker claims the job with
``POST /leases/claim`` (SQL grants the lease and its fencing token), heartbeats and
reports over HTTP like any worker, and acks the message once the report was answered, so
RabbitMQ's prefetch is the worker's concurrency. A claim that grants nothing (the job is
leased elsewhere, finished, or a duplicate) is acked and dropped: SQL publishes the job
again if it has to run again. Claims, reports and heartbeats are batched: one call for
whatever piled up while the previous one was in flight.

Environment: CELERIAC_SERVER_URL, CELERIAC_API_KEY (a key with the ``work`` scope, if the
service has keys), CELERIAC_AMQP_URL, CELERIAC_AMQP_PREFIX (``celeriac``),
CELERIAC_AMQP_QUORUM (``true`` if the service declares quorum queues), CELERIAC_QUEUES
(comma-separated, default ``default``), CELERIAC_CONCURRENCY (default 4),
CELERIAC_LEASE_SECONDS (default 30), CELERIAC_WORKER_NAME.

Needs aio-pika and httpx (both installed with the service).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aio_pika
import httpx
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

log = logging.getLogger("amqp-worker")

Task = Callable[..., Any]
T = TypeVar("T")


# --- the tasks this worker runs (a real worker imports its own) -------------------------


async def shout(text: str) -> str:
    await asyncio.sleep(0.05)
    return text.upper() + "!"


async def sleep(seconds: float = 1.0) -> str:
    await asyncio.sleep(seconds)
    return f"slept {seconds}s"


async def crash_drill(label: str, *, attempt: int) -> str:
    """Hangs on its first attempt, for rehearsing a worker killed mid-job (the lease
    expires, SQL requeues the job, and it runs again on its second attempt)."""
    if attempt == 1:
        await asyncio.Event().wait()  # forever: until the process is killed
    return f"{label}: done on attempt {attempt}"


TASKS: dict[str, Task] = {
    "math.add": lambda x, y: x + y,
    "text.shout": shout,
    "demo.sleep": sleep,
    "demo.crash_drill": crash_drill,
}
WANTS_ATTEMPT = {"demo.crash_drill"}


# --- the worker -------------------------------------------------------------------------


async def connect(url: str, attempts: int = 8) -> AbstractRobustConnection:
    """A robust connection (it reconnects by itself once made). A first connect that
    fails (RabbitMQ restarting, not up yet) is tried again with backoff, about 30 s in all,
    instead of ending the worker."""
    for attempt in range(1, attempts + 1):
        try:
            return await aio_pika.connect_robust(url)
        except (OSError, aio_pika.exceptions.AMQPConnectionError) as exc:
            if attempt == attempts:
                raise
            delay = min(0.25 * 2**attempt, 8.0)
            log.warning("cannot reach RabbitMQ (%s); trying again in %.1f s", exc, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


class Worker:
    """Three loops share the work, each batching what piled up while its last call was
    in flight: claims, reports, and one heartbeat call for every job in hand."""

    def __init__(self, env: dict[str, str]) -> None:
        self.amqp_url = env.get("CELERIAC_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
        self.prefix = env.get("CELERIAC_AMQP_PREFIX", "celeriac")
        self.quorum = env.get("CELERIAC_AMQP_QUORUM", "").lower() in ("1", "true", "yes")
        self.queues = [q.strip() for q in env.get("CELERIAC_QUEUES", "default").split(",")]
        self.concurrency = int(env.get("CELERIAC_CONCURRENCY", "4"))
        self.lease_seconds = float(env.get("CELERIAC_LEASE_SECONDS", "30"))
        self.name = env.get("CELERIAC_WORKER_NAME") or f"amqp-{os.getpid()}@{socket.gethostname()}"
        headers = {"authorization": f"Bearer {key}"} if (key := env.get("CELERIAC_API_KEY")) else {}
        self.http = httpx.AsyncClient(
            base_url=env.get("CELERIAC_SERVER_URL", "http://127.0.0.1:8000"),
            headers=headers,
            timeout=30.0,
        )
        self.inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self.outbox: asyncio.Queue[tuple[dict[str, Any], AbstractIncomingMessage]] = asyncio.Queue()
        self.held: dict[str, dict[str, str]] = {}  # job id -> {id, token}: to heartbeat
        self.running: set[asyncio.Task[None]] = set()
        self.in_hand = 0  # messages not yet acked
        self.all_settled = asyncio.Event()
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        connection = await connect(self.amqp_url)
        async with connection:
            channel = await connection.channel()
            # Unacked messages are the jobs in hand: prefetch is the concurrency.
            await channel.set_qos(prefetch_count=self.concurrency)
            # The same arguments as the service declares, or RabbitMQ refuses the declare.
            arguments = {"x-queue-type": "quorum"} if self.quorum else {"x-max-priority": 10}
            consumers = []
            for name in self.queues:
                queue = await channel.declare_queue(
                    f"{self.prefix}.{name}", durable=True, arguments=arguments
                )
                consumers.append((queue, await queue.consume(self.on_message)))
            loops = [asyncio.create_task(loop()) for loop in (self.claimer, self.reporter,
                                                             self.heartbeater)]  # fmt: skip
            log.info("%s consuming %s", self.name, ", ".join(self.queues))
            await self.stopping.wait()
            for queue, tag in consumers:  # warm shutdown: no new deliveries...
                await queue.cancel(tag)
            if self.in_hand:  # ...finish, report and ack what is in hand
                self.all_settled.clear()
                await self.all_settled.wait()
            for task in loops:
                task.cancel()
        await self.http.aclose()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        self.in_hand += 1
        self.inbox.put_nowait(message)

    async def settle(self, message: AbstractIncomingMessage, *, requeue: bool = False) -> None:
        # A message of a connection that died is back in its queue already.
        with contextlib.suppress(aio_pika.exceptions.AMQPError, RuntimeError):
            await (message.nack(requeue=True) if requeue else message.ack())
        self.in_hand -= 1
        if not self.in_hand:
            self.all_settled.set()

    # --- claims -------------------------------------------------------------------------

    async def claimer(self) -> None:
        while True:
            await self.claim(await take_all(self.inbox))

    async def claim(self, messages: list[AbstractIncomingMessage]) -> None:
        ids = [message.body.decode() for message in messages]
        try:
            answer = await self.call("/leases/claim", worker=self.name, ids=ids,
                                     lease_seconds=self.lease_seconds)  # fmt: skip
        except httpx.HTTPError as exc:
            # The service is unreachable: give the messages back, a little later.
            log.warning("claim failed (%s); requeueing %d messages", exc, len(messages))
            await asyncio.sleep(1.0)
            for message in messages:
                await self.settle(message, requeue=True)
            return
        granted = {job["id"]: job for job in answer["jobs"]}
        for job_id, message in zip(ids, messages, strict=True):
            job = granted.pop(job_id, None)  # pop: a duplicate in the batch gets nothing
            if job is None:
                await self.settle(message)  # leased elsewhere, finished, or a duplicate
                continue
            self.held[job_id] = {"id": job_id, "token": job["lease"]["token"]}
            task = asyncio.create_task(self.run_job(job, message))
            self.running.add(task)
            task.add_done_callback(self.running.discard)

    async def run_job(self, job: dict[str, Any], message: AbstractIncomingMessage) -> None:
        report = await execute(job)
        report.update(id=job["id"], token=job["lease"]["token"])
        self.outbox.put_nowait((report, message))

    # --- reports and heartbeats ----------------------------------------------------------

    async def reporter(self) -> None:
        while True:
            batch = await take_all(self.outbox)
            await self.report([report for report, _ in batch])
            for report, message in batch:
                self.held.pop(report["id"], None)
                await self.settle(message)  # ack only once the report was answered

    async def report(self, reports: list[dict[str, Any]]) -> None:
        for delay in (0.5, 1, 2, 4, 8, 16):  # the leases outlive a short outage
            try:
                await self.call("/leases/report", reports=reports)
                return
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code < 500:
                    log.error("reports refused: %s", exc.response.text[:500])
                    return
                log.warning("reports failed (%s); retrying", exc)
            except httpx.HTTPError as exc:
                log.warning("reports failed (%s); retrying", exc)
            await asyncio.sleep(delay)

    async def heartbeater(self) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            refs = list(self.held.values())[:1000]
            if not refs:
                continue
            with contextlib.suppress(httpx.HTTPError):  # the leases have slack: next tick
                body = await self.call("/leases/heartbeat", leases=refs,
                                       lease_seconds=self.lease_seconds)  # fmt: skip
                for answer in body["leases"]:
                    if not answer["ok"]:  # its report will be refused: nothing to do
                        self.held.pop(answer["id"], None)
                        log.warning("lost the lease of %s", answer["id"])

    async def call(self, path: str, **body: Any) -> dict[str, Any]:
        response = await self.http.post(path, json=body)
        response.raise_for_status()
        answer: dict[str, Any] = response.json()
        return answer


async def take_all(queue: asyncio.Queue[T], limit: int = 1000) -> list[T]:
    """The next item, and whatever else is waiting (up to ``limit``)."""
    items = [await queue.get()]
    while len(items) < limit and not queue.empty():
        items.append(queue.get_nowait())
    return items


async def execute(job: dict[str, Any]) -> dict[str, Any]:
    """Run the job's task; the report to send (without id and token)."""
    task = TASKS.get(job["task"])
    if task is None:
        error = {"type": "UnknownTask", "message": f"no task named {job['task']!r}"}
        return {"outcome": "failed", "error": error, "retry": False}
    kwargs = dict(job["kwargs"])
    if job["task"] in WANTS_ATTEMPT:
        kwargs["attempt"] = job["attempt"]
    started = time.monotonic()
    try:
        result = task(*job["args"], **kwargs)
        if isinstance(result, Awaitable):
            result = await result
    except Exception as exc:
        error = {"type": type(exc).__name__, "message": str(exc),
                 "traceback": traceback.format_exc()}  # fmt: skip
        return {"outcome": "failed", "error": error}
    log.info("%s %s in %.3fs", job["task"], job["id"], time.monotonic() - started)
    return {"outcome": "succeeded", "result": result}


async def main() -> None:
    logging.basicConfig(level=os.environ.get("CELERIAC_LOG_LEVEL", "INFO").upper())
    worker = Worker(dict(os.environ))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stopping.set)  # warm: finish what is running
    await worker.run()


if __name__ == "__main__":
    asyncio.run(main())
