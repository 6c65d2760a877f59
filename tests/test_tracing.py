"""The local engine against plain PyTorch hooks on the same tiny models (issue: local engine)."""
from __future__ import annotations

import pytest
import torch

import nnsight_dask as nd
from nnsight_dask.errors import (
    InterventionError,
    ModuleIndexError,
    ModuleNotFoundInModelError,
    TracingError,
    UnsavedValueError,
)
from nnsight_dask.models import save_tiny

PROMPT = "The Eiffel Tower is in the city of"


def run_with_hooks(model, inputs, hooks=(), pre_hooks=()):
    """Reference: one plain forward with plain torch hooks."""
    handles = [model.get_submodule(p).register_forward_hook(h) for p, h in hooks]
    handles += [model.get_submodule(p).register_forward_pre_hook(h) for p, h in pre_hooks]
    try:
        with torch.no_grad():
            return model(**inputs)
    finally:
        for handle in handles:
            handle.remove()


def encode(lm, text):
    return dict(lm.tokenizer([text] if isinstance(text, str) else text, return_tensors="pt", padding=True))


# -- 1. wrappers and inputs --------------------------------------------------------------------------
def test_issue_example_matches_hooks(lm):
    with lm.trace(PROMPT):
        h = lm.model.layers[1].output.save()
        lm.model.layers[2].mlp.down_proj.input[:, -1, [3, 5]] = 10
        lm.model.layers[3].output = lm.model.layers[3].output * 0.5
        top = lm.output.logits[:, -1].argmax(dim=-1).save()

    seen = {}

    def pre(_m, args):
        args[0][:, -1, [3, 5]] = 10

    ref = run_with_hooks(lm._module, encode(lm, PROMPT),
                         hooks=[("model.layers.1", lambda m, a, o: seen.__setitem__("h", o.clone())),
                                ("model.layers.3", lambda m, a, o: o * 0.5)],
                         pre_hooks=[("model.layers.2.mlp.down_proj", pre)])
    assert torch.equal(h, seen["h"])  # a saved local is its value after the block
    assert torch.equal(top, ref.logits[:, -1].argmax(-1))
    assert h.shape == seen["h"].shape
    assert torch.allclose(h.mean(), seen["h"].mean())
    assert "tensor" in str(h)


@pytest.mark.parametrize("make_input", [
    lambda tok: PROMPT,
    lambda tok: [PROMPT, "Rome is in Italy"],
    lambda tok: tok(PROMPT, return_tensors="pt")["input_ids"],
    lambda tok: tok(PROMPT, return_tensors="pt")["input_ids"][0],
    lambda tok: tok(PROMPT)["input_ids"],
    lambda tok: tok([PROMPT, "Paris"], return_tensors="pt", padding=True),
    lambda tok: dict(tok([PROMPT], return_tensors="pt")),
])
def test_input_forms(lm, make_input):
    value = make_input(lm.tokenizer)
    with lm.trace(value):
        logits = lm.output.logits.save()
    texts = value if isinstance(value, list) and isinstance(value[0], str) else None
    if texts:
        ref = run_with_hooks(lm._module, encode(lm, texts)).logits
        # padded rows are computed with padding-aware positions; compare the unpadded row exactly
        assert torch.allclose(logits[0], ref[0], atol=1e-5)
    else:
        assert logits.shape[-1] == lm.config.vocab_size


def test_language_model_from_directory(tmp_path):
    path = save_tiny(tmp_path / "tiny", arch="gpt2")
    lm = nd.LanguageModel(str(path))
    with lm.trace(PROMPT):
        h = lm.transformer.h[-1].output.save()
    assert h.shape[-1] == lm.config.n_embd
    assert "GPT2Block" in repr(lm)


def test_nnsight_wraps_any_module():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model = nd.NNsight(net)
    x = torch.randn(3, 4)
    with model.trace(x):
        hidden = model[1].output.save()
        model[2].input = model[2].input * 2
        out = model.output.save()
    ref_hidden = torch.relu(net[0](x))
    assert torch.allclose(hidden, ref_hidden)
    assert torch.allclose(out, net[2](ref_hidden * 2))


def test_envoy_tree_and_indices(lm):
    assert lm.model.layers[-1].path == "model.layers.3"
    assert [e.path for e in lm.model.layers[1:3]] == ["model.layers.1", "model.layers.2"]
    assert len(lm.model.layers) == 4
    with pytest.raises(ModuleIndexError, match=r"model.layers\[4\] is out of range.*4 entries"):
        lm.model.layers[4]
    with pytest.raises(ModuleNotFoundInModelError, match="Did you mean 'mlp'"):
        lm.model.layers[0].mpl


