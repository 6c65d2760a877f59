"""Runs intervention graphs on torch modules with hooks (no Dask here)."""
from __future__ import annotations

from .interleaver import Interleaver, StopForward
from .runner import RunResult, collect_saves, run_graph

__all__ = ["Interleaver", "RunResult", "StopForward", "collect_saves", "run_graph"]
