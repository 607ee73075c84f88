"""celeriac side by side with Celery, Dramatiq, Huey and RQ, in one run on this machine.

    make bench                                   # creates .bench-venv, then runs this
    .bench-venv/bin/python bench/run.py --scenarios drain --systems celeriac,celery
    .bench-venv/bin/python bench/run.py --report bench/results/latest.json   # table + chart again
    .bench-venv/bin/python bench/run.py --systems celeriac,celery --scenarios sequential,latency \
        --rounds 1 --sequential-calls 500 --latency-rounds 50 --out /tmp/bench-trial.json

Every scenario runs for every system and variant in turn, several rounds (A B A B…, the
order reversed every other round), each sample in a fresh process with fresh state (the
bench's Redis databases flushed, a new PostgreSQL database, purged RabbitMQ queues) and a
timeout: a sample that hangs is killed with its process group and recorded as failed.
Then it prints medians with min-max, celeriac's ratio to each peer (of the medians, with
the per-round range), a compact latency table and the targets of issues 15, 14 and 8 (met or
missed), and writes bench/results/latest.json (machine, versions, every sample),
latest.md and docs/benchmarks.png; with another --out, the .md and .png go beside it.

Counts come from flags or the environment: BENCH_ROUNDS (3), BENCH_JOBS (5000: submit and
drain), BENCH_FANOUT_JOBS (3000), BENCH_LATENCY_ROUNDS (300), BENCH_SEQUENTIAL_CALLS (2000);
flow control (issue 15, celeriac alone: bench/flow_keyed.py): BENCH_FLOW_JOBS (20000 per
keyed and plain sample), BENCH_FLOW_KEYS (200), BENCH_FAIR_A (10000), BENCH_FAIR_B (100),
BENCH_FLOW_DATABASES (postgresql; of postgresql, postgresql-sql, sqlite). With them the whole
default run stays near 15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (
    BENCH_DIR,
    POSTGRES_URL,
    QUEUE_DB,
    RABBITMQ_URL,
    REDIS_HOST,
    REDIS_PORT,
    REPO,
    RESULT_DB,
)

MARK = "BENCH-SAMPLE "
PACKAGES = (
    "celeriac",
    "fastapi",
    "uvicorn",
    "sqlalchemy",
    "psycopg",
    "httpx",
    "redis",
    "hiredis",
    "celery",
    "kombu",
    "dramatiq",
    "pika",
    "huey",
    "rq",
    "matplotlib",
)
PEERS_NEEDED = ("celery", "dramatiq", "huey", "rq")


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def parse_args() -> argparse.Namespace:
    from peers import SCENARIOS, VARIANTS

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, of {','.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--systems", default=",".join(VARIANTS), help=f"comma-separated, of {','.join(VARIANTS)}"
    )
    parser.add_argument(
        "--variants",
        default="",
        help="only variants whose name contains one of these (comma-separated)",
    )
    parser.add_argument("--rounds", type=int, default=env_int("BENCH_ROUNDS", 3))
    parser.add_argument(
        "--jobs",
        type=int,
        default=env_int("BENCH_JOBS", 5_000),
        help="jobs per submit and drain sample",
    )
    parser.add_argument("--fanout-jobs", type=int, default=env_int("BENCH_FANOUT_JOBS", 3_000))
    parser.add_argument(
        "--sequential-calls",
        type=int,
        default=env_int("BENCH_SEQUENTIAL_CALLS", 2_000),
        help="one-thread submits per sequential sample",
    )
    parser.add_argument("--latency-rounds", type=int, default=env_int("BENCH_LATENCY_ROUNDS", 300))
    flow = parser.add_argument_group("flow control (issue 15): keyed, plain, fairness")
    flow.add_argument("--flow-jobs", type=int, default=env_int("BENCH_FLOW_JOBS", 20_000),
                      help="jobs per keyed and plain sample")  # fmt: skip
    flow.add_argument("--flow-keys", type=int, default=env_int("BENCH_FLOW_KEYS", 200))
    flow.add_argument("--fair-a", type=int, default=env_int("BENCH_FAIR_A", 10_000),
                      help="fairness: jobs of key A, queued first")  # fmt: skip
    flow.add_argument("--fair-b", type=int, default=env_int("BENCH_FAIR_B", 100),
                      help="fairness: jobs of key B, queued after A's")  # fmt: skip
    flow.add_argument(
        "--flow-databases",
        default=os.environ.get("BENCH_FLOW_DATABASES", "postgresql"),
        help="comma-separated, of postgresql (with the Redis dispatch index), postgresql-sql "
        "(the SQL broker), sqlite (the SQLite default)",
    )
    parser.add_argument(
        "--sample-timeout",
        type=float,
        default=float(os.environ.get("BENCH_SAMPLE_TIMEOUT", 900)),
        help="seconds before a sample is killed and recorded as failed",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the rounds, py-spy the celeriac service during one more drain and "
        "submit: bench/results/profile-service-*.txt (or --profile-dir)",
    )
    parser.add_argument(
        "--commit",
        metavar="REF",
        help="measure celeriac as committed at REF (a snapshot on PYTHONPATH), not the "
        "working tree: other work in progress in the tree cannot change the figures mid-run",
    )
    parser.add_argument("--profile-dir", type=Path, default=BENCH_DIR / "results")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "latest.json")
    parser.add_argument(
        "--chart",
        type=Path,
        help="default: docs/benchmarks.png with the default --out, else --out's name as .png",
    )
    parser.add_argument(
        "--report",
        type=Path,
        metavar="JSON",
        help="only print the table and draw the chart of an earlier run",
    )
    parser.add_argument(
        "--sample", nargs=4, metavar=("SCENARIO", "SYSTEM", "VARIANT", "N"), help=argparse.SUPPRESS
    )  # one sample, in this process (internal)
    return parser.parse_args()


# -- one sample (runs in its own process) ----------------------------------------------


def run_sample(scenario: str, system: str, variant: str, n: int) -> None:
    from peers import load

    target = load(system, variant)
    target.setup()
    try:
        metrics = getattr(target, scenario)(n)
        try:
            metrics.update(target.durability())
        except Exception as exc:  # the sample stands; the targets table says "not measured"
            metrics["durability_error"] = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        target.teardown()
    print(MARK + json.dumps(metrics), flush=True)


def sample_in_subprocess(
    scenario: str, system: str, variant: str, n: int, timeout: float, env: dict[str, str]
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--sample",
        scenario,
        system,
        variant,
        str(n),
    ]
    started = time.monotonic()
    # A session of its own: on timeout the whole process group (service, workers) goes.
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, **env},
        cwd=BENCH_DIR,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return {
            "ok": False,
            "error": f"killed after {timeout:.0f}s timeout",
            "seconds": time.monotonic() - started,
        }
    finally:
        # anything of the sample's still alive (a worker it failed to stop)
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    for line in reversed(out.splitlines()):
        if line.startswith(MARK):
            metrics = json.loads(line[len(MARK) :])
            return {"ok": True, "metrics": metrics, "seconds": time.monotonic() - started}
    tail = [line for line in err.strip().splitlines() if line.strip()][-1:] or ["no output"]
    return {
        "ok": False,
        "error": f"exit {proc.returncode}: {tail[0][:300]}",
        "seconds": time.monotonic() - started,
    }


# -- the run ---------------------------------------------------------------------------


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def servers() -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        import redis

        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
        out["redis"] = str(client.info("server")["redis_version"])
        client.close()
    except Exception as exc:
        out["redis"] = f"unreachable: {exc}"
    try:
        import psycopg

        with psycopg.connect(POSTGRES_URL.replace("+psycopg", "")) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            out["postgresql"] = str(row[0]) if row else "?"
    except Exception as exc:
        out["postgresql"] = f"unreachable: {exc}"
    try:
        import pika

        conn = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
        version = conn._impl.server_properties.get("version", "?")
        out["rabbitmq"] = version.decode() if isinstance(version, bytes) else str(version)
        conn.close()
    except Exception as exc:
        out["rabbitmq"] = f"unreachable: {type(exc).__name__}"
    return out


def source(ref: str | None) -> dict[str, str]:
    """Which celeriac is measured: the working tree, or a snapshot of commit ``ref`` put
    first on PYTHONPATH for every sample process (and so for their services and workers)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip

    if not ref:
        dirty = bool(git("status", "--porcelain", "--", "service", "workers/python"))
        return {"code": "working tree", "commit": git("rev-parse", "HEAD"), "dirty": str(dirty)}
    commit = git("rev-parse", ref)
    target = Path(f"/tmp/celeriac-bench-src-{commit[:12]}")
    if not target.exists():
        target.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", commit], cwd=REPO, capture_output=True,
                                 check=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    path = [str(target), str(target / "workers" / "python")]
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [*path, *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    return {"code": f"snapshot of {ref}", "commit": commit, "path": str(target)}


def machine() -> dict[str, Any]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
    }


