"""A deployment's policy: what experiments on a shared model may do, set by whoever serves it.

The policy is plain data stored with the deployment record. Every shard checks each graph against it
(and against its worker's settings) before the experiment touches the model; a client checks too, only
to fail fast. A refusal is a :class:`~nnsight_dask.errors.PolicyError` naming the rule and the user's line.

>>> Policy(weights="deny", modules=["model.layers.*"], gradients=False).to_dict()["weights"]
'deny'
"""
from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..errors import PolicyError
from ..tensors import leaves, nbytes
from .allocation import OpBounds, check_against
from .graph import InterventionGraph
from .node import Kind, Node, display_path
from .op_rules import estimate

WEIGHT_MODES = ("read", "deny")


@dataclass(frozen=True)
class Policy:
    """What experiments on a deployment may do.

    Parameters
    ----------
    weights
        ``"read"``: parameters and buffers may be read (as copies). ``"deny"``: activations are
        visible but weights never leave the shard: reading a module's parameters or buffers, and
        calling a module on inputs of the graph's choosing (a direct probe of its weights), are refused.
    modules
        Glob patterns of module paths whose inputs and outputs may be read, set or skipped
        (``"model.layers.*.mlp"``; ``[3]`` and ``.3`` are the same). ``None``: every module.
    gradients
        Whether ``.grad`` and ``.backward()`` are allowed.
    stores
        URL prefixes (``"s3://bucket/results/"``, ``"/data/nnsight"``) that ``store=`` may name;
        ``None``: any store the workers can write. For experiments sent through the gateway (which
        carry a store scope), the only way to allow a network store (anything but local paths).
    storage_options
        fsspec ``storage_options`` keys that experiments sent through the gateway may set (a Dask
        client's experiments may set any); default none.
    max_new_tokens, max_prompt_tokens
        Generation length and prompt length bounds (``max_prompt_tokens=None``: the model's context
        length, counting the new tokens too).
    max_result_bytes, max_tensor_bytes
        Bytes of saved values returned inline, and of any one tensor an experiment sends in or creates.
    max_op_work
        Work one operation of a graph may do, in work units (a floating-point operation of a matrix
        product; other kernels by their relative cost, see :mod:`~nnsight_dask.graph.estimates`):
        a running operation cannot be interrupted, so this bounds how long a cancelled or timed-out
        experiment still holds its shard. ``None``: each shard derives it from its own measured speed,
        ``nnsight-dask.op-seconds`` (0.5 s) of it.
    max_op_items
        Python items one operation may walk (``sum(range(n))``, ``sorted(l)``, big-integer arithmetic).
        ``None``: ``nnsight-dask.op-seconds`` of the shard's measured interpreter speed.
    max_experiment_bytes
        Bytes the values of one experiment's nodes may hold at once on a shard. ``None``: a share
        (``nnsight-dask.experiment-memory-fraction``, 0.25) of the shard's memory: the worker's memory
        limit, or the GPU's memory.
    timeout
        Wall-time bound of one experiment, in seconds.
    """

    weights: str = "read"
    modules: tuple[str, ...] | None = None
    gradients: bool = True
    stores: tuple[str, ...] | None = None
    storage_options: tuple[str, ...] = ()
    max_new_tokens: int = 1024
    max_prompt_tokens: int | None = None
    max_result_bytes: int = 256 << 20
    max_tensor_bytes: int = 1 << 30
    max_op_work: float | None = None
    max_op_items: int | None = None
    max_experiment_bytes: int | None = None
    timeout: float = 600.0

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_MODES:
            raise ValueError(f"Policy(weights={self.weights!r}): choose one of {WEIGHT_MODES}")
        for name in ("modules", "stores", "storage_options"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ValueError(f"Policy({name}=...) takes a list of patterns, not one string: [{value!r}]")
            if value is not None:
                object.__setattr__(self, name, tuple(str(v) for v in value))
        for name in ("max_new_tokens", "max_result_bytes", "max_tensor_bytes"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"Policy({name}={getattr(self, name)!r}) must be at least 1")
        for name in ("max_op_work", "max_op_items", "max_experiment_bytes"):
            value = getattr(self, name)
            if value is not None and not value >= 1:
                raise ValueError(f"Policy({name}={value!r}) must be at least 1, or None (derived by each shard)")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"Policy(max_prompt_tokens={self.max_prompt_tokens!r}) must be at least 1 or None")
        if not self.timeout > 0:
            raise ValueError(f"Policy(timeout={self.timeout!r}) must be positive")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (stored with the deployment record)."""
        data = asdict(self)
        for name in ("modules", "stores", "storage_options"):
            if data[name] is not None:
                data[name] = list(data[name])
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Policy:
        """Inverse of :meth:`to_dict`; ``None`` gives the default policy."""
        if data is None:
            return cls()
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown policy field(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(data))

    def allows_module(self, module_path: str) -> bool:
        """True when ``module_path`` matches one of :attr:`modules` (or no patterns are set)."""
        if self.modules is None:
            return True
        dotted = module_path
        shown = display_path(module_path)
        return any(fnmatch.fnmatchcase(dotted, p) or fnmatch.fnmatchcase(shown, p) for p in self.modules)

    def allows_store(self, store: str) -> bool:
        """True when ``store`` lies under one of :attr:`stores` (or no prefixes are set)."""
        if self.stores is None:
            return True
        return any(_within(store, prefix) for prefix in self.stores)


def check_policy(graph: InterventionGraph, policy: Policy, *, context_length: int | None = None) -> None:
    """Raise :class:`PolicyError` on the first thing ``graph`` asks that ``policy`` does not allow.

    ``context_length`` is the model's (``max_position_embeddings``); it bounds prompt plus new tokens
    when the policy sets no ``max_prompt_tokens``.
    """
    store = graph.options.get("store")
    if store is not None and not (isinstance(store, str) and policy.allows_store(store)):
        raise PolicyError(f"this deployment's policy does not let experiments write to store {store!r}; "
                          f"allowed store prefixes: {list(policy.stores or ())}", rule="stores", store=str(store))
    if graph.options.get("store_scope") is not None:
        _check_scoped_store(graph.options, policy)
    for index, run in enumerate(graph.passes):
        new_tokens = run.steps if run.kind == "generate" else 0
        if new_tokens > policy.max_new_tokens:
            raise PolicyError(f"pass {index} asks for max_new_tokens={new_tokens}; this deployment's policy "
                              f"allows at most {policy.max_new_tokens}", rule="max_new_tokens")
        prompt = max((_prompt_length(invoke) for invoke in run.invokes), default=0)
        if policy.max_prompt_tokens is not None and prompt > policy.max_prompt_tokens:
            raise PolicyError(f"pass {index} has a prompt of {prompt} tokens; this deployment's policy allows at "
                              f"most {policy.max_prompt_tokens}", rule="max_prompt_tokens")
        if policy.max_prompt_tokens is None and context_length is not None and prompt + new_tokens > context_length:
            raise PolicyError(f"pass {index} needs {prompt} prompt + {new_tokens} new tokens, over the model's "
                              f"context length of {context_length}", rule="max_prompt_tokens")
        for invoke in run.invokes:
            _check_tensor_bytes(invoke, policy, f"the inputs of pass {index}", None)
    for node in graph.nodes:
        _check_node(node, policy)


def _check_scoped_store(options: Mapping[str, Any], policy: Policy) -> None:
    """An experiment sent through the gateway writes only under its user's stores (``store_scope``,
    set by the gateway), reaches a network store only where the policy lists it, and sets only the
    ``storage_options`` the policy lists."""
    store, scope = options.get("store"), options["store_scope"]
    if store is None:
        return
    user, allowed = scope["user"], list(scope["stores"])
    if not any(_within(store, prefix) for prefix in allowed):
        raise PolicyError(f"user {user!r} may write persisted saves only under {allowed} (the gateway's result "
                          f"store, per user, and the user's stores in keys.toml), not to {store!r}; pass a relative "
                          "name (store='run1') to write under the first", rule="store_scope", store=str(store))
    if not _is_local(store) and not (policy.stores is not None and policy.allows_store(store)):
        raise PolicyError(f"store {store!r} is a network store; experiments sent through the gateway reach one only "
                          "where this deployment's policy lists it (Policy.stores)", rule="stores", store=str(store))
    refused = sorted(set(options.get("storage_options") or {}) - set(policy.storage_options))
    if refused:
        raise PolicyError(f"storage_options {refused} are not open to experiments sent through the gateway on this "
                          f"deployment; its policy allows {list(policy.storage_options)} (Policy.storage_options)",
                          rule="storage_options")


def _check_node(node: Node, policy: Policy) -> None:
    where = node.location or "<graph>"
    what = f"{where}: {node.describe()}"
    if policy.weights == "deny" and node.kind in (Kind.MODULE_ATTR, Kind.MODULE_CALL):
        reason = ("reads a module's parameters or buffers" if node.kind == Kind.MODULE_ATTR
                  else "calls a module on inputs of the experiment's choosing (a probe of its weights)")
        raise PolicyError(f"{what} {reason}; this deployment's policy keeps weights on the shards "
                          "(weights='deny')", rule="weights", location=node.location, module=node.module)
    if node.module is not None and node.kind in Kind.MODULE_BOUND and not policy.allows_module(node.module):
        raise PolicyError(f"{what}: module {display_path(node.module)!r} is not open to experiments on this "
                          f"deployment; allowed modules: {list(policy.modules or ())}", rule="modules",
                          location=node.location, module=node.module)
    if not policy.gradients and node.kind in Kind.AUTOGRAD:
        raise PolicyError(f"{what}: gradients are turned off on this deployment (gradients=False)",
                          rule="gradients", location=node.location)
    _check_tensor_bytes([node.args, node.kwargs], policy, what, node.location)
    if node.kind == Kind.OP and node.target not in ("getattr", "call") and not node.deps():
        _check_constant_op(node, policy)


def _check_constant_op(node: Node, policy: Policy) -> None:
    """An operation on constants only (``torch.ones(2**40)``) is sized here already, so a client or
    the gateway refuses it before it is queued; the shards size every operation again as it runs."""
    try:
        cost = estimate(node.target or "", tuple(node.args), dict(node.kwargs))
    except Exception:  # arguments the operation itself would refuse: the shard reports them
        return
    if cost is not None:
        bounds = OpBounds(max_tensor_bytes=policy.max_tensor_bytes, max_op_work=policy.max_op_work,
                          max_op_items=policy.max_op_items)
        check_against(node.target or "", cost, bounds, node.location or f"node %{node.id}")


def _check_tensor_bytes(value: Any, policy: Policy, what: str, location: str | None) -> None:
    for leaf in leaves(value):
        if not isinstance(leaf, torch.Tensor):
            continue
        size = nbytes(leaf)
        if size > policy.max_tensor_bytes:
            raise PolicyError(f"{what} sends a tensor of {size} bytes; this deployment allows at most "
                              f"{policy.max_tensor_bytes} bytes per tensor", rule="max_tensor_bytes",
                              location=location)


def _prompt_length(invoke: Mapping[str, Any]) -> int:
    ids = invoke.get("input_ids")
    shape = getattr(ids, "shape", None)
    return int(shape[-1]) if shape is not None and len(shape) else 0


def _is_local(url: str) -> bool:
    return "::" not in url and ("://" not in url or url.startswith("file://"))


def _within(url: str, prefix: str) -> bool:
    if not _is_local(url) and any(part in (".", "..") for part in url.split("://", 1)[-1].split("/")):
        return False  # a network URL is compared as text: '..' in it could climb out of the prefix
    target, prefix = _canonical(url), _canonical(prefix)
    return target == prefix or target.startswith(prefix.rstrip("/") + "/")


def _canonical(url: str) -> str:
    """A store URL compared by prefix: local paths made absolute and resolved (no ``..`` or links)."""
    if "://" in url and not url.startswith("file://"):
        return url
    path = url.removeprefix("file://")
    return "file://" + os.path.realpath(os.path.expanduser(path))
