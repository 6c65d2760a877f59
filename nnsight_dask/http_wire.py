"""The JSON forms the HTTP gateway and its client agree on: results and errors.

A top-level module because both sides import it: the gateway (``service/gateway``) encodes, the
client (``client/http_remote.py``, ``client/http_api.py``) decodes, and neither imports the other.

Results reuse the graph's argument codec (:mod:`nnsight_dask.graph.codec`: tensors as raw bytes +
dtype + shape, bf16 included, tuples and dicts tagged), so a value comes back bit-identical to what
a Dask client gets. One tag is added: ``{"zarr": {...}}`` for a persisted save, which the client
opens lazily (directly in the store, or through the gateway). Errors travel as their type name,
message and plain fields, so the client raises the same :mod:`nnsight_dask.errors` type (with the
user's line) that a Dask client would.
"""
from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Mapping
from typing import Any

from . import errors
from .graph.codec import Decoder, encode
from .storage.results import TensorRef

#: The API's version prefix.
API = "/v1"
#: Statuses an experiment ends in.
FINAL = ("COMPLETED", "FAILED", "CANCELLED")
#: Plain types an error's fields may carry over the wire (anything else stays on the server).
_PLAIN = (str, int, float, bool, type(None))


def encode_value(value: Any, ref: Callable[[TensorRef], dict[str, Any]]) -> Any:
    """JSON form of a saved value; ``ref`` gives the JSON of a persisted save."""
    if isinstance(value, TensorRef):
        return {"zarr": ref(value)}
    if isinstance(value, list):
        return [encode_value(v, ref) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return {"tuple": [encode_value(v, ref) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[encode(k), encode_value(v, ref)] for k, v in value.items()]}
    return encode(value)


def decode_value(data: Any, open_ref: Callable[[Mapping[str, Any]], Any], decoder: Decoder, name: str) -> Any:
    """Inverse of :func:`encode_value`; ``open_ref`` turns a persisted save's JSON into what the user holds."""
    if type(data) is list:
        return [decode_value(v, open_ref, decoder, name) for v in data]
    if type(data) is dict and len(data) == 1:
        (tag, payload), = data.items()
        if tag == "zarr" and isinstance(payload, Mapping):
            return open_ref(payload)
        if tag == "tuple" and type(payload) is list:
            return tuple(decode_value(v, open_ref, decoder, name) for v in payload)
        if tag == "dict" and type(payload) is list and all(type(p) is list and len(p) == 2 for p in payload):
            return {decoder.decode(k, where="result", field=name): decode_value(v, open_ref, decoder, name)
                    for k, v in payload}
    return decoder.decode(data, where="result", field=name)


def encode_results(saves: Mapping[str, Any], logs: list[str], ref: Callable[[TensorRef], dict[str, Any]]) -> dict[str, Any]:
    """The result document of a completed experiment."""
    return {"saves": {name: encode_value(value, ref) for name, value in saves.items()}, "logs": list(logs)}


def decode_results(document: Mapping[str, Any], open_ref: Callable[[Mapping[str, Any]], Any]) -> tuple[dict[str, Any], list[str]]:
    """``(saves, logs)`` of a result document."""
    decoder = Decoder()
    saves = {str(name): decode_value(value, open_ref, decoder, str(name))
             for name, value in dict(document.get("saves") or {}).items()}
    return saves, [str(line) for line in document.get("logs") or ()]


def error_to_json(exc: BaseException) -> dict[str, Any]:
    """``{"type", "message", "fields"}`` of an error (fields: only plain values)."""
    fields = getattr(exc, "fields", None) or {}
    return {"type": type(exc).__name__, "message": str(exc),
            "fields": {k: v for k, v in fields.items() if isinstance(v, _PLAIN)}}


def error_from_json(data: Mapping[str, Any]) -> BaseException:
    """The exception a Dask client would have seen for :func:`error_to_json`'s ``data``.

    Only :mod:`nnsight_dask.errors` types are rebuilt by name; anything else becomes an
    :class:`~nnsight_dask.errors.ExperimentFailedError` saying what it was.
    """
    name, message = str(data.get("type") or ""), str(data.get("message") or "")
    fields = {k: v for k, v in dict(data.get("fields") or {}).items() if isinstance(k, str) and k != "message" and isinstance(v, _PLAIN)}
    if name == "CancelledError":
        return concurrent.futures.CancelledError(message)
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, errors.NNsightDaskError):
        return cls(message, **fields)
    return errors.ExperimentFailedError(f"{name}: {message}" if name else message, **fields)
