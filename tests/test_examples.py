"""The research recipes in examples/ run end to end on a tiny random model (locally, and one remotely)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

import nnsight_dask as nd
from nnsight_dask.models import save_tiny

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import activation_patching  # noqa: E402
import attribution_patching  # noqa: E402
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


@pytest.mark.cluster
def test_activation_patching_remote_matches_local(model_dir):
    from .cluster import local_cluster

    local = activation_patching.main(model_dir, local=True)
    with local_cluster(2) as client:
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
