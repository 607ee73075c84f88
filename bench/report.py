"""The side-by-side bench's report: medians with min-max over rounds, celeriac's ratio to
each peer, the issue's targets, a chart (matplotlib, Agg) and py-spy summaries."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Run = dict[str, Any]
COLORS = {
    "celeriac": "#2e7d32",
    "celery": "#1f77b4",
    "dramatiq": "#ff7f0e",
    "huey": "#9467bd",
    "rq": "#d62728",
}
# celeriac's configuration each scenario's ratios are computed from
REFERENCE = {
    "sequential": "delay(), PostgreSQL",
    "submit": "POST /jobs x16 clients",
    "drain": "http worker -c 8",
    "latency": "http worker -c 8",
    "fanout": "4 x http worker -c 8",
}


@dataclass
class Stat:
    median: float
    low: float
    high: float
    count: int

    def show(self, fmt: Callable[[float], str]) -> str:
        if self.count == 1:
            return fmt(self.median)
        return f"{fmt(self.median)} ({fmt(self.low)}-{fmt(self.high)})"


Key = tuple[str, str, str]  # scenario, system, variant


class Summary:
    def __init__(self, run: Run) -> None:
        self.run = run
        self.values: dict[Key, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.order: list[Key] = []
        self.failures: list[dict[str, Any]] = []
        for sample in run["samples"]:
            key = (sample["scenario"], sample["system"], sample["variant"])
            if key not in self.order:
                self.order.append(key)
            if not sample["ok"]:
                self.failures.append(sample)
                continue
            for metric, value in sample["metrics"].items():
                if isinstance(value, int | float) and value is not None:
                    self.values[key][metric].append(float(value))

    def keys(self, scenario: str) -> list[Key]:
        keys = [k for k in self.order if k[0] == scenario]
        return sorted(keys, key=lambda k: (k[1] != "celeriac", list(COLORS).index(k[1])))

    def stat(self, key: Key, metric: str) -> Stat | None:
        values = self.values.get(key, {}).get(metric)
        if not values:
            return None
        return Stat(statistics.median(values), min(values), max(values), len(values))

    def median(self, scenario: str, system: str, variant: str, metric: str) -> float | None:
        stat = self.stat((scenario, system, variant), metric)
        return stat.median if stat else None

    def total(self, key: Key, metric: str) -> float | None:
        values = self.values.get(key, {}).get(metric)
        return sum(values) if values else None

    def by_round(self, key: Key, metric: str) -> dict[int, float]:
        """The metric of each round's successful sample of ``key``."""
        out: dict[int, float] = {}
        for sample in self.run["samples"]:
            if (sample["scenario"], sample["system"], sample["variant"]) != key:
                continue
            value = sample.get("metrics", {}).get(metric) if sample["ok"] else None
            if isinstance(value, int | float):
                out[sample["round"]] = float(value)
        return out

    def ratio(self, ours: Key, theirs: Key, metric: str) -> Stat | None:
        """celeriac ÷ peer: the ratio of the two medians, with the lowest and highest
        ratio of two samples taken in the same round (back to back, same minutes)."""
        a, b = self.stat(ours, metric), self.stat(theirs, metric)
        if a is None or b is None or b.median == 0:
            return None
        mine, peer = self.by_round(ours, metric), self.by_round(theirs, metric)
        paired = [mine[r] / peer[r] for r in mine if peer.get(r)]
        if not paired:
            return None
        return Stat(a.median / b.median, min(paired), max(paired), len(paired))

    def first(self, scenarios: tuple[str, ...], system: str, variant: str) -> Key:
        """The key of the first scenario that measured this configuration (an older run
        had the one-thread submits of the peers under "submit")."""
        for scenario in scenarios:
            if (scenario, system, variant) in self.order:
                return (scenario, system, variant)
        return (scenarios[0], system, variant)


def rate(value: float) -> str:
    return f"{value:,.0f}"


