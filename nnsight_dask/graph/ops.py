"""The operation whitelist: the only functions an intervention graph may name.

Names are stable strings (``"torch.stack"``, ``"Tensor.mean"``, ``"operator.add"``,
``"builtins.len"``, ``"getattr"``, ``"call"``) so that a graph travels as JSON and the server
resolves each name from this table, never by importing what a client asked for.
"""
from __future__ import annotations

import builtins
import functools
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ForbiddenOperationError

_OPERATORS = (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "neg", "pos", "abs", "invert",
    "and_", "or_", "xor", "lshift", "rshift", "lt", "le", "eq", "ne", "gt", "ge", "getitem", "setitem",
    "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul", "iand", "ior", "ixor",
    "contains", "not_", "truth",
)
_BUILTINS = ("len", "abs", "min", "max", "sum", "round", "float", "int", "bool", "tuple", "list",
             "dict", "range", "slice", "all", "any", "sorted", "reversed", "enumerate", "zip", "str")

#: Tensor methods and torch functions that touch files, processes, raw memory or run callables.
_DENIED = frozenset({
    "from_file", "apply_", "map_", "map2_", "register_hook", "register_post_accumulate_grad_hook",
    "backward", "set_", "share_memory_", "storage", "untyped_storage", "data_ptr", "record_stream",
    "pin_memory", "tolist_", "numpy", "resize_", "as_strided_", "set_num_threads", "manual_seed",
    "seed", "initial_seed", "set_default_dtype", "set_default_device", "set_grad_enabled",
    "save", "load", "compile",
})
_FUNCTIONAL = (
    "softmax", "log_softmax", "relu", "gelu", "silu", "sigmoid", "tanh", "softplus", "elu",
    "leaky_relu", "cross_entropy", "nll_loss", "mse_loss", "l1_loss", "kl_div", "binary_cross_entropy",
    "binary_cross_entropy_with_logits", "cosine_similarity", "normalize", "layer_norm", "rms_norm",
    "linear", "one_hot", "pad", "embedding", "dropout", "softmin", "pairwise_distance", "logsigmoid",
    "scaled_dot_product_attention", "group_norm", "batch_norm", "glu", "hardtanh", "mish",
)

#: Names a graph may use in ``getattr`` on values: public, non-dunder attributes only.
SAFE_CALL_TYPES: tuple[type, ...] = (torch.Tensor, tuple, list, dict, torch.Size)


class OpRegistry:
    """Two-way table between whitelisted callables and their names; built once, read-only."""

    def __init__(self) -> None:
        by_name: dict[str, Callable[..., Any]] = {}
        for name in _OPERATORS:
            by_name[f"operator.{name}"] = getattr(operator, name)
        for name in _BUILTINS:
            by_name[f"builtins.{name}"] = getattr(builtins, name)
        for name in dir(torch._C._VariableFunctions):
            if not name.startswith("_") and name not in _DENIED and hasattr(torch, name):
                by_name[f"torch.{name}"] = getattr(torch, name)
        for name in ("einsum", "cdist", "norm", "split", "stft", "tensordot", "unique", "atleast_1d",
                     "broadcast_tensors", "block_diag", "cartesian_prod", "chain_matmul", "meshgrid",
                     "tensor", "as_tensor", "where", "lerp", "topk", "sort"):
            if hasattr(torch, name):
                by_name[f"torch.{name}"] = getattr(torch, name)
        for name in _FUNCTIONAL:
            if hasattr(F, name):
                by_name[f"torch.nn.functional.{name}"] = getattr(F, name)
        for namespace in ("linalg", "special", "fft"):
            module = getattr(torch, namespace)
            for name in dir(module):
                fn = getattr(module, name)
                if not name.startswith("_") and callable(fn) and not isinstance(fn, type):
                    by_name[f"torch.{namespace}.{name}"] = fn
        for name in dir(torch.Tensor):
            if name.startswith("_") or name in _DENIED:
                continue
            attr = getattr(torch.Tensor, name, None)
            if callable(attr) and not isinstance(attr, (property, type)):
                by_name[f"Tensor.{name}"] = attr
        self._by_name = by_name
        self._by_callable: dict[Any, str] = {}
        for name, fn in by_name.items():
            try:
                self._by_callable.setdefault(fn, name)
            except TypeError:  # unhashable callables cannot be looked up by identity
                continue
        # Tensor dunder methods reach __torch_function__ as TensorBase methods; map them to operators.
        for dunder, op_name in (("__add__", "add"), ("__radd__", "add"), ("__sub__", "sub"),
                                ("__mul__", "mul"), ("__rmul__", "mul"), ("__truediv__", "truediv"),
                                ("__matmul__", "matmul"), ("__getitem__", "getitem"),
                                ("__setitem__", "setitem"), ("__neg__", "neg"), ("__pow__", "pow")):
            fn = getattr(torch.Tensor, dunder, None)
            if fn is not None:
                self._by_callable.setdefault(fn, f"operator.{op_name}")

    def name_of(self, fn: Any) -> str | None:
        """The whitelisted name of ``fn``, or ``None`` when it is not whitelisted."""
        try:
            return self._by_callable.get(fn)
        except TypeError:
            return None

    def resolve(self, name: str) -> Callable[..., Any]:
        """The callable for a whitelisted name; a clear error for anything else."""
        fn = self._by_name.get(name)
        if fn is None:
            raise ForbiddenOperationError(
                f"operation {name!r} is not in the whitelist of torch functions, Tensor methods, "
                "Python operators and builtins. Run it locally with nd.apply(fn, ...) instead.",
                op=name,
            )
        return fn

    def __contains__(self, name: object) -> bool:
        return name in self._by_name or name in ("getattr", "call")

    def is_tensor_method(self, name: str) -> bool:
        return f"Tensor.{name}" in self._by_name


@functools.cache
def registry() -> OpRegistry:
    """The process-wide registry, built on first use (about 10 ms)."""
    return OpRegistry()


def safe_getattr(value: Any, name: str) -> Any:
    """``getattr`` restricted to public attributes, so a graph cannot reach ``__class__`` and beyond."""
    if name.startswith("_"):
        raise ForbiddenOperationError(
            f"attribute {name!r} is private; graphs may read public attributes only", attribute=name)
    return getattr(value, name)


def safe_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a value the graph obtained by ``getattr``: only public methods of tensors and containers."""
    owner = getattr(fn, "__self__", None)
    name = getattr(fn, "__name__", "")
    if owner is None or name.startswith("_") or not _is_safe_owner(owner) or name in _DENIED:
        raise ForbiddenOperationError(
            f"calling {getattr(fn, '__qualname__', fn)!r} is not allowed in a graph; only public "
            "methods of tensors, model outputs and containers can be called", callee=repr(fn)[:80])
    return fn(*args, **kwargs)


def _is_safe_owner(owner: Any) -> bool:
    if isinstance(owner, SAFE_CALL_TYPES):
        return True
    cls_names = {c.__name__ for c in type(owner).__mro__}
    return "ModelOutput" in cls_names
