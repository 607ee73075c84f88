"""Node names, ``%`` placeholders in paths, and pidfiles: what ``celeriac worker
--pidfile/--logfile`` and ``celeriac multi`` share.

Placeholders mean what they mean in ``celery multi`` (for node ``w1@host.example.com``):
``%n`` w1, ``%h`` and ``%p`` w1@host.example.com, ``%d`` example.com, ``%i`` the pool
process index (0 in the main process), ``%I`` the same with a leading ``-`` and empty in
the main process, ``%%`` a literal ``%``. An unknown placeholder is left as it is.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Callable, Mapping
from pathlib import Path

logger = logging.getLogger("celeriac.worker")

PLACEHOLDER = re.compile(r"%(.)", re.DOTALL)
# What ``celeriac multi`` leaves for the worker process to fill in: the process index is
# only known there, and ``%%`` must survive until the last expansion.
WORKER_SIDE = frozenset("iI%")


class PidfileBusy(Exception):
    """The pidfile names a worker that is still running."""

    def __init__(self, path: Path, pid: int) -> None:
        super().__init__(
            f"pidfile {path} holds the pid of a running worker ({pid}): stop it first, "
            "or remove the file if that process is not a celeriac worker"
        )
        self.path = path
        self.pid = pid


def split_node(node: str) -> tuple[str, str]:
    """``w1@host`` as (``w1``, ``host``); a name without ``@`` is on this host."""
    name, at, host = node.partition("@")
    return name, host if at else socket.gethostname()


def _substitute(template: str, values: Mapping[str, str]) -> str:
    return PLACEHOLDER.sub(lambda match: values.get(match[1], match[0]), template)


def host_format(name: str) -> str:
    """A ``-n`` value with host placeholders filled in, as Celery's worker does:
    ``w1@%h`` is w1 on this host (``%h`` the host name, ``%n`` its first label, ``%d``
    its domain)."""
    host = socket.gethostname()
    short, _, domain = host.partition(".")
    return _substitute(name, {"h": host, "n": short, "d": domain, "%": "%"})


def default_node_name(hostname: str | None) -> str:
    """The worker's node name: ``-n`` expanded, else ``pid@host`` (the Worker's default)."""
    if hostname:
        return host_format(hostname)
    return f"{os.getpid()}@{socket.gethostname()}"


def expand_path(template: str, node: str, index: int | None = 0) -> str:
    """``template`` with the placeholders filled in for ``node``. ``index`` None leaves
    ``%i``, ``%I`` and ``%%`` for the worker process to expand."""
    name, host = split_node(node)
    values = {"n": name, "h": node, "p": node, "d": host.partition(".")[2]}
    if index is not None:
        values.update(i=str(index), I=f"-{index}" if index else "")
        values["%"] = "%"
    return _substitute(template, values)


# -- pidfiles --------------------------------------------------------------------------


def read_pid(path: Path) -> int | None:
    """The pid in ``path``: None if there is no such file, 0 if it holds no pid."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else 0


def is_running_worker(pid: int) -> bool:
    """Whether ``pid`` is a live ``celeriac`` process (other than this one: after a
    container restart a stale pidfile may well hold our own pid)."""
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, but belongs to another user
    return _looks_like_worker(pid)


def _looks_like_worker(pid: int) -> bool:
    """On Linux, /proc tells a live worker from a zombie (an orphan that exited under an
    init that does not reap, which ``kill(pid, 0)`` still finds) and from an unrelated
    program that got the pid after a reboot. Elsewhere, trust ``kill``."""
    proc = Path("/proc")
    if not (proc / "self").exists():
        return True
    try:
        stat = (proc / str(pid) / "stat").read_bytes()
        cmdline = (proc / str(pid) / "cmdline").read_bytes()
    except FileNotFoundError:
        return False  # it exited just now
    except OSError:
        return True  # hidden from us (hidepid): assume the worst, it is running
    state = stat.rpartition(b")")[2].split()[:1]
    return state != [b"Z"] and b"celeriac" in cmdline


def clear_stale(path: Path) -> int | None:
    """Remove ``path`` if it names no running worker and return the stale pid (0: the
    file held no pid); None if there was no file. ``PidfileBusy`` if the worker runs."""
    pid = read_pid(path)
    if pid is None:
        return None
    if is_running_worker(pid):
        raise PidfileBusy(path, pid)
    path.unlink(missing_ok=True)
    return pid


def write_pidfile(path: Path, pid: int) -> None:
    """Create ``path`` holding ``pid``, atomically and only if it does not exist: the
    pid is written to a temporary file that is then hard-linked into place, so a reader
    never sees an empty pidfile and two workers starting at once cannot both win."""
    temporary = path.with_name(f".{path.name}.{pid}.tmp")
    temporary.write_text(f"{pid}\n")
    try:
        os.link(temporary, path)
    except FileExistsError:
        clear_stale(path)  # PidfileBusy if the other one is alive
        try:
            os.link(temporary, path)
        except FileExistsError:  # another worker won the race just now
            raise PidfileBusy(path, read_pid(path) or 0) from None
    finally:
        temporary.unlink(missing_ok=True)


def remove_pidfile(path: Path, pid: int) -> None:
    """Remove ``path`` if it still holds ``pid`` (never another process's pidfile)."""
    if read_pid(path) == pid:
        path.unlink(missing_ok=True)


def check_pidfile(path: str | None) -> None:
    """Refuse (``PidfileBusy``) if ``path`` names a running worker; remove it, with a
    warning, if it is stale. Done before the app is imported, to fail fast."""
    if not path:
        return
    stale = clear_stale(Path(path))
    if stale is not None:
        logger.warning("removed stale pidfile %s (pid %s is not running)", path, stale)


def run_with_pidfile(path: str | None, run: Callable[[], int]) -> int:
    """``run()`` with the pidfile in place; the pidfile goes when ``run`` returns or
    raises (a SIGKILL leaves it behind, and the next start clears it as stale)."""
    if not path:
        return run()
    pidfile = Path(path)
    write_pidfile(pidfile, os.getpid())  # checks again: another worker may have started
    try:
        return run()
    finally:
        remove_pidfile(pidfile, os.getpid())
