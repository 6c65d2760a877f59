"""nnsight semantics in the engine (issue 14, items 2 and 6), against plain PyTorch on the same models.

Item 2: a ``.grad`` read belongs to the next ``backward()`` after it in program order.
Item 6: a padded batch runs as the model's own batched forward (``model(**tok(prompts, padding=True))``),
whether spelled ``trace([a, b])`` or as two invokes; ``positions="solo"`` opts into solo positions.
"""
from __future__ import annotations

import pytest
import torch

import nnsight_dask as nd
from nnsight_dask.errors import GraphValidationError, InterventionError, TracingError

torch.set_num_threads(1)

PROMPT = "The Eiffel Tower is in the city of"
SHORT = "Paris"


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
    assert torch.allclose(first, ref[0], atol=1e-6)
    assert torch.allclose(second, ref[1], atol=1e-6)
    assert torch.allclose(second, 2 * first, atol=1e-6)
    assert first.abs().sum() > 0


def test_grad_setter_applies_only_to_its_backward(lm):
    """A write of .grad before the second backward changes that backward only."""
    with lm.trace(PROMPT):
        loss = lm.output.logits[:, -1].max()
        g0_first = lm.model.layers[0].output.grad.save()
        loss.backward(retain_graph=True)
        lm.model.layers[2].output.grad = torch.zeros_like(lm.model.layers[2].output)
        g0_second = lm.model.layers[0].output.grad.save()
        loss.backward()
    assert g0_first.abs().sum() > 0
    assert torch.all(g0_second == 0)  # zeroed at layer 2 in the second backward only


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
    assert torch.allclose(ratio, torch.tensor(3.0), atol=1e-5)


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
    assert torch.allclose(together, ref, atol=atol)
    assert torch.allclose(first[0], ref[0], atol=atol)
    assert torch.allclose(second[-1], ref[1], atol=atol)


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
    assert not torch.allclose(batched[1, -1], alone[0, -1], atol=1e-3)


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
    assert torch.allclose(second[0, -1], alone[0, -1], atol=1e-5)
    assert torch.allclose(first, alone_long, atol=1e-5)


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
    assert torch.equal(out, ref)


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
    assert torch.equal(out, want)


# -- items 7 and 13 remotely: saved locals are values; session-level values, session.iter/cond ---------
def test_remote_saved_locals_are_values_after_trace_generate_and_session(remote, local):
    def run(model):
        with model.trace(PROMPT):
            h = model.model.layers[3].output.save()
            kept = [model.model.layers[0].output.save()]
        with model.generate(PROMPT, max_new_tokens=2) as tracer:
            ids = tracer.result.save()
        with model.session():
            with model.trace(PROMPT):
                first = model.model.layers[1].output.save()
        return h, kept, ids, first

    (h, kept, ids, first), (lh, lkept, lids, lfirst) = run(remote), run(local)
    assert type(h) is torch.Tensor and type(ids) is torch.Tensor and type(first) is torch.Tensor
    assert type(kept[0]) is nd.Proxy  # in a list: still a proxy, read with .value
    assert torch.allclose(h, lh, atol=1e-5) and torch.allclose(kept[0].value, lkept[0].value, atol=1e-5)
    assert torch.equal(ids, lids) and torch.allclose(first, lfirst, atol=1e-5)


def test_remote_session_blocks_equal_local(remote, local):
    def run(model):
        with model.session() as session:
            with session.iter([SHORT, PROMPT]) as prompt:
                with model.trace(prompt):
                    early = model.model.layers[0].output[:, -1]  # shard 0
                    gap = (model.model.layers[3].output[:, -1] - early).save()  # shard 1; the last item's
            with model.trace(PROMPT):
                top = model.output.logits[0, -1].argmax()
            with session.cond(top >= 0), model.trace(SHORT):
                model.model.layers[1].output = model.model.layers[1].output * 0.5
                taken = model.output.logits[:, -1]
            pair = nd.list(gap, taken).save()  # at session level, after the traces
        return gap, pair

    (gap, pair), (lgap, lpair) = run(remote), run(local)
    assert torch.allclose(gap, lgap, atol=1e-5) and len(pair) == len(lpair) == 2
    assert torch.allclose(pair[0], lpair[0], atol=1e-5) and torch.allclose(pair[1], lpair[1], atol=1e-4)


def test_remote_session_refuses_changing_an_earlier_traces_value(remote, local):
    """Each shard keeps its own copy of earlier traces' values: an append from a later trace would be lost."""
    with local.session():
        kept = nd.list().save()
        with local.trace(PROMPT):
            kept.append(local.model.layers[3].output[:, -1])
        with local.trace(SHORT):
            kept.append(local.model.layers[3].output[:, -1])
    assert len(kept) == 2  # locally the list is one object
    with pytest.raises(GraphValidationError, match=r"test_compat_execution.py:\d+.*changes in place operation "
                                                   r"builtins.list .*earlier trace"), remote.session():
        kept = nd.list().save()
        with remote.trace(PROMPT):
            kept.append(remote.model.layers[3].output[:, -1])
        with remote.trace(SHORT):
            kept.append(remote.model.layers[3].output[:, -1])


def generate_then_read(model, prompt):
    """A session whose second trace runs on the tokens the first one generated."""
    with model.session():
        with model.generate(prompt, max_new_tokens=3):
            ids = model.generator.output.save()
        with model.trace(ids):
            hidden = model.model.layers[2].output.save()
            logits = model.output.logits.save()
    return ids, hidden, logits


def test_a_traces_input_can_be_an_earlier_traces_tokens(lm):
    ids, hidden, logits = generate_then_read(lm, "The Eiffel Tower is in the city of")
    seen = []
    handle = lm._module.model.layers[2].register_forward_hook(lambda _m, _a, out: seen.append(out))
    try:
        with torch.no_grad():
            expected = lm._module(input_ids=ids).logits
    finally:
        handle.remove()
    assert ids.shape == (1, 11) and torch.equal(hidden, seen[0]) and torch.equal(logits, expected)
    with pytest.raises(InterventionError, match=r"must be integer token ids, got a torch.float32 tensor"):
        with lm.session():
            with lm.trace("Hello world"):
                floats = lm.output.logits[:, -1].save()
            with lm.trace(floats):
                lm.output.logits.save()


def test_remote_traces_input_from_an_earlier_trace_equals_local(remote, local):
    for got, expected in zip(generate_then_read(remote, "Hello world"), generate_then_read(local, "Hello world")):
        assert torch.allclose(torch.as_tensor(got).float(), torch.as_tensor(expected).float(), atol=1e-5)


def test_remote_python_if_equals_local(remote, local):
    """An `if`/`else` on a traced value is an ordinary conditional in the graph: shards run it as locally."""
    def run(model, threshold):
        with model.trace(PROMPT):
            total = model.model.layers[0].output.sum()  # shard 0
            if total > threshold:
                model.model.layers[3].output = model.model.layers[3].output * 2  # shard 1
            else:
                model.model.layers[3].output = model.model.layers[3].output * 0
            logits = model.output.logits.save()
        return logits

    with local.trace(PROMPT):
        total = local.model.layers[0].output.sum().save()
    for threshold in (float(total) - 1, float(total) + 1):
        assert torch.allclose(run(remote, threshold), run(local, threshold), atol=1e-4)
    assert not torch.allclose(run(local, float(total) - 1), run(local, float(total) + 1))
