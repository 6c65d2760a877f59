"""nnsight 0.4 semantics of tracers (issue 14): saved values after the block (item 7), scan/validate
(item 3), ``trace(inputs, trace=False)`` (item 10). Each is compared with plain PyTorch on the same model."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import nnsight_dask as nd
from nnsight_dask.errors import InterventionError, TracingError
from nnsight_dask.models import tiny_gpt2, tiny_llama
from nnsight_dask.tracing import inject
from nnsight_dask.tracing.proxy import Proxy

PROMPT = "The Eiffel Tower is in the city of"


@pytest.fixture(scope="module")
def lm(tiny_tokenizer):
    return nd.LanguageModel(tiny_llama(n_layer=3), tokenizer=tiny_tokenizer)


@pytest.fixture(scope="module")
def gpt(tiny_tokenizer):
    return nd.LanguageModel(tiny_gpt2(n_layer=2), tokenizer=tiny_tokenizer)


def hidden_with_hooks(model, inputs, path):
    """Reference: the output of ``path`` in one plain forward."""
    seen = {}
    handle = model.get_submodule(path).register_forward_hook(lambda m, a, out: seen.__setitem__("h", out))
    try:
        with torch.no_grad():
            output = model(**inputs)
    finally:
        handle.remove()
    return seen["h"], output


# -- item 7: saved values are the values after the trace -------------------------------------------
def test_saved_locals_become_tensors_after_trace(lm):
    with lm.trace(PROMPT):
        h = lm.model.layers[1].output.save()
        kept = [lm.model.layers[2].output.save()]
        by_name = {"h0": lm.model.layers[0].output.save()}
    ref, _ = hidden_with_hooks(lm._module, lm.encode(PROMPT), "model.layers.1")
    assert type(h) is torch.Tensor and isinstance(h, torch.Tensor)
    assert torch.equal(h, ref) and torch.equal(torch.as_tensor(h), ref)
    assert np.array_equal(h.numpy(), ref.numpy())
    assert torch.equal(pickle.loads(pickle.dumps(h)), ref)
    assert type(kept[0]) is Proxy and kept[0].value.shape == ref.shape  # containers keep .value
    assert type(by_name["h0"]) is Proxy


def test_saved_locals_injected_after_generate_and_session(lm):
    with lm.generate(PROMPT, max_new_tokens=3) as tracer:
        ids = tracer.result.save()
    with torch.no_grad():
        enc = lm.encode(PROMPT)
        ref = lm._module.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    assert type(ids) is torch.Tensor and torch.equal(ids, ref)
    with lm.session():
        with lm.trace(PROMPT):
            first = lm.model.layers[0].output.save()
        with lm.trace(PROMPT):
            second = lm.model.layers[1].output.save()
    assert type(first) is torch.Tensor and type(second) is torch.Tensor
    assert torch.equal(second, hidden_with_hooks(lm._module, lm.encode(PROMPT), "model.layers.1")[0])


def test_injection_reaches_closure_cells_and_module_level_code(lm):
    with lm.trace(PROMPT):
        h = lm.model.layers[0].output.save()

    def read():
        return h

    assert type(read()) is torch.Tensor  # a cell variable is rebound too
    namespace = {"lm": lm, "PROMPT": PROMPT}
    exec("with lm.trace(PROMPT):\n    g = lm.model.layers[0].output.save()\n", namespace)  # noqa: S102  (globals == locals)
    assert type(namespace["g"]) is torch.Tensor and torch.equal(namespace["g"], h)


def test_no_injection_when_the_trace_did_not_run(lm):
    with lm.trace(PROMPT, execute=False):
        unrun = lm.model.layers[0].output.save()
    assert type(unrun) is Proxy
    with lm.scan(PROMPT):
        fake = lm.model.layers[0].output.save()
    assert type(fake) is Proxy and type(fake.value).__name__ == "FakeTensor"
    with lm.trace(PROMPT, blocking=False) as tracer:
        later = lm.model.layers[0].output.save()
    tracer.future.result()
    assert type(later) is Proxy and isinstance(later.value, torch.Tensor)


def test_injection_can_be_switched_off(lm, monkeypatch):
    import dask.config

    assert nd.config.frame_injection is True  # on by default, as in nnsight 0.4
    with dask.config.set({"nnsight-dask.frame-injection": False}), lm.trace(PROMPT):
        h = lm.model.layers[0].output.save()
    assert type(h) is Proxy and isinstance(h.value, torch.Tensor)
    monkeypatch.setattr(inject, "FRAME_INJECTION", False)  # the module switch wins over the setting
    with dask.config.set({"nnsight-dask.frame-injection": True}), lm.trace(PROMPT):
        h = lm.model.layers[0].output.save()
    assert type(h) is Proxy


# -- item 3: scan=True / validate=True check on fake tensors, then run for real ------------------------
def test_trace_scan_runs_for_real_after_the_check(lm):
    with lm.trace(PROMPT, scan=True):
        width = lm.model.layers[0].output.shape[-1]  # concrete while recording
        assert width == lm.config.hidden_size and isinstance(width, int)
        lm.model.layers[0].output[:, :, : width // 2] = 0
        h = lm.model.layers[1].output.save()

    def zero_half(_m, _a, out):
        out[:, :, : out.shape[-1] // 2] = 0
        return out

    handle = lm._module.model.layers[0].register_forward_hook(zero_half)
    try:
        ref, _ = hidden_with_hooks(lm._module, lm.encode(PROMPT), "model.layers.1")
    finally:
        handle.remove()
    assert type(h) is torch.Tensor and torch.equal(h, ref)  # a real tensor, not a fake one


def test_generate_scan_returns_token_ids(lm):
    with lm.generate(PROMPT, max_new_tokens=3, scan=True) as tracer:
        ids = tracer.result.save()
    with lm.generate(PROMPT, max_new_tokens=3) as tracer:
        plain = tracer.result.save()
    assert type(ids) is torch.Tensor and torch.equal(ids, plain)
    assert ids.shape[-1] == lm.encode(PROMPT)["input_ids"].shape[-1] + 3


@pytest.mark.parametrize("option", ["validate", "scan"])
def test_validate_raises_the_original_type_with_the_users_line(lm, option):
    calls = []
    handle = lm._module.model.layers[0].register_forward_hook(lambda m, a, out: calls.append(type(out).__name__))
    try:
        with pytest.raises(IndexError, match=r"test_compat_tracer.py:\d+: .*index 99 is out of bounds") as info, \
                lm.trace(PROMPT, **{option: True}):
            lm.model.layers[1].output[:, 99].save()
    finally:
        handle.remove()
    assert isinstance(info.value, InterventionError)
    assert calls == ["FakeTensor"]  # only the fake run happened
    again = pickle.loads(pickle.dumps(info.value))
    assert type(again) is type(info.value) and str(again) == str(info.value)


def test_scan_context_gives_concrete_shapes_while_tracing(gpt):
    _, ref = hidden_with_hooks(gpt._module, gpt.encode(PROMPT), "transformer.h.0")
    with gpt.scan(PROMPT):
        logits_shape = gpt.lm_head.output.shape
        dims = gpt.transformer.wte.output.dim()
        assert isinstance(logits_shape, torch.Size) and isinstance(dims, int)  # concrete inside the block
    assert logits_shape == ref.logits.shape and dims == 3


# -- item 10: trace(inputs, trace=False) ------------------------------------------------------------------
def test_trace_false_returns_the_output_at_once(lm):
    output = lm.trace(PROMPT, trace=False)
    with torch.no_grad():
        ref = lm._module(**lm.encode(PROMPT))
    assert torch.equal(output.logits, ref.logits)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert torch.equal(nd.NNsight(net).trace(x, trace=False), net(x))


def test_generator_output_inside_an_invoke_is_that_invokes_rows():
    """Issue 14 item 5: ``lm.generator.output`` read inside an invoke gives that invoke's rows only."""
    from nnsight_dask.models import tiny_llama, tiny_tokenizer

    lm = nd.LanguageModel(tiny_llama(), tokenizer=tiny_tokenizer())
    with lm.generate(max_new_tokens=3) as tracer:
        with tracer.invoke("The Eiffel Tower is in the city of"):
            first = lm.generator.output.save()
        with tracer.invoke(["the cat", "a dog"]):
            second = lm.generator.output.save()
        everything = tracer.result.save()
    assert everything.shape[0] == 3 and first.shape[0] == 1 and second.shape[0] == 2
    assert torch.equal(first, everything[:1]) and torch.equal(second, everything[1:])


