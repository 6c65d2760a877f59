"""A trace's prompt tokenized the short way (:mod:`nnsight_dask.tracing.tokenizing`) gives exactly what
the tokenizer's ordinary call gives, and the short way is refused wherever it might not."""
from __future__ import annotations

from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from nnsight_dask.models import prepare_tokenizer
from nnsight_dask.tracing.model import encode_prompt
from nnsight_dask.tracing.tokenizing import direct_ids

TEXTS = ["The Eiffel Tower is in the city of", "", "   ", "Paris.", "héllo wörld, 你好!", "<pad> The <eos> city",
         "two  spaces\tand\na newline", "The " * 40]


def bpe_with_bos() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained here on a few sentences, adding a <bos> token in front (a template)."""
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(TEXTS * 5, trainers.BpeTrainer(vocab_size=300, special_tokens=["<bos>", "<eos>", "<pad>"],
                                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return prepare_tokenizer(PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                                     pad_token="<pad>", padding_side="left", model_max_length=64))


def ordinary(tokenizer: Any, text: str) -> dict[str, torch.Tensor]:
    encoded = tokenizer([text], padding=True)
    return {key: torch.tensor(encoded[key], dtype=torch.long) for key in ("input_ids", "attention_mask")}


def assert_same(tokenizer: Any, text: str) -> None:
    expected, got = ordinary(tokenizer, text), encode_prompt(text, tokenizer)
    assert set(got) == {"input_ids", "attention_mask"}
    for key in expected:
        assert got[key].dtype == torch.long and got[key].shape == expected[key].shape, (key, text)
        assert torch.equal(got[key], expected[key]), (key, text)


@pytest.fixture(params=["word-level", "bpe+bos"])
def tokenizer(request: pytest.FixtureRequest, tiny_tokenizer: Any) -> Any:
    return tiny_tokenizer if request.param == "word-level" else bpe_with_bos()


@pytest.mark.parametrize("text", TEXTS)
def test_a_prompt_encodes_as_the_tokenizer_encodes_it(tokenizer: Any, text: str) -> None:
    assert_same(tokenizer, text)
    if len(ordinary(tokenizer, text)["input_ids"][0]) <= tokenizer.model_max_length:
        assert direct_ids(tokenizer, text) is not None  # the short way was taken


def test_settings_left_on_the_rust_tokenizer_send_the_prompt_the_ordinary_way() -> None:
    tokenizer = bpe_with_bos()
    text = TEXTS[0]
    tokenizer([text], padding="max_length", max_length=20)  # leaves a fixed padding length set
    assert direct_ids(tokenizer, text) is None
    assert_same(tokenizer, text)  # the ordinary call reset it
    assert direct_ids(tokenizer, text) is not None
    tokenizer([text], truncation=True, max_length=3)  # leaves truncation set
    assert direct_ids(tokenizer, text) is None
    assert_same(tokenizer, text)
    tokenizer.split_special_tokens = True  # "<pad>" as text, not as the pad token
    assert direct_ids(tokenizer, TEXTS[5]) is None
    assert_same(tokenizer, TEXTS[5])
    assert direct_ids(tokenizer, TEXTS[5]) is not None  # the Rust tokenizer now splits them too


def test_too_long_prompts_and_tokenizer_options_go_the_ordinary_way(tiny_tokenizer: Any) -> None:
    tokenizer = bpe_with_bos()
    long_text = "The Eiffel Tower " * 40
    assert direct_ids(tokenizer, long_text) is None  # over model_max_length: the tokenizer warns as it does
    assert_same(tokenizer, long_text)
    with_options = encode_prompt(TEXTS[0], tiny_tokenizer, add_special_tokens=False)
    assert torch.equal(with_options["input_ids"],
                       torch.tensor(tiny_tokenizer([TEXTS[0]], add_special_tokens=False)["input_ids"]))


def test_tokenizer_classes_with_their_own_call_path_go_the_ordinary_way(tiny_tokenizer: Any) -> None:
    class Shouting(PreTrainedTokenizerFast):
        def _encode_plus(self, text: Any, *args: Any, **kwargs: Any) -> Any:
            return super()._encode_plus(text.upper() if isinstance(text, str) else [t.upper() for t in text],
                                        *args, **kwargs)

    shouting = Shouting(tokenizer_object=tiny_tokenizer.backend_tokenizer, pad_token="<pad>", padding_side="left")
    assert direct_ids(shouting, "the city") is None
    assert torch.equal(encode_prompt("the city", shouting)["input_ids"],
                       torch.tensor(shouting(["the city"], padding=True)["input_ids"]))


def test_a_tokenizer_without_a_pad_token_is_refused_as_before() -> None:
    tokenizer = bpe_with_bos()
    tokenizer.pad_token = None
    assert direct_ids(tokenizer, TEXTS[0]) is None
    with pytest.raises(ValueError, match="pad"):
        encode_prompt(TEXTS[0], tokenizer)


@pytest.mark.smollm2
def test_smollm2s_tokenizer(smollm2: tuple[Any, Any]) -> None:
    _, tokenizer = smollm2
    for text in (*TEXTS, "<|im_start|>user\nWhat is the capital of France?<|im_end|>"):
        assert_same(tokenizer, text)
        assert direct_ids(tokenizer, text) is not None
