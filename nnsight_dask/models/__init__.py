"""Models: loading (HF directory or id, GGUF), SmolLM2, tiny seeded test models, shard plans.

Importing this package has no side effects and imports neither Dask nor the tracing layer.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from nnsight_dask.tracing import LanguageModel

from nnsight_dask.models.loading import ModelLoadError, load_causal_lm, prepare_tokenizer
from nnsight_dask.models.shards import (
    ShardPlanError,
    ShardSpec,
    find_layers,
    normalize_path,
    owner_of,
    plan_shards,
)
from nnsight_dask.models._smollm2 import (
    SMOLLM2_INSTALL,
    load_smollm2,
    smollm2_available,
    smollm2_cache_path,
    smollm2_gguf_path,
)
from nnsight_dask.models.tiny import (
    TINY_VOCAB,
    TINY_VOCAB_SIZE,
    save_tiny,
    tiny_gpt2,
    tiny_llama,
    tiny_tokenizer,
)


__all__ = [
    "SMOLLM2_INSTALL",
    "TINY_VOCAB",
    "TINY_VOCAB_SIZE",
    "ModelLoadError",
    "ShardPlanError",
    "ShardSpec",
    "find_layers",
    "load_causal_lm",
    "load_smollm2",
    "normalize_path",
    "owner_of",
    "plan_shards",
    "prepare_tokenizer",
    "save_tiny",
    "smollm2",
    "smollm2_available",
    "smollm2_cache_path",
    "smollm2_gguf_path",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_tokenizer",
]


def smollm2(dtype: torch.dtype | None = None) -> LanguageModel:
    """SmolLM2-135M-Instruct as a ready :class:`~nnsight_dask.LanguageModel` (converted once, then cached).

    >>> lm = nd.models.smollm2()                                  # doctest: +SKIP
    >>> with lm.generate("The capital of France is", max_new_tokens=2) as t:   # doctest: +SKIP
    ...     ids = t.result.save()
    """
    import torch

    from nnsight_dask.tracing import LanguageModel

    model, tokenizer = load_smollm2(dtype or torch.float32)
    return LanguageModel(model, tokenizer=tokenizer, model_id="SmolLM2-135M-Instruct")