# -- item 13: sessions ---------------------------------------------------------------------------------
OTHER = "Paris is a city"


def last_hidden(lm, prompt, path, scale=None):
    """Plain torch: ``path``'s output at the last position; ``scale`` multiplies layer 0's output first."""
    handle = None if scale is None else lm._module.model.layers[0].register_forward_hook(lambda m, a, o: o * scale)
    try:
        hidden, output = hidden_with_hooks(lm._module, lm.encode(prompt), path)
    finally:
        if handle is not None:
            handle.remove()
    return hidden[:, -1], output


def test_session_level_list_and_operations_between_traces(lm):
    ones = torch.ones(1, lm.config.hidden_size)
    with lm.session():
        hs = nd.list().save()  # outside any trace
        with lm.trace(PROMPT):
            hs.append(lm.model.layers[1].output[:, -1])
        hs.append(ones)  # between the traces: after the first has run, before the second
        with lm.trace(OTHER):
            hs.append(lm.model.layers[1].output[:, -1])
            last = lm.model.layers[1].output[:, -1]
        gap = (last - hs[0]).save()  # after the last trace
    first, _ = last_hidden(lm, PROMPT, "model.layers.1")
    second, _ = last_hidden(lm, OTHER, "model.layers.1")
    assert type(hs) is list and len(hs) == 3
    assert torch.equal(hs[0], first) and torch.equal(hs[1], ones) and torch.equal(hs[2], second)
    assert torch.equal(gap, second - first)


