"""Co-tenant batches: the experiments waiting on a shard run their stage as one forward pass.

A shared deployment is worth sharing when many experiments cost little more than one: a batched
forward pass of ten prompts costs a fraction of ten passes (3.4x less for SmolLM2 on one CPU thread,
about 10x on a GPU). The members of a batch are experiments of any users; none may notice the others:

* each member's inputs keep their own rows and their own length (the batch is right-padded, see
  :func:`.batching.stack_members`), so its tokens keep their positions and, the model being causal,
  never attend to another member's rows or to padding;
* each member keeps its own :class:`~.interleaver.Interleaver`, which reads and writes only the
  member's :class:`~.batching.Window` of every value (views, so in-place edits write through);
* a member's error or ``stop()`` halts that member only (:attr:`Interleaver.halted`), a cancelled or
  timed-out member leaves the pass at the next layer, and the pass goes on for the others.

Batched matrix products are not bit-identical to batch-1 ones (on SmolLM2 logits differ by up to
7.5e-5), so experiments that must reproduce bit for bit ask for ``batching=False``.

Generations share steps too, each member with its own KV cache (:mod:`.cache_rows`): a member
whose sequences all ended leaves the batch, one arriving with its first step joins at the next
(continuous batching), and each member's interventions fire on its own steps.

What may share a pass is decided by :func:`can_share`: forward stages of experiments whose graph
needs no autograd, skips no module and samples no token. Gradients stay solo on purpose: members
of one batch share one autograd graph, and one member's ``backward()`` without ``retain_graph``
would free the buffers another member's backward needs. Sampled generations too: their draws must
see a solo run's logits bit for bit to repeat a local run with the same seed.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..graph.node import Kind
from .batching import narrow_window, stack_hidden, stack_members
from .cache_rows import cache_length, merge_caches, split_cache
from .interleaver import Interleaver, Quiet, StopForward
from .stage import Carry, ExperimentState, ExperimentStopped, ShardRunner, Stage, idle


@dataclass
class Member:
    """One experiment's place in a co-tenant batch, and what became of it."""

    state: ExperimentState
    stage: Stage
    carry: Carry
    inter: Interleaver | None = None
    #: The member's outcome: its next carry, or why it failed or stopped.
    outcome: Carry | BaseException | None = None


def can_share(state: ExperimentState, stage: Stage) -> bool:
    """Whether this stage of this experiment may run in a batch with other experiments' stages."""
    graph = state.graph
    if stage.direction != "forward" or graph.options.get("batching") is False or graph.needs_grad:
        return False
    if graph.passes[stage.pass_index].kwargs.get("do_sample"):
        return False  # a draw must see the logits of a solo run, bit for bit, to repeat a local one
    return not any(graph.nodes[i].kind == Kind.SKIP for i in state.owned)


def footprint(carry: Carry, state: ExperimentState, stage: Stage) -> tuple[int, int]:
    """The rows and the longest length this member brings to a batch (``max_batch_tokens`` bounds
    rows x longest length over the batch)."""
    if stage.shard == 0 and stage.step == 0:  # the pass begins here: its inputs are the graph's
        # an input taken from an earlier trace is not known yet: it counts once its pass has begun
        shapes = [inv["input_ids"].shape for inv in state.graph.passes[stage.pass_index].invokes
                  if isinstance(inv.get("input_ids"), torch.Tensor)]
        return sum(int(s[0]) for s in shapes) or 1, max((int(s[-1]) for s in shapes), default=1)
    ids = carry.inputs.get("input_ids")
    return (int(ids.shape[0]), int(ids.shape[-1])) if ids is not None else (1, 1)


