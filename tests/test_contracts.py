"""The contracts that must not drift: the committed OpenAPI document against the code,
and the Alembic migrations against the SQLAlchemy models, on every database we run."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import IN_CI, REPO, child_env, fresh_database

pytestmark = pytest.mark.timeout(120)

OPENAPI = REPO / "openapi" / "openapi.json"


def run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        cwd=REPO,
        env=child_env(env or {}),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


# --- OpenAPI ----------------------------------------------------------------------------


def test_openapi_export_check_passes() -> None:
    done = run([sys.executable, "-m", "service.openapi_export", "--check"])
    assert done.returncode == 0, (
        "openapi/openapi.json is out of date: run `make openapi` and commit it\n"
        f"{done.stdout}{done.stderr}"
    )


def test_generated_schema_equals_the_committed_one() -> None:
    from service.openapi_export import render

    generated = json.loads(render())
    committed = json.loads(OPENAPI.read_text())
    if generated != committed:
        pytest.fail(
            "openapi/openapi.json differs from the code (run `make openapi`); "
            f"what differs: {differences(generated, committed)}"
        )


def differences(new: object, old: object, where: str = "", depth: int = 0) -> list[str]:
    """Where two JSON documents differ, down to a few levels (for a readable failure)."""
    if new == old:
        return []
    if depth >= 3 or not (isinstance(new, dict) and isinstance(old, dict)):
        return [where or "/"]
    found: list[str] = []
    for key in sorted(set(new) | set(old)):
        if key not in old:
            found.append(f"{where}/{key} (added)")
        elif key not in new:
            found.append(f"{where}/{key} (removed)")
        else:
            found += differences(new[key], old[key], f"{where}/{key}", depth + 1)
    return found


def test_openapi_document_is_a_valid_spec() -> None:
    try:
        from openapi_spec_validator import validate
    except ImportError:
        if IN_CI:
            pytest.fail("openapi-spec-validator is not installed (it is a dev dependency)")
        pytest.skip("openapi-spec-validator is not installed")
    validate(json.loads(OPENAPI.read_text()))


def test_openapi_documents_every_route_and_problem() -> None:
    """Every error a route can answer is documented as application/problem+json."""
    spec = json.loads(OPENAPI.read_text())
    expected = {
        ("post", "/jobs"),
        ("post", "/jobs/batch"),
        ("get", "/jobs/{job_id}"),
        ("get", "/jobs"),
        ("post", "/jobs/{job_id}/cancel"),
        ("post", "/jobs/{job_id}/retry"),
        ("post", "/leases"),
        ("post", "/jobs/{job_id}/heartbeat"),
        ("post", "/jobs/{job_id}/complete"),
        ("post", "/jobs/{job_id}/fail"),
        ("post", "/jobs/{job_id}/release"),
        ("post", "/leases/heartbeat"),
        ("post", "/leases/report"),
        ("get", "/queues"),
        ("get", "/healthz"),
        ("get", "/readyz"),
    }
    present = {(method, path) for path, item in spec["paths"].items() for method in item}
    assert expected <= present, sorted(expected - present)
    for method, path in expected - {("get", "/healthz"), ("get", "/readyz"), ("get", "/queues")}:
        responses = spec["paths"][path][method]["responses"]
        assert "404" in responses or path in ("/jobs", "/jobs/batch", "/leases"), (method, path)
        for status in ("400", "409", "413", "422"):
            assert status in responses, (method, path, status)
            assert "application/problem+json" in responses[status]["content"], (method, path)
    submit = spec["components"]["schemas"]["JobSubmit"]
    assert submit.get("additionalProperties") is False


# --- Alembic ----------------------------------------------------------------------------


def alembic(args: list[str], url: str) -> subprocess.CompletedProcess[str]:
    """The alembic CLI as a user runs it: the URL from CELERIAC_DATABASE_URL."""
    return run(
        [sys.executable, "-m", "alembic", "-c", str(REPO / "alembic.ini"), *args],
        {"CELERIAC_DATABASE_URL": url},
    )


def tables(url: str) -> set[str]:
    from service.db import create_engine

    engine = create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


@pytest.mark.parametrize("database", ["sqlite", "postgres", "mariadb"])
def test_migrations_up_down_up_and_no_drift(database: str, tmp_path: Path) -> None:
    from service.migrate import downgrade, upgrade

    with fresh_database(database, tmp_path) as url:
        upgrade(url)
        assert {"jobs", "alembic_version"} <= tables(url)
        downgrade(url, "base")
        assert tables(url) <= {"alembic_version"}, "downgrade base left tables behind"
        upgrade(url, "head")
        assert "jobs" in tables(url)
        assert revision(url) == head_revision()
        done = alembic(["check"], url)
        assert done.returncode == 0, f"models and migrations differ:\n{done.stdout}{done.stderr}"
        assert "No new upgrade operations detected" in done.stdout + done.stderr


def revision(url: str) -> str | None:
    from service.db import create_engine

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    from service.migrate import alembic_config

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def test_migrations_emit_no_warnings(tmp_path: Path) -> None:
    """``celeriac migrate`` runs this; it must be warning-free (alembic >= 1.16 warns
    when alembic.ini has no ``path_separator``, for one)."""
    from service.migrate import upgrade

    with fresh_database("sqlite", tmp_path) as url, warnings.catch_warnings():
        warnings.simplefilter("error")
        upgrade(url)
