"""``celeriac queues ...`` and ``celeriac limits ...``: flow control over the HTTP API
(docs/flow-control.md; an admin key to change anything). Answers are printed as JSON,
errors as one line on stderr with exit status 1."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ._cli_jobs import Server, _client, _print

queues = typer.Typer(help="Queue settings: pause, resume, a queue's own limits.")
limits = typer.Typer(help="Named limits and patterns (customer-*) that jobs count against.")

QueueName = Annotated[str, typer.Argument(help="The queue's name.")]
LimitName = Annotated[str, typer.Argument(help="The limit's name; a pattern ends in *.")]


def _rate(rate: str | None) -> dict[str, Any] | None:
    """``100/60``: 100 grants per 60 seconds."""
    if rate is None:
        return None
    count, _, period = rate.partition("/")
    try:
        return {"limit": int(count), "period": float(period or "1")}
    except ValueError:
        raise typer.BadParameter("--rate is LIMIT/SECONDS, e.g. 100/60") from None


@queues.command()
def show(name: QueueName, server: Server = None) -> None:
    """Print a queue's settings and counts."""
    with _client(server) as client:
        _print(client.request("GET", f"/queues/{name}"))


@queues.command()
def pause(name: QueueName, server: Server = None) -> None:
    """Pause a queue: it accepts jobs and leases none until resumed."""
    with _client(server) as client:
        _print(client.pause_queue(name))


@queues.command()
def resume(name: QueueName, server: Server = None) -> None:
    """Resume a paused queue; waiting workers get its jobs at once."""
    with _client(server) as client:
        _print(client.resume_queue(name))


@limits.command(name="list")
def list_limits(server: Server = None) -> None:
    """Print every limit and pattern, with the slots each holds now."""
    with _client(server) as client:
        _print(client.limits())


@limits.command(name="set")
def set_limit(
    name: LimitName,
    max_running: Annotated[int | None, typer.Option(min=1, help="Jobs running at once.")] = None,
    rate: Annotated[str | None, typer.Option(help="Grants per window: LIMIT/SECONDS.")] = None,
    server: Server = None,
) -> None:
    """Create or replace a limit (or a pattern's defaults)."""
    with _client(server) as client:
        _print(client.set_limit(name, max_running=max_running, rate=_rate(rate)))


@limits.command()
def delete(name: LimitName, server: Server = None) -> None:
    """Delete a limit."""
    with _client(server) as client:
        client.delete_limit(name)
