"""Writing an activation dataset, batch by batch, from one process or many at once; resumable.

The format (slots, markers) is described in :mod:`.dataset_format`. What ``collect`` does with it::

    from nnsight_dask.storage import DatasetWriter, prompts_digest

    prompts = list(prompts)                                   # fixed order: batch b = prompts[b*bs:(b+1)*bs]
    writer = DatasetWriter.create(                            # once, on the client; idempotent:
        store,                                                # reopens (and checks) an existing dataset
        {"model.layers.12.output": (576, torch.float32)},     # per-token feature shape and dtype
        n_batches=math.ceil(len(prompts) / bs),
        batch_capacity=bs * max_tokens_per_prompt,            # most tokens a batch can have
        metadata={"model": ..., "tokenizer": ..., "prompts_digest": prompts_digest(prompts),
                  "n_prompts": len(prompts)},
        storage_options=opts)
    for b in writer.pending_batches():                        # a rerun skips finished batches
        # anywhere: on the client, or on any Dask worker (the writer pickles small):
        writer.write_batch(b, {"model.layers.12.output": acts},   # [n_tokens, 576], padding removed
                           prompt_index=idx)                      # [n_tokens] global prompt index
    writer.finalize()                                         # after all batches: marks it complete

``write_batch`` calls for different batches may run concurrently in any processes; the same batch
written twice (a retry) just overwrites its own chunks with the same values.
"""
from __future__ import annotations

import os
import socket
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch
import zarr
from zarr.errors import NodeNotFoundError

from ...tensors import storage_dtype, to_stored
from ..chunking import CHUNK_KEY_ENCODING, TARGET_CHUNK_BYTES
from ..errors import (
    CompletedResultError,
    IncompleteResultError,
    ResultNotFoundError,
    StorageError,
)
from ..location import StoreLocation, UrlLike, as_location
from ..names import ATTRS_KEY
from .format import (
    FORMAT_VERSION,
    KIND,
    PROMPT_INDEX,
    DatasetLayout,
    finished_batches,
    marker_key,
    read_dataset_info,
)

if TYPE_CHECKING:
    from .reader import ActivationDataset

