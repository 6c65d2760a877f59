"""Shard plans: which consecutive range of decoder layers, and which other modules, each shard owns.

A deployment splits a model into ``k`` shards of consecutive decoder layers. Shard 0 also owns
everything that runs before the first layer (token and position embeddings, rotary tables, input
dropout); the last shard owns everything after the last layer (final norm, ``lm_head``) and the
containers whose forward pass ends there (the root model, ``model``, the layer list itself). An
intervention on a module is applied on the shard that owns it (:func:`owner_of`).

Pure functions over ``torch.nn.Module`` trees; no Dask, no weights moved.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nnsight_dask.errors import ModuleIndexError, NNsightDaskError

__all__ = ["ShardPlanError", "ShardSpec", "find_layers", "owner_of", "plan_shards"]


class ShardPlanError(NNsightDaskError, ValueError):
    """A model cannot be split as asked (no layer list found, or a bad number of shards)."""


#: Where common architectures keep their decoder layers, tried before the generic search.
KNOWN_LAYER_PATHS: tuple[str, ...] = (
    "model.layers",  # Llama, Mistral, Qwen, Gemma, Phi-3, SmolLM
    "transformer.h",  # GPT-2, GPT-J, Bloom, Falcon
    "gpt_neox.layers",  # Pythia / GPT-NeoX
    "model.decoder.layers",  # OPT
    "transformer.blocks",  # MPT
    "model.language_model.layers",  # multimodal wrappers (Llava-style, Gemma 3)
    "layers",  # a bare decoder (LlamaModel) or a hand-written stack
)

# Children of the layers' ancestors whose registration order misleads: some models register the
# rotary table after the layers (Llama) or the final norm and the output projection before them
# (OPT, whose ``project_out`` maps to the embedding width in OPT-350m). Names, not order, decide for
# these; everything else goes by registration order.
_RUNS_BEFORE = re.compile(r"emb|rotary|wpe|wte|pos", re.IGNORECASE)
_RUNS_AFTER = re.compile(r"norm|ln_f|head|score|project_out", re.IGNORECASE)


@dataclass(frozen=True)
class ShardSpec:
    """One shard of a plan: layers ``[layer_start, layer_stop)`` and the module subtrees it owns.

    Attributes
    ----------
    index:
        Position of the shard in the pipeline, from 0.
    layer_start, layer_stop:
        The half-open range of decoder layer indices this shard runs.
    module_prefixes:
        Dotted module paths whose whole subtree this shard owns, e.g.
        ``("model.embed_tokens", "model.rotary_emb", "model.layers.0", "model.layers.1")``.
    layers_path:
        Dotted path of the decoder ``ModuleList`` (same in every shard of a plan).
    """

    index: int
    layer_start: int
    layer_stop: int
    module_prefixes: tuple[str, ...]
    layers_path: str = ""

    @property
    def n_layers(self) -> int:
        """Number of decoder layers this shard runs."""
        return self.layer_stop - self.layer_start

    def owns(self, module_path: str) -> bool:
        """True when ``module_path`` lies in one of this shard's owned subtrees."""
        path = normalize_path(module_path)
        return any(_under(path, prefix) for prefix in self.module_prefixes)


def normalize_path(module_path: str) -> str:
    """Turn envoy-style paths into ``named_modules`` paths: ``"model.layers[5].mlp"`` -> ``"model.layers.5.mlp"``.

    A leading ``"model."`` root alias is not stripped: paths are relative to the wrapped module.
    """
    return re.sub(r"\[(-?\d+)\]", r".\1", module_path).strip(".")


