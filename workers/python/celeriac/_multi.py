"""``celeriac multi``: worker nodes in the background, managed by name (``celery multi``).

Each node is a ``celeriac worker -n w1@host --pidfile … --logfile …`` process in a
session of its own, with stdin from /dev/null and stdout/stderr appended to its log file,
so it outlives the shell that started it. The worker writes and removes its pidfile
itself; ``multi`` only reads it. The worker options a node was started with are saved
beside its pidfile (``w1.pid.json``: options and working directory, never the
environment, where API keys live), so ``restart`` and a later ``start`` can bring it
back exactly as it was from its name alone.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from ._daemon import (
    PidfileBusy,
    clear_stale,
    expand_path,
    host_format,
    is_running_worker,
    read_pid,
    remove_pidfile,
)

ACTIONS = ("start", "stop", "stopwait", "restart", "kill", "show", "names")
DEFAULT_PIDFILE = "%n.pid"  # relative to the current directory, as in Celery
DEFAULT_LOGFILE = "%n%I.log"
POLL_SECONDS = 0.05
KILL_WAIT_SECONDS = 10.0
MAX_NODE_NAME = 200  # the service's limit on a worker name
# Stands in for --app while checking the options of a command that may leave it out.
NO_APP = "\0"
# Worker options that multi sets per node itself.
MULTI_OWNED = {"hostname": "-n/--hostname", "pidfile": "--pidfile", "logfile": "--logfile"}


class MultiError(Exception):
    """A usage error: nothing was done."""


class NodeError(Exception):
    """One node could not be handled; the others still are."""


@dataclass(frozen=True)
class Launch:
    """Everything needed to start one node."""

    node: str
    pidfile_arg: str  # for the worker: absolute, node placeholders filled in
    logfile_arg: str
    options: dict[str, Any]  # worker options by parameter name, as JSON values
    cwd: str

    @property
    def pidfile(self) -> Path:
        return Path(expand_path(self.pidfile_arg, self.node))

    @property
    def logfile(self) -> Path:
        return Path(expand_path(self.logfile_arg, self.node))  # the main process's


def run_multi(
    ctx: typer.Context,
    action: str,
    *,
    pidfile: str | None,
    logfile: str | None,
    timeout: float,
) -> int:
    """Run ``action`` on the nodes named in ``ctx.args``; the exit status."""
    if action not in ACTIONS:
        raise MultiError(f"unknown action {action!r} (one of {', '.join(ACTIONS)})")
    names, worker_args = _split_arguments(ctx.args)
    nodes = expand_names(names)
    if action == "names":
        for node in nodes:
            print(node)
        return 0
    command = _worker_command(ctx)
    plan = Plan(command, parse_worker_options(command, worker_args), pidfile, logfile)
    handlers: dict[str, Callable[[Plan, list[str]], bool]] = {
        "start": lambda plan, nodes: start(plan, nodes, timeout),
        "stop": lambda plan, nodes: stop(plan, nodes, timeout),
        "stopwait": lambda plan, nodes: stop(plan, nodes, None),
        "restart": lambda plan, nodes: restart(plan, nodes, timeout),
        "kill": kill,
        "show": show,
    }
    return 0 if handlers[action](plan, nodes) else 1


# -- node names and options ------------------------------------------------------------


def _split_arguments(args: list[str]) -> tuple[list[str], list[str]]:
    """Node names come first, worker options after: ``w1 w2 -c 4``."""
    for index, arg in enumerate(args):
        if arg.startswith("-"):
            return args[:index], args[index:]
    return args, []


def expand_names(names: list[str]) -> list[str]:
    """``w1`` → ``w1@host``; ``w1@%h`` is the same; a single number N names N nodes,
    celeriac1 … celeriacN (as ``celery multi start 3`` does)."""
    if not names:
        raise MultiError("name the nodes before the worker options, e.g. multi start w1 w2 -A …")
    if len(names) == 1 and names[0].isdigit() and int(names[0]) > 0:
        names = [f"celeriac{n}" for n in range(1, int(names[0]) + 1)]
    nodes = [host_format(name if "@" in name else f"{name}@%h") for name in names]
    for node in nodes:
        _check_node_name(node)
    duplicates = sorted({node for node in nodes if nodes.count(node) > 1})
    if duplicates:
        raise MultiError(f"node names given twice: {', '.join(duplicates)}")
    return nodes


def _check_node_name(node: str) -> None:
    # The name ends up in file names (%n, %h): no path separators or stray placeholders.
    name = node.partition("@")[0]
    if (
        not name
        or len(node) > MAX_NODE_NAME
        or any(c in node for c in "/%\0")
        or (any(c.isspace() for c in node))
    ):
        raise MultiError(
            f"bad node name {node!r}: a short name before the @, no '/', '%' or spaces, "
            f"at most {MAX_NODE_NAME} characters"
        )


# The click objects below are duck-typed (Any): newer typer releases vendor click as
# typer._click, older ones use click itself, and this has to work with both.


def _worker_command(ctx: typer.Context) -> Any:
    """The ``celeriac worker`` command itself: its options are read from it, so multi
    accepts exactly what the worker accepts, including options added later."""
    parent = ctx.parent
    get_command = getattr(parent.command, "get_command", None) if parent else None
    command = get_command(parent, "worker") if get_command else None
    if command is None:
        raise MultiError("celeriac multi must run as a subcommand of celeriac")
    return command


def parse_worker_options(command: Any, args: list[str]) -> dict[str, Any]:
    """The worker options given on the command line, by parameter name; checked by the
    worker command's own parser, so a typo fails here and not in a background process."""
    try:
        ctx = command.make_context("worker", ["--app", NO_APP, *args])
    except Exception as exc:
        if not hasattr(exc, "format_message"):  # not click's usage error: a bug, or --help
            raise
        raise MultiError(f"worker options: {exc.format_message()}") from None
    given = {
        name: list(value) if isinstance(value, tuple) else value
        for name, value in ctx.params.items()
        if ctx.get_parameter_source(name).name == "COMMANDLINE"
    }
    if given.get("app") == NO_APP:
        del given["app"]
    for name, flags in MULTI_OWNED.items():
        if name in given:
            raise MultiError(f"{flags} is set by multi for each node: give node names instead")
    return given


