"""Deployment policy on a real LocalCluster: set by whoever serves, stored with the deployment,
enforced by the shards before an experiment touches the model (a client's own check only fails fast)."""
from __future__ import annotations

import pytest
import torch

import nnsight_dask as nd
from nnsight_dask.errors import PolicyError
from nnsight_dask.execution.stage import Carry, Stage

pytestmark = pytest.mark.cluster
PROMPT = "The Eiffel Tower is in the city of"


@pytest.fixture(scope="module")
def strict_policy(tmp_path_factory):
    allowed = tmp_path_factory.mktemp("allowed-store")
    return nd.Policy(weights="deny", modules=["model.layers.*"], gradients=False, stores=[str(allowed)],
                     max_new_tokens=4, max_prompt_tokens=16, max_tensor_bytes=64 << 10)


@pytest.fixture(scope="module")
def strict(client, model_dir, strict_policy):
    nd.serve(client, model_dir, shards=2, name="strict", policy=strict_policy)
    yield nd.RemoteModel(client, "strict")
    nd.undeploy(client, "strict")


@pytest.fixture(scope="module")
def open_deployment(client, model_dir):
    nd.serve(client, model_dir, shards=2, name="open")
    yield nd.RemoteModel(client, "open")
    nd.undeploy(client, "open")


def test_policy_is_stored_with_the_deployment(client, strict, strict_policy):
    record = nd.deployments(client)["strict"]
    assert record.policy == strict_policy
    assert strict.deployment.policy.weights == "deny"
    assert nd.deployments(client)["strict"].policy.to_dict()["modules"] == ["model.layers.*"]


def test_allowed_experiment_runs_and_equals_local(strict, local):
    with strict.trace(PROMPT):
        remote = strict.model.layers[2].output.save()
    with local.trace(PROMPT):
        expected = local.model.layers[2].output.save()
    assert (remote - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("rule, body", [
    ("weights", lambda lm: lm.lm_head.weight.save()),
    ("weights", lambda lm: lm.lm_head(lm.model.layers[3].output).save()),      # a probe of lm_head's weights
    ("modules", lambda lm: lm.model.embed_tokens.output.save()),
    ("modules", lambda lm: lm.output.logits.save()),                            # the root module
    ("gradients", lambda lm: lm.model.layers[1].output.grad.save()),
    ("max_tensor_bytes", lambda lm: (lm.model.layers[1].output + torch.ones(128, 256)).save()),
])
def test_each_rule_refuses_with_its_name_and_line(strict, rule, body):
    with pytest.raises(PolicyError, match=r"test_policy\.py:\d+") as info:
        with strict.trace(PROMPT):
            body(strict)
    assert info.value.rule == rule


def test_generation_and_prompt_bounds(strict):
    with pytest.raises(PolicyError, match="max_new_tokens=5; this deployment's policy allows at most 4"):
        with strict.generate(PROMPT, max_new_tokens=5):
            strict.model.layers[0].output.save()
    long_prompt = " ".join(["the"] * 20)
    with pytest.raises(PolicyError, match="prompt of 20 tokens.*at most 16"):
        with strict.trace(long_prompt):
            strict.model.layers[0].output.save()


def test_prompt_bound_defaults_to_the_models_context(open_deployment):
    """No max_prompt_tokens: the model's context length (256 for the tiny model) bounds prompt + new tokens."""
    with pytest.raises(PolicyError, match="250 prompt \\+ 10 new tokens, over the model's context length of 256"):
        with open_deployment.generate(" ".join(["the"] * 250), max_new_tokens=10):
            open_deployment.model.layers[0].output.save()


def test_stores_outside_the_allowed_prefixes_are_refused(strict, strict_policy, tmp_path):
    allowed = strict_policy.stores[0]
    for store in (str(tmp_path / "elsewhere"), f"{allowed}/../escape", "file:///proc/self"):
        with pytest.raises(PolicyError, match="does not let experiments write to store"):
            with strict.trace(PROMPT, store=store, persist_threshold=0):
                strict.model.layers[1].output.save()
    with strict.trace(PROMPT, store=f"{allowed}/run1", persist_threshold=0):
        h = strict.model.layers[1].output.save()
    assert h.torch().shape[-1] == 64


def test_the_shard_enforces_the_policy_without_the_client(client, strict):
    """A graph that skips the client's check (e.g. a client of another version) meets the shard's."""
    from tests.cluster import route_by_hand

    with strict.trace(PROMPT, execute=False) as tracer:
        strict.lm_head.weight.save()
    record = strict.deployment
    owner = record.owner("lm_head")
    answers = route_by_hand(client, record, {"bypass": tracer.graph.to_json()}, [Stage(0, 0, owner)],
                            {"bypass": Carry()})
    with pytest.raises(PolicyError, match="weights='deny'"):
        raise answers["bypass"]
    # a client's hop claiming its graph was checked already (as peer shards tell each other) is checked
    answers = route_by_hand(client, record, {"claim": tracer.graph.to_json()}, [Stage(0, 0, owner)],
                            {"claim": Carry()}, checked={"claim"})
    with pytest.raises(PolicyError, match="weights='deny'"):
        raise answers["claim"]


@pytest.mark.parametrize("body", [
    lambda lm: lm.model.layers[1].output.repeat(1000, 1, 1).save(),                # 2 KiB -> 2 MB
    lambda lm: lm.model.layers[1].output.new_ones((1 << 20, 1 << 20)).save(),      # 8 TiB: never allocated
    lambda lm: (lm.model.layers[1].output.reshape(-1, 1) * lm.model.layers[1].output.reshape(1, -1)).save(),
])
def test_ops_that_would_allocate_over_the_bound_are_refused_before_they_run(strict, body):
    with pytest.raises(PolicyError, match=r"would make a tensor of [\d,]+ bytes; this deployment allows at most") \
            as info:
        with strict.trace(PROMPT):
            body(strict)
    assert info.value.rule == "max_tensor_bytes"
    with strict.trace(PROMPT):  # the shards serve on
        ok = strict.model.layers[1].output.repeat(2, 1, 1).save()
    assert ok.shape == (2, 8, 64)


def test_backward_leaves_no_gradient_on_the_shared_weights(client, open_deployment):
    with open_deployment.trace(PROMPT):
        g = open_deployment.model.layers[1].output.grad.save()
        open_deployment.output.logits[0, -1].max().backward()
    assert g.abs().sum() > 0

    def weight_grads(name):
        from nnsight_dask.worker import registry

        return sorted({registry.lookup(d, i).server.runner.model.__class__.__name__: sum(
            p.grad is not None for p in registry.lookup(d, i).server.runner.model.parameters())
            for d, i in registry.held() if d == name}.values())
    assert all(count == 0 for counts in client.run(weight_grads, "open").values() for count in counts)
