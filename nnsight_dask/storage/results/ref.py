"""``TensorRef``: what crosses the wire instead of a large tensor.

A shard writes a large saved value to Zarr and returns this small value: where the array is, its
shape and torch dtype, and how to open the store. It is frozen, picklable and JSON-able, so it fits
both the Dask result path and the JSON gateway; the client turns it into a lazy array with
:meth:`TensorRef.open`.
"""
from __future__ import annotations

import math
import posixpath
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ...tensors import dtype_from_name, dtype_name, itemsize
from ..location import StoreLocation
from .lazy import LazyTensor

#: ``"type"`` tag of a TensorRef's JSON form, so a decoder can tell it from an inline tensor.
JSON_TYPE = "zarr_tensor_ref"


@dataclass(frozen=True)
class TensorRef:
    """A persisted tensor: ``<url>/<path>`` holds a Zarr v3 array of ``shape`` and torch ``dtype``.

    Parameters
    ----------
    url
        Store root URL (normalized, e.g. ``file:///data/store.zarr`` or ``s3://bucket/run``).
    path
        Array path inside the store, ``<experiment id>/<name>``.
    shape
        Tensor shape.
    dtype
        Torch dtype name (``"bfloat16"``); see :attr:`torch_dtype`.
    storage_options
        fsspec options needed to open the store (credentials, endpoint). Not part of equality.

    Examples
    --------
    >>> ref = TensorRef("file:///tmp/s.zarr", "exp1/hs", (2, 3), "bfloat16")
    >>> TensorRef.from_json(ref.to_json()) == ref
    True
    """

    url: str
    path: str
    shape: tuple[int, ...]
    dtype: str
    storage_options: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "storage_options", dict(self.storage_options or {}))
        dtype_from_name(self.dtype)  # refuse unknown dtype names early

    @property
    def torch_dtype(self) -> torch.dtype:
        """The original torch dtype, restored exactly on read."""
        return dtype_from_name(self.dtype)

    @property
    def nbytes(self) -> int:
        """Size of the tensor in bytes."""
        return math.prod(self.shape) * itemsize(self.torch_dtype)

    @property
    def location(self) -> StoreLocation:
        """The store this array lives in."""
        return StoreLocation(self.url, self.storage_options)

    @property
    def full_url(self) -> str:
        """``<url>/<path>``, for messages and reprs."""
        return posixpath.join(self.url, self.path)

    def open(self) -> LazyTensor:
        """A lazy handle on the array; nothing is read until it is computed."""
        return LazyTensor.open(self.location, self.path, self.torch_dtype)

    # Reading a ref directly (what ``client.submit(graph).result()`` holds for persisted saves):
    def __getitem__(self, index: Any) -> LazyTensor:
        """A lazy slice; reads only the chunks it needs when computed."""
        return self.open()[index]

    def torch(self) -> torch.Tensor:
        """The whole tensor, in its original dtype."""
        return self.open().torch()

    def numpy(self) -> Any:
        """The whole array as numpy (bf16/fp8 decoded to float32, exactly)."""
        return self.open().numpy()

    def compute(self) -> torch.Tensor:
        return self.open().compute()

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (``storage_options`` included as given: keep secrets out of them, or
        strip them before sending a ref to an untrusted client)."""
        return {"type": JSON_TYPE, "url": self.url, "path": self.path, "shape": list(self.shape),
                "dtype": self.dtype, "storage_options": dict(self.storage_options)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> TensorRef:
        """Inverse of :meth:`to_json`."""
        if obj.get("type") != JSON_TYPE:
            raise ValueError(f"not a TensorRef JSON object (type={obj.get('type')!r}, expected {JSON_TYPE!r})")
        return cls(obj["url"], obj["path"], tuple(obj["shape"]), obj["dtype"], obj.get("storage_options") or {})

    @classmethod
    def for_tensor(cls, location: StoreLocation, path: str, tensor: torch.Tensor) -> TensorRef:
        """The ref a tensor will have once written at ``path`` in ``location``."""
        return cls(location.url, path, tuple(tensor.shape), dtype_name(tensor.dtype), location.storage_options)
