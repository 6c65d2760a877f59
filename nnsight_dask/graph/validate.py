"""Static checks of a graph before anything runs: structure, whitelist, module paths, inputs, limits.

The submitting client runs these before queueing a graph (to fail fast), and every shard runs them
again at the experiment's first stage there, with the worker's own limits (the cluster decides), so a
malformed or forbidden graph is refused with a message naming the node and field (and the user's
line) before it touches the model.

The rules, in the order they are checked:

- **Passes.** At least one; kind ``"trace"`` or ``"generate"``; at least one invoke. A trace takes
  no run options. A generation sets ``max_new_tokens`` (an integer from 1 to the server's limit) and
  only options of :data:`GENERATION_KWARGS` (remotely :data:`REMOTE_GENERATION_KWARGS`), each of its type.
- **Inputs.** Token inputs are ``input_ids`` (a 2-d int64/int32 tensor, at least one row and one
  token, ids in ``[0, vocab_size)``) and an optional ``attention_mask`` of the same shape holding 0
  and 1, every row with at least one token. Remote graphs and generations take token inputs only;
  other local inputs are ``{"args": [...], "kwargs": {...}}``. One pass does not mix the two.
- **Iterations.** Ids 0, 1, 2, ...; an existing pass; ``start >= 0``, ``stop`` null or ``>= start``, ``step >= 1``.
- **Nodes.** At most ``max_nodes``; ids 0, 1, 2, ...; fields of the right types; arguments nested at
  most ``max_nesting`` levels; references only to earlier nodes that have a value, of the same or an
  earlier pass, not from outside an iteration block into it; ``cond``, ``pass``, ``invoke`` and
  ``iteration`` in range; each kind's arity, keyword arguments, module, access and target:
  module paths of ``[A-Za-z0-9_.]`` segments not starting with ``_`` (and in ``module_paths``);
  ops in the whitelist (remotely: with a cost rule, see :mod:`.op_rules`), ``getattr`` and
  ``module_attr`` names public identifiers, no ``key=`` callables (:data:`~.ops.KEY_FUNCTIONS`, the
  table the run-time check reads too); local functions only locally; a written value a reference,
  tensor or number.
- **Totals.** Tensors sent along at most ``max_constant_bytes``; save names unique.
- **Changes in place (remote).** No node changes in place a value of an earlier pass (``x[i] = v``,
  ``x += v``, ``x.add_(v)``, ``l.append(v)`` on a value of an earlier trace of a session): each shard
  keeps its own copy of earlier passes' values, so such a change would reach only one of them.
"""
from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

import torch

from ..errors import ForbiddenOperationError, GraphValidationError
from .codec import MAX_NESTING
from .graph import InterventionGraph, Pass
from .node import (
    ACCESSES,
    HOOKED_CALL,
    Kind,
    Node,
    Ref,
    check_fields,
    display_path,
    field_error,
    short,
)
from .op_rules import REFUSED, rule_for
from .ops import KEY_FUNCTIONS, check_attribute_name, check_op_call, registry

PASS_KINDS = ("trace", "generate")
#: Sampling options: ``do_sample`` with ``temperature``, ``top_k``, ``top_p`` and the ``seed`` of the
#: draws (see ``execution/sampling.py``: the same seeded draw locally and on the shards).
SAMPLING_KWARGS = ("do_sample", "temperature", "top_k", "top_p", "seed")
#: Options a local generation may set (passed to ``model.generate``).
GENERATION_KWARGS = ("max_new_tokens", "min_new_tokens", "eos_token_id", "pad_token_id", *SAMPLING_KWARGS)
#: Options a remote generation may set: the shards decode until ``max_new_tokens`` or the model's own
#: end-of-sequence token, greedily or with the seeded sampler, so nothing else would be honoured.
REMOTE_GENERATION_KWARGS = ("max_new_tokens", *SAMPLING_KWARGS)
TOKEN_INPUTS = ("input_ids", "attention_mask")
MODULE_INPUTS = ("args", "kwargs")
#: Default bounds of :func:`validate_graph`.
DEFAULT_MAX_NODES = 20_000
DEFAULT_MAX_CONSTANT_BYTES = 256 << 20

