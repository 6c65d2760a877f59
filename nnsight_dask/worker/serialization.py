"""Our Dask serializer: tensors travel as raw bytes + dtype + shape (bf16/fp8 included).

Dask's own torch serializer fails on bf16/fp8 and a failed serialization can leave a dependent
task pending forever. Values that cross workers (carries, results) are pickled with every tensor
pulled out as a separate zero-copy frame through :mod:`nnsight_dask.tensors`; the
pickle keeps shared references intact (a saved list appended to later is still one list).
"""
from __future__ import annotations

import io
import pickle
from typing import Any

import cloudpickle
import torch

from ..execution.stage import Carry
from ..tensors import nbytes, tensor_from_bytes, tensor_to_bytes
from .hop import Hop, Outcome
from .results import Results

_REGISTERED = False
#: Tensor types sent as frames (subclasses, e.g. fake or meta wrappers, go through pickle).
_PLAIN_TENSORS = frozenset({torch.Tensor, torch.nn.Parameter})


class _TensorFrames:
    """Pulls every tensor out of a pickle as a frame of its own (mixed into a pickler class)."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=5)  # type: ignore[call-arg]
        self.headers: list[dict[str, Any]] = []
        self.frames: list[memoryview] = []
        self._seen: dict[int, int] = {}

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) not in _PLAIN_TENSORS:  # called for every object pickled: the cheapest test first
            return None
        index = self._seen.get(id(obj))
        if index is None:
            header, frame = tensor_to_bytes(obj)
            header["requires_grad"] = False
            index = len(self.headers)
            self.headers.append(header)
            self.frames.append(frame)
            self._seen[id(obj)] = index
        return ("tensor", index)


class _Pickler(_TensorFrames, pickle.Pickler):
    """The fast path: the C pickler."""


class _CloudPickler(_TensorFrames, cloudpickle.Pickler):
    """For what plain pickle refuses (a saved ``dict.keys()`` view, a lambda in a log): as Dask's own
    pickle serializer does, cloudpickle is the fallback."""


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, tensors: list[torch.Tensor]) -> None:
        super().__init__(file)
        self.tensors = tensors

    def persistent_load(self, pid: Any) -> Any:
        kind, index = pid
        if kind != "tensor":
            raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
        return self.tensors[index]


def dumps(obj: Any) -> tuple[dict[str, Any], list[Any]]:
    """Header and frames (frame 0: the pickle without tensors; then one frame per tensor)."""
    buffer = io.BytesIO()
    pickler: _TensorFrames = _Pickler(buffer)
    try:
        pickler.dump(obj)  # type: ignore[attr-defined]
    except (pickle.PicklingError, TypeError, AttributeError):
        buffer = io.BytesIO()
        pickler = _CloudPickler(buffer)
        pickler.dump(obj)  # type: ignore[attr-defined]
    header = {"tensors": pickler.headers}
    return header, [buffer.getvalue(), *pickler.frames]


def loads(header: dict[str, Any], frames: list[Any]) -> Any:
    tensors = [tensor_from_bytes(h, f) for h, f in zip(header["tensors"], frames[1:])]
    return _Unpickler(io.BytesIO(frames[0]), tensors).load()


def register() -> None:
    """Register our serializer with Dask for what travels on the direct route (idempotent).

    Carries, hops (:class:`~.hop.Hop`: carries with their batch) and outcomes (results) travel
    between our own shard workers and the clients of the route, which all register first. Bare
    tensors keep Dask's default so that a plain client without this package imported can still
    read tensors from those workers.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    from distributed.protocol import dask_deserialize, dask_serialize

    for kind in (Carry, Hop, Outcome):
        dask_serialize.register(kind)(dumps)
        dask_deserialize.register(kind)(loads)
    _register_sizes()
    _REGISTERED = True


def _register_sizes() -> None:
    """Tell Dask the real size of carries and results (its memory accounting, the monitor's bytes)."""
    import dataclasses

    from dask.sizeof import sizeof

    sizeof.register(Results)(lambda results: nbytes(dict(results)))
    sizeof.register(Carry)(lambda carry: nbytes([getattr(carry, f.name) for f in dataclasses.fields(carry)]))
