"""nnsight 0.4's envoy semantics (issue 14, items 4, 8, 9) against plain PyTorch hooks.

- item 4: ``envoy.next()`` is stateful: it moves that envoy and its submodules to the next call
  (generation step) for the rest of the trace, and returns the envoy for chaining;
- item 8: ``with envoy.all():`` / ``with envoy.iter[...]:`` apply the block at every / the selected step;
- item 9: ``proxy.stop()`` stops the run once that value exists; saves after it raise ``ValueError``.
"""
from __future__ import annotations

import pytest
import torch

import nnsight_dask as nd
from nnsight_dask.errors import TracingError, UnsavedValueError
from nnsight_dask.models import tiny_llama

PROMPT = "The Eiffel Tower is in the city of"
STEPS = 3


@pytest.fixture(scope="module")
def lm(tiny_tokenizer):
    return nd.LanguageModel(tiny_llama(n_layer=4), tokenizer=tiny_tokenizer)


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def generate_with_hooks(model, tok, hooks=(), steps=STEPS):
    """Reference: plain ``model.generate`` with plain forward hooks ``(path, fn(call, output))``.

    ``fn`` gets the module's call index (the generation step) and its output; what it returns
    replaces the output (None: unchanged).
    """
    handles = []
    for path, fn in hooks:
        calls = [0]

        def hook(_m, _a, output, fn=fn, calls=calls):
            new = fn(calls[0], output)
            calls[0] += 1
            return new

        handles.append(model.get_submodule(path).register_forward_hook(hook))
    try:
        with torch.no_grad():
            return model.generate(**tok([PROMPT], return_tensors="pt"), max_new_tokens=steps, do_sample=False,
                                  pad_token_id=tok.pad_token_id)
    finally:
        for handle in handles:
            handle.remove()


def per_step(lm, path):
    """Each generation step's output of the module at ``path`` (plain hooks)."""
    seen = []
    generate_with_hooks(lm._module, lm.tokenizer, [(path, lambda call, o: seen.append(_hidden(o).clone()))])
    return seen


# -- item 4: stateful .next() -------------------------------------------------------------------------
def test_next_is_stateful_and_resets_when_the_trace_ends(lm):
    ref = per_step(lm, "model.layers.3")
    ref_mlp = per_step(lm, "model.layers.3.mlp")
    with lm.generate(PROMPT, max_new_tokens=STEPS):
        h = lm.model.layers
        step0 = h[-1].output.save()
        h[-1].next()                     # a bare .next(): the cached envoy moves on
        step1 = h[-1].output.save()
        mlp1 = h[-1].mlp.output.save()   # its submodules move with it
        step2 = h[-1].next().output.save()  # returns the envoy, so it chains
        other = h[0].output.save()       # other modules stay where they were
    assert torch.equal(step0, ref[0]) and torch.equal(step1, ref[1]) and torch.equal(step2, ref[2])
    assert torch.equal(mlp1, ref_mlp[1])
    assert torch.equal(other, per_step(lm, "model.layers.0")[0])
    with lm.generate(PROMPT, max_new_tokens=STEPS):
        again = lm.model.layers[-1].output.save()  # the offset ended with the trace
    assert torch.equal(again, ref[0])


def test_next_moves_interventions_to_that_step(lm):
    def zero_at_one(call, output):
        if call == 1:
            _hidden(output)[:] = 0

    ref = generate_with_hooks(lm._module, lm.tokenizer, [("model.layers.1", zero_at_one)])
    base = generate_with_hooks(lm._module, lm.tokenizer)
    with lm.generate(PROMPT, max_new_tokens=STEPS) as tracer:
        layer = lm.model.layers[1]
        layer.next()
        layer.output[:] = 0
        seen = layer.output.save()
        ids = tracer.result.save()
    assert torch.equal(ids, ref)
    assert torch.all(seen == 0)
    assert not torch.equal(ref, base), "the step-1 intervention should change the generation"


def test_next_on_the_model_moves_every_module(lm):
    ref = per_step(lm, "model.layers.2")
    with lm.generate(PROMPT, max_new_tokens=STEPS):
        lm.next()
        out = lm.model.layers[2].output.save()
    assert torch.equal(out, ref[1])


def test_next_outside_a_trace_is_refused(lm):
    with pytest.raises(TracingError, match=r"next\(\) can only be used inside"):
        lm.model.layers[0].next()


