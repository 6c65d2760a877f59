"""One prompt to token ids the short way: the Rust tokenizer straight, where it gives what the tokenizer gives.

Why: a trace tokenizes its prompt when it opens, and transformers' ``tokenizer([text], padding=True)``
spends most of its time in Python around the Rust call (argument checks, padding and truncation
strategies, a ``BatchEncoding``), several times what the Rust tokenizer takes for one short prompt.
For one text and no tokenizer options the result is the Rust tokenizer's own encoding, so that is
what this module asks for, and only where nothing in between could change it:

* the tokenizer is transformers' fast tokenizer (``TokenizersBackend``, transformers 5) and its class
  overrides none of the methods the call goes through (a model's own tokenizer class may);
* the Rust tokenizer truncates nothing and pads to no fixed length or multiple (transformers would
  reset such settings for this call), and splits special tokens as the tokenizer says;
* the tokenizer has a pad token (the ordinary call refuses ``padding=True`` without one);
* the prompt fits ``model_max_length`` (else the ordinary call runs, and warns as it does).

Everything else (several texts, options, other tokenizers) goes through the ordinary call. This is the
one module that knows transformers' tokenizer internals (the method names checked below).
"""
from __future__ import annotations

from typing import Any

#: The methods ``tokenizer(text)`` runs through in transformers 5; a class overriding one of them
#: may tokenize differently, so it takes the ordinary path.
_CALL_PATH = ("__call__", "_get_padding_truncation_strategies", "_encode_plus", "set_truncation_and_padding",
              "_convert_encoding")
#: Per tokenizer class: whether :func:`direct_ids` may use the Rust tokenizer (checked once per class).
_DIRECT_CLASSES: dict[type, bool] = {}


def direct_ids(tokenizer: Any, text: str) -> tuple[list[int], list[int]] | None:
    """``(input_ids, attention_mask)`` of ``text`` as ``tokenizer([text], padding=True)`` gives them
    (one row), from the Rust tokenizer directly; None where that is not known to be the same."""
    if not _direct_class(type(tokenizer)):
        return None
    pad_id = tokenizer.pad_token_id  # None without a pad token (one read: each costs ~2 us)
    if pad_id is None or pad_id < 0:
        return None  # (the ordinary call refuses to pad without a pad token, even one row)
    backend = tokenizer.backend_tokenizer
    if backend.truncation is not None or backend.encode_special_tokens != tokenizer.split_special_tokens:
        return None
    padding = backend.padding
    if padding is not None and (padding.get("length") is not None or padding.get("pad_to_multiple_of") is not None):
        return None
    encoding = backend.encode(text, add_special_tokens=True)
    ids = encoding.ids
    if len(ids) > tokenizer.model_max_length:
        return None
    return ids, encoding.attention_mask


def _direct_class(cls: type) -> bool:
    known = _DIRECT_CLASSES.get(cls)
    if known is None:
        known = _DIRECT_CLASSES[cls] = _calls_like_the_fast_tokenizer(cls)
    return known


def _calls_like_the_fast_tokenizer(cls: type) -> bool:
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend  # transformers 5
    except ImportError:
        return False
    if not issubclass(cls, TokenizersBackend) or hasattr(cls, "_switch_to_input_mode"):
        return False
    return all(getattr(cls, name, None) is getattr(TokenizersBackend, name, None) for name in _CALL_PATH)
