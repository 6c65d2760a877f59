"""JSON encoding of node arguments: references, containers, slices, tensors, dtypes.

Every value is mapped to plain JSON with a one-key tag object where JSON has no type for it,
so decoding never guesses and never executes anything.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import GraphValidationError
from ..tensors import dtype_from_name, dtype_name, tensor_from_json, tensor_to_json
from .node import Ref


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


_TAGS = {
    "ref": lambda v: Ref(int(v)),
    "tuple": lambda v: tuple(decode(x) for x in v),
    "dict": lambda v: {decode(k): decode(x) for k, x in v},
    "slice": lambda v: slice(*(decode(x) for x in v)),
    "ellipsis": lambda v: Ellipsis,
    "tensor": tensor_from_json,
    "dtype": dtype_from_name,
    "device": torch.device,
    "size": lambda v: torch.Size(v),
    "float": float,
    "complex": lambda v: complex(v[0], v[1]),
}


def decode(value: Any) -> Any:
    """Inverse of :func:`encode`."""
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, dict):
        if len(value) != 1:
            raise GraphValidationError(f"malformed argument object with keys {sorted(value)}")
        (tag, payload), = value.items()
        handler = _TAGS.get(tag)
        if handler is None:
            raise GraphValidationError(f"unknown argument tag {tag!r}; known: {sorted(_TAGS)}")
        return handler(payload)
    return value
