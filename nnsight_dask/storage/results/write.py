"""Persisting one saved tensor: ``<store>/<experiment>/<name>`` as a Zarr v3 array.

This is what :class:`~.sink.ZarrSink` calls for a saved value above the persist threshold; it returns
the :class:`TensorRef` that travels back to the client instead of the tensor. The array is created and
written in one go, by one writer, so it owns all of its chunks; it becomes *visible* to readers only
when the experiment is marked complete (see :mod:`.experiments`).
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch
import zarr

from ...tensors import dtype_name, to_stored
from ..chunking import CHUNK_KEY_ENCODING, choose_chunks
from ..errors import StorageError
from ..location import StoreLocation
from ..names import ATTRS_KEY, validate_experiment_id, validate_name
from .chunk_writer import write_whole_chunks
from .lifecycle import ensure_experiment
from .ref import TensorRef


def write_tensor(
    store_url: str | os.PathLike[str],
    experiment_id: str,
    name: str,
    tensor: torch.Tensor,
    *,
    chunks: Sequence[int] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> TensorRef:
    """Write ``tensor`` as a Zarr v3 array at ``<store_url>/<experiment_id>/<name>``.

    Parameters
    ----------
    store_url
        fsspec URL or local path of the store root.
    experiment_id
        The experiment the value belongs to; its group is created on first write.
    name
        The saved value's name inside the experiment.
    tensor
        Any dtype (bf16/fp8 stored as an unsigned-int view of their bits), any device.
    chunks
        Chunk shape; default: trailing dims whole, ~2 MiB chunks (:func:`.chunking.choose_chunks`).
    storage_options
        fsspec options of the store (credentials, endpoint).

    Returns
    -------
    TensorRef
        What to send to the client instead of the tensor.

    Raises
    ------
    CompletedResultError
        The experiment is already complete (results are immutable once visible).
    """
    location = StoreLocation(os.fspath(store_url), storage_options or {})
    validate_experiment_id(experiment_id)
    validate_name(name)
    ensure_experiment(location, experiment_id)
    data = to_stored(tensor)
    ref = TensorRef.for_tensor(location, f"{experiment_id}/{name}", tensor)
    chosen = tuple(chunks) if chunks is not None else choose_chunks(data.shape, data.itemsize)
    if len(chosen) != data.ndim:
        raise StorageError(f"chunks {chosen} do not match the {data.ndim}-d shape {tuple(data.shape)} of {name!r}",
                           name=name)
    try:
        z = zarr.create_array(
            location.zarr_store(), name=ref.path, shape=data.shape, dtype=data.dtype, chunks=chosen,
            compressors=None, fill_value=0, overwrite=True, config={"write_empty_chunks": True},
            chunk_key_encoding=CHUNK_KEY_ENCODING,
            attributes={ATTRS_KEY: {"torch_dtype": dtype_name(tensor.dtype), "kind": "tensor"}},
        )
        if not write_whole_chunks(location, z, data):
            z[...] = data
    except OSError as exc:
        raise StorageError(f"could not write {ref.full_url}: {exc}", url=ref.url, path=ref.path) from exc
    return ref


__all__ = ["write_tensor"]
