"""Runs one pass of an intervention graph while the model runs: nodes fire on module hooks.

Each node waits for its arguments; free nodes run as soon as their arguments exist, in program
order; event-bound nodes (reads and writes of module inputs/outputs, gradients) run when their
module call (or backward) reaches them. A write that needs a value the forward pass has not
produced yet is a cycle and is reported as such.

The jobs are split: :class:`~.plan.PassPlan` (what waits for what, fixed per graph and pass),
:class:`~.schedule.Schedule` (what is ready), :class:`~.executor.NodeExecutor` (running a free node,
a handler per kind), :class:`~.gradients.GradientHooks` (gradient nodes and their backward),
:mod:`.module_hooks` (module calls, co-tenant windows). The :class:`Interleaver` holds the values
and ties them together.
"""
from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import torch

from ..errors import ForbiddenOperationError, InterventionError, PolicyError
from ..graph.allocation import ExperimentBudget
from ..graph.graph import InterventionGraph
from ..graph.node import Kind, Node, Ref
from . import node_errors
from .batching import Layout, Window, conform, narrow_window, splice_window
from .executor import NodeExecutor, Quiet
from .gradients import GradientHooks
from .plan import Key, PassPlan, dep_key, node_id, order
from .schedule import Schedule


class _Skipped:
    """Value of a node that did not run because its condition was false."""

    def __repr__(self) -> str:
        return "<skipped>"


SKIPPED = _Skipped()

#: A module call's skip value when no skip node gave one.
NOT_SET = object()


class StopForward(Exception):
    """Raised inside the model to end the forward pass early (``tracer.stop()``)."""


class ExperimentStopped(Exception):
    """Raised when an experiment must stop mid-stage (between two of its nodes, or before a decoder
    layer); ``error`` is why (what the shard raises in its place: cancelled, timed out, undeployed)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


#: Kinds whose node has an effect: one that never ran is an error.
_EFFECTS = frozenset({Kind.SAVE, Kind.SETTER, Kind.GRAD_SETTER, Kind.BACKWARD, Kind.LOG, Kind.SKIP})
#: Kinds that wait for an event (a module call or a gradient): the root cause of nodes never reached.
_EVENTS = frozenset({Kind.GETTER, Kind.GRAD, Kind.GRAD_SETTER, Kind.SETTER, Kind.SKIP})


class _SkipNode(Exception):
    pass


class ModuleCalls:
    """One module's calls in one pass of an experiment: how many began (kept across stages: counts
    go on from step to step), which one runs now (None: a call that is no event), a skip's value."""

    __slots__ = ("count", "current", "skip_value")

    def __init__(self) -> None:
        self.count = 0
        self.current: int | None = None
        self.skip_value: Any = NOT_SET


