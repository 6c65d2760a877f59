"""Shapes and sizes of what an operation will make, read from its arguments before it runs.

The helpers of :mod:`.costs`: each takes an op's (run-time) arguments and answers a number of
elements, never a tensor, without computing anything big. A shape that cannot be read (a
malformed argument) counts as empty: the operation itself then fails with torch's own error.
"""
from __future__ import annotations

import math
import operator
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch

#: Bytes of one Python item a container holds (a reference); a new integer or tuple costs more.
REFERENCE_BYTES = 8
#: Bytes of one new small Python object (an ``int`` of ``list(range(n))``, a pair of ``zip``).
OBJECT_BYTES = 64


def tensors(value: Any, depth: int = 2, limit: int | None = None) -> list[torch.Tensor]:
    """The tensors in ``value`` and in lists/tuples/dicts nested up to ``depth`` levels, in order
    (looking at no more than ``limit`` items when given)."""
    found: list[torch.Tensor] = []
    _walk(value, depth, found, -1 if limit is None else limit)
    return found


def _walk(item: Any, depth: int, found: list[torch.Tensor], remaining: int) -> int:
    """Collect the tensors of ``item`` into ``found``; ``remaining`` items may still be looked at
    (negative: any number); returns what is left."""
    if isinstance(item, torch.Tensor):
        found.append(item)
        return remaining - 1
    if depth <= 0 or not isinstance(item, (list, tuple, dict)):
        return remaining - 1
    for child in (item.values() if isinstance(item, dict) else item):
        remaining = _walk(child, depth - 1, found, remaining)
        if remaining == 0:
            break
    return remaining


def first_tensor(args: Sequence[Any], kwargs: dict[str, Any], *names: str) -> torch.Tensor | None:
    """The first tensor among the positional arguments (or the named keyword arguments)."""
    for value in (*args, *(kwargs.get(n) for n in names or ("input", "self"))):
        if isinstance(value, torch.Tensor):
            return value
    return None


