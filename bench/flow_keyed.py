"""Flow control's cost and fairness in ``make bench`` (issue 15, docs/flow-control.md).

Three scenarios of celeriac alone, run by bench/run.py like the others (a fresh service
and database per sample, rounds, medians); each drains no-op jobs with 4 HTTP workers x 8
threads (``celeriac worker -c 8``), timed from the workers' start until every result is
stored:

- ``keyed``: N jobs spread over K keys (``limits: ["bk-<i % K>"]``), once with no limit
  defined and once with ``PUT /limits/bk-* {"max_running": 2}`` (every key limited: the
  flow-control claim). Issue 15 asks for >= 0.7x the unlimited drain;
- ``plain``: N jobs naming no limits, once with no flow control configured at all (the
  plain claim, as before issue 15) and once with the ``bk-*`` limit defined but unused by
  these jobs (flow control configured elsewhere): "a queue without limits is no slower
  than before" reads as >= 0.95x;
- ``fairness``: A jobs of key ``fa-a`` queued before B of ``fa-b`` (pattern ``fa-*`` with
  ``max_running: 4``): how many of A's finished before B's last did. The issue asks for
  B's last before A's 2,000th of 10,000 (a fifth of A).

Each variant names its database: "PostgreSQL" (with Redis as the dispatch index, as the
other drain figures) or "SQLite default" (no configuration: a SQLite file and the SQL
broker); ``run.py --flow-databases`` picks them (PostgreSQL by default).

Run as a script it is a shortcut for run.py with only these scenarios, one round by default
(works in .venv too: celeriac only, no chart without matplotlib):

    .venv/bin/python bench/flow_keyed.py --jobs 4000 --keys 200 --fair-a 2000 --fair-b 100
    .venv/bin/python bench/flow_keyed.py --databases postgresql,sqlite --rounds 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # celeriac_side imports this module: no import cycle at run time
    from celeriac_side import CeleriacSystem

SCENARIOS = ("keyed", "plain", "fairness")
# the service's database (and broker) as named by --flow-databases; the label starts the
# variant's name, which celeriac_side.service_shape reads
DATABASES = {
    "postgresql": "PostgreSQL",  # with Redis as the dispatch index
    "postgresql-sql": "PostgreSQL SQL broker",  # LISTEN/NOTIFY, no Redis
    "sqlite": "SQLite default",
}
KEY_PATTERN, KEY_LIMIT = "bk-*", 2
FAIR_PATTERN, FAIR_LIMIT = "fa-*", 4
FLOW_WORKERS = 4  # worker processes, each ``celeriac worker -c 8``
# A flow drain that stalls this long, or averages fewer jobs/s, fails its sample early
# rather than holding `make bench` until the sample's timeout (a claim that never admits).
STALL_S, SLOWEST_PER_S = 60.0, 50.0
FAIR_SLOWEST_PER_S = 10.0  # fairness: 8 slots in all (max_running 4 per key), so slower
# environment of every sample process (run.py sets them from its flags)
KEYS_ENV, FAIR_B_ENV = "BENCH_FLOW_KEYS", "BENCH_FAIR_B"
# variant suffixes, per scenario: (the baseline, the configuration compared with it)
UNLIMITED, LIMITED = "keyed, no limits", f"keyed, {KEY_PATTERN} max_running {KEY_LIMIT}"
NO_FLOW, FLOW_ELSEWHERE = "no flow control", f"{KEY_PATTERN} limit on other keys"
FAIR = f"{FAIR_PATTERN} max_running {FAIR_LIMIT}"


def variant(database: str, what: str) -> str:
    """A variant's name: its database first (celeriac_side.service_shape reads it)."""
    return f"{DATABASES[database]}, {what}"


def variants() -> dict[str, list[str]]:
    """celeriac's variants of the flow scenarios, unlimited before limited in a round."""
    return {
        "keyed": [variant(db, what) for db in DATABASES for what in (UNLIMITED, LIMITED)],
        "plain": [variant(db, what) for db in DATABASES for what in (NO_FLOW, FLOW_ELSEWHERE)],
        "fairness": [variant(db, FAIR) for db in DATABASES],
    }


def database_of(name: str) -> str:
    return next(db for db, label in DATABASES.items() if name.startswith(label + ","))


# -- the scenarios (in a sample's process, on celeriac's System) ------------------------


