"""The service's commands: ``celeriac serve``, ``migrate`` and ``demo``.

The ``celeriac`` command itself is the worker SDK's (celeriac.cli); this distribution
plugs these in through the ``celeriac.commands`` entry point (pyproject.toml), so a
worker machine installs the SDK alone. The service is imported only inside the commands,
so ``celeriac worker`` on a machine that has both still starts fast.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated

import typer
from celeriac.cli import dump_stacks_on_sigusr1, fail


def register(cli: typer.Typer) -> None:
    """The ``celeriac.commands`` entry point: add the service's commands to ``cli``."""
    cli.command()(serve)
    cli.command()(migrate)
    cli.command()(demo)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


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
    log_format: Annotated[
        str | None,
        typer.Option(
            help="text, or json: one JSON object per line (default: $CELERIAC_LOG_FORMAT or text)."
        ),
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
        raise fail(str(exc)) from None
    if not (auth_enabled or insecure or _is_loopback(host)):
        raise fail(
            f"refusing to listen on {host} without API keys: anyone who can reach it could "
            "run jobs. Set CELERIAC_API_KEYS, listen on 127.0.0.1, or pass --insecure."
        )
    from service.logs import FORMATS

    chosen_format = (log_format or settings.log_format).lower()
    if chosen_format not in FORMATS:
        raise fail(f"unknown log format {chosen_format!r} (text or json)")
    if settings.database_url.startswith("sqlite") if migrate is None else migrate:
        from service.migrate import upgrade, wait_for_database

        wait_for_database(settings.database_url, 60.0)  # compose may start us first
        upgrade(settings.database_url)
    dump_stacks_on_sigusr1()
    from uvicorn.config import LOGGING_CONFIG

    from service.http_server import BoundedHttpToolsProtocol
    from service.logs import uvicorn_log_config

    level = (log_level or settings.log_level).lower()
    json_logs = uvicorn_log_config(level, chosen_format)

    uvicorn.run(
        "service.app:create_app",
        factory=True,
        http=BoundedHttpToolsProtocol,  # httptools, with a cap on the request head
        loop=_event_loop(),
        # Nothing reads the client's address, so the middleware that rewrites it from
        # X-Forwarded-For on every request is left out.
        proxy_headers=False,
        host=host,
        port=port,
        workers=workers,
        log_level=level,
        log_config=json_logs or LOGGING_CONFIG,  # JSON lines, or uvicorn's default
        access_log=False,
        # Beyond this many connections (idle keep-alives included) or requests in flight,
        # uvicorn answers 503 at once instead of letting a flood exhaust memory. Above the
        # long-poll cap, so capped long-polls still get their quick Retry-After answer.
        limit_concurrency=limit_concurrency
        or settings.limit_concurrency
        or settings.max_long_polls + 1000,
        # An idle kept-alive connection is closed after this (uvicorn's default, explicit).
        timeout_keep_alive=5,
        # At SIGTERM/SIGINT, long-polls (leases, ?wait=) answer at once with what they
        # have (service/app.py, drain_on_stop_signal); any other request still running
        # after this is cut off.
        timeout_graceful_shutdown=3,
    )


def _event_loop() -> str:
    """uvloop when it is installed (the service's dependencies include it): its event loop
    and transports cost about half of asyncio's per request."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


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


def demo() -> None:
    """Start a throwaway service and worker, run a few jobs, and show what happens."""
    from .demo import run_demo

    raise typer.Exit(run_demo())
