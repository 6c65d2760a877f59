"""JSON encoding of node arguments: references, containers, slices, tensors, dtypes.

Every value is mapped to plain JSON with a one-key tag object where JSON has no type for it,
so decoding never guesses and never executes anything. Decoding takes JSON from anyone: every
tag's payload is checked, nesting is bounded by an explicit depth count (never by Python's
recursion limit), and tensors are checked field by field before a byte is allocated. Whatever
is wrong raises :class:`~nnsight_dask.errors.GraphValidationError` naming where it sits
(``node %3, field 'args[1].tuple[0]'``).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..errors import GraphValidationError
from ..tensors import dtype_from_name, dtype_name, tensor_from_json, tensor_to_json
from .node import Ref

#: How many levels argument values may nest (lists, tuples, dicts, slices), by default.
MAX_NESTING = 64
#: Integers in arguments must fit in 64 bits (signed or unsigned): torch takes nothing larger.
INT_MIN, INT_MAX = -(1 << 63), (1 << 64) - 1


def encode(value: Any) -> Any:
    """Plain-JSON form of an argument value."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, Ref):
        return {"ref": value.id}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, torch.Size):
        return {"size": list(value)}
    if isinstance(value, tuple):
        return {"tuple": [encode(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[encode(k), encode(v)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"slice": [encode(value.start), encode(value.stop), encode(value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    if isinstance(value, torch.Tensor):
        return {"tensor": tensor_to_json(value)}
    if isinstance(value, torch.dtype):
        return {"dtype": dtype_name(value)}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, complex):
        return {"complex": [value.real, value.imag]}
    raise GraphValidationError(
        f"cannot put a value of type {type(value).__qualname__} into an intervention graph; "
        "use tensors, numbers, strings, slices, lists, tuples or dicts",
        value_type=type(value).__qualname__,
    )


#: A decoding position, kept as a chain ``(parent, step)`` and spelled out only for an error.
Path = tuple[Any, str] | str


class _Refused(Exception):
    """Internal: a decoding problem at ``path`` (turned into a GraphValidationError by :class:`Decoder`)."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(problem)
        self.path = path
        self.problem = problem


class Decoder:
    """Decodes argument values of one graph, bounding nesting and the bytes of all tensors together.

    Parameters
    ----------
    max_depth
        Most levels that lists, tuples, dicts and slices may nest.
    max_bytes
        Most bytes that all tensors decoded by this decoder may hold together (``None``: no bound
        beyond the size of the JSON itself, which the base64 data must match).

    >>> Decoder().decode({"tuple": [1, {"ref": 0}]}, where="node %1", field="args[0]")
    (1, %0)
    >>> Decoder().decode({"pickle": "gASV"}, where="node %1", field="args[0]")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    nnsight_dask.errors.GraphValidationError: node %1, field 'args[0]': unknown argument tag 'pickle'; known: [...]
    """

    def __init__(self, max_depth: int = MAX_NESTING, max_bytes: int | None = None) -> None:
        self.max_depth = max_depth
        self.max_bytes = max_bytes
        self.tensor_bytes = 0

    def decode(self, value: Any, *, where: str, field: str, **context: Any) -> Any:
        """Decode one JSON value; ``where`` (``"node %3"``) and ``field`` name it in errors."""
        try:
            return self._decode(value, 0, field)
        except _Refused as exc:
            name = _spell(exc.path)
            raise GraphValidationError(f"{where}, field {name!r}: {exc.problem}", field=name, **context) from None

    def _decode(self, value: Any, depth: int, path: Path) -> Any:
        kind = type(value)
        if value is None or kind is bool or kind is str or kind is float:
            return value
        if kind is int:
            if not INT_MIN <= value <= INT_MAX:
                raise _Refused(path, f"integer {_short(value)} does not fit in 64 bits")
            return value
        if kind is list:
            self._enter(depth, path)
            return [self._decode(v, depth + 1, (path, f"[{i}]")) for i, v in enumerate(value)]
        if kind is dict:
            if len(value) != 1:
                keys = _short(sorted(map(str, value)))
                raise _Refused(path, f"an argument object has exactly one tag key; got keys {keys}")
            (tag, payload), = value.items()
            handler = _TAGS.get(tag) if isinstance(tag, str) else None
            if handler is None:
                raise _Refused(path, f"unknown argument tag {_short(tag)}; known: {sorted(_TAGS)}")
            return handler(self, payload, depth, (path, f".{tag}"))
        raise _Refused(path, f"a value of type {kind.__name__} is not JSON")

    def _enter(self, depth: int, path: Path) -> None:
        if depth >= self.max_depth:
            raise _Refused(path, f"arguments nest more than {self.max_depth} levels deep")

    def _items(self, payload: Any, depth: int, path: Path, length: int | None = None) -> list[Any]:
        if type(payload) is not list:
            raise _Refused(path, f"expected a list, got {type(payload).__name__}")
        if length is not None and len(payload) != length:
            raise _Refused(path, f"expected a list of {length} items, got {len(payload)}")
        self._enter(depth, path)
        return [self._decode(v, depth + 1, (path, f"[{i}]")) for i, v in enumerate(payload)]

    # -- one method a tag ----------------------------------------------------------------------
    def _ref(self, payload: Any, depth: int, path: Path) -> Ref:
        if type(payload) is not int or payload < 0:
            raise _Refused(path, f"a reference is a node id (an integer >= 0), got {_short(payload)}")
        return Ref(payload)

    def _tuple(self, payload: Any, depth: int, path: Path) -> tuple[Any, ...]:
        return tuple(self._items(payload, depth, path))

    def _dict(self, payload: Any, depth: int, path: Path) -> dict[Any, Any]:
        if type(payload) is not list:
            raise _Refused(path, f"expected a list of [key, value] pairs, got {type(payload).__name__}")
        self._enter(depth, path)
        out: dict[Any, Any] = {}
        for i, pair in enumerate(payload):
            where = (path, f"[{i}]")
            if type(pair) is not list or len(pair) != 2:
                raise _Refused(where, "expected a [key, value] pair")
            key = self._decode(pair[0], depth + 1, (where, "[0]"))
            try:
                hash(key)
            except TypeError:
                raise _Refused((where, "[0]"), f"a dict key must be hashable, not {type(key).__name__}") from None
            out[key] = self._decode(pair[1], depth + 1, (where, "[1]"))
        return out

    def _slice(self, payload: Any, depth: int, path: Path) -> slice:
        return slice(*self._items(payload, depth, path, length=3))

    def _ellipsis(self, payload: Any, depth: int, path: Path) -> Any:
        if payload is not True:
            raise _Refused(path, f"an ellipsis is written {{\"ellipsis\": true}}, got {_short(payload)}")
        return Ellipsis

    def _tensor(self, payload: Any, depth: int, path: Path) -> torch.Tensor:
        left = None if self.max_bytes is None else self.max_bytes - self.tensor_bytes
        try:
            tensor = tensor_from_json(payload, max_bytes=left)
        except ValueError as exc:
            if left is not None and "the limit is" in str(exc):
                raise _Refused(path, f"{exc} (the graph's tensors may hold {self.max_bytes} bytes in all)") from None
            raise _Refused(path, str(exc)) from None
        self.tensor_bytes += tensor.numel() * tensor.element_size()
        return tensor

    def _dtype(self, payload: Any, depth: int, path: Path) -> torch.dtype:
        try:
            return dtype_from_name(payload)
        except ValueError as exc:
            raise _Refused(path, str(exc)) from None

    def _device(self, payload: Any, depth: int, path: Path) -> torch.device:
        if type(payload) is not str or len(payload) > 32:
            raise _Refused(path, f"a device is a short string such as 'cpu', got {_short(payload)}")
        try:
            return torch.device(payload)
        except (RuntimeError, ValueError) as exc:
            raise _Refused(path, f"not a device: {_short(payload)} ({exc})") from None

    def _size(self, payload: Any, depth: int, path: Path) -> torch.Size:
        if type(payload) is not list or not all(type(v) is int and INT_MIN <= v < 1 << 63 for v in payload):
            raise _Refused(path, f"a size is a list of 64-bit integers, got {_short(payload)}")
        return torch.Size(payload)

    def _float(self, payload: Any, depth: int, path: Path) -> float:
        if payload not in ("nan", "inf", "-inf"):
            raise _Refused(path, f"a tagged float is 'nan', 'inf' or '-inf', got {_short(payload)}")
        return float(payload)

    def _complex(self, payload: Any, depth: int, path: Path) -> complex:
        if type(payload) is not list or len(payload) != 2 or not all(type(v) in (int, float) for v in payload):
            raise _Refused(path, f"a complex number is [real, imag], got {_short(payload)}")
        try:
            return complex(float(payload[0]), float(payload[1]))
        except OverflowError:
            raise _Refused(path, f"complex parts {_short(payload)} are out of float range") from None


_TAGS: dict[str, Callable[[Decoder, Any, int, Path], Any]] = {
    "ref": Decoder._ref,
    "tuple": Decoder._tuple,
    "dict": Decoder._dict,
    "slice": Decoder._slice,
    "ellipsis": Decoder._ellipsis,
    "tensor": Decoder._tensor,
    "dtype": Decoder._dtype,
    "device": Decoder._device,
    "size": Decoder._size,
    "float": Decoder._float,
    "complex": Decoder._complex,
}


def decode(value: Any, *, where: str = "argument", field: str = "value") -> Any:
    """Inverse of :func:`encode`, with the checks of :class:`Decoder` (default limits)."""
    return Decoder().decode(value, where=where, field=field)


def _spell(path: Path) -> str:
    steps: list[str] = []
    while isinstance(path, tuple):
        path, step = path
        steps.append(step)
    steps.append(path)
    return "".join(reversed(steps))


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