def keyed(system: CeleriacSystem, n: int) -> dict[str, Any]:
    keys = int(os.environ.get(KEYS_ENV, 200))
    if system.variant.endswith(LIMITED):
        system.client.set_limit(KEY_PATTERN, max_running=KEY_LIMIT)
    queue(system, [{"limits": [f"bk-{i % keys}"]} for i in range(n)])
    return {**drain(system, n), "keys": keys}


def plain(system: CeleriacSystem, n: int) -> dict[str, Any]:
    if system.variant.endswith(FLOW_ELSEWHERE):
        system.client.set_limit(KEY_PATTERN, max_running=KEY_LIMIT)  # no job here names it
    queue(system, [{} for _ in range(n)])
    return drain(system, n)


def fairness(system: CeleriacSystem, n: int) -> dict[str, Any]:
    """``n`` jobs of key A queued, then B's; both keys limited by the same pattern. The
    workers run until B's last job finished, or until a fifth of A's did first (the
    target is missed then; the count is a lower bound): with 8 slots in all the drain is
    slow, and what follows B's last job says nothing about fairness."""
    b = int(os.environ.get(FAIR_B_ENV, 100))
    system.client.set_limit(FAIR_PATTERN, max_running=FAIR_LIMIT)
    queue(system, [{"limits": ["fa-a"]} for _ in range(n)])
    queue(system, [{"limits": ["fa-b"]} for _ in range(b)], offset=n)
    system.start_worker("drain", FLOW_WORKERS)
    started = time.perf_counter()
    a_done, b_done = wait_for_b(system, b, a_enough=n // 5)
    elapsed = time.perf_counter() - started
    before = a_done
    if b_done == b:  # finished_at is the service's clock at settle: one clock for all
        before = system.count_rows(
            f"{SUCCEEDED_A} AND finished_at < "
            f"(SELECT max(finished_at) FROM jobs WHERE {SUCCEEDED_B})"
        )
    return {"a": n, "b": b, "a_finished_before_b_last": before, "b_finished": b_done,
            "elapsed_s": elapsed, "jobs": a_done + b_done,
            "jobs_per_s": (a_done + b_done) / elapsed}  # fmt: skip


SUCCEEDED_A = "status = 'succeeded' AND limit_key = 'fa-a'"
SUCCEEDED_B = "status = 'succeeded' AND limit_key = 'fa-b'"


def wait_for_b(system: CeleriacSystem, b: int, a_enough: int) -> tuple[int, int]:
    """Poll until all ``b`` of B's jobs or ``a_enough`` of A's succeeded: (A's, B's)."""
    limit = max(120.0, (a_enough + b) / FAIR_SLOWEST_PER_S)
    deadline = time.perf_counter() + limit
    while time.perf_counter() < deadline:
        # A first: B not done after A's count means at least a_done of A before B's last
        a_done = system.count_rows(SUCCEEDED_A)
        b_done = system.count_rows(SUCCEEDED_B)
        if b_done >= b or a_done >= a_enough:
            return a_done, b_done
        time.sleep(0.02)
    raise RuntimeError(f"fairness: after {limit:.0f}s {a_done} of A and {b_done}/{b} of B done")


def drain(system: CeleriacSystem, n: int) -> dict[str, Any]:
    return system.drain_with_workers(n, FLOW_WORKERS, SLOWEST_PER_S, STALL_S)


def queue(system: CeleriacSystem, options: list[dict[str, Any]], offset: int = 0) -> None:
    """Untimed: one ``noop(i)`` per item of ``options`` (its extra submit fields),
    ``POST /jobs/batch`` of 1,000."""
    from celeriac.client import job_spec

    for start in range(0, len(options), 1000):
        part = options[start : start + 1000]
        system.client.submit_batch(
            [job_spec("bench.noop", [offset + start + i], **extra) for i, extra in enumerate(part)]
        )


# -- the shortcut ----------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--keys", type=int, default=200)
    parser.add_argument("--fair-a", type=int, default=10_000)
    parser.add_argument("--fair-b", type=int, default=100)
    parser.add_argument("--databases", default="postgresql", help="of postgresql,sqlite")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", default="/tmp/celeriac-flow-bench.json")
    args = parser.parse_args()
    sys.argv = [
        "run.py", "--systems", "celeriac", "--scenarios", args.scenarios,
        "--rounds", str(args.rounds), "--flow-jobs", str(args.jobs),
        "--flow-keys", str(args.keys), "--fair-a", str(args.fair_a),
        "--fair-b", str(args.fair_b), "--flow-databases", args.databases, "--out", args.out,
    ]  # fmt: skip
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import run

    return run.main()


if __name__ == "__main__":
    sys.exit(main())