def option_argv(command: Any, options: dict[str, Any]) -> list[str]:
    """Options (by parameter name) back as command-line arguments for ``command``."""
    params = {param.name: param for param in command.params if param.param_type_name == "option"}
    argv: list[str] = []
    for name, value in options.items():
        param = params.get(name)
        if param is None:
            raise NodeError(f"saved option {name!r} is no longer a worker option")
        argv += _option_tokens(param, value)
    return argv


def _option_tokens(param: Any, value: Any) -> list[str]:
    flag = _preferred(param.opts)
    if param.is_flag:
        if param.secondary_opts:  # --x/--no-x
            return [flag if value else _preferred(param.secondary_opts)]
        return [flag] if value else []
    values = value if param.multiple else [value]
    tokens: list[str] = []
    for item in values:
        if item is not None:
            # --opt=value: a value that starts with "-" cannot pass for an option.
            tokens += [f"{flag}={item}"] if flag.startswith("--") else [flag, str(item)]
    return tokens


def _preferred(opts: list[str]) -> str:
    return next((opt for opt in opts if opt.startswith("--")), opts[0])


# -- what each node runs ---------------------------------------------------------------


class Plan:
    """The worker command and the options of this ``multi`` invocation, turned into a
    ``Launch`` per node."""

    def __init__(
        self,
        command: Any,
        given: dict[str, Any],
        pidfile: str | None,
        logfile: str | None,
    ) -> None:
        self.command = command
        self.given = given
        self.pidfile_template = os.path.abspath(pidfile or DEFAULT_PIDFILE)
        self.logfile_template = os.path.abspath(logfile) if logfile else None

    def pidfile(self, node: str) -> Path:
        return Path(expand_path(self.pidfile_template, node))

    def launch(self, node: str, *, keep_saved: bool) -> Launch:
        """How to start ``node``: the options given now, or, with ``keep_saved`` (a
        restart) or when no --app is given, the saved ones updated with those given."""
        pidfile_arg = expand_path(self.pidfile_template, node, index=None)
        saved = load_saved(options_path(Path(expand_path(pidfile_arg, node))))
        if saved is not None and (keep_saved or "app" not in self.given):
            options = {**saved["options"], **self.given}
            logfile_arg = self._logfile_arg(node) or str(saved["logfile"])
            cwd = str(saved["cwd"])
        else:
            options = dict(self.given)
            logfile_arg = self._logfile_arg(node) or self._default_logfile(node)
            cwd = os.getcwd()
        if "app" not in options:
            raise NodeError("no --app given, and no saved options to start it from")
        return Launch(node, pidfile_arg, logfile_arg, options, cwd)

    def _logfile_arg(self, node: str) -> str | None:
        if self.logfile_template is None:
            return None
        return expand_path(self.logfile_template, node, index=None)

    def _default_logfile(self, node: str) -> str:
        return expand_path(os.path.abspath(DEFAULT_LOGFILE), node, index=None)

    def argv(self, launch: Launch) -> list[str]:
        return [
            sys.executable, "-m", "celeriac", "worker", f"--hostname={launch.node}",
            f"--pidfile={launch.pidfile_arg}", f"--logfile={launch.logfile_arg}",
            *option_argv(self.command, launch.options),
        ]  # fmt: skip


