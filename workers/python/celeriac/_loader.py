"""Finding the ``Celeriac`` app named on the command line (``-A proj.tasks:app``)."""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

from .app import Celeriac

# Looked up, in order, when only a module is named (as Celery looks for "app", "celery").
DEFAULT_ATTRIBUTES = ("app", "celeriac")


class AppNotFound(Exception):
    pass


def load_app(spec: str) -> Celeriac:
    """Accept ``module:attr``, ``module.attr`` and plain ``module``; like Celery, the
    current directory is importable."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if ":" in spec:
        module_name, _, attribute = spec.partition(":")
        return _attribute(_import(module_name), attribute, spec)
    module = _import_if_module(spec)
    if module is not None:
        return _find_in_module(module, spec)
    module_name, _, attribute = spec.rpartition(".")
    if not module_name:
        raise AppNotFound(f"no module named {spec!r}")
    return _attribute(_import(module_name), attribute, spec)


def _import(module_name: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if _names_missing(exc, module_name):
            raise AppNotFound(f"no module named {module_name!r}") from exc
        raise  # the module exists but something it imports does not


def _import_if_module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if _names_missing(exc, name):
            return None  # maybe "module.attribute": the caller tries that next
        raise


def _names_missing(exc: ModuleNotFoundError, module_name: str) -> bool:
    """Whether ``module_name`` itself (or a parent package) is missing, as opposed to
    something the module imports."""
    return exc.name is not None and (module_name + ".").startswith(exc.name + ".")


def _attribute(module: ModuleType, path: str, spec: str) -> Celeriac:
    value: object = module
    for part in path.split("."):
        if not hasattr(value, part):
            raise AppNotFound(f"{spec}: {module.__name__} has no attribute {path!r}")
        value = getattr(value, part)
    if not isinstance(value, Celeriac):
        raise AppNotFound(f"{spec} is a {type(value).__name__}, not a Celeriac app")
    return value


def _find_in_module(module: ModuleType, spec: str) -> Celeriac:
    for name in DEFAULT_ATTRIBUTES:
        value = getattr(module, name, None)
        if isinstance(value, Celeriac):
            return value
    apps = [value for value in vars(module).values() if isinstance(value, Celeriac)]
    if len(apps) == 1:
        return apps[0]
    raise AppNotFound(f"{spec}: found {len(apps)} Celeriac apps; name one as {spec}:attribute")


def spec_of(app: Celeriac) -> str | None:
    """``module:attribute`` naming ``app`` in an imported module (what a child process
    imports to get the same app), or None if no module holds it."""
    for name, module in list(sys.modules.items()):
        if module is None or name in ("__main__", "__mp_main__"):
            continue
        for attribute, value in list(vars(module).items()):
            if value is app:
                return f"{name}:{attribute}"
    return None
