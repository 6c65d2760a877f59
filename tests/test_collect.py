"""``collect``: activation datasets from a local model and from a deployment; resumable, no duplicates."""
from __future__ import annotations

import pytest
import torch

import nnsight_dask as nd
from nnsight_dask.storage import DatasetWriter
from nnsight_dask.storage.datasets.format import read_dataset_info

torch.set_num_threads(1)

PROMPTS = ["The Eiffel Tower is in", "the city of", "Paris is", "a b c d e", "The capital of France is",
           "city", "Tower of the city is in Paris"]
MODULES = ["model.layers.1", "model.layers.2.mlp"]
NAMES = ["model.layers.1.output", "model.layers.2.mlp.output"]


def alone(lm, prompt):
    """Each module's output for ``prompt`` run alone: the reference a dataset's rows must equal."""
    with lm.trace(prompt):
        outs = [lm.model.layers[1].output.save(), lm.model.layers[2].mlp.output.save()]
    return [getattr(o, "value", o)[0] for o in outs]


def check_dataset(ds, lm, prompts, tol=1e-5):
    assert ds.complete and sorted(ds.modules) == NAMES
    index = ds.prompt_index.compute()
    assert sorted(set(index.tolist())) == list(range(len(prompts)))
    assert (index[1:] >= index[:-1]).all()  # batches in order, prompts in order inside a batch
    for i, prompt in enumerate(prompts):
        rows = index == i
        for name, ref in zip(NAMES, alone(lm, prompt)):
            got = torch.from_numpy(ds[name].compute()[rows])
            assert got.shape == ref.shape  # padding removed: exactly the prompt's tokens
            assert (got - ref).abs().max().item() <= tol


def test_local_collect(local, tmp_path):
    url = str(tmp_path / "acts.zarr")
    ds = nd.collect(local, PROMPTS, modules=MODULES, store=url, batch_size=3, progress=False)
    check_dataset(ds, local, PROMPTS)
    acts = nd.open_activations(url)  # a fresh reader, no cluster involved
    assert acts.n_tokens == ds.n_tokens == sum(len(local.tokenizer(p)["input_ids"]) for p in PROMPTS)
    meta = acts.metadata
    assert meta["n_prompts"] == len(PROMPTS) and meta["modules"] == NAMES and meta["model"] == local._model_id
    assert meta["prompts_digest"].startswith("sha256:")
    # a rerun of a complete dataset changes nothing
    again = nd.collect(local, PROMPTS, modules=MODULES, store=url, batch_size=3, progress=False)
    assert again.n_tokens == ds.n_tokens


def test_collect_resumes_without_duplicates(local, tmp_path, monkeypatch):
    url = str(tmp_path / "acts.zarr")
    real = DatasetWriter.write_batch
    written = []

    def crash_after_two(self, batch, *args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt("interrupted")
        written.append(batch)
        return real(self, batch, *args, **kwargs)

    monkeypatch.setattr(DatasetWriter, "write_batch", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        nd.collect(local, PROMPTS, modules=MODULES, store=url, batch_size=2, progress=False)
    assert written == [0, 1]
    assert not read_dataset_info(_loc(url))["complete"]
    with pytest.raises(nd.storage.IncompleteResultError):
        nd.open_activations(url)

    resumed = []
    monkeypatch.setattr(DatasetWriter, "write_batch",
                        lambda self, batch, *a, **k: (resumed.append(batch), real(self, batch, *a, **k))[1])
    ds = nd.collect(local, PROMPTS, modules=MODULES, store=url, batch_size=2, progress=False)
    assert resumed == [2, 3]  # only the unfinished batches ran again
    check_dataset(ds, local, PROMPTS)

    with pytest.raises(nd.storage.StorageError, match="different activation dataset"):
        nd.collect(local, PROMPTS[:3], modules=MODULES, store=url, batch_size=2, progress=False)


def _loc(url):
    from nnsight_dask.storage.location import as_location

    return as_location(url, None)


# The remote collect test is in test_persist.py, sharing that module's cluster.
