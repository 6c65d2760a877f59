"""Tiny, seeded, offline models and a tokenizer for tests, examples and benchmarks.

No model hub is reachable, so tests build their models here: real transformers architectures
(GPT-2, Llama, and any decoder family transformers has, see :func:`tiny_family`) from small configs
with weights drawn from a fixed seed, and a real
``PreTrainedTokenizerFast`` over a small fixed English word list. The same seed gives the same
weights in every process, so a shard rebuilt on a Dask worker matches the client's copy bit for bit.

The weights are random: the models do not know that Paris is in France, but their module tree,
shapes and call order are exactly those of the full-size models.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "TINY_VOCAB",
    "TINY_VOCAB_SIZE",
    "save_tiny",
    "tiny_family",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_tokenizer",
]

_SPECIAL = ("<unk>", "<pad>", "<bos>", "<eos>")

_WORDS = (
    # punctuation
    ".", ",", "?", "!", ":", ";", "'", '"', "-", "(", ")",
    # function words
    "The", "the", "A", "a", "An", "an", "is", "was", "are", "were", "be", "in", "of", "to", "and",
    "or", "not", "on", "at", "by", "for", "from", "with", "as", "it", "It", "its", "this", "This",
    "that", "That", "what", "What", "which", "who", "where", "Where", "when", "how", "I", "you",
    "he", "she", "we", "they", "my", "your", "his", "her", "our", "their", "there", "There", "has",
    "have", "had", "do", "does", "did", "can", "will", "would", "very", "also", "one", "two",
    "three", "first", "last", "new", "old", "big", "small", "good", "bad", "same", "other",
    # places and facts used in examples
    "Eiffel", "Tower", "Colosseum", "Louvre", "Big", "Ben", "city", "country", "capital",
    "Paris", "Rome", "London", "Berlin", "Madrid", "Tokyo", "France", "Italy", "England",
    "Germany", "Spain", "Japan", "Europe", "located", "famous", "museum", "river", "Seine",
    "Thames", "language", "French", "Italian", "English", "German", "speak", "speaks", "people",
    # words for sentiment / steering / probing examples
    "I", "love", "hate", "like", "happy", "sad", "great", "terrible", "movie", "book", "food",
    "day", "today", "yesterday", "weather", "sunny", "rainy", "cat", "dog", "cats", "dogs",
    "red", "blue", "green", "yellow", "color", "number", "answer", "question", "yes", "no",
    "true", "false", "Answer", "Question", "model", "language", "word", "next", "token",
)


def _dedupe(words: tuple[str, ...]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return tuple(seen)


#: The tiny tokenizer's vocabulary, in id order: ``<unk>=0, <pad>=1, <bos>=2, <eos>=3``, then words.
TINY_VOCAB: tuple[str, ...] = _SPECIAL + tuple(w for w in _dedupe(_WORDS) if w not in _SPECIAL)

#: Vocabulary size of :func:`tiny_tokenizer` and of the tiny models' embeddings and heads.
TINY_VOCAB_SIZE: int = len(TINY_VOCAB)

_UNK, _PAD, _BOS, _EOS = 0, 1, 2, 3
_MAX_POSITIONS = 256


def tiny_tokenizer() -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over :data:`TINY_VOCAB`, built offline.

    Words and punctuation are split on whitespace and punctuation; unknown words map to
    ``<unk>``. Pad, bos and eos tokens are defined and padding is on the left, like
    :func:`~nnsight_dask.models.loading.load_causal_lm` leaves a real tokenizer. No bos token is
    prepended, so ``"The Eiffel Tower"`` is three tokens.

    Returns a new tokenizer each call (tokenizers are mutable).

    Examples
    --------
    >>> tok = tiny_tokenizer()
    >>> ids = tok("The Eiffel Tower is in the city of").input_ids
    >>> len(ids), tok.decode(ids)
    (8, 'The Eiffel Tower is in the city of')
    >>> tok.vocab_size == TINY_VOCAB_SIZE
    True
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(
        models.WordLevel(vocab={w: i for i, w in enumerate(TINY_VOCAB)}, unk_token="<unk>")
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    # WordPiece's decoder joins words with spaces and glues punctuation back ("Paris ." -> "Paris.").
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        padding_side="left",
        model_max_length=_MAX_POSITIONS,
    )
    return tokenizer


#: torch has one global generator per process: two threads seeding it at once would mix their draws.
_SEEDING = threading.Lock()


def _seeded(seed: int, build: Any) -> torch.nn.Module:
    """Build a module with weights drawn from ``seed``, leaving the caller's RNG state untouched.

    Serialized across threads (e.g. two shards of an in-process cluster building at once), so the
    weights are the seed's whatever else runs.
    """
    with _SEEDING, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    model = model.to(torch.float32)
    model.eval()
    return model


def tiny_gpt2(n_layer: int = 2, n_embd: int = 64, seed: int = 0, **config: Any) -> torch.nn.Module:
    """A seeded ``GPT2LMHeadModel`` (float32, eval mode) over :data:`TINY_VOCAB`.

    Module paths are GPT-2's: ``transformer.wte``, ``transformer.h.0.attn``, ``transformer.h.0.mlp``,
    ``transformer.ln_f``, ``lm_head``. ``tiny_gpt2(n_layer=12, n_embd=256)`` is the benchmark
    size. Extra keyword arguments override ``GPT2Config`` fields.

    Examples
    --------
    >>> model = tiny_gpt2()
    >>> len(model.transformer.h), model.config.n_embd, model.training
    (2, 64, False)
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    fields: dict[str, Any] = dict(
        vocab_size=TINY_VOCAB_SIZE,
        n_positions=_MAX_POSITIONS,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=4,
        bos_token_id=_BOS,
        eos_token_id=_EOS,
        pad_token_id=_PAD,
    )
    fields.update(config)
    cfg = GPT2Config(**fields)
    return _seeded(seed, lambda: GPT2LMHeadModel(cfg))


