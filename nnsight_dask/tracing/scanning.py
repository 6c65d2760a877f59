"""Scanning while tracing: ``lm.scan(...)``, ``trace(scan=True)``.

Under a scan, ``x.shape``, ``x.ndim``, ``x.dtype``, ``x.size()`` and ``x.dim()`` of a traced value
are concrete while recording (as in nnsight 0.4): the graph recorded so far is run on fake tensors
and the answer is returned as a plain value. When that fake run cannot answer (the graph so far is
not runnable yet), a proxy is returned as usual and the full check happens when the block exits.

A failure found by a fake run is raised with its original builtin type as well
(:func:`typed_intervention_error`): ``validate=True`` on a bad index raises an ``IndexError``.
"""
from __future__ import annotations

import builtins
import copy
import sys
from collections.abc import Callable
from typing import Any

import torch

from ..backends.base import Backend
from ..errors import InterventionError, NNsightDaskError
from ..graph.node import Kind, Ref
from .recorder import Recorder

_CONCRETE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype"})
_CONCRETE_METHODS = frozenset({"Tensor.size", "Tensor.dim"})


class ScanRecorder(Recorder):
    """A recorder whose shape queries are answered at once by a fake run of the graph so far."""

    def __init__(self, backend: Callable[[], Backend]) -> None:
        super().__init__()
        self._backend = backend

    def add(self, kind: str, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None, *,
            iteration: int | None = None, **fields: Any) -> Any:
        proxy = super().add(kind, args, kwargs, iteration=iteration, **fields)
        if kind != Kind.OP or not self._asks_shape(fields.get("target"), args):
            return proxy
        value = self._fake_value(proxy._node)
        if value is _NO_ANSWER:
            return proxy
        if self.graph.nodes and self.graph.nodes[-1].id == proxy._node:
            self.graph.nodes.pop()  # the answer is a plain value: the query needs no node
        return value

    @staticmethod
    def _asks_shape(target: Any, args: tuple[Any, ...]) -> bool:
        if target in _CONCRETE_METHODS:
            return True
        return target == "getattr" and len(args) == 2 and args[1] in _CONCRETE_ATTRIBUTES

    def _fake_value(self, node_id: int) -> Any:
        node = self.graph.nodes[node_id]
        probe = copy.copy(self.graph)
        probe.nodes = list(self.graph.nodes)
        probe.local_functions = dict(self.graph.local_functions)
        probe.add(Kind.SAVE, args=(Ref(node_id),), kwargs={}, target="__scan_probe__", pass_index=node.pass_index,
                  iteration=node.iteration, cond=node.cond, invoke=node.invoke, location=node.location)
        try:
            saves = self._backend().scan(probe).saves
        except Exception:  # noqa: BLE001  not answerable yet; the scan at the block's end reports errors
            return _NO_ANSWER
        value = saves.get("__scan_probe__", _NO_ANSWER)
        if isinstance(value, list):
            value = value[0] if value else _NO_ANSWER
        if isinstance(value, (torch.Size, torch.dtype, int)) and not isinstance(value, torch.Tensor):
            return value
        return _NO_ANSWER


_NO_ANSWER = object()


def typed_intervention_error(exc: BaseException) -> BaseException:
    """``exc`` as an error of both its own type and the builtin the intervention first raised.

    An :class:`InterventionError` naming ``original_type="IndexError"`` becomes an
    ``InterventionIndexError(InterventionError, IndexError)`` with the same message and fields,
    so ``except IndexError`` catches what ``validate=True`` found. Other errors are returned as is.
    """
    if type(exc) is not InterventionError:
        return exc
    name = exc.fields.get("original_type")
    builtin = getattr(builtins, name, None) if isinstance(name, str) else None
    if not (isinstance(builtin, type) and issubclass(builtin, Exception)) or isinstance(exc, builtin):
        return exc
    cls = _typed_class(builtin)
    if cls is None:
        return exc
    return cls(exc.message, **exc.fields)


def _typed_class(builtin: type[Exception]) -> type[NNsightDaskError] | None:
    name = f"Intervention{builtin.__name__}"
    module = sys.modules[__name__]
    cls = getattr(module, name, None)
    if cls is None:
        try:
            cls = type(name, (InterventionError, builtin), {"__module__": __name__,
                                                           "__doc__": f"An intervention raised {builtin.__name__}."})
        except TypeError:  # the builtin's instance layout cannot be combined with InterventionError's
            return None
        setattr(module, name, cls)  # found by name when unpickled
    return cls
