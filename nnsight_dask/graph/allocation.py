"""Bounds on what one operation, and one experiment, may cost on a shared shard, checked before it runs.

A shared shard must refuse ``torch.ones(1 << 40)`` before the allocator is asked, not after the worker
was killed for it, and ``sum(range(2_000_000_000))`` before it holds the shard for a minute: an
operation cannot be interrupted once it runs, so a cancelled experiment would keep the shard until it
returned. Every whitelisted operation has a cost rule (:mod:`.op_rules`); :class:`OpBounds` are a
deployment's limits on one operation (bytes of the largest tensor it makes, tensor work, Python items)
and on one experiment (bytes its nodes hold at once); :class:`ExperimentBudget` applies them to one
experiment as its nodes run, and names the rule, the operation and the user's line when it refuses.

>>> predicted_bytes("torch.ones", (1 << 20, 1 << 20), {})  # float32: 4 TiB, never allocated
4398046511104
"""
from __future__ import annotations

import math
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ForbiddenOperationError, PolicyError
from . import shapes as S
from .estimates import ELEMENT, LAUNCH, Cost
from .op_rules import REFUSED, estimate, rule_for


@dataclass(frozen=True)
class OpBounds:
    """A deployment's bounds on one operation and one experiment (``None``: no bound).

    ``work_rate`` and ``item_rate`` are what the shard measured (work units and Python items per
    second, see :func:`measured_rates`); they only turn counts into seconds in messages.
    """

    max_tensor_bytes: int | None = None
    max_op_work: float | None = None
    max_op_items: int | None = None
    max_experiment_bytes: int | None = None
    work_rate: float | None = None
    item_rate: float | None = None


