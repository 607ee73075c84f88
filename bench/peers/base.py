"""What every system in the side-by-side bench provides, and the scenarios written once
over it.

A system (celeriac, Celery, Dramatiq, Huey, RQ) implements a few hooks — how to queue jobs
fast, how to start a worker of a given kind, how many results are stored, one submit-and-
wait round trip — and the base class runs the scenarios the same way for all of them:

- ``sequential(n)``: one thread submits ``n`` jobs one call at a time (``submit_one``),
  after ``WARMUP_SUBMITS`` untimed calls (connections open);
- ``submit(n)``: the system's own bulk submit path (``submit_timed``);
- ``drain(n)``: ``n`` no-op jobs queued first (untimed), then one worker started; time from
  its start until ``done_count()`` (results *stored*) reaches ``n``;
- ``latency(n)``: an idle worker ready, ``n`` sequential round trips;
- ``fanout(n)``: ``n`` recording jobs, ``FANOUT_WORKERS`` worker processes, then every
  execution counted per job argument (duplicates must be 0).

Every sample runs in its own process (``run.py --sample``), so a system's module-level
configuration is read once from the environment set by its variant.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, ClassVar

from harness import (
    BENCH_DIR,
    EXEC_KEY,
    QUEUE_DB,
    REDIS_HOST,
    REDIS_PORT,
    Sampler,
    cpu_seconds,
    flush_redis,
    memory_now,
    pct,
    spawn,
    stop,
    tree,
)

Metrics = dict[str, Any]
FANOUT_WORKERS = 4
MB = 1024 * 1024
# A drain slower than this many jobs/s counts as hung (the whole sample also has a timeout).
SLOWEST_DRAIN_PER_S = 5.0
WARMUP_ROUND_TRIPS = 5
WARMUP_SUBMITS = 20


class HarnessGcPauses:
    """Around a timed loop of round trips: this process's own garbage-collector passes,
    counted (full ones) and the longest timed, and kept with the sample.

    The harness is the client whose clock times every system's round trips: a pause of
    its own would land in that system's figures. This shows whether one did (the
    round-trip table's last column; docs/benchmarks.md, issue 14, fifteenth pass)."""

    def __init__(self) -> None:
        self.full_passes = 0
        self.longest = 0.0
        self._started = 0.0

    def __enter__(self) -> HarnessGcPauses:
        gc.callbacks.append(self._observe)
        return self

    def __exit__(self, *exc_info: object) -> None:
        gc.callbacks.remove(self._observe)

    def _observe(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        self.longest = max(self.longest, time.perf_counter() - self._started)
        self.full_passes += info["generation"] == 2


class BenchFailure(RuntimeError):
    """A sample that did not complete (a timeout, a lost job): recorded, not fatal."""


def bin_path(name: str) -> str:
    """A console script of the interpreter running the bench (the bench venv's)."""
    return os.path.join(os.path.dirname(sys.executable), name)


class System:
    """One system under test in one configuration (``variant``)."""

    name: ClassVar[str]
    # fan-out: how many worker commands to start; a system whose one command runs several
    # processes (Dramatiq --processes 4, Huey -w 4) starts one
    fanout_launches: ClassVar[int] = FANOUT_WORKERS
    stop_signals: ClassVar[int] = 1

    def __init__(self, variant: str) -> None:
        self.variant = variant
        self.workers: list[subprocess.Popen[bytes]] = []
        # the bench's modules first, then whatever the run put on the path (run.py --commit
        # puts a snapshot of celeriac's source there)
        path = [str(BENCH_DIR), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        self.env: dict[str, str] = {"PYTHONPATH": os.pathsep.join(path)}
        import redis

        self.redis = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=QUEUE_DB)

    # -- lifecycle (override and call super) -------------------------------------------

    def setup(self) -> None:
        """Fresh state: empty bench Redis databases (subclasses add a fresh database, a
        purged RabbitMQ queue, a service)."""
        flush_redis()

    def teardown(self) -> None:
        self.stop_worker()
        self.redis.close()
        flush_redis()  # leave the bench's Redis databases empty

    def start_worker(self, mode: str, count: int = 1) -> list[subprocess.Popen[bytes]]:
        started = []
        for index in range(count):
            cmd = self.worker_command(mode, index)
            proc = spawn(cmd, f"{self.name}-{mode}-{index}-{os.getpid()}", self.env)
            started.append(proc)
        self.workers.extend(started)
        return started

    def stop_worker(self) -> None:
        for proc in self.workers:
            stop(proc, signals=self.stop_signals)
        self.workers.clear()

    # -- hooks -------------------------------------------------------------------------

    def worker_command(self, mode: str, index: int) -> list[str]:
        """The command line of worker ``index`` for ``mode`` ("drain", "latency",
        "fanout"); the variant says which pool/broker."""
        raise NotImplementedError

    def enqueue(self, n: int, task: str) -> None:
        """Queue ``n`` jobs of ``task`` ("noop" or "record", argument 0…n-1) the fastest
        way the system offers; untimed."""
        raise NotImplementedError

    def submit_one(self, i: int) -> None:
        """Submit ``noop(i)`` the way an application does one call at a time (Celery's
        ``delay()``, Dramatiq's ``send()``, …)."""
        raise NotImplementedError

    def submit_timed(self, n: int) -> Metrics:
        raise NotImplementedError

    def round_trip(self, i: int) -> None:
        """Submit ``noop(i)`` and wait for its result (at most 10 s)."""
        raise NotImplementedError

    def done_count(self) -> int:
        """How many results are stored now."""
        raise NotImplementedError

    def service_pids(self) -> list[int]:
        return []

    def durability(self) -> Metrics:
        """Settings that say how durable the system's commits are (celeriac: the
        database's), added to every sample's metrics; most peers keep nothing durable."""
        return {}

    # -- scenarios ---------------------------------------------------------------------

    def sequential(self, n: int) -> Metrics:
        for i in range(WARMUP_SUBMITS):
            self.submit_one(n + i)  # arguments past n: the timed calls keep 0…n-1
        return timed_loop(n, self.submit_one)

    def submit(self, n: int) -> Metrics:
        return self.submit_timed(n)

    def drain(self, n: int) -> Metrics:
        self.enqueue(n, "noop")
        return self._run_workers(n, "drain", 1)

    def fanout(self, n: int) -> Metrics:
        self.redis.delete(EXEC_KEY)
        self.enqueue(n, "record")
        metrics = self._run_workers(n, "fanout", self.fanout_launches)
        self.stop_worker()
        runs = Counter(int(x) for x in self.redis.lrange(EXEC_KEY, 0, -1))
        metrics["executions"] = sum(runs.values())
        metrics["duplicates"] = sum(c - 1 for c in runs.values() if c > 1)
        metrics["missing"] = n - len(runs)
        return metrics

    def latency(self, n: int) -> Metrics:
        workers = self.start_worker("latency")
        self._first_round_trip(0)  # the worker is up and connections are open
        for i in range(1, WARMUP_ROUND_TRIPS):
            self.round_trip(i)
        time.sleep(1.0)
        rest_rss, rest_pss = memory_now([p.pid for p in workers])
        startup_cpu = sum(cpu_seconds(pid) for p in workers for pid in tree(p.pid))
        service_rss, service_pss = memory_now(self.service_pids())
        samples = []
        with HarnessGcPauses() as pauses:
            for i in range(n):
                started = time.perf_counter()
                self.round_trip(i)
                samples.append(time.perf_counter() - started)
        return {
            "round_trips": n,
            "harness_gc_full_passes": pauses.full_passes,
            "harness_gc_max_ms": pauses.longest * 1000,
            "p50_ms": pct(samples, 0.5) * 1000,
            "p90_ms": pct(samples, 0.9) * 1000,
            "p99_ms": pct(samples, 0.99) * 1000,
            "max_ms": max(samples) * 1000,
            "worker_rss_rest_mb": rest_rss / MB,
            "worker_startup_cpu_s": startup_cpu,
            "worker_pss_rest_mb": rest_pss / MB,
            "service_rss_rest_mb": service_rss / MB if self.service_pids() else None,
            "service_pss_rest_mb": service_pss / MB if self.service_pids() else None,
        }

    def _first_round_trip(self, i: int) -> None:
        # The worker may still be starting: retry the first round trip for up to 60 s.
        deadline = time.monotonic() + 60
        while True:
            try:
                self.round_trip(i)
                return
            except Exception:
                if time.monotonic() > deadline or not self._workers_alive():
                    raise
                time.sleep(0.2)

    def _workers_alive(self) -> bool:
        return all(p.poll() is None for p in self.workers)

    def _run_workers(
        self,
        n: int,
        mode: str,
        count: int,
        slowest_per_s: float = SLOWEST_DRAIN_PER_S,
        stall_s: float | None = None,
    ) -> Metrics:
        """Start ``count`` workers and time them until ``n`` results are stored; a drain
        slower than ``slowest_per_s`` on average, or (with ``stall_s``) with no new
        result for that long, fails the sample early."""
        sampler = Sampler()
        sampler.track("service", self.service_pids())
        sampler.start()
        cpu_start = sampler.cpu("service")
        started = time.perf_counter()
        workers = self.start_worker(mode, count)
        sampler.track("worker", [p.pid for p in workers])
        first_at: float | None = None
        first_done = 0
        cpu_first = {"worker": 0.0, "service": 0.0}
        limit = max(60.0, n / slowest_per_s)
        deadline = started + limit
        done = 0
        exited_at: float | None = None
        progress = (started, 0)  # when the count last changed, and to what
        stalled = False
        try:
            while time.perf_counter() < deadline:
                done = self.done_count()
                now = time.perf_counter()
                if done != progress[1]:
                    progress = (now, done)
                stalled = stall_s is not None and now - progress[0] > stall_s
                if stalled:
                    break
                if done and first_at is None:
                    sampler.sample()
                    first_at, first_done = now, done
                    cpu_first = {g: sampler.cpu(g) for g in cpu_first}
                if done >= n:
                    break
                if exited_at is None and all(p.poll() is not None for p in workers):
                    exited_at = now  # RQ's burst workers leave when the queue is empty
                if exited_at is not None and now - exited_at > 3.0:
                    break
                time.sleep(0.02)
            finished = time.perf_counter()
            sampler.sample()
        finally:
            sampler.close()
        if done < n:
            why = "its workers exited" if exited_at else f"timed out after {limit:.0f}s"
            why = f"no new result for {stall_s:.0f}s" if stalled else why
            raise BenchFailure(f"{why} with {done}/{n} results stored")
        elapsed = finished - started
        assert first_at is not None
        steady = n - first_done
        # CPU per 10,000 jobs two ways: over the whole drain (the worker's start-up included;
        # celeriac's service counted from the worker's start), and from the first stored
        # result on (steady state; meaningless when results land in one batch at the end,
        # as with celeriac's Redis protocol, whose reports reach SQL asynchronously).
        whole = {"worker": sampler.cpu("worker"), "service": sampler.cpu("service") - cpu_start}
        after = {g: sampler.cpu(g) - cpu_first[g] for g in cpu_first}
        metrics: Metrics = {
            "jobs": n,
            "worker_commands": count,
            "elapsed_s": elapsed,
            "jobs_per_s": n / elapsed,
            "first_result_s": first_at - started,
            "steady_jobs_per_s": steady / (finished - first_at) if finished > first_at else None,
            "worker_cpu_s_per_10k": whole["worker"] * 10_000 / n,
            "worker_cpu_steady_s_per_10k": after["worker"] * 10_000 / steady if steady else None,
            "worker_rss_peak_mb": sampler.groups["worker"].peak_rss / MB,
            "worker_pss_peak_mb": sampler.groups["worker"].peak_pss / MB,
        }
        if self.service_pids():
            metrics["service_cpu_s_per_10k"] = whole["service"] * 10_000 / n
            metrics["service_cpu_steady_s_per_10k"] = (
                after["service"] * 10_000 / steady if steady else None
            )
            metrics["service_rss_peak_mb"] = sampler.groups["service"].peak_rss / MB
            metrics["service_pss_peak_mb"] = sampler.groups["service"].peak_pss / MB
        return metrics


def timed_loop(n: int, call: Any, *, per_call: bool = True) -> Metrics:
    """Run ``call(i)`` for i in 0…n-1 in this thread; jobs/s and per-call percentiles."""
    latencies: list[float] = []
    started = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        call(i)
        if per_call:
            latencies.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - started
    metrics: Metrics = {"jobs": n, "elapsed_s": elapsed, "jobs_per_s": n / elapsed}
    if latencies:
        metrics["p50_ms"] = pct(latencies, 0.5) * 1000
        metrics["p99_ms"] = pct(latencies, 0.99) * 1000
    return metrics


def chunks(n: int, size: int) -> Sequence[range]:
    return [range(start, min(n, start + size)) for start in range(0, n, size)]
