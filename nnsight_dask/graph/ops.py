"""The operation whitelist: the only functions an intervention graph may name, and what a graph may read.

Names are stable strings (``"torch.stack"``, ``"Tensor.mean"``, ``"operator.add"``,
``"builtins.len"``, ``"getattr"``, ``"call"``) so that a graph travels as JSON and the server
resolves each name from this table, never by importing what a client asked for.

A deployment is shared: a graph may compute on activations and on *copies* of weights, and nothing
else. Four rules keep it so; :func:`check_op_call` states them for one operation, so the static
validator and the runtime (the interleaver, before every operation) refuse the same things:

1. **Closed names.** An operation is a whitelisted torch function, Tensor method, operator or builtin
   whose name is in no denied family (:data:`DENIED_FAMILIES`, each with the reason it is denied).
2. **Data only.** ``getattr`` returns data (:func:`safe_getattr`): tensor properties, fields of model
   outputs and named tuples, and, for a whitelisted method name, a :class:`MethodRef` that only
   ``call`` can use (:func:`safe_call`). ``module_attr`` returns copies of parameters and buffers and
   plain config values (:func:`module_attr`). No callable (bound method, module, function, class)
   ever becomes a graph value, and no operation is given one (``sorted(key=)`` is refused).
3. **No writes outside graph values.** ``out=`` is refused (it writes into an existing tensor),
   and weights are copied when read, so in-place operations only ever change the graph's own values.
4. **Devices.** At run time a graph may place values on the CPU (or ``meta``) or on a device the model
   (or the operation's own tensors) already uses: ``x.to(h.device)`` works on a GPU shard, but
   ``x.to("cuda:3")`` cannot allocate on a device the deployment does not own.
"""
from __future__ import annotations

import builtins
import dataclasses
import functools
import operator
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ForbiddenOperationError
from .node import Ref

_OPERATORS = (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "neg", "pos", "abs", "invert",
    "and_", "or_", "xor", "lshift", "rshift", "lt", "le", "eq", "ne", "gt", "ge", "getitem", "setitem",
    "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul", "iand", "ior", "ixor",
    "contains", "not_", "truth",
)
_BUILTINS = ("len", "abs", "min", "max", "sum", "round", "float", "int", "bool", "tuple", "list",
             "dict", "range", "slice", "all", "any", "sorted", "reversed", "enumerate", "zip", "str")


@dataclasses.dataclass(frozen=True)
class DeniedFamily:
    """Torch functions / Tensor methods refused by exact name or name prefix, and why."""

    names: frozenset[str]
    prefixes: tuple[str, ...]
    reason: str


