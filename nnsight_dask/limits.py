"""What a graph may ask of a shared deployment: the deployment's policy and the checking process's settings.

Three processes check graphs with it, so it sits at the top of the package, with ``config``: the
submitting client calls :func:`check_graph` to fail fast, the HTTP gateway decodes (:func:`decode_graph`)
and checks what users send before it queues it, and every shard checks again at an experiment's first
stage there and calls :func:`check_inline_size` before returning results, with the deployment's
:class:`~nnsight_dask.graph.policy.Policy` and the worker's own ``nnsight-dask.*`` settings (the
stricter of the two wins), so a limit a client raises for itself widens nothing. The bounds a shard
puts on each operation depend on its worker's device and memory: :mod:`nnsight_dask.worker.op_bounds`.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from . import config
from .errors import ExperimentFailedError
from .graph.graph import InterventionGraph
from .graph.policy import Policy, check_policy
from .graph.validate import DEFAULT_MAX_NODES, validate_graph
from .tensors import nbytes


def check_graph(graph: InterventionGraph, module_paths: Collection[str] | None = None, *,
                policy: Policy | None = None, context_length: int | None = None,
                vocab_size: int | None = None) -> None:
    """Refuse a graph before it runs: malformed, forbidden op, local-only function, over a limit or
    outside the deployment's policy (``context_length``: the model's, bounding prompt + new tokens;
    ``vocab_size``: token ids must be below it)."""
    policy = policy or Policy()
    validate_graph(graph, module_paths=module_paths, remote=True, max_new_tokens=config.max_new_tokens_limit,
                   max_constant_bytes=config.max_inline_result_bytes, vocab_size=vocab_size)
    check_policy(graph, policy, context_length=context_length)


def decode_graph(graph: str | Mapping[str, Any]) -> InterventionGraph:
    """Decode a graph from anyone (its JSON text, or that text already parsed), refusing oversized
    constants and too many nodes before they are decoded."""
    limit = config.max_inline_result_bytes
    if isinstance(graph, str):
        return InterventionGraph.from_json(graph, max_constant_bytes=limit, max_nodes=DEFAULT_MAX_NODES)
    return InterventionGraph.from_dict(dict(graph), max_constant_bytes=limit, max_nodes=DEFAULT_MAX_NODES)


def check_inline_size(results: Mapping[str, Any], options: Mapping[str, Any], policy: Policy | None = None) -> None:
    """Refuse results whose inline tensors exceed ``nnsight-dask.max-inline-result-bytes`` or the
    policy's ``max_result_bytes``."""
    limit = min(config.max_inline_result_bytes, (policy or Policy()).max_result_bytes)
    size = nbytes(dict(results))
    if size <= limit:
        return
    hint = ("pass store=<fsspec URL> to the trace so large saves are persisted to Zarr and come back lazy"
            if not options.get("store") else
            "lower persist_threshold= so more saves are persisted to the store")
    raise ExperimentFailedError(
        f"the experiment's saved values total {size / 2**20:.1f} MiB inline, over the limit of "
        f"{limit / 2**20:.1f} MiB (this deployment's max_result_bytes, or nnsight-dask.max-inline-result-bytes "
        f"on its workers): {hint}",
        inline_bytes=size, limit=limit)
