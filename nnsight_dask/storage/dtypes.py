"""How a torch dtype is stored in Zarr, and how stored bytes become the exact tensor again.

Zarr stores numpy dtypes. Most torch dtypes have one; ``bfloat16`` and the fp8 types do not. Those
are stored as a same-width unsigned integer view of their bits (``uint16`` for bf16), and the torch
dtype is recorded in the array's attributes, so the round trip is bit-exact. Values that must be
computed on with numpy (reductions, ``.numpy()``) are *decoded* to ``float32``, which holds every
bf16/fp8 value exactly.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..graph.tensor_codec import dtype_from_name, dtype_name

#: Key under which our metadata lives in Zarr attributes (arrays and groups).
ATTRS_KEY = "nnsight_dask"

_UINT_OF_WIDTH = {1: np.dtype("uint8"), 2: np.dtype("uint16"), 4: np.dtype("uint32"), 8: np.dtype("uint64")}


def storage_dtype(dtype: torch.dtype) -> np.dtype[Any]:
    """The numpy dtype Zarr stores for ``dtype``: its own, or a same-width unsigned int view."""
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError:  # bfloat16, float8_*: numpy has no such dtype
        return _UINT_OF_WIDTH[torch.empty(0, dtype=dtype).element_size()]


def is_encoded(dtype: torch.dtype) -> bool:
    """True when ``dtype`` is stored as an integer view of its bits (bf16, fp8)."""
    return storage_dtype(dtype).kind == "u" and (dtype.is_floating_point or dtype.is_complex)


def value_dtype(dtype: torch.dtype) -> np.dtype[Any]:
    """The numpy dtype in which values of ``dtype`` are computed on: float32 for encoded types."""
    return np.dtype("float32") if is_encoded(dtype) else storage_dtype(dtype)


def encode(tensor: torch.Tensor) -> np.ndarray:
    """A numpy array of ``tensor``'s storage dtype holding its exact bits (zero-copy on CPU)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if is_encoded(t.dtype):
        return t.view(torch.uint8 if t.element_size() == 1 else _torch_uint(t.element_size())).numpy()
    return t.numpy()


def decode(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """The exact tensor of ``dtype`` from stored bits (inverse of :func:`encode`)."""
    if not (array.flags.c_contiguous and array.flags.writeable):
        array = array.copy(order="C")  # torch needs writable memory; ascontiguousarray would make 0-d 1-d
    t = torch.from_numpy(array)
    return t.view(dtype) if is_encoded(dtype) else t


def decode_values(array: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Stored bits of an encoded dtype as float32 values (exact); other arrays pass through."""
    if not is_encoded(dtype):
        return array
    return decode(array, dtype).to(torch.float32).numpy()


def _torch_uint(width: int) -> torch.dtype:
    return {2: torch.uint16, 4: torch.uint32, 8: torch.uint64}[width]


__all__ = ["ATTRS_KEY", "decode", "decode_values", "dtype_from_name", "dtype_name", "encode", "is_encoded",
           "storage_dtype", "value_dtype"]
