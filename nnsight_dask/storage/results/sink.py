"""``ZarrSink``: the one persistence lifecycle of saved values, for local and remote runs alike.

A run with ``store=`` gets one sink per experiment. Whoever produces a saved value (the local
runner, or the shard that computed it) calls :meth:`ZarrSink.write`: a tensor above the threshold is
written to ``<store>/<experiment>/<name>`` and its :class:`~.ref.TensorRef` travels on instead.
Whoever ran the experiment then calls :meth:`ZarrSink.commit` once every stage succeeded (the
results become visible) or :meth:`ZarrSink.abort` (nothing is left that looks whole). The sink
holds only its settings, so the writer on a shard and the committer on the client are two
instances built from the same experiment options (:meth:`ZarrSink.from_options`).

An experiment sent through the gateway carries a ``store_scope`` (its user; where its saves may go,
checked by the shard's policy before it runs). Its sink never passes on what the store answered
when a write fails (a status line, headers, the names in a JSON body: what a server-side request
forgery would be after): the error names the rule and the save, the worker's log keeps the rest.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch

from ... import config
from ..errors import StorageError
from ...tensors import leaves, map_leaves, nbytes
from .lifecycle import delete, mark_complete
from .ref import TensorRef
from .write import write_tensor

logger = logging.getLogger(__name__)
_T = TypeVar("_T")


class ZarrSink:
    """Persisted saves of experiment ``experiment`` in ``store`` (an fsspec URL or local path).

    Parameters
    ----------
    threshold
        Tensors of more bytes than this are persisted (default ``config.persist_threshold``);
        smaller ones stay inline.
    scope
        The experiment's ``store_scope`` (sent through the gateway): store errors are withheld.
    """

    def __init__(self, store: str | os.PathLike[str], experiment: str, *, threshold: int | None = None,
                 storage_options: Mapping[str, Any] | None = None, scope: Mapping[str, Any] | None = None) -> None:
        self.store = os.fspath(store)
        self.experiment = experiment
        self.threshold = config.persist_threshold if threshold is None else int(threshold)
        self.storage_options = dict(storage_options or {})
        self.scope = dict(scope) if scope is not None else None

    @classmethod
    def from_options(cls, options: Mapping[str, Any], experiment: str) -> ZarrSink | None:
        """The sink an experiment's options ask for (``store``, ``persist_threshold``,
        ``storage_options``), or None when they name no store."""
        store = options.get("store")
        if not store:
            return None
        return cls(store, experiment, threshold=options.get("persist_threshold"),
                   storage_options=options.get("storage_options"), scope=options.get("store_scope"))

    def write(self, name: str, value: Any) -> Any:
        """Persist ``value`` if it is a tensor above the threshold; returns its ref, else the value."""
        if isinstance(value, torch.Tensor) and nbytes(value) > self.threshold:
            return self._guarded(f"writing save {name!r}", write_tensor, self.store, self.experiment, name,
                                 value.detach(), storage_options=self.storage_options)
        return value

    def commit(self, saves: Mapping[str, Any]) -> int:
        """Make the experiment's persisted values visible; every ref in ``saves`` must exist.

        Returns the bytes persisted.
        """
        refs = [leaf for leaf in leaves(dict(saves)) if isinstance(leaf, TensorRef)]
        self._guarded("marking the saves complete", mark_complete, self.store, self.experiment,
                      names=[ref.path.split("/", 1)[1] for ref in refs], storage_options=self.storage_options)
        return sum(ref.nbytes for ref in refs)

    def _guarded(self, what: str, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """``fn(*args, **kwargs)``; for a scoped experiment, a failure names the rule, not the store's answer."""
        if self.scope is None:
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            logger.warning("experiment %s of user %r: %s in store %r failed: %s: %s", self.experiment,
                           self.scope.get("user"), what, self.store, type(exc).__name__, exc)
            raise StorageError(f"{what} of experiment {self.experiment} in store {self.store!r} failed "
                               f"({type(exc).__name__}); what the store answered is withheld from experiments sent "
                               "through the gateway (it is in the log of the process that wrote)",
                               rule="store_errors", store=self.store, experiment=self.experiment) from None

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
