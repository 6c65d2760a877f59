"""nnsight semantics in the engine (issue 14, items 2 and 6), against plain PyTorch on the same models.

Item 2: a ``.grad`` read belongs to the next ``backward()`` after it in program order.
Item 6: a padded batch runs as the model's own batched forward (``model(**tok(prompts, padding=True))``),
whether spelled ``trace([a, b])`` or as two invokes; ``positions="solo"`` opts into solo positions.
"""
from __future__ import annotations

import pytest
import torch

import nnsight_dask as nd
from nnsight_dask.errors import GraphValidationError, TracingError
from nnsight_dask.models import tiny_gpt2, tiny_llama

torch.set_num_threads(1)

PROMPT = "The Eiffel Tower is in the city of"
SHORT = "Paris"


@pytest.fixture(scope="module")
def lm(tiny_tokenizer):
    return nd.LanguageModel(tiny_llama(n_layer=4), tokenizer=tiny_tokenizer)


@pytest.fixture(scope="module")
def gpt(tiny_tokenizer):
    return nd.LanguageModel(tiny_gpt2(n_layer=3), tokenizer=tiny_tokenizer)


def val(x):
    """A saved value (a tensor after the trace; a proxy's ``.value`` where it stays a proxy)."""
    return getattr(x, "value", x)


def encode(lm, texts):
    return dict(lm.tokenizer(texts, return_tensors="pt", padding=True))


# -- item 2: several backward() calls ----------------------------------------------------------------
def two_backwards_reference(lm, path, retain):
    """Plain torch: ``register_hook`` on the module's output, one hook per backward call."""
    model = lm._module
    seen = {}
    handle = model.get_submodule(path).register_forward_hook(lambda m, a, o: seen.__setitem__("h", o))
    try:
        loss = model(**encode(lm, [PROMPT])).logits[:, -1].max()
    finally:
        handle.remove()
    grads = []
    h = seen["h"]
    hook = h.register_hook(lambda g: grads.append(g.clone()))
    loss.backward(retain_graph=True)
    hook.remove()
    hook = h.register_hook(lambda g: grads.append(g.clone()))
    (2 * loss).backward(retain_graph=retain)
    hook.remove()
    model.zero_grad()
    return grads


def test_each_grad_read_gets_the_next_backward(lm):
    with lm.trace(PROMPT):
        h = lm.model.layers[1].output
        first = h.grad.save()
        loss = lm.output.logits[:, -1].max()
        loss.backward(retain_graph=True)
        second = h.grad.save()
        (2 * loss).backward()
    ref = two_backwards_reference(lm, "model.layers.1", retain=False)
    assert torch.allclose(val(first), ref[0], atol=1e-6)
    assert torch.allclose(val(second), ref[1], atol=1e-6)
    assert torch.allclose(val(second), 2 * val(first), atol=1e-6)
    assert val(first).abs().sum() > 0


def test_grad_setter_applies_only_to_its_backward(lm):
    """A write of .grad before the second backward changes that backward only."""
    with lm.trace(PROMPT):
        loss = lm.output.logits[:, -1].max()
        g0_first = lm.model.layers[0].output.grad.save()
        loss.backward(retain_graph=True)
        lm.model.layers[2].output.grad = torch.zeros_like(lm.model.layers[2].output)
        g0_second = lm.model.layers[0].output.grad.save()
        loss.backward()
    assert val(g0_first).abs().sum() > 0
    assert torch.all(val(g0_second) == 0)  # zeroed at layer 2 in the second backward only


def test_backwards_run_in_order_not_nested(lm):
    """Without retain_graph the second backward must run after the first returns (not inside its hook):
    it then fails in torch itself, as plain torch code does, instead of silently running early."""
    # (nested inside the first backward's hook it failed with "does not require grad" instead)
    with pytest.raises(Exception, match="(?i)backward through the graph a second time"), lm.trace(PROMPT):
        h = lm.model.layers[1].output
        h.grad.save()
        loss = lm.output.logits[:, -1].max()
        loss.backward()
        h.grad.save()
        (2 * loss).backward()


