"""Plain Dask tasks that forward to the shard living on their worker (pinned there by the scheduler)."""
from __future__ import annotations

from typing import Any

from ..execution.stage import Carry, Stage
from . import registry
from .results import Results


def run_stage(deployment: str, index: int, members: list[tuple[str, str | None]], stage: Stage,
              carries: dict[str, Carry | BaseException] | None, final: bool) -> dict[str, Carry | Results | BaseException]:
    """One stage of a batch of experiments on shard ``index`` of ``deployment``.

    ``members`` are ``(experiment, graph_json)`` pairs (the graph only on an experiment's first
    stage on this shard); the answer maps each experiment to its carry, its results (``final``) or
    its error.
    """
    return registry.lookup(deployment, index).run_batch(members, stage, carries, final)


def release(deployment: str, index: int, experiment: str) -> None:
    """Forget an experiment's state on this shard (after it ended, or was cancelled or failed).

    A task waits behind the stage running on the worker; to stop a running experiment at once, use
    the worker handler ``plugin.CANCEL_HANDLER`` instead (what clients do)."""
    try:
        registry.lookup(deployment, index).release(experiment)
    except registry.ShardUnavailableError:
        pass


def shard_status(deployment: str, index: int) -> dict[str, Any]:
    import psutil

    status = registry.lookup(deployment, index).status()
    status["rss_bytes"] = psutil.Process().memory_info().rss
    return status


def describe(deployment: str) -> dict[str, Any]:
    return registry.lookup(deployment, 0).describe()  # type: ignore[return-value]


def close_shard(deployment: str, index: int, reason: str | None = None) -> None:
    """Close shard ``index`` here (``reason``: why its experiments in flight end; see ``ShardActor.close``)."""
    try:
        registry.lookup(deployment, index).close(reason)
    except registry.ShardUnavailableError:
        pass
