"""Models: loading (HF directory or id, GGUF), SmolLM2, tiny seeded test models (and a simulated-GPU
one for benchmarks), shard plans.

Importing this package has no side effects and imports neither Dask nor the tracing layer; the
ready-to-trace wrappers (``nd.LanguageModel(path)``, ``nd.smollm2()``) are made in :mod:`nnsight_dask.api`.
"""
from __future__ import annotations

from nnsight_dask.models._smollm2 import (
    SMOLLM2_INSTALL,
    load_smollm2,
    smollm2_available,
    smollm2_cache_path,
    smollm2_gguf_path,
)
from nnsight_dask.models.loading import (
    ModelLoadError,
    load_causal_lm,
    prepare_tokenizer,
)
from nnsight_dask.models.shards import (
    ShardPlanError,
    ShardSpec,
    find_layers,
    normalize_path,
    owner_of,
    plan_shards,
)
from nnsight_dask.models.simulated import SIMULATED_LAYER_MS, SimulatedLlama, simulated_llama
from nnsight_dask.models.tiny import (
    TINY_VOCAB,
    TINY_VOCAB_SIZE,
    save_tiny,
    tiny_family,
    tiny_gpt2,
    tiny_llama,
    tiny_tokenizer,
)

__all__ = [
    "SIMULATED_LAYER_MS",
    "SMOLLM2_INSTALL",
    "SimulatedLlama",
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
    "simulated_llama",
    "smollm2_available",
    "smollm2_cache_path",
    "smollm2_gguf_path",
    "tiny_family",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_tokenizer",
]
