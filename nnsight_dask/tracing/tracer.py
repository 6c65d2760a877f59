"""Tracer and its contexts: ``trace``/``generate``/``scan``, ``invoke``, ``iter``, ``cond``, ``session``.

Entering a tracer starts recording into a graph; leaving it runs the graph through the model's
backend (local, or remote later) and hands saved values to their proxies.
"""
from __future__ import annotations

import sys
import weakref
from collections.abc import Iterable
from typing import Any

from ..backends.base import Backend, RunResult
from ..errors import TracingError
from ..graph.graph import InterventionGraph
from ..graph.node import Kind, Ref
from ..graph.options import ExperimentOptions
from . import control_flow
from .conditions import CondBlock
from .inject import CallerLocals, inject_saves
from .proxy import Proxy, map_proxies
from .recorder import Recorder, active_recorders
from .running import RunRequest, hand_out, run_recording
from .scanning import ScanRecorder
from .traceable import Traceable
from .unroll import DeferredInput, SessionBlock, TracedItem, sequence_of, unroll


class Tracer:
    """One run of the model (a forward pass or a generation) and the interventions on it."""

    def __init__(self, model: Traceable, inputs: tuple[Any, ...], *, kind: str = "trace", remote: Any = None,
                 execute: bool = True, validate: bool = False, fake: bool = False, scan: bool = False,
                 blocking: bool = True,
                 run_kwargs: dict[str, Any] | None = None, encode_kwargs: dict[str, Any] | None = None,
                 backend_options: dict[str, Any] | None = None, options: ExperimentOptions | None = None) -> None:
        self.model = model
        #: What the graph's ``options`` get (the experiment's store, positions, batching).
        self.options = options.to_graph() if options is not None else {}
        self.kind = kind
        self.remote = remote
        self.execute = execute
        self.validate = validate or scan
        self.fake = fake  # scan only (``lm.scan``): saves are fake tensors, the model never runs
        self.scan = scan or fake  # shape queries are concrete while recording
        self.blocking = blocking
        self.run_kwargs = run_kwargs or {}
        self.encode_kwargs = encode_kwargs or {}
        self.backend_options = backend_options or {}
        self._inputs = inputs
        self._implicit: Invoker | None = None
        self._recorder: Recorder | None = None
        self._session = model.current_session()
        self._branches = 0  # `if`s on traced values open when the block opened (see control_flow)
        self.future: Any = None
        self.logs: list[str] = []
        #: Rebind the caller's local names of saved proxies to their values when the block has run.
        self.inject = True

    @property
    def graph(self) -> InterventionGraph:
        """The intervention graph recorded so far."""
        return self._require().graph

    @property
    def recorder(self) -> Recorder:
        """The recording of the open block (a session's, inside a session)."""
        return self._require()

    def _require(self) -> Recorder:
        if self._recorder is None:
            raise TracingError("the tracer is not active; use it as `with model.trace(...) as tracer:`")
        return self._recorder

    # -- context ------------------------------------------------------------------------------------
    def __enter__(self) -> Tracer:
        if self._session is not None:
            self._recorder = self._session.recorder
        else:
            self._recorder = ScanRecorder(self._backend) if self.scan else Recorder()
            self._recorder.graph.model = self.model.model_id
        recorder = self._recorder
        self._branches = control_flow.depth()
        recorder.graph.options.update(self.options)
        recorder.new_pass(self.kind, self.run_kwargs)
        self.model.open_recording(recorder)
        self.model.apply_edits(recorder)
        if self._inputs:
            self._implicit = Invoker(self, self._inputs, self.encode_kwargs)
            self._implicit.__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        recorder = self._require()
        control_flow.close_from(self._branches, finished=exc_type is None)
        if self._implicit is not None:
            self._implicit.__exit__(None, None, None)
            self._implicit = None  # (it holds this tracer: kept, the two would be a reference cycle)
        self.model.close_recording(recorder)
        if self._session is not None:
            recorder.end_pass()
        if exc_type is not None:
            if self._session is None:
                recorder.close()
            return
        if not recorder.graph.passes[recorder.pass_index].invokes:
            raise TracingError("the trace has no inputs: pass them to trace(...) or open `with tracer.invoke(...)`")
        caller = sys._getframe(1)
        with CallerLocals(caller) as local_vars:
            saved_locals = recorder.rename_saves(local_vars)
            if self._session is not None:
                return
            if not self.execute:
                recorder.close()
                return
            request = RunRequest(remote=self.remote, scan_first=self.validate, fake_only=self.fake,
                                 blocking=self.blocking, options=self.backend_options)
            self.future = run_recording(self.model, recorder, request, self._deliver)
            if self.future is None and not self.fake and self.inject and saved_locals:
                inject_saves(caller, local_vars, recorder, saved_locals)

    def _deliver(self, result: RunResult) -> None:
        self.logs = hand_out(self._require(), result)

    def _backend(self) -> Backend:
        return self.model.backend_for(self.remote)

    def run_now(self) -> Any:
        """``model.trace(inputs, trace=False)``: run the model on the inputs and return its output."""
        if not self._inputs:
            raise TracingError("trace(trace=False) runs at once, so it needs its inputs: "
                               "model.trace(inputs, trace=False)")
        self.inject = False
        with self:
            output = self.result.save()
        return output.value

    # -- sub-contexts ----------------------------------------------------------------------------------
    def invoke(self, *inputs: Any, **encode_kwargs: Any) -> Invoker:
        """A batch entry: its inputs join the one forward pass; interventions inside see only its rows."""
        if self._implicit is not None:
            raise TracingError("pass inputs either to trace(...) or to tracer.invoke(...), not both")
        return Invoker(self, inputs, encode_kwargs)

    @property
    def iter(self) -> _IterSelector:
        """``with tracer.iter[a:b]:`` applies the block at generation steps a..b-1 (``iter[k]``: step k)."""
        return _IterSelector(self)

    def all(self) -> IterationBlock:
        """``with tracer.all():`` applies the block at every generation step."""
        return IterationBlock(self, 0, None, 1)

    def cond(self, condition: Any) -> CondBlock:
        """``with tracer.cond(x):`` runs the block's interventions only where ``x`` is true."""
        return CondBlock(self._require, condition)

    def stop(self) -> None:
        """Stop the forward pass as soon as every intervention written so far has run."""
        self._require().add(Kind.STOP)

    def log(self, *values: Any) -> None:
        """Print values when they are computed (remotely: returned with the result and printed)."""
        self._require().add(Kind.LOG, values)

    def apply(self, fn: Any, *args: Any, **kwargs: Any) -> Proxy:
        """Run a local Python function on traced values (the graph becomes local-only)."""
        return record_apply(self._require(), fn, args, kwargs)

    @property
    def result(self) -> Proxy:
        """The run's result: generated token ids for ``generate``, the model output for ``trace``."""
        return self._require().add(Kind.RESULT, invoke=None)

    def __repr__(self) -> str:
        return f"<Tracer {self.kind} of {self.model.model_id}>"


