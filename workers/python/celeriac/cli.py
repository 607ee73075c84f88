"""The ``celeriac`` command: run workers, submit and inspect jobs.

This is the worker SDK's command. The service's commands (``serve``, ``migrate``,
``demo``) belong to the server distribution (celeriac-server): it plugs them in through
the ``celeriac.commands`` entry-point group, so one ``celeriac`` command serves both, and
a worker machine without the server gets a clear message instead of an ImportError.
Commands import what they need inside themselves, so every command starts fast.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Annotated

import typer

from ._cli_jobs import jobs
from ._cli_queues import purge
from .cli_flow import limits, queues
from .cli_schedules import schedules

cli = typer.Typer(
    name="celeriac",
    help="A job queue service: submit over HTTP, work from any language, results in SQL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
cli.add_typer(jobs, name="jobs")
cli.add_typer(schedules, name="schedules")
cli.add_typer(queues, name="queues")
queues.command()(purge)  # beside pause/resume (cli_flow.py): cancels a queue's waiting jobs
cli.add_typer(limits, name="limits")

# Entry points in this group are callables taking the Typer app and adding commands to it.
COMMANDS_GROUP = "celeriac.commands"
SERVER_COMMANDS = ("serve", "migrate", "demo")
SERVER_MISSING = (
    "`celeriac {name}` is part of the celeriac service, which is not installed here: "
    "this environment has the worker SDK (the `celeriac` package) only. Install the "
    "server distribution, celeriac-server (from a checkout: `pip install ./workers/python "
    ".`), or run the service from its image (docs/deploy.md)."
)
logger = logging.getLogger(__name__)


def fail(message: str, status: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(status)


def dump_stacks_on_sigusr1() -> None:
    """``kill -USR1 <pid>`` writes every thread's stack to stderr (the log): the first
    thing to look at when a process seems stuck, and it does not stop the process.

    Written by a Python signal handler, which runs in the main thread with the GIL held,
    in faulthandler's format. faulthandler itself reads the other threads' frames while
    they run: under load that crashed the very process it was asked to show (a
    segfault in its ``dump_traceback``, seen twice in the service's test of this)."""
    import signal

    signal.signal(signal.SIGUSR1, _write_stacks)


def _write_stacks(_signum: int, _frame: object) -> None:
    import os
    import sys
    import threading
    from types import FrameType

    names = {thread.ident: thread.name for thread in threading.enumerate()}
    lines: list[str] = []
    for ident, frame in sys._current_frames().items():
        lines.append(f"Thread {ident:#x} ({names.get(ident, '?')}, most recent call first):")
        current: FrameType | None = frame
        while current is not None:
            code = current.f_code
            lines.append(f'  File "{code.co_filename}", line {current.f_lineno} in {code.co_name}')
            current = current.f_back
        lines.append("")
    # To the descriptor, not sys.stderr: the handler may have interrupted a write to it.
    # A write to a pipe may take part of a long dump: the rest goes after it.
    dump = memoryview("\n".join(lines).encode(errors="replace") + b"\n")
    while dump:
        dump = dump[os.write(2, dump) :]


def configure_logging(
    level_name: str, node: str, logfile: str | None = None, log_format: str | None = None
) -> None:
    from . import _logging

    try:
        _logging.configure(level_name, node, logfile, log_format)
    except ValueError as exc:
        raise fail(str(exc)) from None
    except OSError as exc:
        raise fail(f"cannot open the log file: {exc}", 1) from None


@cli.command()
def worker(
    app: Annotated[str, typer.Option("--app", "-A", help="The Celeriac app: module:attribute.")],
    server: Annotated[
        str | None,
        typer.Option(help="Service URL (default: $CELERIAC_SERVER_URL or http://127.0.0.1:8000)."),
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option("--concurrency", "-c", min=1, help="Jobs at once (default: CPUs).")
    ] = None,
    queues: Annotated[
        str, typer.Option("--queues", "-Q", help="Comma-separated, in priority order.")
    ] = "default",
    loglevel: Annotated[str, typer.Option("--loglevel", "-l")] = "info",
    lease_seconds: Annotated[
        float | None,
        typer.Option(
            min=0.1, help="Lease length (default: the job's timeout, else the service's)."
        ),
    ] = None,
    hostname: Annotated[
        str | None, typer.Option("--hostname", "-n", help="Worker name (default: pid@host).")
    ] = None,
    poll_wait: Annotated[
        float,
        typer.Option(
            min=0,
            max=30,
            help="Long-poll seconds; also the longest a warm shutdown waits for the poll.",
        ),
    ] = 10.0,
    pidfile: Annotated[
        str | None,
        typer.Option(
            help="Write the pid here; refuse to start if it names a running worker. "
            "Placeholders: %n node, %h node@host, %d domain, %i/%I process index."
        ),
    ] = None,
    logfile: Annotated[
        str | None,
        typer.Option(
            help="Append the log here, not to stderr (same placeholders; SIGHUP reopens)."
        ),
    ] = None,
    pool: Annotated[
        str,
        typer.Option(
            "--pool", "-P", help="threads, processes (CPU-bound), async or solo (docs/python.md)."
        ),
    ] = "threads",
    broker: Annotated[
        str | None,
        typer.Option(help="Lease straight from Redis (redis://host:port/db) instead of HTTP."),
    ] = None,
    redis_prefix: Annotated[
        str, typer.Option(help="The service's CELERIAC_REDIS_PREFIX (with --broker).")
    ] = "celeriac",
    soft_time_limit: Annotated[
        float | None,
        typer.Option(min=0.001, help="Seconds; then SoftTimeLimitExceeded in the task."),
    ] = None,
    time_limit: Annotated[
        float | None,
        typer.Option(min=0.001, help="Seconds; then the job is stopped (TimeLimitExceeded)."),
    ] = None,
    max_tasks_per_child: Annotated[
        int, typer.Option(min=0, help="processes pool: replace a child after N jobs (0: never).")
    ] = 0,
    max_memory_per_child: Annotated[
        int,
        typer.Option(min=0, help="processes pool: replace a child above this many KB resident."),
    ] = 0,
    prefetch_multiplier: Annotated[
        int,
        typer.Option(
            min=1,
            help="Hold up to concurrency x N leased jobs (1: no prefetch, for long jobs).",
        ),
    ] = 4,
    log_format: Annotated[
        str | None,
        typer.Option(
            help="text or json: one JSON object per line (default: "
            "$CELERIAC_LOG_FORMAT, else text)."
        ),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=0, max=65535, help="Serve this worker's Prometheus metrics on this port (/metrics)."
        ),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option(help="Address for --metrics-port (0.0.0.0 in a container).")
    ] = "127.0.0.1",
) -> None:
    """Run a worker for the app's tasks (API key: $CELERIAC_API_KEY)."""
    from . import _daemon
    from ._loader import AppNotFound, load_app
    from .worker import Worker

    node = _daemon.default_node_name(hostname)
    configure_logging(loglevel, node, logfile and _daemon.expand_path(logfile, node), log_format)
    pidfile = pidfile and _daemon.expand_path(pidfile, node)
    try:
        _daemon.check_pidfile(pidfile)  # before importing the app: refuse fast
    except _daemon.PidfileBusy as exc:
        raise fail(str(exc), 1) from None
    try:
        celeriac_app = load_app(app)
    except AppNotFound as exc:
        raise fail(str(exc)) from None
    if server:
        celeriac_app.configure(server=server)
    queue_names = [name.strip() for name in queues.split(",") if name.strip()]
    try:
        the_worker = Worker(
            celeriac_app, queues=queue_names or ["default"], concurrency=concurrency,
            lease_seconds=lease_seconds, hostname=node, poll_wait=poll_wait, pool=pool,
            broker=broker, redis_prefix=redis_prefix, soft_time_limit=soft_time_limit,
            time_limit=time_limit, max_tasks_per_child=max_tasks_per_child,
            max_memory_per_child=max_memory_per_child, app_spec=app,
            prefetch_multiplier=prefetch_multiplier, metrics_port=metrics_port,
            metrics_host=metrics_host,
        )  # fmt: skip
    except ValueError as exc:  # an unknown pool, a broker that is not Redis
        raise fail(str(exc)) from None
    except OSError as exc:  # --metrics-port taken
        raise fail(f"cannot serve metrics on {metrics_host}:{metrics_port}: {exc}", 1) from None
    dump_stacks_on_sigusr1()
    try:
        status = _daemon.run_with_pidfile(pidfile, the_worker.run)
    except _daemon.PidfileBusy as exc:
        raise fail(str(exc), 1) from None
    raise typer.Exit(status)


