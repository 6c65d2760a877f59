"""Co-tenants: the experiments waiting on a shard run their stage as one forward pass (a shared pass).

A shared deployment is worth sharing when many experiments cost little more than one: one forward
pass over ten prompts costs a fraction of ten passes (3.4x less for SmolLM2 on one CPU thread, about
10x on a GPU). The co-tenants of a pass are experiments of any users; none may notice the others:

* each co-tenant's inputs keep their own rows of the model's batch and their own length (the rows are
  right-padded, see :func:`.batching.stack_cotenants`), so its tokens keep their positions and, the
  model being causal, never attend to another co-tenant's rows or to padding;
* each co-tenant keeps its own :class:`~.interleaver.Interleaver`, which reads and writes only the
  co-tenant's :class:`~.batching.Window` of every value (views, so in-place edits write through);
* a co-tenant's error or ``stop()`` halts that co-tenant only (:attr:`.module_hooks.Seat.halted`), a
  cancelled or timed-out one leaves the pass at the next layer, and the pass goes on for the others.

The pass itself is :meth:`.shard_runner.ShardRunner.forward`; an experiment alone is a pass of one
co-tenant, with its own inputs, cache and hidden state as they are (no window, no padding).

Stacked matrix products are not bit-identical to one-prompt ones (a member's values differ from its
solo run's by up to 4e-7 relative on the tests' tiny models, 2e-5 on SmolLM2-135M,
``bench/cotenancy_rounding.py``), so experiments that must reproduce bit for bit ask for ``batching=False``.

Generations share steps too, each co-tenant with its own KV cache (:mod:`.cache_rows`): one whose
sequences all ended leaves the pass, one arriving with its first step joins at the next (continuous
batching), and each co-tenant's interventions fire on its own steps.

What may share a pass is decided by :func:`can_share`: forward stages of experiments whose graph
needs no autograd, skips no module and samples no token. Gradients stay solo on purpose: co-tenants
of one pass share one autograd graph, and one's ``backward()`` without ``retain_graph`` would free
the buffers another's backward needs. Sampled generations too: their draws must see a solo run's
logits bit for bit to repeat a local run with the same seed.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..graph.node import Kind
from .batching import Window, stack_cotenants
from .cache_rows import cache_length, merge_caches, split_cache
from .interleaver import ExperimentStopped
from .module_hooks import Seat
from .shard_state import ExperimentState
from .stage import Carry, Stage


@dataclass
class CoTenant:
    """One experiment's stage in a shared pass on a shard, and what became of it."""

    state: ExperimentState
    stage: Stage
    carry: Carry
    #: The stage's outcome: the experiment's next carry, or why it failed or stopped.
    outcome: Carry | BaseException | None = None

    @property
    def generates(self) -> bool:
        """Whether this stage is a step of a generation (it has a KV cache on the shard)."""
        return self.state.graph.passes[self.stage.pass_index].kind == "generate"


def can_share(state: ExperimentState, stage: Stage) -> bool:
    """Whether this stage of this experiment may run in a pass with other experiments' stages."""
    graph = state.graph
    if stage.direction != "forward" or graph.options.get("batching") is False or graph.needs_grad:
        return False
    if graph.passes[stage.pass_index].kwargs.get("do_sample"):
        return False  # a draw must see the logits of a solo run, bit for bit, to repeat a local one
    return not any(graph.nodes[i].kind == Kind.SKIP for i in state.owned)


def footprint(carry: Carry, state: ExperimentState, stage: Stage) -> tuple[int, int]:
    """The rows and the longest length this co-tenant brings to a shared pass (``max_batch_tokens``
    bounds rows x longest length over the pass)."""
    if stage.shard == 0 and stage.step == 0:  # the pass begins here: its inputs are the graph's
        # an input taken from an earlier trace is not known yet: it counts once its pass has begun
        shapes = [inv["input_ids"].shape for inv in state.graph.passes[stage.pass_index].invokes
                  if isinstance(inv.get("input_ids"), torch.Tensor)]
        return sum(int(s[0]) for s in shapes) or 1, max((int(s[-1]) for s in shapes), default=1)
    ids = carry.inputs.get("input_ids")
    return (int(ids.shape[0]), int(ids.shape[-1])) if ids is not None else (1, 1)


class PassInputs:
    """The model's inputs for one pass of ``tenants``, and each one's :class:`~.batching.Window`.

    Alone, a tenant's own inputs and KV cache (its window None: it sees every value whole). Several
    are stacked (:func:`.batching.stack_cotenants`), their caches merged into one for the step and
    split back after it (:meth:`keep_caches`).
    """

    def __init__(self, tenants: Sequence[CoTenant], pad_token_id: int, cache_argument: str) -> None:
        self.tenants = tenants
        self._pasts: list[int] = []
        self._merged: Any = None
        if len(tenants) == 1:
            self.inputs = _own_inputs(tenants[0], cache_argument)
            self.windows: list[Window | None] = [None]
            self.seq = int(self.inputs["input_ids"].shape[1])
            return
        caches = [t.state.caches.get(t.stage.pass_index) if t.generates else None for t in tenants]
        self._pasts = [cache_length(c) for c in caches]
        self.inputs, windows = stack_cotenants([t.carry.inputs for t in tenants], pad_token_id, self._pasts)
        self.windows = list(windows)
        self.seq = windows[0].seq or 0
        if any(t.generates for t in tenants):
            longest = max(self._pasts)
            self._merged = merge_caches(caches, [w.stop - w.start for w in windows])
            self.inputs.update({cache_argument: self._merged, "use_cache": True,
                                "cache_position": torch.arange(longest, longest + self.seq)})
        else:
            self.inputs["use_cache"] = False

    def keep_caches(self, seats: Sequence[Seat]) -> None:
        """After the step: each generating tenant still in the pass takes its rows of the merged cache."""
        if self._merged is None:
            return
        longest = max(self._pasts)
        for tenant, seat, past in zip(self.tenants, seats, self._pasts):
            if tenant.generates and seat.halted is None:
                tenant.state.caches[tenant.stage.pass_index] = split_cache(
                    self._merged, seat.window, past, longest)  # type: ignore[arg-type]


def _own_inputs(tenant: CoTenant, cache_argument: str) -> dict[str, Any]:
    """A tenant's inputs as they are; a generation step gets its own KV cache."""
    inputs = dict(tenant.carry.inputs)
    if tenant.generates:
        from transformers import DynamicCache

        cache = tenant.state.caches.setdefault(tenant.stage.pass_index, DynamicCache())
        past = cache.get_seq_length()
        length = inputs["input_ids"].shape[1]
        inputs.update({cache_argument: cache, "use_cache": True, "cache_position": torch.arange(past, past + length)})
    else:
        inputs["use_cache"] = False
    return inputs


class EveryoneLeft(Exception):
    """Every tenant of the pass halted: it has nobody left to compute for."""


def stop_hook(tenants: Sequence[CoTenant], seats: Sequence[Seat]) -> Any:
    """A pre-hook for every decoder layer: tenants told to stop (cancel, timeout, undeploy) leave
    the pass here, within one layer, and the pass ends (:class:`EveryoneLeft`) once nobody is left."""
    pairs = list(zip(tenants, seats))

    def hook(_module: torch.nn.Module, _args: Any) -> None:
        for tenant, seat in pairs:
            should_stop = tenant.state.should_stop
            if seat.halted is None and should_stop is not None:
                error = should_stop()
                if error is not None:
                    seat.halt(ExperimentStopped(error))
        if all(seat.halted is not None for seat in seats):
            raise EveryoneLeft
    return hook
