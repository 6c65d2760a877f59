"""The cost rule of every whitelisted operation: what it makes and does, known before it runs.

A shared shard runs a graph's operations between the model's layers, and an operation cannot be
interrupted once it runs: a cancelled experiment's ``torch.matmul`` of two 16k x 16k matrices, or its
``sum(range(2_000_000_000))``, holds the shard until it returns. So every name of the whitelist has a
:class:`Rule` here, and a shard refuses a call whose :class:`~.estimates.Cost` is over the deployment's
bounds (:mod:`.allocation`) before it starts. The table is explicit, one rule per name, of four kinds:

- ``ALLOCATES``: an estimate of the bytes it makes and the work it does (factories, elementwise math,
  reductions, products, sorts, copies, Python containers and big integers);
- ``VIEW``: a view of its input: no new memory, constant work (a view whose *logical* size grows,
  ``expand``/``unfold``/``broadcast_to``, is sized at that size instead: every later op works on it);
- ``NO_ALLOCATION``: an answer about a tensor (``size``, ``dim``, ``is_floating_point``, ``equal``),
  with its work;
- ``REFUSED``: no estimate (sparse and quantized layouts, recurrent and image-sampling kernels,
  internals of other operations): shared deployments refuse the name, with the reason; local runs
  still run it.

An in-place variant ``x.op_(...)`` has the rule of ``op`` and makes no new tensor; ``tests/test_op_bounds.py``
walks the whole whitelist and fails on any name without a rule.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from . import estimates as E
from . import products as P
from . import shapes as S
from .estimates import (
    COMPARE,
    ELEMENT,
    LAUNCH,
    MATH,
    NOTHING,
    OBJECT_BYTES,
    RANDOM,
    REFERENCE_BYTES,
    SPECIAL,
    TENSOR_ITEM,
    Cost,
    Estimate,
)

ALLOCATES, VIEW, NO_ALLOCATION, REFUSED = "allocates", "view", "no allocation", "refused"
KINDS = (ALLOCATES, VIEW, NO_ALLOCATION, REFUSED)


@dataclass(frozen=True)
class Rule:
    """How an operation is bounded: its kind, its estimate (None when refused) and the reason."""

    kind: str
    estimate: Estimate | None
    reason: str = ""


_TORCH: dict[str, Rule] = {}   # short names of torch functions and Tensor methods (same arguments)
_NAMED: dict[str, Rule] = {}   # full names: torch.linalg.*, torch.special.*, torch.fft.*, F.*, operators, ...


def _add(table: dict[str, Rule], kind: str, estimate: Estimate | None, names: str, reason: str = "") -> None:
    rule = Rule(kind, estimate, reason)
    for name in names.split():
        if name in table:
            raise RuntimeError(f"op rule table: {name} listed twice")
        table[name] = rule


def _torch(kind: str, estimate: Estimate | None, names: str, reason: str = "") -> None:
    _add(_TORCH, kind, estimate, names, reason)


def _named(kind: str, estimate: Estimate | None, names: str, reason: str = "") -> None:
    _add(_NAMED, kind, estimate, names, reason)


# -- torch functions and Tensor methods ---------------------------------------------------------------
_torch(ALLOCATES, E.elementwise(ELEMENT), """
    abs absolute add sub subtract rsub mul multiply div divide true_divide floor_divide remainder fmod neg negative
    positive sign sgn signbit ceil floor round trunc fix frac clamp clamp_min clamp_max clip maximum minimum fmax fmin
    eq ne not_equal lt le gt ge less less_equal greater greater_equal isclose isfinite isinf isnan isneginf isposinf
    isreal logical_and logical_or logical_xor logical_not bitwise_and bitwise_or bitwise_xor bitwise_not
    bitwise_left_shift bitwise_right_shift gcd lcm copysign heaviside nextafter nan_to_num lerp addcmul addcdiv
    hypot ldexp conj_physical relu hardshrink threshold square deg2rad rad2deg angle cross xlogy
""")
_torch(ALLOCATES, E.elementwise(ELEMENT, widen=2), "complex polar")
_torch(ALLOCATES, E.elementwise(MATH, widen=8), "float_power")  # float64 (or complex128) whatever the input
_torch(ALLOCATES, E.elementwise(MATH, widen=3), "frexp")  # mantissas and int32 exponents
_torch(ALLOCATES, E.elementwise(MATH), """
    exp exp2 expm1 log log2 log10 log1p sqrt rsqrt reciprocal sin cos tan asin acos atan sinh cosh tanh asinh acosh
    atanh arcsin arccos arctan arcsinh arccosh arctanh atan2 arctan2 sigmoid logit erf erfc erfinv pow sinc logaddexp
    logaddexp2 celu selu rrelu prelu
""")
_torch(ALLOCATES, E.elementwise(SPECIAL), """
    lgamma digamma polygamma igamma igammac i0
