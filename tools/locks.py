"""The dependency locks (requirements.lock, requirements-dev.lock): check and audit them.

    python tools/locks.py check requirements.lock requirements-dev.lock
    python tools/locks.py audit requirements.lock requirements-dev.lock

``check`` (stdlib only, run before the venv exists): every dependency pyproject.toml names
is pinned, and the two locks pin the same version of every package they share. It fails
with "run `make lock`" when someone added a dependency without regenerating the locks.

``audit``: known vulnerabilities in the locked versions. Where PyPI's per-release JSON
API answers, that is pip-audit in strict mode (a package it cannot look up fails the
audit: no silent "No known vulnerabilities found" when nothing was checked). Where only
the per-project API answers (as on our CI machines), the fallback checks what that API
says: advisories on each package's latest release (certain for a pin that is the latest
release, assumed for an older pin), yanked releases, and that every hash in the locks is
a file PyPI publishes for that release. If PyPI cannot be reached at all the audit fails.
Advisories accepted on purpose go into audit-ignore.txt (one id per line, with a reason).
docs/deploy.md, "Dependency audit", says what to do when it fails.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PYPI = "https://pypi.org"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")
HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")
HOW_TO_FIX = """\
What to do:
  - a fixed release exists: `make lock LOCK_ARGS='--upgrade-package NAME'`, run the tests,
    commit both locks;
  - no fix yet, or the advisory does not apply to how celeriac uses the package: add its
    id to audit-ignore.txt with a one-line reason and the date, and open an issue to
    revisit it. (docs/deploy.md, "Dependency audit")"""


@dataclass
class Pin:
    name: str
    version: str
    hashes: set[str] = field(default_factory=set)


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, Pin]:
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    for line in path.read_text().splitlines():
        match = PIN.match(line)
        if match:
            name = normalise(match[1])
            current = pins.setdefault(name, Pin(name, match[2]))
        elif not line.startswith(" "):
            current = None
        if current is not None:
            current.hashes.update(HASH.findall(line))
    return pins


def requirement_names(specs: Iterable[str]) -> set[str]:
    names = set()
    for spec in specs:
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
        if match:
            names.add(normalise(match[1]))
    return names


def declared(pyproject: Path) -> tuple[set[str], set[str]]:
    """(runtime, dev) names pyproject.toml asks for. A dependency that [tool.uv.sources]
    takes from a path in this checkout (the SDK, workers/python) is not pinned (the locks
    leave it out; it is installed from here): its own dependencies are, in its stead."""
    config = tomllib.loads(pyproject.read_text())
    project = config["project"]
    wanted = requirement_names(project["dependencies"])
    dev = requirement_names(project.get("optional-dependencies", {}).get("dev", []))
    for name, source in config.get("tool", {}).get("uv", {}).get("sources", {}).items():
        if "path" in source and normalise(name) in wanted:
            wanted.discard(normalise(name))
            wanted |= declared(pyproject.parent / source["path"] / "pyproject.toml")[0]
    return wanted, dev


def check(lock: Path, dev_lock: Path, pyproject: Path) -> list[str]:
    wanted, wanted_dev = declared(pyproject)
    runtime, dev = read_lock(lock), read_lock(dev_lock)
    problems = [f"{lock.name} lacks {name}" for name in sorted(wanted - set(runtime))]
    problems += [f"{dev_lock.name} lacks {name}" for name in sorted(wanted_dev - set(dev))]
    for name, pin in sorted(runtime.items()):
        other = dev.get(name)
        if other is None or other.version != pin.version:
            found = other.version if other else "nothing"
            problems.append(f"{lock.name} pins {name}=={pin.version}, {dev_lock.name} {found}")
    return problems


def get_json(url: str, attempts: int = 3) -> tuple[int, Any]:
    """(status, body or None); network errors are retried, then raised."""
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 (https)
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or attempt == attempts - 1:
                return exc.code, None
        except (urllib.error.URLError, TimeoutError, OSError):
            if attempt == attempts - 1:
                raise
        time.sleep(2**attempt)
    raise AssertionError("unreachable")


def read_ignored(path: Path) -> set[str]:
    if not path.exists():
        return set()
    return {
        line.split("#", 1)[0].strip()
        for line in path.read_text().splitlines()
        if line.split("#", 1)[0].strip()
    }


def version_key(version: str) -> tuple[Any, ...]:
    """Good enough to tell equal from different; only equality is decided on."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[.+-]", version))


