"""Writing a tensor's chunks straight from its memory, when the Zarr layout makes that exact.

Persisting a save should cost about what writing its bytes raw costs. Zarr's general write path
copies every chunk out of the source array before storing it, roughly doubling the cost of an
uncompressed write. For the layouts we choose (:func:`.chunking.choose_chunks`: leading dims split,
trailing dims whole, no compression), every chunk of a C-contiguous array is one contiguous byte
range of it, and the Zarr v3 ``bytes`` codec stores exactly those bytes (little-endian). So we let
Zarr write the array's metadata and write each chunk's byte range ourselves, under the key Zarr's
own chunk-key encoding gives. Anything else (compression, big-endian hosts, chunk shapes that are
not contiguous) returns ``False`` and the caller uses Zarr's write path.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import zarr
from zarr.codecs import BytesCodec

from ..location import StoreLocation


def _plain_bytes_layout(z: zarr.Array) -> bool:
    codecs = z.metadata.codecs if z.metadata.zarr_format == 3 else ()
    if sys.byteorder != "little" or len(codecs) != 1 or not isinstance(codecs[0], BytesCodec):
        return False
    endian = codecs[0].endian  # an Endian enum up to zarr 3.1, the string "little"/"big" since 3.2
    return endian is None or getattr(endian, "value", endian) == "little"


def _split_axis(shape: tuple[int, ...], chunks: tuple[int, ...]) -> int | None:
    """The one axis chunks split (leading axes have chunk 1, trailing ones are whole), or -1 if the
    array is one chunk; None if chunks are not contiguous byte ranges."""
    partial = [a for a in range(len(shape)) if chunks[a] != shape[a]]
    if not partial:
        return -1
    split = partial[-1]
    if any(chunks[a] > shape[a] for a in range(split + 1, len(shape))):
        return None
    if any(chunks[a] != 1 and shape[a] != 1 for a in range(split)):
        return None
    return split


def write_whole_chunks(location: StoreLocation, z: zarr.Array, data: np.ndarray) -> bool:
    """Write every chunk of ``z`` from ``data`` (C-contiguous, ``z``'s dtype and shape) without
    copying; ``False`` (nothing written) if the layout does not allow it."""
    shape, chunks = tuple(data.shape), tuple(z.chunks)
    split = _split_axis(shape, chunks) if data.ndim else -1
    if split is None or not _plain_bytes_layout(z) or not data.flags.c_contiguous or data.dtype != z.dtype:
        return False
    if data.size == 0:
        return True
    flat = memoryview(data.reshape(-1).view(np.uint8))
    objects: dict[str, memoryview | bytes] = {}
    if split == -1:  # one chunk: the whole array (padded if the chunk is larger than the array)
        chunk_bytes = math.prod(chunks) * data.itemsize
        objects[z.metadata.encode_chunk_key((0,) * data.ndim)] = _padded(flat, chunk_bytes)
    else:
        row_bytes = math.prod(shape[split + 1:]) * data.itemsize
        chunk_bytes, span = chunks[split] * row_bytes, shape[split] * row_bytes
        for lead_number, lead in enumerate(np.ndindex(*shape[:split])):
            base = lead_number * span
            for j in range(-(-shape[split] // chunks[split])):
                start = base + j * chunk_bytes
                piece = flat[start:min(start + chunk_bytes, base + span)]
                key = z.metadata.encode_chunk_key((*lead, j, *(0,) * (data.ndim - split - 1)))
                objects[key] = _padded(piece, chunk_bytes)
    location.put_objects({f"{z.path}/{key}": value for key, value in objects.items()})
    return True


def _padded(piece: memoryview, size: int) -> memoryview | bytes:
    """Edge chunks are stored at full chunk size; the padding is the fill value 0."""
    return piece if len(piece) == size else bytes(piece) + bytes(size - len(piece))
