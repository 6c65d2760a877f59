"""One shard's part of an experiment: run its layers for one step, its interventions, hand on.

A :class:`ShardRunner` runs the stages (:mod:`.stage`) of any number of experiments on shard
``index`` of a model. A forward stage is one pass of the shard's layers for the experiments waiting
there together (co-tenants, :mod:`.cotenancy`); an experiment alone is a pass of one. What must
outlive a stage stays in the shard's :class:`~.shard_state.ExperimentState`.

An experiment can be stopped while it runs: the shard gives its state a ``should_stop`` callable,
checked at the start of every stage, by a forward pre-hook before every decoder layer of the shard,
and by the interleaver before every intervention node; when it answers an error,
:class:`ExperimentStopped` carrying that error leaves the pass at once (within one layer's compute or
one operation, each bounded by the deployment's policy) and becomes the experiment's outcome.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..backends.base import SaveSink
from ..errors import InterventionError
from ..graph.allocation import ExperimentBudget, OpBounds
from ..graph.graph import InterventionGraph
from ..graph.node import Kind, Ref
from .batching import Window, narrow_window, stack_hidden
from .cotenancy import CoTenant, EveryoneLeft, PassInputs, stop_hook
from .executor import Quiet
from .generation_step import first_inputs, next_token
from .interleaver import ExperimentStopped, Interleaver, StopForward
from .module_hooks import Seat, graph_modules, hook_modules
from .partition import assign_shards, backward_origins
from .plan import Key, dependencies, node_id
from .saves import collect_saves, persisted_name
from .shard_state import ExperimentState, check_stop
from .stage import Carry, Stage, idle, plan_stages


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
        #: ``owner`` remembered per path: every experiment asks it of each of its nodes' modules.
        self.owner = functools.lru_cache(maxsize=4096)(owner)
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
        #: Raised while a graph calls one of the model's modules itself: nobody's hooks see that call.
        self.quiet = Quiet()

    def start(self, graph: InterventionGraph, sink: SaveSink | None = None, *, bounds: OpBounds | None = None,
              vocab_size: int | None = None, max_prompt_tokens: int | None = None) -> ExperimentState:
        """This shard's state for a new experiment; ``sink`` receives the large saves it produces;
        ops over ``bounds`` (size, work, the experiment's memory) are refused before they run; an
        input taken from an earlier trace must fit ``vocab_size`` and ``max_prompt_tokens``."""
        shards = assign_shards(graph, self.owner, self.n_shards)
        index = self.index
        owned = {i for i, s in enumerate(shards) if s == index}
        nodes = graph.nodes
        graph_modules(self.model, graph, {nodes[i].module for i in owned if nodes[i].module is not None})
        exported = {i for i in owned if nodes[i].kind == Kind.SAVE}
        read: set[int] = set()
        for node, deps in zip(nodes, dependencies(graph)):
            read.update(deps)
            if shards[node.id] != index:
                exported.update(dep for dep in deps if dep in owned)
        if index != 0:  # inputs taken from earlier traces travel to the first shard
            for run in graph.passes:
                for invoke in run.invokes:
                    ref = invoke.get("input_ids")
                    if isinstance(ref, Ref) and ref.id in owned:
                        exported.add(ref.id)
        mine = [stage for stage in plan_stages(graph, shards, self.n_shards) if stage.shard == index]
        return ExperimentState(graph=graph, shards=shards, owned=owned, exported=exported,
                               backward_from=backward_origins(graph, shards), read=read,
                               last_stage=mine[-1] if mine else None, sink=sink,
                               budget=ExperimentBudget(bounds) if bounds is not None else None,
                               vocab_size=vocab_size, max_prompt_tokens=max_prompt_tokens)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, tenants: Sequence[CoTenant]) -> None:
        """Run the forward stage of every tenant in one pass of the shard's model; sets each ``outcome``.

        Alone, a tenant runs on its own inputs, cache and hidden state, and may need gradients; several
        must pass :func:`~.cotenancy.can_share`. Nothing raised by one tenant escapes: every error
        ends in that tenant's outcome (an error that leaves the model itself, in all of theirs).
        """
        live: list[CoTenant] = []
        interleavers: list[Interleaver] = []
        for tenant in tenants:
            try:
                inter = self._begin(tenant.state, tenant.stage, tenant.carry)
                if idle(tenant.carry):
                    tenant.outcome = self._conclude(tenant.state, tenant.stage, tenant.carry, inter)
                    continue
            except Exception as exc:
                tenant.outcome = exc
                continue
            live.append(tenant)
            interleavers.append(inter)
        if not live:
            return
        try:
            inputs = PassInputs(live, self.pad_token_id, self.cache_argument)
            hidden = self._entry_hidden(live, inputs.seq) if self.index > 0 else None
        except Exception as exc:
            for tenant in live:
                tenant.outcome = exc
            return
        seats = [Seat(inter, window) for inter, window in zip(interleavers, inputs.windows)]
        exit_value: list[Any] = []
        output = None
        handles: list[Any] = []
        if len(seats) > 1 or any(t.state.should_stop is not None for t in live):
            hook = stop_hook(live, seats)
            handles.extend(layer.register_forward_pre_hook(hook, prepend=True) for layer in self.layers)
        try:
            if hidden is not None:
                handles.append(self.first_layer.register_forward_pre_hook(_entry_hook(hidden), with_kwargs=True))
            handles.extend(hook_modules(seats, self.quiet))
            if not self.last:  # end the forward where the shard's layers end, keeping the hidden state
                handles.append(self.last_layer.register_forward_hook(_exit_hook(exit_value)))
            with torch.enable_grad() if any(t.state.graph.needs_grad for t in live) else torch.no_grad():
                for seat in seats:
                    seat.run(seat.interleaver.drain)
                if any(seat.halted is None for seat in seats):
                    output = self.model(**inputs.inputs)
        except StopForward:
            if not exit_value:  # not the shard's end: a lone tenant's own stop() (a windowed one halts itself)
                for seat in seats:
                    if seat.window is None:
                        seat.halt(StopForward())
        except EveryoneLeft:
            pass
        except Exception as exc:  # alone: the tenant's own error; shared: the model's, everyone's
            for seat in seats:
                seat.halt(exc)
        finally:
            for handle in handles:
                handle.remove()
        inputs.keep_caches(seats)
        exit_hidden = exit_value[0] if exit_value else None
        for tenant, seat in zip(live, seats):
            self._conclude_seat(tenant, seat, exit_hidden, output)

    def _begin(self, state: ExperimentState, stage: Stage, carry: Carry) -> Interleaver:
        """Everything before the model runs: the stop check, the first inputs (shard 0, step 0),
        the pass's interleaver with the values that arrived."""
        check_stop(state)
        graph = state.graph
        run = graph.passes[stage.pass_index]
        generate = run.kind == "generate"
        if stage.step == 0 and stage.shard == 0:
            first_inputs(state, carry, stage.pass_index, self.pad_token_id)
        inter = state.interleavers.get(stage.pass_index)
        if inter is None:
            paths = {graph.nodes[i].module for i in state.owned if graph.nodes[i].module is not None}
            inter = Interleaver(graph, stage.pass_index, carry.layout, state.values, run.steps if generate else 1,
                                graph_modules(self.model, graph, paths), [], quiet=self.quiet, owned=state.owned,
                                budget=state.budget, should_stop=state.should_stop)
            state.interleavers[stage.pass_index] = inter
        inter.receive(carry.values)
        return inter

    def _entry_hidden(self, tenants: Sequence[CoTenant], seq: int) -> torch.Tensor:
        """The hidden state entering this shard's first layer: a lone tenant's own (for a graph that
        needs grad, a leaf its state keeps: gradients for the shard before arrive there), or the
        tenants' stacked and padded to ``seq``."""
        hiddens = [t.carry.hidden for t in tenants]
        if any(h is None for h in hiddens):
            raise InterventionError(f"shard {self.index} received no hidden state from shard {self.index - 1}")
        if len(tenants) > 1:
            return stack_hidden(hiddens, seq)  # type: ignore[arg-type]
        (tenant,) = tenants
        hidden: torch.Tensor = hiddens[0]  # type: ignore[assignment]
        if tenant.state.graph.needs_grad:
            hidden = hidden.detach().requires_grad_(True)
            tenant.state.entries[(tenant.stage.pass_index, tenant.stage.step)] = hidden
        return hidden

    def _conclude_seat(self, tenant: CoTenant, seat: Seat, exit_hidden: Any, output: Any) -> None:
        """A tenant's outcome after the pass, from its window of the pass's values."""
        halted = seat.halted
        if isinstance(halted, StopForward):  # the tenant's own stop(): as alone, the run ends here
            tenant.carry.stopped = True
            exit_hidden = output = None
        elif halted is not None:
            tenant.outcome = halted
            return
        try:
            window = seat.window
            if window is not None:
                # the hidden state handed on is the tenant's own copy, not a view holding the whole batch
                own_exit = narrow_window(exit_hidden, window)
                if isinstance(own_exit, tuple):
                    own_exit = own_exit[0]
                exit_hidden = own_exit.contiguous() if own_exit is not None else None
            tenant.outcome = self._conclude(tenant.state, tenant.stage, tenant.carry, seat.interleaver,
                                            exit_hidden, output, window)
        except Exception as exc:
            tenant.outcome = exc

    def _conclude(self, state: ExperimentState, stage: Stage, carry: Carry, inter: Interleaver,
                  exit_hidden: Any = None, output: Any = None, window: Window | None = None) -> Carry:
        """Everything after the model ran: the hidden state to hand on (``exit_hidden``, this
        experiment's own), the next token, the values and saves to export. ``output`` is the pass's;
        this experiment's part of it is its ``window`` (None: all of it), cut only where it is read
        (the logits of a generation step, the pass's result)."""
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
                logits = output.logits if hasattr(output, "logits") else output[0]
                next_token(state, stage, carry, logits if window is None else narrow_window(logits, window),
                           self.pad_token_id, self.eos)
            elif window is not None and inter.plan.result_keys:
                output = narrow_window(output, window)
        final = stage.step == steps - 1 or idle(carry)
        return self._export(state, carry, inter, final=final, stage=stage, output=output)

    # -- backward -------------------------------------------------------------------------------
    def backward(self, state: ExperimentState, stage: Stage, carry: Carry) -> Carry:
        check_stop(state)
        inter = state.interleavers[stage.pass_index]
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
            if not backward_later and not carry.stopped:  # a stop() on an earlier shard excuses what it left
                inter.check_reached(carry.steps_run or (stage.step + 1))
        elif final and stage.direction == "backward":
            inter.check_reached(carry.steps_run or 1)
        carry.logs.extend(inter.take_logs())
        for (pass_index, step), entry in state.entries.items():  # gradients for the shard before
            if entry.grad is not None:
                carry.grads[(self.index, pass_index, step)] = entry.grad
        exported = {key: _through_sink(state, key, value) for key, value in state.values.items()
                    if node_id(key) in state.exported and key not in carry.values}
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


def _through_sink(state: ExperimentState, key: Key, value: Any) -> Any:
    """A saved tensor goes through the experiment's sink here, on the shard that produced it; what
    travels on is what the sink returns (a reference, for a value it wrote).

    Only saves no other node reads go to the sink (a node on another shard needs the tensor itself).
    """
    if state.sink is None or not isinstance(value, torch.Tensor):
        return value
    node = state.graph.nodes[node_id(key)]
    if node.kind != Kind.SAVE or node.id not in state.owned or node.id in state.read:
        return value
    return state.sink.write(persisted_name(node.target or f"save{node.id}", key), value.detach())


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


def _entry_hook(hidden: torch.Tensor) -> Any:
    """Hand ``hidden`` (from the shard before) to this shard's first layer."""
    def hook(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}
    return hook


def _exit_hook(store: list[Any]) -> Any:
    def hook(_module: torch.nn.Module, _args: Any, output: Any) -> Any:
        store.append(output)
        raise StopForward
    return hook


def run_alone(runner: ShardRunner, state: ExperimentState, stage: Stage, carry: Carry) -> Carry:
    """One experiment's stage on its own: a forward pass of one tenant, or a backward stage; its
    next carry, or its error raised."""
    if stage.direction == "backward":
        return runner.backward(state, stage, carry)
    tenant = CoTenant(state, stage, carry)
    runner.forward([tenant])
    if isinstance(tenant.outcome, BaseException):
        raise tenant.outcome
    return tenant.outcome  # type: ignore[return-value]


def run_pipeline(runners: list[ShardRunner], graph: InterventionGraph,
                 transport: Any = None) -> tuple[dict[str, Any], list[str]]:
    """Run the whole chain in this process (``transport`` may round-trip each carry, as a wire would).

    The workers run exactly these stages, each on its shard's worker; this in-process version is
    the reference for them and lets the partitioning be tested without a cluster.
    """
    states = [runner.start(graph) for runner in runners]
    carry = Carry()
    for stage in plan_stages(graph, states[0].shards, len(runners)):
        carry = run_alone(runners[stage.shard], states[stage.shard], stage, carry)
        if transport is not None:
            carry = transport(carry)
    return collect_saves(graph, carry.values), carry.logs
