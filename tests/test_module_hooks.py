"""How a trace hooks the modules it touches: around ``forward`` where no one else hooks the module, as
torch hooks where others do, the same results and order either way, and nothing left behind."""
from __future__ import annotations

import inspect
from typing import Any

import torch

import nnsight_dask as nd

PROMPT = "The Eiffel Tower is in the city of"


def test_a_trace_leaves_the_modules_as_it_found_them(gpt: Any) -> None:
    block = gpt._module.transformer.h[0]
    signature = inspect.signature(block.forward)
    with gpt.trace(PROMPT):
        gpt.transformer.h[0].output[:, -1] = 0
        hidden = gpt.transformer.h[0].output.save()
    assert torch.all(hidden[:, -1] == 0)
    assert "forward" not in block.__dict__
    assert not block._forward_hooks and not block._forward_pre_hooks
    assert inspect.signature(block.forward) == signature


def test_others_hooks_run_before_ours_as_with_torch_hooks(gpt: Any) -> None:
    """A module someone else hooks keeps torch's order: their hook sees the output before our write."""
    block = gpt._module.transformer.h[1]
    seen: list[torch.Tensor] = []
    handle = block.register_forward_hook(lambda _m, _a, out: seen.append(out.detach().clone()))
    try:
        with gpt.trace(PROMPT):
            gpt.transformer.h[1].output[:] = 0
            after = gpt.transformer.h[2].input.save()
    finally:
        handle.remove()
    assert len(seen) == 1 and seen[0].abs().sum() > 0  # theirs ran first, on the model's own output
    assert torch.equal(after, torch.zeros_like(seen[0]))  # ours then wrote the zeros the next layer got
    assert "forward" not in block.__dict__ and not block._forward_hooks


def test_an_instance_forward_is_kept_and_runs_inside_ours(gpt: Any) -> None:
    """A module whose forward is an instance attribute (accelerate's hooks set one) is hooked with
    torch hooks, and its own forward is still there afterwards."""
    block = gpt._module.transformer.h[0]
    calls: list[int] = []
    original = block.forward

    def counting_forward(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    block.forward = counting_forward
    try:
        with gpt.trace(PROMPT):
            hidden = gpt.transformer.h[0].output.save()
        assert calls == [1] and hidden.shape[-1] == 64
        assert block.__dict__["forward"] is counting_forward
        assert not block._forward_hooks and not block._forward_pre_hooks
    finally:
        del block.forward


def test_wrapped_and_hooked_modules_give_the_same_values(tiny_tokenizer: Any) -> None:
    """The same trace on a model whose layers carry a no-op hook of someone else (so ours are torch hooks)
    and on the same model without (so ours wrap forward): identical saves."""
    from nnsight_dask.models import tiny_gpt2

    lm = nd.LanguageModel(tiny_gpt2(n_layer=3), tokenizer=tiny_tokenizer)

    def run() -> list[torch.Tensor]:
        with lm.trace(PROMPT):
            saves = []
            for i in range(3):
                if i == 1:
                    lm.transformer.h[i].output[:, -1] = 0
                saves.append(lm.transformer.h[i].output.save())
            logits = lm.lm_head.output.save()
        return [s.value for s in saves] + [logits]

    wrapped = run()
    handles = [block.register_forward_pre_hook(lambda *_: None) for block in lm._module.transformer.h]
    try:
        hooked = run()
    finally:
        for handle in handles:
            handle.remove()
    for a, b in zip(wrapped, hooked):
        assert torch.equal(a, b)


def test_a_skip_puts_back_an_instance_forward(gpt: Any) -> None:
    """A skipped module whose forward is an instance attribute (accelerate's) gets that forward back."""
    block = gpt._module.transformer.h[1]

    def own_forward(*args: Any, **kwargs: Any) -> Any:
        return type(block).forward(block, *args, **kwargs)

    block.forward = own_forward
    try:
        with gpt.trace(PROMPT):
            gpt.transformer.h[1].skip(gpt.transformer.h[0].output)
            after = gpt.transformer.h[2].input.save()
            first = gpt.transformer.h[0].output.save()
        assert torch.equal(after, first)
        assert block.__dict__["forward"] is own_forward
    finally:
        del block.forward


def test_two_reads_of_one_call_around_an_in_place_write_see_it_as_torch_does(gpt: Any) -> None:
    """Reads of one module call take its output one after the other; a write recorded between them
    changes that one tensor in place, as a plain PyTorch hook's write does: both reads, and the next
    layer, see it."""
    block = gpt._module.transformer.h[0]
    with gpt.trace(PROMPT):
        first = gpt.transformer.h[0].output
        first[:, -1] = 0
        second = gpt.transformer.h[0].output.save()
        after = gpt.transformer.h[1].input.save()

    seen: list[torch.Tensor] = []

    def write(_module: Any, _args: Any, output: torch.Tensor) -> None:
        output[:, -1] = 0

    handles = [block.register_forward_hook(write),
               gpt._module.transformer.h[1].register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))]
    try:
        with torch.no_grad():
            gpt._module(**gpt.encode(PROMPT))
    finally:
        for handle in handles:
            handle.remove()
    assert torch.all(second[:, -1] == 0)
    assert torch.equal(after, seen[0]) and torch.equal(second, seen[0])
