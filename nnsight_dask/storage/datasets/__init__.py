"""Activation datasets: many prompts' activations as token-major Zarr arrays, written resumably.

:class:`DatasetWriter` is the writer side (concurrent, resumable batches); :func:`open_activations`
gives the reader side as dask arrays.
"""
from __future__ import annotations

from .format import DatasetLayout, ModuleSpec, prompts_digest
from .reader import ActivationDataset, open_activations
from .writer import DatasetWriter, delete_dataset

__all__ = ["ActivationDataset", "DatasetLayout", "DatasetWriter", "ModuleSpec", "delete_dataset",
           "open_activations", "prompts_digest"]
