"""nnsight-dask: read and rewrite the internals of language models, locally or on a Dask cluster.

>>> import nnsight_dask as nd
>>> lm = nd.LanguageModel("path/to/model")                      # doctest: +SKIP
>>> with lm.trace("The capital of France is"):                  # doctest: +SKIP
...     hidden = lm.model.layers[5].output.save()
"""
from __future__ import annotations

from . import config, models
from .errors import NNsightDaskError
from .graph import InterventionGraph
from .tracing import Envoy, LanguageModel, NNsight, Proxy, apply
from .tracing import dict_ as dict
from .tracing import list_ as list

__all__ = ["Envoy", "InterventionGraph", "LanguageModel", "NNsight", "NNsightDaskError", "Proxy", "apply",
           "collect", "config", "dict", "list", "models", "open_activations"]
__version__ = "0.1.0"

_LAZY = {
    "serve": "nnsight_dask.scheduler", "undeploy": "nnsight_dask.scheduler", "deployments": "nnsight_dask.scheduler",
    "RemoteModel": "nnsight_dask.scheduler", "ExperimentFuture": "nnsight_dask.scheduler",
    "collect": "nnsight_dask.storage.collect", "open_activations": "nnsight_dask.storage",
}


def __getattr__(name: str) -> object:
    """Cluster parts import Dask; they load on first use so local tracing stays Dask-free."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nnsight_dask' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
