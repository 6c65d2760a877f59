"""``ZarrSink``: the one persistence lifecycle of saved values, for local and remote runs alike.

A run with ``store=`` gets one sink per experiment. Whoever produces a saved value (the local
runner, or the shard that computed it) calls :meth:`ZarrSink.write`: a tensor above the threshold is
written to ``<store>/<experiment>/<name>`` and its :class:`~.ref.TensorRef` travels on instead.
Whoever ran the experiment then calls :meth:`ZarrSink.commit` once every stage succeeded (the
results become visible) or :meth:`ZarrSink.abort` (nothing is left that looks whole). The sink
holds only its settings, so the writer on a shard and the committer on the client are two
instances built from the same experiment options (:meth:`ZarrSink.from_options`).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from ... import config
from ...tensors import leaves, map_leaves, nbytes
from .lifecycle import delete, mark_complete
from .ref import TensorRef
from .write import write_tensor


class ZarrSink:
    """Persisted saves of experiment ``experiment`` in ``store`` (an fsspec URL or local path).

    Parameters
    ----------
    threshold
        Tensors of more bytes than this are persisted (default ``config.persist_threshold``);
        smaller ones stay inline.
    """

    def __init__(self, store: str | os.PathLike[str], experiment: str, *, threshold: int | None = None,
                 storage_options: Mapping[str, Any] | None = None) -> None:
        self.store = os.fspath(store)
        self.experiment = experiment
        self.threshold = config.persist_threshold if threshold is None else int(threshold)
        self.storage_options = dict(storage_options or {})

    @classmethod
    def from_options(cls, options: Mapping[str, Any], experiment: str) -> ZarrSink | None:
        """The sink an experiment's options ask for (``store``, ``persist_threshold``,
        ``storage_options``), or None when they name no store."""
        store = options.get("store")
        if not store:
            return None
        return cls(store, experiment, threshold=options.get("persist_threshold"),
                   storage_options=options.get("storage_options"))

    def write(self, name: str, value: Any) -> Any:
        """Persist ``value`` if it is a tensor above the threshold; returns its ref, else the value."""
        if isinstance(value, torch.Tensor) and nbytes(value) > self.threshold:
            return write_tensor(self.store, self.experiment, name, value.detach(),
                                storage_options=self.storage_options)
        return value

    def commit(self, saves: Mapping[str, Any]) -> int:
        """Make the experiment's persisted values visible; every ref in ``saves`` must exist.

        Returns the bytes persisted.
        """
        refs = [leaf for leaf in leaves(dict(saves)) if isinstance(leaf, TensorRef)]
        mark_complete(self.store, self.experiment, names=[ref.path.split("/", 1)[1] for ref in refs],
                      storage_options=self.storage_options)
        return sum(ref.nbytes for ref in refs)

    def abort(self) -> None:
        """Remove whatever the experiment wrote (best effort: an incomplete group is invisible anyway,
        and :func:`~.lifecycle.cleanup` removes it later)."""
        try:
            delete(self.store, self.experiment, storage_options=self.storage_options)
        except Exception:
            pass


def open_refs(saves: Any) -> Any:
    """``saves`` with every :class:`~.ref.TensorRef` opened as a lazy tensor (what users hold)."""
    return map_leaves(lambda leaf: leaf.open() if isinstance(leaf, TensorRef) else leaf, saves)
