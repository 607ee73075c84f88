"""``celeriac schedules ...``: periodic jobs over the HTTP API (admin key to change them);
answers are printed as JSON, errors as one line on stderr with exit status 1."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

import typer

from ._cli_jobs import Server, _client, _json_argument, _print

schedules = typer.Typer(help="Periodic jobs: cron or interval schedules (printed as JSON).")

ScheduleName = Annotated[str, typer.Argument(help="The schedule's name.")]


def _path(name: str) -> str:
    return f"/schedules/{quote(name, safe='')}"


def _job_template(task: str, args: str, kwargs: str, options: dict[str, Any]) -> dict[str, Any]:
    job: dict[str, Any] = {
        "task": task,
        "args": _json_argument(args, list, "--args"),
        "kwargs": _json_argument(kwargs, dict, "--kwargs"),
    }
    job.update({key: value for key, value in options.items() if value is not None})
    return job


@schedules.command(name="list")
def list_schedules(server: Server = None) -> None:
    """Print every schedule with its next and last fire."""
    with _client(server) as client:
        _print(client.request("GET", "/schedules")["schedules"])


@schedules.command()
def add(
    name: ScheduleName,
    task: Annotated[str, typer.Option(help="Task the job runs, e.g. reports.daily.")],
    cron: Annotated[
        str | None, typer.Option(help="Cron expression, e.g. '*/5 * * * *' or @daily.")
    ] = None,
    every: Annotated[int | None, typer.Option(min=1, help="Seconds between ticks.")] = None,
    timezone: Annotated[str, typer.Option(help="IANA zone for cron fields.")] = "UTC",
    args: Annotated[str, typer.Option(help="Positional arguments, a JSON array.")] = "[]",
    kwargs: Annotated[str, typer.Option(help="Keyword arguments, a JSON object.")] = "{}",
    queue: Annotated[str | None, typer.Option(help="Queue (default: default).")] = None,
    priority: Annotated[int | None, typer.Option(min=0, max=9)] = None,
    max_retries: Annotated[int | None, typer.Option(min=0)] = None,
    timeout: Annotated[float | None, typer.Option(help="Lease seconds of each job.")] = None,
    expires_after: Annotated[
        float | None, typer.Option(help="Expire a job not started this many seconds after.")
    ] = None,
    catch_up: Annotated[
        str, typer.Option(help="After downtime: skip, once or all missed ticks.")
    ] = "skip",
    enabled: Annotated[bool, typer.Option("--enabled/--disabled")] = True,
    server: Server = None,
) -> None:
    """Create a schedule (give --cron or --every) and print it."""
    options = {"queue": queue, "priority": priority, "max_retries": max_retries,
               "timeout": timeout, "expires_after": expires_after}  # fmt: skip
    body: dict[str, Any] = {
        "name": name,
        "timezone": timezone,
        "job": _job_template(task, args, kwargs, options),
        "catch_up": catch_up,
        "enabled": enabled,
    }
    if cron is not None:
        body["cron"] = cron
    if every is not None:
        body["every"] = every
    with _client(server) as client:
        _print(client.request("POST", "/schedules", json=body))


@schedules.command()
def remove(name: ScheduleName, server: Server = None) -> None:
    """Delete a schedule (the jobs it submitted stay)."""
    with _client(server) as client:
        client.request("DELETE", _path(name))
    typer.echo(f"removed {name}")


@schedules.command()
def trigger(name: ScheduleName, server: Server = None) -> None:
    """Submit the schedule's job now and print it."""
    with _client(server) as client:
        _print(client.request("POST", f"{_path(name)}/trigger"))
