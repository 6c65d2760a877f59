"""Estimates of what a tensor operation makes and does, from its arguments, before it runs.

The numbers of a :class:`Cost` (see :mod:`.op_rules`, which gives each whitelisted operation its
estimate): ``bytes``, the largest new tensor (or Python object) the operation makes, counting a view
whose logical size grows (``expand``, ``unfold``) at that size; ``work``, in **work units**, one unit
being one floating-point operation of a matrix product (the rate a shard measures on its device),
other kernels counted by what they cost on CPUs and GPUs relative to it (:data:`ELEMENT`,
:data:`MATH`, :data:`SPECIAL`, :data:`COMPARE`, :data:`RANDOM`, :data:`LAUNCH`); ``items``, the
Python items the operation walks, bounded apart because the interpreter's speed does not follow the
device's. Estimates are upper bounds read from shapes, never by computing anything big.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import shapes as S
from .shapes import OBJECT_BYTES, REFERENCE_BYTES

#: Work units (see the module docstring); one unit is one floating-point operation of a matrix product.
FLOP = 1
ELEMENT = 32
MATH = 512
SPECIAL = 16384
COMPARE = 1024
RANDOM = 512
LAUNCH = 100_000
#: Python items one tensor element or row costs when Python walks a tensor (each is a new tensor object).
TENSOR_ITEM = 64

@dataclass(frozen=True)
class Cost:
    """What one call of an operation is about to cost (see the module docstring)."""

    bytes: int = 0
    work: float = 0
    items: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(max(self.bytes, other.bytes), self.work + other.work, self.items + other.items)


Estimate = Callable[[tuple[Any, ...], dict[str, Any]], Cost]

NOTHING = Cost(0, LAUNCH, 0)


def numel_cost(numel: int, size: int, weight: float, outputs: int = 1) -> Cost:
    return Cost(numel * size * outputs, numel * weight + LAUNCH)


# -- estimates of tensor operations ----------------------------------------------------------------
def elementwise(weight: float, widen: int = 1, outputs: int = 1) -> Estimate:
    """Result: the broadcast of the tensor arguments (``[N, 1] + [1, N]`` makes ``[N, N]``), ``widen``
    times wider than the widest argument (``complex``/``polar``: 2), ``outputs`` of them."""
    def estimate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
        found = S.tensors((args, kwargs))
        numel = S.broadcast_numel([t.shape for t in found])
        return numel_cost(numel, S.itemsize(S.dtype_in(args, kwargs), S.widest(found) * widen), weight, outputs)
    return estimate


def same(weight: float, outputs: int = 1, indices: int = 0) -> Estimate:
    """Result: ``outputs`` tensors the size of the first tensor argument (and ``indices`` int64 ones)."""
    def estimate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
        t = S.first_tensor(args, kwargs)
        if t is None:
            return NOTHING
        size = S.itemsize(S.dtype_in(args, kwargs), t.element_size()) * outputs + 8 * indices
        return numel_cost(t.numel(), size, weight)
    return estimate


def reduction(weight: float, dim_at: int = 1, outputs: int = 1, index: bool = False, dim: Any = None) -> Estimate:
    """Result: the first tensor reduced over ``dim`` (at position ``dim_at`` or ``dim=``, else the
    given default; None: everything); a tensor in that position makes it elementwise
    (``torch.max(a, b)``). ``index``: the result is int64 (``argmax``)."""
    default = dim
    pointwise = elementwise(ELEMENT)

    def estimate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
        t = S.first_tensor(args, kwargs)
        if t is None:
            return NOTHING
        if len(args) > 1 and isinstance(args[1], torch.Tensor) and dim_at == 1:
            return pointwise(args, kwargs)
        over = S.arg(args, kwargs, dim_at, "dim", kwargs.get("axis", default))
        if not isinstance(over, (int, list, tuple, torch.Size)) or isinstance(over, bool):
            over = None
        size = 8 if index else S.itemsize(S.dtype_in(args, kwargs), t.element_size())
        return Cost(S.reduced_numel(t, over) * max(size, 8 if outputs > 1 else size) * outputs,
                    t.numel() * weight + LAUNCH)
    return estimate


def sort(outputs: int = 2, dim_at: int = 1, values: bool = True) -> Estimate:
    """A sort along a dim (or everything): ``n log2 n`` comparisons; values (unless ``values=False``:
    ``argsort``) and int64 indices."""
    def estimate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
        t = S.first_tensor(args, kwargs)
        if t is None:
            return NOTHING
        dim = S.arg(args, kwargs, dim_at, "dim", -1)
        n = t.shape[S.dims_of(dim, t.dim())[0]] if t.dim() and isinstance(dim, int) else t.numel()
        per_element = (t.element_size() if values else 0) + 8 * (outputs - 1 if values else 1)
        return Cost(t.numel() * per_element, t.numel() * math.log2(max(n, 2)) * COMPARE + LAUNCH)
    return estimate


def factory(kind: str, weight: float = ELEMENT) -> Estimate:
    """``zeros(2, 3)``, ``ones((2, 3))``, ``full((2, 3), v)``, ``randint(9, (2, 3))``: the size
    argument times the dtype's size (``dtype=``, else the default float dtype, int64 for ``"int"``,
    the fill value's type for ``"fill"``)."""
    def estimate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
        numel = S.product(S.size_arg(args, kwargs))
        dtype = S.dtype_in(args, kwargs)
        if dtype is None and kind == "fill":
            fill = S.arg(args, kwargs, 1, "fill_value")
            dtype = torch.bool if isinstance(fill, bool) else torch.int64 if isinstance(fill, int) else \
                torch.complex64 if isinstance(fill, complex) else None
        if dtype is None:
            dtype = torch.int64 if kind == "int" else torch.get_default_dtype()
        return numel_cost(numel, dtype.itemsize, weight)
    return estimate


