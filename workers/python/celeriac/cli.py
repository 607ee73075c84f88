"""The ``celeriac`` command: run the service, run workers, submit and inspect jobs.

The service is imported only inside the commands that run it, so the worker and the
client commands start fast and work without its dependencies configured.
"""

from __future__ import annotations

import ipaddress
import logging
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

LOG_FORMAT = "[%(asctime)s %(levelname)s/%(threadName)s] %(name)s: %(message)s"


def _fail(message: str, status: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(status)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def configure_logging(level_name: str) -> None:
    level = logging.getLevelNamesMapping().get(level_name.upper())
    if level is None:
        raise _fail(f"unknown log level {level_name!r} (debug, info, warning, error)")
    logging.basicConfig(level=level, format=LOG_FORMAT)
    # httpx logs every request at INFO: one line per lease/report call is noise.
    logging.getLogger("httpx").setLevel(max(level, logging.WARNING))
    logging.getLogger("httpcore").setLevel(max(level, logging.WARNING))


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
) -> None:
    """Run the HTTP service (settings from CELERIAC_* environment variables)."""
    import uvicorn

    from service.settings import Settings

    settings = Settings()
    try:
        auth_enabled = settings.auth_enabled
    except ValueError as exc:
        raise _fail(str(exc)) from None
    if not (auth_enabled or insecure or _is_loopback(host)):
        raise _fail(
            f"refusing to listen on {host} without API keys: anyone who can reach it could "
            "run jobs. Set CELERIAC_API_KEYS, listen on 127.0.0.1, or pass --insecure."
        )
    if settings.database_url.startswith("sqlite") if migrate is None else migrate:
        from service.migrate import upgrade

        upgrade(settings.database_url)
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=(log_level or settings.log_level).lower(),
        access_log=False,
    )


@cli.command()
def migrate(
    downgrade: Annotated[
        str | None, typer.Option(help="Go down to this revision instead, e.g. base.")
    ] = None,
) -> None:
    """Upgrade the database schema (CELERIAC_DATABASE_URL) to the latest revision."""
    from service import migrate as migrations
    from service.settings import Settings

    database_url = Settings().database_url
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
) -> None:
    """Run a worker for the app's tasks (API key: $CELERIAC_API_KEY)."""
    from ._loader import AppNotFound, load_app
    from .worker import Worker

    configure_logging(loglevel)
    try:
        celeriac_app = load_app(app)
    except AppNotFound as exc:
        raise _fail(str(exc)) from None
    if server:
        celeriac_app.configure(server=server)
    queue_names = [name.strip() for name in queues.split(",") if name.strip()]
    the_worker = Worker(
        celeriac_app, queues=queue_names or ["default"], concurrency=concurrency,
        lease_seconds=lease_seconds, hostname=hostname, poll_wait=poll_wait,
    )  # fmt: skip
    raise typer.Exit(the_worker.run())


@cli.command()
def demo() -> None:
    """Start a throwaway service and worker, run a few jobs, and show what happens."""
    from ._demo import run_demo

    raise typer.Exit(run_demo())


def main() -> None:
    cli()
