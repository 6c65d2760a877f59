"""Models: loading (HF directory or id, GGUF), SmolLM2, tiny seeded test models, shard plans.

Importing this package has no side effects and imports neither Dask nor the tracing layer.
"""
from __future__ import annotations

from nnsight_dask.models.loading import ModelLoadError, load_causal_lm, prepare_tokenizer
from nnsight_dask.models.shards import (
    ShardPlanError,
    ShardSpec,
    find_layers,
    normalize_path,
    owner_of,
    plan_shards,
)
from nnsight_dask.models.smollm2 import (
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

# Wrappers returning a traceable LanguageModel (e.g. ``smollm2()``) belong below; they import
# ``nnsight_dask.tracing`` lazily, inside the function, so this package stays importable alone.

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
    "smollm2_available",
    "smollm2_cache_path",
    "smollm2_gguf_path",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_tokenizer",
]