def arg(args: Sequence[Any], kwargs: dict[str, Any], index: int, name: str, default: Any = None) -> Any:
    """Argument ``name``, passed at position ``index`` or by keyword."""
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def as_int(value: Any, default: int = 0) -> int:
    """An integer argument (a Python number or a one-element tensor); ``default`` when it is none."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    try:
        if isinstance(value, torch.Tensor) and value.numel() != 1:
            return default
        return int(value)
    except (TypeError, ValueError, OverflowError, RuntimeError):
        return default


def as_float(value: Any, default: float = 0.0) -> float:
    try:
        if isinstance(value, torch.Tensor) and value.numel() != 1:
            return default
        return float(value)
    except (TypeError, ValueError, OverflowError, RuntimeError):
        return default


def product(values: Iterable[int]) -> int:
    return math.prod(max(int(v), 0) for v in values)


def itemsize(dtype: Any, fallback: int) -> int:
    """Bytes of one element of ``dtype`` (a ``torch.dtype``), else ``fallback``."""
    return dtype.itemsize if isinstance(dtype, torch.dtype) else fallback


def dtype_in(args: Sequence[Any], kwargs: dict[str, Any]) -> torch.dtype | None:
    """The dtype an op is asked for: ``dtype=`` or a dtype among its positional arguments."""
    dtype = kwargs.get("dtype")
    if isinstance(dtype, torch.dtype):
        return dtype
    return next((a for a in args if isinstance(a, torch.dtype)), None)


def widest(found: Sequence[torch.Tensor], fallback: int = 8) -> int:
    return max((t.element_size() for t in found), default=fallback)


def broadcast_numel(shapes: Sequence[Sequence[int]]) -> int:
    """Elements of the broadcast of ``shapes`` (where they do not broadcast, the largest dims each:
    the operation fails anyway)."""
    if not shapes:
        return 1
    ndim = max(len(s) for s in shapes)
    total = 1
    for axis in range(1, ndim + 1):
        total *= max((int(s[-axis]) for s in shapes if len(s) >= axis), default=1)
    return max(total, 0)


def size_arg(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[int, ...]:
    """``zeros(2, 3)``, ``zeros((2, 3))``, ``zeros(size=(2, 3))``, ``randint(9, (2, 3))`` -> ``(2, 3)``."""
    if "size" in kwargs and kwargs["size"] is not None:
        size = kwargs["size"]
        return tuple(as_int(d) for d in size) if isinstance(size, (list, tuple, torch.Size)) else (as_int(size),)
    for a in args:
        if isinstance(a, (list, tuple, torch.Size)):
            return tuple(as_int(d) for d in a)
    return tuple(as_int(a) for a in args if isinstance(a, int) and not isinstance(a, bool))


def dims_of(dim: Any, ndim: int) -> list[int]:
    """``dim`` (an int, a sequence, or None: all) as non-negative dims of an ``ndim``-d tensor."""
    if dim is None:
        return list(range(ndim))
    items = dim if isinstance(dim, (list, tuple, torch.Size)) else [dim]
    out = []
    for d in items:
        if isinstance(d, int) and ndim:
            out.append(d % ndim if -ndim <= d < ndim else 0)
    return out


def reduced_numel(t: torch.Tensor, dim: Any) -> int:
    """Elements left after reducing ``t`` over ``dim`` (None: everything)."""
    if dim is None or t.dim() == 0:
        return 1
    kept = set(range(t.dim())) - set(dims_of(dim, t.dim()))
    return product(t.shape[d] for d in kept)


# -- Python values --------------------------------------------------------------------------------
def length(value: Any) -> int:
    """How many items walking ``value`` visits: ``len`` of sequences, ranges, dicts, strings and
    tensors (along their first dim); an iterator's own hint (0 for ``enumerate``/``zip``, charged
    when they were made)."""
    if isinstance(value, torch.Tensor):
        return value.shape[0] if value.dim() else 0
    try:
        return len(value)
    except (TypeError, OverflowError):
        pass
    try:
        return operator.length_hint(value)
    except (TypeError, OverflowError):
        return 0


def count_items(value: Any, limit: int) -> int:
    """Items in ``value`` counted through nested lists, tuples and dicts, stopping past ``limit``
    (so counting costs at most ``limit`` steps); a tensor counts its elements."""
    total, stack, seen = 0, [value], set()
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            total += item.numel()
        elif isinstance(item, (list, tuple, dict)):
            if id(item) in seen:
                continue
            seen.add(id(item))
            total += len(item) + 1
            stack.extend(item.values() if isinstance(item, dict) else item)
        elif isinstance(item, (str, range)):
            total += len(item) // 16 + 1
        else:
            total += 1
    return total


def digits(value: Any) -> int:
    """30-bit digits of a Python integer (what its arithmetic costs grow with); 1 otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value.bit_length() // 30 + 1
    return 1


# -- tensor indexing ------------------------------------------------------------------------------
def index_numel(shape: Sequence[int], key: Any) -> tuple[int, bool]:
    """Elements of ``x[key]`` for ``x`` of ``shape`` (an upper bound), and whether ``key`` is advanced
    (tensors, lists, booleans: the result is a copy; otherwise a view)."""
    items = key if isinstance(key, tuple) else (key,)
    advanced = [k for k in items if isinstance(k, (torch.Tensor, list)) or type(k) is bool]
    consuming = sum(k.dim() if isinstance(k, torch.Tensor) and k.dtype == torch.bool else 1
                    for k in items if k is not None and k is not Ellipsis and type(k) is not bool)
    dims = list(shape)
    out: list[int] = []
    position = 0
    index_shapes: list[Sequence[int]] = []
    for k in items:
        if k is None or type(k) is bool:
            out.append(1)
        elif k is Ellipsis:
            skip = max(len(dims) - consuming, 0)
            out.extend(dims[position:position + skip])
            position += skip
        elif isinstance(k, slice):
            size = dims[position] if position < len(dims) else 0
            try:
                out.append(len(range(*k.indices(size))))
            except (TypeError, ValueError):
                out.append(size)
            position += 1
        elif isinstance(k, torch.Tensor) and k.dtype == torch.bool:
            index_shapes.append((product(dims[position:position + max(k.dim(), 1)]),))
            position += max(k.dim(), 1)
        elif isinstance(k, torch.Tensor):
            index_shapes.append(tuple(k.shape))
            position += 1
        elif isinstance(k, list):
            index_shapes.append((count_items(k, 1 << 62),))
            position += 1
        else:  # an integer
            position += 1
    out.extend(dims[position:])
    return product(out) * (broadcast_numel(index_shapes) if index_shapes else 1), bool(advanced)