def options_path(pidfile: Path) -> Path:
    return pidfile.with_name(pidfile.name + ".json")


def load_saved(path: Path) -> dict[str, Any] | None:
    try:
        saved: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise NodeError(f"cannot read the saved options {path}: {exc}") from None
    if not isinstance(saved.get("options"), dict) or "cwd" not in saved or "logfile" not in saved:
        raise NodeError(f"{path} is not a celeriac multi options file")
    return saved


def save(launch: Launch) -> None:
    path = options_path(launch.pidfile)
    saved = {
        "node": launch.node, "cwd": launch.cwd, "logfile": launch.logfile_arg,
        "options": launch.options,
    }  # fmt: skip
    temporary = path.with_name(f".{path.name}.tmp")
    # Owner-only: a URL given as an option (--server, --broker) may hold a password.
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(saved, indent=2) + "\n")
    os.replace(temporary, path)  # never a half-written file, even if we are killed


# -- actions -----------------------------------------------------------------------------


def report(node: str, message: str) -> None:
    print(f"{node}: {message}", flush=True)


def warn(node: str, message: str) -> None:
    print(f"warning: {node}: {message}", file=sys.stderr, flush=True)


def start(plan: Plan, nodes: list[str], timeout: float) -> bool:
    """Start every node, then wait for each to write its pidfile (they start in
    parallel)."""
    started: list[tuple[Launch, int]] = []
    ok = True
    for node in nodes:
        try:
            launch = plan.launch(node, keep_saved=False)
            started.append((launch, spawn(plan, launch)))
        except NodeError as exc:
            report(node, f"FAILED: {exc}")
            ok = False
    deadline = time.monotonic() + timeout
    for launch, pid in started:
        ok = await_start(launch, pid, deadline) and ok
    return ok


def spawn(plan: Plan, launch: Launch) -> int:
    """Start the node's worker in a new session; its pid."""
    try:
        stale = clear_stale(launch.pidfile)
    except PidfileBusy as busy:
        raise NodeError(f"already running (pid {busy.pid}, pidfile {launch.pidfile})") from None
    if stale is not None:
        warn(launch.node, f"removed stale pidfile {launch.pidfile} (pid {stale} is not running)")
    argv = plan.argv(launch)
    try:
        launch.pidfile.parent.mkdir(parents=True, exist_ok=True)
        launch.logfile.parent.mkdir(parents=True, exist_ok=True)
        stopping_path(launch.pidfile).unlink(missing_ok=True)  # about an earlier process
        with _working_directory(launch.cwd):
            return os.posix_spawn(
                sys.executable, argv, os.environ, file_actions=_stdio(launch.logfile), setsid=True
            )
    except OSError as exc:
        raise NodeError(f"cannot start: {exc}") from None


def _stdio(logfile: Path) -> list[tuple[Any, ...]]:
    # Output that bypasses logging (a usage error, a crash before logging is set up)
    # lands in the log file too, where `start` finds the reason a node died.
    append = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    return [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(logfile), append, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]


@contextmanager
def _working_directory(path: str) -> Iterator[None]:
    # posix_spawn has no chdir of its own; multi is single-threaded, so this is safe.
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def await_start(launch: Launch, pid: int, deadline: float) -> bool:
    """Wait until the worker has written its pidfile, or died, or time ran out."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            report(launch.node, f"FAILED: exited with status {code}: {_last_line(launch)}")
            return False
        if read_pid(launch.pidfile) == pid:
            save(launch)  # only now: a failed start keeps the options that worked
            report(launch.node, f"started (pid {pid})")
            return True
        if time.monotonic() > deadline:
            report(
                launch.node,
                f"FAILED: no pidfile yet (pid {pid} is still running; see {launch.logfile})",
            )
            return False
        time.sleep(POLL_SECONDS)


def _last_line(launch: Launch) -> str:
    try:
        with launch.logfile.open("rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - 4096))
            lines = log.read().decode(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    return lines[-1] if lines else f"see {launch.logfile}"


def stopping_path(pidfile: Path) -> Path:
    return pidfile.with_name(pidfile.name + ".stopping")


def signal_node(node: str, pidfile: Path, signum: signal.Signals) -> int | None:
    """Send ``signum`` to the node's worker; its pid, or None if it is not running."""
    pid = read_pid(pidfile)
    if pid is None or not is_running_worker(pid):
        stopping_path(pidfile).unlink(missing_ok=True)
    if pid is None:
        report(node, "not running (no pidfile)")
        return None
    if not is_running_worker(pid):
        pidfile.unlink(missing_ok=True)
        warn(node, f"removed stale pidfile {pidfile} (pid {pid} is not running)")
        report(node, "not running")
        return None
    if signum == signal.SIGTERM and _already_stopping(node, pidfile, pid):
        return pid
    try:
        _send(pid, signum)
    except ProcessLookupError:
        return pid  # exited just now: await_exit sees it gone
    except PermissionError as exc:
        raise NodeError(f"cannot signal pid {pid}: {exc}") from None
    if signum == signal.SIGTERM:
        stopping_path(pidfile).write_text(f"{pid}\n")
    return pid