#: How many arguments each kind takes (a tuple: any of those; kinds not listed: any number).
ARITY = {Kind.GETTER: 0, Kind.SETTER: 1, Kind.SKIP: 1, Kind.MODULE_ATTR: 0, Kind.GRAD: 1, Kind.GRAD_SETTER: 2,
         Kind.BACKWARD: 1, Kind.SAVE: 1, Kind.RESULT: 0, Kind.STOP: (0, 1)}
#: Keyword arguments each kind may take (kinds not listed: none; ``None``: any).
KWARGS = {Kind.OP: None, Kind.MODULE_CALL: None, Kind.APPLY: None, Kind.BACKWARD: ("grad_tensors", "retain_graph")}
#: Kinds whose node has a name in ``target`` (every other kind has none).
TARGETED = frozenset({Kind.OP, Kind.MODULE_ATTR, Kind.SAVE, Kind.APPLY})
#: Kinds whose node has no value: nothing may refer to them.
VALUELESS = frozenset({Kind.SETTER, Kind.GRAD_SETTER, Kind.SKIP, Kind.BACKWARD, Kind.LOG, Kind.STOP})
#: Operators that change their first argument in place.
CHANGING_OPERATORS = frozenset({"operator.setitem", "operator.delitem", "operator.iadd", "operator.isub",
                                "operator.imul", "operator.itruediv", "operator.ifloordiv", "operator.imod",
                                "operator.ipow", "operator.imatmul", "operator.iand", "operator.ior",
                                "operator.ixor", "operator.ilshift", "operator.irshift", "operator.iconcat"})
#: List and dict methods that change their object in place (called as ``call(getattr(x, name), ...)``).
CHANGING_METHODS = frozenset({"append", "extend", "insert", "pop", "remove", "clear", "sort", "reverse",
                              "update", "setdefault", "popitem"})

_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9_]*"
_MODULE_PATH = re.compile(rf"{_SEGMENT}(?:\.{_SEGMENT})*")
_PUBLIC_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_MAX_NAME = 256


def validate_graph(graph: InterventionGraph, *, module_paths: Collection[str] | None = None,
                   remote: bool = False, max_new_tokens: int | None = None,
                   max_constant_bytes: int | None = DEFAULT_MAX_CONSTANT_BYTES,
                   vocab_size: int | None = None, max_nodes: int | None = DEFAULT_MAX_NODES,
                   max_nesting: int = MAX_NESTING) -> None:
    """Raise :class:`GraphValidationError` (or :class:`ForbiddenOperationError`) on the first problem.

    The rules are listed in this module's docstring. Errors name the node (``node %3``) or pass and
    the field, and carry them as ``error.node`` / ``error.field``.

    Parameters
    ----------
    module_paths
        The model's module paths (``""`` for the root); ``None`` skips that check.
    remote
        The graph runs on shards: token inputs only, no local functions, greedy generation.
    max_new_tokens
        Longest generation allowed (``None``: no bound).
    max_constant_bytes
        Bytes of tensors the graph may carry (inputs and constants together; ``None``: no bound).
    vocab_size
        Token ids must lie in ``[0, vocab_size)`` (``None``: only ``>= 0``).
    max_nodes
        Most nodes a graph may have (``None``: no bound).
    max_nesting
        Most levels argument values may nest.
    """
    if max_nodes is not None and len(graph.nodes) > max_nodes:
        raise GraphValidationError(f"the graph has {len(graph.nodes)} nodes; the limit is {max_nodes}",
                                   field="nodes", nodes=len(graph.nodes), limit=max_nodes)
    if not graph.passes:
        raise GraphValidationError("the graph has no passes (no trace or generation to run the model on); a "
                                   "session without a trace runs only locally: add a trace to run it remotely",
                                   field="passes")
    budget = _Budget(max_constant_bytes)
    for index, run in enumerate(graph.passes):
        _check_pass(graph, index, run, budget, remote=remote, max_new_tokens=max_new_tokens, vocab_size=vocab_size,
                    max_nesting=max_nesting)
    _check_iterations(graph)
    ops = registry()
    for position, node in enumerate(graph.nodes):
        _check_node(graph, position, node, ops, budget, module_paths=module_paths, remote=remote,
                    max_nesting=max_nesting)
    seen: dict[str, int] = {}
    for node in graph.nodes:
        if node.kind != Kind.SAVE:
            continue
        if node.target in seen:
            raise field_error(node.id, "target", f"the save name {short(node.target)} is already used by node "
                              f"%{seen[node.target]}; save names must be unique")
        seen[node.target] = node.id  # type: ignore[index]
    if remote:
        _check_changes_stay_in_their_pass(graph)


