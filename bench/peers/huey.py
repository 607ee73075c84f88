"""Huey: ``RedisHuey`` on db BENCH_REDIS_DB, results stored (its default) in the same
Redis, ``notify_result=True`` so a blocking ``get`` waits on BLPOP rather than polling.
The consumer is ``huey_consumer peers.huey.huey -k process -w N``.
"""

from __future__ import annotations

from harness import QUEUE_DB, REDIS_HOST, REDIS_PORT, record_execution
from huey import RedisHuey

from peers.base import System, bin_path

huey = RedisHuey("bench", host=REDIS_HOST, port=REDIS_PORT, db=QUEUE_DB, notify_result=True)


@huey.task(name="bench.noop")
def noop(i: int) -> int:
    return i


@huey.task(name="bench.record")
def record(i: int) -> int:
    record_execution(i)
    return i


class HueySystem(System):
    fanout_launches = 1  # one command, 4 worker processes
    name = "huey"

    def worker_command(self, mode: str, index: int) -> list[str]:
        workers = "4" if mode == "fanout" else "2"
        return [bin_path("huey_consumer"), "peers.huey.huey", "-k", "process", "-w", workers, "-q"]

    def enqueue(self, n: int, task: str) -> None:
        target = noop if task == "noop" else record
        for i in range(n):
            target(i)

    def submit_one(self, i: int) -> None:
        noop(i)

    def round_trip(self, i: int) -> None:
        noop(i).get(blocking=True, timeout=10)

    def done_count(self) -> int:
        return int(huey.storage.conn.hlen(huey.storage.result_key))


SYSTEM = HueySystem