def tiny_llama(n_layer: int = 2, hidden: int = 64, seed: int = 0, **config: Any) -> torch.nn.Module:
    """A seeded ``LlamaForCausalLM`` (float32, eval mode) over :data:`TINY_VOCAB`.

    Same module paths as SmolLM2: ``model.embed_tokens``, ``model.layers.0.self_attn``,
    ``model.layers.0.mlp.down_proj``, ``model.norm``, ``lm_head``. Four attention heads over two
    key/value heads (grouped-query attention, as in SmolLM2). Extra keyword arguments override
    ``LlamaConfig`` fields.

    Examples
    --------
    >>> model = tiny_llama(n_layer=3)
    >>> len(model.model.layers), model.config.hidden_size
    (3, 64)
    """
    return tiny_family("llama", n_layer=n_layer, hidden=hidden, seed=seed, **{"tie_word_embeddings": False, **config})


def _family_fields(model_type: str, hidden: int) -> dict[str, Any]:
    """Config fields that keep ``model_type`` tiny where its defaults are the real model's sizes (head
    width, OPT's feed-forward and projection widths, GPT-J's rotary width, experts), and what makes a
    family differ from Llama set where the default turns it off: sliding attention windows shorter
    than a test prompt, Granite's multipliers, SmolLM3's layers without rotary positions."""
    head = hidden // 4
    return {
        "qwen3": {"head_dim": head},
        "mistral": {"sliding_window": 4},
        "gemma": {"head_dim": head},
        "gemma2": {"head_dim": head, "query_pre_attn_scalar": head, "sliding_window": 4},
        "gemma3_text": {"head_dim": head, "query_pre_attn_scalar": head, "sliding_window": 4},
        "opt": {"ffn_dim": 2 * hidden, "word_embed_proj_dim": hidden},
        "gptj": {"rotary_dim": head},
        "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
        "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": hidden,
                      "shared_expert_intermediate_size": hidden},
        # multipliers other than the defaults' 1.0, and every other layer without rotary positions
        "granite": {"embedding_multiplier": 2.0, "residual_multiplier": 0.5, "attention_multiplier": 0.25,
                    "logits_scaling": 4.0},
        "smollm3": {"no_rope_layer_interval": 2},
    }.get(model_type, {})


def tiny_family(model_type: str, n_layer: int = 2, hidden: int = 32, seed: int = 0, **config: Any) -> torch.nn.Module:
    """A seeded causal LM of any transformers family (``"qwen3"``, ``"gemma2"``, ``"mixtral"``, ...) over
    :data:`TINY_VOCAB` (float32, eval mode).

    Four attention heads over two key/value heads where the family has grouped-query attention;
    every other field is the family's default (tied embeddings where the family ties them), made
    small where that default is the real model's size. Extra keyword arguments override config fields.

    Examples
    --------
    >>> model = tiny_family("qwen3", n_layer=3)
    >>> type(model).__name__, len(model.model.layers), model.config.hidden_size
    ('Qwen3ForCausalLM', 3, 32)
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    fields: dict[str, Any] = dict(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=n_layer,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=_MAX_POSITIONS,
        bos_token_id=_BOS,
        eos_token_id=_EOS,
        pad_token_id=_PAD,
        **_family_fields(model_type, hidden),
    )
    fields.update(config)
    cfg = AutoConfig.for_model(model_type, **fields)
    return _seeded(seed, lambda: AutoModelForCausalLM.from_config(cfg))


def save_tiny(
    path: str | Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    **sizes: Any,
) -> Path:
    """Write a tiny model and :func:`tiny_tokenizer` as a Hugging Face directory; return its path.

    The directory loads with ``load_causal_lm(path)`` or ``AutoModelForCausalLM.from_pretrained``,
    which is how tests exercise loading from disk without a model hub. ``sizes`` go to
    :func:`tiny_llama`, :func:`tiny_gpt2` or, for any other ``arch`` (a transformers model type such as
    ``"qwen3"``), :func:`tiny_family` (e.g. ``n_layer=4``).

    Examples
    --------
    >>> import tempfile
    >>> p = save_tiny(tempfile.mkdtemp(), arch="gpt2", n_layer=3)
    >>> (p / "config.json").is_file()
    True
    """
    from transformers import CONFIG_MAPPING

    builders = {"llama": tiny_llama, "gpt2": tiny_gpt2}
    if arch not in builders and arch not in CONFIG_MAPPING:
        raise ValueError(f"Unknown tiny architecture {arch!r}: not a transformers model type (e.g. 'llama', "
                         "'gpt2', 'qwen3', 'mixtral').")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model = builders[arch](seed=seed, **sizes) if arch in builders else tiny_family(arch, seed=seed, **sizes)
    model.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out
