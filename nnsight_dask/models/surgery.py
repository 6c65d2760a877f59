"""Cut a full model down to one shard: other shards' layers become pass-throughs, their weights go.

The shard still runs the model's own ``forward`` (so masks, rotary tables and position handling
stay the model's), but only its own layers compute. A stubbed layer returns its input unchanged
and, during generation, records the sequence length in the KV cache with zero-width entries, so
the cache reports the right length to the model while holding real keys/values only for the
layers this shard owns.

Cutting needs no weights: :func:`strip_to_shard` only swaps modules, so it also works on a model
whose parameters are still on the ``meta`` device (see :mod:`.shard_loading`). Only the last step,
:func:`settle_passthroughs`, runs a tiny forward, and it runs it through this shard's own modules.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch

from .shards import ShardSpec


class PassthroughLayer(torch.nn.Module):
    """Stands in for a decoder layer another shard owns.

    ``returns_tuple`` mirrors the real layers' output convention (``(hidden, ...)`` or ``hidden``);
    ``None`` until :func:`settle_passthroughs` has found it out.
    """

    def __init__(self, layer_idx: int, returns_tuple: bool | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.returns_tuple = returns_tuple

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.returns_tuple is None:
            raise RuntimeError(
                f"PassthroughLayer {self.layer_idx} does not know whether decoder layers return tuples: "
                "call settle_passthroughs(model, spec) after strip_to_shard (cut_to_shard does both)")
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = _find_cache((*args, *kwargs.values()))
        if cache is not None:
            # a one-wide zero entry per position, so the cache's length grows as the real layers' do
            # (transformers reads the sequence length from it to build the next step's mask)
            empty = hidden.new_zeros(hidden.shape[0], 1, hidden.shape[1], 1)
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


def layer_returns_tuple(model: torch.nn.Module, spec: ShardSpec) -> bool:
    """Run two tokens through shard ``spec``'s modules to see whether its decoder layers return tuples.

    The layer list is swapped, for this one call, for a list holding only the shard's first layer:
    the other layers may be pass-throughs that do not know the answer yet, or still lack weights.
    Embeddings and heads of other shards must already be replaced (:func:`strip_to_shard`); they
    then cost nothing and need no weights.
    """
    found: list[bool] = []
    layers = model.get_submodule(spec.layers_path)
    layer = layers[spec.layer_start]
    handle = layer.register_forward_hook(lambda _m, _a, out: found.append(isinstance(out, tuple)))
    kwargs: dict[str, Any] = {}
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False  # the probe's keys/values are thrown away
    _replace(model, spec.layers_path, torch.nn.ModuleList([layer]))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 2, dtype=torch.long), **kwargs)
    finally:
        _replace(model, spec.layers_path, layers)
        handle.remove()
    return bool(found and found[0])


def strip_to_shard(model: torch.nn.Module, plan: list[ShardSpec], index: int) -> torch.nn.Module:
    """Replace (in place) every module another shard of ``plan`` owns; return ``model``.

    Decoder layers become :class:`PassthroughLayer` (output convention not yet known), embeddings
    :class:`ZeroEmbedding`, anything else with weights ``Identity``; weightless modules (rotary
    tables, dropout) stay. Touches no weight values, so ``model`` may live on the meta device.
    """
    spec = plan[index]
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
                layers[position] = PassthroughLayer(position)
            elif isinstance(module, torch.nn.Embedding):
                _replace(model, prefix, ZeroEmbedding(module.embedding_dim, module.weight.dtype))
            else:
                _replace(model, prefix, torch.nn.Identity())
    return model


def settle_passthroughs(model: torch.nn.Module, spec: ShardSpec) -> torch.nn.Module:
    """Tell the pass-throughs of a stripped shard whether to return tuples; needs its own weights loaded."""
    layers = model.get_submodule(spec.layers_path)
    stubs = [layer for layer in layers if isinstance(layer, PassthroughLayer)]
    if stubs:
        returns_tuple = layer_returns_tuple(model, spec)
        for stub in stubs:
            stub.returns_tuple = returns_tuple
    return model


def cut_to_shard(model: torch.nn.Module, plan: list[ShardSpec], index: int) -> torch.nn.Module:
    """Turn ``model`` (in place) into shard ``index`` of ``plan`` and return it."""
    strip_to_shard(model, plan, index)
    return settle_passthroughs(model, plan[index])


def _replace(model: torch.nn.Module, path: str, new: torch.nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)
