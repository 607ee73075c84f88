"""The side-by-side bench's report (bench/report.py) on a made-up run: the targets of
issue 14 say met or missed from the medians, ratios carry their per-round range, and the
durability line reads what each sample recorded. No processes: the report is pure."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

# Loaded from its file, not through sys.path: bench/ holds modules named core, worker, …
_SPEC = importlib.util.spec_from_file_location(
    "bench_report", Path(__file__).resolve().parents[1] / "bench" / "report.py"
)
assert _SPEC and _SPEC.loader
report = importlib.util.module_from_spec(_SPEC)
sys.modules["bench_report"] = report  # dataclasses look their module up
_SPEC.loader.exec_module(report)
# the flow scenarios' variant names (issue 15), which the report pairs up
_FLOW = importlib.util.spec_from_file_location(
    "bench_flow_keyed", Path(__file__).resolve().parents[1] / "bench" / "flow_keyed.py"
)
assert _FLOW and _FLOW.loader
flow = importlib.util.module_from_spec(_FLOW)
_FLOW.loader.exec_module(flow)


def sample(scenario: str, system: str, variant: str, rnd: int, **metrics: Any) -> dict[str, Any]:
    return {
        "scenario": scenario,
        "system": system,
        "variant": variant,
        "round": rnd,
        "n": 100,
        "ok": True,
        "seconds": 1.0,
        "metrics": metrics,
    }


def made_up_run(synchronous_commit: str = "on") -> dict[str, Any]:
    durable = {"pg_synchronous_commit": synchronous_commit, "pg_fsync": "on"}
    samples = []
    for rnd, (ours, celery) in enumerate([(1600.0, 2000.0), (1400.0, 3000.0), (1500.0, 2500.0)]):
        samples += [
            sample("sequential", "celeriac", "delay(), PostgreSQL", rnd, jobs_per_s=ours,
                   **durable),
            sample("sequential", "celery", "delay()", rnd, jobs_per_s=celery),
            sample("latency", "celeriac", "http worker -c 8", rnd, p50_ms=3.5 + rnd,
                   p99_ms=7.0, **durable),
            sample("latency", "celeriac", "SQLite default, http worker -c 8", rnd,
                   p50_ms=2.5, p99_ms=5.0, sqlite_synchronous="normal"),
            sample("latency", "celery", "prefork -c 2, redis results", rnd, p50_ms=2.0,
                   p99_ms=4.0),
        ]  # fmt: skip
    return {
        "date": "2026-12-05T00:00:00+00:00",
        "duration_s": 1.0,
        "machine": {"cores": 2, "cpu": "test", "memory_gb": 1, "python": "3.11",
                    "loadavg_start": [0.0, 0.0, 0.0]},
        "versions": {}, "servers": {}, "profile": None, "samples": samples,
        "config": {"rounds": 3, "jobs": 100, "fanout_jobs": 100, "latency_rounds": 100,
                   "sequential_calls": 100},
    }  # fmt: skip


def row(markdown: str, starts: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {starts}"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_issue_14_targets_say_met_or_missed_from_the_medians() -> None:
    text = report.render(made_up_run(), chart=None)
    assert row(text, "one thread `delay()`")[1:] == ["1,500/s (1,400-1,600)", "≥ 1,500/s", "met"]
    # ratio of the medians 1500/2500, in brackets the per-round ratios 0.47 … 0.80
    assert row(text, "… ÷ Celery `delay()`")[1:] == ["0.60x (0.47x-0.80x)", "≥ 0.55x", "met"]
    p50 = row(text, "round trip p50, idle HTTP worker")
    assert p50[1:] == ["4.50 ms (3.50-5.50)", "≤ 4.00 ms", "**missed** by 12%"]
    assert row(text, "round trip p50, SQLite default")[3] == "met"
    assert row(text, "`POST /jobs` from 16")[3] == "not measured"
    assert row(text, "nothing less durable")[1:] == ["on in 6 samples (fsync on)", "on", "met"]
    assert "### Latency" in text and "### Targets of issue 8" in text


def flow_run(
    limited: list[float], elsewhere: list[float], fair: list[int], sqlite: bool = False
) -> dict[str, Any]:
    """Three rounds of the flow scenarios (issue 15): 1,000 jobs/s for each baseline, the
    other configuration at ``limited`` / ``elsewhere``; ``fair``: A's finished before
    B's last. Variant names from bench/flow_keyed.py, as run.py records them."""
    run = made_up_run()
    run["samples"] = []
    for db in ["postgresql", "sqlite"] if sqlite else ["postgresql"]:
        for rnd in range(3):
            run["samples"] += [
                sample("keyed", "celeriac", flow.variant(db, flow.UNLIMITED), rnd,
                       jobs_per_s=1000.0),
                sample("keyed", "celeriac", flow.variant(db, flow.LIMITED), rnd,
                       jobs_per_s=limited[rnd]),
                sample("plain", "celeriac", flow.variant(db, flow.NO_FLOW), rnd,
                       jobs_per_s=1000.0),
                sample("plain", "celeriac", flow.variant(db, flow.FLOW_ELSEWHERE), rnd,
                       jobs_per_s=elsewhere[rnd]),
                sample("fairness", "celeriac", flow.variant(db, flow.FAIR), rnd,
                       jobs_per_s=500.0, a_finished_before_b_last=fair[rnd]),
            ]  # fmt: skip
    run["config"].update(flow_jobs=20_000, flow_keys=200, fair_a=10_000, fair_b=100)
    return run


