"""Load a causal language model and its tokenizer, ready for tracing.

Three sources are accepted, all through transformers' ``from_pretrained``:

- a local Hugging Face directory (``config.json`` + weights + tokenizer files);
- a hub id such as ``"HuggingFaceTB/SmolLM2-135M-Instruct"`` (needs network or a warm HF cache);
- a local directory plus ``gguf_file=`` naming a GGUF file inside it (needs ``gguf`` and ``accelerate``).

Any other keyword goes to ``from_pretrained`` (``attn_implementation="eager"``, ``revision=``,
``low_cpu_mem_usage=``...), as in transformers. A shard of a shared deployment takes fewer: see
:func:`check_shard_load_options`.

The model comes back in eval mode (tracing reads activations; dropout would make two runs of the
same prompt disagree) and the tokenizer pads on the left with a pad token always defined, so a
batch of prompts of different lengths ends on the same position (``[:, -1]`` is every prompt's last
token, which is what logit lens and generation need).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nnsight_dask.errors import NNsightDaskError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "SHARD_LOAD_OPTIONS",
    "LoadOptionError",
    "ModelLoadError",
    "check_shard_load_options",
    "load_causal_lm",
    "load_tokenizer",
    "prepare_tokenizer",
    "split_dtype",
]

#: The ``from_pretrained`` options a shard of a deployment takes (``nd.serve(..., load_options=)``), with
#: the types of their values. The loader runs on the cluster's workers, with their files and
#: credentials, so nothing else is taken: no config overrides, ``cache_dir``, ``token``, ``device_map``
#: (the deployment places its shards) or ``quantization_config``. ``trust_remote_code=True``, and an
#: ``attn_implementation`` fetched from the hub (``"org/kernel"``), run code shipped with a checkpoint
#: on the workers: only where the workers' setting ``nnsight-dask.trust-remote-code`` allows it.
SHARD_LOAD_OPTIONS: dict[str, type] = {
    "attn_implementation": str,
    "revision": str,
    "low_cpu_mem_usage": bool,
    "variant": str,
    "subfolder": str,
    "use_safetensors": bool,
    "trust_remote_code": bool,
}

#: Options that choose which tokenizer files are read, too.
_TOKENIZER_OPTIONS = ("revision", "subfolder", "trust_remote_code")


class ModelLoadError(NNsightDaskError, OSError):
    """A model or tokenizer cannot be loaded from the source given."""


class LoadOptionError(NNsightDaskError, ValueError):
    """A load option is unknown, has a value of the wrong type, or is not allowed on this cluster."""


def check_shard_load_options(options: Mapping[str, Any] | None, *, trust_remote_code: bool | None) -> dict[str, Any]:
    """The ``from_pretrained`` options a shard may load with, checked; raise :class:`LoadOptionError` otherwise.

    Parameters
    ----------
    options:
        What ``nd.serve(..., load_options=)`` was given (``dtype`` already taken out, see :func:`split_dtype`).
    trust_remote_code:
        Whether code shipped with a checkpoint may run here: the workers' own setting
        ``nnsight-dask.trust-remote-code``, whatever a client asks. ``None`` (a client failing fast
        before it deploys): names and types only, the shards decide the rest.

    Examples
    --------
    >>> check_shard_load_options({"attn_implementation": "eager"}, trust_remote_code=False)
    {'attn_implementation': 'eager'}
    >>> check_shard_load_options({"trust_remote_code": True}, trust_remote_code=False)
    Traceback (most recent call last):
    ...
    nnsight_dask.models.loading.LoadOptionError: load option trust_remote_code=True runs Python files shipped with the checkpoint on the cluster's workers; this cluster does not allow it (its workers' setting nnsight-dask.trust-remote-code is False). Ask its operator, or load the model yourself with nd.LanguageModel(path, trust_remote_code=True)
    """
    checked = dict(options or {})
    for name, value in checked.items():
        kind = SHARD_LOAD_OPTIONS.get(name)
        if kind is None:
            raise LoadOptionError(f"load option {name!r} is not taken by a deployment's shards; they take "
                                  f"{sorted(SHARD_LOAD_OPTIONS)} (and dtype)", option=name)
        if not isinstance(value, kind):
            raise LoadOptionError(f"load option {name!r} takes a {kind.__name__}, not {type(value).__name__} "
                                  f"({value!r})", option=name)
    subfolder = Path(checked.get("subfolder", ""))
    if subfolder.is_absolute() or ".." in subfolder.parts:
        raise LoadOptionError(f"load option subfolder={str(subfolder)!r} must name a folder inside the model's "
                              "directory", option="subfolder")
    remote_code = [f"{name}={checked[name]!r}" for name in ("trust_remote_code", "attn_implementation")
                   if checked.get(name) is True or "/" in str(checked.get(name, ""))]
    if remote_code and trust_remote_code is False:
        raise LoadOptionError(
            f"load option {', '.join(remote_code)} runs Python files shipped with the checkpoint on the cluster's "
            "workers; this cluster does not allow it (its workers' setting nnsight-dask.trust-remote-code is "
            "False). Ask its operator, or load the model yourself with nd.LanguageModel(path, "
            f"{remote_code[0]})", option=remote_code[0].split("=")[0])
    return checked


def split_dtype(options: Mapping[str, Any] | None, dtype: torch.dtype | str | None = None
                ) -> tuple[torch.dtype | None, dict[str, Any]]:
    """``(dtype, the other options)``: the dtype given as ``dtype=`` or in the options (``dtype`` or
    transformers 4's ``torch_dtype``), as a ``torch.dtype``; a clear error if they disagree.

    >>> split_dtype({"dtype": "bfloat16", "attn_implementation": "eager"})
    (torch.bfloat16, {'attn_implementation': 'eager'})
    """
    rest = dict(options or {})
    given = [value for value in (dtype, rest.pop("dtype", None), rest.pop("torch_dtype", None)) if value is not None]
    resolved = {_as_dtype(value) for value in given}
    if len(resolved) > 1:
        raise LoadOptionError(f"two different dtypes were given: {sorted(map(str, resolved))}", option="dtype")
    return (resolved.pop() if resolved else None), rest


def _as_dtype(value: torch.dtype | str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    found = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(found, torch.dtype):
        raise LoadOptionError(f"dtype {value!r} is not a torch dtype (e.g. 'bfloat16', torch.float16)", option="dtype")
    return found


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Make ``tokenizer`` pad on the left and make sure it has a pad token.

    Left padding keeps the last real token of every prompt at position ``-1`` of a batch. Many
    causal LMs ship without a pad token; the end-of-sequence token stands in, since padded
    positions are masked out by the attention mask anyway.

    Parameters
    ----------
    tokenizer:
        Any Hugging Face tokenizer. Changed in place and returned.

    Examples
    --------
    >>> from nnsight_dask.models import tiny_tokenizer
    >>> prepare_tokenizer(tiny_tokenizer()).padding_side
    'left'
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(
                f"Tokenizer {type(tokenizer).__name__} has neither a pad token nor an eos token, "
                "so batches of prompts cannot be padded. Set one, e.g. "
                "tokenizer.add_special_tokens({'pad_token': '<pad>'}), and pass it as tokenizer=.",
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_causal_lm(
    source: str | Path,
    *,
    gguf_file: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    **options: Any,
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local directory, a hub id, or a GGUF file.

    Parameters
    ----------
    source:
        A local Hugging Face model directory, or a hub id (``"org/name"``). With ``gguf_file``, the
        directory (or hub repo) that holds the GGUF file.
    gguf_file:
        File name of a GGUF checkpoint inside ``source``. GGUF weights are dequantized on load, so
        the model computes in ``dtype`` (default float32).
    dtype:
        Parameter dtype, e.g. ``torch.bfloat16``. ``None`` keeps the checkpoint's own dtype
        (float32 for GGUF).
    device:
        Where to put the model (``"cpu"``, ``"cuda:0"``). ``None`` leaves it on the CPU.
    tokenizer:
        A tokenizer to use instead of the one stored with the model. It is still switched to left
        padding with a pad token (see :func:`prepare_tokenizer`).
    options:
        Passed to ``from_pretrained`` as they are: ``attn_implementation="eager"`` (attention
        modules then return their weights: ``self_attn.output[1]``), ``revision=``,
        ``low_cpu_mem_usage=``, ``trust_remote_code=``, config overrides... ``revision``,
        ``subfolder`` and ``trust_remote_code`` also go to the tokenizer.

    Returns
    -------
    (model, tokenizer)
        The model in eval mode, and the prepared tokenizer.

    Raises
    ------
    ModelLoadError
        ``source`` is neither an existing directory nor a reachable hub id, the GGUF file is
        missing, or transformers cannot read the checkpoint. The message names the source.

    Examples
    --------
    >>> import tempfile
    >>> from nnsight_dask.models import save_tiny
    >>> path = save_tiny(tempfile.mkdtemp(), arch="llama")
    >>> model, tok = load_causal_lm(path)
    >>> model.training, tok.padding_side
    (False, 'left')
    """
    from transformers import AutoModelForCausalLM

    src = str(source)
    is_dir = Path(src).is_dir()
    if not is_dir and _looks_like_path(src):
        raise ModelLoadError(
            f"Model source {src!r} is not a directory. Pass a local Hugging Face model directory "
            "(with config.json), a hub id like 'org/name', or a directory plus gguf_file=.",
            source=src,
        )
    if gguf_file is not None and is_dir and not (Path(src) / gguf_file).is_file():
        raise ModelLoadError(
            f"GGUF file {gguf_file!r} not found in {src!r}. "
            f"Files there: {sorted(p.name for p in Path(src).iterdir())}.",
            source=src,
        )

    kwargs: dict[str, object] = dict(options)
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    except ImportError as exc:
        raise ModelLoadError(
            f"Loading {src!r} needs a package that is not installed: {exc}. "
            "For GGUF files: pip install 'nnsight-dask[gguf]' (gguf and accelerate).",
            source=src,
        ) from exc
    except (OSError, ValueError, EnvironmentError) as exc:
        where = "local directory" if is_dir else "hub id (not a local directory; is the hub reachable?)"
        raise ModelLoadError(
            f"Cannot load a causal LM from {src!r} ({where}): {exc}",
            source=src,
        ) from exc

    if tokenizer is None:
        tokenizer = load_tokenizer(src, gguf_file=gguf_file,
                                   **{name: options[name] for name in _TOKENIZER_OPTIONS if name in options})
    else:
        prepare_tokenizer(tokenizer)

    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer


def load_tokenizer(source: str | Path, *, gguf_file: str | None = None, **options: Any) -> PreTrainedTokenizerBase:
    """The tokenizer stored with a model (directory, hub id, or GGUF file), prepared for batches.

    ``options`` go to ``AutoTokenizer.from_pretrained`` (``revision=``, ``subfolder=``...).

    Raises
    ------
    ModelLoadError
        transformers cannot read a tokenizer there; the message names the source.
    """
    from transformers import AutoTokenizer

    src = str(source)
    kwargs: dict[str, object] = dict(options)
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"Cannot load the tokenizer of the model at {src!r}: {exc}. Pass one with tokenizer=.",
            source=src,
        ) from exc
    return prepare_tokenizer(tokenizer)


def _looks_like_path(src: str) -> bool:
    """True when ``src`` cannot be a hub id, so a missing directory is the user's typo, not the hub."""
    return (
        src.startswith(("/", ".", "~"))
        or "\\" in src
        or src.count("/") > 1
        or Path(src).exists()
    )
