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


def rate(value: float) -> str:
    return f"{value:,.0f}"


def ms(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def mb(value: float) -> str:
    return f"{value:.0f}"


def secs(value: float) -> str:
    return f"{value:.2f}"


def ratio(ours: float | None, theirs: float | None) -> str:
    if ours is None or theirs is None or theirs == 0:
        return "—"
    return f"{ours / theirs:.2f}x"


def cell(stat: Stat | None, fmt: Callable[[float], str]) -> str:
    return stat.show(fmt) if stat else "—"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def throughput_table(summary: Summary, scenario: str, extra: list[tuple[str, str, Any]]) -> str:
    ref = summary.median(scenario, "celeriac", REFERENCE[scenario], "jobs_per_s")
    header = ["system", "configuration", "jobs/s median (min-max)"]
    header += [title for title, _, _ in extra] + ["celeriac ÷ peer"]
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
        row.append("—" if system == "celeriac" else ratio(ref, stat.median if stat else None))
        rows.append(row)
    return table(header, rows)


def latency_table(summary: Summary) -> str:
    ref50 = summary.median("latency", "celeriac", REFERENCE["latency"], "p50_ms")
    ref99 = summary.median("latency", "celeriac", REFERENCE["latency"], "p99_ms")
    rows = []
    for key in summary.keys("latency"):
        _, system, variant = key
        p50, p99 = summary.stat(key, "p50_ms"), summary.stat(key, "p99_ms")
        mine = system == "celeriac"
        rows.append(
            [
                f"**{system}**" if mine else system,
                variant,
                cell(p50, ms),
                cell(p99, ms),
                "—" if mine else ratio(ref50, p50.median if p50 else None),
                "—" if mine else ratio(ref99, p99.median if p99 else None),
            ]
        )
    header = [
        "system",
        "worker",
        "p50 ms (min-max)",
        "p99 ms (min-max)",
        "celeriac ÷ peer p50",
        "celeriac ÷ peer p99",
    ]
    return table(header, rows)


def resource_table(summary: Summary) -> str:
    rest: dict[str, tuple[Key, str]] = {k[1]: (k, k[2]) for k in summary.keys("latency")}
    rows = []
    for key in summary.keys("drain"):
        _, system, variant = key
        rest_key, rest_variant = rest.get(system, (None, ""))
        at_rest = rest_key if rest_key and variant.startswith(rest_variant) else None

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


def targets(summary: Summary) -> str:
    def med(scenario: str, system: str, variant: str, metric: str = "jobs_per_s") -> float | None:
        return summary.median(scenario, system, variant, metric)

    drain_http = med("drain", "celeriac", "http worker -c 8")
    drain_redis = med("drain", "celeriac", "redis protocol loop")
    drain_redis_worker = med("drain", "celeriac", "redis worker -c 8")
    dramatiq_best = max(
        (v for k in summary.keys("submit") if k[1] == "dramatiq" if (v := med(*k)) is not None),
        default=None,
    )
    checks: list[tuple[str, float | None, float | None, float, bool]] = [
        # (what, ours, theirs, wanted ratio, higher is better)
        (
            "drain, PostgreSQL results (http worker) ≥ 3x Celery db+postgresql",
            drain_http,
            med("drain", "celery", "prefork -c 2, postgres results"),
            3.0,
            True,
        ),
        (
            "drain, PostgreSQL results (http worker) ≥ 2x Celery Redis results",
            drain_http,
            med("drain", "celery", "prefork -c 2, redis results"),
            2.0,
            True,
        ),
        (
            "drain, PostgreSQL results (Redis protocol loop) ≥ 3x Celery db+postgresql",
            drain_redis,
            med("drain", "celery", "prefork -c 2, postgres results"),
            3.0,
            True,
        ),
        (
            "drain, PostgreSQL results (Redis protocol loop) ≥ 2x Celery Redis results",
            drain_redis,
            med("drain", "celery", "prefork -c 2, redis results"),
            2.0,
            True,
        ),
        (
            "drain over Redis (redis worker -c 8) ≥ 1x Dramatiq 2 proc x 8 threads",
            drain_redis_worker,
            med("drain", "dramatiq", "redis, 2 proc x 8 threads (default)"),
            1.0,
            True,
        ),
        (
            "drain over Redis (redis worker -c 8) ≥ 1x Huey 2 processes",
            drain_redis_worker,
            med("drain", "huey", "2 processes"),
            1.0,
            True,
        ),
        (
            "POST /jobs/batch ≥ Dramatiq's best enqueue",
            med("submit", "celeriac", "POST /jobs/batch of 1000"),
            dramatiq_best,
            1.0,
            True,
        ),
        (
            "POST /jobs, 16 clients ≥ 0.7x Celery delay()",
            med("submit", "celeriac", "POST /jobs x16 clients"),
            med("submit", "celery", "delay()"),
            0.7,
            True,
        ),
        (
            "round trip p50 ≤ 5 ms",
            med("latency", "celeriac", "http worker -c 8", "p50_ms"),
            5.0,
            1.0,
            False,
        ),
        (
            "round trip p99 ≤ 10 ms",
            med("latency", "celeriac", "http worker -c 8", "p99_ms"),
            10.0,
            1.0,
            False,
        ),
        (
            "worker RSS at rest ≤ ½ Celery prefork -c 2",
            med("latency", "celeriac", "http worker -c 8", "worker_rss_rest_mb"),
            med("latency", "celery", "prefork -c 2, redis results", "worker_rss_rest_mb"),
            0.5,
            False,
        ),
    ]
    rows = []
    for what, ours, theirs, wanted, higher in checks:
        if ours is None or theirs is None:
            rows.append([what, "—", "not measured"])
            continue
        got = ours / theirs
        ok = got >= wanted if higher else got <= wanted
        if higher:
            by = f"{got:.2f}x (want ≥ {wanted:g}x)"
        else:
            by = f"{ours:.2f} vs limit {theirs * wanted:.2f}"
        verdict = "met" if ok else f"**missed** by {abs(1 - got / wanted) * 100:.0f}%"
        rows.append([what, by, verdict])
    return table(["target (issue 8)", "measured", "verdict"], rows)


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
        f"{cfg['fanout_jobs']:,} per fan-out sample, {cfg['latency_rounds']} round trips.",
        f"Packages: {versions}. Servers: {servers}.",
        "celeriac measured: {code} at {commit}.".format(
            **run.get("celeriac_source", {"code": "working tree", "commit": "?"})
        ),
    ]
    sections = {
        "submit": (
            "Submit throughput (one process)",
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
    parts.append(f"### Targets\n\n{targets(summary)}")
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
        ("submit", "Submit: jobs/s, one process"),
        ("drain", "Drain: jobs/s until all results stored"),
        ("fanout", "Fan-out: jobs/s, 4 worker processes"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(15, 11))
    for ax, (scenario, title) in zip(axes.flat[:3], panels, strict=True):
        bars(ax, summary, scenario, "jobs_per_s", title)
    latency_panel(axes.flat[3], summary)
    run, m = summary.run, summary.run["machine"]
    fig.suptitle(
        f"celeriac vs Celery, Dramatiq, Huey, RQ — {m['cores']} cores, Python {m['python']}, "
        f"{run['date'][:10]}; medians of {run['config']['rounds']} rounds, whiskers min-max",
        fontsize=13,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.96))
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
