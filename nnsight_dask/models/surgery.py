"""Cut a full model down to one shard: other shards' layers become pass-throughs, their weights go.

The shard still runs the model's own ``forward`` (so masks, rotary tables and position handling
stay the model's), but only its own layers compute. A stubbed layer returns its input unchanged
and, during generation, records the sequence length in the KV cache with zero-width entries, so
the cache reports the right length to the model while holding real keys/values only for the
layers this shard owns.
"""
from __future__ import annotations

from typing import Any

import torch

from .shards import ShardSpec


class PassthroughLayer(torch.nn.Module):
    """Stands in for a decoder layer another shard owns."""

    def __init__(self, layer_idx: int, returns_tuple: bool) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.returns_tuple = returns_tuple

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = _find_cache((*args, *kwargs.values()))
        if cache is not None:
            empty = hidden.new_zeros(hidden.shape[0], 1, hidden.shape[1], 0)
            cache.update(empty, empty, self.layer_idx)
        return (hidden,) if self.returns_tuple else hidden


class ZeroEmbedding(torch.nn.Module):
    """Stands in for an embedding another shard owns: zeros of the right shape, no weights."""

    def __init__(self, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.dim = dim
        self.dtype = dtype

    def forward(self, ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.dim, dtype=self.dtype, device=ids.device)


def _find_cache(values: tuple[Any, ...]) -> Any:
    from transformers.cache_utils import Cache

    for value in values:
        if isinstance(value, Cache):
            return value
    return None


def layer_returns_tuple(model: torch.nn.Module, layers_path: str) -> bool:
    """Run two tokens through the model once to see whether its decoder layers return tuples."""
    found: list[bool] = []
    layer = model.get_submodule(layers_path)[0]
    handle = layer.register_forward_hook(lambda _m, _a, out: found.append(isinstance(out, tuple)))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 2, dtype=torch.long))
    finally:
        handle.remove()
    return bool(found and found[0])


def cut_to_shard(model: torch.nn.Module, plan: list[ShardSpec], index: int) -> torch.nn.Module:
    """Turn ``model`` (in place) into shard ``index`` of ``plan`` and return it."""
    spec = plan[index]
    returns_tuple = layer_returns_tuple(model, spec.layers_path)
    layers = model.get_submodule(spec.layers_path)
    for other in plan:
        if other.index == index:
            continue
        for prefix in other.module_prefixes:
            module = model.get_submodule(prefix)
            if not any(True for _ in module.parameters()):
                continue  # rotary tables, dropout: every shard keeps them (no weights to save)
            if prefix.startswith(spec.layers_path + "."):
                position = int(prefix[len(spec.layers_path) + 1:].split(".")[0])
                layers[position] = PassthroughLayer(position, returns_tuple)
            elif isinstance(module, torch.nn.Embedding):
                _replace(model, prefix, ZeroEmbedding(module.embedding_dim, module.weight.dtype))
            else:
                _replace(model, prefix, torch.nn.Identity())
    return model


def _replace(model: torch.nn.Module, path: str, new: torch.nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)
