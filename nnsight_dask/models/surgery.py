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


class ZeroStandIn(torch.nn.Module):
    """Stands in for a module before the layers that another shard owns (an embedding, a projection):
    zeros of the shape and dtype that module would return, and no weights.

    The shape comes from running the module's own ``forward`` on the ``meta`` device (a weightless
    copy; nothing is computed), so it is right whatever the module's signature: OPT's learned
    positions take the whole attention mask and return only the new positions, OPT-350m projects
    its embeddings to another width. Later layers' pass-throughs record the sequence length in the
    KV cache from this output, so a wrong length there breaks generation at its second step.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        # kept outside the module tree: its (meta) weights are no parameters of this shard
        self.__dict__["original"] = _weightless_copy(module)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from torch.utils._pytree import tree_map

        def to_meta(value: Any) -> Any:
            return value.to("meta") if isinstance(value, torch.Tensor) else value

        device = next((v.device for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)),
                      torch.device("cpu"))
        with torch.no_grad():
            shaped = self.original(*tree_map(to_meta, args), **tree_map(to_meta, kwargs))
        return tree_map(lambda v: torch.zeros(v.shape, dtype=v.dtype, device=device)
                        if isinstance(v, torch.Tensor) else v, shaped)

    def extra_repr(self) -> str:
        return f"for {type(self.original).__name__}"


def _weightless_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` whose parameters and buffers are new tensors on ``meta`` (no values copied;
    ``module`` itself is untouched, so weights it shares with modules that stay are unaffected)."""
    import copy

    memo: dict[int, Any] = {}
    for tensor in (*module.parameters(), *module.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = torch.nn.Parameter(meta, requires_grad=False) if isinstance(
            tensor, torch.nn.Parameter) else meta
    return copy.deepcopy(module, memo)


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

    Decoder layers become :class:`PassthroughLayer` (output convention not yet known); modules with
    weights that run before this shard's layers (owned by an earlier shard: embeddings, projections)
    :class:`ZeroStandIn`, those after them ``Identity`` (a shard's forward ends at its last layer, so
    they never run there); weightless modules (rotary tables, dropout) stay. Touches no weight
    values, so ``model`` may live on the meta device.
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
            elif other.index < index:
                _replace(model, prefix, ZeroStandIn(module))
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