#: Metadata keys whose change means "a different dataset", refused on resume.
_IDENTITY_KEYS = ("model", "prompts_digest", "n_prompts")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class DatasetWriter:
    """Writes batches of per-token activations into one dataset; picklable (ships to workers).

    Build with :meth:`create` (the coordinator) or :meth:`open` (anyone, for an existing dataset).
    """

    def __init__(self, location: StoreLocation, layout: DatasetLayout) -> None:
        self.location = location
        self.layout = layout
        self._arrays: dict[str, zarr.Array] = {}

    def __reduce__(self) -> tuple[Any, ...]:
        return (DatasetWriter, (self.location, self.layout))

    def __repr__(self) -> str:
        return (f"DatasetWriter({self.location.url!r}, modules={self.layout.module_names}, "
                f"n_batches={self.layout.n_batches})")

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        url: UrlLike,
        modules: Mapping[str, tuple[int | Sequence[int], torch.dtype | str]],
        *,
        n_batches: int,
        batch_capacity: int,
        metadata: Mapping[str, Any] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        target_chunk_bytes: int = TARGET_CHUNK_BYTES,
    ) -> DatasetWriter:
        """Create a dataset at ``url``, or reopen the same one to resume it.

        Parameters
        ----------
        modules
            ``name -> (feature size or shape, torch dtype)`` per module, e.g.
            ``{"model.layers.12.output": (576, torch.bfloat16)}``.
        n_batches
            Number of batches the dataset will hold.
        batch_capacity
            The most tokens one batch can have (e.g. batch size x longest prompt).
        metadata
            JSON-able facts about the dataset: ``model``, ``tokenizer``, ``prompts_digest``
            (:func:`~.dataset_format.prompts_digest`), ``n_prompts``, anything else. ``created_at``
            is added.

        Raises
        ------
        StorageError
            A different dataset (other layout, model, prompts) already exists at ``url``.
        """
        location = as_location(url, storage_options)
        layout = DatasetLayout.plan(modules, n_batches=n_batches, batch_capacity=batch_capacity,
                                    target_chunk_bytes=target_chunk_bytes)
        metadata = dict(metadata or {})
        existing = read_dataset_info(location)
        if existing is not None:
            _check_same_dataset(location, existing, layout, metadata)
            layout = DatasetLayout.from_json(existing["layout"])
        else:
            store = location.zarr_store()
            zarr.create_group(store, overwrite=False, attributes={ATTRS_KEY: {
                "kind": KIND, "format": FORMAT_VERSION, "layout": layout.to_json(),
                "metadata": {**metadata, "created_at": _now()}, "created_at": _now(), "complete": False}})
        writer = cls(location, layout)
        if not (existing or {}).get("complete"):
            writer._create_arrays()
        return writer

    @classmethod
    def open(cls, url: UrlLike, *, storage_options: Mapping[str, Any] | None = None) -> DatasetWriter:
        """A writer for an existing dataset (created by :meth:`create`)."""
        location = as_location(url, storage_options)
        info = read_dataset_info(location)
        if info is None:
            raise ResultNotFoundError(f"no activation dataset at {location.url}; create it with DatasetWriter.create",
                                      url=location.url)
        return cls(location, DatasetLayout.from_json(info["layout"]))

    def _create_arrays(self) -> None:
        """Create any array that does not exist yet (a crash may have interrupted creation)."""
        store = self.location.zarr_store()
        layout = self.layout
        wanted = [(m.name, (layout.total_rows, *m.feature_shape), storage_dtype(m.torch_dtype),
                   (m.chunk_rows, *m.feature_shape), {"torch_dtype": m.dtype, "kind": "activations"})
                  for m in layout.modules]
        wanted.append((PROMPT_INDEX, (layout.total_rows,), np.dtype("int64"), (layout.index_chunk_rows,),
                       {"torch_dtype": "int64", "kind": "prompt_index"}))
        for name, shape, dtype, chunks, attrs in wanted:
            try:
                zarr.open_array(store, path=name, mode="r", zarr_format=3)
                continue
            except (NodeNotFoundError, FileNotFoundError):
                pass
            zarr.create_array(store, name=name, shape=shape, dtype=dtype, chunks=chunks, compressors=None,
                              chunk_key_encoding=CHUNK_KEY_ENCODING, config={"write_empty_chunks": True},
                              fill_value=-1 if name == PROMPT_INDEX else 0, attributes={ATTRS_KEY: attrs})

    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            self._arrays[name] = zarr.open_array(self.location.zarr_store(), path=name, mode="r+", zarr_format=3)
        return self._arrays[name]

    # -- progress ------------------------------------------------------------------------------
    def finished_batches(self) -> set[int]:
        """Batches whose data is fully written (their marker exists)."""
        return set(finished_batches(self.location))

    def pending_batches(self) -> list[int]:
        """Batches still to write, in order: what a (re)run should do."""
        done = self.finished_batches()
        return [b for b in range(self.layout.n_batches) if b not in done]

    # -- writing -------------------------------------------------------------------------------
    def write_batch(
        self,
        batch: int,
        activations: Mapping[str, torch.Tensor | np.ndarray],
        prompt_index: torch.Tensor | np.ndarray | Sequence[int],
    ) -> int:
        """Write batch ``batch``: per module ``[n_tokens, *feature]``, and each token's prompt index.

        Writes whole chunks of the batch's own slot only, then the batch's marker. Returns
        ``n_tokens``.
        """
        layout = self.layout
        start = layout.slot_start(batch)
        index = np.asarray(prompt_index.cpu() if isinstance(prompt_index, torch.Tensor) else prompt_index)
        if index.ndim != 1 or (index.size and index.dtype.kind not in "iu"):
            raise StorageError(f"prompt_index of batch {batch} must be a 1-d integer array, got "
                               f"{index.dtype}{list(index.shape)}", batch=batch)
        n = int(index.shape[0])
        if n > layout.batch_capacity:
            raise StorageError(f"batch {batch} has {n} tokens, more than the dataset's batch_capacity "
                               f"{layout.batch_capacity}; create the dataset with a larger batch_capacity",
                               batch=batch)
        missing = sorted(set(layout.module_names) - set(activations))
        extra = sorted(set(activations) - set(layout.module_names))
        if missing or extra:
            raise StorageError(f"batch {batch}: activations must have exactly the modules "
                               f"{layout.module_names} (missing {missing}, unexpected {extra})", batch=batch)
        encoded = {m.name: self._checked(batch, m.name, activations[m.name], n) for m in layout.modules}
        info = read_dataset_info(self.location)
        if info is not None and info.get("complete"):
            raise CompletedResultError(f"dataset {self.location.url} is complete; batch {batch} cannot be "
                                       "rewritten. Delete the dataset to rebuild it.", url=self.location.url)
        for spec in layout.modules:
            self._write_rows(spec.name, start, encoded[spec.name], spec.chunk_rows, 0)
        self._write_rows(PROMPT_INDEX, start, index.astype(np.int64), layout.index_chunk_rows, -1)
        self.location.put_json(marker_key(batch), {
            "batch": batch, "n_tokens": n, "written_at": _now(), "writer": f"{socket.gethostname()}:{os.getpid()}"})
        return n

    def _checked(self, batch: int, name: str, value: torch.Tensor | np.ndarray, n: int) -> np.ndarray:
        spec = self.layout.module(name)
        tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
        if tensor.dtype != spec.torch_dtype:
            raise StorageError(f"batch {batch}, module {name!r}: dtype {tensor.dtype} differs from the "
                               f"dataset's {spec.torch_dtype}; convert with .to({spec.torch_dtype})",
                               batch=batch, module=name)
        if tuple(tensor.shape) != (n, *spec.feature_shape):
            raise StorageError(f"batch {batch}, module {name!r}: shape {list(tensor.shape)} should be "
                               f"{[n, *spec.feature_shape]} (one row per token of prompt_index)",
                               batch=batch, module=name)
        return to_stored(tensor)

    def _write_rows(self, name: str, start: int, data: np.ndarray, chunk_rows: int, fill: int) -> None:
        """Write ``data`` at ``start``, padded to whole chunks so no chunk is read back or shared."""
        n = data.shape[0]
        padded = -(-n // chunk_rows) * chunk_rows
        if padded == 0:
            return
        if padded != n:
            full = np.full((padded, *data.shape[1:]), fill, dtype=data.dtype)
            full[:n] = data
            data = full
        self._array(name)[start:start + padded] = data

    # -- completion ----------------------------------------------------------------------------
    def finalize(self) -> ActivationDataset:
        """Mark the dataset complete once every batch is written; returns it opened.

        Raises
        ------
        IncompleteResultError
            Some batches have no marker (failed or still running); nothing is marked.
        """
        markers = finished_batches(self.location)
        missing = [b for b in range(self.layout.n_batches) if b not in markers]
        if missing:
            raise IncompleteResultError(
                f"dataset {self.location.url}: {len(missing)} of {self.layout.n_batches} batches are not "
                f"written yet (first: {missing[:10]}); write pending_batches() and finalize again",
                url=self.location.url, missing=missing)
        group = zarr.open_group(self.location.zarr_store(), mode="r+", zarr_format=3)
        info = dict(group.attrs[ATTRS_KEY])
        if not info.get("complete"):
            tokens = [int(markers[b]["n_tokens"]) for b in range(self.layout.n_batches)]
            group.update_attributes({ATTRS_KEY: {**info, "complete": True, "completed_at": _now(),
                                                 "batch_tokens": tokens, "n_tokens": sum(tokens)}})
        from .reader import open_activations

        return open_activations(self.location)


def _check_same_dataset(location: StoreLocation, existing: Mapping[str, Any], layout: DatasetLayout,
                        metadata: Mapping[str, Any]) -> None:
    old_layout = DatasetLayout.from_json(existing["layout"])
    old_meta = existing.get("metadata") or {}
    old, new = old_layout.summary(), layout.summary()
    differences = [f"{key}: {old[key]!r} vs requested {new[key]!r}" for key in old if old[key] != new[key]]
    differences += [f"{key}: {old_meta[key]!r} vs requested {metadata[key]!r}" for key in _IDENTITY_KEYS
                    if key in old_meta and key in metadata and old_meta[key] != metadata[key]]
    if differences:
        raise StorageError(
            f"a different activation dataset already exists at {location.url} ({'; '.join(differences)}). "
            "Delete it with nnsight_dask.storage.delete_dataset(url), or write to another URL.",
            url=location.url)


def delete_dataset(url: UrlLike, *, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Delete the activation dataset at ``url``; True if there was one.

    It is first marked incomplete, so no reader sees a half-deleted dataset as whole.
    """
    location = as_location(url, storage_options)
    if read_dataset_info(location) is None:
        return False
    group = zarr.open_group(location.zarr_store(), mode="r+", zarr_format=3)
    group.update_attributes({ATTRS_KEY: {**group.attrs[ATTRS_KEY], "complete": False, "deleting": True}})
    location.remove()
    return True
