"""Plain Dask tasks that forward to the shard living on their worker (pinned there by the scheduler).

For the rare calls of a deployment's life (describe, status). Experiments do not use tasks: they
travel the direct route (:mod:`.routing`)."""
from __future__ import annotations

from typing import Any

from . import registry


def shard_status(deployment: str, index: int) -> dict[str, Any]:
    import psutil

    status = registry.lookup(deployment, index).status()
    status["rss_bytes"] = psutil.Process().memory_info().rss
    return status


def describe(deployment: str) -> dict[str, Any]:
    return registry.lookup(deployment, 0).describe()  # type: ignore[return-value]
