"""What runs on a worker: shards in long-lived Dask actors, the direct route that reaches them in-process,
our serializers (installed by :class:`~.plugin.ShardWorkerPlugin`), and the limits a shard enforces.
"""
from __future__ import annotations

from .results import Results
from .shard_actor import ShardActor

__all__ = ["Results", "ShardActor"]