def plan(args: argparse.Namespace, rabbitmq_up: bool) -> list[tuple[str, str, str]]:
    from peers import VARIANTS

    scenarios = [s for s in args.scenarios.split(",") if s]
    systems = [s for s in args.systems.split(",") if s]
    wanted = [v for v in args.variants.split(",") if v]
    contestants = []
    for scenario in scenarios:
        for system in systems:
            for variant in VARIANTS[system].get(scenario, []):
                if wanted and not any(w in variant for w in wanted):
                    continue
                if not flow_database_wanted(args, scenario, variant):
                    continue
                if "rabbitmq" in variant and not rabbitmq_up:
                    print(f"skipping {system} {variant}: RabbitMQ is not reachable")
                    continue
                contestants.append((scenario, system, variant))
    return contestants


def flow_database_wanted(args: argparse.Namespace, scenario: str, variant: str) -> bool:
    """A flow-control variant runs only on the databases of --flow-databases."""
    import flow_keyed

    if scenario not in flow_keyed.SCENARIOS:
        return True
    return flow_keyed.database_of(variant) in args.flow_databases.split(",")


def count_for(args: argparse.Namespace, scenario: str) -> int:
    counts: dict[str, int] = {
        "sequential": args.sequential_calls,
        "submit": args.jobs,
        "drain": args.jobs,
        "fanout": args.fanout_jobs,
        "latency": args.latency_rounds,
        "keyed": args.flow_jobs,
        "plain": args.flow_jobs,
        "fairness": args.fair_a,
    }
    return counts[scenario]


