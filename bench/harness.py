"""Shared bench plumbing: fresh databases, free ports, readiness waits, the Redis databases
the side-by-side bench owns, starting and stopping processes, and /proc sampling.

Only the standard library at import: worker processes of every system import this through
their task modules, and their resident memory is measured."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent

# The side-by-side bench owns two Redis databases and FLUSHDBs them between runs: queues in
# BENCH_REDIS_DB (12), results of the peers that keep them in Redis in the next one (13).
# Never 0: other test runs use it.
REDIS_HOST = os.environ.get("BENCH_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("BENCH_REDIS_PORT", "6379"))
QUEUE_DB = int(os.environ.get("BENCH_REDIS_DB", "12"))
RESULT_DB = QUEUE_DB + 1
POSTGRES_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1/test")
RABBITMQ_URL = os.environ.get("BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
EXEC_KEY = "bench:exec"  # fan-out: every execution appends its argument here (QUEUE_DB)
LOG_DIR = Path(os.environ.get("BENCH_LOG_DIR", "/tmp/celeriac-bench-logs"))
PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")


def redis_url(db: int) -> str:
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"


def flush_redis() -> None:
    """Empty the bench's own Redis databases (refuses 0, which other test runs use)."""
    import redis

    for db in (QUEUE_DB, RESULT_DB):
        if db == 0:
            raise ValueError("the bench never flushes Redis db 0: set BENCH_REDIS_DB")
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
        try:
            client.flushdb()
        finally:
            client.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(base: str, timeout: float = 30.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{base} did not become ready")


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass; whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@contextmanager
def fresh_database(url: str, migrate: bool = True) -> Iterator[str]:
    """A new database beside the one named (SQLite: a new file), migrated to celeriac's
    schema unless ``migrate`` is false; dropped afterwards."""
    import sqlalchemy as sa

    from service.migrate import upgrade

    if url.startswith("sqlite"):
        path = f"/tmp/celeriac-bench-{uuid.uuid4().hex[:8]}.db"
        if migrate:
            upgrade(f"sqlite:///{path}")
        yield f"sqlite:///{path}"
        return
    name = f"celeriac_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    target = sa.make_url(url).set(database=name).render_as_string(hide_password=False)
    try:
        if migrate:
            upgrade(target)
        yield target
    finally:
        with admin.connect() as conn:
            force = " WITH (FORCE)" if admin.dialect.name == "postgresql" else ""
            conn.exec_driver_sql(f"DROP DATABASE {name}{force}")
        admin.dispose()


# -- processes -------------------------------------------------------------------------


def spawn(
    cmd: Sequence[str],
    name: str,
    env: dict[str, str] | None = None,
    *,
    cwd: Path = BENCH_DIR,
    unset: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """Start a process of the bench, its output in LOG_DIR/<name>.log; ``unset`` names
    variables of this process's environment the child must not inherit."""
    child_env = {k: v for k, v in os.environ.items() if k not in unset}
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = (LOG_DIR / f"{name}.log").open("ab")
    try:
        return subprocess.Popen(
            list(cmd),
            env={**child_env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
        )
    finally:
        log.close()


def _ppid_map() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # the command may contain spaces and parentheses: fields start after the last ')'
        fields = stat[stat.rfind(b")") + 2 :].split()
        parents[int(entry.name)] = int(fields[1])
    return parents


def tree(root: int) -> list[int]:
    """``root`` and all its descendants that are alive now."""
    parents = _ppid_map()
    if root not in parents:
        return []
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def stop(proc: subprocess.Popen[bytes], grace: float = 5.0, signals: int = 1) -> None:
    """SIGTERM (``signals`` times: 2 asks some workers for a cold shutdown), then SIGKILL
    for the process and every descendant still alive after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    family = tree(proc.pid)
    for _ in range(signals):
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(grace)
    for pid in [*family, *tree(proc.pid)]:
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError):
        return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages split among the processes sharing them (a fairer
    sum over a forked pool than RSS)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (threads included), from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICK


@dataclass
class Group:
    roots: list[int]
    peak_rss: int = 0
    peak_pss: int = 0
    cpu: dict[int, float] = field(default_factory=dict)  # highest seen per pid

    def cpu_total(self) -> float:
        return sum(self.cpu.values())


class Sampler:
    """Samples named groups of process trees every ``interval`` s in a thread: peak RSS and
    PSS of each tree, and CPU seconds of every process seen (so a child that exits still
    counts with what it had used at the last sample)."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.groups: dict[str, Group] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def track(self, name: str, roots: Sequence[int]) -> None:
        with self._lock:
            self.groups[name] = Group(list(roots))

    def start(self) -> Sampler:
        self.sample()
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def sample(self) -> None:
        with self._lock:
            for group in self.groups.values():
                rss = pss = 0
                for root in group.roots:
                    for pid in tree(root):
                        rss += rss_bytes(pid)
                        pss += pss_bytes(pid)
                        used = cpu_seconds(pid)
                        group.cpu[pid] = max(group.cpu.get(pid, 0.0), used)
                group.peak_rss = max(group.peak_rss, rss)
                group.peak_pss = max(group.peak_pss, pss)

    def cpu(self, name: str) -> float:
        with self._lock:
            group = self.groups.get(name)
            return group.cpu_total() if group else 0.0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()


def memory_now(roots: Sequence[int]) -> tuple[int, int]:
    """(RSS, PSS) in bytes of the trees under ``roots`` right now."""
    pids = [pid for root in roots for pid in tree(root)]
    return sum(rss_bytes(p) for p in pids), sum(pss_bytes(p) for p in pids)


_exec_client: object | None = None


def record_execution(arg: int) -> None:
    """What a fan-out task does: append its argument to EXEC_KEY (one client per process,
    created on first use, so it is never shared across a fork)."""
    global _exec_client
    if _exec_client is None:
        import redis

        _exec_client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=QUEUE_DB)
    _exec_client.rpush(EXEC_KEY, arg)  # type: ignore[attr-defined]
