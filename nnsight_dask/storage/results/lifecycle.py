"""An experiment's persisted results and their lifecycle: created, complete (visible), deleted, expired.

Layout: the store root is a Zarr group; each experiment is a child group ``<store>/<experiment id>``
whose arrays are its persisted saves. The group's attributes (under ``"nnsight_dask"``) hold::

    {"kind": "experiment", "created_at": "<UTC ISO time>", "complete": false}

Shards write arrays into the group (creating it on first write). When, and only when, every stage of
the experiment has succeeded, the coordinator calls :func:`mark_complete`, which rewrites the
group's attributes in one atomic object write (``complete: true``, ``completed_at``, and the list
of array names). Readers (:func:`open_experiment`) refuse groups that are not complete, so a failed
or still-running experiment never looks whole. Deleting first clears ``complete`` (and sets
``deleting``), then removes the data: an interrupted delete leaves an incomplete group, which
:func:`cleanup` removes on its next run.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

import zarr
from zarr.errors import NodeNotFoundError

from ...tensors import dtype_from_name
from ..errors import CompletedResultError, IncompleteResultError, ResultNotFoundError
from ..location import StoreLocation, UrlLike, as_location
from ..names import ATTRS_KEY, validate_experiment_id
from .ref import TensorRef

KIND = "experiment"


def _now() -> datetime:
    return datetime.now(timezone.utc)




def _info(group: zarr.Group) -> dict[str, Any]:
    info = dict(group.attrs.get(ATTRS_KEY) or {})
    return info if info.get("kind") == KIND else {}


def _open_group(location: StoreLocation, experiment_id: str, mode: str = "r") -> zarr.Group | None:
    try:
        return zarr.open_group(location.zarr_store(read_only=mode == "r"), path=experiment_id, mode=mode, zarr_format=3)
    except (NodeNotFoundError, FileNotFoundError):
        return None


def ensure_experiment(location: StoreLocation, experiment_id: str) -> None:
    """Create the experiment's group (and the store's root group) unless they exist.

    Raises :class:`CompletedResultError` if the experiment is already complete: results are
    immutable once visible. Concurrent first writers may both create the group; they write the same
    document up to the creation time, so either one winning is fine.
    """
    group = _open_group(location, experiment_id)
    if group is not None:
        if _info(group).get("complete"):
            raise CompletedResultError(
                f"experiment {experiment_id!r} in {location.url} is already complete; its results are "
                "immutable. Use a new experiment id, or delete it first (nnsight_dask.storage.delete).",
                url=location.url, experiment_id=experiment_id)
        return
    store = location.zarr_store()
    zarr.open_group(store, mode="a", zarr_format=3)  # the store root is a group too, so Zarr tools can browse it
    zarr.create_group(store, path=experiment_id, overwrite=False, attributes={
        ATTRS_KEY: {"kind": KIND, "created_at": _now().isoformat(), "complete": False}})


def _array_names(group: zarr.Group) -> list[str]:
    return sorted(path for path, node in group.members(max_depth=None) if isinstance(node, zarr.Array))


def mark_complete(
    url: UrlLike,
    experiment_id: str,
    *,
    names: list[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Make an experiment's results visible: the last write of a successful experiment.

    Parameters
    ----------
    names
        The persisted values the experiment must have; a missing one is an error (and the experiment
        stays incomplete). Default: whatever arrays the group holds.

    Returns
    -------
    list of str
        The array names recorded as the experiment's results.
    """
    location = as_location(url, storage_options)
    validate_experiment_id(experiment_id)
    group = _open_group(location, experiment_id, mode="r+")
    if group is None and names == []:  # nothing was persisted: an empty, complete experiment
        ensure_experiment(location, experiment_id)
        group = _open_group(location, experiment_id, mode="r+")
    if group is None:
        raise ResultNotFoundError(f"no experiment {experiment_id!r} in {location.url}: nothing was written to it",
                                  url=location.url, experiment_id=experiment_id)
    found = _array_names(group)
    if names is not None:
        missing = sorted(set(names) - set(found))
        if missing:
            raise IncompleteResultError(
                f"cannot mark experiment {experiment_id!r} in {location.url} complete: persisted values "
                f"{missing} are missing (found {found}); a shard's write failed or has not finished",
                url=location.url, experiment_id=experiment_id, missing=missing)
        found = sorted(names)
    info = _info(group) or {"kind": KIND, "created_at": _now().isoformat()}
    group.update_attributes({ATTRS_KEY: {**info, "complete": True, "completed_at": _now().isoformat(),
                                         "arrays": found}})
    return found


