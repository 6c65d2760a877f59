"""Gradients through a generation: a backward at a later step reaches earlier steps' activations
through the KV cache, as in a plain PyTorch loop (the remote run is in test_cotenancy_cluster.py)."""
from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

torch.set_num_threads(1)

PROMPT = "The Eiffel Tower is in the city of"


def by_hand(lm: Any, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy decoding in a plain loop with grad on: the gradient of the last step's top logit with
    respect to layer 1's output at the first step, and at the last step's layer 3 output."""
    model = lm._module
    ids = lm.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    kept: list[torch.Tensor] = []

    def keep(_module: Any, _args: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        hidden.retain_grad()
        kept.append(hidden)

    cache, tokens, logits = DynamicCache(), ids, None
    first = model.model.layers[1].register_forward_hook(keep)
    last = model.model.layers[3].register_forward_hook(keep)
    try:
        with torch.enable_grad():
            for step in range(steps):
                logits = model(input_ids=tokens, cache=cache, use_cache=True).logits
                tokens = logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, tokens], dim=1)
            logits[0, -1].max().backward()
    finally:
        first.remove()
        last.remove()
    return kept[0].grad, kept[-1].grad, ids


def test_a_backward_at_a_later_step_reaches_the_first_steps_activations(lm: Any) -> None:
    with lm.generate(PROMPT, max_new_tokens=3) as tracer:
        first = lm.model.layers[1].output.grad.save()
        with tracer.iter[2]:
            last = lm.model.layers[3].output.grad.save()
            lm.output.logits[0, -1].max().backward()
        ids = lm.generator.output.save()
    expected_first, expected_last, expected_ids = by_hand(lm, 3)
    assert torch.equal(ids, expected_ids)
    assert torch.allclose(first, expected_first, atol=1e-6)
    assert first.abs().sum() > 0
    last = last  # saved inside tracer.iter[2]: one value per step it ran
    assert torch.allclose(last[0] if isinstance(last, list) else last, expected_last, atol=1e-6)
