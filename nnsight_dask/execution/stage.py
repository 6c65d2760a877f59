"""The route of an experiment: a chain of stages, each one shard's part of one step, and the carry
that travels between them.

A remote experiment is a chain of stages. Each stage runs on the shard that owns a range of
layers (:class:`~.shard_runner.ShardRunner`), receives a :class:`Carry` (the hidden state leaving
the previous shard, the values later nodes need, the saves so far) and returns the next one.
Gradients come back through the shards in reverse order in backward stages.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..graph.graph import InterventionGraph
from .partition import backward_origins
from .plan import Key


@dataclass(frozen=True)
class Stage:
    """``direction`` is ``"forward"`` or ``"backward"``; ``step`` counts generation steps."""

    pass_index: int
    step: int
    shard: int
    direction: str = "forward"

    @property
    def label(self) -> str:
        kind = "fwd" if self.direction == "forward" else "bwd"
        return f"p{self.pass_index}-t{self.step}-{kind}-s{self.shard}"


@dataclass
class Carry:
    """What travels from stage to stage (worker to worker, never through the client)."""

    values: dict[Key, Any] = field(default_factory=dict)
    hidden: torch.Tensor | None = None
    #: Gradients going back across shard boundaries: ``(shard, pass, step)`` -> the gradient of the
    #: hidden state that entered ``shard`` at that pass and step (what the shard before it left).
    grads: dict[tuple[int, int, int], torch.Tensor] = field(default_factory=dict)
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: torch.Tensor | None = None
    unfinished: torch.Tensor | None = None
    stopped: bool = False
    steps_run: int = 0
    logs: list[str] = field(default_factory=list)
    #: Each invoke's rows of the pass's batch (set by the first shard, which resolves the inputs).
    layout: list[tuple[int, int]] = field(default_factory=list)


def plan_stages(graph: InterventionGraph, shards: list[int], n_shards: int) -> list[Stage]:
    """The chain: per pass and step, every shard forward; then backward stages where needed."""
    origins = backward_origins(graph, shards)
    stages: list[Stage] = []
    for index, run in enumerate(graph.passes):
        steps = run.steps if run.kind == "generate" else 1
        for step in range(steps):
            stages.extend(Stage(index, step, s) for s in range(n_shards))
        if index in origins:
            stages.extend(Stage(index, 0, s, "backward") for s in reversed(range(origins[index])))
    return stages


def idle(carry: Carry) -> bool:
    """Nothing to compute for this experiment here: it stopped, or every sequence it generates ended."""
    return carry.stopped or (carry.unfinished is not None and not bool(carry.unfinished.any()))