class Invoker:
    """``with tracer.invoke(inputs):`` one entry of the batch."""

    def __init__(self, tracer: Tracer, inputs: tuple[Any, ...], encode_kwargs: dict[str, Any]) -> None:
        self.tracer = tracer
        self.inputs = inputs
        self.encode_kwargs = encode_kwargs
        self.index: int | None = None

    def __enter__(self) -> Invoker:
        recorder = self.tracer._require()
        if recorder.invoke is not None:
            raise TracingError("invokes cannot be nested")
        session = self.tracer._session
        proxies: list[Proxy] = []
        map_proxies(self.inputs, proxies.append)
        if not proxies:
            self.index = recorder.add_invoke(self.tracer.model.encode_invoke(self.inputs, **self.encode_kwargs))
        elif session is not None and any(session._is_traced_item(proxy) for proxy in proxies):
            raise TracingError(
                "an item of a traced list cannot be a trace's input: inputs are encoded while recording and the "
                "item exists only when the session runs; iterate a Python list of inputs instead")
        elif session is not None and all(session._is_item(proxy) for proxy in proxies):
            self.index = recorder.add_invoke({})  # filled in per item when the session.iter block closes
            session._deferred[(recorder.pass_index, self.index)] = DeferredInput(
                self.inputs, self.encode_kwargs, self.tracer.model.encode_invoke)
        elif session is not None and len(self.inputs) == 1 and self.inputs[0] is proxies[0] and len(proxies) == 1 \
                and self._from_an_earlier_trace(recorder, proxies[0]):
            # token ids computed by an earlier trace (e.g. its generated tokens): resolved when this pass starts
            self.index = recorder.add_invoke({"input_ids": Ref(proxies[0]._node)})
        else:
            raise TracingError(
                "a trace's input can be a value of another trace only in a session, and only as the token ids "
                "alone (`with lm.trace(ids):` where `ids` comes from an earlier trace of the session, e.g. "
                "`lm.generator.output`); text, several values or a value of this same trace are encoded "
                "while recording, before anything runs")
        recorder.invoke = self.index
        return self

    def __exit__(self, *exc: Any) -> None:
        self.tracer._require().invoke = None

    @staticmethod
    def _from_an_earlier_trace(recorder: Recorder, proxy: Proxy) -> bool:
        """Whether ``proxy`` is a value recorded in an earlier trace of this session (not in an
        iteration block, whose values are one per step)."""
        if proxy._recorder is not recorder:
            return False
        node = recorder.node(proxy._node)
        return node.pass_index < recorder.pass_index and node.iteration is None