def sample_env(args: argparse.Namespace) -> dict[str, str]:
    """What a sample reads beyond its one count N (the flow scenarios' other sizes)."""
    from flow_keyed import FAIR_B_ENV, KEYS_ENV

    return {KEYS_ENV: str(args.flow_keys), FAIR_B_ENV: str(args.fair_b)}


@contextmanager
def exclusive_redis_dbs() -> Iterator[None]:
    """One run at a time per pair of bench Redis databases: every sample FLUSHDBs them, so
    two runs on the same pair would wipe each other's queues mid-sample. A second run
    waits for the first (or picks other databases with BENCH_REDIS_DB)."""
    import fcntl

    path = Path(f"/tmp/celeriac-bench-redis-{REDIS_HOST}-{REDIS_PORT}-{QUEUE_DB}.lock")
    with path.open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            print(
                f"another bench run ({holder}) is using Redis db {QUEUE_DB} and {RESULT_DB}: "
                "waiting for it to finish (or set BENCH_REDIS_DB to another pair)",
                flush=True,
            )
            fcntl.flock(lock, fcntl.LOCK_EX)
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}, started {datetime.now(UTC):%H:%M:%S} UTC")
        lock.flush()
        yield


def orchestrate(args: argparse.Namespace) -> int:
    with exclusive_redis_dbs():
        return run_all(args)


def run_all(args: argparse.Namespace) -> int:
    systems = args.systems.split(",")
    # the peers selected must be installed; celeriac alone needs none (without matplotlib,
    # no chart is drawn)
    missing = [name for name in PEERS_NEEDED if name in systems and not _importable(name)]
    if missing:
        print(
            f"missing {', '.join(missing)}: run `make bench` (it installs the peers into "
            ".bench-venv) or use .bench-venv/bin/python",
            file=sys.stderr,
        )
        return 2
    info = {"machine": machine(), "versions": versions(), "servers": servers()}
    info["celeriac_source"] = source(args.commit)
    rabbitmq_up = not info["servers"]["rabbitmq"].startswith("unreachable")
    contestants = plan(args, rabbitmq_up)
    config = {
        "rounds": args.rounds,
        "jobs": args.jobs,
        "fanout_jobs": args.fanout_jobs,
        "latency_rounds": args.latency_rounds,
        "sequential_calls": args.sequential_calls,
        "flow_jobs": args.flow_jobs,
        "flow_keys": args.flow_keys,
        "fair_a": args.fair_a,
        "fair_b": args.fair_b,
        "flow_databases": args.flow_databases,
        "redis_dbs": [QUEUE_DB, RESULT_DB],
        "sample_timeout_s": args.sample_timeout,
    }
    print(
        f"{info['machine']['cores']} cores ({info['machine']['cpu']}), Python "
        f"{info['machine']['python']}; "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
        + "; servers: "
        + ", ".join(f"{k} {v}" for k, v in info["servers"].items())
    )
    print(f"{len(contestants)} configurations x {args.rounds} rounds: {config}", flush=True)
    samples: list[dict[str, Any]] = []
    started = datetime.now(UTC)
    scenarios = list(dict.fromkeys(c[0] for c in contestants))
    for scenario in scenarios:
        group = [c for c in contestants if c[0] == scenario]
        n = count_for(args, scenario)
        for round_no in range(args.rounds):
            order = group if round_no % 2 == 0 else list(reversed(group))
            for _, system, variant in order:
                result = sample_in_subprocess(
                    scenario, system, variant, n, args.sample_timeout, sample_env(args)
                )
                sample = {
                    "scenario": scenario,
                    "system": system,
                    "variant": variant,
                    "round": round_no,
                    "n": n,
                    **result,
                }
                samples.append(sample)
                _print_progress(sample)
    profile = None
    if args.profile:
        profile = run_profile(args)
    info["machine"]["loadavg_end"] = os.getloadavg()
    run = {
        "date": started.isoformat(timespec="seconds"),
        "duration_s": round((datetime.now(UTC) - started).total_seconds(), 1),
        **info,
        "config": config,
        "profile": profile,
        "samples": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(run, indent=1) + "\n")
    print(f"wrote {args.out}")
    return report(run, args)


