"""Estimates of products, factorizations, convolutions and transforms: their work grows faster than
their inputs (a matrix product of two ``n x n`` inputs does ``2 n^3`` operations), so these are the
operations a shard must bound by work, not only by size. See :mod:`.estimates` for the units.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from . import shapes as S
from .estimates import (
    ELEMENT,
    LAUNCH,
    MATH,
    NOTHING,
    Cost,
    Estimate,
    numel_cost,
    elementwise,
    reduction,
    same,
)


def matmul_cost(a: Any, b: Any) -> Cost:
    """``a @ b`` with torch's rules for 1-d operands and broadcast batch dims."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or not a.dim() or not b.dim():
        return elementwise(ELEMENT)((a, b), {})
    size = max(a.element_size(), b.element_size())
    if a.dim() == 1 and b.dim() == 1:
        return Cost(size, 2 * a.numel() + LAUNCH)
    a_shape = (1, *a.shape) if a.dim() == 1 else tuple(a.shape)
    b_shape = (*b.shape, 1) if b.dim() == 1 else tuple(b.shape)
    batch = S.broadcast_numel([a_shape[:-2], b_shape[:-2]])
    m, k, n = a_shape[-2], a_shape[-1], b_shape[-1]
    made = max(batch * m * n, batch * m * k if a.dim() > 2 else 0, batch * k * n if b.dim() > 2 else 0)
    return Cost(made * size, 2 * batch * m * n * k + batch * (m * k + k * n) * ELEMENT + LAUNCH)


