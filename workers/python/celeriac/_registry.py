"""The worker's entry in the service's registry (``POST /workers``): registered at start,
a heartbeat every interval the service hands out (with the ids of the jobs held, so the
service can reclaim them at once if this process dies), and the commands that come back
with it: ``quiet`` (lease no more) and ``shutdown`` (warm shutdown). Deregistered on a
clean exit. A service without the registry (404) is fine: the worker just runs."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._http import HttpSession
from .errors import CeleriacError, ServerUnreachable, is_transient

logger = logging.getLogger("celeriac.worker")

RETRY_SECONDS = 5.0


@dataclass(frozen=True)
class RegistryHooks:
    running: Callable[[], list[str]]  # ids of the jobs this worker holds
    quiet: Callable[[], None]
    shutdown: Callable[[], None]


class Registry:
    def __init__(self, http: HttpSession, about: dict[str, Any], hooks: RegistryHooks) -> None:
        self._http = http
        self._about = about
        self._hooks = hooks
        self.worker_id: str | None = None
        self.interval = RETRY_SECONDS
        self._stopped = threading.Event()
        self._last_command: str | None = None
        self._warned = False

    def run(self) -> None:
        while not self._stopped.is_set():
            try:
                if self.worker_id is None:
                    self._register()
                else:
                    self._beat()
            except _Unsupported:
                return
            except (ServerUnreachable, CeleriacError) as exc:
                if isinstance(exc, CeleriacError) and not is_transient(exc):
                    logger.error("the worker registry refused this worker: %s", exc)
                    return
                # Once, then quietly: a Redis worker may well run without the service.
                log = logger.debug if self._warned else logger.warning
                log("worker registry unreachable, retrying: %s", exc)
                self._warned = True
            self._stopped.wait(self.interval if self.worker_id else RETRY_SECONDS)

    def stop(self) -> None:
        """Stop heartbeating and deregister (best effort: leaving must not hang on it)."""
        self._stopped.set()
        worker_id, self.worker_id = self.worker_id, None
        if worker_id is None:
            return
        try:
            self._http.call("DELETE", f"/workers/{worker_id}")
        except (ServerUnreachable, CeleriacError) as exc:
            logger.debug("could not deregister: %s", exc)

    def _register(self) -> None:
        try:
            answer = self._http.call("POST", "/workers", _encode(self._about))
        except CeleriacError as exc:
            if exc.status in (404, 405):
                logger.info("the service has no worker registry; running without it")
                raise _Unsupported from exc
            raise
        self.worker_id = answer["id"]
        self.interval = float(answer["heartbeat_interval"])
        logger.info("registered as worker %s (heartbeat every %g s)", self.worker_id, self.interval)

    def _beat(self) -> None:
        body = _encode({"running": self._hooks.running()})
        try:
            answer = self._http.call("POST", f"/workers/{self.worker_id}/heartbeat", body)
        except CeleriacError as exc:
            if exc.status != 404:
                raise
            # Purged (lost for too long, say after a long pause): register afresh.
            logger.warning("the service forgot this worker; registering again")
            self.worker_id = None
            self._register()
            return
        self._obey(answer.get("command"))

    def _obey(self, command: str | None) -> None:
        if command == self._last_command:
            return
        self._last_command = command
        if command == "quiet":
            logger.warning("the service asked this worker to be quiet: leasing no more jobs")
            self._hooks.quiet()
        elif command == "shutdown":
            logger.warning("the service asked this worker to shut down")
            self._hooks.shutdown()


class _Unsupported(Exception):
    pass


def _encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()