# -- einsum ---------------------------------------------------------------------------------------
_EINSUM_TERM = re.compile(r"^[A-Za-z.]*$")


def einsum_cost(equation: Any, operands: Sequence[Any]) -> tuple[int, int] | None:
    """``(elements of the largest tensor made, multiply-adds)`` of ``torch.einsum(equation, *operands)``
    contracted left to right, as torch does without opt_einsum; None when the equation is unreadable."""
    if not isinstance(equation, str) or not operands or not all(isinstance(o, torch.Tensor) for o in operands):
        return None
    equation = equation.replace(" ", "")
    inputs, arrow, output = equation.partition("->")
    terms = inputs.split(",")
    if len(terms) != len(operands) or not all(_EINSUM_TERM.match(t) for t in (*terms, output)):
        return None
    sizes: dict[str, int] = {}
    letters: list[list[str]] = []
    for term, tensor in zip(terms, operands):
        named = [c for c in term.replace("...", "") if c != "."]
        ellipsis = tensor.dim() - len(named)
        if ellipsis < 0 or ("..." not in term and ellipsis):
            return None
        expanded: list[str] = []
        dims = iter(tensor.shape)
        for part in re.split(r"(\.\.\.)", term):
            if part == "...":
                for i in range(ellipsis):
                    expanded.append(f"@{ellipsis - 1 - i}")  # ellipsis dims are matched from the right
                    size = next(dims)
                    sizes[expanded[-1]] = max(sizes.get(expanded[-1], 1), size)
            else:
                for c in part:
                    if c == ".":
                        continue
                    expanded.append(c)
                    sizes[c] = max(sizes.get(c, 1), next(dims))
        letters.append(expanded)
    if arrow:
        kept_out = set()
        for part in re.split(r"(\.\.\.)", output):
            if part == "...":
                kept_out |= {k for k in sizes if k.startswith("@")}
            else:
                kept_out |= set(part)
    else:
        counts: dict[str, int] = {}
        for term in letters:
            for c in term:
                counts[c] = counts.get(c, 0) + 1
        kept_out = {c for c, n in counts.items() if n == 1 or c.startswith("@")}
    largest = product(sizes[c] for c in kept_out if c in sizes)
    work = 0
    current = set(letters[0])
    for i, term in enumerate(letters[1:], start=1):
        later = set().union(*letters[i + 1:]) if i + 1 < len(letters) else set()
        joined = current | set(term)
        work += product(sizes[c] for c in joined)
        current = {c for c in joined if c in later or c in kept_out}
        largest = max(largest, product(sizes[c] for c in current))
    if len(letters) == 1:
        work = product(sizes[c] for c in letters[0])
    return largest, work


# -- convolutions and pooling ---------------------------------------------------------------------
def per_dim(value: Any, n: int, default: int) -> list[int]:
    if isinstance(value, (list, tuple)):
        values = [as_int(v, default) for v in value]
        return (values * n)[:n] if len(values) == 1 else values[:n] + [default] * (n - len(values))
    if isinstance(value, str):  # "same" / "valid": the output is at most the input padded by the kernel
        return [-1] * n
    return [as_int(value, default)] * n


def conv_output(spatial: Sequence[int], kernel: Sequence[int], stride: Any, padding: Any, dilation: Any,
                transposed: bool = False, output_padding: Any = 0) -> list[int]:
    """Output sizes of a convolution (or a transposed one) along its spatial dims."""
    n = len(spatial)
    strides, pads = per_dim(stride, n, 1), per_dim(padding, n, 0)
    dilations, extra = per_dim(dilation, n, 1), per_dim(output_padding, n, 0)
    out = []
    for size, k, s, p, d, e in zip(spatial, kernel, strides, pads, dilations, extra):
        s, d = max(s, 1), max(d, 1)
        if p < 0:  # "same"/"valid"
            p = d * (k - 1)
        if transposed:
            out.append(max((size - 1) * s - 2 * p + d * (k - 1) + e + 1, 0))
        else:
            out.append(max((size + 2 * p - d * (k - 1) - 1) // s + 1, 0))
    return out
