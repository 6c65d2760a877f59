"""One shard's part of an experiment: run its layers for one step, its interventions, hand on.

A remote experiment is a chain of stages. Each stage runs on the shard that owns a range of
layers, receives a :class:`Carry` (the hidden state leaving the previous shard, the values later
nodes need, the saves so far) and returns the next one. Gradients come back through the shards
in reverse order in backward stages. Everything that must outlive a stage (module call counts,
KV caches, the autograd graph) stays in the shard's :class:`ExperimentState`.

An experiment can be stopped while it runs: the shard gives its state a ``should_stop`` callable,
checked at the start of every stage, by a forward pre-hook before every decoder layer of the shard,
and by the interleaver before every intervention node; when it answers an error,
:class:`ExperimentStopped` carrying that error leaves the model at once (within one layer's compute or
one operation, each bounded by the deployment's policy) and the shard turns it into the experiment's outcome.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..backends.base import SaveSink
from ..errors import InterventionError
from ..graph.allocation import ExperimentBudget, OpBounds
from ..graph.graph import InterventionGraph
from ..graph.node import Kind, Ref
from .batching import (
    batch_token_inputs,
    forward_position_ids,
    position_ids_for,
    resolve_inputs,
)
from .interleaver import SKIPPED, ExperimentStopped, Interleaver, Key, StopForward
from .partition import assign_shards, backward_origins
from .runner import _check_reached, _modules, collect_saves, persisted_name
from .sampling import SeededSampler


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


@dataclass
class ExperimentState:
    """A shard's memory of one experiment between its stages."""

    graph: InterventionGraph
    shards: list[int]
    owned: set[int]
    exported: set[int]
    backward_from: dict[int, int]
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