#: Every torch function and Tensor method a graph may never name, by family. Built from an audit of
#: ``dir(torch)``, ``dir(torch._C._VariableFunctions)`` and ``dir(torch.Tensor)`` (torch 2.x); names
#: that torch does not expose as graph operations today are listed too, so that a future torch
#: adding them to ``_VariableFunctions`` cannot widen the whitelist.
DENIED_FAMILIES: dict[str, DeniedFamily] = {
    "raw memory": DeniedFamily(
        frozenset({"storage", "untyped_storage", "data_ptr", "const_data_ptr", "mutable_data_ptr", "set_",
                   "share_memory_", "pin_memory", "record_stream", "storage_type", "frombuffer",
                   "from_numpy", "numpy", "module_load", "as_subclass", "to_dlpack", "from_dlpack"}),
        ("as_strided",),
        "it exposes or replaces the memory behind a tensor (addresses, storages, strides reaching past "
        "the view, buffers of other objects, shared or page-locked memory): the path from a value to the "
        "memory of the shared model"),
    "uninitialized memory": DeniedFamily(
        frozenset({"empty", "new", "new_empty", "new_empty_strided", "resize", "resize_", "resize_as",
                   "resize_as_", "resize_as_sparse_"}),
        ("empty", "resize", "sparse_resize"),
        "it returns memory that was never written, which on a shared worker can hold another "
        "experiment's freed activations; use zeros, zeros_like or new_zeros"),
    "unchecked kernels": DeniedFamily(
        frozenset({"sparse_coo_tensor", "sparse_csr_tensor", "sparse_csc_tensor", "sparse_bsr_tensor",
                   "sparse_bsc_tensor", "sparse_compressed_tensor"}),
        ("fbgemm_", "cudnn_", "miopen_", "mkldnn_", "quantized_", "sym_"),
        "it trusts its arguments (sparse indices without bounds checks, packed weights passed as raw "
        "buffers, backend-specific kernels, symbolic-shape internals): a crafted argument reads or writes "
        "outside a tensor or crashes the worker"),
    "callables and hooks": DeniedFamily(
        frozenset({"apply_", "map_", "map2_", "register_hook", "register_post_accumulate_grad_hook",
                   "retain_grad", "backward", "reinforce"}),
        (),
        "it runs Python code passed in, or leaves a hook or retained gradient on a tensor; a graph runs "
        "backward with its own backward node and reads gradients with .grad"),
    "process-wide state": DeniedFamily(
        frozenset({"manual_seed", "seed", "initial_seed", "get_rng_state", "set_rng_state",
                   "set_default_dtype", "set_default_device", "set_default_tensor_type", "set_grad_enabled",
                   "set_num_threads", "set_num_interop_threads", "use_deterministic_algorithms",
                   "set_deterministic_debug_mode", "set_printoptions", "set_flush_denormal",
                   "set_float32_matmul_precision", "set_warn_always", "set_anomaly_enabled", "compile"}),
        ("set_", "use_", "manual_seed", "get_rng"),
        "it changes a setting of the whole worker process (random seed, threads, default dtype or "
        "device, printing, determinism, denormals, compilation) that every other experiment on the shard "
        "then runs with; seeding also lets one user replay another's random draws"),
    "files and processes": DeniedFamily(
        frozenset({"save", "load", "from_file"}),
        (),
        "it reads or writes files on the worker"),
}

# Allowed on purpose, after the same audit:
# - in-place ops (``mul_``, ``copy_``, ``index_put_``, ``embedding_renorm_``, ``batch_norm`` with running
#   stats, ...): every value a graph holds is its own (activations of its run, copies of weights);
# - ``requires_grad_`` and ``detach_``: they change only such values (weights are copies);
# - ``tolist``, ``item``, ``storage_offset``, ``is_shared``, ``is_pinned``: data, not memory;
# - ``cpu`` and ``to(device)``: see rule 4 of the module docstring (the device is checked at run time);
# - random ops (``rand``, ``bernoulli_``, ``dropout``, ``multinomial``): they draw from the worker's global
#   generator, which no experiment can seed or read (seeding is denied above); remote generation is greedy.
_BY_EXACT: dict[str, str] = {name: family for family, spec in DENIED_FAMILIES.items() for name in spec.names}
_BY_PREFIX: tuple[tuple[str, str], ...] = tuple(
    (prefix, family) for family, spec in DENIED_FAMILIES.items() for prefix in spec.prefixes)


def denied_family(name: str) -> str | None:
    """The family that denies the op named ``name`` (``"torch.empty"``, ``"Tensor.set_"`` or ``"set_"``)."""
    short = name.rpartition(".")[2]
    family = _BY_EXACT.get(short)
    if family is not None:
        return family
    for prefix, family in _BY_PREFIX:
        if short.startswith(prefix):
            return family
    return None


def denied_error(name: str, family: str, **fields: Any) -> ForbiddenOperationError:
    """The refusal of op ``name`` by its denied ``family``, with the family's reason."""
    return ForbiddenOperationError(
        f"{name!r} is refused in a graph ({family}): {DENIED_FAMILIES[family].reason}", op=name, family=family,
        **fields)


_FUNCTIONAL = (
    "softmax", "log_softmax", "relu", "gelu", "silu", "sigmoid", "tanh", "softplus", "elu",
    "leaky_relu", "cross_entropy", "nll_loss", "mse_loss", "l1_loss", "kl_div", "binary_cross_entropy",
    "binary_cross_entropy_with_logits", "cosine_similarity", "normalize", "layer_norm", "rms_norm",
    "linear", "one_hot", "pad", "embedding", "dropout", "softmin", "pairwise_distance", "logsigmoid",
    "scaled_dot_product_attention", "group_norm", "batch_norm", "glu", "hardtanh", "mish",
)

