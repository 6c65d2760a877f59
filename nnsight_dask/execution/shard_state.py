"""What a shard remembers of one experiment between its stages.

Everything that must outlive a stage (module call counts in each pass's interleaver, KV caches,
the autograd graph's entry and exit points) stays here; the shard server holds one per experiment
and forgets it after the experiment's last stage on the shard.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..backends.base import SaveSink
from ..graph.allocation import ExperimentBudget
from ..graph.graph import InterventionGraph
from .interleaver import ExperimentStopped, Interleaver
from .plan import Key
from .sampling import SeededSampler
from .stage import Stage


@dataclass
class ExperimentState:
    """A shard's memory of one experiment between its stages."""

    graph: InterventionGraph
    shards: list[int]
    owned: set[int]
    exported: set[int]
    backward_from: dict[int, int]
    #: Nodes some node reads as an argument (a save among them must travel as a tensor, not a reference).
    read: set[int] = field(default_factory=set)
    values: dict[Key, Any] = field(default_factory=dict)
    interleavers: dict[int, Interleaver] = field(default_factory=dict)
    caches: dict[int, Any] = field(default_factory=dict)
    #: Per ``(pass, step)``: the hidden state that entered this shard (a leaf gradients reach) and the
    #: one that left it (where gradients from the next shard enter), kept only when the graph needs grad.
    entries: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    exits: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    touched: float = field(default_factory=time.monotonic)
    busy_seconds: float = 0.0
    #: Where this shard writes the experiment's large saves (None: every save travels inline).
    sink: SaveSink | None = None
    #: This shard's last stage of the experiment: after it the shard forgets the experiment.
    last_stage: Stage | None = None
    #: Asked before every stage and decoder layer: an error when the experiment must stop, else None.
    should_stop: Callable[[], BaseException | None] | None = None
    #: The deployment's bounds on each of the experiment's ops and on its memory, and what it holds.
    budget: ExperimentBudget | None = None
    #: Bounds on inputs taken from earlier traces, checked when their pass starts: the model's
    #: vocabulary and the deployment's prompt length.
    vocab_size: int | None = None
    max_prompt_tokens: int | None = None
    #: When this shard first saw the experiment (``time.monotonic()``).
    started: float = field(default_factory=time.monotonic)
    #: Per generation pass, its seeded sampler (None: greedy), made at its first step on the last shard.
    samplers: dict[int, SeededSampler | None] = field(default_factory=dict)


def check_stop(state: ExperimentState) -> None:
    """Raise :class:`ExperimentStopped` when the experiment was told to stop (cancel, timeout, undeploy)."""
    error = state.should_stop() if state.should_stop is not None else None
    if error is not None:
        raise ExperimentStopped(error)
