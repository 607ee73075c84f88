"""``celeriac queues purge``: cancel a whole queue's waiting jobs (registered in the
``queues`` group of cli_flow.py by cli.py); the answer is printed as JSON."""

from __future__ import annotations

from typing import Annotated

import typer

from ._cli_jobs import BULK_TIMEOUT, Server, _client, _print

QueueName = Annotated[str, typer.Argument(help="The queue's name.")]
# What a purge cancels: every job of the queue that has not started.
WAITING = ["scheduled", "queued", "retrying"]


def purge(
    name: QueueName,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    server: Server = None,
) -> None:
    """Cancel every job of the queue that has not started (scheduled, queued, retrying);
    running jobs go on. Prints {"matched", "changed"}."""
    if not yes:
        typer.confirm(
            f"Cancel every waiting job of queue {name!r} (scheduled, queued, retrying)?",
            abort=True,
        )
    with _client(server, BULK_TIMEOUT) as client:
        _print(client.bulk("cancel", queue=name, status=WAITING))