def test_session_iter_runs_whole_traces_once_per_item(lm):
    prompts = [PROMPT, OTHER, "the cat"]
    with lm.session() as session:
        logits = nd.list().save()
        with session.iter(prompts) as prompt:
            with lm.trace(prompt):  # the item as the trace's input
                h = lm.model.layers[0].output[:, -1].save()
                logits.append(lm.output.logits[:, -1])
    assert len(logits) == len(prompts)
    for prompt, got in zip(prompts, logits):
        assert torch.equal(got, last_hidden(lm, prompt, "model.layers.0")[1].logits[:, -1])
    assert torch.equal(h, last_hidden(lm, prompts[-1], "model.layers.0")[0])  # as after a for loop: the last


def test_session_iter_items_in_interventions_and_nested(lm):
    scales, prompts = [0.5, 2.0], [PROMPT, OTHER]
    with lm.session() as session:
        seen = nd.list().save()
        with session.iter(scales) as scale:
            with session.iter(prompts) as prompt:
                with lm.trace(prompt):
                    lm.model.layers[0].output = lm.model.layers[0].output * scale
                    seen.append(lm.model.layers[1].output[:, -1])
    expected = [last_hidden(lm, p, "model.layers.1", scale=s)[0] for s in scales for p in prompts]
    assert len(seen) == len(expected)
    for got, want in zip(seen, expected):
        assert torch.allclose(got, want, atol=1e-6)


def test_session_iter_repeats_generations_with_step_blocks(lm):
    prompts = [PROMPT, OTHER]
    with lm.session() as session:
        generated = nd.list().save()
        with session.iter(prompts) as prompt:
            with lm.generate(prompt, max_new_tokens=3) as tracer:
                with tracer.all():
                    lm.model.layers[0].output[:, -1] = 0
                generated.append(tracer.result)

    def zero_last(_m, _a, out):
        out[:, -1] = 0

    handle = lm._module.model.layers[0].register_forward_hook(zero_last)
    try:
        with torch.no_grad():
            expected = [lm._module.generate(**lm.encode(p), max_new_tokens=3, do_sample=False,
                                            pad_token_id=lm.tokenizer.pad_token_id) for p in prompts]
    finally:
        handle.remove()
    assert len(generated) == len(expected)
    for got, want in zip(generated, expected):
        assert torch.equal(got, want)


