"""How many bytes an operation is about to allocate, told before it runs.

A shared shard must refuse ``torch.ones(1 << 40)`` before the allocator is asked, not after the worker
was killed for it. :func:`predicted_bytes` gives the size of an op's result from its arguments alone:
the shape arguments of factories (``zeros``, ``full``, ``arange``, ``new_ones``, ...), the factors of
``repeat``/``tile``/``expand``/``repeat_interleave``, the outer product of ``outer``/``kron``, the batch
broadcast of ``matmul``, and, for any other op, the broadcast of its tensor arguments (elementwise ops
on ``[N, 1]`` and ``[1, N]`` make ``[N, N]``). Ops it cannot predict (``einsum``, data-dependent shapes)
give ``None``; their inputs are bounded, and so is what they can make from them.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import PolicyError

_FACTORIES = frozenset({"zeros", "ones", "empty", "rand", "randn", "full", "empty_strided"})
_NEW = frozenset({"new_zeros", "new_ones", "new_empty", "new_full"})
_RANGES = frozenset({"arange", "range", "linspace", "logspace"})
_DEFAULT_ITEMSIZE = 8  # float64/int64: the widest a factory makes without being told


def predicted_bytes(name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> int | None:
    """Bytes of the result of op ``name`` (``"torch.ones"``, ``"Tensor.repeat"``) on these arguments."""
    namespace, _, short = name.rpartition(".")
    itemsize = _itemsize(kwargs.get("dtype"), args)
    if namespace in ("torch", "Tensor"):
        if short in _FACTORIES and namespace == "torch":
            return _numel(_size_arg(args, kwargs)) * itemsize
        if short in _NEW and args:
            return _numel(_size_arg(args[1:], kwargs)) * itemsize
        if short in _RANGES:
            return _range_numel(short, args, kwargs) * itemsize
        if short == "eye":
            n = _int(args[0]) if args else 0
            return n * (_int(args[1]) if len(args) > 1 and not isinstance(args[1], torch.Tensor) else n) * itemsize
        if short in ("repeat", "tile") and args and isinstance(args[0], torch.Tensor):
            return args[0].numel() * _numel(_size_arg(args[1:], kwargs)) * args[0].element_size()
        if short in ("expand", "broadcast_to") and args and isinstance(args[0], torch.Tensor):
            return _numel(_size_arg(args[1:], kwargs), default=args[0].numel()) * args[0].element_size()
        if short == "repeat_interleave" and args and isinstance(args[0], torch.Tensor):
            repeats = args[1] if len(args) > 1 else kwargs.get("repeats", 1)
            total = int(repeats.sum()) if isinstance(repeats, torch.Tensor) else args[0].numel() * _int(repeats)
            return total * args[0].element_size()
        if short in ("outer", "ger", "kron", "cartesian_prod"):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            return math.prod(t.numel() for t in tensors) * max((t.element_size() for t in tensors), default=1) \
                * (len(tensors) if short == "cartesian_prod" else 1)
        if short == "matmul" or name == "operator.matmul":
            return _matmul_bytes(args)
    if name in ("operator.pow", "builtins.pow") and len(args) == 2 and all(type(a) is int for a in args) \
            and abs(args[0]) > 1 and args[1] > 0:
        return int(args[1] * math.log2(abs(args[0]))) // 8 + 1  # 2 ** 10**9: a 125 MB integer
    if name in ("operator.mul", "operator.imul") and len(args) == 2 and isinstance(args[0], (list, tuple, str)) \
            and isinstance(args[1], int):
        return len(args[0]) * max(args[1], 0) * _DEFAULT_ITEMSIZE  # [x] * n: n references
    if name in ("builtins.list", "builtins.tuple", "builtins.sorted", "builtins.dict") and args \
            and isinstance(args[0], range):
        return len(args[0]) * _DEFAULT_ITEMSIZE  # list(range(n)) materializes n integers
    return _broadcast_bytes(args, kwargs)


def check_allocation(name: str, args: Sequence[Any], kwargs: dict[str, Any], limit: int | None,
                     where: str) -> None:
    """Refuse op ``name`` when its result would exceed ``limit`` bytes (the policy's ``max_tensor_bytes``)."""
    if limit is None:
        return
    size = predicted_bytes(name, args, kwargs)
    if size is not None and size > limit:
        raise PolicyError(f"{where}: {name} would make a tensor of {size:,} bytes; this deployment allows at most "
                          f"{limit:,} bytes per tensor (max_tensor_bytes)", rule="max_tensor_bytes", op=name,
                          bytes=size)


def _size_arg(args: Sequence[Any], kwargs: dict[str, Any]) -> Sequence[Any]:
    """``zeros(2, 3)``, ``zeros((2, 3))``, ``zeros(size=(2, 3))`` and ``full((2, 3), v)`` -> ``(2, 3)``."""
    if "size" in kwargs:
        size = kwargs["size"]
        return tuple(size) if isinstance(size, (list, tuple, torch.Size)) else (size,)
    if args and isinstance(args[0], (list, tuple, torch.Size)):
        return tuple(args[0])
    return tuple(a for a in args if isinstance(a, int) and not isinstance(a, bool))


def _numel(size: Sequence[Any], default: int = 1) -> int:
    dims = [_int(d) for d in size]
    if not dims:
        return default
    return math.prod(max(d, 1) for d in dims)  # expand's -1 keeps a dim: count it as at least 1


def _range_numel(short: str, args: Sequence[Any], kwargs: dict[str, Any]) -> int:
    if short in ("linspace", "logspace"):
        steps = args[2] if len(args) > 2 else kwargs.get("steps", 0)
        return max(_int(steps), 0)
    numbers = [_number(a) for a in args[:3]]
    start, end, step = (0.0, numbers[0], 1.0) if len(numbers) == 1 else (*numbers[:2], numbers[2] if len(numbers) > 2 else 1.0)
    start, end = kwargs.get("start", start), kwargs.get("end", end)
    step = _number(kwargs.get("step", step)) or 1.0
    return max(int(math.ceil((_number(end) - _number(start)) / step)), 0) + (1 if short == "range" else 0)


def _matmul_bytes(args: Sequence[Any]) -> int | None:
    if len(args) < 2 or not all(isinstance(a, torch.Tensor) for a in args[:2]):
        return None
    a, b = args[0], args[1]
    if a.dim() < 1 or b.dim() < 1:
        return None
    rows = a.shape[-2] if a.dim() > 1 else 1
    cols = b.shape[-1] if b.dim() > 1 else 1
    try:
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except RuntimeError:
        return None
    return math.prod(batch) * rows * cols * max(a.element_size(), b.element_size())


def _broadcast_bytes(args: Sequence[Any], kwargs: dict[str, Any]) -> int | None:
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if len(tensors) < 2:
        return None
    try:
        shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    except RuntimeError:
        return None
    return math.prod(shape) * max(t.element_size() for t in tensors)


def _itemsize(dtype: Any, args: Sequence[Any]) -> int:
    if isinstance(dtype, torch.dtype):
        return torch.empty(0, dtype=dtype).element_size()
    if args and isinstance(args[0], torch.Tensor):
        return args[0].element_size()
    return _DEFAULT_ITEMSIZE


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return 0


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return 0.0