@cli.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    no_args_is_help=True,
)
def multi(
    ctx: typer.Context,
    action: Annotated[
        str, typer.Argument(help="start, stop, stopwait, restart, kill, show or names.")
    ],
    pidfile: Annotated[
        str | None, typer.Option(help="Each node's pidfile (default: %n.pid).")
    ] = None,
    logfile: Annotated[
        str | None, typer.Option(help="Each node's log file (default: %n%I.log).")
    ] = None,
    timeout: Annotated[
        float, typer.Option(min=0, help="Seconds start/stop wait for each node.")
    ] = 60.0,
) -> None:
    """Run worker nodes in the background: ACTION, the node names, then any worker
    options, e.g. `celeriac multi start w1 w2 -A proj.tasks -l warning`. Node w1 is
    w1@this-host; stop and restart need only the names (and the same --pidfile). See
    docs/python.md."""
    from ._multi import MultiError, run_multi

    try:
        status = run_multi(ctx, action, pidfile=pidfile, logfile=logfile, timeout=timeout)
    except MultiError as exc:
        raise fail(str(exc)) from None
    raise typer.Exit(status)


def _command_names() -> set[str]:
    return {
        info.name or getattr(info.callback, "__name__", "").replace("_", "-")
        for info in cli.registered_commands
    }


