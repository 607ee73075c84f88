"""Dramatiq: Redis broker (db BENCH_REDIS_DB) or RabbitMQ (its recommended broker), with the
Results middleware on Redis (the next db) and ``store_results=True``, so a drain ends when
results are stored, as for the others. Workers: ``dramatiq peers.dramatiq`` with its
defaults (processes = CPUs, 8 threads each) or the processes/threads the variant names.
"""

from __future__ import annotations

import os
from typing import Any

import dramatiq
from dramatiq.results import Results
from dramatiq.results.backends.redis import RedisBackend
from harness import QUEUE_DB, RABBITMQ_URL, RESULT_DB, record_execution, redis_url

from peers.base import System, bin_path

BROKER = os.environ.get("BENCH_DRAMATIQ_BROKER", "redis")
QUEUE = "bench"

broker: Any
if BROKER == "rabbitmq":
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    broker = RabbitmqBroker(url=RABBITMQ_URL)
else:
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=redis_url(QUEUE_DB))
backend = RedisBackend(url=redis_url(RESULT_DB))
broker.add_middleware(Results(backend=backend))
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name="bench.noop", queue_name=QUEUE, store_results=True)
def noop(i: int) -> int:
    return i


@dramatiq.actor(actor_name="bench.record", queue_name=QUEUE, store_results=True)
def record(i: int) -> int:
    record_execution(i)
    return i


POOLS = {  # variant -> (broker, worker options)
    "redis, 2 proc x 8 threads (default)": ("redis", ["--processes", "2", "--threads", "8"]),
    "redis, 1 proc x 8 threads": ("redis", ["--processes", "1", "--threads", "8"]),
    "rabbitmq, 2 proc x 8 threads": ("rabbitmq", ["--processes", "2", "--threads", "8"]),
    "redis, 4 proc x 8 threads": ("redis", ["--processes", "4", "--threads", "8"]),
}


class DramatiqSystem(System):
    fanout_launches = 1  # one command, 4 worker processes
    name = "dramatiq"

    def setup(self) -> None:
        super().setup()
        self.env["BENCH_DRAMATIQ_BROKER"] = BROKER
        broker.flush_all()  # RabbitMQ: purge the bench queues (Redis: flushed already)

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            broker.close()

    def worker_command(self, mode: str, index: int) -> list[str]:
        _, options = POOLS[self.variant]
        return [
            bin_path("dramatiq"),
            "peers.dramatiq",
            *options,
            "--queues",
            QUEUE,
            "--worker-shutdown-timeout",
            "5000",
        ]

    def enqueue(self, n: int, task: str) -> None:
        target = noop if task == "noop" else record
        for i in range(n):
            target.send(i)

    def submit_one(self, i: int) -> None:
        noop.send(i)

    def round_trip(self, i: int) -> None:
        noop.send(i).get_result(block=True, timeout=10_000)

    def done_count(self) -> int:
        return int(backend.client.dbsize())


SYSTEM = DramatiqSystem