# -- passes ---------------------------------------------------------------------------------------
class _Budget:
    """Bytes of tensors the graph carries, counted in order; refused where they pass the limit."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.total = 0

    def add(self, size: int, where: str, field: str, **fields: Any) -> None:
        self.total += size
        if self.limit is not None and self.total > self.limit:
            raise GraphValidationError(
                f"{where}, field {field!r}: with this the graph carries {self.total} bytes of tensors; the limit is "
                f"{self.limit}. Send smaller inputs or constants.", field=field, limit=self.limit, **fields)


def _check_pass(graph: InterventionGraph, index: int, run: Pass, budget: _Budget, *, remote: bool, max_new_tokens: int | None,
                vocab_size: int | None, max_nesting: int) -> None:
    """Check one pass and count the bytes of its input tensors."""
    where = f"pass {index}"
    if run.kind not in PASS_KINDS:
        raise _pass_error(index, "kind", f"unknown kind {short(run.kind)}; known: {PASS_KINDS}")
    if not isinstance(run.invokes, list) or not run.invokes:
        raise _pass_error(index, "invokes", "the pass has no inputs")
    if not isinstance(run.kwargs, dict):
        raise _pass_error(index, "kwargs", f"the run's options are a dict, got {short(run.kwargs)}")
    if run.kind == "trace" and run.kwargs:
        raise _pass_error(index, "kwargs", f"a trace takes no run options, got {short(sorted(map(str, run.kwargs)))}")
    if run.kind == "generate":
        _check_generation(index, run.kwargs, remote=remote, max_new_tokens=max_new_tokens, vocab_size=vocab_size)
    budget.add(_scan_value(run.kwargs, max_nesting, where, "kwargs", None)[0], where, "kwargs", pass_index=index)
    forms = set()
    for i, invoke in enumerate(run.invokes):
        field = f"invokes[{i}]"
        if not isinstance(invoke, dict) or not all(type(k) is str for k in invoke):
            raise _pass_error(index, field, f"an invoke's inputs are a dict with string keys, got {short(invoke)}")
        budget.add(_scan_value(invoke, max_nesting, where, field, None)[0], where, field, pass_index=index)
        if "input_ids" in invoke:
            forms.add("tokens")
            if isinstance(invoke["input_ids"], Ref):
                _check_earlier_input(graph, index, i, invoke)
            else:
                _check_tokens(index, i, invoke, vocab_size)
            continue
        forms.add("module")
        if remote or run.kind == "generate":
            who = "a remote experiment" if remote else "a generation"
            raise _pass_error(index, field, f"{who} takes token inputs: input_ids (and attention_mask), got keys "
                              f"{short(sorted(invoke))}")
        unknown = sorted(k for k in invoke if k not in MODULE_INPUTS)
        if unknown:
            raise _pass_error(index, f"{field}.{unknown[0]}", f"module inputs are {list(MODULE_INPUTS)}, got "
                              f"{short(unknown)}")
        if not isinstance(invoke.get("args", []), (list, tuple)):
            raise _pass_error(index, f"{field}.args", "positional inputs are a list")
        kwargs = invoke.get("kwargs", {})
        if not isinstance(kwargs, dict) or not all(type(k) is str for k in kwargs):
            raise _pass_error(index, f"{field}.kwargs", "keyword inputs are a dict with string keys")
    if len(forms) > 1:
        raise _pass_error(index, "invokes", "the invokes of one pass mix token inputs and module inputs")


def check_sampling(kwargs: dict[str, Any], index: int = 0) -> None:
    """Sampling options of pass ``index``: each of its type and range; a sampling generation carries
    its seed. Also called by the sampler itself, so a local run refuses what a server would."""
    checks = {
        "temperature": (lambda v: type(v) in (int, float) and 0 < v <= 1e4, "a number > 0"),
        "top_k": (lambda v: type(v) is int and v >= 0, "an integer >= 0 (0: no top-k)"),
        "top_p": (lambda v: type(v) in (int, float) and 0 < v <= 1, "a number in (0, 1]"),
        "seed": (lambda v: type(v) is int and 0 <= v < 2**63, "an integer in [0, 2**63)"),
    }
    for name, (ok, what) in checks.items():
        value = kwargs.get(name)
        if value is not None and not ok(value):
            raise _pass_error(index, f"kwargs.{name}", f"{name} must be {what}, got {short(value)}")
    if kwargs.get("do_sample") and kwargs.get("seed") is None:
        raise _pass_error(index, "kwargs.seed", "a sampling generation carries the seed of its draws (seed=)")


def _check_generation(index: int, kwargs: dict[str, Any], *, remote: bool, max_new_tokens: int | None,
                      vocab_size: int | None) -> None:
    allowed = REMOTE_GENERATION_KWARGS if remote else GENERATION_KWARGS
    for name in kwargs:
        if name not in allowed:
            where = "remote generation (the shards decode greedily)" if remote else "generation"
            raise _pass_error(index, f"kwargs.{short(name)}", f"option {short(name)} is not allowed in a {where}; "
                              f"allowed: {list(allowed)}")
    steps = kwargs.get("max_new_tokens")
    if steps is None:
        raise _pass_error(index, "kwargs.max_new_tokens", "a generation must set max_new_tokens")
    if type(steps) is not int or steps < 1:
        raise _pass_error(index, "kwargs.max_new_tokens", f"max_new_tokens must be an integer >= 1, got {short(steps)}")
    if max_new_tokens is not None and steps > max_new_tokens:
        raise _pass_error(index, "kwargs.max_new_tokens",
                          f"pass {index} asks for max_new_tokens={steps}; this server allows at most {max_new_tokens}",
                          plain=True)
    least = kwargs.get("min_new_tokens")
    if least is not None and (type(least) is not int or not 0 <= least <= steps):
        raise _pass_error(index, "kwargs.min_new_tokens",
                          f"min_new_tokens must be an integer from 0 to max_new_tokens={steps}, got {short(least)}")
    sample = kwargs.get("do_sample")
    if sample is not None and type(sample) is not bool:
        raise _pass_error(index, "kwargs.do_sample", f"do_sample must be true or false, got {short(sample)}")
    check_sampling(kwargs, index)
    for name in ("eos_token_id", "pad_token_id"):
        value = kwargs.get(name)
        if value is None:
            continue
        ids = value if name == "eos_token_id" and type(value) is list and value else [value]
        for token in ids:
            if type(token) is not int or token < 0 or (vocab_size is not None and token >= vocab_size):
                span = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
                kind = "a token id or a non-empty list of token ids" if name == "eos_token_id" else "a token id"
                raise _pass_error(index, f"kwargs.{name}", f"{name} must be {kind} {span}, got {short(value)}")


def _check_earlier_input(graph: InterventionGraph, index: int, position: int, invoke: dict[str, Any]) -> None:
    """A trace's input that is a value of an earlier trace of the session (``{"input_ids": ref}``):
    the reference must name a valued node of an earlier pass, outside any iteration block. What the
    value is (integer token ids, within the vocabulary and the prompt bound) is checked when the pass
    starts, by whoever runs it (:func:`nnsight_dask.execution.batching.resolve_inputs`)."""
    field = f"invokes[{position}].input_ids"
    if set(invoke) != {"input_ids"}:
        raise _pass_error(index, f"invokes[{position}]", "an input taken from an earlier trace is input_ids alone "
                          f"(the attention mask is all ones), got keys {short(sorted(invoke))}")
    ref = invoke["input_ids"].id
    if type(ref) is not int or not 0 <= ref < len(graph.nodes):
        raise _pass_error(index, field, f"refers to {short(ref)}, a node that does not exist")
    source = graph.nodes[ref]
    if source.pass_index >= index:
        raise _pass_error(index, field, f"refers to %{ref} of pass {source.pass_index}: a trace's input must be a "
                          "value of an earlier trace")
    if source.kind in VALUELESS or source.iteration is not None:
        what = f"a {source.kind} node, which has no value" if source.kind in VALUELESS else \
            "a value of an iteration block (one per step)"
        raise _pass_error(index, field, f"refers to %{ref}, {what}")


def _check_tokens(index: int, position: int, invoke: dict[str, Any], vocab_size: int | None) -> None:
    field = f"invokes[{position}]"
    unknown = sorted(k for k in invoke if k not in TOKEN_INPUTS)
    if unknown:
        raise _pass_error(index, f"{field}.{unknown[0]}",
                          f"token inputs are {list(TOKEN_INPUTS)}, got {short(unknown)}")
    ids = invoke["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
        got = f"a {ids.dtype} tensor" if isinstance(ids, torch.Tensor) else short(ids)
        raise _pass_error(index, f"{field}.input_ids", f"input_ids must be an int64 or int32 tensor, got {got}")
    if ids.dim() != 2:
        raise _pass_error(index, f"{field}.input_ids",
                          f"input_ids must be 2-d [rows, tokens], got shape {list(ids.shape)}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise _pass_error(index, f"{field}.input_ids", f"the prompt is empty (input_ids of shape {list(ids.shape)})")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        bad = low if low < 0 else high
        span = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
        raise _pass_error(index, f"{field}.input_ids", f"token id {bad} is outside the vocabulary {span}")
    mask = invoke.get("attention_mask")
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype not in (torch.int64, torch.int32, torch.bool):
        got = f"a {mask.dtype} tensor" if isinstance(mask, torch.Tensor) else short(mask)
        raise _pass_error(index, f"{field}.attention_mask", f"attention_mask must be an int64, int32 or bool "
                          f"tensor, got {got}")
    if mask.shape != ids.shape:
        raise _pass_error(index, f"{field}.attention_mask", f"attention_mask has shape {list(mask.shape)}; "
                          f"input_ids has {list(ids.shape)}")
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise _pass_error(index, f"{field}.attention_mask", "attention_mask must hold only 0 and 1")
    empty = (~mask.bool().any(dim=1)).nonzero()
    if len(empty):
        raise _pass_error(index, f"{field}.attention_mask",
                          f"row {int(empty[0, 0])} of the prompt is empty (its attention_mask is all 0)")


def _pass_error(index: int, field: str, problem: str, *, plain: bool = False) -> GraphValidationError:
    message = problem if plain else f"pass {index}, field {field!r}: {problem}"
    return GraphValidationError(message, pass_index=index, field=field)


def _check_iterations(graph: InterventionGraph) -> None:
    for position, it in enumerate(graph.iterations):
        field = f"iterations[{position}]"
        for name in ("id", "pass_index", "start", "stop", "step"):
            value = getattr(it, name)
            if type(value) is not int and not (name == "stop" and value is None):
                raise _iteration_error(field, f"{name} must be an integer, got {short(value)}")
        if it.id != position:
            raise _iteration_error(field, f"iteration at position {position} has id {it.id}; ids must be 0, 1, 2, ...")
        if not 0 <= it.pass_index < len(graph.passes):
            raise _iteration_error(field, f"pass {it.pass_index} does not exist (the graph has {len(graph.passes)})")
        if it.start < 0 or it.step < 1 or (it.stop is not None and it.stop < it.start):
            raise _iteration_error(field, f"steps range({it.start}, {it.stop}, {it.step}) must have start >= 0, "
                                   "stop >= start (or null) and step >= 1")


def _iteration_error(field: str, problem: str) -> GraphValidationError:
    return GraphValidationError(f"graph field {field!r}: {problem}", field=field)


# -- nodes ----------------------------------------------------------------------------------------
def _check_node(graph: InterventionGraph, position: int, node: Node, ops: Any, budget: _Budget, *,
                module_paths: Collection[str] | None, remote: bool, max_nesting: int) -> None:
    """Check one node and count the bytes of its constant tensors."""
    if not isinstance(node, Node) or type(node.id) is not int or node.id != position:
        got = short(node.id) if isinstance(node, Node) else type(node).__name__
        raise field_error(position, "id", f"node at position {position} has id {got}; ids must be 0, 1, 2, ...")
    if node.kind not in Kind.ALL:
        raise field_error(position, "kind", f"unknown kind {short(node.kind)}; known: {sorted(Kind.ALL)}")
    check_fields(node)
    _check_names(node, module_paths)
    where = _where(node)
    if not isinstance(node.args, tuple) or not isinstance(node.kwargs, dict):
        raise field_error(node.id, "args", "args must be a tuple and kwargs a dict")
    size, refs = _scan_value(node.args, max_nesting, f"node %{node.id}", "args", node.id, depth=-1)
    budget.add(size, f"node %{node.id}", "args", node=node.id)
    size, kw_refs = _scan_value(node.kwargs, max_nesting, f"node %{node.id}", "kwargs", node.id, depth=-1)
    budget.add(size, f"node %{node.id}", "kwargs", node=node.id)
    for field, found in (("args", refs), ("kwargs", kw_refs), ("cond", [node.cond] if node.cond is not None else [])):
        for dep in found:
            _check_ref(graph, node, dep, field, where)
    if not 0 <= node.pass_index < len(graph.passes):
        raise field_error(node.id, "pass", f"{where} belongs to pass {node.pass_index}, which does not exist")
    invokes = len(graph.passes[node.pass_index].invokes)
    if node.invoke is not None and not 0 <= node.invoke < invokes:
        raise field_error(node.id, "invoke", f"{where} names invoke {node.invoke}; its pass has {invokes} invoke(s)")
    if node.iteration is not None:
        its = graph.iterations
        if not 0 <= node.iteration < len(its) or its[node.iteration].pass_index != node.pass_index:
            raise field_error(node.id, "iteration",
                              f"{where} names iteration {node.iteration}, which is not in its pass")
    if node.call < 0:
        raise field_error(node.id, "call", f"{where} names call {node.call}; calls count from 0")
    _check_kind(graph, node, ops, where, remote)


def _where(node: Node) -> str:
    """What the node is and the user's line: ``operation Tensor.sum (at steer.py:12)``."""
    at = f" (at {short(node.location, 120)[1:-1]})" if node.location else ""
    return f"{short(node.describe(), 120)}{at}"