#: Tensor attributes a graph may read: data about the tensor, or views of it (``T``, ``real``).
#: Not ``data`` (an alias outside autograd), ``grad`` (read it with ``.grad`` in the trace) nor
#: ``grad_fn`` (its ``next_functions`` lead to the model's parameters).
TENSOR_DATA_ATTRIBUTES = frozenset({
    "shape", "dtype", "device", "ndim", "T", "mT", "H", "mH", "real", "imag", "layout", "requires_grad",
    "is_leaf", "retains_grad", "is_cuda", "is_cpu", "is_meta", "is_sparse", "is_sparse_csr", "is_quantized",
    "is_nested", "is_mkldnn", "is_mps", "is_xpu", "itemsize", "nbytes", "names",
})
_VALUE_ATTRIBUTES: tuple[tuple[type, frozenset[str]], ...] = (
    (torch.dtype, frozenset({"is_floating_point", "is_complex", "is_signed", "itemsize"})),
    (torch.device, frozenset({"type", "index"})),
    (slice, frozenset({"start", "stop", "step"})),
)
#: Methods of plain containers a graph may call. Mutators are safe: every container a graph holds is
#: its own (constants are rebuilt for each use, module attributes are copies).
_CONTAINER_METHODS: tuple[tuple[type | tuple[type, ...], frozenset[str]], ...] = (
    (dict, frozenset({"keys", "values", "items", "get", "copy", "update", "setdefault", "pop"})),
    (torch.Size, frozenset({"index", "count", "numel"})),
    (list, frozenset({"index", "count", "copy", "append", "extend", "insert", "pop", "remove", "reverse",
                      "sort", "clear"})),
    (tuple, frozenset({"index", "count"})),
)
#: Plain values a module attribute may hold (besides tensors, which are copied).
_PLAIN = (type(None), bool, int, float, complex, str, torch.dtype, torch.device, torch.Size)


class OpRegistry:
    """Two-way table between whitelisted callables and their names; built once, read-only."""

    def __init__(self) -> None:
        by_name: dict[str, Callable[..., Any]] = {}
        for name in _OPERATORS:
            by_name[f"operator.{name}"] = getattr(operator, name)
        for name in _BUILTINS:
            by_name[f"builtins.{name}"] = getattr(builtins, name)
        for name in dir(torch._C._VariableFunctions):
            if not name.startswith("_") and hasattr(torch, name):
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
            if name.startswith("_"):
                continue
            attr = getattr(torch.Tensor, name, None)
            if callable(attr) and not isinstance(attr, (property, type)):
                by_name[f"Tensor.{name}"] = attr
        by_name = {name: fn for name, fn in by_name.items() if denied_family(name) is None}
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
            family = denied_family(name)
            if family is not None:
                raise denied_error(name, family)
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


# -- attributes: data only ------------------------------------------------------------------------------
class MethodRef:
    """``value.name`` for a whitelisted method: not callable itself; a ``call`` node calls it.

    So that a graph never holds a bound method (``config.to_json_file``), ``getattr`` of a method
    name gives this record of *which* method of *which* value, and :func:`safe_call` resolves the
    name again through the whitelist when the graph calls it.
    """

    __slots__ = ("name", "owner")

    def __init__(self, owner: Any, name: str) -> None:
        self.owner = owner
        self.name = name

    @property
    def op_name(self) -> str:
        return f"{_type_name(self.owner)}.{self.name}"

    def __repr__(self) -> str:
        return f"<method {self.op_name}>"


