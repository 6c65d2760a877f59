"""The simulated-GPU model: decoder layers of a fixed time per call, the tiny Llama's numbers."""
from __future__ import annotations

import asyncio
import pickle
import time

import pytest
import torch
from distributed import Client
from distributed.utils_test import gen_cluster

import nnsight_dask as nd
from nnsight_dask.models import SimulatedLlama, simulated_llama, tiny_llama, tiny_tokenizer
from nnsight_dask.models.simulated import simulated_layer_class

PROMPT = "The Eiffel Tower is in the city of"


def _ids(rows: int) -> torch.Tensor:
    return tiny_tokenizer()([PROMPT] * rows, return_tensors="pt").input_ids


def test_outputs_equal_the_tiny_llama_of_the_same_seed():
    ids = _ids(3)
    with torch.no_grad():
        got = simulated_llama(n_layer=3, hidden=32, layer_ms=0.0, seed=5)(ids).logits
        want = tiny_llama(n_layer=3, hidden=32, seed=5)(ids).logits
    assert torch.equal(got, want)


def test_a_layer_call_takes_the_same_time_whatever_the_batch():
    layer_ms = 30.0
    model = simulated_llama(n_layer=1, layer_ms=layer_ms)
    layer = model.model.layers[0]
    assert isinstance(layer, simulated_layer_class()) and layer.layer_ms == layer_ms

    def call_ms(rows: int) -> float:
        hidden = torch.randn(rows, 8, 32)
        position_embeddings = model.model.rotary_emb(hidden, torch.arange(8)[None].expand(rows, -1))
        started = time.perf_counter()
        with torch.no_grad():
            layer(hidden, position_embeddings=position_embeddings)
        return (time.perf_counter() - started) * 1e3

    # the fastest of five calls: a loaded machine only ever adds time (a late wake-up)
    times = {rows: min(call_ms(rows) for _ in range(5)) for rows in (1, 16)}
    assert all(t >= layer_ms for t in times.values())
    assert times[16] - times[1] < 0.3 * layer_ms, times  # flat in the batch (the arithmetic is tiny)


def test_the_source_and_its_models_pickle_by_reference():
    source = SimulatedLlama(n_layer=2, layer_ms=1.0)
    assert pickle.loads(pickle.dumps(source)) == source
    assert source.__name__ == "simulated-llama-2x32-1ms"
    model, tokenizer = source()
    again = pickle.loads(pickle.dumps(model))
    assert type(again.model.layers[1]) is simulated_layer_class() and again.model.layers[1].layer_ms == 1.0
    assert tokenizer.padding_side == "left"
    with pytest.raises(ValueError, match="layer_ms must be >= 0"):
        simulated_llama(layer_ms=-1)


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1), ("127.0.0.1", 1)], timeout=60)
async def test_served_in_shards_like_any_model(c, s, a, b):
    source = SimulatedLlama(n_layer=4, layer_ms=1.0)
    local = nd.LanguageModel(*source())
    with local.trace(PROMPT):
        local.model.layers[1].mlp.output[:, -1] = 0.0
        want = local.output.logits[:, -1].argmax(-1).save()

    def body() -> torch.Tensor:
        with Client(s.address, set_as_default=False) as client:
            record = nd.serve(client, source, shards=2, name="sim")
            assert record.source.startswith("SimulatedLlama(") and [p.layers for p in record.shards] == [(0, 2), (2, 4)]
            remote = nd.RemoteModel(client, "sim")
            with remote.trace(PROMPT, verbose=False):
                remote.model.layers[1].mlp.output[:, -1] = 0.0
                got = remote.output.logits[:, -1].argmax(-1).save()
            nd.undeploy(client, "sim")
            return got

    got = await asyncio.to_thread(body)
    assert torch.equal(getattr(got, "value", got), getattr(want, "value", want))
