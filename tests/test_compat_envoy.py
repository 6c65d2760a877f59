"""nnsight 0.4's envoy semantics (issue 14, items 4, 8, 9, 11) against plain PyTorch hooks.

- item 4: ``envoy.next()`` is stateful: it moves that envoy and its submodules to the next call
  (generation step) for the rest of the trace, and returns the envoy for chaining;
- item 8: ``with envoy.all():`` / ``with envoy.iter[...]:`` apply the block at every / the selected step;
- item 9: ``proxy.stop()`` stops the run once that value exists; saves after it raise ``ValueError``;
- item 11: ``edit()``'s copy shares the envoy tree; ``edit(inputs)`` scans the edit; attached modules
  are called in traces; ``module(x, hook=True)`` is refused by name.
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
@pytest.fixture(scope="module")
def remote(client, model_dir):
    nd.serve(client, model_dir, shards=2, name="compat-envoy")
    return nd.RemoteModel(client, "compat-envoy")


def test_next_remote_equals_local(remote, local):
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


# -- item 11: edit() -------------------------------------------------------------------------------------
def forward_with_hooks(lm, prompt, path, hooks=()):
    """Reference: ``path``'s output in one plain forward with forward hooks ``(path, fn(output))``."""
    seen = {}
    handles = [lm._module.get_submodule(p).register_forward_hook(lambda m, a, o, fn=fn: fn(o)) for p, fn in hooks]
    handles.append(lm._module.get_submodule(path).register_forward_hook(lambda m, a, o: seen.__setitem__("h", o)))
    try:
        with torch.no_grad():
            lm._module(**lm.encode(prompt))
    finally:
        for handle in handles:
            handle.remove()
    return _hidden(seen["h"])


def test_edited_copy_shares_the_envoy_tree(lm):
    with lm.edit() as edited:
        lm.model.layers[0].output = lm.model.layers[0].output * 0.5  # the original's envoys, inside the edit
    assert edited.model.layers[1] is lm.model.layers[1]
    with edited.trace(PROMPT):
        through_original = lm.model.layers[1].output.save()  # the original's envoy, in the edited trace
        through_copy = edited.model.layers[1].output.save()
    with lm.trace(PROMPT):
        unedited = lm.model.layers[1].output.save()
    halved = forward_with_hooks(lm, PROMPT, "model.layers.1", [("model.layers.0", lambda o: o * 0.5)])
    assert torch.allclose(through_original, halved, atol=1e-6) and torch.equal(through_original, through_copy)
    assert torch.equal(unedited, forward_with_hooks(lm, PROMPT, "model.layers.1"))


