"""The local backend: runs graphs on a torch module held in this process.

With ``store=`` a run persists its large saves through the same :class:`~.base.SaveSink` lifecycle
as a remote one (write each save, then commit, or abort on failure) and hands back lazy tensors.
The sink comes from ``sink_for``, given by whoever wires the backend (:mod:`nnsight_dask.api`),
so this module needs no storage of its own.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

import torch

from ..execution.local_runner import run_graph
from ..execution.saves import persisted_name
from ..graph.graph import InterventionGraph
from .base import Backend, RunResult, SaveSink

#: ``sink_for(options)``: the sink a graph's options ask for (a new experiment's), or None (no store).
SinkFactory = Callable[[Mapping[str, Any]], "SaveSink | None"]
#: ``open_saves(saves)``: what the user holds for written saves (e.g. lazy tensors for refs).
Opener = Callable[[Any], Any]


class LocalBackend(Backend):
    """Runs graphs on ``module`` in this process."""

    def __init__(self, module: torch.nn.Module, pad_token_id: int | None = None, *,
                 sink_for: SinkFactory | None = None, open_saves: Opener | None = None) -> None:
        self.module = module
        self.pad_token_id = pad_token_id
        self.sink_for = sink_for
        self.open_saves = open_saves

    def run(self, graph: InterventionGraph, **_options: Any) -> RunResult:
        result = run_graph(self.module, graph, pad_token_id=self.pad_token_id)
        sink = self.sink_for(graph.options) if self.sink_for is not None else None
        if sink is None:
            return result
        try:
            saves = write_saves(result.saves, sink)
            sink.commit(saves)
        except BaseException:
            sink.abort()
            raise
        opened = self.open_saves(saves) if self.open_saves is not None else saves
        return RunResult(saves=opened, logs=result.logs)

    def scan(self, graph: InterventionGraph) -> RunResult:
        return run_graph(self.module, graph, pad_token_id=self.pad_token_id, fake=True)

    def submit(self, graph: InterventionGraph, deliver: Callable[[RunResult], None] | None = None,
               **options: Any) -> Future[RunResult]:
        future: Future[RunResult] = Future()
        try:
            result = self.run(graph, **options)
            if deliver is not None:
                deliver(result)
            future.set_result(result)
        except Exception as exc:  # the future carries the failure to whoever waits on it
            future.set_exception(exc)
        return future


def write_saves(saves: Mapping[str, Any], sink: SaveSink) -> dict[str, Any]:
    """Every saved value through ``sink``; a per-step list's items are named ``<name>.<index>``."""
    written: dict[str, Any] = {}
    for name, value in saves.items():
        if isinstance(value, list):
            written[name] = [sink.write(persisted_name(name, (0, i)), v) for i, v in enumerate(value)]
        else:
            written[name] = sink.write(persisted_name(name, 0), value)
    return written