def _server_missing(name: str, reason: str = "") -> None:
    """A stand-in for a server command: a message and exit status 2, whatever the
    arguments (hidden from --help, which lists only what works here)."""

    @cli.command(
        name,
        hidden=True,
        add_help_option=False,
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )
    def missing(ctx: typer.Context) -> None:
        raise fail(SERVER_MISSING.format(name=name) + reason)


@functools.cache  # once per process, however often main() runs
def load_plugins() -> None:
    """Add the commands of every installed ``celeriac.commands`` plugin (the server's
    serve/migrate/demo), then stand-ins for server commands nobody provided. A plugin
    that fails to load costs only its own commands: the worker still runs."""
    import importlib.metadata

    reason = ""
    for entry_point in importlib.metadata.entry_points(group=COMMANDS_GROUP):
        try:
            entry_point.load()(cli)
        except Exception as exc:  # a broken server install must not stop the worker
            reason = f" (the installed plugin {entry_point.value} failed to load: {exc})"
            logger.debug("celeriac.commands plugin %s failed", entry_point.value, exc_info=True)
    for name in SERVER_COMMANDS:
        if name not in _command_names():
            _server_missing(name, reason)


def main() -> None:
    # A command of this SDK's own (`celeriac worker`, every node's start) needs no plugin:
    # finding them reads every installed distribution's metadata.
    if not _own_command(sys.argv[1:2]):
        load_plugins()
    cli()


def _own_command(first: list[str]) -> bool:
    own = _command_names() | {info.name for info in cli.registered_groups}
    return bool(first) and first[0] in own - set(SERVER_COMMANDS)