""")
_torch(ALLOCATES, E.elementwise(RANDOM), "bernoulli poisson binomial")
_torch(ALLOCATES, E.same(RANDOM), """
    dropout alpha_dropout feature_dropout feature_alpha_dropout
""")
_torch(ALLOCATES, E.same(RANDOM, outputs=2), "native_dropout")
_torch(ALLOCATES, E.multigammaln, "mvlgamma")
_torch(ALLOCATES, E.where, "where")
_torch(ALLOCATES, E.reduction(ELEMENT), """
    sum nansum mean nanmean prod amax amin all any logsumexp std var trapezoid trapz
""")
_torch(ALLOCATES, E.reduction(ELEMENT, index=True), "argmax argmin count_nonzero hash_tensor")
_torch(ALLOCATES, E.reduction(ELEMENT, outputs=2), "max min aminmax std_mean var_mean")
_torch(ALLOCATES, E.reduction(ELEMENT * 2, dim_at=2), "norm dist")
_torch(ALLOCATES, E.same(ELEMENT * 4), """
    cumsum cumprod logcumsumexp cumulative_trapezoid softmax log_softmax renorm norm_except_dim
""")
_torch(ALLOCATES, E.same(ELEMENT * 4, indices=1), "cummax cummin")
_torch(ALLOCATES, E.reduction(COMPARE, outputs=2), "median nanmedian")
_torch(ALLOCATES, E.reduction(COMPARE, outputs=2, dim=-1), "mode")
_torch(ALLOCATES, E.reduction(COMPARE, dim_at=2, outputs=2, dim=-1), "kthvalue")
_torch(ALLOCATES, E.sort(outputs=2), "sort")
_torch(ALLOCATES, E.sort(outputs=1), "msort")
_torch(ALLOCATES, E.sort(outputs=1, values=False), "argsort")
_torch(ALLOCATES, E.topk, "topk")
_torch(ALLOCATES, E.quantile, "quantile nanquantile")
_torch(ALLOCATES, E.unique, "unique unique_consecutive")
_torch(ALLOCATES, E.searchsorted(values_at=1), "searchsorted")
_torch(ALLOCATES, E.searchsorted(values_at=0), "bucketize")
_torch(ALLOCATES, E.isin, "isin")
_torch(ALLOCATES, E.histogram, "histc histogram")
_torch(ALLOCATES, E.bincount, "bincount")
_torch(ALLOCATES, E.nonzero, "nonzero argwhere nonzero_static")
_torch(ALLOCATES, E.elementwise(ELEMENT), "masked_select")
_torch(ALLOCATES, E.gather, "gather")
_torch(ALLOCATES, E.index_select, "index_select")
_torch(ALLOCATES, E.take, "take take_along_dim")
_torch(ALLOCATES, E.embedding(weight_at=0), "embedding")
_torch(ALLOCATES, E.copy_of_first, """
    index_add index_copy index_fill index_reduce index_put scatter scatter_add scatter_reduce masked_fill masked_scatter
    put select_scatter slice_scatter diagonal_scatter fill fill_diagonal_ embedding_renorm_ zero_ copy_
""")
_torch(ALLOCATES, E.same(ELEMENT), """
    clone flip fliplr flipud roll rot90 tril triu resolve_conj resolve_neg pixel_shuffle pixel_unshuffle
    channel_shuffle native_channel_shuffle detach_copy alias_copy diagonal_copy permute_copy select_copy
    slice_copy split_copy split_with_sizes_copy squeeze_copy t_copy transpose_copy unbind_copy unsqueeze_copy
    view_copy view_as_real_copy view_as_complex_copy narrow_copy
""")
_torch(ALLOCATES, E.expand, "expand_copy")
_torch(ALLOCATES, E.unfold, "unfold_copy")
_torch(ALLOCATES, E.same(MATH), """
    layer_norm group_norm batch_norm instance_norm rms_norm native_layer_norm native_group_norm native_batch_norm
    native_norm frobenius_norm
""")
_torch(ALLOCATES, E.loss, """
    binary_cross_entropy_with_logits kl_div cosine_embedding_loss hinge_embedding_loss margin_ranking_loss
    poisson_nll_loss triplet_margin_loss