def method_op_name(method: MethodRef) -> str:
    """The name the cost rules know a method by: ``Tensor.add``, ``list.append``, ``dict.keys``,
    ``Size.numel``, ``tuple.index`` (named tuples too), ``ModelOutput.to_tuple``."""
    owner, name = method.owner, method.name
    if isinstance(owner, torch.Tensor):
        return f"Tensor.{name}"
    if name == "to_tuple" and _is_model_output(owner):
        return "ModelOutput.to_tuple"
    for types, methods in _CONTAINER_METHODS:
        if isinstance(owner, types) and name in methods:
            return f"{types.__name__ if isinstance(types, type) else types[0].__name__}.{name}"
    return method.op_name


def container_method_names() -> list[str]:
    """Every method of a plain value a graph may call, by the name :func:`method_op_name` gives it."""
    names = [f"{types.__name__ if isinstance(types, type) else types[0].__name__}.{name}"
             for types, methods in _CONTAINER_METHODS for name in sorted(methods)]
    return [*names, "ModelOutput.to_tuple"]


@functools.cache
def _never_data() -> frozenset[str]:
    """Attribute names no graph value may be asked for, known without the value (static refusal)."""
    tensor_methods = {n.partition(".")[2] for n in registry()._by_name if n.startswith("Tensor.")}
    module_api = {n for n in dir(torch.nn.Module) if not n.startswith("_")} - tensor_methods
    hf_api = {"save_pretrained", "from_pretrained", "push_to_hub", "to_json_file", "to_json_string", "to_dict",
              "to_diff_dict", "generate", "config", "generation_config", "register_for_auto_class"}
    return frozenset(set(_BY_EXACT) | module_api | hf_api)


#: Tensor attributes that alias memory or lead to the autograd graph, and what to write instead.
_ALIASES = {
    "data": "it aliases the tensor's memory outside autograd; use the value itself (or .detach())",
    "grad": "read gradients with .grad on a traced value (it records a gradient read)",
    "grad_fn": "its next_functions lead through the autograd graph to the model's parameters",
    "output_nr": "it describes the autograd graph, not data",
}


def check_attribute_name(name: Any) -> None:
    """Refuse an attribute name that no graph value may be asked for (private, a denied method, a
    module or Hugging Face method, ``data``/``grad``/``grad_fn``); the value decides the rest."""
    if not isinstance(name, str):
        raise ForbiddenOperationError(f"getattr needs an attribute name (a string), not {type(name).__name__}",
                                      attribute=repr(name)[:80])
    if name.startswith("_"):
        raise ForbiddenOperationError(
            f"attribute {name!r} is private; graphs may read public data attributes only", attribute=name)
    family = denied_family(name)
    if family is not None and not registry().is_tensor_method(name):
        raise denied_error(name, family, attribute=name)
    if name in _ALIASES:
        raise ForbiddenOperationError(f"attribute {name!r} cannot be read in a graph: {_ALIASES[name]}", attribute=name)
    if name in _never_data():
        raise ForbiddenOperationError(
            f"attribute {name!r} cannot be read in a graph: it is a method of modules, configs or models, and "
            "graphs read data only (tensor properties such as shape and dtype, fields of model outputs)",
            attribute=name)


def safe_getattr(value: Any, name: str) -> Any:
    """``getattr`` restricted to data: tensor properties, output/named-tuple fields, method records."""
    check_attribute_name(name)
    if isinstance(value, torch.Tensor):
        if name in TENSOR_DATA_ATTRIBUTES:
            return getattr(value, name)
        if registry().is_tensor_method(name):
            return MethodRef(value, name)
        family = denied_family(name)
        if family is not None:
            raise denied_error(f"Tensor.{name}", family, attribute=name)
        raise _not_data(value, name, f"tensor properties: {', '.join(sorted(TENSOR_DATA_ATTRIBUTES))}")
    fields = _fields(value)
    if fields is not None and name in fields:
        return _data_result(getattr(value, name), name)
    for types, methods in _CONTAINER_METHODS:
        if isinstance(value, types) and name in methods:
            return MethodRef(value, name)
    if _is_model_output(value) and name == "to_tuple":
        return MethodRef(value, name)
    for kind, names in _VALUE_ATTRIBUTES:
        if isinstance(value, kind) and name in names:
            return _data_result(getattr(value, name), name)
    if fields is not None:
        raise _not_data(value, name, f"fields: {', '.join(fields) or 'none'}")
    raise _not_data(value, name, "tensor properties, fields of model outputs and named tuples, and "
                                 "whitelisted methods of tensors and containers")


