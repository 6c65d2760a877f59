"""Proxy: stands for a value inside a trace, and is that value once the trace has run.

Inside a trace every operation on a proxy records a node. After the trace, a saved proxy held in
a local variable is replaced by its value (:mod:`.inject`); one kept elsewhere (a list, a dict) has
``.value`` and forwards everything (operators, tensor methods, ``torch.*`` functions, printing) to
it; an unsaved one explains that it was not saved.
"""
from __future__ import annotations

import operator
import sys
from typing import Any

from ..errors import ForbiddenOperationError, TracingError, UnsavedValueError
from ..graph.node import Kind, Ref
from ..graph.ops import (
    check_attribute_name,
    check_op_call,
    denied_error,
    denied_family,
    registry,
)
from .recording import Recording

_MISSING = object()


class Proxy:
    """A value of the model's run, seen from the user's code."""

    __slots__ = ("_recorder", "_node", "_value", "_save_node", "__weakref__")

    def __init__(self, recorder: Recording, node: int) -> None:
        object.__setattr__(self, "_recorder", recorder)
        object.__setattr__(self, "_node", node)
        object.__setattr__(self, "_value", _MISSING)
        object.__setattr__(self, "_save_node", None)

    # -- state ------------------------------------------------------------------------------------
    def _live(self) -> bool:
        return self._recorder.recording

    def _has_value(self) -> bool:
        return self._value is not _MISSING

    @property
    def value(self) -> Any:
        """The value computed for this proxy (after the trace; saved proxies only)."""
        if self._value is not _MISSING:
            return self._value
        node = self._recorder.node(self._node)
        if self._recorder.recording:
            raise TracingError(
                f"{node.describe()} (recorded at {node.location}) has no value yet: the model runs when "
                "the `with` block exits. Use the proxy in further operations, or .save() it and read it "
                "after the block.")
        stop = self._recorder.never_ran.get(self._node)
        if stop is not None:
            raise UnsavedValueError(
                f"{node.describe()} (recorded at {node.location}) was never computed: the run stopped at the "
                f"stop recorded at {stop.location} before reaching it. Save it before the stop (or move "
                "the stop later) to get its value", location=node.location, module=node.module)
        raise UnsavedValueError(
            f"{node.describe()} (recorded at {node.location}) was not saved, so its value is gone; call "
            ".save() on it inside the trace", location=node.location, module=node.module)

    def save(self, name: str | None = None) -> Proxy:
        """Keep this value after the trace. ``name`` names it in remote results (default: the variable)."""
        self._recorder.save(self, name)
        return self

    def stop(self) -> None:
        """Stop the run when this value is reached, as nnsight does: once it exists (and what is
        written before this line and can run by then has run), the forward pass ends. Saves of later
        modules never run, even those written before this line; reading them raises ``ValueError``.
        (``tracer.stop()`` stops where it is written instead, once everything before it has run.)"""
        if not self._live():
            raise TracingError("stop() can only be called inside the trace that records this value")
        self._recorder.add(Kind.STOP, (self,))

    def backward(self, gradient: Any = None, retain_graph: bool | None = None) -> Proxy:
        """Run backward from this value inside the trace (gradients then flow to ``.grad`` reads)."""
        if not self._live():
            return self.value.backward(gradient=gradient, retain_graph=retain_graph)
        kwargs = {k: v for k, v in (("grad_tensors", gradient), ("retain_graph", retain_graph)) if v is not None}
        return self._recorder.add(Kind.BACKWARD, (self,), kwargs)

    def retain_grad(self) -> None:
        """Keep this value's gradient, as torch's ``retain_grad()``: after the trace, the saved value's
        ``.grad`` is the gradient that reached it in the next ``backward()`` written after this line.

        Recorded as a read of ``.grad`` saved beside the value, so it works alike locally and on
        shards, which never run ``retain_grad`` themselves: it touches only the experiment's own
        value. Parameters read in a trace are copies with no gradient, and are refused.
        """
        if not self._live():
            self.value.retain_grad()
            return
        self._check_has_grad()
        self._recorder.retain_grad(self)

    @property
    def grad(self) -> Any:
        """The gradient of this value during backward (a proxy inside the trace)."""
        if not self._live():
            return self.value.grad
        self._check_has_grad()
        return self._recorder.add(Kind.GRAD, (self,))

    @grad.setter
    def grad(self, new: Any) -> None:
        if not self._live():
            raise TracingError("gradients can be replaced only inside the trace")
        self._check_has_grad()
        self._recorder.add(Kind.GRAD_SETTER, (self, new))

    def _check_has_grad(self) -> None:
        node = self._recorder.node(self._node)
        if node.kind == Kind.MODULE_ATTR:
            raise ForbiddenOperationError(
                f"{node.describe()} has no .grad in a trace: parameters read in a trace are copies, detached "
                "from the (shared) model, so no gradient reaches them. Read the gradient of a module's output "
                "or input instead (e.g. lm.lm_head.input.grad)", attribute=node.target, module=node.module)

    # -- recording --------------------------------------------------------------------------------
    def _op(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> Proxy:
        check_op_call(name, _refs(args), _refs(kwargs or {}))  # refuse early what a shard would refuse
        return self._recorder.add(Kind.OP, args, kwargs, target=name)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if not self._live():
            return getattr(self.value, name)
        if registry().is_tensor_method(name):
            return _Method(self, name)
        return self._op("getattr", (self, name))

    def __setattr__(self, name: str, value: Any) -> None:
        if name in Proxy.__slots__ or name == "grad":
            object.__setattr__(self, name, value)
            return
        if not name.startswith("_"):
            check_attribute_name(name)  # `w.data = ...`: refused as what it is
        raise TracingError(f"cannot set attribute {name!r} on a traced value; only .grad can be replaced")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self._live():
            return self.value(*args, **kwargs)
        return self._op("call", (self, *args), kwargs)

    def __getitem__(self, key: Any) -> Any:
        if not self._live():
            return self.value[_unwrap(key)]
        return self._op("operator.getitem", (self, key))

    def __setitem__(self, key: Any, value: Any) -> None:
        if not self._live():
            self.value[_unwrap(key)] = _unwrap(value)
            return
        self._op("operator.setitem", (self, key, value))

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        recorder = _live_recorder((args, kwargs))
        if recorder is None:
            return func(*_unwrap(args), **_unwrap(kwargs))
        name = registry().name_of(func)
        if name is None:
            qualname = f"{getattr(func, '__module__', '') or ''}.{getattr(func, '__qualname__', repr(func))}"
            short = getattr(func, "__name__", "") or ""
            family = denied_family(short)
            if family is not None:
                raise denied_error(f"Tensor.{short}" if "Tensor" in qualname else f"torch.{short}", family)
            raise TracingError(
                f"{qualname} is not in the operation whitelist; wrap it in nd.apply(fn, ...) to run it "
                "locally")
        check_op_call(name, _refs(args), _refs(kwargs))
        return recorder.add(Kind.OP, args, kwargs, target=name)

    # -- plain Python protocols -----------------------------------------------------------------------
    def __repr__(self) -> str:
        if self._value is not _MISSING:
            return repr(self._value)
        node = self._recorder.node(self._node)
        return f"<Proxy %{node.id}: {node.describe()}>"

    def __str__(self) -> str:
        return str(self.value) if self._value is not _MISSING else repr(self)

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __bool__(self) -> bool:
        if self._live():
            entered = self._recorder.enter_branch(self, sys._getframe(1))  # `if x:` records both branches
            if entered is not None:
                return entered
            raise TracingError(
                "a traced value has no truth value while recording (it exists only when the model runs); an "
                "`if` statement on it is recorded as a conditional, but `while`, `x if c else y`, `assert` and "
                "truth tests inside other calls are not (nor an `if` whose source cannot be read). Write "
                "`with tracer.cond(x):` for the if branch and `with tracer.cond(~x):` for the else branch "
                "(elif: `tracer.cond(~x & y)`); around whole traces of a session, `with session.cond(x):`")
        return bool(self.value)

    def __len__(self) -> int:
        if self._live():
            length = self._recorder.known_length(self._node)
            if length is None:
                raise TracingError("the length of a traced value is unknown while recording; use .shape[0] or "
                                   ".size(0) (a traced list made with nd.list() and changed only by unconditional "
                                   "append/insert/pop/remove/extend/clear calls has a known length)")
            return length
        return len(self.value)

    def __iter__(self) -> Any:
        if self._live():
            length = self._recorder.known_length(self._node)
            if length is None:
                raise TracingError(
                    "a traced value cannot be unpacked or iterated while recording (its length is known only "
                    "when the model runs); index it instead, e.g. out[0]. A traced list whose length is known "
                    "while recording (nd.list() changed only by unconditional append/insert/pop/remove/extend/"
                    "clear calls) can be iterated, and so can a Python list (`for x in items:` or, around "
                    "whole traces, `with session.iter(items) as item:`)")
            return (self[k] for k in range(length))  # each item read where the loop body reads it
        return iter(self.value)

    def __contains__(self, item: Any) -> bool:
        return _unwrap(item) in self.value

    def __hash__(self) -> int:
        return id(self)

    def __array__(self, dtype: Any = None, copy: Any = None) -> Any:
        value = self.value
        array = value.detach().cpu().numpy() if hasattr(value, "detach") else value
        return array if dtype is None else array.astype(dtype)

    def __float__(self) -> float:
        return float(self.value)

    def __int__(self) -> int:
        return int(self.value)

    def __index__(self) -> int:
        return operator.index(self.value)

    def __reduce__(self) -> Any:
        return (_identity, (self.value,))


def _identity(value: Any) -> Any:
    return value


class _Method:
    """``proxy.mean`` before it is called: records ``Tensor.mean`` when called.

    Some attributes share a name with a tensor method (``topk(3).indices``, ``out.values``); used
    as anything but a call, this records a plain attribute read instead.
    """

    __slots__ = ("_proxy", "_name")

    def __init__(self, proxy: Proxy, name: str) -> None:
        self._proxy = proxy
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Proxy:
        return self._proxy._op(f"Tensor.{self._name}", (self._proxy, *args), kwargs)

    def _attribute(self) -> Proxy:
        return self._proxy._op("getattr", (self._proxy, self._name))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._attribute(), name)

    def __getitem__(self, key: Any) -> Any:
        return self._attribute()[key]


