"""PostgreSQL's plans as the tests read them (``EXPLAIN (FORMAT JSON)``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """``node`` and every node under it."""
    yield node
    for child in node.get("Plans", ()):
        yield from plan_nodes(child)
