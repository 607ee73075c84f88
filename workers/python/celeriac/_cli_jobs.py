"""``celeriac jobs ...``: submit and inspect jobs from the shell; every answer is
printed as JSON, every error as one line on stderr with exit status 1."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer

from .client import Client, Job, SubmitOptions
from .errors import CeleriacError, ServerUnreachable

jobs = typer.Typer(help="Submit and inspect jobs (answers are printed as JSON).")

Server = Annotated[
    str | None,
    typer.Option(envvar="CELERIAC_SERVER_URL", help="Service URL (default: http://127.0.0.1:8000)"),
]
JobId = Annotated[str, typer.Argument(help="The job's id.")]
Wait = Annotated[
    float | None, typer.Option(min=0, help="Wait up to this many seconds for it to finish.")
]


def _print(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False))


@contextmanager
def _client(server: str | None, timeout: float = 30.0) -> Iterator[Client]:
    """A client whose errors end the command with a readable message. The API key
    comes from $CELERIAC_API_KEY only: on the command line it would show up in ps."""
    try:
        with Client(server, timeout=timeout) as client:
            yield client
    except CeleriacError as exc:
        typer.echo(f"error: {exc}", err=True)
        errors = exc.errors or []
        if len(errors) > 1:  # the detail already tells the first one
            for error in errors:
                typer.echo(f"  {error.get('location')}: {error.get('message')}", err=True)
        raise typer.Exit(1) from None
    except ServerUnreachable as exc:
        typer.echo(f"error: cannot reach the service: {exc}", err=True)
        raise typer.Exit(1) from None


def _wait_or_current(client: Client, job_id: str, seconds: float) -> Job:
    try:
        return client.wait(job_id, timeout=seconds)
    except TimeoutError:
        return client.get(job_id)


def _json_argument(text: str, kind: type, option: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint=option) from None
    if not isinstance(value, kind):
        raise typer.BadParameter(f"must be a JSON {kind.__name__}", param_hint=option)
    return value


@jobs.command()
def submit(
    task: Annotated[str, typer.Argument(help="Task name, e.g. math.add.")],
    args: Annotated[str, typer.Option(help="Positional arguments, a JSON array.")] = "[]",
    kwargs: Annotated[str, typer.Option(help="Keyword arguments, a JSON object.")] = "{}",
    queue: Annotated[str | None, typer.Option(help="Queue (default: default).")] = None,
    priority: Annotated[int | None, typer.Option(min=0, max=9, help="0-9, higher first.")] = None,
    delay: Annotated[float | None, typer.Option(min=0, help="Seconds before it may run.")] = None,
    wait: Wait = None,
    server: Server = None,
) -> None:
    """Submit a job and print it (finished, with --wait, if it finishes in time)."""
    options = SubmitOptions()
    if queue is not None:
        options["queue"] = queue
    if priority is not None:
        options["priority"] = priority
    if delay is not None:
        options["delay"] = delay
    call_args = _json_argument(args, list, "--args")
    call_kwargs = _json_argument(kwargs, dict, "--kwargs")
    with _client(server) as client:
        job = client.submit(task, call_args, call_kwargs, **options)
        _print(_wait_or_current(client, job["id"], wait) if wait else job)


@jobs.command()
def get(
    job_id: JobId,
    wait: Wait = None,
    server: Server = None,
) -> None:
    """Print a job."""
    with _client(server) as client:
        _print(_wait_or_current(client, job_id, wait) if wait else client.get(job_id))


@jobs.command(name="list")
def list_jobs(
    status: Annotated[str | None, typer.Option(help="Only jobs in this status.")] = None,
    queue: Annotated[str | None, typer.Option(help="Only jobs in this queue.")] = None,
    task: Annotated[str | None, typer.Option(help="Only jobs of this task.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 50,
    server: Server = None,
) -> None:
    """Print the newest jobs (and the cursor of the next page)."""
    with _client(server) as client:
        _print(client.list(status=status, queue=queue, task=task, limit=limit))


# --- one job by id, or every job a filter selects (POST /jobs/bulk) ----------------------------

MaybeJobId = Annotated[
    str | None, typer.Argument(help="The job's id (or select jobs with the options).")
]
Statuses = Annotated[
    list[str] | None, typer.Option("--status", help="Only jobs in this status (repeatable).")
]
QueueFilter = Annotated[str | None, typer.Option("--queue", help="Only jobs in this queue.")]
TaskFilter = Annotated[str | None, typer.Option("--task", help="Only jobs of this task.")]
FinishedBefore = Annotated[
    str | None,
    typer.Option(
        "--finished-before",
        help="Only jobs that finished before this instant (RFC 3339, e.g. "
        "2026-01-31T00:00:00Z) or this long ago (30m, 12h, 7d).",
    ),
]
# A bulk action runs batch after batch in one request: give it time.
BULK_TIMEOUT = 3600.0
_AGO = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _instant(text: str) -> str:
    """RFC 3339 as given, or ``<n><unit>`` ago as RFC 3339 (UTC)."""
    unit = text[-1:].lower()
    if unit in _AGO and text[:-1].replace(".", "", 1).isdigit():
        seconds = float(text[:-1]) * _AGO[unit]
        return (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat()
    try:
        datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(
            "give an RFC 3339 instant or an age such as 30m, 12h, 7d",
            param_hint="--finished-before",
        ) from None
    return text


def bulk_filter(
    status: list[str] | None,
    queue: str | None,
    task: str | None,
    finished_before: str | None,
    ids: list[str] | None = None,
) -> dict[str, Any]:
    """The ``filter`` of ``POST /jobs/bulk`` from the command's options."""
    chosen: dict[str, Any] = {}
    if status:
        chosen["status"] = status
    if queue is not None:
        chosen["queue"] = queue
    if task is not None:
        chosen["task"] = task
    if finished_before is not None:
        chosen["finished_before"] = _instant(finished_before)
    if ids:
        chosen["ids"] = ids
    return chosen


