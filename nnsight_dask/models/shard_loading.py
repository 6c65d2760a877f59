"""Load one shard of a model without ever holding the whole model in memory.

Loading the full model and then cutting it (:func:`~nnsight_dask.models.surgery.cut_to_shard`)
makes every worker of a k-shard deployment read, and for a while hold, a whole model. transformers
5 memory-maps the whole checkpoint, and every page a forward pass over the full model touches stays
in the worker's RSS for as long as the map lives; a cast to another dtype (or transformers 4)
copies the whole model into memory first. Measured before this module: each worker of a 2-shard
SmolLM2-135M deployment grew by ~570 MiB, for 311 MiB of its own weights.

When the weights are a local safetensors checkpoint (a Hugging Face directory, or the SmolLM2 cache
that :mod:`._smollm2` converts once from GGUF), :func:`load_shard` instead

1. builds the model's module tree from its config with every parameter on the ``meta`` device
   (buffers such as rotary ``inv_freq`` are computed for real by the modules' own constructors:
   they are not in checkpoints, and are tiny);
2. plans the shards and strips the other shards' modules (:func:`.surgery.strip_to_shard`), which
   needs no weights;
3. reads from the safetensors files only the parameters left, each straight into a tensor of its
   own with plain file reads (tied weights, e.g. ``lm_head`` sharing the embedding, are read under
   the key they were saved as). No memory map: pages of a mapped file count in the process's RSS
   until it is unmapped, so a map would double the peak (the copies plus the mapped pages), and
   Dask's nanny restarts workers by RSS; views into a map would instead tie the weights to a file
   that may be rewritten under a long-lived deployment. Checkpoints that transformers converts
   while loading (mixture-of-experts models fuse their experts' tensors, GPT-NeoX renames its head)
   go through transformers' own conversion engine instead, handed the cut shard and lazily read
   tensors, so that too reads only the shard's tensors (:mod:`.converted_checkpoint`);
4. settles the pass-through layers with one tiny forward through the shard's own modules, and
   checks that no parameter or buffer is left on ``meta``.

Everything else (callables, GGUF files, hub ids, quantized checkpoints, load options the reader
does not apply) takes the old path: full load, then cut. Both paths give the same
module tree, parameters and outputs; ``tests/test_shard_loading.py`` checks it.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from .converted_checkpoint import LazyTensor, load_converted, weight_conversions
from .loading import ModelLoadError, load_tokenizer
from .shards import ShardSpec, plan_shards
from .surgery import cut_to_shard, settle_passthroughs, strip_to_shard

__all__ = ["LoadedShard", "ShardLoadError", "checkpoint_dir", "load_shard", "load_shard_from_checkpoint"]

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

#: ``(source, dtype, gguf_file) -> (model, tokenizer)``: the full loader used when a shard cannot be
#: read on its own (``nnsight_dask.actors.shard_actor.load_source``).
FullLoader = Callable[[Any, torch.dtype | None, str | None], tuple[torch.nn.Module, Any]]

#: Called with the whole (possibly weightless) model and the tokenizer before the model is cut.
Describe = Callable[[torch.nn.Module, Any], Any]

#: ``from_pretrained`` options the partial reader applies itself (``revision`` and ``low_cpu_mem_usage``
#: change nothing for a local checkpoint read tensor by tensor); any other one takes the full load.
PARTIAL_LOAD_OPTIONS = frozenset({"attn_implementation", "revision", "low_cpu_mem_usage"})

#: safetensors dtype names (https://github.com/huggingface/safetensors#format) torch can hold.
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
    **{name: getattr(torch, attr) for name, attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
       if hasattr(torch, attr)},
}


class ShardLoadError(ModelLoadError):
    """A shard read from its checkpoint is incomplete (a parameter or buffer has no values)."""


class _NeedsFullLoad(Exception):
    """The checkpoint is one this module does not read by itself; load it whole, then cut."""


@dataclass
class LoadedShard:
    """One shard, ready to run.

    Attributes
    ----------
    model:
        The model cut to shard ``plan[index]`` (eval mode, CPU).
    tokenizer:
        The model's tokenizer, padding on the left.
    plan:
        The deployment's shard plan.
    description:
        What ``describe`` returned for the whole model, or ``None`` when no ``describe`` was given.
    partial:
        True when only this shard's weights were read; False when the model was loaded whole and cut.
    """

    model: torch.nn.Module
    tokenizer: Any
    plan: list[ShardSpec]
    description: Any = None
    partial: bool = False


def load_shard(source: Any, n_shards: int, index: int, *, full_loader: FullLoader, dtype: torch.dtype | None = None,
               gguf_file: str | None = None, describe: Describe | None = None,
               options: Mapping[str, Any] | None = None) -> LoadedShard:
    """Shard ``index`` of ``n_shards`` of the model ``source``, reading only its weights when possible.

    Parameters
    ----------
    source:
        A local Hugging Face directory, ``"smollm2"``, a hub id, or a callable returning
        ``(model, tokenizer)``.
    n_shards, index:
        The shard wanted.
    full_loader:
        Loads the whole model; used for sources without a local safetensors checkpoint (callables,
        GGUF files, hub ids) and for checkpoints the partial reader cannot read (see
        :func:`load_shard_from_checkpoint`).
    dtype:
        Parameter dtype; ``None`` means what ``full_loader`` would give (with transformers 5, the
        dtype in the model's config, else the checkpoint's; float32 for ``"smollm2"``).
    gguf_file:
        A GGUF file inside ``source``; always loaded whole.
    describe:
        Called once with the whole model (its parameters may be on ``meta``) and the tokenizer,
        before the cut; its result becomes :attr:`LoadedShard.description`.
    options:
        ``from_pretrained`` options (already checked, see :func:`.loading.check_shard_load_options`);
        ``full_loader`` must apply them too. Options outside :data:`PARTIAL_LOAD_OPTIONS` take the full load.
    """
    path = checkpoint_dir(source, gguf_file)
    if path is not None:
        if source == "smollm2":
            dtype = dtype or torch.float32
        try:
            return load_shard_from_checkpoint(path, n_shards, index, dtype=dtype, describe=describe, options=options)
        except _NeedsFullLoad as why:
            logger.warning("loading all of %s to keep shard %d of %d: %s", path, index, n_shards, why)
    model, tokenizer = full_loader(source, dtype, gguf_file)
    model.eval()
    description = describe(model, tokenizer) if describe is not None else None
    plan = plan_shards(model, n_shards)
    model = cut_to_shard(model, plan, index)
    return LoadedShard(model, tokenizer, plan, description, partial=False)


def checkpoint_dir(source: Any, gguf_file: str | None = None) -> Path | None:
    """The local directory holding ``source``'s safetensors checkpoint, or ``None`` if there is none.

    ``"smollm2"`` resolves to its converted cache (converting the GGUF file first if needed).
    Callables, GGUF files, hub ids and directories with only ``.bin`` weights give ``None``.
    """
    if callable(source) or gguf_file is not None:
        return None
    if isinstance(source, str) and source == "smollm2":
        from ._smollm2 import smollm2_checkpoint

        return smollm2_checkpoint()
    if not isinstance(source, (str, Path)):
        return None
    path = Path(source)
    if not (path / "config.json").is_file():
        return None
    if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
        return path
    return None


def load_shard_from_checkpoint(path: str | Path, n_shards: int, index: int, *, dtype: torch.dtype | None = None,
                               describe: Describe | None = None,
                               options: Mapping[str, Any] | None = None) -> LoadedShard:
    """Shard ``index`` of ``n_shards`` of the safetensors checkpoint at ``path``, reading only its weights.

    Raises
    ------
    ShardLoadError
        A parameter or buffer of the shard is still on the ``meta`` device after loading.
    _NeedsFullLoad
        (internal; :func:`load_shard` falls back to a full load) the checkpoint is quantized, has
        modules kept in float32, lacks a key or shape the model expects (after transformers' own
        conversion, for checkpoints it converts), or ``options`` has one outside
        :data:`PARTIAL_LOAD_OPTIONS`.
    """
    path = Path(path)
    weight_map = _weight_map(path)
    model = _skeleton(path, weight_map, dtype, options or {})
    tokenizer = load_tokenizer(path)
    description = describe(model, tokenizer) if describe is not None else None
    aliases = _aliases(model)
    conversions = weight_conversions(model)
    plan = plan_shards(model, n_shards)
    strip_to_shard(model, plan, index)
    if conversions:
        _load_converted(model, weight_map, conversions, aliases)
    else:
        _load_parameters(model, weight_map, aliases)
    _load_persistent_buffers(model, weight_map)
    check_materialized(model, where=f"shard {index} of {n_shards} of {path}")
    settle_passthroughs(model, plan[index])
    return LoadedShard(model, tokenizer, plan, description, partial=True)


def check_materialized(model: torch.nn.Module, where: str = "the model") -> None:
    """Raise :class:`ShardLoadError` naming the first parameter or buffer left on the ``meta`` device."""
    for kind, named in (("parameter", model.named_parameters(remove_duplicate=False)),
                        ("buffer", model.named_buffers(remove_duplicate=False))):
        for name, tensor in named:
            if tensor.device.type == "meta":
                raise ShardLoadError(
                    f"{kind} {name!r} of {where} has no values after loading (still on the meta device): "
                    "the checkpoint lacks it and nothing computed it. Deploy with a callable source that "
                    "loads the model whole, or report the model type.", parameter=name)


# -- building the weightless model -----------------------------------------------------------------------


def _weight_map(path: Path) -> dict[str, Path]:
    """Checkpoint key -> the safetensors file holding it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: path / name for key, name in weight_map.items()}
    single = path / "model.safetensors"
    return dict.fromkeys(_read_header(single)[1], single)