def test_issue_15_targets_compare_each_flow_configuration_with_its_baseline() -> None:
    text = report.render(flow_run([800.0, 600.0, 700.0], [960.0, 940.0, 990.0],
                                  [150, 2500, 1999]), chart=None)  # fmt: skip
    keyed = row(text, "PostgreSQL: 20,000 jobs over 200 keys")
    assert keyed[1:] == ["0.70x (0.60x-0.80x)", "≥ 0.7x", "met"]
    plain = row(text, "PostgreSQL: a queue without limits is no slower")
    assert plain[1:] == ["0.96x (0.94x-0.99x)", "≥ 0.95x", "met"]
    fair = row(text, "PostgreSQL: fairness, 10,000 jobs of key A")
    assert fair[1:] == ["1,999 of A (150-2,500)", "< 2,000 of A", "met"]
    assert "### Flow control (issue 15)" in text
    assert "no flow control configured at all" in text  # how "no slower" is read
    # the section's table: each configuration beside its baseline of the same database
    assert row(text, "keyed | PostgreSQL, keyed, bk-*")[2:4] == ["700 (600-800)",
                                                                "0.70x (0.60x-0.80x)"]  # fmt: skip
    assert not any(line.startswith("| SQLite default:") for line in text.splitlines())


def test_issue_15_targets_missed_or_not_measured() -> None:
    text = report.render(flow_run([600.0, 650.0, 690.0], [900.0, 960.0, 940.0],
                                  [2000, 2000, 3000], sqlite=True), chart=None)  # fmt: skip
    assert row(text, "PostgreSQL: 20,000 jobs")[3] == "**missed** by 7%"
    assert row(text, "PostgreSQL: a queue without limits")[3] == "**missed** by 1%"
    # B's last finishing as A's 2,000th does is not "before" it
    fair = row(text, "PostgreSQL: fairness")
    assert fair[1:] == ["2,000 of A (2,000-3,000)", "< 2,000 of A", "**missed** by 0%"]
    assert row(text, "SQLite default: fairness")[3] == "**missed** by 0%"  # measured: a row
    # a run without the flow scenarios still says what it did not measure
    empty = report.render(made_up_run(), chart=None)
    assert row(empty, "PostgreSQL: 20,000 jobs")[1:] == ["—", "≥ 0.7x", "not measured"]
    assert "### Flow control (issue 15)" not in empty


def test_a_service_that_commits_asynchronously_misses_the_durability_target() -> None:
    text = report.render(made_up_run(synchronous_commit="off"), chart=None)
    assert row(text, "nothing less durable")[1:] == [
        "off in 6 samples (fsync on)",
        "on",
        "**missed**",
    ]