def matmul(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    return matmul_cost(S.arg(args, kwargs, 0, "input"), S.arg(args, kwargs, 1, "other"))


def add_matmul(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    """``addmm(c, a, b)``, ``baddbmm``, ``addbmm``, ``addmv``, ``addr``: a product plus ``c``."""
    found = S.tensors(args, depth=1)
    if len(found) < 3:
        return NOTHING
    c, a, b = found[:3]
    product = matmul_cost(a, b) if b.dim() > 1 or a.dim() > 1 else outer((a, b), {})
    return product + numel_cost(c.numel(), c.element_size(), ELEMENT)


def outer(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    """``outer``/``ger``/``kron``: every pair of elements."""
    found = S.tensors(args, depth=1)
    numel = S.product(t.numel() for t in found[:2])
    return numel_cost(numel, S.widest(found), ELEMENT)


def inner(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    found = S.tensors(args, depth=1)
    if len(found) < 2 or not found[0].dim() or not found[1].dim():
        return elementwise(ELEMENT)(args, kwargs)
    a, b = found[:2]
    k = a.shape[-1]
    numel = a.numel() // max(k, 1) * (b.numel() // max(k, 1))
    return Cost(numel * max(a.element_size(), b.element_size()), 2 * numel * k + LAUNCH)


def tensordot(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    found = S.tensors(args[:2], depth=1)
    if len(found) < 2:
        return NOTHING
    a, b = found
    dims = S.arg(args, kwargs, 2, "dims", 2)
    if isinstance(dims, (list, tuple)) and len(dims) == 2 and all(isinstance(d, (list, tuple, int)) for d in dims):
        a_dims = S.dims_of(dims[0], a.dim())
    else:
        count = min(max(S.as_int(dims, 2), 0), a.dim())
        a_dims = list(range(a.dim() - count, a.dim()))
    contracted = S.product(a.shape[d] for d in a_dims)
    numel = a.numel() // max(contracted, 1) * (b.numel() // max(contracted, 1))
    return Cost(numel * max(a.element_size(), b.element_size()), 2 * numel * contracted + LAUNCH)


def einsum(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    equation = S.arg(args, kwargs, 0, "equation")
    operands = list(args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    found = [o for o in operands if isinstance(o, torch.Tensor)]
    cost = S.einsum_cost(equation, operands)
    if cost is None:  # unreadable: every element of every operand with every other (an upper bound)
        numel = S.product(t.numel() for t in found)
        return Cost(numel * S.widest(found), numel * 2 + LAUNCH)
    largest, work = cost
    return Cost(largest * S.widest(found), 2 * work + len(found) * LAUNCH)


def chain(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    """``chain_matmul(*ms)``, ``linalg.multi_dot(ms)``: products left to right (an upper bound of
    the order torch picks)."""
    found = S.tensors(args, depth=2)
    if not found:
        return NOTHING
    total, current = NOTHING, found[0]
    for nxt in found[1:]:
        step = matmul_cost(current, nxt)
        total = total + step
        rows = current.shape[0] if current.dim() > 1 else 1
        cols = nxt.shape[-1] if nxt.dim() > 1 else 1
        current = torch.empty((rows, cols), device="meta", dtype=current.dtype)
    return total


def linear(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    x, w = S.arg(args, kwargs, 0, "input"), S.arg(args, kwargs, 1, "weight")
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor) or not x.dim():
        return NOTHING
    rows = x.numel() // max(x.shape[-1], 1)
    out = w.shape[0] if w.dim() > 1 else 1
    return Cost(rows * out * x.element_size(), 2 * rows * out * x.shape[-1] + LAUNCH)


def bilinear(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    found = S.tensors(args, depth=1)
    if len(found) < 3 or found[2].dim() != 3:
        return NOTHING
    x1, w = found[0], found[2]
    rows = x1.numel() // max(x1.shape[-1], 1) if x1.dim() else 1
    return Cost(rows * w.shape[0] * x1.element_size(), 2 * rows * w.numel() + LAUNCH)


def cdist(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    found = S.tensors(args, depth=1)
    if len(found) < 2 or found[0].dim() < 2 or found[1].dim() < 2:
        return NOTHING
    a, b = found[:2]
    batch = S.broadcast_numel([a.shape[:-2], b.shape[:-2]])
    numel = batch * a.shape[-2] * b.shape[-2]
    return Cost(numel * a.element_size(), 3 * numel * a.shape[-1] + LAUNCH)


def pdist(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    t = S.first_tensor(args, kwargs)
    if t is None or t.dim() != 2:
        return NOTHING
    n = t.shape[0]
    pairs = n * (n - 1) // 2
    return Cost(pairs * t.element_size(), 3 * pairs * t.shape[1] + LAUNCH)


def covariance(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    t = S.first_tensor(args, kwargs)
    if t is None:
        return NOTHING
    variables = t.shape[0] if t.dim() == 2 else 1
    observations = t.shape[-1] if t.dim() else 1
    return Cost(variables * variables * t.element_size(), 2 * variables * variables * observations + LAUNCH)


def attention(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    """``scaled_dot_product_attention(q, k, v)``: scores ``[..., L, S]`` and the output ``[..., L, Ev]``."""
    found = S.tensors(args[:3], depth=1)
    if len(found) < 3 or min(t.dim() for t in found) < 2:
        return NOTHING
    q, k, v = found
    batch = S.broadcast_numel([q.shape[:-2], k.shape[:-2]])
    length, source, e, ev = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    scores = batch * length * source
    return Cost(max(scores, batch * length * ev) * q.element_size(), 2 * scores * (e + ev) + scores * MATH + LAUNCH)


def decomposition(factor: float, outputs: int = 2, tolerances: bool = False) -> Estimate:
    """A factorization or solve of ``[..., m, n]`` matrices: ``factor * m * n * min(m, n)`` per matrix,
    plus ``m * n`` per column of a right-hand side; its outputs (``U, S, V``; ``Q, R``; ``P, L, U``) hold at
    most ``m^2 + n^2 + m n + min(m, n)`` elements per matrix. With ``tolerances`` (``pinv``,
    ``matrix_rank``), the other tensor arguments are tolerances broadcast over the batch."""
    def estimate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
        found = S.tensors(args, depth=1)
        a = next((t for t in found if t.dim() >= 2), None)
        if a is None:
            return same(ELEMENT, outputs)(args, kwargs)
        m, n = a.shape[-2], a.shape[-1]
        batch = a.numel() // max(m * n, 1) if m * n else S.product(a.shape[:-2])
        rhs = sum(t.numel() for t in found if t is not a)
        if tolerances:
            batch = S.broadcast_numel([a.shape[:-2], *(t.shape for t in found if t is not a)])
            rhs = 0
        work = factor * batch * m * n * min(m, n)
        size = a.element_size() * (2 if a.is_complex() or factor >= 512 else 1)
        made = max(batch * (m * m + n * n + m * n + min(m, n)), rhs)
        return Cost(made * size, work + rhs * max(m, n) * 2 + LAUNCH)
    return estimate


def square_decomposition(factor: float) -> Estimate:
    """``tensorinv``/``tensorsolve``: the tensor as a square matrix of its elements."""
    def estimate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
        found = S.tensors(args, depth=1)
        if not found:
            return NOTHING
        n = math.isqrt(max(found[0].numel(), 1))
        return Cost(sum(t.numel() for t in found) * found[0].element_size(), factor * n ** 3 + LAUNCH)
    return estimate


def matrix_power(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    a, n = S.arg(args, kwargs, 0, "input"), S.as_int(S.arg(args, kwargs, 1, "n", 1))
    if not isinstance(a, torch.Tensor) or a.dim() < 2:
        return NOTHING
    m = a.shape[-1]
    batch = a.numel() // max(m * m, 1)
    products = 2 * max(abs(n), 1).bit_length() + (32 if n < 0 else 0)
    return Cost(2 * a.numel() * a.element_size(), products * 2 * batch * m ** 3 + products * LAUNCH)


def matrix_norm(factor: float) -> Estimate:
    """``linalg.matrix_norm``/``norm``: a reduction, or an SVD for ``ord`` 2, -2 and ``"nuc"``."""
    reduce, svd = reduction(ELEMENT * 2, dim_at=2), decomposition(factor, outputs=1)

    def estimate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
        order = S.arg(args, kwargs, 1, "ord", kwargs.get("p"))
        t = S.first_tensor(args, kwargs)
        spectral = isinstance(order, (int, float, str)) and order in (2, -2, "nuc")
        if spectral and t is not None and t.dim() >= 2:
            return svd(args, kwargs)
        return reduce(args, kwargs)
    return estimate


def trace(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    t = S.first_tensor(args, kwargs)
    n = min(t.shape) if t is not None and t.dim() else 1
    return Cost(8, n * ELEMENT + LAUNCH)


def diag(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    """``diag(v, k)`` of a 1-d ``v`` makes an ``(n + |k|)`` square; of a matrix, its diagonal."""
    t = S.first_tensor(args, kwargs)
    if t is None:
        return NOTHING
    if t.dim() >= 2:
        return numel_cost(min(t.shape), t.element_size(), ELEMENT)
    offset = abs(S.as_int(S.arg(args, kwargs, 1, "diagonal", 0)))
    return numel_cost((t.numel() + offset) ** 2, t.element_size(), ELEMENT)


def diagflat(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    t = S.first_tensor(args, kwargs)
    if t is None:
        return NOTHING
    offset = abs(S.as_int(S.arg(args, kwargs, 1, "offset", 0)))
    return numel_cost((t.numel() + offset) ** 2, t.element_size(), ELEMENT)


def diag_embed(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    t = S.first_tensor(args, kwargs)
    if t is None:
        return NOTHING
    offset = abs(S.as_int(S.arg(args, kwargs, 1, "offset", 0)))
    last = t.shape[-1] if t.dim() else 1
    return numel_cost(t.numel() // max(last, 1) * (last + offset) ** 2, t.element_size(), ELEMENT)


def vander(n_name: str) -> Estimate:
    def estimate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
        t = S.first_tensor(args, kwargs)
        if t is None:
            return NOTHING
        n = S.arg(args, kwargs, 1, n_name)
        n = t.shape[-1] if n is None and t.dim() else S.as_int(n, 1)
        return numel_cost(t.numel() * max(n, 0), max(t.element_size(), 8), ELEMENT)
    return estimate


def convolution(kind: str) -> Estimate:
    """``conv1d/2d/3d``, ``conv_transpose*``, ``convolution``: the output size from strides, padding
    and dilation; work ``2 * output * in_channels / groups * kernel``."""
    def estimate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
        x, w = S.arg(args, kwargs, 0, "input"), S.arg(args, kwargs, 1, "weight")
        if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor) or w.dim() < 3:
            return NOTHING
        spatial_n = w.dim() - 2
        if kind == "convolution":
            stride, padding, dilation = (S.arg(args, kwargs, i, n, d) for i, n, d in
                                         ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1)))
            transposed, output_padding = bool(S.arg(args, kwargs, 6, "transposed", False)), \
                S.arg(args, kwargs, 7, "output_padding", 0)
            groups = S.as_int(S.arg(args, kwargs, 8, "groups", 1), 1)
        elif kind == "transposed":
            stride, padding, output_padding = (S.arg(args, kwargs, i, n, d) for i, n, d in
                                               ((3, "stride", 1), (4, "padding", 0), (5, "output_padding", 0)))
            groups = S.as_int(S.arg(args, kwargs, 6, "groups", 1), 1)
            dilation, transposed = S.arg(args, kwargs, 7, "dilation", 1), True
        else:
            stride, padding, dilation = (S.arg(args, kwargs, i, n, d) for i, n, d in
                                         ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1)))
            groups, transposed, output_padding = S.as_int(S.arg(args, kwargs, 6, "groups", 1), 1), False, 0
        groups = max(groups, 1)
        batch = S.product(x.shape[:x.dim() - spatial_n - 1]) if x.dim() > spatial_n + 1 else 1
        kernel = list(w.shape[2:])
        out_spatial = S.conv_output(list(x.shape[-spatial_n:]), kernel, stride, padding, dilation, transposed,
                                    output_padding)
        out_channels = w.shape[1] * groups if transposed else w.shape[0]
        in_channels = w.shape[0] if transposed else w.shape[1] * groups
        numel = batch * out_channels * S.product(out_spatial)
        work = 2 * numel * (in_channels // groups) * S.product(kernel)
        return Cost(numel * x.element_size(), work + LAUNCH)
    return estimate


def pooling(kind: str) -> Estimate:
    """``avg_pool1d``, ``max_pool1d/2d/3d`` (kernel, stride = kernel, padding, dilation, ceil)."""
    def estimate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
        x = S.first_tensor(args, kwargs)
        if x is None:
            return NOTHING
        n = {"1d": 1, "2d": 2, "3d": 3}[kind[-2:]]
        kernel = S.per_dim(S.arg(args, kwargs, 1, "kernel_size", 1), n, 1)
        stride = S.arg(args, kwargs, 2, "stride", None)
        stride = kernel if stride is None or (isinstance(stride, (list, tuple)) and not stride) else stride
        padding = S.arg(args, kwargs, 3, "padding", 0)
        dilation = S.arg(args, kwargs, 4, "dilation", 1) if kind.startswith("max") else 1
        out = [o + 1 for o in S.conv_output(list(x.shape[-n:]), kernel, stride, padding, dilation)]
        numel = x.numel() // max(S.product(x.shape[-n:]), 1) * S.product(out)
        outputs = 2 if "indices" in kind else 1
        return Cost(numel * max(x.element_size(), 8 if outputs > 1 else 1) * outputs,
                    numel * S.product(kernel) * ELEMENT + x.numel() * ELEMENT + LAUNCH)
    return estimate


def adaptive_pool(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    x = S.first_tensor(args, kwargs)
    if x is None or not x.dim():
        return NOTHING
    size = S.arg(args, kwargs, 1, "output_size", 1)
    out = S.as_int(size[0] if isinstance(size, (list, tuple)) and size else size, 1)
    length = x.shape[-1]
    numel = x.numel() // max(length, 1) * max(out, 0)
    return Cost(numel * max(x.element_size(), 8) * 2, numel * (length // max(out, 1) + 2) * ELEMENT
                + x.numel() * ELEMENT + LAUNCH)


def fft(kind: str) -> Estimate:
    """``fft.fft``/``rfft``/``irfft``/``hfft``/... (``n``), their 2-d and n-d forms (``s``): the output
    length of each transformed dim, complex unless the transform is ``irfft``/``hfft``."""
    def estimate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
        t = S.first_tensor(args, kwargs)
        if t is None:
            return NOTHING
        shape = list(t.shape) or [1]
        if kind == "1":
            n, dim = S.arg(args, kwargs, 1, "n"), S.as_int(S.arg(args, kwargs, 2, "dim", -1), -1)
            sizes, dims = ([n] if n is not None else []), S.dims_of(dim, len(shape))
        else:
            s, dim = S.arg(args, kwargs, 1, "s"), S.arg(args, kwargs, 2, "dim")
            sizes = list(s) if isinstance(s, (list, tuple)) else []
            dims = S.dims_of(dim, len(shape)) if dim is not None else \
                list(range(len(shape)))[-(len(sizes) or (2 if kind == "2" else len(shape))):]
        for i, d in enumerate(dims):
            if i < len(sizes) and sizes[i] is not None and S.as_int(sizes[i], -1) >= 0:
                shape[d] = S.as_int(sizes[i])
            else:
                shape[d] = shape[d] * 2  # irfft/hfft double a halved dim at most
        numel = S.product(shape)
        length = S.product(shape[d] for d in dims)
        return Cost(numel * 16, numel * math.log2(max(length, 2)) * ELEMENT * 4 + LAUNCH * max(len(dims), 1))
    return estimate


def fftfreq(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    n = max(S.as_int(S.arg(args, kwargs, 0, "n")), 0)
    return numel_cost(n, (S.dtype_in(args, kwargs) or torch.get_default_dtype()).itemsize, ELEMENT)


def stft(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    t = S.first_tensor(args, kwargs)
    if t is None:
        return NOTHING
    n_fft = max(S.as_int(S.arg(args, kwargs, 1, "n_fft", 1), 1), 1)
    hop = S.arg(args, kwargs, 2, "hop_length", None)
    hop = max(S.as_int(n_fft // 4 if hop is None else hop, 1), 1)
    center = S.arg(args, kwargs, 5, "center", True)
    length = (t.shape[-1] if t.dim() else 1) + (n_fft if center is True or center is None else 0)
    frames = max((length - n_fft) // hop + 1, 0)
    rows = t.numel() // max(t.shape[-1], 1) if t.dim() else 1
    numel = rows * frames * (n_fft // 2 + 1)
    return Cost(numel * 16, rows * frames * n_fft * math.log2(max(n_fft, 2)) * ELEMENT * 4 + LAUNCH)