""")
_torch(ALLOCATES, E.elementwise(ELEMENT * 4), "cosine_similarity pairwise_distance")
_torch(ALLOCATES, E.cat, "cat concat concatenate stack hstack vstack dstack column_stack row_stack")
_torch(ALLOCATES, E.block_diag, "block_diag")
_torch(ALLOCATES, E.cartesian_prod, "cartesian_prod")
_torch(ALLOCATES, E.combinations, "combinations")
_torch(ALLOCATES, E.factory("float"), "zeros ones rand randn")
_torch(ALLOCATES, E.factory("fill"), "full")
_torch(ALLOCATES, E.factory("int", RANDOM), "randint")
_torch(ALLOCATES, E.normal, "normal")
_torch(ALLOCATES, E.like(ELEMENT), "zeros_like ones_like full_like")
_torch(ALLOCATES, E.like(RANDOM), "rand_like randn_like randint_like")
_torch(ALLOCATES, E.new_factory, "new_zeros new_ones new_full")
_torch(ALLOCATES, E.data(at=0), "tensor as_tensor asarray scalar_tensor")
_torch(ALLOCATES, E.data(at=1), "new_tensor")
_torch(ALLOCATES, E.range_of("arange"), "arange")
_torch(ALLOCATES, E.range_of("range"), "range")
_torch(ALLOCATES, E.range_of("linspace"), "linspace logspace")
_torch(ALLOCATES, E.eye, "eye")
_torch(ALLOCATES, E.tri_indices, "tril_indices triu_indices")
_torch(ALLOCATES, E.window, "bartlett_window blackman_window hamming_window hann_window kaiser_window")
_torch(ALLOCATES, E.randperm, "randperm")
_torch(ALLOCATES, E.multinomial, "multinomial")
_torch(ALLOCATES, E.diff, "diff")
_torch(ALLOCATES, E.gradient, "gradient")
_torch(ALLOCATES, E.repeat, "repeat tile")
_torch(ALLOCATES, E.repeat_interleave, "repeat_interleave")
_torch(ALLOCATES, E.pad, "constant_pad_nd")
_torch(ALLOCATES, E.convert, "to type type_as cpu cuda xpu ipu mtia")
_torch(ALLOCATES, E.cast(torch.float32), "float")
_torch(ALLOCATES, E.cast(torch.float64), "double")
_torch(ALLOCATES, E.cast(torch.float16), "half")
_torch(ALLOCATES, E.cast(torch.bfloat16), "bfloat16")
_torch(ALLOCATES, E.cast(torch.bool), "bool")
_torch(ALLOCATES, E.cast(torch.uint8), "byte")
_torch(ALLOCATES, E.cast(torch.int8), "char")
_torch(ALLOCATES, E.cast(torch.int16), "short")
_torch(ALLOCATES, E.cast(torch.int32), "int")
_torch(ALLOCATES, E.cast(torch.int64), "long")
_torch(ALLOCATES, E.cast(torch.complex64), "cfloat")
_torch(ALLOCATES, E.cast(torch.complex128), "cdouble")
_torch(ALLOCATES, E.cast(torch.complex32), "chalf")
_torch(ALLOCATES, E.tolist, "tolist")
_torch(ALLOCATES, P.matmul, "matmul mm bmm mv dot vdot")
_torch(ALLOCATES, P.add_matmul, "addmm addbmm baddbmm addmv addr")
_torch(ALLOCATES, P.outer, "outer ger kron")
_torch(ALLOCATES, P.inner, "inner")
_torch(ALLOCATES, P.tensordot, "tensordot")
_torch(ALLOCATES, P.einsum, "einsum")
_torch(ALLOCATES, P.chain, "chain_matmul")
_torch(ALLOCATES, P.bilinear, "bilinear")
_torch(ALLOCATES, P.cdist, "cdist")
_torch(ALLOCATES, P.pdist, "pdist")
_torch(ALLOCATES, P.covariance, "cov corrcoef")
_torch(ALLOCATES, P.decomposition(32), """
    cholesky cholesky_inverse cholesky_solve det logdet slogdet inverse lu_solve lu_unpack geqrf orgqr ormqr qr
    triangular_solve
""")
_torch(ALLOCATES, P.decomposition(256), "svd pinverse nuclear_norm")
_torch(ALLOCATES, P.matrix_power, "matrix_power")
_torch(ALLOCATES, P.decomposition(64), "matrix_exp")
_torch(ALLOCATES, P.trace, "trace")
_torch(ALLOCATES, P.diag, "diag")
_torch(ALLOCATES, P.diagflat, "diagflat")
_torch(ALLOCATES, P.diag_embed, "diag_embed")
_torch(ALLOCATES, P.vander("N"), "vander")
_torch(ALLOCATES, P.convolution("conv"), "conv1d conv2d conv3d")
_torch(ALLOCATES, P.convolution("transposed"), "conv_transpose1d conv_transpose2d conv_transpose3d")
_torch(ALLOCATES, P.convolution("convolution"), "convolution")
_torch(ALLOCATES, P.pooling("avg_1d"), "avg_pool1d")
_torch(ALLOCATES, P.pooling("max_1d"), "max_pool1d")
_torch(ALLOCATES, P.pooling("max_indices_1d"), "max_pool1d_with_indices")
_torch(ALLOCATES, P.pooling("max_2d"), "max_pool2d")
_torch(ALLOCATES, P.pooling("max_3d"), "max_pool3d")
_torch(ALLOCATES, P.adaptive_pool, "adaptive_avg_pool1d adaptive_max_pool1d")
_torch(ALLOCATES, P.stft, "stft")
_torch(VIEW, E.view, """
    adjoint chunk detach detach_ diagonal dsplit hsplit vsplit moveaxis movedim narrow permute select split
    split_with_sizes squeeze squeeze_ swapaxes swapaxes_ swapdims swapdims_ t t_ tensor_split transpose transpose_ unbind
    unflatten unsafe_chunk unsafe_split unsafe_split_with_sizes unsqueeze unsqueeze_ view view_as view_as_real
    view_as_complex atleast_1d atleast_2d atleast_3d conj requires_grad_ real imag
