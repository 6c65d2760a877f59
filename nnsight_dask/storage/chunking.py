"""Chunk shapes: big enough that writes stream at disk speed, small enough that a slice reads little.

Saved activations are ``[batch, seq, hidden]``-like: researchers slice the leading dimensions
(a prompt, a token) and keep the trailing ones whole. So chunks keep trailing dimensions whole and
split the leading ones until a chunk is about :data:`TARGET_CHUNK_BYTES` (4 MiB). Chunks are written
uncompressed: activations compress poorly, and compression would cost more than the write itself.
"""
from __future__ import annotations

from typing import Sequence

#: Chunk keys ``c.0.3.0``, all in the array's directory: on local disks, nested ``c/0/3/0`` keys
#: cost one directory per chunk row, which made persisting ~40% slower than a raw write.
CHUNK_KEY_ENCODING = {"name": "default", "separator": "."}

#: Aimed-for chunk size in bytes (4 MiB): large enough that per-object costs (a file creation, an
#: S3 request) stay small next to the bytes (persisting costs ~1.1x a raw write of the same bytes),
#: small enough that a one-token or one-prompt slice of a large activation reads one or two chunks.
TARGET_CHUNK_BYTES = 4 << 20


def choose_chunks(shape: Sequence[int], itemsize: int, target_bytes: int = TARGET_CHUNK_BYTES) -> tuple[int, ...]:
    """A chunk shape for an array: trailing dims whole, leading dims split, about ``target_bytes``.

    >>> choose_chunks((32, 128, 4096), 4)       # two prompts' 128 tokens: 4 MiB
    (2, 128, 4096)
    >>> choose_chunks((100_000, 576), 2)         # 3640 tokens of a bf16 hidden state
    (3640, 576)
    >>> choose_chunks((), 4)
    ()
    """
    chunks = [max(1, int(s)) for s in shape]
    inner = max(1, int(itemsize))
    for axis in range(len(chunks) - 1, -1, -1):
        if inner * chunks[axis] <= target_bytes:
            inner *= chunks[axis]
            continue
        chunks[axis] = max(1, target_bytes // inner)
        for lead in range(axis):
            chunks[lead] = 1
        break
    return tuple(chunks)


def token_chunk_length(row_bytes: int, capacity: int, target_bytes: int = TARGET_CHUNK_BYTES) -> int:
    """Rows per chunk of a ``[tokens, ...]`` dataset array: a power of two, about ``target_bytes``.

    Powers of two divide one another, so a batch slot sized for the longest chunk length of a
    dataset is chunk-aligned in every array of it; capped at ``capacity`` rounded up to a power of
    two so that a small batch is not padded to a huge chunk.

    >>> token_chunk_length(576 * 4, 4096)   # fp32 hidden 576: 2304 B/row -> 1024 rows = 2.25 MiB
    1024
    >>> token_chunk_length(8, 300)          # int64 prompt index: capped by the batch capacity
    512
    """
    rows = max(1, target_bytes // max(1, row_bytes))
    length = 1 << (rows.bit_length() - 1)
    cap = 1 << max(0, (max(1, capacity) - 1).bit_length())
    return max(1, min(length, cap))