def test_session_cond_applies_whole_traces_only_when_true(lm):
    with lm.session() as session:
        with lm.trace(PROMPT):
            top = lm.output.logits[0, -1].argmax()  # not saved: it only decides
        with session.cond(top >= 0), lm.trace(OTHER):  # true
            lm.model.layers[0].output = lm.model.layers[0].output * 0.5
            taken = lm.model.layers[1].output[:, -1].save()
        with session.cond(top < 0), lm.trace(OTHER):  # false: no write, no save
            lm.model.layers[0].output = lm.model.layers[0].output * 0
            skipped = lm.model.layers[1].output[:, -1].save()
        with lm.trace(OTHER):
            plain = lm.model.layers[1].output[:, -1].save()
    assert torch.allclose(taken, last_hidden(lm, OTHER, "model.layers.1", scale=0.5)[0], atol=1e-6)
    assert skipped is None
    assert torch.equal(plain, last_hidden(lm, OTHER, "model.layers.1")[0])


def test_session_blocks_refuse_what_they_cannot_record(lm):
    with pytest.raises(TracingError, match="number of items must be known"), lm.session() as session:
        with lm.trace(PROMPT):
            ids = lm.output.logits.argmax(-1)
        with session.iter(ids):
            pass
    with pytest.raises(TracingError, match="goes outside them"), lm.session() as session, lm.trace(PROMPT):
        with session.iter([1, 2]):
            pass
    with pytest.raises(TracingError, match="only as the token ids alone"), lm.session():
        with lm.trace(PROMPT):
            ids = lm.output.logits.argmax(-1)
        with lm.trace([ids, ids]):  # an earlier trace's value is a trace's input only as its token ids
            pass


# -- item 12: Python `if` / `for` on traced values (tests/test_control_flow.py); what stays refused ----------
def test_truth_and_iteration_that_cannot_be_recorded_are_refused_with_the_spelling_that_works(lm):
    with pytest.raises(TracingError, match=r"`while`.*tracer.cond\(x\).*tracer.cond\(~x\).*session.cond"), \
            lm.trace(PROMPT):
        while lm.model.layers[0].output.sum() > 0:
            lm.model.layers[1].output[:] = 0
    with pytest.raises(TracingError, match=r"session.iter\(items\)"), lm.session():
        with lm.trace(PROMPT):
            ids = lm.output.logits[0].argmax(-1)
        for _token in ids:  # a tensor's length is known only when the model runs
            pass


@pytest.mark.parametrize("threshold", [-1e9, 1e9])
def test_cond_and_its_negation_equal_python_if_else(lm, threshold):
    """What `if s > t: a else: b` on a traced value is written as, against the same if/else in a hook."""
    with lm.trace(PROMPT) as tracer:
        large = lm.model.layers[0].output.sum() > threshold
        with tracer.cond(large):
            lm.model.layers[1].output = lm.model.layers[1].output * 2
        with tracer.cond(~large):
            lm.model.layers[1].output = lm.model.layers[1].output * 0
        logits = lm.output.logits.save()
    decided = {}

    def branch(_m, _a, out):
        decided["large"] = bool(out.sum() > threshold)

    def apply(_m, _a, out):
        return out * 2 if decided["large"] else out * 0

    handles = [lm._module.model.layers[0].register_forward_hook(branch),
               lm._module.model.layers[1].register_forward_hook(apply)]
    try:
        with torch.no_grad():
            ref = lm._module(**lm.encode(PROMPT)).logits
    finally:
        for handle in handles:
            handle.remove()
    assert torch.allclose(logits, ref, atol=1e-6)
