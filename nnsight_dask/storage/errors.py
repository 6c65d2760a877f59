"""Errors of the storage layer: subclasses of :class:`~nnsight_dask.errors.StorageError`.

They also inherit the builtin a caller would already catch (``FileNotFoundError`` for a missing
experiment), carry their data in fields and pickle cleanly, so an error raised by a shard's writer
arrives on the client intact.
"""
from __future__ import annotations

from ..errors import StorageError


class ResultNotFoundError(StorageError, FileNotFoundError):
    """No experiment, array or dataset exists at the given store location."""


class IncompleteResultError(StorageError):
    """The experiment or dataset exists but was never marked complete (still running, or failed)."""


class CompletedResultError(StorageError):
    """A write was aimed at an experiment or dataset that is already complete, hence immutable."""


__all__ = ["CompletedResultError", "IncompleteResultError", "ResultNotFoundError", "StorageError"]