def ms(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def mb(value: float) -> str:
    return f"{value:.0f}"


def secs(value: float) -> str:
    return f"{value:.2f}"


def cell(stat: Stat | None, fmt: Callable[[float], str]) -> str:
    return stat.show(fmt) if stat else "—"


def times(value: float) -> str:
    return f"{value:.2f}x"


def ratio_cell(summary: Summary, ours: Key, theirs: Key, metric: str) -> str:
    return cell(summary.ratio(ours, theirs, metric), times)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def throughput_table(summary: Summary, scenario: str, extra: list[tuple[str, str, Any]]) -> str:
    ref: Key = (scenario, "celeriac", REFERENCE[scenario])
    header = ["system", "configuration", "jobs/s median (min-max)"]
    header += [title for title, _, _ in extra] + ["celeriac ÷ peer (per-round min-max)"]
    rows = []
    for key in summary.keys(scenario):
        _, system, variant = key
        stat = summary.stat(key, "jobs_per_s")
        row = [f"**{system}**" if system == "celeriac" else system, variant, cell(stat, rate)]
        for _, metric, fmt in extra:
            if metric in ("duplicates", "missing"):
                value = summary.total(key, metric)
                row.append("—" if value is None else f"{value:.0f}")
            else:
                row.append(cell(summary.stat(key, metric), fmt))
        row.append("—" if system == "celeriac" else ratio_cell(summary, ref, key, "jobs_per_s"))
        rows.append(row)
    return table(header, rows)


def latency_table(summary: Summary) -> str:
    ref: Key = ("latency", "celeriac", REFERENCE["latency"])
    rows = []
    for key in summary.keys("latency"):
        _, system, variant = key
        mine = system == "celeriac"
        rows.append(
            [
                f"**{system}**" if mine else system,
                variant,
                cell(summary.stat(key, "p50_ms"), ms),
                cell(summary.stat(key, "p90_ms"), ms),
                cell(summary.stat(key, "p99_ms"), ms),
                "—" if mine else ratio_cell(summary, ref, key, "p50_ms"),
                "—" if mine else ratio_cell(summary, ref, key, "p99_ms"),
                cell(summary.stat(key, "harness_gc_max_ms"), ms),
            ]
        )
    header = [
        "system",
        "worker",
        "p50 ms (min-max)",
        "p90 ms (min-max)",
        "p99 ms (min-max)",
        "celeriac ÷ peer p50",
        "celeriac ÷ peer p99",
        # the client that times the trips: a pause of its own would be in the p99
        "harness's longest GC pass, ms",
    ]
    return table(header, rows)


def latency_summary(summary: Summary) -> str:
    """One row per system and configuration, celeriac's first: round trip p50 and p99."""
    rows = [
        [
            f"**{system}**" if system == "celeriac" else system,
            variant,
            cell(summary.stat(key, "p50_ms"), ms),
            cell(summary.stat(key, "p99_ms"), ms),
        ]
        for key in summary.keys("latency")
        for _, system, variant in [key]
    ]
    return table(["system", "configuration", "p50 ms", "p99 ms"], rows)


def resource_table(summary: Summary) -> str:
    rows = []
    for key in summary.keys("drain"):
        _, system, variant = key
        # at rest: the idle latency worker of the same system and configuration
        at_rest = next(
            (k for k in summary.keys("latency") if k[1] == system and variant.startswith(k[2])),
            None,
        )

        def total(metrics: tuple[str, str], key: Key = key) -> str:
            worker, service = (summary.stat(key, m) for m in metrics)
            if worker is None:
                return "—"
            return secs(worker.median + (service.median if service else 0.0))

        rows.append([
            f"**{system}**" if system == "celeriac" else system, variant,
            cell(summary.stat(at_rest, "worker_rss_rest_mb"), mb) if at_rest else "—",
            cell(summary.stat(key, "worker_rss_peak_mb"), mb),
            cell(summary.stat(key, "worker_pss_peak_mb"), mb),
            cell(summary.stat(at_rest, "service_rss_rest_mb"), mb) if at_rest else "—",
            cell(summary.stat(key, "service_rss_peak_mb"), mb),
            cell(summary.stat(at_rest, "worker_startup_cpu_s"), secs) if at_rest else "—",
            cell(summary.stat(key, "worker_cpu_s_per_10k"), secs),
            cell(summary.stat(key, "service_cpu_s_per_10k"), secs),
            total(("worker_cpu_s_per_10k", "service_cpu_s_per_10k")),
            total(("worker_cpu_steady_s_per_10k", "service_cpu_steady_s_per_10k")),
        ])  # fmt: skip
    header = ["system", "worker", "worker RSS at rest MB", "worker RSS peak MB",
              "worker PSS peak MB", "service RSS at rest MB", "service RSS peak MB",
              "worker start-up CPU s", "CPU s/10k jobs, whole drain: worker", "service",
              "total", "total after the first result"]  # fmt: skip
    return table(header, rows)


@dataclass
class Goal:
    """One target line: ``metric`` of celeriac's ``key`` against ``wanted``, either
    absolute or, with ``versus``, as the ratio to a peer's same metric (ratio of the
    medians; in brackets the per-round ratios' min-max)."""

    what: str
    key: Key
    metric: str
    wanted: float
    at_least: bool  # True: the figure must be ≥ wanted; False: ≤
    versus: Key | None = None
    strict: bool = False  # > or < rather than ≥ or ≤

    def check(self, summary: Summary) -> list[str]:
        sign = ("≥", "≤", ">", "<")[(not self.at_least) + 2 * self.strict]
        if self.versus is None:
            fmt, unit = UNITS.get(self.metric, (ms, " ms"))
            stat = summary.stat(self.key, self.metric)
            wanted = f"{sign} {fmt(self.wanted)}{unit}"
        else:
            fmt, unit = times, ""
            stat = summary.ratio(self.key, self.versus, self.metric)
            wanted = f"{sign} {self.wanted:g}x"
        if stat is None:
            return [self.what, "—", wanted, "not measured"]
        measured = f"{fmt(stat.median)}{unit}"
        if stat.count > 1:
            measured += f" ({fmt(stat.low)}-{fmt(stat.high)})"
        if self.met(stat.median):
            verdict = "met"
        else:
            verdict = f"**missed** by {abs(stat.median - self.wanted) / self.wanted * 100:.0f}%"
        return [self.what, measured, wanted, verdict]

    def met(self, got: float) -> bool:
        if got == self.wanted:
            return not self.strict
        return got > self.wanted if self.at_least else got < self.wanted


UNITS: dict[str, tuple[Callable[[float], str], str]] = {
    "jobs_per_s": (rate, "/s"),
    "worker_rss_rest_mb": (mb, " MB"),
    "a_finished_before_b_last": (rate, " of A"),
}


def issue8_goals(summary: Summary) -> list[Goal]:
    http = ("drain", "celeriac", "http worker -c 8")
    loop = ("drain", "celeriac", "redis protocol loop")
    redis_worker = ("drain", "celeriac", "redis worker -c 8")
    celery_pg = ("drain", "celery", "prefork -c 2, postgres results")
    celery_redis = ("drain", "celery", "prefork -c 2, redis results")
    one_thread = ("sequential", "submit")  # an older run had them under "submit"
    dramatiq = [k for s in one_thread for k in summary.keys(s) if k[1] == "dramatiq"]
    dramatiq_best = max(
        dramatiq,
        key=lambda k: summary.median(*k, "jobs_per_s") or 0.0,
        default=("sequential", "dramatiq", "send(), rabbitmq"),
    )
    celery_delay = summary.first(one_thread, "celery", "delay()")
    rest = ("latency", "celeriac", "http worker -c 8")
    return [
        Goal("drain, PostgreSQL results (http worker) ÷ Celery db+postgresql",
             http, "jobs_per_s", 3.0, True, celery_pg),
        Goal("drain, PostgreSQL results (http worker) ÷ Celery Redis results",
             http, "jobs_per_s", 2.0, True, celery_redis),
        Goal("drain, PostgreSQL results (Redis protocol loop) ÷ Celery db+postgresql",
             loop, "jobs_per_s", 3.0, True, celery_pg),
        Goal("drain, PostgreSQL results (Redis protocol loop) ÷ Celery Redis results",
             loop, "jobs_per_s", 2.0, True, celery_redis),
        Goal("drain over Redis (redis worker -c 8) ÷ Dramatiq 2 proc x 8 threads",
             redis_worker, "jobs_per_s", 1.0, True,
             ("drain", "dramatiq", "redis, 2 proc x 8 threads (default)")),
        Goal("drain over Redis (redis worker -c 8) ÷ Huey 2 processes",
             redis_worker, "jobs_per_s", 1.0, True, ("drain", "huey", "2 processes")),
        Goal(f"POST /jobs/batch ÷ Dramatiq's best enqueue ({dramatiq_best[2]})",
             ("submit", "celeriac", "POST /jobs/batch of 1000"), "jobs_per_s", 1.0, True,
             dramatiq_best),
        Goal("POST /jobs, 16 clients ÷ Celery delay()",
             ("submit", "celeriac", "POST /jobs x16 clients"), "jobs_per_s", 0.7, True,
             celery_delay),
        Goal("round trip p50 (http worker -c 8)", rest, "p50_ms", 5.0, False),
        Goal("round trip p99 (http worker -c 8)", rest, "p99_ms", 10.0, False),
        Goal("worker RSS at rest ÷ Celery prefork -c 2", rest, "worker_rss_rest_mb", 0.5,
             False, ("latency", "celery", "prefork -c 2, redis results")),
    ]  # fmt: skip


def targets_issue8(summary: Summary) -> str:
    rows = [goal.check(summary) for goal in issue8_goals(summary)]
    return table(["target (issue 8)", "measured: median (min-max)", "wanted", "verdict"], rows)


PG_HTTP = ("latency", "celeriac", "http worker -c 8")
ISSUE_14 = [
    Goal("one thread `delay()`, HTTP + PostgreSQL, a committed row per 2xx",
         ("sequential", "celeriac", "delay(), PostgreSQL"), "jobs_per_s", 1500, True),
    Goal("… ÷ Celery `delay()` in the same run",
         ("sequential", "celeriac", "delay(), PostgreSQL"), "jobs_per_s", 0.55, True,
         ("sequential", "celery", "delay()")),
    Goal("round trip p50, idle HTTP worker, PostgreSQL", PG_HTTP, "p50_ms", 4.0, False),
    Goal("round trip p99, idle HTTP worker, PostgreSQL", PG_HTTP, "p99_ms", 8.0, False),
    Goal("round trip p50, Redis-fetch worker (`--broker redis://`), PostgreSQL",
         ("latency", "celeriac", "redis worker -c 8"), "p50_ms", 3.0, False),
    Goal("round trip p50, SQLite default (no configuration), HTTP worker",
         ("latency", "celeriac", "SQLite default, http worker -c 8"), "p50_ms", 3.0, False),
    Goal("`POST /jobs` from 16 client threads",
         ("submit", "celeriac", "POST /jobs x16 clients"), "jobs_per_s", 3000, True),
    Goal("`POST /jobs/batch` of 1000",
         ("submit", "celeriac", "POST /jobs/batch of 1000"), "jobs_per_s", 20_000, True),
    Goal("HTTP worker drain, results in PostgreSQL",
         ("drain", "celeriac", "http worker -c 8"), "jobs_per_s", 2500, True),
    Goal("Redis-fetch worker drain, results durable in PostgreSQL",
         ("drain", "celeriac", "redis worker -c 8"), "jobs_per_s", 7000, True),
]  # fmt: skip


def counted(seen: Counter[str]) -> str:
    return ", ".join(f"{v} in {n} sample{'s' if n > 1 else ''}" for v, n in seen.most_common())


def durability_row(run: Run) -> list[str]:
    """PostgreSQL's ``synchronous_commit`` as celeriac's service sees it, in every sample
    that ran it on PostgreSQL (run.py records it with each sample)."""
    seen = Counter(
        str(sample["metrics"]["pg_synchronous_commit"])
        for sample in run["samples"]
        if sample["system"] == "celeriac" and sample["ok"]
        if "pg_synchronous_commit" in sample.get("metrics", {})
    )
    what = "nothing less durable: PostgreSQL `synchronous_commit` of the service under test"
    if not seen:
        return [what, "—", "on", "not measured"]
    measured = counted(seen)
    fsync = {
        str(sample["metrics"]["pg_fsync"])
        for sample in run["samples"]
        if sample["ok"] and "pg_fsync" in sample.get("metrics", {})
    }
    measured += f" (fsync {'/'.join(sorted(fsync))})" if fsync else ""
    verdict = "met" if set(seen) == {"on"} else "**missed**"
    return [what, measured, "on", verdict]


def sqlite_durability_row(run: Run) -> list[str]:
    """SQLite's ``synchronous`` pragma as the service sets it (WAL; "normal" so far):
    shown so that a change to it is seen, not hidden behind the SQLite figures."""
    seen = Counter(
        str(sample["metrics"]["sqlite_synchronous"])
        for sample in run["samples"]
        if sample["system"] == "celeriac" and sample["ok"]
        if "sqlite_synchronous" in sample.get("metrics", {})
    )
    what = "… and SQLite's `synchronous` pragma (WAL) of the SQLite default"
    if not seen:
        return [what, "—", "normal or stronger", "not measured"]
    measured = counted(seen)
    ok = set(seen) <= {"normal", "full", "extra"}
    return [what, measured, "normal or stronger", "met" if ok else "**missed**"]


def targets_issue14(summary: Summary) -> str:
    rows = [goal.check(summary) for goal in ISSUE_14]
    rows += [durability_row(summary.run), sqlite_durability_row(summary.run)]
    header = ["target (issue 14)", "measured: median (min-max)", "wanted", "verdict"]
    return table(header, rows)


# -- flow control (issue 15; the scenarios: bench/flow_keyed.py) ----------------------------

FLOW_SCENARIOS = ("keyed", "plain", "fairness")
# each variant is "<database>, <what>"; the baseline of each compared pair, and the other
UNLIMITED, LIMITED = "keyed, no limits", "keyed, bk-* max_running 2"
NO_FLOW, FLOW_ELSEWHERE = "no flow control", "bk-* limit on other keys"
FAIR = "fa-* max_running 4"
BASELINE = {LIMITED: UNLIMITED, FLOW_ELSEWHERE: NO_FLOW}
DATABASE_ORDER = ("PostgreSQL", "PostgreSQL SQL broker", "SQLite default")


def flow_databases(summary: Summary) -> list[str]:
    """PostgreSQL's (the default: "not measured" if absent), then every other database
    a flow scenario ran on."""
    seen = {key[2].split(", ")[0] for s in FLOW_SCENARIOS for key in summary.keys(s)}
    return [db for db in DATABASE_ORDER if db == "PostgreSQL" or db in seen]


def issue15_goals(summary: Summary) -> list[Goal]:
    cfg = summary.run["config"]
    jobs, keys = cfg.get("flow_jobs", 20_000), cfg.get("flow_keys", 200)
    a, b = cfg.get("fair_a", 10_000), cfg.get("fair_b", 100)
    goals = []
    for db in flow_databases(summary):
        goals += [
            Goal(f"{db}: {jobs:,} jobs over {keys} keys, `bk-*` max_running 2 each, "
                 "4 workers x 8 threads ÷ the same jobs without limits",
                 ("keyed", "celeriac", f"{db}, {LIMITED}"), "jobs_per_s", 0.7, True,
                 ("keyed", "celeriac", f"{db}, {UNLIMITED}")),
            Goal(f"{db}: a queue without limits is no slower than before — {jobs:,} jobs "
                 "naming no limits, limits defined for other keys ÷ no flow control at all",
                 ("plain", "celeriac", f"{db}, {FLOW_ELSEWHERE}"), "jobs_per_s", 0.95,
                 True, ("plain", "celeriac", f"{db}, {NO_FLOW}")),
            # the issue's 2,000th of 10,000: a fifth of A, whatever A is in this run
            Goal(f"{db}: fairness, {a:,} jobs of key A queued before {b:,} of B (`fa-*` "
                 "max_running 4): A's finished before B's last",
                 ("fairness", "celeriac", f"{db}, {FAIR}"), "a_finished_before_b_last",
                 a / 5, False, strict=True),
        ]  # fmt: skip
    return goals


def targets_issue15(summary: Summary) -> str:
    rows = [goal.check(summary) for goal in issue15_goals(summary)]
    return table(["target (issue 15)", "measured: median (min-max)", "wanted", "verdict"], rows)


def flow_table(summary: Summary) -> str:
    """Every flow configuration: jobs/s, and the ratio to its baseline of the same
    database (of the medians; in brackets the per-round ratios)."""
    rows = []
    for scenario in FLOW_SCENARIOS:
        for key in summary.keys(scenario):
            db, _, what = key[2].partition(", ")
            base = BASELINE.get(what)
            rows.append([
                scenario, key[2], cell(summary.stat(key, "jobs_per_s"), rate),
                ratio_cell(summary, key, (scenario, "celeriac", f"{db}, {base}"), "jobs_per_s")
                if base else "—",
                cell(summary.stat(key, "a_finished_before_b_last"), rate),
            ])  # fmt: skip
    header = ["scenario", "configuration", "jobs/s median (min-max)",
              "÷ its baseline (per-round min-max)", "A finished before B's last"]  # fmt: skip
    return table(header, rows)


FLOW_NOTE = " ".join([
    "Each sample drains no-op jobs with 4 x `celeriac worker -c 8` over HTTP, timed from",
    "their start until every result is stored (fairness: until B's last job finished, or a",
    "fifth of A's did first, then the count is a lower bound); the two configurations of a",
    "scenario run back to back in each round (the order reversed every other round).",
    '"No slower than before" is read as: a queue whose jobs name no limits, drained while',
    "limits exist for other keys, against the same queue with no flow control configured at",
    "all: the plain claim, the path every job took before issue 15 (the pre-issue-15",
    "claim), in the same run.",
])  # fmt: skip


def render(run: Run, chart: Path | None) -> str:
    summary = Summary(run)
    cfg, m = run["config"], run["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in run["versions"].items())
    servers = ", ".join(f"{k} {v}" for k, v in run["servers"].items())
    parts = [
        f"Run of {run['date']} ({run['duration_s']:.0f} s): {m['cores']} cores ({m['cpu']}), "
        f"{m['memory_gb']} GB, Python {m['python']}, load average at start "
        f"{m['loadavg_start'][0]:.2f}, at end {m.get('loadavg_end', [0])[0]:.2f}. "
        f"{cfg['rounds']} rounds; {cfg['jobs']:,} jobs per submit/drain sample, "
        f"{cfg['fanout_jobs']:,} per fan-out sample, {cfg['latency_rounds']} round trips"
        + (
            f", {cfg['sequential_calls']:,} one-thread submits."
            if "sequential_calls" in cfg
            else "."
        )
        + " Ratios: celeriac ÷ peer of the medians; in brackets the lowest and highest "
        "ratio of two samples taken in the same round.",
        f"Packages: {versions}. Servers: {servers}.",
        "celeriac measured: {code} at {commit}.".format(
            **run.get("celeriac_source", {"code": "working tree", "commit": "?"})
        ),
    ]
    if summary.keys("latency"):
        parts.append(
            "### Latency (round trip: submit, then wait for the result; median (min-max))\n\n"
            + latency_summary(summary)
        )
    sections = {
        "sequential": (
            "Sequential submit (one thread, one call at a time: `delay()`, `send()`, …)",
            throughput_table(
                summary,
                "sequential",
                [("per call p50 ms", "p50_ms", ms), ("per call p99 ms", "p99_ms", ms)],
            ),
        ),
        "submit": (
            "Bulk submit (one process)",
            throughput_table(summary, "submit", [("per call p50 ms", "p50_ms", ms)]),
        ),
        "drain": (
            "Drain throughput (jobs queued first; from worker start until all results are stored)",
            throughput_table(
                summary,
                "drain",
                [
                    ("first result after s", "first_result_s", secs),
                    ("steady jobs/s", "steady_jobs_per_s", rate),
                ],
            ),
        ),
        "latency": (
            "Round trip (submit, then wait for the result; idle worker ready)",
            latency_table(summary),
        ),
        "fanout": (
            "Fan-out (4 worker processes; duplicates and missing summed over rounds)",
            throughput_table(
                summary,
                "fanout",
                [("duplicates", "duplicates", None), ("missing", "missing", None)],
            ),
        ),
    }
    for scenario, (title, body) in sections.items():
        if summary.keys(scenario):
            parts.append(f"### {title}\n\n{body}")
    if summary.keys("drain"):
        parts.append(
            "### Resources (peak and CPU during the drain; at rest: the latency "
            f"worker, idle)\n\n{resource_table(summary)}"
        )
    if any(summary.keys(s) for s in FLOW_SCENARIOS):
        parts.append(f"### Flow control (issue 15)\n\n{FLOW_NOTE}\n\n{flow_table(summary)}")
    parts.append(f"### Targets of issue 15\n\n{targets_issue15(summary)}")
    parts.append(f"### Targets of issue 14\n\n{targets_issue14(summary)}")
    parts.append(f"### Targets of issue 8\n\n{targets_issue8(summary)}")
    if summary.failures:
        lines = [
            f"- {f['scenario']} r{f['round']} {f['system']} ({f['variant']}): {f['error']}"
            for f in summary.failures
        ]
        parts.append("### Failed samples\n\n" + "\n".join(lines))
    profiles = run.get("profile") or {}
    if profiles:
        lines = [
            f"- {scenario}: `{Path(p['file']).relative_to(Path(p['file']).parents[2])}`"
            if p.get("file")
            else f"- {scenario}: failed ({p.get('error')})"
            for scenario, p in profiles.items()
        ]
        parts.append(
            "py-spy profiles of the service (one extra sample each, not counted):\n\n"
            + "\n".join(lines)
        )
    if chart is not None:
        draw(summary, chart)
    return "\n\n".join(parts) + "\n"


# -- chart -----------------------------------------------------------------------------


def draw(summary: Summary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("sequential", "Sequential submit: jobs/s, one thread, one call at a time"),
        ("submit", "Bulk submit: jobs/s, one process"),
        ("drain", "Drain: jobs/s until all results stored"),
        ("fanout", "Fan-out: jobs/s, 4 worker processes"),
    ]
    fig, axes = plt.subplot_mosaic(
        [["sequential", "submit"], ["drain", "fanout"], ["latency", "latency"]],
        figsize=(15, 16),
    )
    for scenario, title in panels:
        bars(axes[scenario], summary, scenario, "jobs_per_s", title)
    latency_panel(axes["latency"], summary)
    run, m = summary.run, summary.run["machine"]
    fig.suptitle(
        f"celeriac vs Celery, Dramatiq, Huey, RQ — {m['cores']} cores, Python {m['python']}, "
        f"{run['date'][:10]}; medians of {run['config']['rounds']} rounds, whiskers min-max",
        fontsize=13,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bars(ax: Any, summary: Summary, scenario: str, metric: str, title: str) -> None:
    keys = [k for k in summary.keys(scenario) if summary.stat(k, metric)]
    if not keys:
        ax.set_title(f"{title}: not measured in this run", fontsize=11)
        ax.axis("off")
        return
    stats = [summary.stat(k, metric) for k in keys]
    labels = [f"{k[1]}: {k[2]}" for k in keys]
    values = [s.median for s in stats if s]
    errors = [[s.median - s.low for s in stats if s], [s.high - s.median for s in stats if s]]
    ys = range(len(keys))
    ax.barh(ys, values, xerr=errors, color=[COLORS[k[1]] for k in keys], capsize=3)
    ax.set_yticks(list(ys), labels, fontsize=9)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("jobs/s, higher is better (bar: median; whisker: min-max)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    highs = [s.high for s in stats if s]
    top = max(highs, default=1.0)
    for y, value, high in zip(ys, values, highs, strict=True):
        ax.text(high + top * 0.015, y, f"{value:,.0f}", va="center", fontsize=8)
    ax.set_xlim(0, top * 1.18)


def latency_panel(ax: Any, summary: Summary) -> None:
    keys = [k for k in summary.keys("latency") if summary.stat(k, "p50_ms")]
    if not keys:
        ax.set_title("Round trip: not measured in this run", fontsize=11)
        ax.axis("off")
        return
    ys = list(range(len(keys)))
    height = 0.38
    for offset, metric, alpha in ((-height / 2, "p50_ms", 1.0), (height / 2, "p99_ms", 0.5)):
        stats = [summary.stat(k, metric) for k in keys]
        values = [s.median if s else 0.0 for s in stats]
        ax.barh(
            [y + offset for y in ys],
            values,
            height=height,
            alpha=alpha,
            color=[COLORS[k[1]] for k in keys],
            label=metric.replace("_ms", ""),
        )
        for y, value in zip(ys, values, strict=True):
            ax.text(value * 1.05, y + offset, f"{value:.1f}", va="center", fontsize=8)
    ax.set_yticks(ys, [f"{k[1]}: {k[2]}" for k in keys], fontsize=9)
    ax.invert_yaxis()
    ax.set_xscale("log")
    longest = max((s.median for k in keys if (s := summary.stat(k, "p99_ms"))), default=10.0)
    ax.set_xlim(right=longest * 3)
    ax.set_xlabel("ms (log scale; solid p50, light p99) — shorter is better")
    ax.set_title("Round trip: submit + wait for the result", fontsize=11)
    ax.grid(axis="x", alpha=0.3)


# -- profiles --------------------------------------------------------------------------


def summarize_profile(
    raw: str, sample: dict[str, Any], what: str = "drain (http worker -c 8)", top: int = 25
) -> str:
    """py-spy's raw (collapsed) stacks as text: the functions most often on CPU (self) and
    on the stack (inclusive), in % of samples."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames[1:]):  # the first frame is the thread
            inclusive[frame] += count

    ours: Counter[str] = Counter(
        {
            frame: n
            for frame, n in inclusive.items()
            if "(service/" in frame or "(celeriac/" in frame
        }
    )

    def listing(counter: Counter[str]) -> str:
        return "\n".join(
            f"{n / total * 100:6.1f}%  {frame}" for frame, n in counter.most_common(top)
        )

    metrics = sample.get("metrics", {})
    head = (
        f"py-spy of `celeriac serve` during one {what} sample "
        f"({metrics.get('jobs', '?')} jobs, {metrics.get('jobs_per_s', 0):.0f} jobs/s under "
        f"the profiler), {total} samples at 200 Hz over all threads."
    )
    return (
        f"{head}\n\nTop frames by own time:\n{listing(own)}\n\n"
        f"celeriac's own functions (service/, celeriac/) by inclusive time:\n{listing(ours)}\n\n"
        f"Top frames by inclusive time:\n{listing(inclusive)}\n"
    )