def audit_pin(pin: Pin, index: str, ignored: set[str]) -> list[str]:
    status, body = get_json(f"{index}/pypi/{pin.name}/json")
    if status != 200 or not isinstance(body, dict):
        return [f"{pin.name}: PyPI answered {status} for the project"]
    files = body.get("releases", {}).get(pin.version)
    if not files:
        return [f"{pin.name}=={pin.version}: no such release on PyPI"]
    problems = []
    published = {f["digests"]["sha256"] for f in files}
    if pin.hashes - published:
        problems.append(f"{pin.name}=={pin.version}: the lock has hashes PyPI does not publish")
    yanked = [f for f in files if f.get("yanked")]
    if yanked:
        reason = yanked[0].get("yanked_reason") or "no reason given"
        problems.append(f"{pin.name}=={pin.version}: yanked on PyPI ({reason})")
    latest = body.get("info", {}).get("version", "")
    for advisory in body.get("vulnerabilities") or []:
        ids = {advisory.get("id", ""), *advisory.get("aliases", [])}
        if advisory.get("withdrawn") or ids & ignored:
            continue
        how = "is" if version_key(latest) == version_key(pin.version) else "assumed older than"
        fixed = ", ".join(advisory.get("fixed_in") or []) or "no fix released"
        problems.append(
            f"{pin.name}=={pin.version}: {advisory.get('id')} affects the latest release "
            f"{latest} (the pin {how} it; fixed in: {fixed}): {advisory.get('link', '')}"
        )
    return problems


def fallback_audit(pins: list[Pin], index: str, ignored: set[str]) -> list[str]:
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = pool.map(lambda pin: audit_pin(pin, index, ignored), pins)
        return [problem for problems in results for problem in problems]


def run_pip_audit(locks: list[Path], ignored: set[str]) -> int:
    command = [
        sys.executable, "-m", "pip_audit", "--strict", "--disable-pip", "--require-hashes",
        "--progress-spinner", "off",
    ]  # fmt: skip
    for lock in locks:
        command += ["-r", str(lock)]
    for advisory in sorted(ignored):
        command += ["--ignore-vuln", advisory]
    return subprocess.run(command, check=False).returncode


def audit(locks: list[Path], index: str, ignore_file: Path) -> int:
    pins: dict[str, Pin] = {}
    for lock in locks:
        for name, pin in read_lock(lock).items():
            pins.setdefault(name, Pin(name, pin.version)).hashes.update(pin.hashes)
    ignored = read_ignored(ignore_file)
    probe = next(iter(pins.values()))
    try:
        status, _ = get_json(f"{index}/pypi/{probe.name}/{probe.version}/json")
        if status == 200 and index == PYPI:
            code = run_pip_audit(locks, ignored)
            if code:
                print(f"\naudit: FAILED (pip-audit, exit {code}).\n{HOW_TO_FIX}", file=sys.stderr)
            return code
        problems = fallback_audit(sorted(pins.values(), key=lambda p: p.name), index, ignored)
    except OSError as exc:
        print(
            f"audit: FAILED: PyPI ({index}) cannot be reached ({exc}); nothing was checked. "
            "Retry, or run `make audit` where PyPI is reachable.",
            file=sys.stderr,
        )
        return 2
    print(
        f"audit: PyPI's per-release data ({index}/pypi/NAME/VERSION/json, which pip-audit "
        f"needs) answered {status} here, so this is the fallback: for {len(pins)} pins, the "
        "advisories PyPI lists for each package's latest release, yanked releases, and the "
        "locks' hashes against PyPI's files. Run `make audit` where that API answers for "
        "the complete check."
    )
    if problems:
        print("audit: FAILED:\n  " + "\n  ".join(problems) + "\n" + HOW_TO_FIX, file=sys.stderr)
        return 1
    print(f"audit: OK ({len(pins)} pins; ignored advisories: {sorted(ignored) or 'none'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["check", "audit"])
    parser.add_argument("locks", nargs="+", type=Path)
    parser.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    parser.add_argument("--index", default=PYPI, help="PyPI's address (tests use their own)")
    parser.add_argument("--ignore-file", type=Path, default=ROOT / "audit-ignore.txt")
    args = parser.parse_args(argv)
    if args.command == "audit":
        return audit(args.locks, args.index.rstrip("/"), args.ignore_file)
    lock, dev_lock = args.locks
    problems = check(lock, dev_lock, args.pyproject)
    if problems:
        print(
            "locks: out of date with pyproject.toml:\n  " + "\n  ".join(problems)
            + "\nRun `make lock` and commit both lock files.",
            file=sys.stderr,
        )  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
