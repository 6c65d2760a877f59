"""Zarr persistence of saved values, lazy results, and activation datasets.

Depends only on zarr, fsspec, dask.array, numpy and torch: shards write through it, clients read
through it, and a laptop with no cluster can open what a cluster wrote. Stores are fsspec URLs
(local paths by default; ``s3://`` etc. with ``storage_options``).

- Persisted saves: :func:`write_tensor` -> :class:`TensorRef` -> :class:`LazyTensor`.
- Experiment lifecycle: :func:`mark_complete`, :func:`is_complete`, :func:`open_experiment`,
  :func:`delete`, :func:`cleanup`.
- Activation datasets: :class:`DatasetWriter` (writer side, resumable, concurrent) and
  :func:`open_activations` (reader side).
"""
from __future__ import annotations

from ..errors import StorageError
from .chunking import TARGET_CHUNK_BYTES, choose_chunks
from .dataset_format import DatasetLayout, ModuleSpec, prompts_digest
from .dataset_reader import ActivationDataset, open_activations
from .dataset_writer import DatasetWriter, delete_dataset
from .errors import CompletedResultError, IncompleteResultError, ResultNotFoundError
from .experiments import Experiment, cleanup, delete, is_complete, list_experiments, mark_complete, open_experiment
from .lazy import LazyTensor
from .location import StoreLocation
from .ref import TensorRef
from .tensors import maybe_persist, should_persist, write_tensor

__all__ = [
    "ActivationDataset", "CompletedResultError", "DatasetLayout", "DatasetWriter", "Experiment",
    "IncompleteResultError", "LazyTensor", "ModuleSpec", "ResultNotFoundError", "StorageError", "StoreLocation",
    "TARGET_CHUNK_BYTES", "TensorRef", "choose_chunks", "cleanup", "delete", "delete_dataset", "is_complete",
    "list_experiments", "mark_complete", "maybe_persist", "open_activations", "open_experiment", "prompts_digest",
    "should_persist", "write_tensor",
]