def forward_together(runner: ShardRunner, members: Sequence[Member]) -> None:
    """Run the forward stage of every member in one pass of the shard's model; sets each ``outcome``.

    Members must pass :func:`can_share`. Nothing raised by one member escapes: every error ends in
    that member's outcome.
    """
    quiet = Quiet()
    live: list[Member] = []
    for member in members:
        try:
            member.inter = runner.begin(member.state, member.stage, member.carry)
            if idle(member.carry):
                member.outcome = runner.conclude(member.state, member.stage, member.carry, member.inter)
                continue
        except Exception as exc:
            member.outcome = exc
            continue
        member.inter.quiet = quiet
        live.append(member)
    if not live:
        return
    caches = [_cache_of(m) for m in live]
    pasts = [cache_length(c) for c in caches]
    inputs, windows = stack_members([m.carry.inputs for m in live], runner.pad_token_id, pasts)
    for member, window in zip(live, windows):
        member.inter.window = window  # type: ignore[union-attr]
    longest_past, seq = max(pasts), windows[0].seq
    merged = None
    if any(_generates(m) for m in live):
        merged = merge_caches(caches, [w.stop - w.start for w in windows])
        inputs.update({runner.cache_argument: merged, "use_cache": True,
                       "cache_position": torch.arange(longest_past, longest_past + seq)})
    else:
        inputs["use_cache"] = False
    exit_value: list[Any] = []
    output = None
    handles: list[Any] = [layer.register_forward_pre_hook(_stop_members(live), prepend=True)
                          for layer in runner.layers]
    try:
        if runner.index > 0:
            hidden = stack_hidden([m.carry.hidden for m in live], seq)  # type: ignore[misc]
            handles.append(runner.first_layer.register_forward_pre_hook(
                runner._entry_hook(None, None, hidden), with_kwargs=True))
        for member in live:
            inter = member.inter
            assert inter is not None
            for path in inter.module_paths():
                handles.extend(inter.watch_module(inter.modules[path], path))
        handles.extend(runner.exit_hooks(exit_value))
        for member in live:
            member.inter.run_alongside(member.inter.drain)  # type: ignore[union-attr]
        with torch.no_grad():
            try:
                if any(m.inter.halted is None for m in live):  # type: ignore[union-attr]
                    output = runner.model(**inputs)
            except StopForward:
                pass  # the shard's last layer ended the pass (a shard before the last)
            except _EveryoneLeft:
                pass
    finally:
        for handle in handles:
            handle.remove()
    if merged is not None:
        for member, past in zip(live, pasts):
            if _generates(member) and member.inter.halted is None:  # type: ignore[union-attr]
                member.state.caches[member.stage.pass_index] = split_cache(
                    merged, member.inter.window, past, longest_past)  # type: ignore[union-attr,arg-type]
    for member in live:
        _conclude(runner, member, exit_value[0] if exit_value else None, output)


def _generates(member: Member) -> bool:
    return member.state.graph.passes[member.stage.pass_index].kind == "generate"


def _cache_of(member: Member) -> Any:
    """The member's KV cache of this pass on this shard (None: a trace, or no step ran yet)."""
    return member.state.caches.get(member.stage.pass_index) if _generates(member) else None


def _conclude(runner: ShardRunner, member: Member, exit_hidden: Any, output: Any) -> None:
    inter = member.inter
    assert inter is not None and inter.window is not None
    window = inter.window
    halted = inter.halted
    if isinstance(halted, StopForward):  # the member's own stop(): as alone, the run ends here
        member.carry.stopped = True
        exit_hidden = output = None
    elif halted is not None:
        member.outcome = halted
        return
    try:
        # the hidden state handed on is the member's own copy, not a view holding the whole batch
        own_exit = narrow_window(exit_hidden, window)
        if isinstance(own_exit, tuple):
            own_exit = own_exit[0]
        member.outcome = runner.conclude(member.state, member.stage, member.carry, inter,
                                         own_exit.contiguous() if own_exit is not None else None,
                                         narrow_window(output, window))
    except Exception as exc:
        member.outcome = exc


class _EveryoneLeft(Exception):
    """Every member of the batch halted: the pass has nobody left to compute for."""


def _stop_members(live: Sequence[Member]) -> Any:
    """A pre-hook for every decoder layer: members told to stop (cancel, timeout, undeploy) leave
    the pass here, within one layer, and the pass ends once nobody is left."""

    def hook(_module: torch.nn.Module, _args: Any) -> None:
        for member in live:
            inter = member.inter
            if inter is None or inter.halted is not None or member.state.should_stop is None:
                continue
            error = member.state.should_stop()
            if error is not None:
                inter.halted = ExperimentStopped(error)
        if all(m.inter is not None and m.inter.halted is not None for m in live):
            raise _EveryoneLeft
    return hook