class ShardRunner:
    """Runs stages on shard ``index`` of ``n_shards`` (a model cut to its layers, the others passed through).

    ``owner(module_path)`` names the shard that owns a module; ``first_layer``/``last_layer`` are
    where the hidden state enters and leaves this shard. The runner knows nothing of how shards
    are planned or where saves are stored: both are given to it.
    """

    def __init__(self, model: torch.nn.Module, index: int, n_shards: int, owner: Callable[[str], int],
                 first_layer: torch.nn.Module, last_layer: torch.nn.Module, pad_token_id: int) -> None:
        self.model = model
        self.index = index
        self.n_shards = n_shards
        self.owner = owner
        self.last = index == n_shards - 1
        self.pad_token_id = pad_token_id
        self.first_layer = first_layer
        self.last_layer = last_layer
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos = [eos] if isinstance(eos, int) else list(eos or [])
        #: This shard's decoder layers, where the stop hook checks before each one.
        self.layers = _layers_between(model, first_layer, last_layer)
        #: The name the model's forward takes its KV cache by (``cache`` from transformers 5.24 on).
        self.cache_argument = cache_argument(model)

    def start(self, graph: InterventionGraph, sink: SaveSink | None = None, *, bounds: OpBounds | None = None,
              vocab_size: int | None = None, max_prompt_tokens: int | None = None) -> ExperimentState:
        """This shard's state for a new experiment; ``sink`` receives the large saves it produces;
        ops over ``bounds`` (size, work, the experiment's memory) are refused before they run; an
        input taken from an earlier trace must fit ``vocab_size`` and ``max_prompt_tokens``."""
        shards = assign_shards(graph, self.owner, self.n_shards)
        owned = {i for i, s in enumerate(shards) if s == self.index}
        _modules(self.model, graph, {graph.nodes[i].module for i in owned if graph.nodes[i].module is not None})
        exported = {node.id for node in graph.nodes if node.kind == Kind.SAVE and node.id in owned}
        for node in graph.nodes:
            for dep in node.deps():
                if dep in owned and shards[node.id] != self.index:
                    exported.add(dep)
        for run in graph.passes:  # inputs taken from earlier traces travel to the first shard
            for invoke in run.invokes:
                ref = invoke.get("input_ids")
                if isinstance(ref, Ref) and ref.id in owned and self.index != 0:
                    exported.add(ref.id)
        mine = [stage for stage in plan_stages(graph, shards, self.n_shards) if stage.shard == self.index]
        return ExperimentState(graph=graph, shards=shards, owned=owned, exported=exported,
                               backward_from=backward_origins(graph, shards), last_stage=mine[-1] if mine else None,
                               sink=sink, budget=ExperimentBudget(bounds) if bounds is not None else None,
                               vocab_size=vocab_size,
                               max_prompt_tokens=max_prompt_tokens)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, state: ExperimentState, stage: Stage, carry: Carry) -> Carry:
        inter = self.begin(state, stage, carry)
        if idle(carry):
            return self.conclude(state, stage, carry, inter)
        handles: list[Any] = []
        exit_value: list[Any] = []
        output = None
        try:
            if state.should_stop is not None:
                stop_hook = _stop_hook(state)
                handles.extend(layer.register_forward_pre_hook(stop_hook, prepend=True) for layer in self.layers)
            if self.index > 0:
                handles.append(self.first_layer.register_forward_pre_hook(
                    self._entry_hook(state, stage, carry.hidden), with_kwargs=True))
            for path in inter.module_paths():
                handles.extend(inter.watch_module(inter.modules[path], path))
            handles.extend(self.exit_hooks(exit_value))
            with torch.enable_grad() if state.graph.needs_grad else torch.no_grad():
                try:
                    inter.drain()
                    output = self.model(**self._model_inputs(state, stage, carry))
                except StopForward:
                    if not exit_value:
                        carry.stopped = True
        finally:
            for handle in handles:
                handle.remove()
        return self.conclude(state, stage, carry, inter, exit_value[0] if exit_value else None, output)

    def begin(self, state: ExperimentState, stage: Stage, carry: Carry) -> Interleaver:
        """Everything before the model runs: the stop check, the first inputs (shard 0, step 0),
        the pass's interleaver with the values that arrived. The same alone and in a batch."""
        _check_stop(state)
        graph = state.graph
        run = graph.passes[stage.pass_index]
        generate = run.kind == "generate"
        if stage.step == 0 and stage.shard == 0:
            self._first_inputs(state, carry, stage.pass_index, generate)
        inter = state.interleavers.get(stage.pass_index)
        if inter is None:
            paths = {graph.nodes[i].module for i in state.owned if graph.nodes[i].module is not None}
            inter = Interleaver(graph, stage.pass_index, carry.layout, state.values,
                                run.steps if generate else 1, _modules(self.model, graph, paths), carry.logs,
                                owned=state.owned, budget=state.budget, should_stop=state.should_stop)
            state.interleavers[stage.pass_index] = inter
        inter.logs = carry.logs
        inter.receive(carry.values)
        return inter

    def exit_hooks(self, store: list[Any]) -> list[Any]:
        """On a shard before the last: end the forward where the shard's layers end, keeping the
        hidden state leaving them in ``store``."""
        return [] if self.last else [self.last_layer.register_forward_hook(_exit_hook(store))]

    def conclude(self, state: ExperimentState, stage: Stage, carry: Carry, inter: Interleaver,
                 exit_hidden: Any = None, output: Any = None) -> Carry:
        """Everything after the model ran (``exit_hidden``/``output``: this experiment's part of them):
        the hidden state to hand on, the next token, the values and saves to export."""
        run = state.graph.passes[stage.pass_index]
        steps = run.steps if run.kind == "generate" else 1
        carry.hidden = None
        if exit_hidden is not None:
            hidden = exit_hidden[0] if isinstance(exit_hidden, tuple) else exit_hidden
            if state.graph.needs_grad:
                state.exits[(stage.pass_index, stage.step)] = hidden
            carry.hidden = hidden.detach()
        if self.last and output is not None:
            carry.steps_run = stage.step + 1
            if run.kind == "generate":
                self._next_token(state, stage, carry, output)
        final = stage.step == steps - 1 or idle(carry)
        return self._export(state, carry, inter, final=final, stage=stage, output=output)

    def _first_inputs(self, state: ExperimentState, carry: Carry, pass_index: int, generate: bool) -> None:
        run = state.graph.passes[pass_index]
        invokes = resolve_inputs(run.invokes, {**state.values, **carry.values}, pass_index,
                                 vocab_size=state.vocab_size, max_prompt_tokens=state.max_prompt_tokens)
        batch, carry.layout = batch_token_inputs(invokes, self.pad_token_id)
        carry.inputs = dict(batch)
        if generate:
            # as transformers' generate: positions from the attention mask (padding is masked out)
            mask = batch["attention_mask"]
            positions = position_ids_for(mask).masked_fill(mask == 0, 1)
            carry.inputs["position_ids"] = positions
            carry.tokens = batch["input_ids"]
            carry.unfinished = torch.ones(batch["input_ids"].shape[0], dtype=torch.bool)
        else:  # as the local runner: the model's own positions unless the graph asks for solo ones
            positions = forward_position_ids(batch, state.graph.options)
            if positions is not None:
                carry.inputs["position_ids"] = positions
        carry.stopped = False

    def _model_inputs(self, state: ExperimentState, stage: Stage, carry: Carry) -> dict[str, Any]:
        inputs = dict(carry.inputs)
        if state.graph.passes[stage.pass_index].kind == "generate":
            from transformers import DynamicCache

            cache = state.caches.setdefault(stage.pass_index, DynamicCache())
            past = cache.get_seq_length()
            length = inputs["input_ids"].shape[1]
            inputs.update({self.cache_argument: cache, "use_cache": True,
                           "cache_position": torch.arange(past, past + length)})
        else:
            inputs["use_cache"] = False
        return inputs

    def _entry_hook(self, state: ExperimentState | None, stage: Stage | None, hidden: torch.Tensor | None) -> Any:
        """Hand ``hidden`` (from the shard before) to this shard's first layer; for a graph that needs
        grad, ``state`` keeps it as the leaf where gradients going back to that shard arrive."""
        if hidden is None:
            raise InterventionError(f"shard {self.index} received no hidden state from shard {self.index - 1}")
        if state is not None and stage is not None and state.graph.needs_grad:
            hidden = hidden.detach().requires_grad_(True)
            state.entries[(stage.pass_index, stage.step)] = hidden

        def hook(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}
        return hook

    def _next_token(self, state: ExperimentState, stage: Stage, carry: Carry, output: Any) -> None:
        logits = output.logits if hasattr(output, "logits") else output[0]
        sampler = state.samplers.get(stage.pass_index)
        if sampler is None and stage.pass_index not in state.samplers:
            sampler = state.samplers[stage.pass_index] = SeededSampler.from_options(
                state.graph.passes[stage.pass_index].kwargs)
        tokens = logits[:, -1].argmax(-1) if sampler is None else sampler.pick(logits[:, -1].float())
        unfinished = carry.unfinished if carry.unfinished is not None else torch.ones_like(tokens, dtype=torch.bool)
        tokens = torch.where(unfinished, tokens, torch.full_like(tokens, self.pad_token_id))
        carry.tokens = torch.cat([carry.tokens, tokens[:, None]], dim=1)  # type: ignore[list-item]
        if self.eos:
            unfinished = unfinished & ~torch.isin(tokens, torch.tensor(self.eos))
        carry.unfinished = unfinished
        mask = carry.inputs["attention_mask"]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = carry.inputs["position_ids"][:, -1:] + 1
        carry.inputs = {"input_ids": tokens[:, None], "attention_mask": mask, "position_ids": positions}

    # -- backward -------------------------------------------------------------------------------
    def backward(self, state: ExperimentState, stage: Stage, carry: Carry) -> Carry:
        _check_stop(state)
        inter = state.interleavers[stage.pass_index]
        inter.logs = carry.logs
        inter.receive(carry.values)
        # every step's hidden state that left this shard and got a gradient from the next shard
        arriving = [(state.exits[(p, t)], grad) for (shard, p, t), grad in carry.grads.items()
                    if shard == self.index + 1 and p == stage.pass_index and (p, t) in state.exits]
        if not arriving:
            raise InterventionError(f"shard {self.index} has no forward activations to run backward through")
        with torch.enable_grad():
            torch.autograd.backward([exit for exit, _ in arriving], [grad for _, grad in arriving])
        inter.drain()
        return self._export(state, carry, inter, final=True, stage=stage)

    def _drop_weight_grads(self) -> None:
        """Backward through a shard accumulates ``.grad`` into its (shared) weights: nobody may read
        it, and kept it would hold a weight-sized buffer summed over every user. Dropped after each stage."""
        for parameter in self.model.parameters():
            parameter.grad = None

    # -- handing on ---------------------------------------------------------------------------------
    def _export(self, state: ExperimentState, carry: Carry, inter: Interleaver, *, final: bool, stage: Stage,
                output: Any = None) -> Carry:
        if state.graph.needs_grad:
            self._drop_weight_grads()
        if final and stage.direction == "forward":
            if self.last:
                try:
                    inter.finish(carry.tokens if state.graph.passes[stage.pass_index].kind == "generate" else output)
                except StopForward:
                    pass
            backward_later = self.index < state.backward_from.get(stage.pass_index, 0)
            if not backward_later:
                _check_reached(inter, carry.steps_run or (stage.step + 1))
        elif final and stage.direction == "backward":
            _check_reached(inter, carry.steps_run or 1)
        for (pass_index, step), entry in state.entries.items():  # gradients for the shard before
            if entry.grad is not None:
                carry.grads[(self.index, pass_index, step)] = entry.grad
        exported = {key: _through_sink(state, key, value) for key, value in state.values.items()
                    if _node_of(key) in state.exported and key not in carry.values}
        carry.values.update(exported)
        return carry