def _skeleton(path: Path, weight_map: dict[str, Path], dtype: torch.dtype | None,
              options: Mapping[str, Any]) -> torch.nn.Module:
    """The model ``from_pretrained(path, dtype=dtype, **options)`` would build, parameters on ``meta``, buffers real."""
    from transformers import AutoConfig, AutoModelForCausalLM

    others = sorted(set(options) - PARTIAL_LOAD_OPTIONS)
    if others:
        raise _NeedsFullLoad(f"transformers applies the load option(s) {others} itself")
    built = {"attn_implementation": options["attn_implementation"]} if "attn_implementation" in options else {}
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as exc:
        raise _NeedsFullLoad(f"its config does not load on its own ({exc})") from exc
    if getattr(config, "quantization_config", None) is not None:
        raise _NeedsFullLoad("the checkpoint is quantized")
    dtype = _resolve_dtype(config, weight_map, dtype)
    if hasattr(config, "dtype"):
        config.dtype = dtype  # transformers >= 4.56
    else:
        config.torch_dtype = dtype
    try:
        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, **built)
    except (ValueError, KeyError) as exc:
        raise _NeedsFullLoad(f"transformers cannot build it from its config ({exc})") from exc
    if dtype in (torch.float16, torch.bfloat16) and (
            getattr(model, "_keep_in_fp32_modules", None) or getattr(model, "_keep_in_fp32_modules_strict", None)):
        raise _NeedsFullLoad("some of its modules are kept in float32")
    _load_generation_config(model, path)
    model.eval()
    return model


