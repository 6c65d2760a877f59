"""Which shard runs each node: a pure function of the graph and the shard plan.

A node bound to a module runs on the shard owning that module; a gradient node runs where its
tensor lives; a free node runs on the latest shard among those of its inputs (the earliest point
in the pipeline where all of them exist). Results and a line's ``stop`` go to the end of their pass,
a value's stop (``proxy.stop()``) to where that value is.
"""
from __future__ import annotations

from collections.abc import Callable

from ..graph.graph import InterventionGraph
from ..graph.node import Kind
from .plan import dependencies


def assign_shards(graph: InterventionGraph, owner: Callable[[str], int], n_shards: int) -> list[int]:
    """``result[node.id]`` is the index of the shard that runs the node."""
    last = n_shards - 1
    shards: list[int] = []
    for node, deps in zip(graph.nodes, dependencies(graph)):
        if node.kind in Kind.MODULE_BOUND:
            shard = owner(node.module)  # type: ignore[arg-type]
        elif node.kind in Kind.AUTOGRAD or (node.kind == Kind.STOP and node.args):
            shard = shards[node.args[0].id]
        elif node.kind == Kind.RESULT:
            shard = last
        elif node.kind == Kind.STOP:
            earlier = [shards[n.id] for n in graph.nodes[:node.id] if n.pass_index == node.pass_index]
            shard = max(earlier, default=0)
        else:
            same_pass = [shards[d] for d in deps if graph.nodes[d].pass_index == node.pass_index]
            shard = max(same_pass, default=0)
        if node.cond is not None:
            shard = max(shard, shards[node.cond]) if graph.nodes[node.cond].pass_index == node.pass_index else shard
        shards.append(shard)
    return shards


def backward_origins(graph: InterventionGraph, shards: list[int]) -> dict[int, int]:
    """For each pass that runs backward: the latest shard where a backward starts."""
    origins: dict[int, int] = {}
    for node in graph.nodes:
        if node.kind == Kind.BACKWARD:
            origins[node.pass_index] = max(origins.get(node.pass_index, 0), shards[node.id])
    return origins
