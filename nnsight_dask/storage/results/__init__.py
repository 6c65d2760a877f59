"""Persisted saves of experiments: write one tensor, refer to it, read it lazily, commit or abort.

:class:`ZarrSink` is the lifecycle (write on the producer, commit or abort by whoever ran the
experiment); :class:`TensorRef` is what travels instead of a large tensor; :class:`LazyTensor` is
what a user holds.
"""
from __future__ import annotations

from .lazy import LazyTensor
from .lifecycle import (
           Experiment,
           cleanup,
           delete,
           is_complete,
           list_experiments,
           mark_complete,
           open_experiment,
)
from .ref import TensorRef
from .sink import ZarrSink, open_refs
from .write import write_tensor

__all__ = ["Experiment", "LazyTensor", "TensorRef", "ZarrSink", "cleanup", "delete", "is_complete",
           "list_experiments", "mark_complete", "open_experiment", "open_refs", "write_tensor"]