def cache_argument(model: torch.nn.Module) -> str:
    """``cache`` where the model's forward takes it (transformers >= 5.24 deprecates the old name),
    else ``past_key_values``."""
    import inspect

    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def idle(carry: Carry) -> bool:
    """Nothing to compute for this experiment here: it stopped, or every sequence it generates ended."""
    return carry.stopped or (carry.unfinished is not None and not bool(carry.unfinished.any()))


def _through_sink(state: ExperimentState, key: Key, value: Any) -> Any:
    """A saved tensor goes through the experiment's sink here, on the shard that produced it; what
    travels on is what the sink returns (a reference, for a value it wrote).

    Only saves no other node reads go to the sink (a node on another shard needs the tensor itself).
    """
    if state.sink is None or not isinstance(value, torch.Tensor):
        return value
    node = state.graph.nodes[_node_of(key)]
    if node.kind != Kind.SAVE or node.id not in state.owned or node.id in _read_nodes(state.graph):
        return value
    return state.sink.write(persisted_name(node.target or f"save{node.id}", key), value.detach())


def _read_nodes(graph: InterventionGraph) -> set[int]:
    cached = getattr(graph, "_read_nodes_cache", None)
    if cached is None:
        cached = {dep for node in graph.nodes for dep in node.deps()}
        graph._read_nodes_cache = cached  # type: ignore[attr-defined]
    return cached