def _resolve_dtype(config: Any, weight_map: dict[str, Path], dtype: torch.dtype | None) -> torch.dtype:
    """The dtype ``from_pretrained(path, dtype=dtype)`` gives with the installed transformers.

    transformers 5 reads ``dtype=None`` as ``"auto"`` (the config's dtype, else the checkpoint's);
    transformers 4 as the default dtype (float32).
    """
    import transformers

    if dtype is not None:
        return dtype
    if int(transformers.__version__.split(".")[0]) < 5:
        return torch.get_default_dtype()
    configured = getattr(config, "dtype", None)
    if isinstance(configured, str):
        configured = getattr(torch, configured, None)
    if isinstance(configured, torch.dtype):
        return configured
    for file in dict.fromkeys(weight_map.values()):
        for entry in _read_header(file)[1].values():
            found = _SAFETENSORS_DTYPES.get(entry["dtype"])
            if found is not None and found.is_floating_point:
                return found
    return torch.get_default_dtype()


_meta_state = threading.local()
_meta_lock = threading.Lock()
_meta_users = 0
_original_register_parameter: Callable[..., None] = torch.nn.Module.register_parameter


def _register_parameter(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
    """``Module.register_parameter`` that moves the parameter to ``meta`` in threads inside the block."""
    _original_register_parameter(module, name, param)
    if param is not None and getattr(_meta_state, "active", False) and param.device.type != "meta":
        module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Put every parameter registered inside this block on the ``meta`` device, as it is registered.

    Buffers stay real: modules compute them in their constructors (rotary ``inv_freq``), they are
    not in checkpoints, and they are small. A parameter's initial values are drawn on ``meta``
    (nothing is computed); each lives on the CPU only as an untouched ``torch.empty`` for a moment.

    ``torch.device("meta")`` would put the buffers on ``meta`` too, and their values would have to
    be recomputed model by model. The patch of ``Module.register_parameter`` acts only in the
    calling thread: other shards (or anything else) may build models in other threads of the worker.
    """
    global _meta_users, _original_register_parameter
    with _meta_lock:
        if _meta_users == 0:
            _original_register_parameter = torch.nn.Module.register_parameter
            torch.nn.Module.register_parameter = _register_parameter  # type: ignore[method-assign]
        _meta_users += 1
    _meta_state.active = True
    try:
        yield
    finally:
        _meta_state.active = False
        with _meta_lock:
            _meta_users -= 1
            if _meta_users == 0:
                torch.nn.Module.register_parameter = _original_register_parameter  # type: ignore[method-assign]


def _load_generation_config(model: torch.nn.Module, path: Path) -> None:
    """Read ``generation_config.json`` as ``from_pretrained`` does (eos ids for generation come from it)."""
    if not (path / "generation_config.json").is_file() or not getattr(model, "can_generate", lambda: False)():
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        logger.warning("ignoring the unreadable generation config of %s: %s", path, exc)


# -- reading the shard's weights ----------------------------------------------------------------------


def _aliases(model: torch.nn.Module) -> dict[int, list[str]]:
    """Every name of every parameter object of the whole model, and the keys it may be saved under.

    Tied weights are one object with several names (``lm_head.weight`` is ``model.embed_tokens.weight``
    in SmolLM2); checkpoints store one of them. Taken before the cut, so the last shard, whose
    embedding is gone, still knows where its ``lm_head`` was saved.
    """
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    tied = getattr(model, "all_tied_weights_keys", None)  # transformers 5: {target: source}
    if isinstance(tied, dict):
        by_name = {name: key for key, names in aliases.items() for name in names}
        for target, source in tied.items():
            if target in by_name and source not in aliases[by_name[target]]:
                aliases[by_name[target]].append(source)
    prefix = getattr(model, "base_model_prefix", "")
    if prefix:  # some checkpoints (e.g. the original GPT-2) were saved from the base model
        for names in aliases.values():
            names.extend([name[len(prefix) + 1:] for name in names if name.startswith(prefix + ".")])
    return aliases


def _load_parameters(model: torch.nn.Module, weight_map: dict[str, Path], aliases: dict[int, list[str]]) -> None:
    """Give every parameter left in ``model`` its checkpoint values (one tensor per tied group).

    All of them, not only those on ``meta``: a parameter a module set up by some other route than
    ``register_parameter`` holds random initial values, never the trained ones.
    """
    groups: dict[int, tuple[torch.nn.Parameter, list[str]]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), (param, []))[1].append(name)
    wanted: dict[Path, list[tuple[str, tuple[torch.nn.Parameter, list[str]]]]] = {}
    for key_id, (param, names) in groups.items():
        key = next((k for k in [*names, *aliases.get(key_id, [])] if k in weight_map), None)
        if key is None:
            raise _NeedsFullLoad(f"no checkpoint key for parameter {names[0]!r} (tried {aliases.get(key_id, names)})")
        wanted.setdefault(weight_map[key], []).append((key, (param, names)))
    for file, items in wanted.items():
        for key, (param, names), stored in _read_tensors(file, items):
            if tuple(stored.shape) != tuple(param.shape):
                raise _NeedsFullLoad(f"{key!r} has shape {tuple(stored.shape)} in the checkpoint, "
                                     f"the model expects {tuple(param.shape)}")
            if param.is_floating_point() and stored.dtype != param.dtype:
                stored = stored.to(param.dtype)
            new = torch.nn.Parameter(stored, requires_grad=param.requires_grad)
            for name in names:
                _set(model, name, new, parameter=True)


def _load_converted(model: torch.nn.Module, weight_map: dict[str, Path], conversions: list[Any],
                    aliases: dict[int, list[str]]) -> None:
    """Give the shard's parameters their values through transformers' conversion of the checkpoint
    (:mod:`.converted_checkpoint`); only the tensors that become the shard's parameters are read."""
    tensors: dict[str, LazyTensor] = {}
    for file in dict.fromkeys(weight_map.values()):
        data_start, header = _read_header(file)
        for key, entry in header.items():
            tensors[key] = LazyTensor(functools.partial(_read_alone, file, data_start, key, entry))
    problem = load_converted(model, tensors, conversions, aliases).problem()
    if problem is not None:
        raise _NeedsFullLoad(problem)


def _load_persistent_buffers(model: torch.nn.Module, weight_map: dict[str, Path]) -> None:
    """Overwrite the persistent buffers the checkpoint has (e.g. ``num_batches_tracked``) with its values."""
    persistent = set(model.state_dict(keep_vars=True))
    by_file: dict[Path, list[tuple[str, torch.Tensor]]] = {}
    for name, buf in model.named_buffers():
        if name in persistent and name in weight_map:
            by_file.setdefault(weight_map[name], []).append((name, buf))
    for file, buffers in by_file.items():
        for name, buf, stored in _read_tensors(file, buffers):
            if buf.is_floating_point() and stored.is_floating_point() and stored.dtype != buf.dtype:
                stored = stored.to(buf.dtype)
            _set(model, name, stored, parameter=False)


def _read_tensors(file: Path, items: list[tuple[str, _T]]) -> Iterator[tuple[str, _T, torch.Tensor]]:
    """``(key, what, tensor)`` for each ``(key, what)`` of ``items``, in file order (the header read once)."""
    data_start, header = _read_header(file)
    with open(file, "rb", buffering=0) as handle:
        for key, what in sorted(items, key=lambda item: header[item[0]]["data_offsets"][0]):
            yield key, what, _read_tensor(handle, file, data_start, key, header[key])


def _read_header(file: Path) -> tuple[int, dict[str, dict[str, Any]]]:
    """Where the data of a safetensors file starts, and its tensors' ``{dtype, shape, data_offsets}``.

    The format: an 8-byte little-endian header length, a JSON header, then the raw bytes.
    """
    with open(file, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        if not 0 < size < 1 << 28:
            raise _NeedsFullLoad(f"{file} does not look like a safetensors file (header of {size} bytes)")
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


def _read_alone(file: Path, data_start: int, key: str, entry: dict[str, Any]) -> torch.Tensor:
    """One tensor, through a file handle of its own (transformers reads from several threads)."""
    with open(file, "rb", buffering=0) as handle:
        return _read_tensor(handle, file, data_start, key, entry)


def _read_tensor(handle: Any, file: Path, data_start: int, key: str, entry: dict[str, Any]) -> torch.Tensor:
    """Read one tensor's bytes from ``handle`` straight into a new tensor (little-endian hosts)."""
    dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
    if dtype is None or sys.byteorder != "little":
        raise _NeedsFullLoad(f"{key!r} in {file} has dtype {entry['dtype']}, which this reader does not handle")
    begin, end = entry["data_offsets"]
    raw = torch.empty(end - begin, dtype=torch.uint8)
    view = memoryview(raw.numpy())
    handle.seek(data_start + begin)
    done = 0
    while done < len(view):
        got = handle.readinto(view[done:])
        if not got:
            raise ShardLoadError(f"{file} ends before the data of {key!r} (truncated checkpoint?)", parameter=key)
        done += got
    return raw.view(dtype).reshape(entry["shape"])


def _set(model: torch.nn.Module, name: str, value: torch.Tensor, *, parameter: bool) -> None:
    parent_path, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if parameter:
        parent._parameters[leaf] = value  # type: ignore[assignment]
    else:
        parent._buffers[leaf] = value
