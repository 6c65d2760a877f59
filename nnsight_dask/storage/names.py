"""Naming rules for what becomes a path in a store: experiment ids, saved-value and module names.

Names become object keys on S3 and file names on disk, so they are checked before anything is
written, with a message that says which characters are allowed.
"""
from __future__ import annotations

import re

from .errors import StorageError

#: Key under which our metadata lives in Zarr attributes (arrays and groups).
ATTRS_KEY = "nnsight_dask"

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-\[\]]*$")


def validate_experiment_id(experiment_id: str) -> str:
    """Experiment ids are group names: 1-128 of ``[A-Za-z0-9_.-]``, starting with a letter or digit."""
    if not isinstance(experiment_id, str) or not _ID.match(experiment_id):
        raise StorageError(
            f"invalid experiment id {experiment_id!r}: use 1-128 letters, digits or '_.-', "
            "starting with a letter or digit", experiment_id=experiment_id)
    return experiment_id


def validate_name(name: str, what: str = "value") -> str:
    """A saved value's (or module's) name as an array path: ``/``-separated parts of
    ``[A-Za-z0-9_.-[]]``, each starting with a letter or digit (``model.layers.12.output`` is fine)."""
    parts = name.split("/") if isinstance(name, str) else [""]
    if not all(_NAME_PART.match(p) and p not in (".", "..") for p in parts):
        raise StorageError(
            f"cannot persist a {what} named {name!r}: a name is one or more '/'-separated parts made of "
            "letters, digits and '_.-[]', each starting with a letter or digit", name=name)
    return name