def predicted_bytes(name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> int | None:
    """Bytes of the largest tensor (or Python object) op ``name`` would make with these arguments;
    None for an operation without an estimate."""
    cost = estimate(name, tuple(args), dict(kwargs))
    return None if cost is None else cost.bytes


def check_allocation(name: str, args: Sequence[Any], kwargs: dict[str, Any], limit: int | None,
                     where: str) -> None:
    """Refuse op ``name`` when its result would exceed ``limit`` bytes (the policy's ``max_tensor_bytes``)."""
    check_cost(name, args, kwargs, OpBounds(max_tensor_bytes=limit), where)


def check_cost(name: str, args: Sequence[Any], kwargs: dict[str, Any], bounds: OpBounds, where: str) -> Cost:
    """The cost of op ``name`` on these arguments, refused (:class:`PolicyError` naming the rule, or
    :class:`ForbiddenOperationError` for an operation without a rule) when over ``bounds``."""
    rule = rule_for(name)
    if rule is None or rule.kind == REFUSED:
        reason = rule.reason if rule is not None else "it has no cost rule"
        raise ForbiddenOperationError(
            f"{where}: {name} is refused on a shared deployment: {reason}. Run it locally (nd.apply) or "
            "with other operations", op=name, rule="op_rules", location=where)
    cost = estimate(name, tuple(args), dict(kwargs)) or Cost()
    check_against(name, cost, bounds, where)
    return cost


def check_against(name: str, cost: Cost, bounds: OpBounds, where: str) -> None:
    """Refuse ``cost`` of op ``name`` where it is over one of ``bounds``."""
    limit = bounds.max_tensor_bytes
    if limit is not None and cost.bytes > limit:
        raise PolicyError(f"{where}: {name} would make a tensor of {cost.bytes:,} bytes; this deployment allows at "
                          f"most {limit:,} bytes per tensor (max_tensor_bytes)", rule="max_tensor_bytes", op=name,
                          bytes=cost.bytes, location=where)
    work = bounds.max_op_work
    if work is not None and cost.work > work:
        raise PolicyError(
            f"{where}: {name} would do about {cost.work:.3g} units of work{_seconds(cost.work, bounds.work_rate)}; "
            f"this deployment allows at most {work:.3g} per operation (max_op_work, one unit is a floating-point "
            "operation of a matrix product), because a running operation holds the shard for every other user "
            "until it returns. Split it into smaller operations (fewer positions, rows or columns at a time)",
            rule="max_op_work", op=name, work=cost.work, location=where)
    items = bounds.max_op_items
    if items is not None and cost.items > items:
        raise PolicyError(
            f"{where}: {name} would walk {cost.items:,} Python items{_seconds(cost.items, bounds.item_rate)}; this "
            f"deployment allows at most {items:,} per operation (max_op_items), because a running operation holds "
            "the shard for every other user until it returns. Use tensor operations (torch.arange(n).sum() "
            "instead of sum(range(n))) or fewer items", rule="max_op_items", op=name, items=cost.items,
            location=where)


def _seconds(count: float, rate: float | None) -> str:
    return f" (about {count / rate:.2g} s on this shard)" if rate else ""


# -- one experiment ---------------------------------------------------------------------------------------
class ExperimentBudget:
    """One experiment's bounds, and the bytes its nodes hold now.

    :meth:`check_op` runs before each operation (its cost against :class:`OpBounds`, and the bytes it
    would make on top of those held against ``max_experiment_bytes``); :meth:`account` after it, counting
    the new tensors of its value (storages that none of its inputs had) until they are freed, and the
    estimated bytes of new Python containers. Shared by every pass and stage of the experiment on a shard.
    """

    def __init__(self, bounds: OpBounds) -> None:
        self.bounds = bounds
        #: Bytes held by values the experiment's nodes made (tensors until freed, containers for good).
        self.held = 0
        #: Work of operations whose values take part in autograd: a backward does about twice it again.
        self.differentiable_work = 0.0
        self._storages: dict[tuple[str, int], int] = {}

    def check_op(self, name: str, args: Sequence[Any], kwargs: dict[str, Any], where: str) -> Cost:
        cost = check_cost(name, args, kwargs, self.bounds, where)
        self.check_bytes(name, cost.bytes, where)
        return cost

    def check_bytes(self, name: str, size: int, where: str) -> None:
        limit = self.bounds.max_experiment_bytes
        if limit is not None and self.held + size > limit:
            raise PolicyError(
                f"{where}: {name} would make {size:,} bytes while this experiment's values already hold "
                f"{self.held:,}; this deployment allows one experiment at most {limit:,} bytes at once "
                "(max_experiment_bytes, a share of the worker's memory). Save or reduce fewer, smaller values",
                rule="max_experiment_bytes", op=name, bytes=size, held=self.held, location=where)

    def check_module_call(self, module: torch.nn.Module, args: Sequence[Any], kwargs: dict[str, Any],
                          where: str) -> Cost:
        """A graph's call of a model module (``lm.lm_head(x)``) on inputs of its choosing."""
        cost = module_call_cost(module, args, kwargs)
        check_against("a module call", cost, self.bounds, where)
        self.check_bytes("a module call", cost.bytes, where)
        return cost

    def check_copy(self, value: Any, name: str, where: str) -> None:
        """A module attribute about to be copied for the graph (``lm.lm_head.weight``)."""
        size = sum(t.numel() * t.element_size() for t in S.tensors(value, depth=3))
        what = f"a copy of {name}"
        check_against(what, Cost(size, size // 4 * ELEMENT, 0), self.bounds, where)
        self.check_bytes(what, size, where)

    def check_backward(self, where: str) -> None:
        """A backward runs the graph's differentiable operations again, about twice their work, at once."""
        cost = Cost(0, 2 * self.differentiable_work, 0)
        check_against("backward()", cost, OpBounds(max_op_work=self.bounds.max_op_work,
                                                   work_rate=self.bounds.work_rate), where)

    def account(self, value: Any, inputs: Any, cost: Cost) -> None:
        """Count what an operation made: tensors whose storage none of ``inputs`` had (until freed), or,
        for a value without tensors, the estimated bytes of a new container."""
        made = S.tensors(value, depth=3, limit=_WALK)
        if not made:
            if isinstance(value, (list, tuple, dict, str, int)) and cost.bytes:
                self.held += cost.bytes
            return
        known = {_storage_key(t) for t in S.tensors(inputs, depth=3, limit=_WALK)}
        for tensor in made:
            key = _storage_key(tensor)
            if key in known or key in self._storages:
                continue
            size = tensor.untyped_storage().nbytes()
            self._storages[key] = size
            self.held += size
            weakref.finalize(tensor, self._release, key)
        if any(t.requires_grad for t in made):
            self.differentiable_work += cost.work

    def _release(self, key: tuple[str, int]) -> None:
        size = self._storages.pop(key, 0)
        self.held -= size


#: Items :meth:`ExperimentBudget.account` looks at in a value and its inputs: new storages come in small
#: containers (a big Python list of tensors holds views of one: ``list(t)``, ``t.unbind()``).
_WALK = 4096


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    try:
        return str(tensor.device), tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (meta, fake): never counted twice
        return "none", id(tensor)


# -- calls of model modules -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _ModuleShape:
    dense_params: int
    embedding_dims: int
    attention_layers: int
    head_dim: int
    widest_output: int


_MODULE_SHAPES: weakref.WeakKeyDictionary[torch.nn.Module, _ModuleShape] = weakref.WeakKeyDictionary()


def _module_shape(module: torch.nn.Module) -> _ModuleShape:
    shape = _MODULE_SHAPES.get(module)
    if shape is None:
        dense, embedding, attention, head_dim, widest = 0, 0, 0, 64, 1
        for sub in module.modules():
            if isinstance(sub, torch.nn.Embedding):
                embedding += sub.embedding_dim
                widest = max(widest, sub.embedding_dim)
                continue
            dense += sum(p.numel() for p in sub.parameters(recurse=False))
            if isinstance(sub, torch.nn.Linear):
                widest = max(widest, sub.out_features)
            if type(sub).__name__.endswith("Attention"):
                attention += 1
                head_dim = int(getattr(sub, "head_dim", head_dim) or head_dim)
        shape = _MODULE_SHAPES[module] = _ModuleShape(dense, embedding, attention, max(head_dim, 1), widest)
    return shape


def module_call_cost(module: torch.nn.Module, args: Sequence[Any], kwargs: dict[str, Any]) -> Cost:
    """What calling ``module`` on these inputs costs: every weight once per row (``2 * params * rows``),
    an embedding row per token, and each attention layer's scores (``seq^2`` per row of heads)."""
    x = S.first_tensor(tuple(args), kwargs, "hidden_states", "input_ids", "inputs_embeds", "input")
    if x is None:
        return Cost(0, LAUNCH, 0)
    shape = _module_shape(module)
    floating = x.is_floating_point()
    hidden = x.shape[-1] if floating and x.dim() else 1
    rows = x.numel() // max(hidden, 1)
    seq = (x.shape[-2] if floating else x.shape[-1]) if x.dim() >= (2 if floating else 1) else 1
    batch = rows // max(seq, 1)
    width = hidden if floating else max(shape.embedding_dims, 1)
    heads = max(width // shape.head_dim, 1)
    size = max(x.element_size(), 4)
    made = rows * max(shape.widest_output, width) * size
    scores = batch * heads * seq * seq * size if shape.attention_layers else 0
    work = (2.0 * shape.dense_params * rows + rows * shape.embedding_dims * ELEMENT
            + shape.attention_layers * 4.0 * batch * seq * seq * width + LAUNCH)
    return Cost(max(made, scores), work, 0)


# -- what this process can do in a second ---------------------------------------------------------------
_RATES: dict[tuple[str, str], tuple[float, float]] = {}


def measured_rates(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """``(work units, Python items)`` this process does per second on ``device`` in ``dtype``: the best
    of a few matrix products (work) and of a few ``sum(range(...))`` (items). Measured once (~50 ms)."""
    key = (str(device), str(dtype))
    rates = _RATES.get(key)
    if rates is None:
        device = torch.device(device)
        dtype = dtype if dtype.is_floating_point else torch.float32
        n = 256 if device.type == "cpu" else 2048
        a = torch.ones(n, n, device=device, dtype=dtype)
        best = math.inf
        for _ in range(4):
            started = time.perf_counter()
            (a @ a).sum().item()
            best = min(best, time.perf_counter() - started)
        work_rate = 2 * n ** 3 / max(best, 1e-9)
        best = math.inf
        for _ in range(3):
            started = time.perf_counter()
            sum(range(200_000))
            best = min(best, time.perf_counter() - started)
        rates = _RATES[key] = (work_rate, 200_000 / max(best, 1e-9))
    return rates
