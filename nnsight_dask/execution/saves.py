"""What a run hands back: saved values by name, and the array name a persisted save gets."""
from __future__ import annotations

import re
from typing import Any

from ..graph.graph import InterventionGraph
from ..graph.node import Kind
from .interleaver import SKIPPED
from .plan import Key


def collect_saves(graph: InterventionGraph, values: dict[Key, Any]) -> dict[str, Any]:
    """Saved values by name (None for a save whose condition was false); a save inside an iteration
    block gives a list, one value a step it ran."""
    saves: dict[str, Any] = {}
    for node in graph.nodes:
        if node.kind != Kind.SAVE:
            continue
        if node.iteration is None:
            value = values.get(node.id, SKIPPED)
            saves[node.target] = None if value is SKIPPED else value  # type: ignore[index]
        else:
            steps = sorted(k[1] for k in values if isinstance(k, tuple) and k[0] == node.id)
            saves[node.target] = [values[(node.id, s)] for s in steps  # type: ignore[index]
                                  if values[(node.id, s)] is not SKIPPED]
    return saves


def persisted_name(target: str, key: Key) -> str:
    """The array name of a saved value in its experiment's group (``h``, ``hs[3]``, ``logits.2`` a step)."""
    name = re.sub(r"[^A-Za-z0-9_.\-\[\]]", "_", target)
    if not name or not name[0].isalnum():
        name = "v" + name
    return f"{name}.{key[1]}" if isinstance(key, tuple) else name