def map_proxies(obj: Any, fn: Any) -> Any:
    """``obj`` with every proxy inside plain tuples, lists and dicts replaced by ``fn(proxy)``."""
    kind = type(obj)
    if kind is Proxy:
        return fn(obj)
    if kind is tuple:
        return tuple(map_proxies(o, fn) for o in obj)
    if kind is list:
        return [map_proxies(o, fn) for o in obj]
    if kind is dict:
        return {k: map_proxies(v, fn) for k, v in obj.items()}
    return obj


def _unwrap(obj: Any) -> Any:
    return map_proxies(obj, lambda proxy: proxy.value)


def _refs(obj: Any) -> Any:
    """``obj`` with proxies replaced by references, as the recorder will store it (for checks)."""
    return map_proxies(obj, lambda proxy: Ref(proxy._node))


def _live_recorder(obj: Any) -> Recording | None:
    kind = type(obj)
    if kind is Proxy:
        return obj._recorder if obj._recorder.recording else None
    if kind in (tuple, list):
        for item in obj:
            found = _live_recorder(item)
            if found is not None:
                return found
    elif kind is dict:
        return _live_recorder(tuple(obj.values()))
    return None


def _binary(name: str, reflected: bool = False) -> Any:
    fn = getattr(operator, name)
    op_name = f"operator.{name}"

    if reflected:
        def method(self: Proxy, other: Any) -> Any:
            if self._live():
                return self._op(op_name, (other, self))
            return fn(_unwrap(other), self.value)
    else:
        def method(self: Proxy, other: Any) -> Any:
            if self._live():
                return self._op(op_name, (self, other))
            return fn(self.value, _unwrap(other))
    return method


def _unary(name: str) -> Any:
    fn = getattr(operator, name)
    op_name = f"operator.{name}"

    def method(self: Proxy) -> Any:
        if self._live():
            return self._op(op_name, (self,))
        return fn(self.value)
    return method


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and_", "or_", "xor",
              "lshift", "rshift", "lt", "le", "eq", "ne", "gt", "ge"):
    _dunder = f"__{_name.rstrip('_')}__"
    setattr(Proxy, _dunder, _binary(_name))
    if _name not in ("lt", "le", "eq", "ne", "gt", "ge"):
        setattr(Proxy, f"__r{_name.rstrip('_')}__", _binary(_name, reflected=True))
for _name in ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul", "iand", "ior", "ixor"):
    setattr(Proxy, f"__{_name}__", _binary(_name))
for _name in ("neg", "pos", "abs", "invert"):
    setattr(Proxy, f"__{_name}__", _unary(_name))
