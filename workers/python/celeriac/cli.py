"""The ``celeriac`` command: run the service, run workers, submit and inspect jobs.

The service is imported only inside the commands that run it, so the worker and the
client commands start fast and work without its dependencies configured.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated

import typer

from ._cli_jobs import jobs
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


def _fail(message: str, status: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(status)


def _dump_stacks_on_sigusr1() -> None:
    """``kill -USR1 <pid>`` writes every thread's stack to stderr (the log): the first
    thing to look at when a process seems stuck, and it does not stop the process."""
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def configure_logging(level_name: str, node: str, logfile: str | None = None) -> None:
    from . import _logging

    try:
        _logging.configure(level_name, node, logfile)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"cannot open the log file: {exc}", 1) from None


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Service processes.")] = 1,
    insecure: Annotated[
        bool, typer.Option(help="Allow a non-loopback address without API keys.")
    ] = False,
    log_level: Annotated[
        str | None, typer.Option(help="(default: $CELERIAC_LOG_LEVEL or info)")
    ] = None,
    migrate: Annotated[
        bool | None,
        typer.Option(
            "--migrate/--no-migrate", help="Upgrade the schema first (default: on for SQLite)."
        ),
    ] = None,
    limit_concurrency: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Connections per process beyond which requests get 503 (default: "
            "$CELERIAC_LIMIT_CONCURRENCY, else CELERIAC_MAX_LONG_POLLS + 1000).",
        ),
    ] = None,
) -> None:
    """Run the HTTP service (settings from CELERIAC_* environment variables)."""
    import uvicorn

    from service.settings import Settings

    try:  # a bad setting (placeholder or short API keys…) is a message, not a traceback
        settings = Settings()
        auth_enabled = settings.auth_enabled
    except ValueError as exc:
        raise _fail(str(exc)) from None
    if not (auth_enabled or insecure or _is_loopback(host)):
        raise _fail(
            f"refusing to listen on {host} without API keys: anyone who can reach it could "
            "run jobs. Set CELERIAC_API_KEYS, listen on 127.0.0.1, or pass --insecure."
        )
    if settings.database_url.startswith("sqlite") if migrate is None else migrate:
        from service.migrate import upgrade, wait_for_database

        wait_for_database(settings.database_url, 60.0)  # compose may start us first
        upgrade(settings.database_url)
    _dump_stacks_on_sigusr1()
    from service.http_server import BoundedHttpToolsProtocol

    uvicorn.run(
        "service.app:create_app",
        factory=True,
        http=BoundedHttpToolsProtocol,  # httptools, with a cap on the request head
        host=host,
        port=port,
        workers=workers,
        log_level=(log_level or settings.log_level).lower(),
        access_log=False,
        # Beyond this many connections (idle keep-alives included) or requests in flight,
        # uvicorn answers 503 at once instead of letting a flood exhaust memory. Above the
        # long-poll cap, so capped long-polls still get their quick Retry-After answer.
        limit_concurrency=limit_concurrency
        or settings.limit_concurrency
        or settings.max_long_polls + 1000,
        # An idle kept-alive connection is closed after this (uvicorn's default, explicit).
        timeout_keep_alive=5,
        # Long-polls (leases, ?wait=) may hold a request for up to a minute; at shutdown
        # their workers get a dropped connection after this, and simply lease again.
        timeout_graceful_shutdown=3,
    )


@cli.command()
def migrate(
    downgrade: Annotated[
        str | None, typer.Option(help="Go down to this revision instead, e.g. base.")
    ] = None,
    wait: Annotated[
        float,
        typer.Option(min=0, help="Seconds to wait for an unreachable database to come up."),
    ] = 60.0,
) -> None:
    """Upgrade the database schema (CELERIAC_DATABASE_URL) to the latest revision."""
    from service import migrate as migrations
    from service.settings import Settings

    database_url = Settings().database_url
    migrations.wait_for_database(database_url, wait)
    if downgrade:
        migrations.downgrade(database_url, downgrade)
    else:
        migrations.upgrade(database_url)


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
) -> None:
    """Run a worker for the app's tasks (API key: $CELERIAC_API_KEY)."""
    from . import _daemon
    from ._loader import AppNotFound, load_app
    from .worker import Worker

    node = _daemon.default_node_name(hostname)
    configure_logging(loglevel, node, logfile and _daemon.expand_path(logfile, node))
    pidfile = pidfile and _daemon.expand_path(pidfile, node)
    try:
        _daemon.check_pidfile(pidfile)  # before importing the app: refuse fast
    except _daemon.PidfileBusy as exc:
        raise _fail(str(exc), 1) from None
    try:
        celeriac_app = load_app(app)
    except AppNotFound as exc:
        raise _fail(str(exc)) from None
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
            prefetch_multiplier=prefetch_multiplier,
        )  # fmt: skip
    except ValueError as exc:  # an unknown pool, a broker that is not Redis
        raise _fail(str(exc)) from None
    _dump_stacks_on_sigusr1()
    try:
        status = _daemon.run_with_pidfile(pidfile, the_worker.run)
    except _daemon.PidfileBusy as exc:
        raise _fail(str(exc), 1) from None
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
        raise _fail(str(exc)) from None
    raise typer.Exit(status)


@cli.command()
def demo() -> None:
    """Start a throwaway service and worker, run a few jobs, and show what happens."""
    from ._demo import run_demo

    raise typer.Exit(run_demo())


def main() -> None:
    cli()
