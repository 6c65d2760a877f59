"""Request bodies parsed at a bounded cost, off the event loop.

Python's JSON parser holds the interpreter lock for as long as it parses (measured here: 57 MiB of
empty lists take 5.8 s and ~1.4 GB), so parsing in a thread alone would still stall the event loop
and every other thread. Before parsing, the structural marks of the text (``[ { , :``) are counted,
which takes a few ms per MiB; text with more than ``max_values`` of them is refused unparsed. Parsing
one value costs at most ~0.4 µs here, so a body within the bound holds the lock for well under a
second. The same bound applies to a graph sent as JSON text inside the body.
"""
from __future__ import annotations

import json
from typing import Any

from ...errors import NNsightDaskError

_MARKS = (b"[", b"{", b",", b":")


class BodyError(NNsightDaskError, ValueError):
    """A body refused while parsing; ``status`` is the HTTP answer (400 or 413)."""


def json_values(text: bytes | str) -> int:
    """About how many JSON values ``text`` holds (its structural marks; an upper bound for JSON)."""
    data = text.encode() if isinstance(text, str) else text
    return sum(data.count(mark) for mark in _MARKS)


def parse_json(text: bytes | str, max_values: int, what: str = "the request body") -> Any:
    """``text`` parsed, refused with a :class:`BodyError` when it holds over ``max_values`` values or
    is not JSON."""
    found = json_values(text)
    if found > max_values:
        raise BodyError(f"{what} holds about {found:,} JSON values, over the gateway's limit of {max_values:,} "
                        "(nnsight-dask.gateway-max-json-values); send large constants as tensors, not lists",
                        status=413, values=found, limit=max_values)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise BodyError(f"{what} is not valid JSON: {exc}", status=400) from None


__all__ = ["BodyError", "json_values", "parse_json"]
