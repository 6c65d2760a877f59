"""Zarr persistence of saved values, lazy results, and activation datasets.

Depends only on zarr, fsspec, dask.array, numpy and torch: shards write through it, clients read
through it, and a laptop with no cluster can open what a cluster wrote. Stores are fsspec URLs
(local paths by default; ``s3://`` etc. with ``storage_options``).

- ``results/``: persisted saves. :class:`ZarrSink` (write, commit, abort: one lifecycle for local
  and remote runs), :func:`write_tensor` -> :class:`TensorRef` -> :class:`LazyTensor`, and
  :func:`mark_complete`, :func:`is_complete`, :func:`open_experiment`, :func:`delete`, :func:`cleanup`.
- ``datasets/``: activation datasets. :class:`DatasetWriter` (writer side, resumable, concurrent) and
  :func:`open_activations` (reader side).
"""
from __future__ import annotations

from ..errors import StorageError
from .chunking import TARGET_CHUNK_BYTES, choose_chunks
from .datasets import (
                       ActivationDataset,
                       DatasetLayout,
                       DatasetWriter,
                       ModuleSpec,
                       delete_dataset,
                       open_activations,
                       prompts_digest,
)
from .errors import CompletedResultError, IncompleteResultError, ResultNotFoundError
from .location import StoreLocation
from .results import (
                       Experiment,
                       LazyTensor,
                       TensorRef,
                       ZarrSink,
                       cleanup,
                       delete,
                       is_complete,
                       list_experiments,
                       mark_complete,
                       open_experiment,
                       open_refs,
                       write_tensor,
)

__all__ = [
    "ActivationDataset", "CompletedResultError", "DatasetLayout", "DatasetWriter", "Experiment",
    "IncompleteResultError", "LazyTensor", "ModuleSpec", "ResultNotFoundError", "StorageError", "StoreLocation",
    "TARGET_CHUNK_BYTES", "TensorRef", "ZarrSink", "choose_chunks", "cleanup", "delete", "delete_dataset",
    "is_complete", "list_experiments", "mark_complete", "open_activations", "open_experiment", "open_refs",
    "prompts_digest", "write_tensor",
]