def _check_names(node: Node, module_paths: Collection[str] | None) -> None:
    """Module path, access and target, before they appear in any message."""
    kind = node.kind
    if kind in Kind.MODULE_BOUND:
        path = node.module
        if path is None:
            raise field_error(node.id, "module", f"a {kind} node must name a module")
        if path and (len(path) > 1024 or not _MODULE_PATH.fullmatch(path)):
            raise field_error(node.id, "module",
                              f"module path {short(path)} must be dotted names of letters, digits and '_' that do "
                              "not start with '_' (no private or dunder names)", ForbiddenOperationError)
        if module_paths is not None and path not in module_paths:
            raise field_error(node.id, "module", f"the model has no module {display_path(path)!r}",
                              module=path, location=node.location)
    elif node.module is not None:
        raise field_error(node.id, "module", f"a {kind} node is not bound to a module, got {short(node.module)}")
    if kind in (Kind.GETTER, Kind.SETTER):
        if node.access not in ACCESSES:
            raise field_error(node.id, "access", f"unknown access {short(node.access)}; known: {list(ACCESSES)}")
    elif kind == Kind.MODULE_CALL:
        if node.access not in (None, HOOKED_CALL):
            raise field_error(node.id, "access", f"a module call's access is {HOOKED_CALL!r} (hooks live) or none, "
                              f"got {short(node.access)}")
    elif node.access is not None:
        raise field_error(node.id, "access", f"a {kind} node has no access, got {short(node.access)}")
    if kind in TARGETED:
        if not node.target or len(node.target) > _MAX_NAME:
            raise field_error(node.id, "target", f"a {kind} node needs a name of 1 to {_MAX_NAME} characters")
        if kind == Kind.MODULE_ATTR and not _PUBLIC_NAME.fullmatch(node.target):
            raise field_error(node.id, "target", f"module attributes must be public (got {short(node.target)})",
                              ForbiddenOperationError, location=node.location)
        if kind == Kind.MODULE_ATTR:
            try:
                check_attribute_name(node.target)
            except ForbiddenOperationError as exc:
                raise field_error(node.id, "target", str(exc), ForbiddenOperationError,
                                  location=node.location) from None
    elif node.target is not None:
        raise field_error(node.id, "target", f"a {kind} node has no target, got {short(node.target)}")