def _send(pid: int, signum: signal.Signals) -> None:
    # SIGKILL goes to the node's whole process group (a node started by multi leads its
    # own): processes-pool children die with it instead of running on orphaned. SIGTERM
    # only to the worker, whose warm shutdown stops its children in order.
    if signum == signal.SIGKILL and os.getpgid(pid) == pid:
        os.killpg(pid, signum)
    else:
        os.kill(pid, signum)


def _already_stopping(node: str, pidfile: Path, pid: int) -> bool:
    """Whether an earlier stop (that timed out) already sent this worker its SIGTERM:
    a second one would turn its warm shutdown cold, releasing its running jobs."""
    if read_pid(stopping_path(pidfile)) == pid:
        warn(node, f"already stopping (pid {pid}): waiting, without a second SIGTERM")
        return True
    return False


def await_exit(node: str, pidfile: Path, pid: int, deadline: float | None) -> bool:
    """Wait until ``pid`` is gone (``deadline`` None: for as long as it takes)."""
    while is_running_worker(pid):
        if deadline is not None and time.monotonic() > deadline:
            report(node, f"FAILED: still running (pid {pid}), not killed ('kill' would)")
            return False
        time.sleep(POLL_SECONDS)
    remove_pidfile(pidfile, pid)  # the worker removes it itself unless it was killed
    stopping_path(pidfile).unlink(missing_ok=True)
    return True


def stop(plan: Plan, nodes: list[str], timeout: float | None) -> bool:
    """SIGTERM (warm shutdown: running jobs finish) to every node, then wait for all."""
    signalled: list[tuple[str, Path, int]] = []
    ok = True
    for node in nodes:
        pidfile = plan.pidfile(node)
        try:
            pid = signal_node(node, pidfile, signal.SIGTERM)
        except NodeError as exc:
            report(node, f"FAILED: {exc}")
            ok = False
            continue
        if pid is not None:
            signalled.append((node, pidfile, pid))
    deadline = None if timeout is None else time.monotonic() + timeout
    for node, pidfile, pid in signalled:
        if await_exit(node, pidfile, pid, deadline):
            report(node, f"stopped (pid {pid})")
        else:
            ok = False
    return ok


def restart(plan: Plan, nodes: list[str], timeout: float) -> bool:
    """Stop, then start, one node after the other, so the others keep working and each
    node's running jobs finish before its new process starts."""
    ok = True
    for node in nodes:
        ok = _restart_node(plan, node, timeout) and ok
    return ok


def _restart_node(plan: Plan, node: str, timeout: float) -> bool:
    try:
        launch = plan.launch(node, keep_saved=True)  # before stopping: fail with it running
        pid = signal_node(node, launch.pidfile, signal.SIGTERM)
        if pid is not None:
            if not await_exit(node, launch.pidfile, pid, time.monotonic() + timeout):
                return False
            report(node, f"stopped (pid {pid})")
        new_pid = spawn(plan, launch)
    except NodeError as exc:
        report(node, f"FAILED: {exc}")
        return False
    return await_start(launch, new_pid, time.monotonic() + timeout)


def kill(plan: Plan, nodes: list[str]) -> bool:
    """SIGKILL: running jobs are lost to this worker and run again once their leases
    expire."""
    ok = True
    for node in nodes:
        pidfile = plan.pidfile(node)
        try:
            pid = signal_node(node, pidfile, signal.SIGKILL)
        except NodeError as exc:
            report(node, f"FAILED: {exc}")
            ok = False
            continue
        if pid is not None:
            deadline = time.monotonic() + KILL_WAIT_SECONDS
            if await_exit(node, pidfile, pid, deadline):
                report(node, f"killed (pid {pid})")
            else:
                ok = False
    return ok


def show(plan: Plan, nodes: list[str]) -> bool:
    """Print the command each node would run (``start`` with these arguments)."""
    ok = True
    for node in nodes:
        try:
            print(shlex.join(plan.argv(plan.launch(node, keep_saved=False))))
        except NodeError as exc:
            print(f"{node}: {exc}", file=sys.stderr)
            ok = False
    return ok