def find_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """Find the decoder layer list of ``model``; return its dotted path and the ``ModuleList``.

    Known layouts (:data:`KNOWN_LAYER_PATHS`) are tried first; otherwise the longest
    ``ModuleList`` in the model wins (the shallowest one on ties).

    Raises
    ------
    ShardPlanError
        The model has no non-empty ``ModuleList``.

    Examples
    --------
    >>> from nnsight_dask.models import tiny_gpt2, tiny_llama
    >>> find_layers(tiny_llama())[0], find_layers(tiny_gpt2())[0]
    ('model.layers', 'transformer.h')
    """
    for path in KNOWN_LAYER_PATHS:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            return path, module

    best: tuple[int, int, str, torch.nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            key = (len(module), -name.count("."))
            if best is None or key > best[:2]:
                best = (key[0], key[1], name, module)
    if best is None:
        raise ShardPlanError(
            f"Cannot find the decoder layers of {type(model).__name__}: it has no non-empty "
            f"torch.nn.ModuleList. Looked for {list(KNOWN_LAYER_PATHS)} and then any ModuleList. "
            "Keep the repeated blocks in a ModuleList to shard the model, or deploy it as one shard.",
            model=type(model).__name__,
        )
    return best[2], best[3]


#: A plan other than the even split is used only when it lowers the heaviest shard's compute by this
#: fraction: below it the simple rule (and where each module lives) is worth more than the balance.
BALANCE_GAIN = 0.10


def plan_shards(model: torch.nn.Module, k: int) -> list[ShardSpec]:
    """Split ``model``'s decoder layers into ``k`` consecutive shards of near-equal compute.

    Layers are split evenly, shards differing by at most one layer with the extra layers on the
    earlier shards (10 layers in 3 shards: 4, 3, 3), unless the modules outside the layers weigh
    enough to unbalance that: the last shard also runs the final norm and ``lm_head``, whose matmul
    costs as much as 8 of SmolLM2-135M's 30 layers (a 49152-word vocabulary). When another split
    lowers the heaviest shard's per-token matmul work by more than :data:`BALANCE_GAIN`, that split is
    used (SmolLM2 in 2 shards: 19 and 11 layers instead of 15 and 15). Shards of a pipeline run
    concurrently for different experiments, so the heaviest one bounds a shared deployment's
    throughput. Embeddings and everything before the layers go with shard 0; the final norm,
    ``lm_head`` and everything after go with the last shard.

    Raises
    ------
    ShardPlanError
        ``k`` is below 1 or above the number of layers, or the model has no layer list.

    Examples
    --------
    >>> from nnsight_dask.models import tiny_llama
    >>> plan = plan_shards(tiny_llama(n_layer=5), 2)
    >>> [(s.layer_start, s.layer_stop) for s in plan]
    [(0, 3), (3, 5)]
    >>> plan[0].module_prefixes[:2], plan[-1].module_prefixes[-2:]
    (('model.embed_tokens', 'model.rotary_emb'), ('model.norm', 'lm_head'))
    """
    layers_path, layers = find_layers(model)
    n = len(layers)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k > n:
        raise ShardPlanError(
            f"Cannot split {type(model).__name__} ({n} layers at {layers_path!r}) into {k!r} "
            f"shards: the number of shards must be an integer from 1 to {n}.",
            n_shards=k,
            n_layers=n,
        )
    before, after = _outside_layers(model, layers_path)
    costs = [matmul_weights(layer) for layer in layers]
    costs[0] += sum(matmul_weights(model.get_submodule(path)) for path in before)
    costs[-1] += sum(matmul_weights(model.get_submodule(path)) for path in after)
    sizes = _even_sizes(n, k)
    balanced = _balanced_sizes(costs, k)
    if _heaviest(costs, balanced) < (1 - BALANCE_GAIN) * _heaviest(costs, sizes):
        sizes = balanced

    plan: list[ShardSpec] = []
    start = 0
    for index, size in enumerate(sizes):
        stop = start + size
        prefixes: list[str] = []
        if index == 0:
            prefixes.extend(before)
        prefixes.extend(f"{layers_path}.{i}" for i in range(start, stop))
        if index == k - 1:
            prefixes.extend(after)
        plan.append(ShardSpec(index, start, stop, tuple(prefixes), layers_path))
        start = stop
    return plan


def matmul_weights(module: torch.nn.Module) -> int:
    """Weights a token meets in matrix products inside ``module`` (a per-token compute estimate):
    every parameter of two or more dimensions except embedding tables, which are looked up. A tied
    ``lm_head`` counts, though its weight is the embedding's."""
    return sum(parameter.numel() for sub in module.modules() if not isinstance(sub, torch.nn.Embedding)
               for parameter in sub.parameters(recurse=False) if parameter.dim() >= 2)


def _even_sizes(n: int, k: int) -> list[int]:
    base, extra = divmod(n, k)
    return [base + (1 if index < extra else 0) for index in range(k)]


def _heaviest(costs: Sequence[int], sizes: Sequence[int]) -> int:
    start, heaviest = 0, 0
    for size in sizes:
        heaviest = max(heaviest, sum(costs[start:start + size]))
        start += size
    return heaviest


def _balanced_sizes(costs: Sequence[int], k: int) -> list[int]:
    """Consecutive sizes (each at least 1) minimising the heaviest shard's cost; among equal plans
    the earlier shards take more layers."""
    n = len(costs)

    def shards_needed(limit: int, first: int) -> int | None:
        needed, load = 1, 0
        for cost in costs[first:]:
            if cost > limit:
                return None
            if load + cost > limit:
                needed, load = needed + 1, 0
            load += cost
        return needed

    candidates = sorted({sum(costs[i:j]) for i in range(n) for j in range(i + 1, n + 1)})
    lo, hi = 0, len(candidates) - 1
    while lo < hi:  # the smallest limit that k shards can keep
        mid = (lo + hi) // 2
        needed = shards_needed(candidates[mid], 0)
        if needed is not None and needed <= k:
            hi = mid
        else:
            lo = mid + 1
    limit = candidates[lo]
    sizes: list[int] = []
    first = 0
    for index in range(k - 1):
        left = k - index - 1  # shards still to fill after this one, a layer each at least
        size, load = 0, 0
        while first + size < n - left and load + costs[first + size] <= limit:
            load += costs[first + size]
            size += 1
        sizes.append(max(size, 1))
        first += max(size, 1)
    sizes.append(n - first)
    return sizes


def owner_of(plan: Sequence[ShardSpec], module_path: str) -> int:
    """Index of the shard in ``plan`` that owns ``module_path``.

    ``"model.layers.5.mlp"`` belongs to the shard running layer 5; embeddings to shard 0; the
    final norm, ``lm_head``, the root ``""`` and the containers of the layer list (``"model"``,
    ``"model.layers"``) to the last shard, where their forward pass ends. Envoy-style indices
    (``"model.layers[5]"``) are accepted.

    Raises
    ------
    ShardPlanError
        ``plan`` is empty.
    ModuleIndexError
        The path names a layer index outside the plan (e.g. ``layers.40`` of 30 layers).

    Examples
    --------
    >>> from nnsight_dask.models import tiny_llama
    >>> plan = plan_shards(tiny_llama(n_layer=4), 2)
    >>> [owner_of(plan, p) for p in ("model.embed_tokens", "model.layers.3.mlp", "lm_head", "")]
    [0, 1, 1, 1]
    """
    if not plan:
        raise ShardPlanError("owner_of() got an empty shard plan; build one with plan_shards().")
    path = normalize_path(module_path)
    best_len, owner = -1, plan[-1].index
    for spec in plan:
        for prefix in spec.module_prefixes:
            if _under(path, prefix) and len(prefix) > best_len:
                best_len, owner = len(prefix), spec.index
    if best_len < 0:
        layers_path = plan[0].layers_path
        if layers_path and _under(path, layers_path) and path != layers_path:
            index = path[len(layers_path) + 1 :].split(".", 1)[0]
            n_layers = plan[-1].layer_stop
            raise ModuleIndexError(
                f"Module path {module_path!r} names layer {index} but {layers_path!r} has "
                f"{n_layers} layers (0 to {n_layers - 1}).",
                module_path=module_path,
            )
    return owner


def _under(path: str, prefix: str) -> bool:
    """True when ``path`` is ``prefix`` or inside it, on dotted-name boundaries."""
    return path == prefix or path.startswith(prefix + ".") or prefix == ""


def _outside_layers(model: torch.nn.Module, layers_path: str) -> tuple[list[str], list[str]]:
    """Split the subtrees beside the layer list's ancestors into those run before and after it."""
    before: list[str] = []
    after_by_level: list[list[str]] = []
    parts = layers_path.split(".")
    parent = model
    parent_path = ""
    for part in parts:
        names = [name for name, _ in parent.named_children()]
        after: list[str] = []
        after_by_level.append(after)
        position = names.index(part)
        for i, name in enumerate(names):
            if name == part:
                continue
            full = f"{parent_path}.{name}" if parent_path else name
            if _RUNS_BEFORE.search(name):
                before.append(full)
            elif _RUNS_AFTER.search(name):
                after.append(full)
            elif i < position:
                before.append(full)
            else:
                after.append(full)
        parent = getattr(parent, part)
        parent_path = f"{parent_path}.{part}" if parent_path else part
    # Inner containers finish before outer ones: ``model.norm`` runs before ``lm_head``.
    return before, [path for level in reversed(after_by_level) for path in level]
