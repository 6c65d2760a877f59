"""nnsight-dask: read and rewrite the internals of language models, locally or on a Dask cluster.

>>> import nnsight_dask as nd
>>> lm = nd.LanguageModel("path/to/model")                      # doctest: +SKIP
>>> with lm.trace("The capital of France is"):                  # doctest: +SKIP
...     hidden = lm.model.layers[5].output.save()
"""
from __future__ import annotations

from . import config, models
from .api import LanguageModel, NNsight, smollm2
from .errors import NNsightDaskError
from .graph import InterventionGraph
from .graph.policy import Policy
from .tracing import Envoy, Proxy, apply
from .tracing import dict_ as dict
from .tracing import list_ as list

__all__ = ["Deployment", "Envoy", "ExperimentFuture", "InterventionGraph", "LanguageModel", "NNsight",
           "NNsightDaskError", "Policy", "Proxy", "RemoteModel", "apply", "collect", "config", "deployments", "dict", "list",
           "models", "open_activations", "serve", "smollm2", "undeploy"]
__version__ = "0.1.0"

_LAZY = {
    "serve": "nnsight_dask.client", "undeploy": "nnsight_dask.client", "deployments": "nnsight_dask.client",
    "RemoteModel": "nnsight_dask.client", "ExperimentFuture": "nnsight_dask.client",
    "Deployment": "nnsight_dask.client",
    "collect": "nnsight_dask.recipes", "open_activations": "nnsight_dask.storage",
    "storage": "nnsight_dask.storage",
}


def __getattr__(name: str) -> object:
    """Cluster parts import Dask's distributed, storage imports Zarr: they load on first use, so local
    tracing stays free of both."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nnsight_dask' has no attribute {name!r}")
    import importlib

    loaded = importlib.import_module(module)
    return loaded if name == "storage" else getattr(loaded, name)