def _fields(value: Any) -> tuple[str, ...] | None:
    """Field names of a model output (dataclass), a named tuple or a ``torch.return_types`` tuple."""
    if _is_model_output(value) and dataclasses.is_dataclass(value):
        return tuple(f.name for f in dataclasses.fields(value))
    if isinstance(value, tuple):
        kind = type(value)
        if kind.__module__ == "torch.return_types":
            return tuple(getattr(kind, "__match_args__", ()))
        names = getattr(kind, "_fields", None)
        if isinstance(names, tuple) and all(isinstance(n, str) for n in names):
            return names
    return None


def _is_model_output(value: Any) -> bool:
    return isinstance(value, dict) and any(c.__name__ == "ModelOutput" for c in type(value).__mro__)


def _type_name(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "Tensor"
    return type(value).__name__


def _not_data(value: Any, name: str, allowed: str) -> ForbiddenOperationError:
    return ForbiddenOperationError(
        f"attribute {name!r} of a {_type_name(value)} value cannot be read in a graph: graphs read data "
        f"only ({allowed})", attribute=name, value_type=_type_name(value))


def _data_result(result: Any, name: str) -> Any:
    if callable(result):
        raise ForbiddenOperationError(
            f"attribute {name!r} holds a callable ({type(result).__name__}); graphs hold data only",
            attribute=name)
    return result


def safe_call(method: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a :class:`MethodRef` a graph read with ``getattr``: a whitelisted Tensor method on a tensor,
    or a read-only method of a container. Anything else is refused."""
    if not isinstance(method, MethodRef):
        raise ForbiddenOperationError(
            f"a graph can call only methods it read with getattr (e.g. out.keys()), not a "
            f"{_type_name(method)} value", callee=_type_name(method))
    check_op_call("call", (method, *args), kwargs)
    owner, name = method.owner, method.name
    if isinstance(owner, torch.Tensor):
        return registry().resolve(f"Tensor.{name}")(owner, *args, **kwargs)
    return getattr(type(owner), name)(owner, *args, **kwargs)


# -- module attributes: copies of parameters and buffers, plain config values --------------------------------
def module_attr(module: torch.nn.Module, name: str, before_copy: Callable[[Any], None] | None = None) -> Any:
    """A module's parameter, buffer or plain attribute as a graph value: tensors are copied
    (``detach().clone()``), so nothing a graph does to the value reaches the (shared) model.
    ``before_copy`` sees the value before it is copied (a shared shard sizes the copy there).

    Submodules, bound methods and other objects are refused: a graph calls a module through a
    ``module_call`` node and reads its inputs and outputs through getters, it never holds one.
    """
    check_attribute_name(name)
    where = f"{type(module).__name__}.{name}"
    if name in module._parameters:
        value: Any = module._parameters[name]
    elif name in module._buffers:
        value = module._buffers[name]
    elif name in module._modules:
        raise ForbiddenOperationError(
            f"{where} is a submodule; graphs never hold modules. Call it (lm.{name}(x)) or read its "
            ".output / .input instead", attribute=name)
    elif name in vars(module):
        value = vars(module)[name]
    else:
        raise ForbiddenOperationError(
            f"{where} is not a parameter, buffer or plain attribute of the module; graphs read parameters, "
            f"buffers and plain config values only. Parameters: {', '.join(module._parameters) or 'none'}; "
            f"buffers: {', '.join(module._buffers) or 'none'}", attribute=name)
    if before_copy is not None:
        before_copy(value)
    return copy_data(value, where)


def copy_data(value: Any, where: str, depth: int = 0) -> Any:
    """A private copy of plain data: tensors cloned, lists/tuples/dicts rebuilt; anything else refused."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, _PLAIN):
        return value
    if depth < 16 and type(value) in (list, tuple):
        return type(value)(copy_data(v, where, depth + 1) for v in value)
    if depth < 16 and type(value) is dict and all(isinstance(k, (str, int)) for k in value):
        return {k: copy_data(v, where, depth + 1) for k, v in value.items()}
    kind = "a callable" if callable(value) else "not plain data"
    raise ForbiddenOperationError(
        f"{where} is {kind} ({type(value).__name__}); graphs read tensors (as copies) and plain values "
        "(numbers, strings, dtypes, lists and tuples of them) only", attribute=where.rpartition(".")[2],
        value_type=type(value).__name__)


# -- one operation's arguments ------------------------------------------------------------------------
#: Operations whose ``key=`` argument would call a function (refused: a graph passes no functions).
#: The one table of them, read by the static validator and by the run-time check.
KEY_FUNCTIONS = frozenset({"builtins.sorted", "builtins.min", "builtins.max", "list.sort"})
_DEVICE_METHODS = {"Tensor.cuda": "cuda", "Tensor.xpu": "xpu", "Tensor.ipu": "ipu", "Tensor.mtia": "mtia"}


def check_op_call(name: str, args: Any, kwargs: Any, *, devices: Collection[torch.device] | None = None) -> None:
    """Raise :class:`ForbiddenOperationError` if the operation ``name`` may not run on these arguments.

    Works on recorded arguments (references to other nodes stand for values not known yet: the
    static validator) and on values (the interleaver, before every operation). Refuses: names outside
    the whitelist or in a denied family, ``getattr`` of private/denied/never-data names, ``call`` of
    anything but a :class:`MethodRef`, ``out=``, ``key=`` (and callables anywhere in the arguments),
    ``unsafe=True``, ``pin_memory=True``, ``Tensor.type`` with a type name, and, when ``devices`` is
    given (run time: the devices the model uses), devices other than those, the CPU and ``meta``.
    """
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    kwargs = kwargs or {}
    if name == "getattr":
        if len(args) != 2 or kwargs:
            raise ForbiddenOperationError("getattr takes a value and an attribute name, nothing else", op=name)
        check_attribute_name(args[1])
        return
    if name == "call":
        target = args[0] if args else None
        if isinstance(target, MethodRef):
            if isinstance(target.owner, torch.Tensor):
                check_op_call(f"Tensor.{target.name}", (target.owner, *args[1:]), kwargs, devices=devices)
            else:
                check_arguments(target.op_name, args[1:], kwargs, devices)
                if target.name in _INSERTING_METHODS:
                    _check_no_cycle(target.op_name, target.owner, (args[1:], kwargs))
            return
        if not isinstance(target, Ref):
            raise ForbiddenOperationError(
                f"a graph can call only methods it read with getattr, not a {_type_name(target)} value",
                op=name, callee=_type_name(target))
        check_arguments(name, args[1:], kwargs, None)
        return
    if name not in registry():
        registry().resolve(name)  # raises the whitelist error
    check_arguments(name, args, kwargs, devices)
    if name in _INSERTING_OPERATORS and len(args) > 1:
        _check_no_cycle(name, args[0], args[1:])


#: Operations that put values into a container (at run time they may not put the container into itself).
_INSERTING_OPERATORS = frozenset({"operator.setitem", "operator.iadd"})
_INSERTING_METHODS = frozenset({"append", "extend", "insert", "update", "setdefault"})


def _check_no_cycle(name: str, container: Any, values: Any) -> None:
    """Refuse putting ``container`` into itself (directly or nested): every walker of values (sizes,
    codecs, printing) would recurse forever on a list that holds itself."""
    if not isinstance(container, (list, dict)):
        return
    stack, seen = [values], set()
    while stack:
        item = stack.pop()
        if item is container:
            raise ForbiddenOperationError(
                f"{name} would put a {type(container).__name__} into itself; graph values may not hold themselves",
                op=name)
        if isinstance(item, (list, tuple, dict)) and id(item) not in seen:
            seen.add(id(item))
            stack.extend(item.values() if isinstance(item, dict) else item)


def check_arguments(name: str, args: Any, kwargs: Any, devices: Collection[torch.device] | None = None) -> None:
    """The argument rules of :func:`check_op_call` for an operation ``name`` (also a module call)."""
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    kwargs = kwargs or {}
    if kwargs.get("out") is not None:
        raise ForbiddenOperationError(
            f"{name}(..., out=...) is refused: out= writes into an existing tensor. Use the returned value "
            "(y = torch.add(a, b)) and assign it where it belongs", op=name, argument="out")
    if name in KEY_FUNCTIONS and kwargs.get("key") is not None:
        raise ForbiddenOperationError(
            f"{name}(..., key=...) is refused: a graph passes no functions to operations", op=name, argument="key")
    for flag in ("unsafe", "pin_memory"):
        if kwargs.get(flag):
            raise ForbiddenOperationError(
                f"{name}(..., {flag}=True) is refused: it skips bounds checks or takes page-locked memory "
                "shared by the whole worker", op=name, argument=flag)
    if name == "Tensor.type" and any(isinstance(a, (str, Ref)) for a in (*args[1:], kwargs.get("dtype"))):
        raise ForbiddenOperationError(
            "Tensor.type(<type name>) is refused: a type name can move the tensor to another device; "
            "use .to(dtype)", op=name, argument="dtype")
    found = _find_callable((args, kwargs))
    if found is not None:
        raise ForbiddenOperationError(
            f"{name} was given a callable ({getattr(found, '__qualname__', type(found).__name__)}); a graph "
            "passes data to operations, never functions, methods or modules", op=name,
            callee=type(found).__name__)
    if devices is not None:
        _check_devices(name, args, kwargs, devices)


def _find_callable(obj: Any) -> Any:
    """The first callable inside ``obj`` (nested lists, tuples, sets, dicts), or None."""
    stack, seen = [obj], set()
    while stack:
        item = stack.pop()
        if isinstance(item, (torch.Tensor, Ref, str, int, float)):
            continue
        if isinstance(item, (list, tuple, set, frozenset, dict)):
            if id(item) in seen:  # a graph can build a list that holds itself
                continue
            seen.add(id(item))
            stack.extend(item.values() if isinstance(item, dict) else item)
        elif callable(item):
            return item
    return None


def _check_devices(name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                   devices: Collection[torch.device]) -> None:
    requested: list[Any] = []
    if kwargs.get("device") is not None:
        requested.append(kwargs["device"])
    if name == "Tensor.to":
        requested.extend(a for a in args[1:] if isinstance(a, (str, torch.device)))
    if name in _DEVICE_METHODS:
        index = args[1] if len(args) > 1 else kwargs.get("device")
        requested.append(f"{_DEVICE_METHODS[name]}:{index}" if isinstance(index, int) else _DEVICE_METHODS[name])
    if not requested:
        return
    here = {t.device for t in _tensors((args, kwargs))} | set(devices)
    for spec in requested:
        try:
            device = torch.device(spec)
        except (RuntimeError, TypeError, ValueError):
            continue  # not a device: the operation itself reports it
        if device.type in ("cpu", "meta") or any(
                d.type == device.type and (device.index is None or d.index is None or d.index == device.index)
                for d in here):
            continue
        raise ForbiddenOperationError(
            f"{name} asks for device {str(device)!r}; a graph may use the CPU or the devices the model is on "
            f"({', '.join(sorted(str(d) for d in here if d.type not in ('cpu', 'meta'))) or 'none besides cpu'})",
            op=name, device=str(device))


def _tensors(obj: Any) -> list[torch.Tensor]:
    found, stack, steps = [], [obj], 0
    while stack and len(found) < 64 and steps < 10_000:
        item, steps = stack.pop(), steps + 1
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return found


def check_result(value: Any, what: str) -> Any:
    """``value`` if it may be a graph value (no callable: no module, method, function or class)."""
    if callable(value) and not isinstance(value, torch.Tensor):
        raise ForbiddenOperationError(
            f"{what} produced a callable ({type(value).__name__}); graph values are data only", op=what,
            value_type=type(value).__name__)
    return value