def test_edit_with_inputs_is_scanned(lm):
    with lm.edit(PROMPT) as edited:
        width = lm.model.layers[0].output.shape[-1]
        assert isinstance(width, int)  # concrete inside the block, as under lm.scan(inputs)
        lm.model.layers[0].output[:, :, : width // 2] = 0
    with edited.trace("Paris is a city"):
        h = lm.model.layers[1].output.save()

    def zero_half(out):
        out[:, :, : out.shape[-1] // 2] = 0

    assert torch.equal(h, forward_with_hooks(lm, "Paris is a city", "model.layers.1", [("model.layers.0", zero_half)]))
    with pytest.raises(IndexError, match=r"test_compat_envoy.py:\d+: .*index 99 is out of bounds"), lm.edit(PROMPT):
        lm.model.layers[1].output[:, 99] = 0  # found when the edit ends, not in a later trace
    with pytest.raises(TracingError, match="edits cannot .save"), lm.edit(PROMPT):
        lm.model.layers[1].output.save()


def test_attached_module_is_called_in_traces(tiny_tokenizer):
    lm = nd.LanguageModel(tiny_llama(n_layer=2), tokenizer=tiny_tokenizer)  # its own: it gets a new submodule
    probe = torch.nn.Linear(lm.config.hidden_size, 3)
    lm.model.layers[0].probe = probe
    assert lm._module.model.layers[0].probe is probe
    with lm.trace(PROMPT):
        scores = lm.model.layers[0].probe(lm.model.layers[0].output).save()
    with lm.edit() as edited:  # and inside an edit: the probe's scores replace the first 3 features
        lm.model.layers[0].output[..., :3] = lm.model.layers[0].probe(lm.model.layers[0].output)
    with edited.trace(PROMPT):
        h = lm.model.layers[1].output.save()
    hidden = forward_with_hooks(lm, PROMPT, "model.layers.0")
    with torch.no_grad():
        assert torch.allclose(scores, probe(hidden), atol=1e-6)

    def write_scores(out):
        out[..., :3] = probe(out)

    assert torch.allclose(h, forward_with_hooks(lm, PROMPT, "model.layers.1", [("model.layers.0", write_scores)]),
                          atol=1e-6)


def test_module_call_with_hooks_live_applies_interventions_inside_it(tiny_tokenizer):
    """An SAE attached under a layer, called with ``hook=True``: an ablation of its features applies to
    that call (and its features can be read); called without hooks, it runs untouched."""
    lm = nd.LanguageModel(tiny_llama(n_layer=2), tokenizer=tiny_tokenizer)
    torch.manual_seed(0)
    sae = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 64))
    lm.model.layers[0].sae = sae
    with lm.trace(PROMPT):
        h = lm.model.layers[0].output
        features = lm.model.layers[0].sae[1].output.save()
        lm.model.layers[0].sae[1].output[..., :4] = 0
        ablated = lm.model.layers[0].sae(h, hook=True).save()
        untouched = lm.model.layers[0].sae(h).save()
    hidden = forward_with_hooks(lm, PROMPT, "model.layers.0")
    with torch.no_grad():
        code = torch.relu(sae[0](hidden))
        expected_features = torch.cat([torch.zeros_like(code[..., :4]), code[..., 4:]], dim=-1)
        assert torch.allclose(features, expected_features, atol=1e-6)
        assert torch.allclose(ablated, sae[2](expected_features), atol=1e-6)
        assert torch.allclose(untouched, sae(hidden), atol=1e-6)
    with pytest.raises(TracingError, match=r"hook=\.\.\.\) takes True or False"), lm.trace(PROMPT):
        lm.model.layers[0].sae(lm.model.layers[0].output, hook="yes")


def test_remote_edit_equals_local(remote, local):
    def run(model):
        with model.edit(PROMPT) as edited:
            model.model.layers[1].output = model.model.layers[1].output * 0.5
        with edited.trace(PROMPT):
            h = model.model.layers[3].output.save()  # shard 1, after the edit on shard 0
        return h

    assert torch.allclose(run(remote), run(local), atol=1e-5)


def test_remote_hooked_module_call_equals_local(remote, local):
    """``model.norm(h, hook=True)`` runs before the model's own norm call (as soon as ``h`` exists),
    so it is call 0 of norm: the write to ``norm.output`` applies to it, not to the model's final norm."""
    def run(model):
        with model.trace(PROMPT):
            h = model.model.layers[1].output
            model.model.norm.output[..., 0] = 0
            lens = model.lm_head(model.model.norm(h, hook=True)).save()
            logits = model.output.logits.save()
        return lens, logits

    (lens, logits), (local_lens, local_logits) = run(remote), run(local)
    assert torch.allclose(lens, local_lens, atol=1e-5) and torch.allclose(logits, local_logits, atol=1e-5)
    with local.trace(PROMPT):
        plain_logits = local.output.logits.save()
        h = local.model.layers[1].output.save()
    with torch.no_grad():
        normed = local._module.model.norm(h)
        normed[..., 0] = 0
        assert torch.allclose(local_lens, local._module.lm_head(normed), atol=1e-5)
    assert torch.equal(local_logits, plain_logits)  # the model's own norm call was left alone
