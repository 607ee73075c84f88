"""RQ: a queue on db BENCH_REDIS_DB; ``SimpleWorker`` (no fork per job: RQ's own notes call
it the fast choice for very short jobs), ``--burst`` for drain and fan-out (leave when the
queue is empty), a waiting one for latency. Results are stored by RQ by default; a job is
done once it is in the queue's finished registry.
"""

from __future__ import annotations

from typing import Any

from harness import QUEUE_DB, REDIS_HOST, REDIS_PORT, record_execution, redis_url
from redis import Redis
from rq import Queue

from peers.base import Metrics, System, bin_path, chunks, timed_loop

QUEUE = "bench"


def noop(i: int) -> int:
    return i


def record(i: int) -> int:
    record_execution(i)
    return i


class RqSystem(System):
    name = "rq"

    def setup(self) -> None:
        super().setup()
        self.connection = Redis(host=REDIS_HOST, port=REDIS_PORT, db=QUEUE_DB)
        self.queue = Queue(QUEUE, connection=self.connection)

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            self.connection.close()

    def worker_command(self, mode: str, index: int) -> list[str]:
        burst = [] if mode == "latency" else ["--burst"]
        return [
            bin_path("rq"),
            "worker",
            "-w",
            "rq.worker.SimpleWorker",
            "--url",
            redis_url(QUEUE_DB),
            "-q",
            *burst,
            "-n",
            f"bench-{mode}-{index}",
            QUEUE,
        ]

    def enqueue(self, n: int, task: str) -> None:
        target = noop if task == "noop" else record
        for part in chunks(n, 1000):
            self.queue.enqueue_many([Queue.prepare_data(target, (i,)) for i in part])

    def submit_one(self, i: int) -> None:
        self.queue.enqueue(noop, i)

    def submit_timed(self, n: int) -> Metrics:  # "enqueue_many() of 1000"
        parts = chunks(n, 1000)
        metrics = timed_loop(len(parts), lambda k: self._enqueue_many(parts[k]))
        return {
            "jobs": n,
            "elapsed_s": metrics["elapsed_s"],
            "jobs_per_s": n / metrics["elapsed_s"],
        }

    def _enqueue_many(self, part: Any) -> None:
        self.queue.enqueue_many([Queue.prepare_data(noop, (i,)) for i in part])

    def round_trip(self, i: int) -> None:
        job = self.queue.enqueue(noop, i)
        if job.latest_result(timeout=10) is None:
            raise TimeoutError(f"rq job {job.id}: no result after 10 s")

    def done_count(self) -> int:
        return int(self.connection.zcard(self.queue.finished_job_registry.key))


SYSTEM = RqSystem
