"""Schema migrations, run by ``celeriac migrate`` (and by ``celeriac serve`` on the
embedded SQLite default). Test databases are built only through here."""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import sqlalchemy as sa
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.orm import Session

from alembic import command
from service.db import create_engine
from service.outage import describe, is_unreachable

LOG_EVERY_SECONDS = 5.0


def _project_root() -> Path:
    """Where alembic.ini lives: the source checkout the package was imported from (an
    editable install), else the working directory (the image runs from /app)."""
    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (root / "alembic.ini").exists() and (root / "alembic" / "env.py").exists():
            return root
    raise FileNotFoundError(
        "alembic.ini and alembic/ not found in the working directory or the source "
        "checkout: run 'celeriac migrate' from the project (or image) directory"
    )


def alembic_config(database_url: str) -> Config:
    root = _project_root()
    ini = root / "alembic.ini"
    config = Config(str(ini))
    config.set_main_option("script_location", str(root / "alembic"))
    # ConfigParser interpolation would eat a '%' in a password.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)


class SchemaBehind(Exception):
    """The database has no celeriac schema, or an older one than this code needs."""


@functools.cache  # the files do not change under a running process
def script_revisions() -> tuple[frozenset[str], frozenset[str]] | None:
    """This code's migration heads and every revision it knows; None where its
    migrations are not at hand (then nothing is checked). Reads files: not at import."""
    try:
        script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    except FileNotFoundError:
        return None
    known = frozenset(revision.revision for revision in script.walk_revisions())
    return frozenset(script.get_heads()), known


def schema_problem(session: Session, heads: frozenset[str], known: frozenset[str]) -> str | None:
    """Why this code cannot serve the database's schema, or None. A revision this code does
    not know is a later release's (a rolling deploy migrates before it replaces the old
    replicas, and migrations only add): that schema is served."""
    current = frozenset(MigrationContext.configure(session.connection()).get_current_heads())
    if not current:
        return "the database has no celeriac schema: run `celeriac migrate`"
    if current != heads and current <= known:
        return (f"the database's schema is at {', '.join(sorted(current))}, this service needs"
                f" {', '.join(sorted(heads))}: run `celeriac migrate`")  # fmt: skip
    return None


def wait_for_database(database_url: str, timeout: float) -> None:
    """Wait up to ``timeout`` seconds for the database to accept a connection: compose
    and Kubernetes start ``celeriac migrate`` beside a database that may still be
    starting. Only an unreachable database is waited for; a refusal (a missing database,
    say) fails at once, and so does the last attempt once the time is up."""
    if database_url.startswith("sqlite"):
        return
    engine = create_engine(database_url, pool_size=1)
    deadline, delay, logged = time.monotonic() + timeout, 0.25, float("-inf")
    try:
        while True:
            try:
                with engine.connect() as connection:
                    connection.exec_driver_sql("SELECT 1")
                return
            except (sa.exc.DBAPIError, sa.exc.TimeoutError) as exc:
                if not is_unreachable(exc) or time.monotonic() + delay > deadline:
                    raise
                if time.monotonic() - logged >= LOG_EVERY_SECONDS:
                    logged = time.monotonic()
                    left = deadline - logged
                    print(
                        f"celeriac migrate: waiting for the database ({describe(exc)}); "
                        f"giving up in {left:.0f}s",
                        file=sys.stderr,
                        flush=True,
                    )
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
    finally:
        engine.dispose()
