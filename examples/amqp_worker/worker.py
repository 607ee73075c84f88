"""A direct AMQP worker: jobs arrive from RabbitMQ, leases and results go over HTTP.

    CELERIAC_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2F \\
    CELERIAC_SERVER_URL=http://127.0.0.1:8000 python worker.py

The service must run with ``CELERIAC_BROKER_URL=amqp://…`` (docs/protocol.md, "AMQP
protocol"). A message is only a wake-up carrying a job id: the worker claims the job with
``POST /leases/claim`` (SQL grants the lease and its fencing token), heartbeats and
reports over HTTP like any worker, and acks the message once the report was answered, so
RabbitMQ's prefetch is the worker's concurrency. A claim that grants nothing (the job is
leased elsewhere, finished, or a duplicate) is acked and dropped: SQL publishes the job
again if it has to run again.

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
from typing import Any

import aio_pika
import httpx
from aio_pika.abc import AbstractIncomingMessage

log = logging.getLogger("amqp-worker")

Task = Callable[..., Any]


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


class Worker:
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
        self.running: set[asyncio.Task[None]] = set()
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        connection = await aio_pika.connect_robust(self.amqp_url)  # reconnects by itself
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
            log.info("%s consuming %s", self.name, ", ".join(self.queues))
            await self.stopping.wait()
            for queue, tag in consumers:  # warm shutdown: no new deliveries...
                await queue.cancel(tag)
            if self.running:  # ...finish, report and ack what is in hand
                await asyncio.wait(self.running)
        await self.http.aclose()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.create_task(self.handle(message))
        self.running.add(task)
        task.add_done_callback(self.running.discard)

    async def handle(self, message: AbstractIncomingMessage) -> None:
        job_id = message.body.decode()
        try:
            jobs = await self.call("/leases/claim", worker=self.name, ids=[job_id],
                                   lease_seconds=self.lease_seconds)  # fmt: skip
        except httpx.HTTPError as exc:
            # The service is unreachable: give the message back, a little later.
            log.warning("claim of %s failed (%s); requeueing", job_id, exc)
            await asyncio.sleep(1.0)
            await message.nack(requeue=True)
            return
        for job in jobs["jobs"]:
            await self.run_job(job)
        await message.ack()  # after the report: or nothing to do (claimed elsewhere)

    async def run_job(self, job: dict[str, Any]) -> None:
        beat = asyncio.create_task(self.heartbeat(job))
        try:
            report = await execute(job)
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
        report.update(id=job["id"], token=job["lease"]["token"])
        for delay in (0.5, 1, 2, 4, 8):  # the lease outlives a short outage of the service
            try:
                await self.call("/leases/report", reports=[report])
                return
            except httpx.HTTPError as exc:
                log.warning("report of %s failed (%s); retrying", job["id"], exc)
                await asyncio.sleep(delay)

    async def heartbeat(self, job: dict[str, Any]) -> None:
        ref = {"id": job["id"], "token": job["lease"]["token"]}
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            with contextlib.suppress(httpx.HTTPError):
                body = await self.call("/leases/heartbeat", leases=[ref],
                                       lease_seconds=self.lease_seconds)  # fmt: skip
                if not body["leases"][0]["ok"]:
                    log.warning("lost the lease of %s", job["id"])
                    return

    async def call(self, path: str, **body: Any) -> dict[str, Any]:
        response = await self.http.post(path, json=body)
        response.raise_for_status()
        answer: dict[str, Any] = response.json()
        return answer


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