def _one_or_bulk(action: str, job_id: str | None, server: str | None, **options: Any) -> None:
    chosen = bulk_filter(**options)
    if job_id is not None and chosen:
        raise typer.BadParameter("give a job id or filter options, not both")
    if job_id is None and not chosen:
        raise typer.BadParameter(
            "give a job id, or select jobs with --status, --queue, --task or --finished-before"
        )
    with _client(server, BULK_TIMEOUT) as client:
        if job_id is None:
            _print(client.bulk(action, **chosen))
        elif action == "cancel":
            _print(client.cancel(job_id))
        elif action == "retry":
            _print(client.retry(job_id))
        else:
            _print(client.bulk(action, ids=[job_id]))


@jobs.command()
def cancel(
    job_id: MaybeJobId = None,
    status: Statuses = None,
    queue: QueueFilter = None,
    task: TaskFilter = None,
    server: Server = None,
) -> None:
    """Cancel a job, or every unfinished job the options select: waiting ones never run,
    running ones are asked to stop. A bulk action prints {"matched", "changed"}."""
    _one_or_bulk("cancel", job_id, server, status=status, queue=queue, task=task,
                 finished_before=None)  # fmt: skip


@jobs.command()
def retry(
    job_id: MaybeJobId = None,
    status: Statuses = None,
    queue: QueueFilter = None,
    task: TaskFilter = None,
    finished_before: FinishedBefore = None,
    server: Server = None,
) -> None:
    """Queue a failed, cancelled or expired job again, or every such job the options select."""
    _one_or_bulk("retry", job_id, server, status=status, queue=queue, task=task,
                 finished_before=finished_before)  # fmt: skip


@jobs.command()
def delete(
    job_id: MaybeJobId = None,
    status: Statuses = None,
    queue: QueueFilter = None,
    task: TaskFilter = None,
    finished_before: FinishedBefore = None,
    server: Server = None,
) -> None:
    """Delete a finished job, or every finished job the options select (with their results,
    webhook deliveries and logs)."""
    _one_or_bulk("delete", job_id, server, status=status, queue=queue, task=task,
                 finished_before=finished_before)  # fmt: skip