""", "a view of its input (same memory, new shape or strides)")
_torch(VIEW, E.maybe_copy, "reshape reshape_as flatten ravel contiguous",
       "a view of a contiguous input; otherwise a copy, sized as one")
_torch(VIEW, E.expand, "expand expand_as broadcast_to",
       "a view, sized at its logical (expanded) size: every later operation works on that many elements")
_torch(VIEW, E.unfold, "unfold", "a view of overlapping windows, sized at its logical size")
_torch(VIEW, E.broadcast_tensors, "broadcast_tensors", "views, sized at their broadcast size")
_torch(VIEW, E.meshgrid, "meshgrid", "expanded views, sized at their logical size")
_torch(NO_ALLOCATION, E.no_allocation(), """
    dim ndimension numel nelement size stride element_size storage_offset get_device dim_order is_complex is_conj
    is_contiguous is_distributed is_floating_point is_inference is_neg is_nonzero is_pinned is_same_size is_shared
    is_signed is_set_to is_vulkan_available can_cast promote_types result_type item qscheme q_per_channel_axis
    q_per_channel_scales q_per_channel_zero_points q_scale q_zero_point
""", "an answer about the tensor (a Python number, bool or dtype)")
_torch(NO_ALLOCATION, E.no_allocation(ELEMENT), "equal allclose",
       "a Python bool from comparing every element")
_torch(ALLOCATES, E.reduction(ELEMENT), "sum_to_size")

_torch(ALLOCATES, E.same(RANDOM), """
    bernoulli_ cauchy_ exponential_ geometric_ log_normal_ normal_ random_ uniform_
""")  # in place (no new tensor: see rule_for)

_SPARSE = ("sparse layouts: graphs on a shared deployment compute on dense tensors (sparse tensors cannot be "
           "made there, and these have no cost rule)")
_torch(REFUSED, None, """
    coalesce indices values crow_indices col_indices ccol_indices row_indices indices_copy values_copy
    crow_indices_copy col_indices_copy ccol_indices_copy row_indices_copy to_sparse to_sparse_coo to_sparse_csr
    to_sparse_csc to_sparse_bsr to_sparse_bsc to_dense sparse_mask dsmm hsmm hspmm saddmm smm spmm sspaddmm sparse_dim
    dense_dim is_coalesced
""", _SPARSE)
_torch(REFUSED, None, """
    choose_qparams_optimized fake_quantize_per_channel_affine fake_quantize_per_tensor_affine
    fused_moving_avg_obs_fake_quant quantize_per_channel quantize_per_tensor quantize_per_tensor_dynamic dequantize
    int_repr
""", "quantization kernels: no cost rule (a shared deployment's graphs compute in the model's dtypes)")
_torch(REFUSED, None, "lstm lstm_cell gru gru_cell rnn_relu rnn_relu_cell rnn_tanh rnn_tanh_cell",
       "recurrent kernels: their work grows with sequence length and hidden sizes of the graph's choosing, with "
       "no cost rule; write the recurrence with torch operations")
_torch(REFUSED, None, "grid_sampler grid_sampler_2d grid_sampler_3d affine_grid_generator",
       "image sampling kernels: no cost rule")
_torch(REFUSED, None, """
    batch_norm_backward_elemt batch_norm_backward_reduce batch_norm_elemt batch_norm_gather_stats
    batch_norm_gather_stats_with_counts batch_norm_stats batch_norm_update_stats slice_inverse segment_reduce conv_tbc
    embedding_bag ctc_loss histogramdd istft to_mkldnn to_padded_tensor index
""", "internals of other operations or rarely used kernels without a cost rule (use the public operation: "
     "F.batch_norm, F.embedding, torch.histogram, ...)")
_torch(REFUSED, None, "eig symeig lstsq solve lu",
       "removed from torch's Tensor API (use torch.linalg.eig, eigh, lstsq, solve, lu)")

# -- namespaces ---------------------------------------------------------------------------------------
_named(ALLOCATES, P.decomposition(32), """
    torch.linalg.cholesky torch.linalg.cholesky_ex torch.linalg.det torch.linalg.householder_product
    torch.linalg.inv torch.linalg.inv_ex torch.linalg.ldl_factor torch.linalg.ldl_factor_ex torch.linalg.ldl_solve
    torch.linalg.lstsq torch.linalg.lu torch.linalg.lu_factor torch.linalg.lu_factor_ex torch.linalg.lu_solve
    torch.linalg.qr torch.linalg.slogdet torch.linalg.solve torch.linalg.solve_ex torch.linalg.solve_triangular
