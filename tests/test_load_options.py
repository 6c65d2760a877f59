"""from_pretrained options: passed through to local loads and to every shard's load; the shards decide.

References: transformers' own eager attention weights (``output_attentions=True``) for the local
read, the local run for the remote one. The refusals are checked on the shards themselves, with
the workers' settings, against a client that widened its own.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import nnsight_dask as nd
from nnsight_dask.errors import DeploymentError
from nnsight_dask.models.loading import LoadOptionError, check_shard_load_options, split_dtype

PROMPT = "The Eiffel Tower is in the city of"


def _set_on_workers(client, name, value):
    """Set an nnsight-dask setting in every worker process (what an operator's config file does)."""
    def apply(key, value):
        import dask

        dask.config.set({key: value})
    client.run(apply, nd.config.key(name), value)


@pytest.fixture(scope="module")
def eager(model_dir):
    return nd.LanguageModel(model_dir, attn_implementation="eager")


def test_eager_attention_weights_equal_transformers(model_dir, eager):
    reference = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    ids = eager.tokenizer(PROMPT, return_tensors="pt")
    expected = reference(**ids, output_attentions=True).attentions
    with eager.trace(PROMPT):
        weights = [eager.model.layers[i].self_attn.output[1].save() for i in range(4)]
    for got, want in zip(weights, expected):
        assert got.shape == (1, 4, 8, 8)
        assert torch.equal(got, want)
    assert torch.allclose(weights[0].sum(-1), torch.ones(1, 4, 8))


def test_options_reach_from_pretrained(model_dir):
    lm = nd.LanguageModel(model_dir, num_hidden_layers=2, low_cpu_mem_usage=True, revision="main")
    assert len(lm.model.layers) == 2  # a config override, as transformers' from_pretrained takes it


def test_options_need_a_path(tiny_llama, tiny_tokenizer):
    with pytest.raises(LoadOptionError, match=r"\['attn_implementation'\] apply when nd.LanguageModel loads"):
        nd.LanguageModel(tiny_llama, tokenizer=tiny_tokenizer, attn_implementation="eager")


@pytest.mark.parametrize("options, message", [
    ({"cache_dir": "/tmp/x"}, "load option 'cache_dir' is not taken by a deployment's shards"),
    ({"num_hidden_layers": 2}, "load option 'num_hidden_layers' is not taken"),
    ({"low_cpu_mem_usage": "yes"}, "load option 'low_cpu_mem_usage' takes a bool, not str"),
    ({"subfolder": "../other"}, "subfolder='../other' must name a folder inside the model's directory"),
    ({"trust_remote_code": True}, "trust_remote_code=True runs Python files shipped with the checkpoint"),
    ({"attn_implementation": "kernels-community/flash-attn"}, "attn_implementation='kernels-community/flash-attn' runs"),
])
def test_shard_options_refused(options, message):
    with pytest.raises(LoadOptionError, match=message):
        check_shard_load_options(options, trust_remote_code=False)


def test_shard_options_an_operator_allows():
    options = {"trust_remote_code": True, "attn_implementation": "eager", "revision": "v1"}
    assert check_shard_load_options(options, trust_remote_code=True) == options
    assert check_shard_load_options({"trust_remote_code": True}, trust_remote_code=None)  # a client: shards decide


def test_dtype_from_options_or_argument():
    assert split_dtype({"torch_dtype": "float16"}) == (torch.float16, {})
    assert split_dtype({"dtype": torch.bfloat16}, "bfloat16") == (torch.bfloat16, {})
    with pytest.raises(LoadOptionError, match="two different dtypes"):
        split_dtype({"dtype": "float16"}, torch.float32)
    with pytest.raises(LoadOptionError, match="'half-ish' is not a torch dtype"):
        split_dtype({"dtype": "half-ish"})


def test_remote_eager_weights_equal_local(client, model_dir, eager):
    nd.serve(client, model_dir, shards=2, name="eager", load_options={"attn_implementation": "eager"})
    try:
        remote = nd.RemoteModel(client, "eager")
        with remote.trace(PROMPT):
            got = [remote.model.layers[i].self_attn.output[1].save() for i in (0, 3)]  # one per shard
        with eager.trace(PROMPT):
            want = [eager.model.layers[i].self_attn.output[1].save() for i in (0, 3)]
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    finally:
        nd.undeploy(client, "eager")


def test_unknown_option_fails_before_deploying(client, model_dir):
    with pytest.raises(LoadOptionError, match="'token' is not taken"):
        nd.serve(client, model_dir, shards=2, name="token", load_options={"token": "hf_..."})
    with pytest.raises(LoadOptionError, match="a callable source builds its own model"):
        nd.serve(client, nd.models.tiny_llama, name="callable", load_options={"revision": "v1"})
    assert "token" not in nd.deployments(client) and "callable" not in nd.deployments(client)


def test_workers_decide_on_remote_code(client, model_dir, settings):
    settings.trust_remote_code = True  # a client widening its own setting changes nothing on the cluster
    with pytest.raises(DeploymentError, match="this cluster does not allow it"):
        nd.serve(client, model_dir, shards=2, name="remote-code", load_options={"trust_remote_code": True})
    assert "remote-code" not in nd.deployments(client)
    _set_on_workers(client, "trust_remote_code", True)  # the operator allows it
    try:
        nd.serve(client, model_dir, shards=2, name="remote-code", load_options={"trust_remote_code": True})
        assert nd.deployments(client)["remote-code"].options["load_options"] == {"trust_remote_code": True}
        nd.undeploy(client, "remote-code")
    finally:
        _set_on_workers(client, "trust_remote_code", False)