class Interleaver:
    """The values of one pass and the nodes that wait for them.

    ``values`` is shared by all passes of a graph (a session), so later passes read earlier ones.
    ``layout`` gives each invoke its batch rows. ``steps`` is how many forward passes the run makes
    (generation: one per token), which bounds iteration blocks. ``owned`` restricts the pass to the
    nodes of one shard; values of other shards' nodes arrive through :meth:`receive`. ``logs``
    receives the lines ``log`` nodes print; ``quiet`` counts the graph's own module calls (one per
    model, shared by co-tenants).

    On a shared shard, ``budget`` bounds every operation before it runs (its size and work, see
    :mod:`~nnsight_dask.graph.allocation`) and ``should_stop`` is asked before every node: when it
    answers an error (cancel, timeout, undeploy), :class:`ExperimentStopped` leaves the pass at once.
    """

    def __init__(self, graph: InterventionGraph, pass_index: int, layout: Layout, values: dict[Key, Any],
                 steps: int, modules: dict[str, torch.nn.Module], logs: list[str], *, quiet: Quiet,
                 owned: Collection[int] | None = None, budget: ExperimentBudget | None = None,
                 should_stop: Callable[[], BaseException | None] | None = None) -> None:
        self.graph = graph
        self.values = values
        #: The graph's modules of this pass, by path.
        self.modules = modules
        self.logs = logs
        self.should_stop = should_stop
        self.plan = PassPlan(graph, pass_index, steps, owned)
        self.schedule = Schedule(self.plan, values)
        batch = layout[-1][1] if layout else 0
        #: Each invoke's rows of the batch, when the pass has several invokes (None: one or none).
        self.invoke_windows = [Window(start, stop, batch) for start, stop in layout] if len(layout) > 1 else None
        self.gradients = GradientHooks(self.plan.grad_backward, values, self.invoke_windows)
        self.executor = NodeExecutor(graph, modules, logs, budget, quiet, self.gradients)
        self._calls: dict[str, ModuleCalls] = {}
        #: (a plain save's value is of its own pass, so it arrives through :meth:`_set`, never before)
        self._saves_of = self.plan.saves_of

    def take_logs(self) -> list[str]:
        """The lines logged since the last call (a shard hands them on with each stage's carry)."""
        lines = list(self.logs)
        self.logs.clear()
        return lines

    def calls(self, path: str) -> ModuleCalls:
        """Module ``path``'s calls in this pass (made on first use, kept across stages)."""
        calls = self._calls.get(path)
        if calls is None:
            calls = self._calls[path] = ModuleCalls()
        return calls

    def _calls_made(self, path: str) -> int:
        """How many calls of module ``path`` this pass saw."""
        calls = self._calls.get(path)
        return calls.count if calls is not None else 0

    # -- values -----------------------------------------------------------------------------
    def receive(self, values: dict[Key, Any]) -> None:
        """Values computed elsewhere (an earlier shard) arrive; nodes waiting for them may run."""
        for key, value in values.items():
            if key not in self.values:
                self._set(key, value)

    def _set(self, key: Key, value: Any) -> None:
        values, done = self.values, self.schedule.done
        values[key] = value
        done(key)
        saves = self._saves_of.get(key)
        if saves is not None:  # its plain saves keep it as it is set (:attr:`~.plan.PassPlan.saves_of`)
            for save in saves:
                if save not in values:
                    values[save] = value
                    done(save)
        grad_events = self.plan.grad_events
        if grad_events:
            grads = grad_events.get(key)
            if grads is not None:
                self.gradients.watch(self.graph.nodes[node_id(key)], value, grads, self.fire)

    def _resolve(self, obj: Any, step: int | None) -> Any:
        if isinstance(obj, Ref):
            dep = self.graph.nodes[obj.id]
            value = self.values[obj.id if dep.iteration is None else (obj.id, step)]
            if value is SKIPPED:
                raise _SkipNode
            return value
        if type(obj) in (int, float, str, bool) or obj is None:
            return obj
        if isinstance(obj, tuple):
            return tuple([self._resolve(o, step) for o in obj])
        if isinstance(obj, list):
            return [self._resolve(o, step) for o in obj]
        if isinstance(obj, dict):
            return {k: self._resolve(v, step) for k, v in obj.items()}
        if isinstance(obj, slice):
            return slice(self._resolve(obj.start, step), self._resolve(obj.stop, step), self._resolve(obj.step, step))
        return obj

    # -- running nodes ------------------------------------------------------------------------
    def drain(self, before: tuple[int, int] | None = None) -> None:
        """Run ready free nodes in program order (only those before ``before`` when given).

        Called before and after every event: what it checks first costs no call when nothing is ready."""
        running = self.gradients.running
        if running is not None:  # inside a backward: nothing after it in program order
            limit = order(running)
            before = limit if before is None else min(before, limit)
        schedule = self.schedule
        heap = schedule.heap
        while heap:
            key = schedule.next_ready(before)
            if key is None:
                break
            self._run_free(key)
        if schedule.has_stop and schedule.stop_due(before):
            raise StopForward

    def _run_free(self, key: Key) -> None:
        if self.should_stop is not None:
            self._check_stop()
        if type(key) is tuple:
            node, step = self.graph.nodes[key[0]], key[1]
        else:
            node, step = self.graph.nodes[key], None
        try:
            if node.cond is not None and not self._resolve(Ref(node.cond), step):
                raise _SkipNode
            args = node.args
            if node.kind == Kind.SAVE and len(args) == 1 and type(args[0]) is Ref:
                value = self._resolve(args[0], step)  # a save of a value (most nodes of most graphs): that value
            else:
                args = self._resolve(args, step)
                kwargs = self._resolve(node.kwargs, step) if node.kwargs else {}
                value = self.executor.run(node, key, args, kwargs)
        except _SkipNode:
            value = SKIPPED
        except (StopForward, ExperimentStopped, InterventionError, PolicyError):
            raise  # a policy refusal already names the rule and the line
        except ForbiddenOperationError as exc:
            raise node_errors.forbidden(node, exc) from None
        except Exception as exc:
            raise node_errors.failed(node, exc) from exc
        self._set(key, value)

    def _check_stop(self) -> None:
        """Between two nodes: leave the pass when the experiment was told to stop."""
        if self.should_stop is not None:
            error = self.should_stop()
            if error is not None:
                raise ExperimentStopped(error)

    # -- events -------------------------------------------------------------------------------
    def fire(self, keys: list[Key], current: Any, phase: str) -> Any:
        """Run the nodes bound to one event in program order; returns the (maybe replaced) value."""
        schedule = self.schedule
        if phase == "out" and not schedule.heap and self.invoke_windows is None and self.should_stop is None \
                and not schedule.has_stop and self.gradients.running is None and self.plan.plain_reads.issuperset(keys):
            # (the common event, reads of a module's output and nothing ready before them: no free
            # node can run between two of them, so they take the value one after the other)
            for key in keys:
                self._set(key, current)
            self.drain()
            return current
        pending = schedule.pending
        nodes = self.graph.nodes
        for key in keys:
            if type(key) is tuple:
                self.drain(before=key)
                node, step = nodes[key[0]], key[1]
            else:
                self.drain(before=(key, -1))
                node, step = nodes[key], None
            if self.should_stop is not None:
                self._check_stop()
            try:
                if node.cond is not None and pending[key] == 0 and not self._resolve(Ref(node.cond), step):
                    raise _SkipNode
                if node.kind in (Kind.GETTER, Kind.GRAD, Kind.RESULT):
                    # a module's whole output, the common read, is the value itself
                    self._set(key, current if phase == "out" and self.invoke_windows is None
                              else self._view(node, current, phase))
                    continue
                if pending[key]:
                    raise node_errors.cycle(node, self._first_unready_source(node, step))
                new = self._resolve(node.args[-1], step)
                current = self._replace(node, current, new, phase)
            except _SkipNode:
                self._set(key, SKIPPED)
                continue
            except (StopForward, ExperimentStopped, InterventionError):
                raise
            except ForbiddenOperationError as exc:
                raise node_errors.forbidden(node, exc) from None
            except Exception as exc:
                raise node_errors.failed(node, exc) from exc
            self._set(key, None)
        self.drain()
        return current

    def _view(self, node: Node, current: Any, phase: str) -> Any:
        if phase == "in":
            args, kwargs = current
            value = args[0] if node.access == "input" else (args, kwargs)
            if node.access == "input" and not args:
                raise node_errors.no_positional_input(node)
        else:
            value = current
        if self.invoke_windows is not None and node.invoke is not None and phase != "grad":
            value = narrow_window(value, self.invoke_windows[node.invoke])
        return value

    def _replace(self, node: Node, current: Any, new: Any, phase: str) -> Any:
        if node.kind == Kind.SKIP:
            return new
        if phase == "grad":
            return conform(new, current)
        if phase == "in":
            args, kwargs = current
            if node.access == "input":
                old = args[0]
                return ((self._fit(node, old, new), *args[1:]), kwargs)
            new_args, new_kwargs = new
            return (tuple(new_args), dict(new_kwargs))
        return self._fit(node, current, new)

    def _fit(self, node: Node, old: Any, new: Any) -> Any:
        if self.invoke_windows is not None and node.invoke is not None:
            return splice_window(old, new, self.invoke_windows[node.invoke])
        return conform(new, old)

    def finish(self, result: Any) -> None:
        """End of the pass: hand out the result and run what was left."""
        if self.plan.result_keys:
            self.fire(self.plan.result_keys, result, "out")
        self.drain()

    def _unreached(self, steps_run: int) -> list[Node]:
        """Nodes of this pass that never ran and should have (not past a stop or the last step)."""
        stop_id = self.plan.stop_id
        missing = []
        for key in self.plan.instances:
            if key in self.values:
                continue
            if isinstance(key, tuple) and key[1] >= steps_run:
                continue
            node = self.graph.nodes[node_id(key)]
            if node.kind == Kind.STOP or (stop_id is not None and (node.id > stop_id or self.schedule.stopped)):
                continue  # past the stop, or not reached when it stopped the run
            missing.append(node)
        return missing

    def check_reached(self, steps_run: int) -> None:
        """Raise naming the first node with an effect (a save, a write, a backward, a log) that never
        ran although the pass ran ``steps_run`` steps, and why (the module call it waited for)."""
        missing = self._unreached(steps_run)
        effects = [n for n in missing if n.kind in _EFFECTS]
        if effects:
            first = effects[0]
            cause = self._root_cause(first, missing)
            calls = self._calls_made(cause.module) if cause is not None and cause.module is not None else 0
            raise node_errors.never_ran(first, cause, calls)

    def _root_cause(self, node: Node, missing: list[Node]) -> Node | None:
        missing_ids = {n.id for n in missing}
        stack, seen = [node], set()
        while stack:
            current = stack.pop()
            if current.kind in _EVENTS and current is not node:
                return current
            for dep in current.deps():
                if dep in missing_ids and dep not in seen:
                    seen.add(dep)
                    stack.append(self.graph.nodes[dep])
        return node if node.module is not None else None

    def _first_unready_source(self, node: Node, step: int | None) -> Node | None:
        """The first event-bound node upstream of ``node`` without a value (what makes it a cycle)."""
        stack, seen = [node], set()
        while stack:
            current = stack.pop()
            for dep in current.deps():
                dep_node = self.graph.nodes[dep]
                if dep_key(dep_node, step) in self.values or dep in seen:
                    continue
                seen.add(dep)
                if dep_node.kind in Kind.EVENT_BOUND:
                    return dep_node
                stack.append(dep_node)
        return None
