"""Reading an activation dataset: dask arrays ``[tokens, *feature]`` per module, on any machine.

Needs no cluster and nothing of the model: only the store. Each module's array is the
concatenation of every batch's rows (its slot, cut to the batch's token count; see
:mod:`.dataset_format`), so the padding of slots is invisible and a token or prompt read touches
only the chunks holding it.

>>> acts = open_activations("s3://bucket/run1.zarr")        # doctest: +SKIP
>>> acts["model.layers.12.output"]                          # doctest: +SKIP
dask.array<concatenate, shape=(123456, 576), dtype=float32, chunksize=(512, 576), ...>
>>> acts.prompt_index                                      # doctest: +SKIP
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import dask.array as da
import numpy as np
import zarr
from dask.base import tokenize

from ...tensors import dtype_from_name
from ..errors import IncompleteResultError, ResultNotFoundError
from ..location import StoreLocation, UrlLike, as_location
from ..results.lazy import LazyTensor
from .format import PROMPT_INDEX, DatasetLayout, finished_batches, read_dataset_info


class ActivationDataset(Mapping[str, da.Array]):
    """A dataset of per-token activations: ``ds[module]`` is a dask array ``[tokens, *feature]``.

    Values of dtypes numpy lacks (bf16) come as exact float32; :meth:`tensor` gives a
    :class:`LazyTensor` that materializes the original torch dtype.
    """

    def __init__(self, location: StoreLocation, info: Mapping[str, Any], batch_tokens: Mapping[int, int]) -> None:
        self.location = location
        self.info = dict(info)
        self.layout = DatasetLayout.from_json(info["layout"])
        self.batch_tokens = dict(sorted(batch_tokens.items()))
        self._lazy: dict[str, LazyTensor] = {}

    # -- description ---------------------------------------------------------------------------
    @property
    def modules(self) -> list[str]:
        """Names of the per-module arrays, in creation order."""
        return self.layout.module_names

    @property
    def metadata(self) -> dict[str, Any]:
        """Model, tokenizer, prompts digest, creation time, ... as given to the writer."""
        return dict(self.info.get("metadata") or {})

    @property
    def complete(self) -> bool:
        return bool(self.info.get("complete"))

    @property
    def n_tokens(self) -> int:
        return sum(self.batch_tokens.values())

    @property
    def batches(self) -> list[int]:
        """The batches this view holds (all of them once complete)."""
        return list(self.batch_tokens)

    def __repr__(self) -> str:
        done = f"{len(self.batch_tokens)}/{self.layout.n_batches}"
        state = "complete" if self.complete else f"INCOMPLETE ({done} batches)"
        return f"ActivationDataset({self.location.url!r}, {state}, tokens={self.n_tokens}, modules={self.modules})"

    # -- arrays --------------------------------------------------------------------------------
    def tensor(self, name: str) -> LazyTensor:
        """Module ``name``'s activations as a :class:`LazyTensor` (original torch dtype on compute)."""
        if name not in self._lazy:
            dtype = "int64" if name == PROMPT_INDEX else self.layout.module(name).dtype
            z = zarr.open_array(self.location.zarr_store(read_only=True), path=name, mode="r", zarr_format=3)
            source = f"{self.location.url}/{name}"
            raw = da.from_zarr(z, name="zarr-" + tokenize(source, z.shape, z.chunks, str(z.dtype)))
            slot = self.layout.slot_rows
            pieces = [raw[b * slot: b * slot + n] for b, n in self.batch_tokens.items() if n]
            array = da.concatenate(pieces, axis=0) if pieces else raw[:0]
            self._lazy[name] = LazyTensor(array, dtype_from_name(dtype), source=source)
        return self._lazy[name]

    def __getitem__(self, name: str) -> da.Array:
        if name not in self.modules:
            raise KeyError(f"no module {name!r} in {self.location.url}; it has {self.modules}")
        return self.tensor(name).dask

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    @property
    def prompt_index(self) -> da.Array:
        """``[tokens]`` int64: which prompt (in the writer's order) each token came from."""
        return self.tensor(PROMPT_INDEX).dask

    def prompt_rows(self) -> dict[int, slice]:
        """``prompt -> rows`` of its tokens (a prompt's tokens are contiguous). Reads the prompt index."""
        index = np.asarray(self.prompt_index.compute())
        if index.size == 0:
            return {}
        starts = np.flatnonzero(np.r_[True, index[1:] != index[:-1]])
        stops = np.r_[starts[1:], index.size]
        return {int(index[a]): slice(int(a), int(b)) for a, b in zip(starts, stops)}


def open_activations(
    url: UrlLike,
    *,
    allow_incomplete: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> ActivationDataset:
    """Open the activation dataset at ``url`` (any fsspec URL); no cluster needed.

    Parameters
    ----------
    allow_incomplete
        Open a dataset whose writing has not finished (or failed), showing only its finished
        batches: for debugging. By default such a dataset is refused.

    Raises
    ------
    ResultNotFoundError
        Nothing (or not a dataset) at ``url``.
    IncompleteResultError
        The dataset is not complete and ``allow_incomplete`` is false.
    """
    location = as_location(url, storage_options)
    info = read_dataset_info(location)
    if info is None:
        raise ResultNotFoundError(f"no activation dataset at {location.url}", url=location.url)
    if info.get("complete"):
        tokens = dict(enumerate(int(n) for n in info["batch_tokens"]))
    else:
        markers = finished_batches(location)
        if not allow_incomplete:
            n_batches = DatasetLayout.from_json(info["layout"]).n_batches
            raise IncompleteResultError(
                f"activation dataset {location.url} is not complete ({len(markers)} of {n_batches} batches "
                "written): its collection is still running, or was interrupted (run it again to resume). "
                "Pass allow_incomplete=True to read the finished batches.", url=location.url)
        tokens = {b: int(m["n_tokens"]) for b, m in markers.items()}
    return ActivationDataset(location, info, tokens)
