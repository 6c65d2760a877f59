"""The research recipes in examples/ run end to end on a tiny random model (locally, and one remotely)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

import nnsight_dask as nd
from nnsight_dask.models import save_tiny, tiny_tokenizer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import activation_patching  # noqa: E402
import attention_patterns  # noqa: E402
import attribution_patching  # noqa: E402
import causal_tracing  # noqa: E402
import linear_probe  # noqa: E402
import logit_lens  # noqa: E402
import steering  # noqa: E402

N_LAYER = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama", n_layer=N_LAYER))


def test_activation_patching_local(model_dir, capsys):
    r = activation_patching.main(model_dir, local=True)
    assert r["p_b"].shape == (N_LAYER, 2) and r["top"].shape == (N_LAYER, 2)
    assert torch.isfinite(r["p_b"]).all() and ((r["p_b"] >= 0) & (r["p_b"] <= 1)).all()
    out = capsys.readouterr().out
    assert out.count("\n") >= N_LAYER + 4 and "layer |" in out
    # patching the last position at the last layer reproduces the clean run's answer exactly
    assert r["p_b"][-1, 1] == pytest.approx(r["clean"][0], abs=1e-5)


def test_activation_patching_remote_matches_local(model_dir, client):
    local = activation_patching.main(model_dir, local=True)
    remote = activation_patching.main(model_dir, scheduler=client)
    assert "recipe" not in " ".join(nd.deployments(client))  # the recipe undeployed its model
    assert torch.allclose(remote["p_b"], local["p_b"], atol=1e-5)
    assert torch.equal(remote["top"], local["top"])


def test_logit_lens_local(model_dir):
    rows = logit_lens.main(model_dir, local=True)
    assert [r["layer"] for r in rows] == list(range(N_LAYER))
    assert all(0 < r["p"] <= 1 and 0 <= r["p_answer"] <= r["p"] + 1e-6 for r in rows)


def test_attribution_patching_local(model_dir):
    r = attribution_patching.main(model_dir, local=True, top=4, check=2)
    attr = r["attribution"]
    assert attr.shape == (N_LAYER, len(r["tokens"])) and torch.isfinite(attr).all()
    assert math.isfinite(r["clean_metric"]) and math.isfinite(r["corrupt_metric"])
    assert attr[:, :3].abs().max() < 1e-4  # the prompts agree on "The capital of": nothing to patch there
    for _, pos, estimate, actual in r["checks"]:
        assert math.isfinite(estimate) and math.isfinite(actual)
        if pos < 3:
            assert abs(actual) < 1e-4


def test_steering_local(model_dir):
    r = steering.main(model_dir, local=True, layer=2, coef=8.0, max_new_tokens=5)
    assert r["vector"].shape == (64,) and torch.isfinite(r["vector"]).all() and r["vector"].norm() > 0
    assert all(isinstance(r[k], str) for k in ("unsteered", "positive", "negative"))


def test_linear_probe_local(model_dir, tmp_path):
    if not hasattr(nd, "collect"):
        pytest.skip("nd.collect is not available yet")
    r = linear_probe.main(model_dir, local=True, layer=2, store=str(tmp_path / "acts.zarr"))
    assert r["features"] == (60, 64)
    assert 0 <= r["test_acc"] <= 1 and r["train_acc"] >= 0.5


def attention_by_hand(model_dir, ids):
    """Every layer's attention weights from transformers itself (eager attention, output_attentions)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(ids, output_attentions=True).attentions


def test_attention_patterns_local(model_dir, tmp_path):
    length = 6
    r = attention_patterns.main(model_dir, local=True, length=length, batch=2, figure=tmp_path / "attention.png")
    ids = r["ids"]
    assert ids.shape == (2, 1 + 2 * length) and torch.equal(ids[:, 1:1 + length], ids[:, 1 + length:])
    for layer, weights in enumerate(attention_by_hand(model_dir, ids)):
        previous = torch.stack([weights[..., q, q - 1] for q in range(3, 1 + 2 * length)], -1).mean((0, 2))
        induction = torch.stack([weights[..., q, q - length + 1] for q in range(1 + length, 1 + 2 * length)],
                                -1).mean((0, 2))
        assert torch.allclose(r["previous"][layer], previous, atol=1e-6)
        assert torch.allclose(r["induction"][layer], induction, atol=1e-6)
    from PIL import Image

    with Image.open(r["figure"]) as image:
        assert image.format == "PNG" and image.width > 2 * 4 * 18  # two panels of 4 heads


def test_attention_patterns_remote_matches_local(model_dir, client, tmp_path):
    local = attention_patterns.main(model_dir, local=True, length=6, batch=2, figure=tmp_path / "local.png")
    remote = attention_patterns.main(model_dir, scheduler=client, length=6, batch=2, figure=tmp_path / "remote.png")
    assert torch.allclose(remote["previous"], local["previous"], atol=1e-6)
    assert torch.allclose(remote["induction"], local["induction"], atol=1e-6)


def test_causal_tracing_local(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    r = causal_tracing.main(model_dir, local=True, figure=tmp_path / "tracing.png")
    assert r["subject"] == [0, 1, 2] and r["restored"].shape == (N_LAYER, len(r["tokens"])) == (N_LAYER, 9)
    assert r["restored"][-1, -1] == pytest.approx(r["clean"], abs=1e-6)  # the last state is the answer
    assert r["corrupted"] != pytest.approx(r["clean"], abs=1e-4)

    # one cell by hand, with plain PyTorch hooks: noise on the subject, layer 1 restored at position 2
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = tiny_tokenizer()  # the one saved with the model
    ids = torch.tensor([tokenizer(causal_tracing.PROMPT)["input_ids"]])
    answer = tokenizer("Paris")["input_ids"][0]
    kept = {}
    keep = model.model.layers[1].register_forward_hook(lambda _m, _a, out: kept.setdefault("clean", out.clone()))
    with torch.no_grad():
        model(ids)
    keep.remove()

    def add_noise(_module, _args, out):
        out[:, 0:3] += r["noise"]

    def restore(_module, _args, out):
        out[:, 2] = kept["clean"][:, 2]

    hooks = [model.model.embed_tokens.register_forward_hook(add_noise),
             model.model.layers[1].register_forward_hook(restore)]
    with torch.no_grad():
        p = model(ids).logits[0, -1].softmax(-1)[answer]
    for hook in hooks:
        hook.remove()
    assert float(r["restored"][1, 2]) == pytest.approx(float(p), abs=1e-6)
    assert Path(r["figure"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