def test_code_after_a_backward_sees_its_gradient(lm):
    """Values computed from a gradient after its backward, in program order."""
    with lm.trace(PROMPT):
        h = lm.model.layers[1].output
        g = h.grad
        loss = lm.output.logits[:, -1].max()
        loss.backward(retain_graph=True)
        norm = g.norm().save()
        g2 = h.grad.save()
        (3 * loss).backward()
        ratio = (g2.norm() / norm).save()
    assert torch.allclose(val(ratio), torch.tensor(3.0), atol=1e-5)


# -- item 6: padding and positions -------------------------------------------------------------------
def assert_both_spellings_equal_the_batched_forward(model, reference, atol):
    """``trace([a, b])`` and two invokes on ``model`` both equal ``reference``'s own padded batched forward."""
    with model.trace([PROMPT, SHORT]):
        together = model.output.logits.save()
    with model.trace() as tracer:
        with tracer.invoke(PROMPT):
            first = model.output.logits.save()
        with tracer.invoke(SHORT):
            second = model.output.logits.save()
    with torch.no_grad():
        ref = reference._module(**encode(reference, [PROMPT, SHORT])).logits
    assert torch.allclose(val(together), ref, atol=atol)
    assert torch.allclose(val(first)[0], ref[0], atol=atol)
    assert torch.allclose(val(second)[-1], ref[1], atol=atol)


@pytest.mark.parametrize("which", ["lm", "gpt"])
def test_both_batch_spellings_equal_the_models_batched_forward(which, lm, gpt):
    model = {"lm": lm, "gpt": gpt}[which]
    assert_both_spellings_equal_the_batched_forward(model, model, atol=1e-5)


def test_gpt2_padded_prompt_differs_from_its_solo_run(gpt):
    """Documented consequence of the nnsight rule on absolute positions (GPT-2)."""
    with gpt.trace([PROMPT, SHORT]):
        batched = gpt.output.logits.save()
    with gpt.trace(SHORT):
        alone = gpt.output.logits.save()
    assert not torch.allclose(val(batched)[1, -1], val(alone)[0, -1], atol=1e-3)


def test_solo_positions_switch(gpt):
    """``trace(positions="solo")``: position ids from the attention mask, each prompt as alone."""
    with gpt.trace(positions="solo") as tracer:
        with tracer.invoke(PROMPT):
            first = gpt.output.logits.save()
        with tracer.invoke(SHORT):
            second = gpt.output.logits.save()
    with gpt.trace(SHORT):
        alone = gpt.output.logits.save()
    with gpt.trace(PROMPT):
        alone_long = gpt.output.logits.save()
    assert torch.allclose(val(second)[0, -1], val(alone)[0, -1], atol=1e-5)
    assert torch.allclose(val(first), val(alone_long), atol=1e-5)


def test_unknown_positions_value_is_refused(gpt):
    with pytest.raises(TracingError, match="'model'.*'solo'"):
        gpt.trace(PROMPT, positions="absolute")
    with pytest.raises(GraphValidationError, match="'model', 'solo'"), gpt.trace(PROMPT) as tracer:
        tracer._require().graph.options["positions"] = "absolute"  # a graph that skipped the tracer's check
        gpt.output.logits.save()


@pytest.mark.parametrize("which", ["lm", "gpt"])
def test_generate_equals_transformers_generate(which, lm, gpt):
    model = {"lm": lm, "gpt": gpt}[which]
    with model.generate([PROMPT, SHORT], max_new_tokens=4):
        out = model.generator.output.save()
    tok = model.tokenizer
    ref = model._module.generate(**encode(model, [PROMPT, SHORT]), max_new_tokens=4, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
    assert torch.equal(val(out), ref)


@pytest.fixture(scope="module")
def remote(client, model_dir):
    nd.serve(client, model_dir, shards=2, name="compat-exec")
    return nd.RemoteModel(client, "compat-exec")


def test_remote_batch_follows_the_same_rule(remote, local):
    """Shards: both spellings equal the model's own batched forward."""
    assert_both_spellings_equal_the_batched_forward(remote, local, atol=1e-4)


def test_remote_padded_generation_equals_transformers_generate(remote, local):
    with remote.generate([PROMPT, SHORT], max_new_tokens=4):
        out = remote.generator.output.save()
    want = local._module.generate(**encode(local, [PROMPT, SHORT]), max_new_tokens=4, do_sample=False,
                                  pad_token_id=local.tokenizer.pad_token_id)
    assert torch.equal(val(out), want)