# -- 2. access points ------------------------------------------------------------------------------------
def test_input_inputs_output(lm):
    with lm.trace(PROMPT):
        x = lm.model.layers[1].mlp.input.save()
        args_kwargs = lm.model.layers[1].inputs.save()
        out = lm.model.layers[1].mlp.output.save()
    seen = {}
    run_with_hooks(lm._module, encode(lm, PROMPT),
                   hooks=[("model.layers.1.mlp", lambda m, a, o: seen.update(x=a[0].clone(), out=o.clone()))])
    assert torch.equal(x, seen["x"]) and torch.equal(out, seen["out"])
    args, kwargs = args_kwargs
    assert isinstance(kwargs, dict) and args[0].shape == seen["x"].shape


# -- 3. proxies -----------------------------------------------------------------------------------------
def test_proxy_operations(lm):
    with lm.trace(PROMPT):
        h = lm.model.layers[0].output
        a = (h * 2 + 1 - h / 4).save()
        b = torch.stack([h[:, 0], h[:, -1]]).save()
        c = h.mean(dim=-1).softmax(-1).save()
        d = torch.nn.functional.relu(-h).sum().save()
        held = [d]  # a proxy in a list stays a proxy after the block
        shape = h.shape.save()
        e = (1 - h).abs().max().save()
    seen = {}
    run_with_hooks(lm._module, encode(lm, PROMPT), hooks=[("model.layers.0", lambda m, i, o: seen.__setitem__("h", o))])
    ref = seen["h"]
    assert torch.allclose(a, ref * 2 + 1 - ref / 4)
    assert torch.allclose(b, torch.stack([ref[:, 0], ref[:, -1]]))
    assert torch.allclose(c, ref.mean(-1).softmax(-1))
    assert torch.allclose(d, torch.relu(-ref).sum())
    assert shape == ref.shape
    assert torch.allclose(e, (1 - ref).abs().max())
    assert torch.allclose(torch.stack([held[0], held[0]]), torch.stack([d, d]))  # ... usable as its value
    assert f"{float(held[0]):.3f}" == f"{float(d):.3f}"


def test_unsaved_proxy_after_trace(lm):
    with lm.trace(PROMPT):
        h = lm.model.layers[0].output
    with pytest.raises(UnsavedValueError, match=r"test_tracing.py:\d+\) was not saved"):
        h.shape


def test_proxy_outside_trace_and_truthiness(lm):
    with pytest.raises(TracingError, match="only be used inside"):
        lm.model.layers[0].output
    with pytest.raises(TracingError, match="tracer.cond"):
        with lm.trace(PROMPT):
            assert lm.model.layers[0].output.sum() > 0  # a truth test that is not an `if` statement


# -- 4. setters ----------------------------------------------------------------------------------------
def test_setter_on_tuple_output(gpt):
    with gpt.trace(PROMPT):
        gpt.transformer.h[0].attn.output[0][:, -1] = 0
        attn = gpt.transformer.h[0].attn.output[0].save()
        logits = gpt.output.logits.save()

    def zero(m, a, o):
        o[0][:, -1] = 0

    ref = run_with_hooks(gpt._module, encode(gpt, PROMPT), hooks=[("transformer.h.0.attn", zero)])
    assert torch.all(attn[:, -1] == 0)
    assert torch.allclose(logits, ref.logits)


def test_setter_replaces_input(lm):
    with lm.trace(PROMPT):
        lm.model.layers[2].input = lm.model.layers[2].input + 1
        logits = lm.output.logits.save()

    def plus(m, args, kwargs):
        return (args[0] + 1, *args[1:]), kwargs

    handle = lm._module.model.layers[2].register_forward_pre_hook(plus, with_kwargs=True)
    try:
        ref = run_with_hooks(lm._module, encode(lm, PROMPT))
    finally:
        handle.remove()
    assert torch.allclose(logits, ref.logits)


# -- 5. invokes ----------------------------------------------------------------------------------------
def test_invokes_batch_into_one_forward_and_patch(lm):
    calls = []
    handle = lm._module.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with lm.trace() as tracer:
            with tracer.invoke("Rome is in Italy"):
                clean = lm.model.layers[1].output[:, -1].save()
            with tracer.invoke(PROMPT):
                lm.model.layers[1].output[:, -1] = clean
                patched = lm.output.logits[:, -1].save()
                own = lm.model.layers[1].output.save()
    finally:
        handle.remove()
    assert len(calls) == 1
    store = {}
    run_with_hooks(lm._module, encode(lm, "Rome is in Italy"),
                   hooks=[("model.layers.1", lambda m, a, o: store.__setitem__("clean", o[:, -1].clone()))])

    def patch(m, a, o):
        o = o.clone()
        o[:, -1] = store["clean"]
        return o

    ref = run_with_hooks(lm._module, encode(lm, PROMPT), hooks=[("model.layers.1", patch)])
    assert torch.allclose(clean, store["clean"], atol=1e-5)
    assert torch.allclose(patched, ref.logits[:, -1], atol=1e-5)
    assert own.shape[0] == 1  # each invoke sees only its rows