def is_complete(url: UrlLike, experiment_id: str, *,
                storage_options: Mapping[str, Any] | None = None) -> bool:
    """True if the experiment exists and was marked complete."""
    group = _open_group(as_location(url, storage_options), validate_experiment_id(experiment_id))
    return bool(group is not None and _info(group).get("complete"))


class Experiment(Mapping[str, Any]):
    """A complete experiment's persisted results: ``name -> LazyTensor`` (opened on access)."""

    def __init__(self, location: StoreLocation, experiment_id: str, info: Mapping[str, Any], names: list[str]) -> None:
        self.location = location
        self.id = experiment_id
        self.info = dict(info)
        self._names = list(names)

    @property
    def complete(self) -> bool:
        return bool(self.info.get("complete"))

    @property
    def created_at(self) -> datetime | None:
        stamp = self.info.get("created_at")
        return datetime.fromisoformat(stamp) if stamp else None

    def ref(self, name: str) -> TensorRef:
        """The :class:`TensorRef` of one persisted value (reads its metadata)."""
        if name not in self._names:
            raise KeyError(f"experiment {self.id!r} has no persisted value {name!r}; it has {self._names}")
        path = f"{self.id}/{name}"
        z = zarr.open_array(self.location.zarr_store(read_only=True), path=path, mode="r", zarr_format=3)
        dtype = (z.attrs.get(ATTRS_KEY) or {}).get("torch_dtype") or str(z.dtype)
        dtype_from_name(dtype)
        return TensorRef(self.location.url, path, z.shape, dtype, self.location.storage_options)

    def __getitem__(self, name: str) -> Any:
        return self.ref(name).open()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        state = "complete" if self.complete else "INCOMPLETE"
        return f"Experiment({self.id!r}, {state}, values={self._names}, store={self.location.url!r})"


def open_experiment(
    url: UrlLike,
    experiment_id: str,
    *,
    allow_incomplete: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Experiment:
    """The persisted results of a complete experiment.

    Raises
    ------
    ResultNotFoundError
        No such experiment in the store.
    IncompleteResultError
        The experiment is still running or failed; pass ``allow_incomplete=True`` to look anyway.
    """
    location = as_location(url, storage_options)
    group = _open_group(location, validate_experiment_id(experiment_id))
    if group is None:
        raise ResultNotFoundError(f"no experiment {experiment_id!r} in {location.url}",
                                  url=location.url, experiment_id=experiment_id)
    info = _info(group)
    if not info.get("complete") and not allow_incomplete:
        raise IncompleteResultError(
            f"experiment {experiment_id!r} in {location.url} is not complete: it is still running, or it "
            "failed (a failed experiment is never marked complete). Pass allow_incomplete=True to inspect "
            "what was written.", url=location.url, experiment_id=experiment_id)
    names = list(info["arrays"]) if info.get("complete") else _array_names(group)
    return Experiment(location, experiment_id, info, names)


def list_experiments(url: UrlLike, *,
                     storage_options: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Every experiment in a store: ``id -> attributes`` (kind, created_at, complete, ...)."""
    location = as_location(url, storage_options)
    try:
        root = zarr.open_group(location.zarr_store(read_only=True), mode="r", zarr_format=3)
    except (NodeNotFoundError, FileNotFoundError):
        return {}
    return {name: info for name, group in root.groups() if (info := _info(group))}


def delete(url: UrlLike, experiment_id: str, *,
           storage_options: Mapping[str, Any] | None = None) -> bool:
    """Delete an experiment's results; True if there was anything to delete.

    The group is first made incomplete (``deleting: true``), so that no reader sees a half-deleted
    experiment as whole, then its data is removed.
    """
    location = as_location(url, storage_options)
    validate_experiment_id(experiment_id)
    group = _open_group(location, experiment_id, mode="r+")
    if group is not None:
        info = _info(group)
        if info:
            group.update_attributes({ATTRS_KEY: {**info, "complete": False, "deleting": True}})
    fs, root = location.filesystem()
    existed = group is not None or fs.exists(f"{root}/{experiment_id}")
    location.remove(experiment_id)
    return existed


def cleanup(url: UrlLike, older_than: timedelta, *, now: datetime | None = None,
            storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Delete every experiment created more than ``older_than`` ago (complete or not), and any whose
    deletion was interrupted. Returns the deleted ids.

    Run it periodically on a service's store (a TTL on results); ``now`` is for tests.
    """
    location = as_location(url, storage_options)
    cutoff = (now or _now()) - older_than
    deleted = []
    for experiment_id, info in list_experiments(location).items():
        created = info.get("created_at")
        expired = created is None or datetime.fromisoformat(created) < cutoff
        if expired or info.get("deleting"):
            delete(location, experiment_id)
            deleted.append(experiment_id)
    return sorted(deleted)