def _check_ref(graph: InterventionGraph, node: Node, dep: Any, field: str, where: str) -> None:
    if type(dep) is not int:
        raise field_error(node.id, field, f"{where} refers to {short(dep)}; references are node ids")
    if dep == node.id:
        raise field_error(node.id, field, f"{where} refers to itself; a node may only use values of earlier nodes")
    if not 0 <= dep < node.id:
        what = "a later node" if 0 <= dep < len(graph.nodes) else "a node that does not exist"
        raise field_error(node.id, field, f"{where} refers to %{dep}, {what}; a node may only use values of "
                          "earlier nodes")
    source = graph.nodes[dep]
    if source.kind in VALUELESS:
        raise field_error(node.id, field, f"{where} refers to %{dep}, a {source.kind} node, which has no value")
    if source.pass_index > node.pass_index:
        raise field_error(node.id, field, f"{where} refers to %{dep} of pass {source.pass_index}, which runs later")
    if source.iteration is not None and node.iteration is None:
        raise field_error(node.id, field, f"{where} uses %{dep} from an iteration block outside the block; save "
                          "it inside the block instead")


def _check_kind(graph: InterventionGraph, node: Node, ops: Any, where: str, remote: bool) -> None:
    kind, args = node.kind, node.args
    arity = ARITY.get(kind)
    counts = arity if isinstance(arity, tuple) else (arity,)
    if arity is not None and len(args) not in counts:
        need = "needs an argument" if counts == (1,) else f"takes {' or '.join(map(str, counts))} argument(s)"
        raise field_error(node.id, "args", f"{where} {need}, got {len(args)}")
    allowed = KWARGS.get(kind, ())
    if allowed is not None and any(k not in allowed for k in node.kwargs):
        raise field_error(node.id, "kwargs", f"{where} takes no keyword argument(s) {short(sorted(node.kwargs))}"
                          + (f"; allowed: {list(allowed)}" if allowed else ""))
    if (kind in Kind.AUTOGRAD or kind == Kind.STOP) and args and not isinstance(args[0], Ref):
        raise field_error(node.id, "args", f"{where} must refer to a traced tensor")
    if kind in (Kind.SETTER, Kind.SKIP, Kind.GRAD_SETTER):
        _check_written_value(node, args[-1], where)
    if kind == Kind.OP:
        target = node.target
        if target not in ops:
            at = f" (at {short(node.location, 120)[1:-1]})" if node.location else ""
            raise field_error(node.id, "target", f"operation {short(target)}{at} is not in the operation whitelist",
                              ForbiddenOperationError, op=target, location=node.location)
        if target == "getattr" and (len(args) != 2 or not isinstance(args[1], str)
                                    or not _PUBLIC_NAME.fullmatch(args[1])):
            raise field_error(node.id, "args", f"{where}: getattr must name a public attribute",
                              ForbiddenOperationError, location=node.location)
        if node.kwargs.get("key") is not None and _calls_with_key(graph, node):
            raise field_error(node.id, "kwargs", f"{where}: key= would call a function; graphs call none",
                              ForbiddenOperationError, location=node.location)
        rule = rule_for(target) if remote and target not in ("getattr", "call") else None
        if remote and target not in ("getattr", "call") and (rule is None or rule.kind == REFUSED):
            reason = rule.reason if rule is not None else "it has no cost rule"
            raise field_error(node.id, "target", f"{where}: {target} is refused on a shared deployment: {reason}. "
                              "Run it locally (nd.apply) or with other operations", ForbiddenOperationError,
                              op=target, location=node.location)
        try:  # the shard's own rules (denied families, out=, callables, never-data attributes)
            check_op_call(target, args, node.kwargs)
        except ForbiddenOperationError as exc:
            raise field_error(node.id, "target", f"{where}: {exc}", ForbiddenOperationError,
                              op=target, location=node.location) from None
    if kind == Kind.APPLY and (remote or node.id not in graph.local_functions):
        raise field_error(
            node.id, "kind", f"{where} calls the local Python function {short(node.target)} through nd.apply; graphs "
            "with local functions run only locally. Rewrite it with torch operations to run it remotely.",
            ForbiddenOperationError, function=node.target, location=node.location)


