"""Process-level registry of the shards this worker holds.

A stage task pinned to a shard's worker finds the shard object here, in-process, so hidden
states and the model never go through an actor call or a serializer on the same worker.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from ..errors import DeploymentError

if TYPE_CHECKING:
    from .shard_actor import ShardActor

_lock = threading.Lock()
_shards: dict[tuple[str, int], ShardActor] = {}


class ShardUnavailableError(DeploymentError):
    """The shard is not on this worker (its worker died and it moved, or it was undeployed)."""


class ShardStateLostError(DeploymentError):
    """A later stage reached a shard that no longer holds its experiment's state."""


def register(deployment: str, index: int, shard: ShardActor) -> None:
    with _lock:
        _shards[(deployment, index)] = shard


def unregister(deployment: str, index: int) -> None:
    with _lock:
        _shards.pop((deployment, index), None)


def lookup(deployment: str, index: int) -> ShardActor:
    with _lock:
        shard = _shards.get((deployment, index))
    if shard is None:
        held = sorted(f"{name}[{i}]" for name, i in _shards)
        raise ShardUnavailableError(
            f"shard {index} of deployment {deployment!r} is not on this worker (it holds: {held or 'none'}); "
            "the deployment may be recovering from a lost worker", deployment=deployment, shard=index)
    return shard


def held() -> list[tuple[str, int]]:
    with _lock:
        return sorted(_shards)
