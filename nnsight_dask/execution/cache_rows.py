"""KV caches of co-tenant generations: one batch cache per step, built from the co-tenants' own.

Co-tenants generating together have caches of different lengths (different prompts, different steps:
a newcomer joins with an empty one). For one step their caches are stacked into one, each co-tenant's
keys and values left-padded to the longest (the padding is masked, see
:func:`.batching.stack_cotenants`); after the step each co-tenant takes back its rows and its columns,
now one step longer. Copying the caches each step costs memory bandwidth proportional to their
size; in exchange no co-tenant ever waits for another to finish, and the caches stay the model's own
``DynamicCache``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .batching import Window


def cache_length(cache: Any) -> int:
    """Columns a co-tenant's cache holds (0 for none)."""
    return int(cache.get_seq_length()) if cache is not None else 0


def _layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in getattr(cache, "layers", ())
            if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4]


def merge_caches(caches: Sequence[Any], rows: Sequence[int]) -> Any:
    """One ``DynamicCache`` holding every co-tenant's cache, left-padded to the longest; a co-tenant
    without a cache (``None`` or empty: a trace, or a generation's first step) gets ``rows`` of
    padding only."""
    from transformers import DynamicCache

    longest = max(cache_length(c) for c in caches)
    merged = DynamicCache()
    if longest == 0:
        return merged
    per_cotenant = [_layers(c) if cache_length(c) else None for c in caches]
    template = next(layers for layers in per_cotenant if layers)
    for index, (key_like, value_like) in enumerate(template):
        keys, values = [], []
        for layers, n in zip(per_cotenant, rows):
            if layers is None:
                keys.append(key_like.new_zeros(n, key_like.shape[1], longest, key_like.shape[3]))
                values.append(value_like.new_zeros(n, value_like.shape[1], longest, value_like.shape[3]))
                continue
            key, value = layers[index]
            gap = longest - key.shape[2]
            keys.append(torch.nn.functional.pad(key, (0, 0, gap, 0)))
            values.append(torch.nn.functional.pad(value, (0, 0, gap, 0)))
        merged.update(torch.cat(keys), torch.cat(values), index)
    return merged


def split_cache(merged: Any, window: Window, past: int, longest_past: int) -> Any:
    """A co-tenant's own cache after a step: its rows; its columns from where its past began in the
    merged cache up to the end of its new tokens."""
    from transformers import DynamicCache

    own = DynamicCache()
    start, stop = longest_past - past, longest_past + window.length
    for index, (key, value) in enumerate(_layers(merged)):
        own.update(key[window.start:window.stop, :, start:stop].clone(),
                   value[window.start:window.stop, :, start:stop].clone(), index)
    return own
