"""The amqp broker against the redis broker, end to end over HTTP, in one run; and a
direct AMQP worker's drain rate.

    .venv/bin/python bench/amqp_e2e.py --jobs 2000 --concurrency 32

Per broker: a fresh database, a `celeriac serve`, and a Python worker (`celeriac worker`,
HTTP leases) running `math.add`. "e2e" submits the jobs in batches of 100 while the
worker runs and times from the first submit to the last job finished; "drain" submits
them first, then starts the worker and times from its first finished job to its last.
For the amqp broker, "direct" drains with the direct AMQP worker
(examples/amqp_worker/worker.py: batched claims and reports over HTTP). Brokers alternate
for ``--rounds`` rounds; prints one JSON line per scenario and round, then the medians and
the amqp/redis ratios of the medians. RabbitMQ gets a vhost of its own when rabbitmqctl
can be run (as root), else a unique queue prefix in the URL's vhost."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TASKS = """
from celeriac import Celeriac

app = Celeriac("bench")

@app.task(name="math.add")
def add(x, y):
    return x + y
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def fresh_database(url: str) -> Iterator[str]:
    import sqlalchemy as sa

    from service.migrate import upgrade

    name = f"celeriac_amqp_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    target = sa.make_url(url).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(target)
        yield target
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE {name} WITH (FORCE)")
        admin.dispose()


@contextlib.contextmanager
def amqp_url(base: str) -> Iterator[str]:
    """A vhost of our own (deleted afterwards) when rabbitmqctl works, else ``base``."""
    if shutil.which("rabbitmqctl") is None or os.geteuid() != 0:
        yield base
        return
    vhost = f"celeriac_bench_{uuid.uuid4().hex[:8]}"
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], check=True)
    try:
        subprocess.run(
            ["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
            check=True,
        )
        yield base.rsplit("/", 1)[0] + "/" + quote(vhost, safe="")
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], check=False)


@contextlib.contextmanager
def process(
    command: list[str], env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def service(env: dict[str, str], workdir: Path) -> Iterator[str]:
    port = free_port()
    command = [sys.executable, "-m", "celeriac", "serve", "--no-migrate",
               "--port", str(port), "--log-level", "warning"]  # fmt: skip
    with process(command, env, workdir / f"service-{port}.log"):
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the service did not start: {workdir}")
            time.sleep(0.2)
        yield url


def submit(client: httpx.Client, queue: str, count: int) -> None:
    for start in range(0, count, 100):
        size = min(100, count - start)
        jobs = [{"task": "math.add", "args": [1, 2], "queue": queue}] * size
        client.post("/jobs/batch", json={"jobs": jobs}).raise_for_status()


def succeeded(client: httpx.Client, queue: str) -> int:
    for entry in client.get("/queues").json()["queues"]:
        if entry["name"] == queue:
            return int(entry["counts"].get("succeeded", 0))
    return 0


def wait_done(client: httpx.Client, queue: str, count: int, limit: float = 600) -> float:
    """Seconds from now to ``count`` succeeded; also the moment the first one was seen."""
    started = time.monotonic()
    while succeeded(client, queue) < count:
        if time.monotonic() - started > limit:
            raise RuntimeError(f"{queue}: not done within {limit}s")
        time.sleep(0.05)
    return time.monotonic()


def first_done(client: httpx.Client, queue: str) -> float:
    while succeeded(client, queue) == 0:
        time.sleep(0.01)
    return time.monotonic()


def run_broker(
    broker: str, broker_url: str, args: argparse.Namespace, workdir: Path
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    prefix = f"bench{uuid.uuid4().hex[:6]}"
    with fresh_database(args.database) as database:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), str(workdir)]),
            "CELERIAC_DATABASE_URL": database,
            "CELERIAC_BROKER_URL": broker_url,
            "CELERIAC_REDIS_PREFIX": prefix,
            "CELERIAC_AMQP_PREFIX": prefix,
        }
        with service(env, workdir) as url, httpx.Client(base_url=url, timeout=60) as client:
            worker = [sys.executable, "-m", "celeriac", "worker", "--app", "bench_tasks:app",
                      "--server", url, "-c", str(args.concurrency), "-l", "warning",
                      "--poll-wait", "5", "-Q"]  # fmt: skip
            # e2e: the worker is up and idle; submit while it works.
            queue = f"e2e_{broker}"
            with process([*worker, queue], env, workdir / f"worker-e2e-{broker}.log"):
                time.sleep(3)  # let it start and long-poll
                started = time.monotonic()
                submit(client, queue, args.jobs)
                seconds = wait_done(client, queue, args.jobs) - started
            rows.append(row(broker, "e2e: submit while a Python HTTP worker runs", args, seconds))
            # drain: the jobs wait; then the worker starts.
            queue = f"drain_{broker}"
            submit(client, queue, args.jobs)
            with process([*worker, queue], env, workdir / f"worker-drain-{broker}.log"):
                first = first_done(client, queue)
                seconds = wait_done(client, queue, args.jobs) - first
            rows.append(row(broker, "drain: Python HTTP worker", args, seconds))
            if broker == "amqp":
                rows.append(direct_drain(client, env, url, args, workdir))
    return rows


def direct_drain(client: httpx.Client, env: dict[str, str], url: str, args: argparse.Namespace,
                 workdir: Path) -> dict[str, Any]:  # fmt: skip
    queue = "direct_amqp"
    submit(client, queue, args.jobs)
    direct_env = {
        **env,
        "CELERIAC_SERVER_URL": url,
        "CELERIAC_AMQP_URL": env["CELERIAC_BROKER_URL"],
        "CELERIAC_QUEUES": queue,
        "CELERIAC_CONCURRENCY": str(args.concurrency),
        "CELERIAC_LOG_LEVEL": "WARNING",
    }
    command = [sys.executable, str(REPO / "examples" / "amqp_worker" / "worker.py")]
    with process(command, direct_env, workdir / "worker-direct.log"):
        first = first_done(client, queue)
        seconds = wait_done(client, queue, args.jobs) - first
    return row("amqp", "drain: direct AMQP worker (Python example)", args, seconds)


def row(broker: str, scenario: str, args: argparse.Namespace, seconds: float) -> dict[str, Any]:
    return {
        "broker": broker,
        "scenario": scenario,
        "jobs": args.jobs,
        "concurrency": args.concurrency,
        "seconds": round(seconds, 3),
        "jobs_per_second": round(args.jobs / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="alternating; medians reported")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="celeriac-amqp-bench-") as tmp:
        workdir = Path(tmp)
        (workdir / "bench_tasks.py").write_text(TASKS)
        # Alternate the brokers, so load from elsewhere on the machine hits both alike.
        for _ in range(args.rounds):
            rows += run_broker("redis", args.redis, args, workdir)
            with amqp_url(args.amqp) as url:
                rows += run_broker("amqp", url, args, workdir)
    for item in rows:
        print(json.dumps(item))
    rates: dict[tuple[str, str], list[float]] = {}
    for item in rows:
        rates.setdefault((item["broker"], item["scenario"]), []).append(item["jobs_per_second"])
    median = {key: statistics.median(values) for key, values in rates.items()}
    for (broker, scenario), value in median.items():
        print(json.dumps({"median jobs/s": value, "broker": broker, "scenario": scenario}))
    for scenario in ("e2e: submit while a Python HTTP worker runs", "drain: Python HTTP worker"):
        ratio = median[("amqp", scenario)] / median[("redis", scenario)]
        print(json.dumps({"ratio amqp/redis (medians)": round(ratio, 2), "scenario": scenario}))


if __name__ == "__main__":
    main()