def _calls_with_key(graph: InterventionGraph, node: Node) -> bool:
    """Whether ``node`` calls an operation of :data:`~.ops.KEY_FUNCTIONS` (``sorted``, or the ``sort``
    method read with ``getattr``): its ``key=`` would be called."""
    if node.target in KEY_FUNCTIONS:
        return True
    if node.target != "call" or not node.args or not isinstance(node.args[0], Ref):
        return False
    method = graph.nodes[node.args[0].id]
    methods = {name.rpartition(".")[2] for name in KEY_FUNCTIONS if not name.startswith("builtins.")}
    return method.kind == Kind.OP and method.target == "getattr" and len(method.args) == 2 \
        and method.args[1] in methods


def _changed_value(graph: InterventionGraph, node: Node) -> int | None:
    """The id of the node whose value ``node`` changes in place, or None."""
    if node.kind != Kind.OP or not node.args or not isinstance(node.args[0], Ref):
        return None
    target, first = node.target or "", node.args[0].id
    if target in CHANGING_OPERATORS or (target.startswith("Tensor.") and target.endswith("_")
                                        and not target.endswith("__")):
        return first
    if target == "call":
        method = graph.nodes[first]
        if (method.kind == Kind.OP and method.target == "getattr" and len(method.args) == 2
                and isinstance(method.args[0], Ref) and method.args[1] in CHANGING_METHODS):
            return method.args[0].id
    return None