# -- 6. gradients --------------------------------------------------------------------------------------
def test_gradients_read_and_write(lm):
    model = lm._module
    with lm.trace(PROMPT):
        h1 = lm.model.layers[1].output
        g1 = h1.grad.save()
        lm.model.layers[2].output.grad = torch.zeros_like(lm.model.layers[2].output)
        g0 = lm.model.layers[0].output.grad.save()
        lm.output.logits[:, -1].max().backward()
    assert torch.all(g1 == 0) and torch.all(g0 == 0)  # zeroed at layer 2: nothing flows below it

    with lm.trace(PROMPT):
        h = lm.model.layers[1].output
        g1 = h.grad.save()
        mid = h * 3
        gmid = mid.grad.save()
        lm.model.layers[1].output = mid
        lm.output.logits[:, -1].max().backward()
    seen = {}

    def keep(m, a, o):
        o.retain_grad()
        seen["o"] = o

    handle = model.model.layers[1].register_forward_hook(keep)
    try:
        model.zero_grad()
        handle2 = model.model.layers[1].register_forward_hook(lambda m, a, o: o * 3)
        try:
            model(**encode(lm, PROMPT)).logits[:, -1].max().backward()
        finally:
            handle2.remove()
    finally:
        handle.remove()
        model.zero_grad()
    assert torch.allclose(g1, seen["o"].grad, atol=1e-6)
    assert torch.allclose(g1, 3 * gmid, atol=1e-6)  # mid took the place of the output


def test_gradients_per_invoke(lm):
    with lm.trace() as tracer:
        with tracer.invoke("Rome is in Italy"):
            clean = lm.model.layers[1].output.save()
        with tracer.invoke(PROMPT):
            g = lm.model.layers[1].output.grad.save()
            lm.output.logits[0, -1].max().backward()
    model = lm._module
    batch = dict(lm.tokenizer(["Rome is in Italy", PROMPT], return_tensors="pt", padding=True))
    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    seen = {}

    def keep(m, a, o):
        o.retain_grad()
        seen["o"] = o

    handle = model.model.layers[1].register_forward_hook(keep)
    try:
        model(**batch).logits[1, -1].max().backward()
    finally:
        handle.remove()
        model.zero_grad()
    assert g.shape[0] == 1 and clean.shape[0] == 1
    assert torch.allclose(g, seen["o"].grad[1:2], atol=1e-6)


# -- 7. generation ---------------------------------------------------------------------------------------
def test_generation_matches_hf_and_iterates(lm):
    inputs = encode(lm, PROMPT)
    with lm.generate(PROMPT, max_new_tokens=4) as tracer:
        first = lm.model.layers[1].output.save()
        with tracer.iter[1:3]:
            middle = lm.model.layers[1].output[:, -1].save()
        with tracer.all():
            every = lm.output.logits[:, -1].argmax(-1).save()
        ids = lm.generator.output.save()
        result = tracer.result.save()
    ref = lm._module.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    assert torch.equal(ids, ref) and torch.equal(result, ref)
    assert first.shape[1] == inputs["input_ids"].shape[1]
    assert len(middle) == 2 and len(every) == 4
    assert [int(t) for t in every] == ref[0, -4:].tolist()


def test_generation_step_intervention_changes_only_that_step(lm):
    def hidden_per_step(step=None):
        with lm.generate(PROMPT, max_new_tokens=3) as tracer:
            if step is not None:
                with tracer.iter[step]:
                    lm.model.layers[0].output[:] = 0
            with tracer.all():
                hs = lm.model.layers[0].output[:, -1].save()
        return hs

    base, changed = hidden_per_step(), hidden_per_step(step=1)
    assert torch.equal(base[0], changed[0])
    assert torch.all(changed[1] == 0) and not torch.equal(base[1], changed[1])
    assert torch.equal(base[2].shape and base[2], base[2])


# -- 8. scan / validate ----------------------------------------------------------------------------------
def test_scan_gives_shapes_without_compute(lm):
    with lm.scan(PROMPT):
        h = lm.model.layers[1].output.save()
    assert tuple(h.shape) == (1, len(lm.tokenizer(PROMPT)["input_ids"]), lm.config.hidden_size)
    assert type(h.value).__name__ == "FakeTensor"  # scans hand out fake tensors, kept behind their proxies


def test_scan_reports_setter_shape_mismatch_with_line(lm):
    with pytest.raises(InterventionError, match=r"test_tracing.py:\d+: write to model.layers\[1\].output.*shape \(1, 3\)"):
        with lm.scan(PROMPT):
            lm.model.layers[1].output = torch.zeros(1, 3)


