"""Runs one pass of an intervention graph while the model runs: nodes fire on module hooks.

The interleaver is a small state machine. Each node waits for its arguments; free nodes run as
soon as their arguments exist, in program order; event-bound nodes (reads and writes of module
inputs/outputs, gradients) run when their module call (or backward) reaches them. A write that
needs a value the forward pass has not produced yet is a cycle and is reported as such.

A gradient node belongs to the first ``backward()`` after it in program order (nnsight's rule): its
hook is live only while that backward runs. Backwards run one after another in program order, never
nested: while one runs, only free nodes before it may run.
"""
from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..errors import (
    ForbiddenOperationError,
    InterventionError,
    NNsightDaskError,
    PolicyError,
)
from ..graph.allocation import ExperimentBudget
from ..graph.graph import InterventionGraph
from ..graph.node import HOOKED_CALL, Kind, Node, Ref, display_path
from ..graph.ops import (
    MethodRef,
    check_arguments,
    check_op_call,
    check_result,
    method_op_name,
    module_attr,
    registry,
    safe_call,
    safe_getattr,
)
from .batching import Layout, Window, conform, narrow_window, splice_window

Key = Any  # int for plain nodes, (node id, step) for nodes of an iteration block


class _Skipped:
    """Value of a node that did not run because its condition was false."""

    def __repr__(self) -> str:
        return "<skipped>"


SKIPPED = _Skipped()


class StopForward(Exception):
    """Raised inside the model to end the forward pass early (``tracer.stop()``)."""


