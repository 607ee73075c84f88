"""How long a ``celeriac worker`` takes from its exec to its first stored result (issue 14).

A drain's headline rate counts from the worker's start, so its start-up weighs on every
drain figure in ``make bench``, and on every ``multi restart`` a user makes. Against a
running ``celeriac serve`` (``--base``), each sample queues one no-op job on a queue of
its own, starts ``celeriac worker`` on that queue (HTTP, or the Redis protocol with
``--broker``), and times exec -> the job's ``finished_at`` (the service stamps it when
the report is settled) -> the worker's exit after SIGTERM.

    .venv/bin/python bench/worker_startup.py --base http://127.0.0.1:18970 --n 5 \\
        [--broker redis://127.0.0.1:6379/0 --redis-prefix celeriac]

Compare before and after interleaved (``--python`` of another checkout's venv, or
``PYTHONPATH``): start-up is CPU and disk cache, and both vary on a shared machine."""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx

TASKS = """\
from celeriac import Celeriac

app = Celeriac("startup")


@app.task(name="startup.noop")
def noop(i: int) -> int:
    return i
"""


def sample(args: argparse.Namespace, client: httpx.Client, workdir: Path) -> dict[str, float]:
    queue = f"startup-{uuid.uuid4().hex[:8]}"
    job = client.post("/jobs", json={"task": "startup.noop", "args": [1], "queue": queue})
    job.raise_for_status()
    command = [
        args.python, "-m", "celeriac", "worker", "-A", "startup_tasks:app", "--server",
        args.base, "-Q", queue, "-c", "8", "--loglevel", "warning",
    ]  # fmt: skip
    if args.broker:
        command += ["--broker", args.broker, "--redis-prefix", args.redis_prefix]
    started = time.time()
    proc = subprocess.Popen(command, cwd=workdir, env=os.environ.copy())
    try:
        done = client.get(f"/jobs/{job.json()['id']}", params={"wait": 30}).json()
        if done["status"] != "succeeded":
            raise RuntimeError(f"the job did not succeed: {done}")
        finished = datetime.fromisoformat(done["finished_at"].replace("Z", "+00:00"))
        stop = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        return {
            "first_result_s": finished.timestamp() - started,
            "exit_after_sigterm_s": time.time() - stop,
        }
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--broker", default="")
    parser.add_argument("--redis-prefix", default="celeriac")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory() as tmp,
        httpx.Client(base_url=args.base, timeout=60) as client,
    ):
        workdir = Path(tmp)
        (workdir / "startup_tasks.py").write_text(TASKS)
        samples = [sample(args, client, workdir) for _ in range(args.n)]
    for key in samples[0]:
        values = sorted(s[key] for s in samples)
        print(
            f"{key:>22} median {statistics.median(values) * 1000:7.0f} ms"
            f"  (min {values[0] * 1000:.0f}, max {values[-1] * 1000:.0f}; {len(values)} samples)"
        )


if __name__ == "__main__":
    main()
