"""Process-level registry of the shards this worker holds, and of the experiments told to stop.

The worker's router (:mod:`.routing`) finds the shard object here, in-process, so hidden states
and the model never go through an actor call or a serializer on the same worker.

Stop flags live here too, per process and without the shards' locks: experiment ids are unique on
the cluster, so the flag the worker's cancel handler (:mod:`.plugin`) sets is seen by every shard of
the process, between stages and by the hook that checks it before each decoder layer
(:class:`~nnsight_dask.execution.shard_runner.ShardRunner`). A shard closed by ``undeploy`` leaves a
tombstone, so stages still queued for it fail with the reason instead of "not on this worker".
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any, Protocol

from ..errors import DeploymentError, NNsightDaskError



class HeldShard(Protocol):
    """What the registry holds: a :class:`~.shard_actor.ShardActor` (named by protocol, not imported,
    so that the registry stays a leaf the shard modules import)."""

    deployment: str
    index: int
    server: Any

    def close(self, reason: str | None = None) -> None: ...

    def retire(self) -> None: ...

_lock = threading.Lock()
_shards: dict[tuple[str, int], HeldShard] = {}
#: Shards closed on purpose (undeploy) -> why, until the deployment is served here again.
_closed: dict[tuple[str, int], str] = {}
#: Experiment -> (when it was told to stop, the error its stages raise from then on).
_stopped: dict[str, tuple[float, BaseException]] = {}
#: Stop flags are forgotten after this long (an experiment's later stages arrive within seconds).
FORGET_STOPPED_SECONDS = 3600.0


class ShardUnavailableError(DeploymentError):
    """The shard is not on this worker (its worker died and it moved, or it was undeployed)."""


class ShardStateLostError(DeploymentError):
    """A later stage reached a shard that no longer holds its experiment's state."""


class ShardClosedError(ShardUnavailableError):
    """The deployment was undeployed while the experiment was queued or running on it."""


class ExperimentCancelledError(NNsightDaskError, RuntimeError):
    """The experiment was told to stop (its owner cancelled it or gave up waiting, or its client left)."""


def register(deployment: str, index: int, shard: HeldShard) -> None:
    with _lock:
        _shards[(deployment, index)] = shard
        _closed.pop((deployment, index), None)


def unregister(deployment: str, index: int, shard: HeldShard | None = None, reason: str = "") -> None:
    """Forget shard ``index`` of ``deployment`` (only if it is ``shard``, when given: a newer copy
    registered since stays); ``reason`` leaves a tombstone that later lookups raise."""
    with _lock:
        if shard is None or _shards.get((deployment, index)) is shard:
            _shards.pop((deployment, index), None)
        if reason:
            _closed[(deployment, index)] = reason


def lookup(deployment: str, index: int) -> HeldShard:
    with _lock:
        shard = _shards.get((deployment, index))
        closed = _closed.get((deployment, index))
    if shard is None:
        if closed:
            raise ShardClosedError(closed, deployment=deployment, shard=index)
        held = sorted(f"{name}[{i}]" for name, i in _shards)
        raise ShardUnavailableError(
            f"shard {index} of deployment {deployment!r} is not on this worker (it holds: {held or 'none'}); "
            "the deployment may be recovering from a lost worker", deployment=deployment, shard=index)
    return shard


def held() -> list[tuple[str, int]]:
    with _lock:
        return sorted(_shards)


def shards(deployment: str | None = None) -> list[HeldShard]:
    """The shard objects of this process (of ``deployment`` only, when given)."""
    with _lock:
        return [shard for (name, _), shard in _shards.items() if deployment is None or name == deployment]


# -- stop flags ---------------------------------------------------------------------------------------
def stop(experiments: Iterable[str], error: BaseException) -> None:
    """Tell every shard of this process that ``experiments`` must stop: their stages raise ``error``."""
    now = time.monotonic()
    with _lock:
        for experiment in experiments:
            _stopped.setdefault(experiment, (now, error))
        if len(_stopped) > 1024:  # amortized: old flags go once there are many
            for key in [k for k, (when, _) in _stopped.items() if now - when > FORGET_STOPPED_SECONDS]:
                del _stopped[key]


def stopped(experiment: str) -> BaseException | None:
    """The error ``experiment``'s stages raise, if it was told to stop; ``None`` otherwise (lock-free:
    called before every decoder layer)."""
    entry = _stopped.get(experiment)
    return entry[1] if entry is not None else None