class _IterSelector:
    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer

    def __getitem__(self, key: int | slice) -> IterationBlock:
        if isinstance(key, int):
            if key < 0:
                raise TracingError("generation steps are counted from 0; negative steps are not supported")
            return IterationBlock(self.tracer, key, key + 1, 1)
        if isinstance(key, slice):
            return IterationBlock(self.tracer, key.start or 0, key.stop, key.step or 1)
        raise TracingError(f"tracer.iter takes an int or a slice, not {type(key).__name__}")


class IterationBlock:
    """Nodes recorded inside run once per generation step of the selected range."""

    def __init__(self, tracer: Tracer, start: int, stop: int | None, step: int) -> None:
        self.tracer, self.start, self.stop, self.step = tracer, start, stop, step
        self._previous: int | None = None

    def __enter__(self) -> IterationBlock:
        recorder = self.tracer._require()
        if recorder.iteration is not None:
            raise TracingError("iteration blocks cannot be nested")
        self._previous = recorder.iteration
        recorder.iteration = recorder.open_iteration(self.start, self.stop, self.step)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.tracer._require().iteration = self._previous


class Session:
    """``with model.session():`` several traces recorded as one graph and run together at the end,
    so values flow from one trace to the next (remotely: one request)."""

    def __init__(self, model: Traceable, remote: Any = None, blocking: bool = True, *,
                 options: ExperimentOptions | None = None) -> None:
        self.model = model
        self.remote = remote
        self.blocking = blocking
        self.recorder = Recorder()
        self.recorder.graph.model = model.model_id
        if options is not None:
            self.recorder.graph.options.update(options.to_graph())
        self.future: Any = None
        self.logs: list[str] = []
        self._active = False
        self._branches = 0  # `if`s on traced values open when the block opened (see control_flow)
        self._blocks: list[SessionBlock] = []
        #: Invoke inputs waiting for a ``session.iter`` item, by ``(pass, invoke)``.
        self._deferred: dict[tuple[int, int], DeferredInput] = {}

    @property
    def graph(self) -> InterventionGraph:
        return self.recorder.graph

    def _require(self) -> Recorder:
        if not self._active:
            raise TracingError("the session is not active; use it as `with model.session() as session:`")
        return self.recorder

    def iter(self, items: Iterable[Any]) -> SessionIteration:
        """``with session.iter(items) as item:`` runs the block (whole traces) once per item; ``item``
        stands for the current one (also as a trace's input). Unrolled when the block closes."""
        return SessionIteration(self, items)

    def cond(self, condition: Any) -> CondBlock:
        """``with session.cond(x):`` around whole traces: their interventions and saves apply only when
        ``x`` (a value of an earlier trace) is true. The traces' forward passes still run."""
        return CondBlock(self._require, condition)

    def _is_item(self, proxy: Proxy) -> bool:
        return any(proxy is block.item for block in self._blocks)

    def _is_traced_item(self, proxy: Proxy) -> bool:
        return any(proxy is block.item and isinstance(block.items[0], TracedItem) for block in self._blocks)

    def __enter__(self) -> Session:
        if self.model.current_session() is not None:
            raise TracingError("sessions cannot be nested")
        self.model.set_current_session(self)
        self._active = True
        self._branches = control_flow.depth()
        active_recorders().append(self.recorder)  # nd.list(), nd.apply() between traces record here
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        control_flow.close_from(self._branches, finished=exc_type is None)
        self.model.set_current_session(None)
        self._active = False
        stack = active_recorders()
        if stack and stack[-1] is self.recorder:
            stack.pop()
        if exc_type is not None:
            self.recorder.close()
            return
        caller = sys._getframe(1)
        with CallerLocals(caller) as local_vars:
            saved_locals = self.recorder.rename_saves(local_vars)
            graph = self.recorder.graph
            if not graph.nodes:
                self.recorder.close()
                return
            if graph.passes:  # else a session without a trace: its own code runs alone, as in nnsight 0.4
                self.recorder.place_session_nodes()
            request = RunRequest(remote=self.remote, blocking=self.blocking)
            self.future = run_recording(self.model, self.recorder, request, self._deliver)
            if self.future is None and saved_locals:
                inject_saves(caller, local_vars, self.recorder, saved_locals)

    def _deliver(self, result: RunResult) -> None:
        self.logs = hand_out(self.recorder, result)