def like(weight: float = ELEMENT) -> Estimate:
    """``zeros_like(x)``: the size of ``x`` (in ``dtype=`` when given)."""
    return same(weight)


def new_factory(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    """``x.new_zeros(size)``, ``x.new_full(size, v)``: the size, in ``x``'s dtype unless told."""
    t = args[0] if args and isinstance(args[0], torch.Tensor) else None
    numel = S.product(S.size_arg(args[1:], kwargs))
    return numel_cost(numel, S.itemsize(S.dtype_in(args[1:], kwargs), t.element_size() if t is not None else 8),
                       ELEMENT)


def ranges(args: tuple[Any, ...], kwargs: dict[str, Any], short: str) -> Cost:
    if short in ("linspace", "logspace"):
        numel = max(S.as_int(S.arg(args, kwargs, 2, "steps", 0)), 0)
        dtype = S.dtype_in(args, kwargs) or torch.get_default_dtype()
    else:
        numbers = [a for a in args[:3] if not isinstance(a, torch.dtype)]
        start, end, step = ((0, numbers[0], 1) if len(numbers) == 1 else
                            (numbers[0], numbers[1], numbers[2] if len(numbers) > 2 else 1)) if numbers else (0, 0, 1)
        start, end, step = kwargs.get("start", start), kwargs.get("end", end), kwargs.get("step", step)
        span, step_f = S.as_float(end) - S.as_float(start), S.as_float(step) or 1.0
        numel = max(math.ceil(span / step_f), 0) + (1 if short == "range" else 0) if math.isfinite(span / step_f) \
            else 1 << 62
        integral = all(isinstance(v, int) for v in (start, end, step))
        dtype = S.dtype_in(args, kwargs) or (torch.int64 if integral else torch.get_default_dtype())
    return numel_cost(numel, dtype.itemsize, ELEMENT)


def range_of(short: str) -> Estimate:
    return lambda args, kwargs: ranges(args, kwargs, short)


def data(at: int = 0) -> Estimate:
    """``torch.tensor(data)``: Python numbers in nested lists become elements (walked one by one)."""
    def estimate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
        value = S.arg(args, kwargs, at, "data")
        if isinstance(value, torch.Tensor):
            return numel_cost(value.numel(), S.itemsize(S.dtype_in(args, kwargs), value.element_size()), ELEMENT)
        count = len(value) if isinstance(value, range) else S.count_items(value, 1 << 62)
        dtype = S.dtype_in(args, kwargs)
        return Cost(count * S.itemsize(dtype, 8), count * ELEMENT + LAUNCH, count)
    return estimate


def view(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    return NOTHING


def maybe_copy(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    """``reshape``/``flatten``/``contiguous``: a view of a contiguous tensor, else a copy."""
    t = S.first_tensor(args, kwargs)
    if t is None or t.is_contiguous():
        return NOTHING
    return numel_cost(t.numel(), t.element_size(), ELEMENT)


def convert(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    """``x.to(dtype/device/other)``, ``x.float()``, ``x.type_as(y)``: a copy unless nothing changes."""
    t = S.first_tensor(args, kwargs)
    if t is None:
        return NOTHING
    target = S.dtype_in(args[1:], kwargs)
    other = next((a for a in args[1:] if isinstance(a, torch.Tensor)), None)
    if other is not None:
        target = other.dtype
    devices = [a for a in (*args[1:], kwargs.get("device")) if isinstance(a, (str, torch.device, int))
               and not isinstance(a, bool)]
    if other is not None:
        devices.append(other.device)
    changes = bool(kwargs.get("copy")) or (target is not None and target != t.dtype) or any(
        not _same_device(t.device, d) for d in devices)
    if not changes:
        return NOTHING
    return numel_cost(t.numel(), S.itemsize(target, t.element_size()), ELEMENT)


def _same_device(here: torch.device, spec: Any) -> bool:
    try:
        there = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        return False
    return there.type == here.type and (there.index is None or there.index == here.index)


def cast(dtype: torch.dtype) -> Estimate:
    def estimate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
        t = S.first_tensor(args, kwargs)
        if t is None or t.dtype == dtype:
            return NOTHING
        return numel_cost(t.numel(), dtype.itemsize, ELEMENT)
    return estimate


def logical(estimate_numel: Callable[[torch.Tensor, tuple[Any, ...], dict[str, Any]], int]) -> Estimate:
    """Views and copies whose (logical) size is told by ``estimate_numel(first tensor, rest, kwargs)``."""
    def estimate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
        t = S.first_tensor(args, kwargs)
        if t is None:
            return NOTHING
        return numel_cost(estimate_numel(t, args[1:], kwargs), t.element_size(), ELEMENT)
    return estimate


def _repeat(t: torch.Tensor, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    return t.numel() * S.product(S.size_arg(rest, kwargs))


def _expand(t: torch.Tensor, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    size = S.size_arg(rest, kwargs)
    if rest and isinstance(rest[0], torch.Tensor):  # expand_as
        return rest[0].numel()
    return S.product(max(d, 1) for d in size) if size else t.numel()


def _repeat_interleave(t: torch.Tensor, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    size = kwargs.get("output_size")
    if size is not None:
        return S.as_int(size)
    repeats = S.arg(rest, kwargs, 0, "repeats", None)
    if repeats is None and "input" not in kwargs:  # repeat_interleave(repeats): each index, repeats[i] times
        repeats = t
    if repeats is None:
        repeats = 1
    if isinstance(repeats, torch.Tensor) and (repeats.numel() != 1 or repeats is t):
        return int(repeats.sum()) if repeats.numel() else 0
    return t.numel() * max(S.as_int(repeats, 1), 0)


def _unfold(t: torch.Tensor, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    dim = S.as_int(S.arg(rest, kwargs, 0, "dimension", 0))
    size, step = S.as_int(S.arg(rest, kwargs, 1, "size", 1), 1), max(S.as_int(S.arg(rest, kwargs, 2, "step", 1), 1), 1)
    n = t.shape[S.dims_of(dim, t.dim())[0]] if t.dim() else 1
    windows = max((n - size) // step + 1, 0)
    return t.numel() // max(n, 1) * windows * size


def _pad(t: torch.Tensor, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    pad = S.arg(rest, kwargs, 0, "pad", ())
    shape = list(t.shape)
    if isinstance(pad, (list, tuple)):
        for i in range(min(len(pad) // 2, len(shape))):
            shape[-1 - i] = max(shape[-1 - i] + S.as_int(pad[2 * i]) + S.as_int(pad[2 * i + 1]), 0)
    return S.product(shape)


def _one_hot(t: torch.Tensor, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    classes = S.as_int(S.arg(rest, kwargs, 0, "num_classes", -1), -1)
    if classes < 0:
        classes = int(t.max()) + 1 if t.numel() and not t.is_floating_point() else 0
    return t.numel() * max(classes, 0)


repeat = logical(_repeat)
expand = logical(_expand)
repeat_interleave = logical(_repeat_interleave)
unfold = logical(_unfold)
pad = logical(_pad)


def one_hot(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    t = S.first_tensor(args, kwargs)
    if t is None:
        return NOTHING
    numel = _one_hot(t, args[1:], kwargs)
    return Cost(numel * 8, numel * ELEMENT + LAUNCH)


def bincount(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    t = S.first_tensor(args, kwargs)
    if t is None:
        return NOTHING
    top = int(t.max()) + 1 if t.numel() and not t.is_floating_point() else 0
    bins = max(S.as_int(S.arg(args, kwargs, 2, "minlength", 0)), top, 0)
    return Cost(bins * 8, (t.numel() + bins) * ELEMENT + LAUNCH)


def histogram(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    t = S.first_tensor(args, kwargs)
    if t is None:
        return NOTHING
    bins = S.arg(args, kwargs, 1, "bins", 100)
    count = bins.numel() if isinstance(bins, torch.Tensor) else S.as_int(bins, 100)
    return Cost(2 * (count + 1) * max(t.element_size(), 4), t.numel() * ELEMENT * 4 + count * ELEMENT + LAUNCH)


def nonzero(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    t = S.first_tensor(args, kwargs)
    if t is None:
        return NOTHING
    rows = S.as_int(kwargs.get("size"), t.numel()) if "size" in kwargs else t.numel()
    return Cost(max(rows, 0) * max(t.dim(), 1) * 8, t.numel() * ELEMENT + LAUNCH)


def where(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    return nonzero(args, kwargs) if len(args) + len(kwargs) == 1 else elementwise(ELEMENT)(args, kwargs)


def gather(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    t = S.first_tensor(args, kwargs)
    index = S.arg(args, kwargs, 2, "index")
    if t is None or not isinstance(index, torch.Tensor):
        return NOTHING
    return numel_cost(index.numel(), t.element_size(), ELEMENT)


def index_select(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    t = S.first_tensor(args, kwargs)
    dim, index = S.arg(args, kwargs, 1, "dim", 0), S.arg(args, kwargs, 2, "index")
    if t is None or not isinstance(index, torch.Tensor):
        return NOTHING
    n = t.shape[S.dims_of(dim, t.dim())[0]] if t.dim() and isinstance(dim, int) else 1
    return numel_cost(t.numel() // max(n, 1) * index.numel(), t.element_size(), ELEMENT)


def take(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    found = S.tensors((args, kwargs))
    if len(found) < 2:
        return NOTHING
    numel = found[1].numel() if len(args) < 3 and "dim" not in kwargs else \
        S.broadcast_numel([t.shape for t in found[:2]])
    return numel_cost(numel, found[0].element_size(), ELEMENT)


def embedding(weight_at: int) -> Estimate:
    """``F.embedding(input, weight)`` (``torch.embedding(weight, input)``): a row of ``weight`` per index."""
    def estimate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
        weight, indices = S.arg(args, kwargs, weight_at, "weight"), S.arg(args, kwargs, 1 - weight_at, "input")
        if not isinstance(weight, torch.Tensor) or not isinstance(indices, torch.Tensor) or not weight.dim():
            return NOTHING
        return numel_cost(indices.numel() * weight.shape[-1], weight.element_size(), ELEMENT)
    return estimate


def copy_of_first(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    """``index_add``, ``scatter``, ``masked_fill``, ``put``, ...: a copy of the first tensor, written
    where the other tensors say (work: every element of every tensor argument)."""
    found = S.tensors((args, kwargs))
    if not found:
        return NOTHING
    first = found[0]
    return Cost(first.numel() * first.element_size(), sum(t.numel() for t in found) * ELEMENT + LAUNCH)


def cat(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    found = S.tensors(S.arg(args, kwargs, 0, "tensors", ()), depth=1)
    numel = sum(t.numel() for t in found)
    return numel_cost(numel, S.widest(found), ELEMENT)


def block_diag(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    found = S.tensors(args, depth=1)
    rows = sum(t.shape[0] if t.dim() == 2 else 1 for t in found)
    cols = sum(t.shape[-1] if t.dim() >= 1 else 1 for t in found)
    return numel_cost(rows * cols, S.widest(found), ELEMENT)


def cartesian_prod(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    found = S.tensors(args, depth=1)
    return numel_cost(S.product(t.numel() for t in found) * max(len(found), 1), S.widest(found), ELEMENT)


def meshgrid(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    found = S.tensors(args, depth=2)
    return numel_cost(S.product(t.numel() for t in found), S.widest(found), ELEMENT)


def broadcast_tensors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    found = S.tensors(args, depth=1)
    return numel_cost(S.broadcast_numel([t.shape for t in found]), S.widest(found), ELEMENT)


def combinations(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    t = S.first_tensor(args, kwargs)
    if t is None:
        return NOTHING
    n, r = t.numel(), max(S.as_int(S.arg(args, kwargs, 1, "r", 2), 2), 0)
    if S.arg(args, kwargs, 2, "with_replacement", False) is True:
        n = n + r - 1
    if r > n:
        return NOTHING
    log_count = math.lgamma(n + 1) - math.lgamma(r + 1) - math.lgamma(n - r + 1)
    count = int(math.exp(min(log_count, 60 * math.log(2)))) + 1
    return numel_cost(count * max(r, 1), t.element_size(), ELEMENT)


def tri_indices(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    rows, cols = S.as_int(S.arg(args, kwargs, 0, "row")), S.as_int(S.arg(args, kwargs, 1, "col"))
    numel = 2 * max(rows, 0) * max(cols, 0)
    return numel_cost(numel, S.itemsize(S.dtype_in(args, kwargs), 8), ELEMENT)


def eye(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    n = S.as_int(S.arg(args, kwargs, 0, "n"))
    m = S.arg(args, kwargs, 1, "m")
    m = n if m is None or isinstance(m, torch.dtype) else S.as_int(m)
    return numel_cost(max(n, 0) * max(m, 0), (S.dtype_in(args, kwargs) or torch.get_default_dtype()).itemsize,
                       ELEMENT)


def window(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    n = max(S.as_int(S.arg(args, kwargs, 0, "window_length")), 0)
    return numel_cost(n, (S.dtype_in(args, kwargs) or torch.get_default_dtype()).itemsize, MATH)


def randperm(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    n = max(S.as_int(S.arg(args, kwargs, 0, "n")), 0)
    return Cost(n * S.itemsize(S.dtype_in(args, kwargs), 8), n * RANDOM * 4 + LAUNCH)


def normal(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    if any(isinstance(a, torch.Tensor) for a in (*args[:2], kwargs.get("mean"), kwargs.get("std"))):
        return elementwise(RANDOM)(args, kwargs)
    return factory("float", RANDOM)(args[2:], kwargs)


def multinomial(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    t = S.first_tensor(args, kwargs)
    if t is None:
        return NOTHING
    samples = max(S.as_int(S.arg(args, kwargs, 1, "num_samples", 1), 1), 0)
    n = t.shape[-1] if t.dim() else 1
    rows = t.numel() // max(n, 1)
    return Cost(rows * samples * 8, rows * (n * ELEMENT + samples * math.log2(max(n, 2)) * COMPARE) + LAUNCH)


def diff(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    found = S.tensors((args, kwargs))
    if not found:
        return NOTHING
    n = max(S.as_int(S.arg(args, kwargs, 1, "n", 1), 1), 0)
    numel = sum(t.numel() for t in found)
    return Cost(numel * found[0].element_size(), min(n, max(numel, 1)) * numel * ELEMENT + n * LAUNCH)


def gradient(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    t = S.first_tensor(args, kwargs)
    if t is None:
        return NOTHING
    return numel_cost(t.numel(), t.element_size(), ELEMENT * 4, outputs=max(t.dim(), 1))


def topk(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    t = S.first_tensor(args, kwargs)
    if t is None:
        return NOTHING
    k = max(S.as_int(S.arg(args, kwargs, 1, "k", 1), 1), 0)
    dim = S.arg(args, kwargs, 2, "dim", -1)
    n = t.shape[S.dims_of(dim, t.dim())[0]] if t.dim() and isinstance(dim, int) else t.numel()
    return Cost(t.numel() // max(n, 1) * k * (t.element_size() + 8),
                t.numel() * (math.log2(max(k, 2)) + 1) * COMPARE / 4 + LAUNCH)


def quantile(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    t, q = S.first_tensor(args, kwargs), S.arg(args, kwargs, 1, "q")
    if t is None:
        return NOTHING
    count = q.numel() if isinstance(q, torch.Tensor) else 1
    dim = S.arg(args, kwargs, 2, "dim")
    return Cost(max(S.reduced_numel(t, dim) * count, t.numel()) * t.element_size(),
                t.numel() * math.log2(max(t.numel(), 2)) * COMPARE + LAUNCH)


def unique(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    t = S.first_tensor(args, kwargs)
    if t is None:
        return NOTHING
    return Cost(t.numel() * (t.element_size() + 16), t.numel() * math.log2(max(t.numel(), 2)) * COMPARE + LAUNCH)


def searchsorted(values_at: int) -> Estimate:
    def estimate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
        found = S.tensors((args, kwargs))
        if len(found) < 2:
            return NOTHING
        values, boundaries = found[values_at], found[1 - values_at]
        n = boundaries.shape[-1] if boundaries.dim() else 1
        return Cost(values.numel() * 8, values.numel() * math.log2(max(n, 2)) * COMPARE + boundaries.numel() * ELEMENT
                    + LAUNCH)
    return estimate


def isin(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    found = S.tensors((args, kwargs))
    n = found[0].numel() if found else 1
    m = found[1].numel() if len(found) > 1 else 1
    return Cost(n, (n + m) * math.log2(max(m, 2)) * COMPARE + LAUNCH)


def polynomial(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    """``special.*_polynomial_*(x, n)``: a recurrence of ``n`` steps for every element."""
    x, n = S.arg(args, kwargs, 0, "input"), S.arg(args, kwargs, 1, "n")
    if isinstance(n, torch.Tensor):
        values = n.detach().to(torch.float64) if not n.is_complex() else n.detach().abs()
        top = float(values.abs().max()) if n.numel() else 0.0
        degree = int(top) if math.isfinite(top) and top < 2 ** 62 else 1 << 62
    else:
        degree = abs(S.as_int(n, 1 << 62))
    numel = S.broadcast_numel([t.shape for t in S.tensors((args, kwargs))])
    size = S.widest(S.tensors((args, kwargs)))
    return Cost(numel * size, numel * (min(degree, 1 << 62) + 1) * ELEMENT * 4 + LAUNCH)


def multigammaln(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    t = S.first_tensor(args, kwargs)
    if t is None:
        return NOTHING
    p = max(S.as_int(S.arg(args, kwargs, 1, "p", 1), 1), 1)
    return Cost(t.numel() * t.element_size() * 2, t.numel() * p * SPECIAL + LAUNCH)


def tolist(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    t = S.first_tensor(args, kwargs)
    if t is None:
        return NOTHING
    return Cost(t.numel() * OBJECT_BYTES, t.numel() * ELEMENT + LAUNCH, t.numel())


def no_allocation(weight: float = 0) -> Estimate:
    """Metadata and scalar answers (``size``, ``dim``, ``is_floating_point``, ``equal``): work only."""
    def estimate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
        found = S.tensors((args, kwargs))
        return Cost(0, sum(t.numel() for t in found) * weight + LAUNCH)
    return estimate


def loss(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    """Losses: elementwise terms the size of their largest argument, then reduced."""
    found = S.tensors((args, kwargs))
    if not found:
        return NOTHING
    big = max(found, key=lambda t: t.numel())
    return numel_cost(big.numel(), big.element_size(), MATH)


def glu(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    t = S.first_tensor(args, kwargs)
    if t is None:
        return NOTHING
    return numel_cost(t.numel() // 2 + 1, t.element_size(), MATH)


def index_tensor(x: torch.Tensor, key: Any) -> Cost:
    """``x[key]``: basic indexing is a view; advanced indexing (tensors, lists, masks) copies."""
    numel, advanced = S.index_numel(x.shape, key)
    if not advanced:
        return NOTHING
    index_elements = sum(t.numel() for t in S.tensors(key, depth=1))
    return Cost(numel * x.element_size(), (numel + index_elements) * ELEMENT + LAUNCH)


def set_index_tensor(x: torch.Tensor, key: Any, value: Any) -> Cost:
    numel, _advanced = S.index_numel(x.shape, key)
    extra = value.numel() if isinstance(value, torch.Tensor) else 0
    return Cost(0, (numel + extra) * ELEMENT + LAUNCH)