""")
_named(ALLOCATES, P.decomposition(128), "torch.linalg.eigh torch.linalg.eigvalsh")
_named(ALLOCATES, P.decomposition(256), "torch.linalg.svd torch.linalg.svdvals torch.linalg.cond")
_named(ALLOCATES, P.decomposition(256, tolerances=True), "torch.linalg.pinv torch.linalg.matrix_rank")
_named(ALLOCATES, P.decomposition(512), "torch.linalg.eig torch.linalg.eigvals")
_named(ALLOCATES, P.decomposition(64), "torch.linalg.matrix_exp")
_named(ALLOCATES, P.square_decomposition(32), "torch.linalg.tensorinv torch.linalg.tensorsolve")
_named(ALLOCATES, P.matrix_power, "torch.linalg.matrix_power")
_named(ALLOCATES, P.chain, "torch.linalg.multi_dot")
_named(ALLOCATES, P.matmul, "torch.linalg.matmul")
_named(ALLOCATES, E.elementwise(ELEMENT * 2), "torch.linalg.vecdot torch.linalg.cross")
_named(ALLOCATES, P.matrix_norm(256), "torch.linalg.matrix_norm torch.linalg.norm")
_named(ALLOCATES, E.reduction(ELEMENT * 2), "torch.linalg.vector_norm")
_named(ALLOCATES, P.vander("N"), "torch.linalg.vander")
_named(VIEW, E.view, "torch.linalg.diagonal", "a view of its input's diagonals")
_named(ALLOCATES, E.elementwise(MATH), """
    torch.special.entr torch.special.erf torch.special.erfc torch.special.erfinv torch.special.exp2
    torch.special.expit torch.special.expm1 torch.special.log1p torch.special.logit torch.special.sinc
    torch.special.xlog1py torch.special.xlogy torch.special.ndtr torch.special.log_ndtr torch.special.round
""")
_named(ALLOCATES, E.elementwise(SPECIAL), """
    torch.special.airy_ai torch.special.bessel_j0 torch.special.bessel_j1 torch.special.bessel_y0
    torch.special.bessel_y1 torch.special.digamma torch.special.psi torch.special.erfcx torch.special.gammainc
    torch.special.gammaincc torch.special.gammaln torch.special.i0 torch.special.i0e torch.special.i1 torch.special.i1e
    torch.special.modified_bessel_i0 torch.special.modified_bessel_i1 torch.special.modified_bessel_k0
    torch.special.modified_bessel_k1 torch.special.scaled_modified_bessel_k0 torch.special.scaled_modified_bessel_k1
    torch.special.spherical_bessel_j0 torch.special.ndtri torch.special.polygamma torch.special.zeta
""")
_named(ALLOCATES, E.polynomial, """
    torch.special.chebyshev_polynomial_t torch.special.chebyshev_polynomial_u torch.special.chebyshev_polynomial_v
    torch.special.chebyshev_polynomial_w torch.special.shifted_chebyshev_polynomial_t
    torch.special.shifted_chebyshev_polynomial_u torch.special.shifted_chebyshev_polynomial_v
    torch.special.shifted_chebyshev_polynomial_w torch.special.hermite_polynomial_h torch.special.hermite_polynomial_he
    torch.special.laguerre_polynomial_l torch.special.legendre_polynomial_p
""")
_named(ALLOCATES, E.multigammaln, "torch.special.multigammaln")
_named(ALLOCATES, E.same(ELEMENT * 4), "torch.special.softmax torch.special.log_softmax")
_named(ALLOCATES, E.reduction(ELEMENT), "torch.special.logsumexp")
_named(ALLOCATES, P.fft("1"), """
    torch.fft.fft torch.fft.ifft torch.fft.rfft torch.fft.irfft torch.fft.hfft torch.fft.ihfft
""")
_named(ALLOCATES, P.fft("2"), """
    torch.fft.fft2 torch.fft.ifft2 torch.fft.rfft2 torch.fft.irfft2 torch.fft.hfft2 torch.fft.ihfft2
""")
_named(ALLOCATES, P.fft("n"), """
    torch.fft.fftn torch.fft.ifftn torch.fft.rfftn torch.fft.irfftn torch.fft.hfftn torch.fft.ihfftn
""")
_named(ALLOCATES, E.same(ELEMENT), "torch.fft.fftshift torch.fft.ifftshift")
_named(ALLOCATES, P.fftfreq, "torch.fft.fftfreq torch.fft.rfftfreq")
_named(ALLOCATES, E.same(ELEMENT * 4), """
    torch.nn.functional.softmax torch.nn.functional.log_softmax torch.nn.functional.softmin
    torch.nn.functional.normalize
""")
_named(ALLOCATES, E.elementwise(MATH), """
    torch.nn.functional.relu torch.nn.functional.gelu torch.nn.functional.silu torch.nn.functional.sigmoid
    torch.nn.functional.tanh torch.nn.functional.softplus torch.nn.functional.elu torch.nn.functional.leaky_relu
    torch.nn.functional.logsigmoid torch.nn.functional.hardtanh torch.nn.functional.mish
