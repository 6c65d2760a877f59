"""Seeded sampling: the same seed gives the same tokens, locally and (test_cotenancy_cluster.py) remotely."""
from __future__ import annotations

from typing import Any

import pytest
import torch

import nnsight_dask as nd
from nnsight_dask.errors import GraphValidationError
from nnsight_dask.execution.sampling import SeededSampler
from nnsight_dask.models import tiny_llama

torch.set_num_threads(1)

PROMPT = "The Eiffel Tower is in the city of"


@pytest.fixture(scope="module")
def lm(tiny_tokenizer: Any) -> Any:
    return nd.LanguageModel(tiny_llama(n_layer=2), tokenizer=tiny_tokenizer)


def test_the_sampler_follows_the_distribution_and_its_filters() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    draws = torch.stack([SeededSampler(seed).pick(logits)[0] for seed in range(4000)])
    frequencies = torch.bincount(draws, minlength=5).float() / len(draws)
    assert (frequencies - torch.softmax(logits[0], -1)).abs().max() < 0.03
    cold = torch.stack([SeededSampler(seed, temperature=0.05).pick(logits)[0] for seed in range(200)])
    assert torch.equal(cold, torch.zeros(200, dtype=torch.long))  # low temperature: greedy
    top2 = {int(SeededSampler(seed, top_k=2).pick(logits)[0]) for seed in range(300)}
    assert top2 == {0, 1}
    # probabilities 0.61, 0.22, 0.14, ...: the smallest set holding top_p of the mass
    nucleus = {int(SeededSampler(seed, top_p=0.7).pick(logits)[0]) for seed in range(300)}
    assert nucleus == {0, 1}
    assert {int(SeededSampler(seed, top_p=0.6).pick(logits)[0]) for seed in range(300)} == {0}
    rows = torch.randn(3, 50)
    sampler_a, sampler_b = SeededSampler(7, top_p=0.9), SeededSampler(7, top_p=0.9)
    assert all(torch.equal(sampler_a.pick(rows), sampler_b.pick(rows)) for _ in range(5))


def test_local_sampling_repeats_with_its_seed_and_varies_without(lm: Any) -> None:
    def sample(**options: Any) -> torch.Tensor:
        with lm.generate([PROMPT, "Hello world"], max_new_tokens=6, do_sample=True, **options):
            ids = lm.generator.output.save()
        return ids

    first = sample(seed=3, temperature=1.5, top_k=40, top_p=0.95)
    assert torch.equal(first, sample(seed=3, temperature=1.5, top_k=40, top_p=0.95))
    assert not torch.equal(first, sample(seed=4, temperature=1.5, top_k=40, top_p=0.95))
    unseeded = {tuple(sample(temperature=2.0).flatten().tolist()) for _ in range(3)}
    assert len(unseeded) > 1  # each generation drew its own seed
    with lm.generate(PROMPT, max_new_tokens=6):
        greedy = lm.generator.output.save()
    assert torch.equal(greedy, sample(seed=1, top_k=1)[:1])  # top-1 sampling is greedy


@pytest.mark.parametrize("options, field", [
    ({"temperature": 0}, "temperature"), ({"top_k": -1}, "top_k"), ({"top_p": 1.5}, "top_p"),
    ({"seed": -2}, "seed"), ({"seed": "x"}, "seed"),
])
def test_bad_sampling_options_are_refused_naming_the_field(lm: Any, options: dict[str, Any], field: str) -> None:
    with pytest.raises(GraphValidationError, match=field):
        with lm.generate(PROMPT, max_new_tokens=2, do_sample=True, **options):
            lm.generator.output.save()