# -- item 8: with envoy.all() / envoy.iter[...] ----------------------------------------------------------
def test_with_envoy_all_applies_at_every_step_children_included(lm):
    ref = per_step(lm, "model.layers.0")
    ref_mlp = per_step(lm, "model.layers.0.mlp")
    with lm.generate(PROMPT, max_new_tokens=STEPS):
        layer = lm.model.layers[0]
        with layer.all():
            hs = layer.output[:, -1].save()
            mlps = layer.mlp.output[:, -1].save()
    assert len(hs) == STEPS and len(mlps) == STEPS
    for step in range(STEPS):
        assert torch.equal(hs[step], ref[step][:, -1])
        assert torch.equal(mlps[step], ref_mlp[step][:, -1])


def test_with_envoy_iter_applies_at_selected_steps(lm):
    def zero_mlp(call, output):
        if call in (1, 2):
            output[:] = 0

    ref = generate_with_hooks(lm._module, lm.tokenizer, [("model.layers.1.mlp", zero_mlp)], steps=4)
    with lm.generate(PROMPT, max_new_tokens=4) as tracer:
        with lm.model.layers[1].iter[1:3]:
            lm.model.layers[1].mlp.output[:] = 0
            zeroed = lm.model.layers[1].mlp.output.save()
        ids = tracer.result.save()
    assert torch.equal(ids, ref)
    assert len(zeroed) == 2 and all(torch.all(z == 0) for z in zeroed)

    ref_h = per_step(lm, "model.layers.2")
    with lm.generate(PROMPT, max_new_tokens=STEPS):
        with lm.model.layers[2].iter[2] as layer:
            last = layer.output.save()
        picked = lm.model.layers[2].iter[0:2].output.save()  # a read through the view, no block
    assert len(last) == 1 and torch.equal(last[0], ref_h[2])
    assert len(picked) == 2 and all(torch.equal(p, r) for p, r in zip(picked, ref_h[:2]))


def test_envoy_blocks_refuse_nesting_and_plain_envoys(lm):
    with pytest.raises(TracingError, match="cannot be nested"), \
            lm.generate(PROMPT, max_new_tokens=2) as tracer, tracer.all(), lm.model.layers[0].all():
        pass
    with pytest.raises(TracingError, match="not a context manager"), \
            lm.generate(PROMPT, max_new_tokens=2), lm.model.layers[0]:
        pass
    with pytest.raises(TracingError, match="negative steps"):
        lm.model.layers[0].iter[-1]


# -- item 9: proxy.stop() ----------------------------------------------------------------------------------
def test_proxy_stop_stops_the_run_and_later_saves_raise(lm):
    layers = lm._module.model.layers
    seen, ran = {}, []
    handle = layers[1].register_forward_hook(lambda m, a, o: seen.__setitem__("h1", _hidden(o).clone()))
    with torch.no_grad():
        lm._module(**lm.tokenizer([PROMPT], return_tensors="pt"))
    handle.remove()
    handle = layers[2].register_forward_hook(lambda m, a, o: ran.append(True))
    try:
        with lm.trace(PROMPT):
            h1 = lm.model.layers[1].output.save()
            lm.model.layers[1].output.stop()
            after = lm.model.layers[2].output.save()
    finally:
        handle.remove()
    assert torch.equal(h1, seen["h1"])
    assert not ran, "the run should stop before layer 2"
    with pytest.raises(ValueError, match="never computed: the run stopped") as info:
        _ = after.value
    assert isinstance(info.value, UnsavedValueError)
    assert "test_compat_envoy.py" in str(info.value)


def test_proxy_stop_outside_the_trace_is_refused(lm):
    with lm.trace(PROMPT):
        held = [lm.model.layers[0].output.save()]  # in a list it stays a proxy after the trace
    with pytest.raises(TracingError, match="stop"):
        held[0].stop()


# -- remote ------------------------------------------------------------------------------------------------
@pytest.mark.cluster
def test_next_remote_equals_local(client, model_dir, local):
    nd.serve(client, model_dir, shards=2, name="compat-envoy")
    remote = nd.RemoteModel(client, "compat-envoy")

    def run(model):
        with model.generate(PROMPT, max_new_tokens=STEPS) as tracer:
            layer = model.model.layers[-1]
            layer.next()
            one = layer.output.save()
            layer.output[:] = 0
            two = layer.next().output.save()
            ids = tracer.result.save()
        return one, two, ids

    r_one, r_two, r_ids = run(remote)
    l_one, l_two, l_ids = run(local)
    assert torch.allclose(r_one, l_one, atol=1e-5) and torch.allclose(r_two, l_two, atol=1e-5)
    assert torch.equal(r_ids, l_ids)