def test_validate_catches_bad_index_before_running(lm):
    calls = []
    handle = lm._module.model.layers[0].register_forward_hook(lambda m, a, out: calls.append(type(out).__name__))
    try:
        with pytest.raises(InterventionError, match="index 99 is out of bounds"):
            with lm.trace(PROMPT, validate=True):
                lm.model.layers[1].output[:, 99].save()
    finally:
        handle.remove()
    assert calls == ["FakeTensor"]  # only the fake run happened: the real model never ran


# -- 9. module calls, skip, stop, session, edit, apply -----------------------------------------------------
def test_logit_lens_module_call(lm):
    with lm.trace(PROMPT):
        lens = [lm.lm_head(lm.model.norm(layer.output))[:, -1].argmax(-1).save() for layer in lm.model.layers]
    seen = {}
    run_with_hooks(lm._module, encode(lm, PROMPT),
                   hooks=[(f"model.layers.{i}", (lambda i: lambda m, a, o: seen.__setitem__(i, o))(i)) for i in range(4)])
    model = lm._module
    with torch.no_grad():
        ref = [model.lm_head(model.model.norm(seen[i]))[:, -1].argmax(-1) for i in range(4)]
    assert [int(x) for x in lens] == [int(x) for x in ref]


def test_skip_and_stop(lm):
    calls = []
    handle = lm._module.model.layers[3].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with lm.trace(PROMPT) as tracer:
            lm.model.layers[1].skip(lm.model.layers[0].output)
            h0 = lm.model.layers[0].output.save()
            h1 = lm.model.layers[1].output.save()
            tracer.stop()
    finally:
        handle.remove()
    assert torch.equal(h0, h1)
    assert calls == []  # layer 3 never ran


def test_session_shares_values(lm):
    with lm.session():
        with lm.trace("Rome is in Italy"):
            clean = lm.model.layers[1].output[:, -1].save()
        with lm.trace(PROMPT):
            lm.model.layers[1].output[:, -1] = clean
            patched = lm.output.logits[:, -1].save()
    with lm.trace() as tracer:
        with tracer.invoke("Rome is in Italy"):
            c2 = lm.model.layers[1].output[:, -1]
        with tracer.invoke(PROMPT):
            lm.model.layers[1].output[:, -1] = c2
            ref = lm.output.logits[:, -1].save()
    assert torch.allclose(patched, ref, atol=1e-5)


def test_edit_applies_to_later_traces(lm):
    with lm.edit() as edited:
        lm.model.layers[0].output[:] = 0
    with edited.trace(PROMPT):
        h = edited.model.layers[0].output.save()
    with lm.trace(PROMPT):
        original = lm.model.layers[0].output.save()
    assert torch.all(h == 0) and not torch.all(original == 0)


def test_apply_cond_log_and_list(lm, capsys):
    with lm.trace(PROMPT) as tracer:
        total = lm.model.layers[0].output.sum()
        doubled = nd.apply(lambda v: v * 2, total).save()
        with tracer.cond(total > 1e9):
            lm.model.layers[1].output[:] = 0
        kept = nd.list().save()
        kept.append(total)
        tracer.log("total", total)
        h1 = lm.model.layers[1].output.save()
    assert torch.allclose(doubled, kept[0] * 2)
    assert not torch.all(h1 == 0)
    assert "total tensor(" in capsys.readouterr().out
    assert tracer.graph.local_only


# -- 11. errors ----------------------------------------------------------------------------------------
def test_cycle_is_reported_with_line_and_module(lm):
    with pytest.raises(InterventionError, match=r"test_tracing.py:\d+: write to model.layers\[1\].output needs a value "
                                                r"computed from read of model.layers\[2\].output"):
        with lm.trace(PROMPT):
            lm.model.layers[1].output = lm.model.layers[2].output


def test_runtime_error_names_line(lm):
    with pytest.raises(InterventionError, match=r"test_tracing.py:\d+: operation Tensor.view failed"):
        with lm.trace(PROMPT):
            lm.model.layers[1].output.view(7, 7, 7).save()


def test_module_never_reached(lm):
    with pytest.raises(InterventionError, match=r"call 1 was never reached: the module ran 1 time"):
        with lm.trace(PROMPT):
            lm.model.layers[1].next().output.save()


def test_smollm2_paris(smollm2_lm):
    with smollm2_lm.generate("The capital of France is", max_new_tokens=2) as tracer:
        ids = tracer.result.save()
    text = smollm2_lm.tokenizer.decode(ids[0, -2:])
    assert text.startswith(" Paris")


@pytest.fixture(scope="module")
def smollm2_lm(smollm2):
    model, tokenizer = smollm2
    return nd.LanguageModel(model, tokenizer=tokenizer)
