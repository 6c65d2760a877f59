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
import binascii
import math
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
        raise ValueError(f"unknown tensor dtype {_short(name)}; known: {list(DTYPE_NAMES)}") from None


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
    """Rebuild a tensor from :func:`tensor_to_bytes` output; the result owns writable memory.

    The header is checked first (:func:`check_header`) and the byte count must match it exactly.
    """
    dtype, shape, size = check_header(header)
    got = memoryview(data).nbytes
    if got != size:
        raise ValueError(f"tensor data has {got} bytes; shape {list(shape)} of {dtype_name(dtype)} needs {size}")
    return _from_raw(dtype, shape, data, size)


def tensor_to_json(tensor: torch.Tensor) -> dict[str, Any]:
    """``{"dtype", "shape", "b64"}``: compact and exact for every dtype."""
    header, data = tensor_to_bytes(tensor)
    return {**header, "b64": base64.b64encode(data).decode("ascii")}


def tensor_from_json(obj: dict[str, Any], *, max_bytes: int | None = None) -> torch.Tensor:
    """Inverse of :func:`tensor_to_json`, for JSON from anyone: everything is checked before allocating.

    ``obj`` must hold exactly ``dtype`` (a known name), ``shape`` (non-negative integers) and ``b64``
    (base64 of exactly ``prod(shape) * itemsize`` bytes). ``max_bytes`` bounds that byte count. A
    :class:`ValueError` names the field at fault.

    >>> tensor_from_json({"dtype": "float32", "shape": [2], "b64": "AACAPwAAAEA="})
    tensor([1., 2.])
    >>> tensor_from_json({"dtype": "float32", "shape": [10**12], "b64": ""}, max_bytes=1 << 20)
    Traceback (most recent call last):
    ValueError: tensor of shape [1000000000000] and dtype float32 has 4000000000000 bytes; the limit is 1048576
    """
    if type(obj) is not dict:
        raise ValueError(f"a tensor must be an object with dtype, shape and b64, not {type(obj).__name__}")
    unknown = sorted(str(k) for k in obj if k not in _JSON_FIELDS)
    if unknown:
        raise ValueError(f"unknown tensor field(s) {unknown}; a tensor has exactly {list(_JSON_FIELDS)}")
    dtype, shape, size = check_header(obj, max_bytes=max_bytes)
    text = obj.get("b64")
    if type(text) is not str:
        raise ValueError(f"tensor field 'b64' must be a base64 string, not {type(text).__name__}")
    chars = 4 * ((size + 2) // 3)
    if len(text) != chars:
        raise ValueError(f"tensor field 'b64' has {len(text)} characters; shape {list(shape)} of "
                         f"{dtype_name(dtype)} needs {size} bytes, {chars} base64 characters")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"tensor field 'b64' is not valid base64: {exc}") from None
    if len(data) != size:
        raise ValueError(f"tensor field 'b64' decodes to {len(data)} bytes; shape {list(shape)} of "
                         f"{dtype_name(dtype)} needs {size}")
    return _from_raw(dtype, shape, data, size)


_JSON_FIELDS = ("dtype", "shape", "b64")

#: Most dimensions a decoded tensor may have.
MAX_DIMS = 64
#: Most elements a decoded tensor's non-zero dimensions may span (keeps strides within int64).
_MAX_SPAN = 1 << 48


def check_header(header: Any, *, max_bytes: int | None = None) -> tuple[torch.dtype, tuple[int, ...], int]:
    """The dtype, shape and byte count a tensor header describes, or a :class:`ValueError` naming the field.

    The dtype must be a known name, the shape a list of at most :data:`MAX_DIMS` non-negative integers
    (booleans and floats refused), and ``prod(shape) * itemsize`` at most ``max_bytes`` when given:
    all this is computed on Python integers, before anything is allocated.
    """
    if type(header) is not dict:
        raise ValueError(f"a tensor header must be an object, not {type(header).__name__}")
    dtype = dtype_from_name(header.get("dtype"))
    shape = header.get("shape")
    if type(shape) not in (list, tuple):
        raise ValueError(f"tensor field 'shape' must be a list of non-negative integers, not {type(shape).__name__}")
    if len(shape) > MAX_DIMS:
        raise ValueError(f"tensor field 'shape' has {len(shape)} dimensions; at most {MAX_DIMS} are allowed")
    for dim in shape:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            raise ValueError(f"tensor field 'shape' must be a list of non-negative integers, got "
                             f"{_short(list(shape))}")
    span = math.prod(d for d in shape if d)
    if span > _MAX_SPAN:
        raise ValueError(f"tensor field 'shape' {_short(list(shape))} spans {span} elements; at most "
                         f"{_MAX_SPAN} are allowed")
    size = math.prod(shape) * itemsize(dtype)
    if max_bytes is not None and size > max_bytes:
        raise ValueError(f"tensor of shape {_short(list(shape))} and dtype {dtype_name(dtype)} has {size} bytes; "
                         f"the limit is {max_bytes}")
    return dtype, tuple(int(d) for d in shape), size


def _from_raw(dtype: torch.dtype, shape: tuple[int, ...], data: bytes | bytearray | memoryview,
              size: int) -> torch.Tensor:
    """The tensor over a writable copy of ``data`` (``size`` bytes, already checked against ``shape``)."""
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
    if dtype == torch.bool:
        return raw.to(torch.bool).reshape(shape)
    return raw.view(dtype).reshape(shape)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
    return dtype.itemsize


def nbytes(value: Any) -> int:
    """Bytes of the tensors held in ``value`` (nested containers walked; anything else counts 0)."""
    return sum(leaf.numel() * leaf.element_size() for leaf in leaves(value) if isinstance(leaf, torch.Tensor))


def _cpu_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous()
