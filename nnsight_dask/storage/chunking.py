"""Chunk shapes: big enough that writes stream at disk speed, small enough that a slice reads little.

Saved activations are ``[batch, seq, hidden]``-like: researchers slice the leading dimensions
(a prompt, a token) and keep the trailing ones whole. So chunks keep trailing dimensions whole and
split the leading ones until a chunk is about :data:`TARGET_CHUNK_BYTES`. Chunks are written
uncompressed: activations compress poorly, and compression would cost more than the write itself.
"""
from __future__ import annotations

from typing import Sequence

#: Aimed-for chunk size in bytes (2 MiB): a few chunks per object-store request round trip, and a
#: one-token or one-prompt slice of a large activation reads one or two chunks.
TARGET_CHUNK_BYTES = 2 << 20


def choose_chunks(shape: Sequence[int], itemsize: int, target_bytes: int = TARGET_CHUNK_BYTES) -> tuple[int, ...]:
    """A chunk shape for an array: trailing dims whole, leading dims split, about ``target_bytes``.

    >>> choose_chunks((32, 128, 4096), 4)       # one prompt's 128 tokens: 2 MiB
    (1, 128, 4096)
    >>> choose_chunks((100_000, 576), 2)         # 1820 tokens of a bf16 hidden state
    (1820, 576)
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

    >>> token_chunk_length(576 * 4, 4096)   # fp32 hidden 576: 2304 B/row -> 512 rows = 1.1 MiB
    512
    >>> token_chunk_length(8, 300)          # int64 prompt index: capped by the batch capacity
    512
    """
    rows = max(1, target_bytes // max(1, row_bytes))
    length = 1 << (rows.bit_length() - 1)
    cap = 1 << max(0, (max(1, capacity) - 1).bit_length())
    return max(1, min(length, cap))
