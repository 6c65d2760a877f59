"""The on-store format of an activation dataset: layout, attributes, markers, prompts digest.

An activation dataset is a Zarr group at the store root::

    <url>/zarr.json                 group; attributes["nnsight_dask"] = {kind, format, layout,
                                    metadata, created_at, complete, [completed_at, batch_tokens]}
    <url>/<module name>/            one array per module: [n_batches * slot_rows, *feature_shape]
    <url>/_prompt_index/            int64 [n_batches * slot_rows]: the prompt each token came from
    <url>/_batches/<b:08d>.json     marker: batch b is fully written ({batch, n_tokens, ...})

**Slots, not appends.** Zarr v3 has no locks, and resizing an array is a metadata rewrite that
concurrent writers would race on. So every array is created once at its full size, and batch ``b``
owns the rows ``[b * slot_rows, b * slot_rows + n_tokens_b)``. ``slot_rows`` is the batch token
capacity rounded up to a multiple of every array's chunk length (all chunk lengths are powers of
two), so each slot is a whole number of chunks in every array: writers of different batches never
touch the same chunk, and a batch's rows can neither be lost to nor torn by another writer.
Unused rows at the end of a slot are never written (a missing Zarr chunk costs nothing) or are
padding inside the batch's own last chunk; readers never see them, because they concatenate each
batch's ``n_tokens`` rows (from the markers, or from ``batch_tokens`` once complete).

**Resumability.** A batch's marker is written after all of its arrays; a batch without a marker is
pending, and re-writing it overwrites exactly its own chunks, so a rerun neither skips nor
duplicates anything.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
import zarr
from zarr.errors import NodeNotFoundError

from ...tensors import dtype_from_name, dtype_name, itemsize
from ..chunking import TARGET_CHUNK_BYTES, token_chunk_length
from ..errors import StorageError
from ..location import StoreLocation
from ..names import ATTRS_KEY, validate_name

KIND = "activation_dataset"
FORMAT_VERSION = 1
PROMPT_INDEX = "_prompt_index"
MARKERS = "_batches"


def marker_key(batch: int) -> str:
    """Key (relative to the dataset root) of batch ``batch``'s completion marker."""
    return f"{MARKERS}/{batch:08d}.json"


def prompts_digest(prompts: Iterable[str]) -> str:
    """A SHA-256 over the prompts, in order: tells a resumed run whether it has the same input.

    >>> prompts_digest(["a", "b"]) == prompts_digest(["a", "b"]) != prompts_digest(["ab"])
    True
    """
    h = hashlib.sha256()
    for prompt in prompts:
        data = prompt.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class ModuleSpec:
    """One module's per-token activations: ``[tokens, *feature_shape]`` of torch ``dtype``."""

    name: str
    feature_shape: tuple[int, ...]
    dtype: str
    chunk_rows: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    @property
    def row_bytes(self) -> int:
        return math.prod(self.feature_shape) * itemsize(self.torch_dtype)


@dataclass(frozen=True)
class DatasetLayout:
    """Array shapes and the batch -> rows mapping of one dataset (stored in its attributes)."""

    modules: tuple[ModuleSpec, ...]
    n_batches: int
    batch_capacity: int
    slot_rows: int
    index_chunk_rows: int

    @classmethod
    def plan(
        cls,
        modules: Mapping[str, tuple[int | Sequence[int], torch.dtype | str]],
        *,
        n_batches: int,
        batch_capacity: int,
        target_chunk_bytes: int = TARGET_CHUNK_BYTES,
    ) -> DatasetLayout:
        """Choose chunking: per module, token chunks of about ``target_chunk_bytes`` (a power of two
        of rows, whole feature dims) — good for per-token and per-prompt reads alike."""
        if not modules:
            raise StorageError("an activation dataset needs at least one module")
        if n_batches < 1 or batch_capacity < 1:
            raise StorageError(f"n_batches ({n_batches}) and batch_capacity ({batch_capacity}) must be >= 1")
        specs = []
        for name, (features, dtype) in modules.items():
            validate_name(name, "module")
            if name.startswith("_"):
                raise StorageError(f"module name {name!r} must not start with '_' (reserved)", name=name)
            shape = (int(features),) if isinstance(features, int) else tuple(int(f) for f in features)
            tdtype = dtype if isinstance(dtype, torch.dtype) else dtype_from_name(dtype)
            row = math.prod(shape) * itemsize(tdtype)
            specs.append(ModuleSpec(name, shape, dtype_name(tdtype), token_chunk_length(row, batch_capacity,
                                                                                       target_chunk_bytes)))
        index_rows = token_chunk_length(8, batch_capacity, target_chunk_bytes)
        longest = max([s.chunk_rows for s in specs] + [index_rows])
        slot = -(-batch_capacity // longest) * longest
        return cls(tuple(specs), n_batches, batch_capacity, slot, index_rows)

    def summary(self) -> dict[str, Any]:
        """What makes two layouts the same dataset (chunking aside): modules, batches, capacity."""
        return {"modules": {m.name: [list(m.feature_shape), m.dtype] for m in self.modules},
                "n_batches": self.n_batches, "batch_capacity": self.batch_capacity}

    @property
    def module_names(self) -> list[str]:
        return [m.name for m in self.modules]

    def module(self, name: str) -> ModuleSpec:
        for spec in self.modules:
            if spec.name == name:
                return spec
        raise KeyError(f"no module {name!r} in this dataset; it has {self.module_names}")

    def slot_start(self, batch: int) -> int:
        """First row of batch ``batch``."""
        if not 0 <= batch < self.n_batches:
            raise StorageError(f"batch index {batch} is out of range: this dataset has batches 0..{self.n_batches - 1}",
                               batch=batch)
        return batch * self.slot_rows

    @property
    def total_rows(self) -> int:
        return self.n_batches * self.slot_rows

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> DatasetLayout:
        modules = tuple(ModuleSpec(m["name"], tuple(m["feature_shape"]), m["dtype"], int(m["chunk_rows"]))
                        for m in obj["modules"])
        return cls(modules, int(obj["n_batches"]), int(obj["batch_capacity"]), int(obj["slot_rows"]),
                   int(obj["index_chunk_rows"]))


def read_dataset_info(location: StoreLocation) -> dict[str, Any] | None:
    """The dataset attributes at ``location``, or None if there is no Zarr group there.

    Raises if the group there is something other than an activation dataset.
    """
    try:
        root = zarr.open_group(location.zarr_store(read_only=True), mode="r", zarr_format=3)
    except (NodeNotFoundError, FileNotFoundError):
        return None
    info = dict(root.attrs.get(ATTRS_KEY) or {})
    if info.get("kind") != KIND:
        raise StorageError(f"{location.url} holds a Zarr group that is not an activation dataset "
                           f"(kind={info.get('kind')!r}); choose another URL", url=location.url)
    return info


def finished_batches(location: StoreLocation) -> dict[int, dict[str, Any]]:
    """``batch -> marker`` for every batch whose data is fully written (one listing)."""
    return {int(name.removesuffix(".json")): marker for name, marker in location.list_json(MARKERS).items()}
