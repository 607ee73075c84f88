"""``celeriac jobs ...``: submit and inspect jobs from the shell; every answer is
printed as JSON, every error as one line on stderr with exit status 1."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
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
def _client(server: str | None) -> Iterator[Client]:
    """A client whose errors end the command with a readable message. The API key
    comes from $CELERIAC_API_KEY only: on the command line it would show up in ps."""
    try:
        with Client(server) as client:
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


@jobs.command()
def cancel(job_id: JobId, server: Server = None) -> None:
    """Cancel a job: waiting ones never run, a running one is asked to stop."""
    with _client(server) as client:
        _print(client.cancel(job_id))


@jobs.command()
def retry(job_id: JobId, server: Server = None) -> None:
    """Queue a failed, cancelled or expired job again."""
    with _client(server) as client:
        _print(client.retry(job_id))