class ExperimentStopped(Exception):
    """Raised when an experiment must stop mid-stage (between two of its nodes, or before a decoder
    layer); ``error`` is why (what the shard raises in its place: cancelled, timed out, undeployed)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class _SkipNode(Exception):
    pass


class Quiet:
    """How deep the graph's own module calls are nested. Shared by every member of a co-tenant
    batch: a module one member's graph calls must not fire another member's hooks."""

    __slots__ = ("depth",)

    def __init__(self) -> None:
        self.depth = 0


class _ModuleState:
    __slots__ = ("path", "calls", "current", "skip_value")

    def __init__(self, path: str) -> None:
        self.path = path
        self.calls = 0
        self.current: int | None = None
        self.skip_value: Any = _NOTSET


_NOTSET = object()


class Interleaver:
    """State of one pass: which nodes wait, which module call each event belongs to, the values.

    ``values`` is shared by all passes of a graph (a session), so later passes read earlier ones.
    ``layout`` gives each invoke its batch rows. ``steps`` is how many forward passes the run makes
    (generation: one per token), which bounds iteration blocks. ``owned`` restricts the pass to the
    nodes of one shard; values of other shards' nodes arrive through :meth:`receive`.

    On a shared shard, ``budget`` bounds every operation before it runs (its size and work, see
    :mod:`~nnsight_dask.graph.allocation`) and ``should_stop`` is asked before every node: when it
    answers an error (cancel, timeout, undeploy), :class:`ExperimentStopped` leaves the pass at once.
    """

    def __init__(self, graph: InterventionGraph, pass_index: int, layout: Layout, values: dict[Key, Any],
                 steps: int, modules: dict[str, torch.nn.Module], logs: list[str] | None = None,
                 owned: Collection[int] | None = None, budget: ExperimentBudget | None = None,
                 quiet: Quiet | None = None, should_stop: Callable[[], BaseException | None] | None = None) -> None:
        self.graph = graph
        #: Bounds on each operation and on the experiment's memory (a shared shard's); None: local runs.
        self.budget = budget
        self.should_stop = should_stop
        self.pass_index = pass_index
        self.layout = layout
        self.batch = layout[-1][1] if layout else 0
        #: Each invoke's rows of the batch.
        self.invoke_windows = [Window(start, stop, self.batch) for start, stop in layout]
        self.narrowing = len(layout) > 1
        self.values = values
        self.steps = steps
        self.modules = modules
        self.logs = logs
        self.quiet = quiet or Quiet()
        #: In a co-tenant batch: this experiment's rows and columns of the batch (None: alone).
        self.window: Window | None = None
        #: In a co-tenant batch: why this experiment left the pass (its error, or StopForward for its
        #: ``stop()``); its hooks do nothing from then on and the pass goes on for the others.
        self.halted: BaseException | None = None
        self.ops = registry()
        self.pending: dict[Key, int] = {}
        self.dependents: dict[Key, list[Key]] = {}
        self.events: dict[tuple[str, str, int], list[Key]] = {}
        self.grad_events: dict[Key, list[Key]] = {}
        #: The backward each gradient node belongs to (None: no backward follows it in the pass)
        self.grad_backward: dict[Key, Key | None] = {}
        #: The backward node running now; free nodes after it wait until it returns
        self.backward_key: Key | None = None
        self._running: Key | None = None
        self.result_keys: list[Key] = []
        self.heap: list[tuple[int, int, Key]] = []
        self.stop_key: Key | None = None
        self.before_stop = 0
        self.stopped = False
        self.instances: list[Key] = []
        self.states: dict[str, _ModuleState] = {}
        self.owned = owned
        self.skip_paths: set[str] = set()
        self._devices: set[torch.device] | None = None
        self._build()

    # -- set-up -----------------------------------------------------------------------------
    def _build(self) -> None:
        nodes = self.graph.nodes
        ranges = {it.id: it.steps(self.steps) for it in self.graph.iterations if it.pass_index == self.pass_index}
        backwards = [n.id for n in nodes if n.kind == Kind.BACKWARD and n.pass_index == self.pass_index]
        owned = self.owned
        for node in nodes:
            if node.pass_index != self.pass_index or (owned is not None and node.id not in owned):
                continue
            steps = (None,) if node.iteration is None else ranges.get(node.iteration, ())
            for step in steps:
                key = node.id if step is None else (node.id, step)
                self.instances.append(key)
                waiting = 0
                for dep in node.deps():
                    dep_key = self._dep_key(nodes[dep], step)
                    if dep_key in self.values:
                        continue
                    waiting += 1
                    self.dependents.setdefault(dep_key, []).append(key)
                self.pending[key] = waiting
                kind = node.kind
                if kind in (Kind.GETTER, Kind.SETTER, Kind.SKIP):
                    if kind == Kind.SKIP:
                        self.skip_paths.add(node.module)  # type: ignore[arg-type]
                    call = node.call + (step or 0)
                    phase = "out" if node.access == "output" and kind != Kind.SKIP else "in"
                    self.events.setdefault((node.module, phase, call), []).append(key)
                elif kind in (Kind.GRAD, Kind.GRAD_SETTER):
                    target = self._dep_key(nodes[node.args[0].id], step)
                    self.grad_events.setdefault(target, []).append(key)
                    self.grad_backward[key] = _next_backward(nodes, backwards, node.id, step)
                elif kind == Kind.RESULT:
                    self.result_keys.append(key)
                elif kind == Kind.STOP:
                    self.stop_key = key
                elif waiting == 0:
                    self._push(key)
        if self.stop_key is not None:
            stop_id = self.stop_key
            self.before_stop = sum(1 for k in self.instances if _node_id(k) < stop_id)
        stops = [n.id for n in nodes if n.kind == Kind.STOP and n.pass_index == self.pass_index]
        self.stop_id: int | None = stops[0] if stops else None
        for keys in (*self.events.values(), *self.grad_events.values()):
            keys.sort(key=_order)

    def _dep_key(self, dep: Node, step: int | None) -> Key:
        if dep.iteration is None:
            return dep.id
        if step is None:
            raise NNsightDaskError(
                f"a value from an iteration block ({dep.describe()}) is used outside the block without "
                "being iterated; save it inside the block instead")
        return (dep.id, step)

    def _push(self, key: Key) -> None:
        heapq.heappush(self.heap, (*_order(key), key))

    def module_paths(self) -> set[str]:
        return {path for (path, _phase, _call) in self.events}

    # -- values -----------------------------------------------------------------------------
    def receive(self, values: dict[Key, Any]) -> None:
        """Values computed elsewhere (an earlier shard) arrive; nodes waiting for them may run."""
        for key, value in values.items():
            if key not in self.values:
                self._set(key, value)

    def _set(self, key: Key, value: Any) -> None:
        self.values[key] = value
        if self.stop_key is not None and key in self.pending and _node_id(key) < _node_id(self.stop_key):
            self.before_stop -= 1
        for dependent in self.dependents.get(key, ()):
            left = self.pending[dependent] - 1
            self.pending[dependent] = left
            if left == 0 and self.graph.nodes[_node_id(dependent)].kind not in Kind.EVENT_BOUND:
                self._push(dependent)
        grads = self.grad_events.get(key)
        if grads is not None:
            self._watch_grad(key, value, grads)

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
            return tuple(self._resolve(o, step) for o in obj)
        if isinstance(obj, list):
            return [self._resolve(o, step) for o in obj]
        if isinstance(obj, dict):
            return {k: self._resolve(v, step) for k, v in obj.items()}
        if isinstance(obj, slice):
            return slice(self._resolve(obj.start, step), self._resolve(obj.stop, step), self._resolve(obj.step, step))
        return obj

    # -- running nodes ------------------------------------------------------------------------
    def drain(self, before: tuple[int, int] | None = None) -> None:
        """Run ready free nodes in program order (only those before ``before`` when given)."""
        heap = self.heap
        if self.backward_key is not None:  # inside a backward: nothing after it in program order
            limit = _order(self.backward_key)
            before = limit if before is None else min(before, limit)
        while heap and (before is None or (heap[0][0], heap[0][1]) < before):
            key = heapq.heappop(heap)[2]
            self._run_free(key)
        if self.stop_key is not None and self.before_stop <= 0 and not self.stopped:
            self.stopped = True
            raise StopForward

    def _run_free(self, key: Key) -> None:
        self._check_stop()
        node = self.graph.nodes[_node_id(key)]
        step = key[1] if isinstance(key, tuple) else None
        try:
            if node.cond is not None and not self._condition(node, step):
                raise _SkipNode
            args = self._resolve(node.args, step)
            kwargs = self._resolve(node.kwargs, step) if node.kwargs else {}
            self._running = key
            value = self._execute(node, args, kwargs)
        except _SkipNode:
            value = SKIPPED
        except (StopForward, ExperimentStopped, InterventionError, PolicyError):
            raise  # a policy refusal already names the rule and the line
        except ForbiddenOperationError as exc:
            raise self._forbidden(node, exc) from None
        except Exception as exc:
            raise self._error(node, exc) from exc
        self._set(key, value)

    def _check_stop(self) -> None:
        """Between two nodes: leave the pass when the experiment was told to stop."""
        if self.should_stop is not None:
            error = self.should_stop()
            if error is not None:
                raise ExperimentStopped(error)

    def _condition(self, node: Node, step: int | None) -> bool:
        value = self._resolve(Ref(node.cond), step)  # type: ignore[arg-type]
        return bool(value)

    def _execute(self, node: Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run one free node. What a shared shard enforces is here: every operation is checked
        (:func:`~nnsight_dask.graph.ops.check_op_call`) before it runs and its value after (no
        callables); module attributes are copies, so nothing a graph does reaches the model's weights."""
        kind = node.kind
        budget = self.budget
        where = node.location or f"node %{node.id}"
        if kind == Kind.OP:
            name: str = node.target  # type: ignore[assignment]
            check_op_call(name, args, kwargs, devices=self.devices())
            cost = None
            if budget is not None:  # sized and weighed before it runs (a shared shard)
                if name == "call" and args and isinstance(args[0], MethodRef):
                    cost = budget.check_op(method_op_name(args[0]), (args[0].owner, *args[1:]), kwargs, where)
                else:
                    cost = budget.check_op(name, args, kwargs, where)
            if name == "getattr":
                value = safe_getattr(args[0], args[1])
            elif name == "call":
                value = safe_call(args[0], *args[1:], **kwargs)
            else:
                value = self.ops.resolve(name)(*args, **kwargs)
            if budget is not None and cost is not None:
                budget.account(value, (args, kwargs), cost)
            return check_result(value, name)
        if kind == Kind.SAVE:
            return args[0]
        if kind == Kind.MODULE_CALL:
            check_arguments(f"a call of {display_path(node.module)}", args, kwargs)
            module = self.modules[node.module]  # type: ignore[index]
            cost = budget.check_module_call(module, args, kwargs, where) if budget is not None else None
            if node.access == HOOKED_CALL:  # hooks live: interventions on it and its submodules apply
                value = module(*args, **kwargs)
            else:
                with self.suppress():
                    value = module(*args, **kwargs)
            if budget is not None and cost is not None:
                budget.account(value, (args, kwargs), cost)
            return check_result(value, f"a call of {display_path(node.module)}")
        if kind == Kind.MODULE_ATTR:
            check = (lambda raw: budget.check_copy(raw, node.target or "", where)) if budget is not None else None
            return module_attr(self.modules[node.module], node.target, before_copy=check)  # type: ignore[index,arg-type]
        if kind == Kind.BACKWARD:
            unknown = sorted(set(kwargs) - _BACKWARD_OPTIONS)
            if unknown:
                raise ForbiddenOperationError(
                    f"backward() takes {', '.join(sorted(_BACKWARD_OPTIONS))} in a graph, not {', '.join(unknown)} "
                    "(create_graph would tie gradients to the shared weights)", argument=unknown[0])
            check_arguments("backward", args, kwargs)
            if budget is not None:
                budget.check_backward(where)
            outer, self.backward_key = self.backward_key, self._running
            try:
                with torch.enable_grad():
                    torch.autograd.backward(args[0], **kwargs)
            finally:
                self.backward_key = outer
            return None
        if kind == Kind.LOG:
            if budget is not None:
                for arg in args:
                    budget.check_op("builtins.str", (arg,), {}, where)
            text = " ".join(str(a) for a in args)
            if self.logs is not None:
                self.logs.append(text)
            else:
                print(text)
            return None
        if kind == Kind.APPLY:
            fn = self.graph.local_functions.get(node.id)
            if fn is None:
                raise NNsightDaskError(f"local function {node.target!r} is not available here")
            return fn(*args, **kwargs)
        raise NNsightDaskError(f"node kind {kind!r} cannot run as a free node")

    def devices(self) -> set[torch.device]:
        """Devices the graph's modules hold parameters or buffers on (where its values may go)."""
        if self._devices is None:
            found: set[torch.device] = set()
            for module in self.modules.values():
                for tensor in (*module.parameters(), *module.buffers()):
                    found.add(tensor.device)
            self._devices = found
        return self._devices

    @contextmanager
    def suppress(self) -> Iterator[None]:
        """Calls of model modules made by the graph itself do not count as model events."""
        self.quiet.depth += 1
        try:
            yield
        finally:
            self.quiet.depth -= 1

    # -- events -------------------------------------------------------------------------------
    def fire(self, keys: list[Key], current: Any, phase: str) -> Any:
        """Run the nodes bound to one event in program order; returns the (maybe replaced) value."""
        for key in keys:
            self.drain(before=_order(key))
            self._check_stop()
            node = self.graph.nodes[_node_id(key)]
            step = key[1] if isinstance(key, tuple) else None
            try:
                if node.cond is not None and self.pending[key] == 0 and not self._condition(node, step):
                    raise _SkipNode
                if node.kind in (Kind.GETTER, Kind.GRAD, Kind.RESULT):
                    self._set(key, self._view(node, current, phase))
                    continue
                if self.pending[key]:
                    raise self._cycle_error(node, step)
                new = self._resolve(node.args[-1], step)
                current = self._replace(node, current, new, phase)
            except _SkipNode:
                self._set(key, SKIPPED)
                continue
            except (StopForward, ExperimentStopped, InterventionError):
                raise
            except ForbiddenOperationError as exc:
                raise self._forbidden(node, exc) from None
            except Exception as exc:
                raise self._error(node, exc) from exc
            self._set(key, None)
        self.drain()
        return current

    def _view(self, node: Node, current: Any, phase: str) -> Any:
        if phase == "in":
            args, kwargs = current
            value = args[0] if node.access == "input" else (args, kwargs)
            if node.access == "input" and not args:
                raise NNsightDaskError(f"{display_path(node.module)} was called without positional arguments; "
                                       "read .inputs to see its keyword arguments")
        else:
            value = current
        if self.narrowing and node.invoke is not None and phase != "grad":
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
        if self.narrowing and node.invoke is not None:
            return splice_window(old, new, self.invoke_windows[node.invoke])
        return conform(new, old)

    def watch_module(self, module: torch.nn.Module, path: str) -> list[Any]:
        """Register this pass's hooks on one module; returns the handles to remove afterwards."""
        state = self.states.get(path)
        if state is None:  # kept across stages: call counts go on from step to step
            state = self.states[path] = _ModuleState(path)
        events = self.events

        def pre_hook(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if self.quiet.depth or self.halted is not None:
                state.current = None
                return None
            call = state.calls
            state.calls += 1
            state.current = call
            keys = events.get((path, "in", call))
            if keys is None:
                return None
            skip_nodes = [k for k in keys if self.graph.nodes[_node_id(k)].kind == Kind.SKIP]
            if skip_nodes:
                state.skip_value = self.fire(skip_nodes, None, "in")
                keys = [k for k in keys if k not in skip_nodes]
            current = (args, kwargs)
            new = self._fire_in_window(keys, current, "in")
            return new if (new[0] is not args or new[1] is not kwargs) else None

        def hook(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            call = state.current
            if call is None or self.halted is not None:
                return None
            keys = events.get((path, "out", call))
            if keys is None:
                return None
            new = self._fire_in_window(keys, output, "out")
            return new if new is not output else None

        handles = [module.register_forward_pre_hook(pre_hook, with_kwargs=True),
                   module.register_forward_hook(hook, with_kwargs=True)]
        if path in self.skip_paths:
            handles.append(_install_skip(module, state))
        return handles

    def _fire_in_window(self, keys: list[Key], current: Any, phase: str) -> Any:
        """:meth:`fire` on this experiment's window of the batch; alone, on the whole value.

        In a co-tenant batch an error (or ``stop()``) of this experiment halts only this experiment:
        it is kept in :attr:`halted` and the batch's value goes on unchanged.
        """
        window = self.window
        if window is None:
            return self.fire(keys, current, phase)
        view = narrow_window(current, window)
        try:
            new = self.fire(keys, view, phase)
            return current if new is view else splice_window(current, new, window)
        except Exception as exc:  # StopForward included: this member's stop() ends only its part
            self.halted = exc
            return current

    def run_alongside(self, step: Callable[[], Any]) -> None:
        """Run ``step`` (free nodes before the forward, the result at its end) for a batch member:
        an error halts this experiment only."""
        if self.halted is not None:
            return
        try:
            step()
        except Exception as exc:
            self.halted = exc

    def _watch_grad(self, key: Key, value: Any, keys: list[Key]) -> None:
        node = self.graph.nodes[_node_id(key)]
        if node.kind == Kind.MODULE_ATTR:
            raise ForbiddenOperationError(
                f"{node.location or '<graph>'}: cannot read or write .grad of {node.describe()}: parameters "
                "read in a trace are copies, detached from the shared model, so no gradient reaches them. "
                "Read the gradient of a module's output or input instead (e.g. lm.lm_head.input.grad)",
                location=node.location, module=node.module, attribute=node.target, node=node.id)
        if not isinstance(value, torch.Tensor) or not value.requires_grad:
            raise InterventionError(
                f"{node.location or '<graph>'}: cannot read or write .grad of {node.describe()}: the value "
                "does not require grad. Gradients exist only for values computed from the model's "
                "parameters while a backward pass runs (call loss.backward() in the trace).",
                location=node.location, module=node.module)
        groups: dict[Key | None, list[Key]] = {}
        for grad_key in keys:
            groups.setdefault(self.grad_backward.get(grad_key), []).append(grad_key)
        for backward, group in groups.items():
            self._grad_hook(node, value, group, backward)

    def _grad_hook(self, node: Node, value: torch.Tensor, keys: list[Key], backward: Key | None) -> None:
        """Hook ``keys`` on ``value``'s gradient, live only while ``backward`` runs (a backward the
        graph did not start, e.g. a shard's backward stage, counts as any), and only once."""

        def live() -> bool:
            running = self.backward_key
            if running is not None and backward is not None and running != backward:
                return False
            return not all(k in self.values for k in keys)

        base = value._base
        if self.narrowing and node.invoke is not None and node.kind == Kind.GETTER and base is not None \
                and base.requires_grad and base.shape[0] == self.batch:
            # an invoke's rows are a view the model never uses: watch the whole batch's tensor and
            # hand the invoke its rows of the gradient (and splice a replacement back in)
            window = self.invoke_windows[node.invoke]

            def rows_hook(grad: torch.Tensor) -> Any:
                if not live():
                    return None
                part = narrow_window(grad, window)
                new = self.fire(keys, part, "grad")
                return None if new is part else splice_window(grad, new, window)

            base.register_hook(rows_hook)
            return

        def hook(grad: torch.Tensor) -> Any:
            return _changed(self.fire(keys, grad, "grad"), grad) if live() else None

        value.register_hook(hook)

    def finish(self, result: Any) -> None:
        """End of the pass: hand out the result and check that nothing was left unreached."""
        if self.result_keys:
            self.fire(self.result_keys, result, "out")
        self.drain()

    def unreached(self, steps_run: int) -> list[Node]:
        """Nodes of this pass that never ran and should have (not past a stop or the last step)."""
        stop_id = self.stop_id
        missing = []
        for key in self.instances:
            if key in self.values:
                continue
            if isinstance(key, tuple) and key[1] >= steps_run:
                continue
            node = self.graph.nodes[_node_id(key)]
            if node.kind == Kind.STOP or (stop_id is not None and node.id > stop_id):
                continue
            missing.append(node)
        return missing

    # -- errors -------------------------------------------------------------------------------
    def _forbidden(self, node: Node, exc: ForbiddenOperationError) -> ForbiddenOperationError:
        """The refusal with the user's line and the node, keeping its fields (what was refused)."""
        if getattr(exc, "node", None) is not None:
            return exc
        fields = {**exc.fields, "location": node.location, "module": node.module, "node": node.id}
        return ForbiddenOperationError(f"{node.location or '<graph>'}: {node.describe()}: {exc.message}", **fields)

    def _error(self, node: Node, exc: Exception) -> InterventionError:
        where = node.location or "<graph>"
        module = f" on {display_path(node.module)}" if node.module is not None and node.kind == Kind.MODULE_CALL else ""
        return InterventionError(
            f"{where}: {node.describe()}{module} failed: {type(exc).__name__}: {exc}",
            location=node.location, module=node.module, node=node.id, original_type=type(exc).__name__)

    def _cycle_error(self, node: Node, step: int | None) -> InterventionError:
        late = self._first_unready_source(node, step)
        source = f" from {late.describe()}, which the forward pass produces later" if late else ""
        return InterventionError(
            f"{node.location or '<graph>'}: {node.describe()} needs a value computed{source}. A module's "
            "input or output can only be set from values available when that module runs.",
            location=node.location, module=node.module, node=node.id)

    def _first_unready_source(self, node: Node, step: int | None) -> Node | None:
        stack, seen = [node], set()
        while stack:
            current = stack.pop()
            for dep in current.deps():
                dep_node = self.graph.nodes[dep]
                key = self._dep_key(dep_node, step)
                if key in self.values or dep in seen:
                    continue
                seen.add(dep)
                if dep_node.kind in Kind.EVENT_BOUND:
                    return dep_node
                stack.append(dep_node)
        return None


#: What a graph's backward node may pass to ``torch.autograd.backward``.
_BACKWARD_OPTIONS = frozenset({"grad_tensors", "retain_graph"})


def _node_id(key: Key) -> int:
    return key[0] if isinstance(key, tuple) else key


def _order(key: Key) -> tuple[int, int]:
    """Program order: node id first, then generation step."""
    return key if isinstance(key, tuple) else (key, -1)


def _next_backward(nodes: list[Node], backwards: list[int], node_id: int, step: int | None) -> Key | None:
    """The key of the first backward node after ``node_id`` (program order), None if there is none."""
    index = bisect.bisect_right(backwards, node_id)
    if index == len(backwards):
        return None
    backward = nodes[backwards[index]]
    if backward.iteration is None:
        return backward.id
    return None if step is None else (backward.id, step)


def _changed(new: Any, old: Any) -> Any:
    return None if new is old else new


def _install_skip(module: torch.nn.Module, state: _ModuleState) -> Any:
    """Replace ``module.forward`` for calls that a skip node covers; returns an undo handle."""
    original: Callable[..., Any] = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if state.skip_value is not _NOTSET:
            value, state.skip_value = state.skip_value, _NOTSET
            return value
        return original(*args, **kwargs)

    module.forward = forward  # type: ignore[method-assign]

    class _Undo:
        def remove(self) -> None:
            if module.__dict__.get("forward") is forward:
                del module.__dict__["forward"]

    return _Undo()