def _print_progress(sample: dict[str, Any]) -> None:
    head = f"[{sample['scenario']} r{sample['round']}] {sample['system']}: {sample['variant']}"
    if not sample["ok"]:
        print(f"{head}: FAILED {sample['error']}", flush=True)
        return
    m = sample["metrics"]
    if "p50_ms" in m and "round_trips" in m:
        body = f"p50 {m['p50_ms']:.2f} ms, p99 {m['p99_ms']:.2f} ms"
    else:
        body = f"{m['jobs_per_s']:.0f} jobs/s"
        if "p50_ms" in m:
            body += f", per call p50 {m['p50_ms']:.2f} ms"
        if "duplicates" in m:
            body += f", duplicates {m['duplicates']}, missing {m['missing']}"
        if "a_finished_before_b_last" in m:
            body += f", {m['a_finished_before_b_last']} of A finished before B's last"
    print(f"{head}: {body} ({sample['seconds']:.1f}s)", flush=True)


PROFILED = {"drain": "http worker -c 8", "submit": "POST /jobs x16 clients"}


def run_profile(args: argparse.Namespace) -> dict[str, Any]:
    """One more celeriac sample (not counted) per profiled scenario that ran, with py-spy
    on the service: bench/results/profile-service-<scenario>.txt."""
    from report import summarize_profile

    out: dict[str, Any] = {}
    folder = args.profile_dir.resolve()  # samples run in bench/: no relative paths
    folder.mkdir(parents=True, exist_ok=True)
    for scenario, variant in PROFILED.items():
        if scenario not in args.scenarios.split(","):
            continue
        raw = folder / f"profile-service-{scenario}.raw"
        summary = folder / f"profile-service-{scenario}.txt"
        env = {"BENCH_PROFILE_RAW": str(raw)}
        n = count_for(args, scenario)
        result = sample_in_subprocess(scenario, "celeriac", variant, n, args.sample_timeout, env)
        if not raw.exists():
            print(f"profile {scenario}: no py-spy output ({result.get('error', '?')})")
            out[scenario] = {"ok": False, "error": result.get("error", "no py-spy output")}
            continue
        text = summarize_profile(raw.read_text(), result, f"{scenario} ({variant})")
        summary.write_text(text)
        raw.unlink()
        print(f"wrote {summary}")
        out[scenario] = {"ok": result["ok"], "file": str(summary), "sample": result}
    return out


def _importable(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def report(run: dict[str, Any], args: argparse.Namespace) -> int:
    from report import render

    chart: Path | None
    chart, text = outputs(args)
    if not _importable("matplotlib"):  # a celeriac-only run in .venv
        print("matplotlib is not installed: no chart", flush=True)
        chart = None
    markdown = render(run, chart)
    print(markdown)
    text.write_text(markdown)
    print(f"wrote {chart or 'no chart'} and {text}")
    return 0 if all(s["ok"] for s in run["samples"]) else 1


def outputs(args: argparse.Namespace) -> tuple[Path, Path]:
    """Where the chart and the Markdown go: docs/benchmarks.png and latest.md for the
    default --out; beside a trial's --out otherwise (a trial never overwrites them)."""
    out = args.report if args.report else args.out
    if out.resolve() == (BENCH_DIR / "results" / "latest.json").resolve():
        return args.chart or REPO / "docs" / "benchmarks.png", out.with_suffix(".md")
    return args.chart or out.with_suffix(".png"), out.with_suffix(".md")


def main() -> int:
    args = parse_args()
    if args.sample:
        scenario, system, variant, n = args.sample
        try:
            run_sample(scenario, system, variant, int(n))
        except Exception:
            traceback.print_exc()
            return 1
        return 0
    if args.report:
        return report(json.loads(args.report.read_text()), args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
