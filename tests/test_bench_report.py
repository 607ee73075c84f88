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


def test_a_service_that_commits_asynchronously_misses_the_durability_target() -> None:
    text = report.render(made_up_run(synchronous_commit="off"), chart=None)
    assert row(text, "nothing less durable")[1:] == [
        "off in 6 samples (fsync on)",
        "on",
        "**missed**",
    ]
