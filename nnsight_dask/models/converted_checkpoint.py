"""Read one shard of a checkpoint that transformers converts while loading, with transformers' own rules.

transformers 5 does not load every checkpoint key as it is: mixture-of-experts checkpoints store
each expert's projections as separate tensors that the model fuses into one per layer (Mixtral,
Qwen2-MoE, Qwen3-MoE, OLMoE, ...), GPT-NeoX checkpoints name the head ``embed_out``, old ones say
``LayerNorm.gamma``. The rules live in transformers (``conversion_mapping.py``: renamings and
converters per model type or class) and are applied by its loading engine
(``core_model_loading.convert_and_load_state_dict_in_model``), which renames every checkpoint key,
collects the tensors of each target, converts them and sets the result on the model.

That engine only materializes the tensors whose converted name the model has. So it is handed the
model *already cut* to one shard, and a state dict of lazy tensors over the whole checkpoint:
the other shards' keys are renamed, found unexpected, and never read. Each tensor the shard needs
is read with plain file reads (see :class:`LazyTensor`), converted, and set on the shard.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["ConversionReport", "LazyTensor", "load_converted", "weight_conversions"]


class LazyTensor:
    """A checkpoint tensor that is read only when transformers' loader indexes it (``tensor[...]``).

    ``read`` returns a new tensor holding the stored values. transformers calls it from its loading
    threads, so it must not share a file position between calls.
    """

    def __init__(self, read: Callable[[], torch.Tensor]) -> None:
        self._read = read

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self._read()[index]


@dataclass
class ConversionReport:
    """What did not fit after transformers' conversion, by the shard's parameter names."""

    missing: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    def problem(self) -> str | None:
        """One sentence naming the first thing wrong, or ``None`` when every parameter was loaded."""
        if self.errors:
            name, error = next(iter(self.errors.items()))
            return f"transformers' conversion of {name!r} failed: {error.strip().splitlines()[-1]}"
        if self.mismatched:
            name, stored, expected = self.mismatched[0]
            return f"{name!r} has shape {stored} after conversion, the model expects {expected}"
        if self.missing:
            return f"no checkpoint key for parameter {self.missing[0]!r} after transformers' conversion"
        return None


def weight_conversions(model: torch.nn.Module) -> list[Any]:
    """The weight renamings and converters ``from_pretrained`` applies to ``model``'s checkpoints.

    Empty when transformers converts nothing beyond its legacy renames (``LayerNorm.gamma``), which
    apply to every model and are returned only alongside model-specific rules; also empty with
    transformers 4, which has no conversion engine.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model  # noqa: F401
    except ImportError:
        return []
    if not get_model_conversion_mapping(model, add_legacy=False):
        return []
    return get_model_conversion_mapping(model)


def load_converted(model: torch.nn.Module, tensors: Mapping[str, LazyTensor], conversions: list[Any],
                   aliases: Mapping[int, list[str]]) -> ConversionReport:
    """Load the parameters left in ``model`` (a cut shard) from ``tensors`` through ``conversions``.

    Parameters
    ----------
    model:
        The shard, parameters on ``meta``; other shards' modules already stripped.
    tensors:
        Every key of the checkpoint, lazily read.
    conversions:
        :func:`weight_conversions` of the whole model.
    aliases:
        For each parameter object of the whole model, its names and those its values may be
        saved under (tied weights: the last shard's ``lm_head`` saved as the embedding).

    Returns the parameters left unloaded or misshapen; tied parameters of the shard end up as one
    tensor, as in the whole model.
    """
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    report = ConversionReport()
    with _no_progress_bars():
        for part in _by_layer(tensors):
            found = _run_engine(model, part, conversions)
            report.mismatched.extend(found.mismatched)
            report.errors.update(found.errors)
        unresolved = _tie(model, list(groups.values()))
        if unresolved:
            extra = _run_engine(model, _saved_elsewhere(tensors, conversions, aliases, unresolved), [])
            report.mismatched.extend(extra.mismatched)
            report.errors.update(extra.errors)
            unresolved = _tie(model, unresolved)
    report.missing = [names[0] for names in unresolved]
    return report


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Without transformers' progress bars: its engine draws one per call, here one per layer."""
    from transformers.utils import logging as transformers_logging

    if not transformers_logging.is_progress_bar_enabled():
        yield
        return
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.enable_progress_bar()


def _by_layer(tensors: Mapping[str, LazyTensor]) -> list[dict[str, LazyTensor]]:
    """The checkpoint's keys grouped by the first number in them (the layer, in decoder checkpoints).

    transformers' engine reads every tensor it will need at once, in threads, before converting
    any: given a whole shard of a mixture of experts, it would hold all the experts' separate
    tensors and their fused copies together. One layer at a time bounds that to one layer's worth.
    A converter fuses tensors of one layer (the experts of ``layers.3``), so no fusion is split;
    one that were would give a tensor of the wrong shape, reported, and the shard would load whole.
    """
    groups: dict[str | None, dict[str, LazyTensor]] = {}
    for key, tensor in tensors.items():
        number = next((part for part in key.split(".") if part.isdigit()), None)
        groups.setdefault(number, {})[key] = tensor
    return list(groups.values())


def _run_engine(model: torch.nn.Module, state_dict: dict[str, Any], conversions: list[Any]) -> ConversionReport:
    """transformers' loading engine over ``state_dict``: rename, collect, convert, set (in ``model``)."""
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    # dtype None: each tensor is cast to the dtype of the (meta) parameter it becomes
    info, _ = convert_and_load_state_dict_in_model(model, state_dict, LoadStateDictConfig(weight_mapping=conversions))
    return ConversionReport(mismatched=[(name, tuple(stored), tuple(expected))
                                        for name, stored, expected in sorted(info.mismatched_keys)],
                            errors=dict(info.conversion_errors))


def _tie(model: torch.nn.Module, groups: list[list[str]]) -> list[list[str]]:
    """Give every name of each group (one parameter object before loading) the tensor one of them
    was loaded into; return the groups none of whose names was loaded."""
    params = dict(model.named_parameters(remove_duplicate=False))
    unresolved = []
    for names in groups:
        loaded = next((params[name] for name in names if params[name].device.type != "meta"), None)
        if loaded is None:
            unresolved.append(names)
            continue
        for name in names:
            _set_parameter(model, name, loaded)
    return unresolved


def _saved_elsewhere(tensors: Mapping[str, LazyTensor], conversions: list[Any], aliases: Mapping[int, list[str]],
                     groups: list[list[str]]) -> dict[str, LazyTensor]:
    """For each group, the checkpoint tensor saved under one of its aliases (a tied weight whose
    source another shard owns: the last shard's ``lm_head`` saved as the embedding), by its first name.

    The checkpoint's keys are renamed by the same rules, so that aliases (model names) find them.
    """
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    renamings = [rule for rule in conversions if isinstance(rule, WeightRenaming)]
    converters = [rule for rule in conversions if isinstance(rule, WeightConverter)]
    renamed: dict[str, str] = {}
    for key in tensors:
        target, converted_by = rename_source_key(key, renamings, converters)
        if converted_by is None:  # a fused tensor has no single checkpoint key
            renamed.setdefault(target, key)
    alias_of = {name: names for names in aliases.values() for name in names}
    found: dict[str, LazyTensor] = {}
    for names in groups:
        key = next((renamed[alias] for alias in alias_of.get(names[0], names) if alias in renamed), None)
        if key is not None:
            found[names[0]] = tensors[key]
    return found


def _set_parameter(model: torch.nn.Module, name: str, param: torch.nn.Parameter) -> None:
    parent_path, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    parent._parameters[leaf] = param