class SessionIteration:
    """``with session.iter(items) as item:`` whole traces recorded once, run once per item (see :mod:`.unroll`)."""

    def __init__(self, session: Session, items: Iterable[Any]) -> None:
        self.session = session
        self.items = sequence_of(items)
        #: a traced list with a known length: the block reads its items at run time
        self._traced = items if isinstance(items, Proxy) else None
        self._block: SessionBlock | None = None

    def __enter__(self) -> Proxy:
        recorder = self.session._require()
        if recorder.in_trace:
            raise TracingError("session.iter repeats whole traces, so it goes outside them; inside a trace, "
                               "tracer.iter[...] / tracer.all() repeat interventions over generation steps")
        graph = recorder.graph
        items = recorder.add(Kind.OP, (self._traced if self._traced is not None else self.items,),
                             target="builtins.list")
        first = (len(graph.nodes), len(graph.passes), len(graph.iterations))
        proxies: list[weakref.ref[Proxy]] = []
        recorder.block_proxies.append(proxies)
        item = recorder.add(Kind.OP, (items, 0), target="operator.getitem")  # each copy reads its own index
        self._block = SessionBlock(self.items, item, *first, items_node=items._node, proxies=proxies)
        self.session._blocks.append(self._block)
        return item

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        block = self._block
        if block is None:
            return
        recorder = self.session.recorder
        recorder.block_proxies.pop()  # blocks nest, so the innermost open one is this one
        self.session._blocks.pop()
        self._block = None
        if exc_type is None:
            unroll(recorder, block, self.session._deferred)


def record_apply(recorder: Recorder, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Proxy:
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
    proxy = recorder.add(Kind.APPLY, args, kwargs, target=name)
    recorder.graph.local_functions[proxy._node] = fn
    return proxy


def apply(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a local Python function on traced values (or directly, outside any trace)."""
    stack = active_recorders()
    if not stack:
        return fn(*args, **kwargs)
    return record_apply(stack[-1], fn, args, kwargs)


def _container(kind: str, items: Any) -> Any:
    stack = active_recorders()
    if not stack:
        return list(items) if kind == "list" else dict(items)
    return stack[-1].add(Kind.OP, (items,) if items else (), target=f"builtins.{kind}")


def list_(*items: Any) -> Any:
    """A list that lives in the trace: ``l = nd.list().save(); l.append(x)``."""
    return _container("list", list(items))


def dict_(**items: Any) -> Any:
    """A dict that lives in the trace: ``d = nd.dict().save(); d["k"] = x``."""
    return _container("dict", dict(items))
