"""Tensors as raw bytes plus dtype and shape.

One codec serves the JSON wire format (base64 of the bytes) and the Dask serializer (the bytes as
a frame). It handles every torch dtype, bf16 and fp8 included, which numpy cannot represent: the
bytes are taken through a same-width integer view.
"""
from __future__ import annotations

import base64
from typing import Any

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


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; refuses names that are not torch dtypes."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown tensor dtype {name!r}; known: {sorted(_DTYPES)}") from None


def tensor_to_bytes(tensor: torch.Tensor) -> tuple[dict[str, Any], memoryview]:
    """Header (dtype, shape) and a zero-copy view of a contiguous CPU copy's bytes."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
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
    return tensor_from_bytes(obj, base64.b64decode(obj["b64"]))
