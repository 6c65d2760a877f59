"""Runs intervention graphs on torch modules with hooks (no Dask, no storage, no model loading here).

``run_graph`` runs a whole graph on one module (the local engine); ``ShardRunner`` runs one shard's
stages of it (the remote engine), several experiments' forward stages in one pass. Both get what
they need from outside: the shard plan as an owner function, and a
:class:`~nnsight_dask.backends.base.SaveSink` for large saves.
"""
from __future__ import annotations

from .interleaver import Interleaver, StopForward
from .local_runner import run_graph
from .saves import collect_saves, persisted_name
from .shard_runner import ShardRunner, run_pipeline
from .shard_state import ExperimentState
from .stage import Carry, Stage, plan_stages

__all__ = ["Carry", "ExperimentState", "Interleaver", "ShardRunner", "Stage", "StopForward", "collect_saves",
           "persisted_name", "plan_stages", "run_graph", "run_pipeline"]