def _node_of(key: Key) -> Any:
    return key[0] if isinstance(key, tuple) else key


def _check_stop(state: ExperimentState) -> None:
    error = state.should_stop() if state.should_stop is not None else None
    if error is not None:
        raise ExperimentStopped(error)


def _stop_hook(state: ExperimentState) -> Any:
    def hook(_module: torch.nn.Module, _args: Any) -> None:
        _check_stop(state)
    return hook


def _layers_between(model: torch.nn.Module, first: torch.nn.Module, last: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers from ``first`` to ``last`` of the module list holding them (just the two if none does)."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            items = list(module)
            start = next((i for i, m in enumerate(items) if m is first), None)
            stop = next((i for i, m in enumerate(items) if m is last), None)
            if start is not None and stop is not None and start <= stop:
                return items[start:stop + 1]
    return [first] if first is last else [first, last]


def _exit_hook(store: list[Any]) -> Any:
    def hook(_module: torch.nn.Module, _args: Any, output: Any) -> Any:
        store.append(output)
        raise StopForward
    return hook


def collect_results(graph: InterventionGraph, values: dict[Key, Any]) -> dict[str, Any]:
    """Saved values by name from the values that reached the end of the chain."""
    saves = collect_saves(graph, values)
    return {k: (None if v is SKIPPED else v) for k, v in saves.items()}


__all__ = ["Carry", "ExperimentState", "ExperimentStopped", "ShardRunner", "Stage", "collect_results", "plan_stages",
           "run_pipeline"]


def run_pipeline(runners: list[ShardRunner], graph: InterventionGraph, transport: Any = None) -> tuple[dict[str, Any], list[str]]:
    """Run the whole chain in this process (``transport`` may round-trip each carry, as a wire would).

    The Dask scheduler runs exactly these stages, each on its shard's worker; this in-process
    version is the reference for it and lets the partitioning be tested without a cluster.
    """
    states = [runner.start(graph) for runner in runners]
    carry = Carry()
    for stage in plan_stages(graph, states[0].shards, len(runners)):
        runner, state = runners[stage.shard], states[stage.shard]
        if stage.direction == "forward":
            carry = runner.forward(state, stage, carry)
        else:
            carry = runner.backward(state, stage, carry)
        if transport is not None:
            carry = transport(carry)
    return collect_results(graph, carry.values), carry.logs
