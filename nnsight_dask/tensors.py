"""Tensors as exact bits: one codec for the graph's JSON, the carries between workers and Zarr.

Every torch dtype travels bit-exactly, bf16 and fp8 included, which numpy cannot represent: their
bytes are taken through a same-width unsigned-integer view, and the torch dtype travels by name.

- JSON (constants inside a graph): :func:`tensor_to_json` / :func:`tensor_from_json` (base64 of the bytes).
- Dask frames (carries): :func:`tensor_to_bytes` / :func:`tensor_from_bytes` (zero-copy bytes + header).
- Zarr arrays: :func:`storage_dtype`, :func:`to_stored` / :func:`from_stored`, :func:`stored_values`.
- Sizes and walks over nested results: :func:`nbytes`, :func:`map_leaves`, :func:`leaves`.
"""
from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

_DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
        torch.complex64, torch.complex128,
        *(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64")
          if hasattr(torch, n)),
    )
}

#: Every dtype name the codec knows (``"bfloat16"``, ``"float8_e4m3fn"``, ...).
DTYPE_NAMES: tuple[str, ...] = tuple(sorted(_DTYPES))

_UINT_NUMPY = {1: np.dtype("uint8"), 2: np.dtype("uint16"), 4: np.dtype("uint32"), 8: np.dtype("uint64")}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; refuses names that are not torch dtypes."""
    try:
        return _DTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown tensor dtype {name!r}; known: {list(DTYPE_NAMES)}") from None


# -- raw bytes (Dask frames) and JSON ------------------------------------------------------------
def tensor_to_bytes(tensor: torch.Tensor) -> tuple[dict[str, Any], memoryview]:
    """Header (dtype, shape) and a zero-copy view of a contiguous CPU copy's bytes."""
    t = _cpu_contiguous(tensor)
    header = {"dtype": dtype_name(t.dtype), "shape": list(t.shape)}
    if t.numel() == 0:
        return header, memoryview(b"")
    flat = t.reshape(-1).view(torch.uint8) if t.dtype != torch.bool else t.reshape(-1).to(torch.uint8)
    return header, memoryview(flat.numpy()).cast("B")


def tensor_from_bytes(header: dict[str, Any], data: bytes | bytearray | memoryview) -> torch.Tensor:
    """Rebuild a tensor from :func:`tensor_to_bytes` output; the result owns writable memory."""
    dtype = dtype_from_name(header["dtype"])
    shape = tuple(int(s) for s in header["shape"])
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
    if dtype == torch.bool:
        return raw.to(torch.bool).reshape(shape)
    return raw.view(dtype).reshape(shape)


def tensor_to_json(tensor: torch.Tensor) -> dict[str, Any]:
    """``{"dtype", "shape", "b64"}``: compact and exact for every dtype."""
    header, data = tensor_to_bytes(tensor)
    return {**header, "b64": base64.b64encode(data).decode("ascii")}


def tensor_from_json(obj: dict[str, Any]) -> torch.Tensor:
    """Inverse of :func:`tensor_to_json`."""
    return tensor_from_bytes(obj, base64.b64decode(obj["b64"], validate=True))


# -- Zarr (numpy) storage ------------------------------------------------------------------------
def storage_dtype(dtype: torch.dtype) -> np.dtype[Any]:
    """The numpy dtype Zarr stores for ``dtype``: its own, or a same-width unsigned int view."""
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError:  # bfloat16, float8_*: numpy has no such dtype
        return _UINT_NUMPY[torch.empty(0, dtype=dtype).element_size()]


def is_bit_view(dtype: torch.dtype) -> bool:
    """True when ``dtype`` is stored as an integer view of its bits (bf16, fp8)."""
    return storage_dtype(dtype).kind == "u" and (dtype.is_floating_point or dtype.is_complex)


def value_dtype(dtype: torch.dtype) -> np.dtype[Any]:
    """The numpy dtype in which values of ``dtype`` are computed on: float32 for bit-view types."""
    return np.dtype("float32") if is_bit_view(dtype) else storage_dtype(dtype)


def to_stored(tensor: torch.Tensor) -> np.ndarray:
    """A numpy array of ``tensor``'s storage dtype holding its exact bits (zero-copy on CPU)."""
    t = _cpu_contiguous(tensor)
    if is_bit_view(t.dtype):
        width = t.element_size()
        return t.view({1: torch.uint8, 2: torch.uint16, 4: torch.uint32, 8: torch.uint64}[width]).numpy()
    return t.numpy()


def from_stored(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """The exact tensor of ``dtype`` from stored bits (inverse of :func:`to_stored`)."""
    if not (array.flags.c_contiguous and array.flags.writeable):
        array = array.copy(order="C")  # torch needs writable memory; ascontiguousarray would make 0-d 1-d
    t = torch.from_numpy(array)
    return t.view(dtype) if is_bit_view(dtype) else t


def stored_values(array: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Stored bits of a bit-view dtype as float32 values (exact); other arrays pass through."""
    if not is_bit_view(dtype):
        return array
    return from_stored(array, dtype).to(torch.float32).numpy()


# -- nested values -------------------------------------------------------------------------------
def leaves(value: Any) -> Iterator[Any]:
    """Every non-container value inside ``value`` (dicts, lists and tuples are walked)."""
    if isinstance(value, dict):
        for item in value.values():
            yield from leaves(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from leaves(item)
    else:
        yield value


def map_leaves(fn: Callable[[Any], Any], value: Any) -> Any:
    """``value`` with every leaf replaced by ``fn(leaf)`` (dicts, lists and plain tuples are rebuilt)."""
    if isinstance(value, dict):
        return {k: map_leaves(fn, v) for k, v in value.items()}
    if isinstance(value, list):
        return [map_leaves(fn, v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(map_leaves(fn, v) for v in value)
    return fn(value)


def itemsize(dtype: torch.dtype) -> int:
    """Bytes of one element of ``dtype``."""
    return torch.empty(0, dtype=dtype).element_size()


def nbytes(value: Any) -> int:
    """Bytes of the tensors held in ``value`` (nested containers walked; anything else counts 0)."""
    return sum(leaf.numel() * leaf.element_size() for leaf in leaves(value) if isinstance(leaf, torch.Tensor))


def _cpu_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous()
