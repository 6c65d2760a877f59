"""Persisted saves on a real LocalCluster: large saves are written by the shard that made them,
come back as lazy tensors equal to local values, and become visible only when the experiment is complete.

The remote ``collect`` test lives here too, so that one cluster serves both (cluster start-up is
the slow part of these tests).
"""
from __future__ import annotations

import pytest
import torch

import nnsight_dask as nd
from nnsight_dask.errors import ExperimentFailedError, GraphValidationError, InterventionError
from nnsight_dask.storage import LazyTensor, is_complete, list_experiments, open_experiment


torch.set_num_threads(1)
pytestmark = pytest.mark.cluster
PROMPT = "The Eiffel Tower is in the city of"
THRESHOLD = 1024  # bytes: a [1, 9, 64] float32 hidden state (2304 B) persists, a scalar stays inline


@pytest.fixture(scope="module")
def remote(client, model_dir):
    nd.serve(client, model_dir, shards=2, name="tiny-persist")
    yield nd.RemoteModel(client, "tiny-persist")


def reference(local):
    with local.trace(PROMPT):
        h1 = local.model.layers[1].output.save()
        h3 = local.model.layers[3].output.save()
        logits = local.output.logits.save()
    return h1, h3, logits


def test_large_saves_come_back_lazy_and_equal(remote, local, tmp_path):
    store = str(tmp_path / "store.zarr")
    with remote.trace(PROMPT, store=store, persist_threshold=THRESHOLD) as tracer:
        h1 = remote.model.layers[1].output.save()        # shard 0
        h3 = remote.model.layers[3].output.save()        # shard 1
        logits = remote.output.logits.save()             # shard 1, [1, 9, vocab]
        top = remote.output.logits[:, -1].argmax(-1).save()  # small: inline
        hs = [remote.model.layers[i].output.save() for i in range(4)]
    ref_h1, ref_h3, ref_logits = reference(local)
    for value in (h1, h3, logits):  # saved locals are the lazy tensors themselves
        assert isinstance(value, LazyTensor), value
    for proxy in hs:  # proxies in a list keep .value
        assert isinstance(proxy.value, LazyTensor), proxy
    assert isinstance(top, torch.Tensor)
    assert torch.allclose(h1.torch(), ref_h1, atol=1e-5)
    assert torch.allclose(h3.torch(), ref_h3, atol=1e-5)
    assert torch.allclose(logits.torch(), ref_logits, atol=1e-4)
    assert torch.equal(top, ref_logits[:, -1].argmax(-1))
    # slicing stays lazy and reads the right values
    last = h3[:, -1]
    assert isinstance(last, LazyTensor) and tuple(last.shape) == (1, 64)
    assert torch.allclose(last.torch(), ref_h3[:, -1], atol=1e-5)
    assert torch.allclose(torch.as_tensor(h1[0, 2:4].numpy()), ref_h1[0, 2:4], atol=1e-5)
    # the experiment is complete, and holds exactly the persisted saves
    experiments = list_experiments(store)
    assert len(experiments) == 1
    (experiment_id, info), = experiments.items()
    assert info["complete"]
    assert sorted(open_experiment(store, experiment_id)) == sorted(
        ["h1", "h3", "logits", "hs[0]", "hs[1]", "hs[2]", "hs[3]"])
    assert h1.shape == ref_h1.shape


def test_bf16_persisted_exactly(remote, local, tmp_path):
    store = str(tmp_path / "bf16.zarr")
    with remote.trace(PROMPT, store=store, persist_threshold=0):
        h = remote.model.layers[2].output.to(torch.bfloat16).save()
    with local.trace(PROMPT):
        ref = local.model.layers[2].output.to(torch.bfloat16).save()
    assert isinstance(h, LazyTensor) and h.dtype == torch.bfloat16
    got = h.torch()
    assert got.dtype == torch.bfloat16 and torch.equal(got, ref)


def test_non_blocking_trace_persists_too(remote, local, tmp_path):
    store = str(tmp_path / "nb.zarr")
    with remote.trace(PROMPT, store=store, persist_threshold=THRESHOLD, blocking=False) as tracer:
        h1 = remote.model.layers[1].output.save()
    tracer.future.result(timeout=60)
    ref_h1, _, _ = reference(local)
    assert isinstance(h1.value, LazyTensor)
    assert torch.allclose(h1.value.torch(), ref_h1, atol=1e-5)