def _check_changes_stay_in_their_pass(graph: InterventionGraph) -> None:
    """Remotely a value of an earlier pass is only read: each shard holds its own copy of it (values
    travel between shards as copies), so a later pass changing it in place would change one copy."""
    for node in graph.nodes:
        changed = _changed_value(graph, node)
        if changed is None or graph.nodes[changed].pass_index >= node.pass_index:
            continue
        source = graph.nodes[changed]
        at = f" at {short(source.location, 120)[1:-1]}" if source.location else ""
        raise field_error(
            node.id, "args", f"{_where(node)} changes in place {short(source.describe(), 120)[1:-1]} (%{source.id}{at}), "
            f"a value of an earlier trace (pass {source.pass_index}); remotely each shard keeps its own copy of "
            "earlier traces' values, so the change would be lost. Make a new value instead, or save a value "
            "in each trace and combine them after the session", location=node.location)


def _check_written_value(node: Node, value: Any, where: str) -> None:
    """What a node writes into the model: a traced value or a tensor; a number where it fills the value
    it replaces (setters, gradient setters); ``(args, kwargs)`` for a module's inputs."""
    if isinstance(value, (Ref, torch.Tensor)):
        return
    if node.kind != Kind.SKIP and type(value) in (int, float, bool):
        return
    if node.kind == Kind.SETTER and node.access == "inputs" and type(value) in (tuple, list) and len(value) == 2 \
            and type(value[0]) in (tuple, list) and type(value[1]) is dict:
        return
    raise field_error(node.id, "args", f"{where} writes {short(value)}; a written value is a traced value or a "
                      f"tensor{'' if node.kind == Kind.SKIP else ' or a number'}")


def _scan_value(value: Any, max_nesting: int, where: str, field: str, node_id: int | None,
                depth: int = 0) -> tuple[int, list[int]]:
    """Bytes of the tensors in ``value`` and the node ids it refers to; refuses containers (tuples,
    lists, dicts, slices; ``torch.Size`` is a leaf) at depth ``max_nesting`` or deeper, as the decoder does.

    Walks with an explicit stack, so no value, however deep or cyclic, can exhaust Python's recursion.
    """
    total, refs = 0, []
    stack: list[tuple[Any, int]] = [(value, depth)]
    while stack:
        item, level = stack.pop()
        kind = type(item)
        if kind in (tuple, list, dict, slice):
            if level >= max_nesting:
                raise GraphValidationError(f"{where}, field {field!r}: arguments nest more than {max_nesting} "
                                           "levels deep", node=node_id, field=field)
            if kind is dict:
                children: Any = item.values()
            elif kind is slice:
                children = (item.start, item.stop, item.step)
            else:
                children = item
            stack.extend((child, level + 1) for child in children)
        elif kind is Ref:
            refs.append(item.id)
        elif isinstance(item, torch.Tensor):
            total += item.numel() * item.element_size()
    return total, refs
