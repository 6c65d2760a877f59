"""Shards in long-lived Dask actors, and the tasks that reach them on their workers."""
from __future__ import annotations

from .results import Results
from .shard_actor import ShardActor

__all__ = ["Results", "ShardActor"]