def test_failed_experiment_leaves_nothing_complete(remote, tmp_path):
    store = str(tmp_path / "failed.zarr")
    with pytest.raises(InterventionError, match="IndexError"):
        with remote.trace(PROMPT, store=store, persist_threshold=THRESHOLD):
            remote.model.layers[1].output.save()             # persisted on shard 0 first...
            remote.model.layers[3].output[:, 99].save()      # ...then shard 1 fails
    assert list_experiments(store) == {}  # deleted; at the very least never complete
    # the same deployment keeps working with the same store
    with remote.trace(PROMPT, store=store, persist_threshold=THRESHOLD):
        ok = remote.model.layers[1].output.save()
    assert isinstance(ok, LazyTensor)
    complete = [e for e, info in list_experiments(store).items() if info.get("complete")]
    assert len(complete) == 1 and is_complete(store, complete[0])


def _set_on_workers(client, name, value):
    """Set an nnsight-dask setting in every worker process (what an operator's config file does)."""
    def apply(key, value):
        import dask

        dask.config.set({key: value})
    client.run(apply, nd.config.key(name), value)


def test_inline_limit_is_the_workers(remote, client, settings):
    """The workers' limit holds whatever the client sets for itself."""
    _set_on_workers(client, "max_inline_result_bytes", 1000)
    settings.max_inline_result_bytes = 1 << 30  # a client widening its own limit
    try:
        with pytest.raises(ExperimentFailedError, match="store="):
            with remote.trace(PROMPT):
                remote.model.layers[1].output.save()
        with remote.trace(PROMPT):  # small results still pass
            top = remote.output.logits[:, -1].argmax(-1).save()
        assert top.shape == (1,)
    finally:
        _set_on_workers(client, "max_inline_result_bytes", nd.config.DEFAULTS["max_inline_result_bytes"])


def test_generation_limit_is_checked_on_the_shards(remote, client, settings):
    _set_on_workers(client, "max_new_tokens_limit", 2)
    settings.max_new_tokens_limit = 10_000
    try:
        with pytest.raises(GraphValidationError, match="max_new_tokens=5; this server allows at most 2"):
            with remote.generate(PROMPT, max_new_tokens=5):
                remote.model.layers[0].output.save()
    finally:
        _set_on_workers(client, "max_new_tokens_limit", nd.config.DEFAULTS["max_new_tokens_limit"])


def test_local_trace_with_store(local, tmp_path):
    store = str(tmp_path / "local.zarr")
    with local.trace(PROMPT, store=store, persist_threshold=THRESHOLD):
        h1 = local.model.layers[1].output.save()
        small = local.model.layers[1].output[0, -1, 0].save()
    ref_h1, _, _ = reference(local)
    assert isinstance(h1, LazyTensor) and isinstance(small, torch.Tensor)
    assert torch.equal(h1.torch(), ref_h1)
    (experiment_id, info), = list_experiments(store).items()
    assert info["complete"] and list(open_experiment(store, experiment_id)) == ["h1"]


def test_graph_options_round_trip(local):
    with local.trace(PROMPT, store="s3://bucket/run", persist_threshold=7, execute=False) as tracer:
        local.model.layers[1].output.save()
    graph = nd.InterventionGraph.from_json(tracer.graph.to_json())
    assert graph.options == {"store": "s3://bucket/run", "persist_threshold": 7}


# -- collect on the deployment (shares this module's cluster) ------------------------------------------
def test_remote_collect(remote, local, tmp_path):
    from .test_collect import MODULES, PROMPTS, check_dataset

    url = str(tmp_path / "remote-acts.zarr")
    ds = nd.collect(remote, PROMPTS, modules=MODULES, store=url, batch_size=2, progress=False)
    check_dataset(ds, local, PROMPTS)
    assert nd.open_activations(url).n_tokens == ds.n_tokens


def test_client_submit_graph_with_store_reads_refs_and_counts_bytes(client, remote, local, tmp_path):
    """``client.submit(graph)`` hands back TensorRefs that read from Zarr; the monitor counts the bytes."""
    from nnsight_dask.scheduler import rpc

    store = str(tmp_path / "submit.zarr")
    with remote.trace(PROMPT, store=store, persist_threshold=THRESHOLD, execute=False) as tracer:
        h3 = remote.model.layers[3].output.save()  # noqa: F841 (saved under this name)
    result = client.submit(tracer.graph).result()
    ref = result["h3"]
    _, ref_h3, _ = reference(local)
    assert torch.allclose(ref.torch(), ref_h3, atol=1e-5)
    assert torch.allclose(ref[:, -1].compute(), ref_h3[:, -1], atol=1e-5)
    assert ref.numpy().shape == tuple(ref_h3.shape)
    snapshot = client.sync(getattr(client.scheduler, rpc.SNAPSHOT_RPC))
    row = next(r for r in snapshot["experiments"] if r["experiment"] == result.experiment_id)
    assert row["status"] == "completed" and row["bytes_persisted"] == ref_h3.numel() * 4
