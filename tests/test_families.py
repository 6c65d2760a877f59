"""The families matrix: 20 transformers decoder families, tiny and seeded, saved with ``save_pretrained``.

For each family:

- locally, a trace's hidden states of every layer and logits equal transformers' own batched forward
  read with plain forward hooks; a setter equals the same edit made by a hook; greedy generation
  equals transformers' ``generate``;
- in 2 shards on a LocalCluster, the same trace and the same generation equal the local ones, and
  gradients flow back across the shards (a setter on the last shard, a gradient read on the first)
  as they do locally.

Two prompts of different lengths throughout, so left padding is always in play, and longer than the
sliding attention windows of Mistral and Gemma 2/3 (see ``models.tiny_family``). docs/models.md
lists what is known not to work. One cluster for the module; each family is served, checked and
undeployed in turn.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

import nnsight_dask as nd
from nnsight_dask.models import find_layers, save_tiny

FAMILIES = ["llama", "mistral", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "gpt_neox", "opt",
            "gptj", "bloom", "falcon", "mixtral", "qwen2_moe", "olmo2", "gpt2", "starcoder2", "granite", "smollm3"]
PROMPTS = ["The Eiffel Tower is in the city of", "Paris is"]
NEW_TOKENS = 3


class Family:
    """One family's checkpoint, its local wrapper, and where its decoder layers are."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.lm = nd.LanguageModel(self.path)
        self.layers_path, layers = find_layers(self.lm._module)
        self.n_layers = len(layers)
        self.tuple_output = _returns_tuple(self.lm._module, layers[0])

    def reference(self) -> torch.nn.Module:
        """The same checkpoint loaded by transformers alone."""
        return AutoModelForCausalLM.from_pretrained(self.path).eval()

    def layer(self, lm: Any, index: int) -> Any:
        """Envoy of decoder layer ``index`` of ``lm`` (local or remote)."""
        return functools.reduce(getattr, self.layers_path.split("."), lm)[index]

    def hidden(self, lm: Any, index: int) -> Any:
        """The hidden state a decoder layer returns (alone, or first of a tuple)."""
        output = self.layer(lm, index).output
        return output[0] if self.tuple_output else output


def _returns_tuple(model: torch.nn.Module, layer: torch.nn.Module) -> bool:
    seen: list[Any] = []
    handle = layer.register_forward_hook(lambda _m, _a, output: seen.append(output))
    try:
        with torch.no_grad():
            model(torch.tensor([[4, 5]]))
    finally:
        handle.remove()
    return isinstance(seen[0], tuple)


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Family]:
    """Built on first use, one per family, shared by the local and the remote tests."""
    root = tmp_path_factory.mktemp("families")

    class Built(dict):
        def __missing__(self, name: str) -> Family:
            self[name] = Family(save_tiny(root / name, arch=name, n_layer=2, hidden=32))
            return self[name]

    return Built()


def trace_all_layers(family: Family, lm: Any, **options: Any) -> dict[str, Any]:
    with lm.trace(PROMPTS, **options):
        hidden = [family.hidden(lm, i).save() for i in range(family.n_layers)]
        logits = lm.output.logits.save()
    return {"hidden": [h.value for h in hidden], "logits": logits}  # the list's proxies keep .value


def trace_setter_and_gradient(family: Family, lm: Any, **options: Any) -> dict[str, Any]:
    """Shift the last position of the last layer's hidden state; read the first layer's gradient."""
    last = family.n_layers - 1
    with lm.trace(PROMPTS, **options):
        grad = family.hidden(lm, 0).grad.save()
        family.hidden(lm, last)[:, -1] = family.hidden(lm, last)[:, -1] + 1
        logits = lm.output.logits.save()
        logits[:, -1].max().backward()
    return {"grad": grad, "logits": logits}


def generate(lm: Any, **options: Any) -> torch.Tensor:
    with lm.generate(PROMPTS, max_new_tokens=NEW_TOKENS, **options) as tracer:
        ids = tracer.result.save()
    return ids


@pytest.mark.parametrize("name", FAMILIES)
def test_local_equals_transformers(name: str, families: dict[str, Family]) -> None:
    family = families[name]
    reference = family.reference()
    layers = functools.reduce(getattr, family.layers_path.split("."), reference)
    encoded = family.lm.tokenizer(PROMPTS, return_tensors="pt", padding=True)

    kept: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _a, output: kept.append(_first(output).clone()))
             for layer in layers]
    with torch.no_grad():
        logits = reference(**encoded).logits
    for hook in hooks:
        hook.remove()
    traced = trace_all_layers(family, family.lm)
    assert len(kept) == family.n_layers
    for got, want in zip(traced["hidden"], kept, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(traced["logits"], logits, rtol=0, atol=0)

    def zero_last_position(_module: Any, _args: Any, output: Any) -> None:
        _first(output)[:, -1] = 0

    hook = layers[family.n_layers - 1].register_forward_hook(zero_last_position)
    with torch.no_grad():
        edited = reference(**encoded).logits
    hook.remove()
    with family.lm.trace(PROMPTS):
        family.hidden(family.lm, family.n_layers - 1)[:, -1] = 0
        set_logits = family.lm.output.logits.save()
    torch.testing.assert_close(set_logits, edited, rtol=0, atol=0)
    assert not torch.equal(edited, logits)

    expected = reference.generate(**encoded, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(generate(family.lm), expected)


@pytest.mark.cluster
@pytest.mark.parametrize("name", FAMILIES)
def test_two_shards_equal_local(name: str, families: dict[str, Family], client: Any) -> None:
    family = families[name]
    record = nd.serve(client, family.path, shards=2, name=f"family-{name}")
    try:
        assert [shard.layers for shard in record.shards] == [(0, 1), (1, 2)]
        remote = nd.RemoteModel(client, record.name)
        torch.testing.assert_close(trace_all_layers(family, remote), trace_all_layers(family, family.lm))
        got, want = trace_setter_and_gradient(family, remote), trace_setter_and_gradient(family, family.lm)
        assert want["grad"].abs().sum() > 0
        torch.testing.assert_close(got, want)
        assert torch.equal(generate(remote), generate(family.lm))
    finally:
        nd.undeploy(client, record.name)