""")
_named(ALLOCATES, E.same(MATH), """
    torch.nn.functional.layer_norm torch.nn.functional.rms_norm torch.nn.functional.group_norm
    torch.nn.functional.batch_norm
""")
_named(ALLOCATES, E.same(RANDOM), "torch.nn.functional.dropout")
_named(ALLOCATES, E.loss, """
    torch.nn.functional.cross_entropy torch.nn.functional.nll_loss torch.nn.functional.mse_loss
    torch.nn.functional.l1_loss torch.nn.functional.kl_div torch.nn.functional.binary_cross_entropy
    torch.nn.functional.binary_cross_entropy_with_logits
""")
_named(ALLOCATES, E.elementwise(ELEMENT * 4), "torch.nn.functional.cosine_similarity torch.nn.functional.pairwise_distance")
_named(ALLOCATES, E.glu, "torch.nn.functional.glu")
_named(ALLOCATES, P.linear, "torch.nn.functional.linear")
_named(ALLOCATES, E.one_hot, "torch.nn.functional.one_hot")
_named(ALLOCATES, E.pad, "torch.nn.functional.pad")
_named(ALLOCATES, E.embedding(weight_at=1), "torch.nn.functional.embedding")
_named(ALLOCATES, P.attention, "torch.nn.functional.scaled_dot_product_attention")


# -- Python values: builtins, operators, container methods -------------------------------------------------
def _walked(value: Any) -> int:
    """Python items walking ``value`` costs (a tensor's rows are new tensor objects)."""
    return S.length(value) * (TENSOR_ITEM if isinstance(value, torch.Tensor) else 1)


def _tensor_work(value: Any) -> float:
    return sum(t.numel() for t in S.tensors(value, depth=1)) * ELEMENT


def _materialized(value: Any) -> int:
    """Bytes per item of a container made from ``value``: a reference, or a new object for every item
    of a range or an iterator."""
    return REFERENCE_BYTES if isinstance(value, (list, tuple, dict, str, torch.Tensor)) else REFERENCE_BYTES + OBJECT_BYTES


def _big_int(d: int) -> float:
    """Items of arithmetic on integers of ``d`` 30-bit digits (Karatsuba above ~70 digits)."""
    return d if d < 70 else d ** 1.585 / 8


def _consume(per_item_bytes: int | None = None, log: bool = False) -> Estimate:
    """``list(x)``, ``tuple(x)``, ``dict(x)``, ``sorted(x)``, ``all(x)``, ...: every item of ``x``."""
    def estimate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
        if not args:
            return NOTHING
        value = args[0]
        n = _walked(value)
        if log:
            n = int(n * math.log2(max(n, 2)))
        size = 0 if per_item_bytes == 0 else S.length(value) * (per_item_bytes or _materialized(value))
        return Cost(size, _tensor_work(value) + LAUNCH, n)
    return estimate


def _iterator(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    """``enumerate(x)``, ``zip(*xs)``: lazy, walked once; charged here with the pairs they will make."""
    lengths = [S.length(a) for a in args] or [0]
    n = min(lengths) if len(args) > 1 else lengths[0]
    return Cost(n * OBJECT_BYTES, _tensor_work(args) + LAUNCH, n * (TENSOR_ITEM if any(
        isinstance(a, torch.Tensor) for a in args) else 1))


def _reversed(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    if args and isinstance(args[0], torch.Tensor):
        return E.same(ELEMENT)(args, kwargs)  # Tensor.__reversed__ flips: a copy
    return NOTHING  # lazy; what walks it pays its length


def _sum(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    if not args:
        return NOTHING
    items = _walked(args[0])
    start = args[1] if len(args) > 1 else kwargs.get("start", 0)
    if isinstance(start, (list, tuple, str)):  # sum(lists, []) copies the growing total at every item
        total = S.count_items(args[0], 1 << 62)
        items += S.length(args[0]) * total
        return Cost(total * REFERENCE_BYTES, LAUNCH, items)
    found = S.tensors(args[0], depth=1)
    start_bytes = start.numel() * start.element_size() if isinstance(start, torch.Tensor) else 0
    if isinstance(args[0], torch.Tensor):
        rows = args[0].shape[0] if args[0].dim() else 1
        row_bytes = args[0].numel() // max(rows, 1) * args[0].element_size()
        return Cost(max(row_bytes, start_bytes) * 2, args[0].numel() * ELEMENT + rows * LAUNCH, items)
    biggest = max((t.numel() * t.element_size() for t in found), default=0)
    return Cost(max(biggest, start_bytes) * 2, _tensor_work(args[0]) + len(found) * LAUNCH, items)


def _min_max(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    if len(args) == 1:
        return Cost(0, _tensor_work(args[0]) + LAUNCH, _walked(args[0]))
    return Cost(0, _tensor_work(args) + LAUNCH, len(args))


def _str(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    value = args[0] if args else ""
    if isinstance(value, torch.Tensor):  # torch prints a summary of large tensors
        return Cost(16 << 10, min(value.numel(), 2000) * ELEMENT + LAUNCH, 2000)
    n = S.count_items(value, 1 << 62)
    return Cost(n * 16, LAUNCH, n)


def _number(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
    """``abs``/``int``/``float``/``round`` of a number; of a tensor, elementwise (``abs``, ``round``)."""
    if args and isinstance(args[0], torch.Tensor):
        return E.elementwise(ELEMENT)(args[:1], {})
    d = max((S.digits(a) for a in args), default=1)
    return Cost(d * 4, LAUNCH, int(_big_int(d) * (d if len(args) > 1 else 1)))


_SEQUENCES = (list, tuple, str)


def _operator(name: str) -> Estimate:
    """``operator.<name>``: tensor rules when a tensor is involved, else Python's (sequences, big ints)."""
    base = name[1:] if name.startswith("i") and name not in ("invert",) else name
    pointwise = E.elementwise(MATH if base in ("pow", "truediv") else ELEMENT)

    def estimate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
        if base in ("getitem", "setitem") and args and isinstance(args[0], torch.Tensor):
            key = args[1] if len(args) > 1 else None
            if base == "getitem":
                return E.index_tensor(args[0], key)
            return E.set_index_tensor(args[0], key, args[2] if len(args) > 2 else None)
        if any(isinstance(a, torch.Tensor) for a in args):
            if base == "matmul":
                return P.matmul(args, kwargs)
            if base == "contains":
                return E.no_allocation(ELEMENT)(args, kwargs) + Cost(args[0].numel() if isinstance(
                    args[0], torch.Tensor) else 0, 0, 0)
            if base in ("not_", "truth"):
                return NOTHING
            return pointwise(args, kwargs)
        return _python_operator(base, args)
    return estimate


def _python_operator(base: str, args: tuple[Any, ...]) -> Cost:
    a = args[0] if args else None
    b = args[1] if len(args) > 1 else None
    if base in ("add",) and isinstance(a, _SEQUENCES) and isinstance(b, _SEQUENCES):
        n = len(a) + len(b)
        return Cost(n * REFERENCE_BYTES, LAUNCH, n)
    if base == "mul":
        seq, count = (a, b) if isinstance(a, _SEQUENCES) else (b, a)
        if isinstance(seq, _SEQUENCES) and isinstance(count, int):
            n = len(seq) * max(count, 0)
            return Cost(n * REFERENCE_BYTES, LAUNCH, n)
    if base == "pow" and type(a) is int and type(b) is int and b > 0 and abs(a) > 1:
        bits = int(b * math.log2(abs(a))) + 1
        d = bits // 30 + 1
        return Cost(bits // 8 + 1, LAUNCH, int(2 * _big_int(d)))
    if base == "lshift" and type(a) is int and type(b) is int and b > 0 and a:
        bits = a.bit_length() + b
        return Cost(bits // 8 + 1, LAUNCH, bits // 30 + 1)
    if base == "mod" and isinstance(a, str):
        return _format(a, b)
    if base in ("mul", "floordiv", "mod", "truediv", "divmod"):
        da, db = S.digits(a), S.digits(b)
        d = max(da, db)
        items = _big_int(d) if base == "mul" else da * db // 8 + d
        return Cost((da + db) * 4 if base == "mul" else d * 4, LAUNCH, int(items))
    if base in ("eq", "ne", "lt", "le", "gt", "ge", "contains"):
        if base == "contains":
            if isinstance(a, range) and type(b) is int:
                return NOTHING
            return Cost(0, LAUNCH, _walked(a) if not isinstance(a, dict) else 1)
        if isinstance(a, _SEQUENCES) and isinstance(b, _SEQUENCES):
            return Cost(0, LAUNCH, min(len(a), len(b)))
    if base in ("getitem",):
        if isinstance(a, (list, tuple, str)) and isinstance(b, slice):
            try:
                n = len(range(*b.indices(len(a))))
            except (TypeError, ValueError):
                n = len(a)
            return Cost(n * REFERENCE_BYTES, LAUNCH, n)
        return NOTHING
    if base == "setitem":
        value = args[2] if len(args) > 2 else None
        if isinstance(a, list) and isinstance(b, slice):
            n = _walked(value) + len(a)
            return Cost(S.length(value) * _materialized(value), LAUNCH, n)
        return NOTHING
    d = max((S.digits(x) for x in args), default=1)
    return Cost(d * 4, LAUNCH, d)


_FORMAT_FIELD = re.compile(r"%[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _format(text: str, values: Any) -> Cost:
    """``"%08d" % x``: the text, every field's width and precision (``*`` takes them from the values),
    and the values printed."""
    size = len(text)
    for width, precision in _FORMAT_FIELD.findall(text):
        size += sum(int(p) for p in (width, precision) if p.isdigit())
    if "*" in text:
        size += sum(abs(v) for v in (values if isinstance(values, tuple) else (values,)) if type(v) is int)
    n = S.count_items(values, 1 << 62)
    return Cost(size + n * 16, LAUNCH, n + size // 64)


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "neg", "pos", "abs", "invert",
              "and_", "or_", "xor", "lshift", "rshift", "lt", "le", "eq", "ne", "gt", "ge", "getitem", "setitem",
              "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul", "iand", "ior", "ixor",
              "contains", "not_", "truth"):
    _named(ALLOCATES, _operator(_name), f"operator.{_name}")

_named(NO_ALLOCATION, lambda args, kwargs: NOTHING, "builtins.len builtins.bool builtins.slice builtins.range",
       "constant work and size (a range is lazy: what walks it pays its length)")
_named(ALLOCATES, _reversed, "builtins.reversed")
_named(ALLOCATES, _number, "builtins.abs builtins.int builtins.float builtins.round")
_named(ALLOCATES, _str, "builtins.str")
_named(ALLOCATES, _consume(), "builtins.list builtins.tuple")
_named(ALLOCATES, _consume(REFERENCE_BYTES * 12), "builtins.dict")
_named(ALLOCATES, _consume(log=True), "builtins.sorted")
_named(ALLOCATES, _consume(0), "builtins.all builtins.any")
_named(ALLOCATES, _min_max, "builtins.min builtins.max")
_named(ALLOCATES, _sum, "builtins.sum")
_named(ALLOCATES, _iterator, "builtins.enumerate builtins.zip")


def _method(kind: str) -> Estimate:
    """Methods of plain containers, called as ``call(getattr(x, name), ...)`` (``args[0]`` is ``x``)."""
    def estimate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
        owner = args[0] if args else ()
        n = S.length(owner)
        if kind == "constant":
            return NOTHING
        if kind == "walk":
            return Cost(0, LAUNCH, n)
        if kind == "copy":
            return Cost(n * REFERENCE_BYTES, LAUNCH, n)
        if kind == "sort":
            return Cost(0, LAUNCH, int(n * math.log2(max(n, 2))))
        value = args[1] if len(args) > 1 else ()
        m = _walked(value)
        return Cost(S.length(value) * _materialized(value), LAUNCH, m + (n if kind == "insert" else 0))
    return estimate


_named(ALLOCATES, _method("constant"), """
    list.append list.pop dict.keys dict.values dict.items dict.get dict.setdefault dict.pop Size.numel
    ModelOutput.to_tuple
""")
_named(ALLOCATES, _method("walk"), """
    list.index list.count list.remove list.reverse list.clear list.insert tuple.index tuple.count Size.index
    Size.count
""")
_named(ALLOCATES, _method("copy"), "list.copy dict.copy")
_named(ALLOCATES, _method("sort"), "list.sort")
_named(ALLOCATES, _method("extend"), "list.extend dict.update")
_named(NO_ALLOCATION, lambda args, kwargs: NOTHING, "getattr",
       "reads an attribute: data, or a record of a method that a call node may call")


# -- lookup ---------------------------------------------------------------------------------------------
_NAMESPACES = ("torch.", "Tensor.")


def rule_for(name: str) -> Rule | None:
    """The rule of the operation ``name`` (``"torch.ones"``, ``"Tensor.add_"``, ``"builtins.sum"``,
    ``"list.append"``), or None when the table has none (then a shared deployment refuses it)."""
    rule = _NAMED.get(name)
    if rule is not None:
        return rule
    namespace, _, short = name.rpartition(".")
    if namespace not in ("torch", "Tensor"):
        return None
    rule = _TORCH.get(short)
    if rule is None and short.endswith("_") and not short.endswith("__"):
        base = _TORCH.get(short[:-1])
        if base is not None and base.kind != REFUSED and base.estimate is not None:
            return Rule(base.kind, _in_place(base.estimate), f"{short[:-1]} in place: no new tensor")
    return rule


def _in_place(estimate: Estimate) -> Estimate:
    def in_place(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost:
        cost = estimate(args, kwargs)
        return Cost(0, cost.work, cost.items)
    return in_place


def estimate(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Cost | None:
    """The cost of calling ``name`` on these (run-time) arguments; None when it has no estimate."""
    rule = rule_for(name)
    if rule is None or rule.estimate is None:
        return None
    cost = rule.estimate(tuple(args), dict(kwargs))
    if name.startswith(_NAMESPACES) and name.endswith("_") and not name.endswith("__"):
        cost = Cost(0, cost.work, cost.items)  # in place: writes into its first argument
    return cost


def rules() -> dict[str, Rule]:
    """Every rule by name (short torch names under ``torch.``/``Tensor.`` apply to both)."""
    return {**{f"torch.{k}": v for k, v in _TORCH.items()}, **_NAMED}
