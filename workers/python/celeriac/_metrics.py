"""The worker's own Prometheus metrics (``celeriac worker --metrics-port``): what this
process leased and ran, served as the Prometheus text format (version 0.0.4) by a small
HTTP server thread. Written here rather than with prometheus_client, which the SDK does
not depend on; the format is a few lines of text (docs/operations.md, Metrics)."""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

logger = logging.getLogger("celeriac.worker")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
           120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)  # fmt: skip
MAX_TASKS = 1000  # label values per metric: task names come from jobs, not from us
OTHER = "_other"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return repr(float(value)) if value != int(value) else f"{int(value)}.0"


class _Histogram:
    __slots__ = ("buckets", "count", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * len(BUCKETS)  # per bucket, not cumulative (made so when shown)
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        index = bisect.bisect_left(BUCKETS, seconds)
        if index < len(BUCKETS):
            self.buckets[index] += 1
        self.count += 1
        self.sum += seconds


class WorkerMetrics:
    """Counters the worker's threads update (under one lock: a few per job) and the
    text a scrape reads. ``gauges`` are read at scrape time (busy slots, prefetched)."""

    def __init__(self, worker: str, gauges: Mapping[str, tuple[str, Callable[[], float]]]) -> None:
        self.worker = worker
        self.gauges = gauges
        self._lock = threading.Lock()
        self._finished: dict[tuple[str, str], int] = {}  # (task, outcome) -> jobs
        self._run: dict[str, _Histogram] = {}
        self._started: dict[str, float] = {}  # job id -> monotonic start
        self.leased = 0
        self.lease_errors = 0

    def jobs_leased(self, count: int) -> None:
        with self._lock:
            self.leased += count

    def lease_failed(self) -> None:
        with self._lock:
            self.lease_errors += 1

    def job_started(self, job_id: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._started[job_id] = now

    def job_finished(self, job_id: str, task: str, outcome: str) -> None:
        """``outcome``: succeeded, failed or released."""
        now = time.monotonic()
        with self._lock:
            started = self._started.pop(job_id, None)
            key = (task if (task, outcome) in self._finished or len(self._finished) < MAX_TASKS
                   else OTHER, outcome)  # fmt: skip
            self._finished[key] = self._finished.get(key, 0) + 1
            if started is not None and outcome != "released":
                name = task if task in self._run or len(self._run) < MAX_TASKS else OTHER
                self._run.setdefault(name, _Histogram()).observe(now - started)

    def exposition(self) -> str:
        """The metrics in the Prometheus text format."""
        worker = _escape(self.worker)
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")

        with self._lock:
            finished = sorted(self._finished.items())
            runs = {task: (list(h.buckets), h.count, h.sum) for task, h in self._run.items()}
            leased, lease_errors = self.leased, self.lease_errors
        family("celeriac_worker_jobs", "counter", "Jobs this worker ran, by task and outcome.")
        for (task, outcome), count in finished:
            lines.append(f'celeriac_worker_jobs_total{{worker="{worker}",task="{_escape(task)}",'
                         f'outcome="{outcome}"}} {_number(count)}')  # fmt: skip
        family("celeriac_worker_job_run_seconds", "histogram",
               "Seconds each job ran in this worker (from its start in the pool).")  # fmt: skip
        for task in sorted(runs):
            buckets, count, total = runs[task]
            labels = f'worker="{worker}",task="{_escape(task)}"'
            cumulative = 0
            for bound, in_bucket in zip(BUCKETS, buckets, strict=True):
                cumulative += in_bucket
                lines.append(f'celeriac_worker_job_run_seconds_bucket{{{labels},le="{bound}"}} '
                             f"{_number(cumulative)}")  # fmt: skip
            lines.append(f'celeriac_worker_job_run_seconds_bucket{{{labels},le="+Inf"}} '
                         f"{_number(count)}")  # fmt: skip
            lines.append(f"celeriac_worker_job_run_seconds_count{{{labels}}} {_number(count)}")
            lines.append(f"celeriac_worker_job_run_seconds_sum{{{labels}}} {_number(total)}")
        family("celeriac_worker_leased_jobs", "counter", "Jobs this worker leased.")
        lines.append(f'celeriac_worker_leased_jobs_total{{worker="{worker}"}} {_number(leased)}')
        family("celeriac_worker_lease_errors", "counter", "Lease requests that failed.")
        lines.append(
            f'celeriac_worker_lease_errors_total{{worker="{worker}"}} {_number(lease_errors)}'
        )
        for name, (help_text, read) in sorted(self.gauges.items()):
            family(name, "gauge", help_text)
            lines.append(f'{name}{{worker="{worker}"}} {_number(read())}')
        return "\n".join(lines) + "\n"


class MetricsServer:
    """``GET /metrics`` on ``host:port`` (port 0: any free one, see ``port``), in a
    daemon thread."""

    def __init__(self, metrics: WorkerMetrics, host: str, port: int) -> None:
        render = metrics.exposition

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "only /metrics here")
                    return
                body = render().encode("utf-8")
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # a scrape every few seconds is not news

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.address = (str(self._server.server_address[0]), int(self._server.server_address[1]))
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="celeriac-metrics", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
