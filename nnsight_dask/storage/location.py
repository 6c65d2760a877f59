"""Where a store lives: one fsspec URL (plus its ``storage_options``) and the two views of it we need.

A store is named by an fsspec URL so that any backend fsspec knows (local disk, ``s3://``,
``gcs://``, ...) works without code here. Two views of the same location are built from it:

- a **Zarr store** for arrays and group metadata (``zarr.storage.LocalStore`` for local paths, which
  writes files atomically; ``zarr.storage.FsspecStore`` for everything else);
- a synchronous **fsspec filesystem** for the few things Zarr has no public API for: small marker
  objects, listing them, and deleting whole prefixes.

URLs are normalized once, where they are given (on the client): a relative local path becomes an
absolute ``file://`` URL, because a worker process with another working directory must reach the
same files.
"""
from __future__ import annotations

import json
import os
import posixpath
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping, TypeAlias

import fsspec
import zarr
from fsspec.core import url_to_fs
from zarr.storage import FsspecStore, LocalStore

from .errors import StorageError

#: Protocols whose data lives in one process's memory: useless for results shared with workers.
_PROCESS_LOCAL_PROTOCOLS = frozenset({"memory"})


def as_location(url: UrlLike, storage_options: Mapping[str, Any] | None = None) -> StoreLocation:
    """``url`` as a :class:`StoreLocation` (a location passes through unchanged)."""
    return url if isinstance(url, StoreLocation) else StoreLocation(os.fspath(url), storage_options or {})


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def normalize_url(url: str | os.PathLike[str]) -> str:
    """An absolute URL for ``url``: local paths become ``file:///abs/path``; others are unchanged.

    >>> normalize_url("/data/acts.zarr")
    'file:///data/acts.zarr'
    """
    url = os.fspath(url)
    if not isinstance(url, str) or not url:
        raise StorageError(f"a store URL must be a non-empty string, got {url!r}", url=url)
    if "::" in url:  # fsspec chained URLs ("simplecache::s3://..."): leave to fsspec as given
        return url
    if _protocol(url) == "file":
        path = url[len("file://"):] if url.startswith("file://") else url
        return "file://" + os.path.abspath(os.path.expanduser(path))
    return url.rstrip("/")


@dataclass(frozen=True)
class StoreLocation:
    """A normalized store URL with its fsspec ``storage_options``; cheap to build, picklable.

    Parameters
    ----------
    url
        Any fsspec URL or local path; normalized with :func:`normalize_url`.
    storage_options
        Passed to fsspec (e.g. ``{"key": ..., "secret": ..., "client_kwargs": {"endpoint_url": ...}}``
        for S3). They travel with every :class:`~nnsight_dask.storage.TensorRef`, so workers and
        clients open the same store the same way.
    """

    url: str
    storage_options: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", normalize_url(self.url))
        object.__setattr__(self, "storage_options", dict(self.storage_options or {}))

    # -- capability flags ------------------------------------------------------------------------
    @property
    def protocol(self) -> str:
        """The fsspec protocol: ``"file"``, ``"s3"``, ``"memory"``, ..."""
        return _protocol(self.url)

    @property
    def is_local(self) -> bool:
        """True for the local filesystem (written through Zarr's atomic ``LocalStore``)."""
        return self.protocol == "file"

    @property
    def shared_across_processes(self) -> bool:
        """False for ``memory://``: each process has its own, so workers' writes are invisible."""
        return self.protocol not in _PROCESS_LOCAL_PROTOCOLS

    # -- views ---------------------------------------------------------------------------------
    def child(self, *parts: str) -> StoreLocation:
        """The location of a sub-path (``<url>/<part>/...``) with the same options."""
        return StoreLocation(posixpath.join(self.url, *parts), self.storage_options)

    def zarr_store(self, *, read_only: bool = False) -> zarr.abc.store.Store:
        """A Zarr v3 store rooted at this location."""
        if self.is_local:
            path = self.url[len("file://"):]
            if not read_only:
                os.makedirs(path, exist_ok=True)
            return LocalStore(path, read_only=read_only)
        return FsspecStore.from_url(self.url, storage_options=dict(self.storage_options), read_only=read_only)

    def filesystem(self) -> tuple[fsspec.AbstractFileSystem, str]:
        """A synchronous fsspec filesystem and this location's path on it."""
        try:
            return url_to_fs(self.url, **self.storage_options)
        except ImportError as exc:  # e.g. s3fs not installed: fsspec's message names the package
            raise StorageError(f"cannot open store {self.url!r}: {exc}", url=self.url) from exc

    # -- small objects (markers) ---------------------------------------------------------------
    def put_json(self, key: str, value: Any) -> None:
        """Write a small JSON object at ``<url>/<key>`` so that no reader ever sees half of it.

        Object stores (S3, GCS) replace objects atomically; on local disk we write a temporary file
        and rename it into place.
        """
        fs, root = self.filesystem()
        path = posixpath.join(root, key)
        data = json.dumps(value, sort_keys=True).encode()
        if self.is_local:
            fs.makedirs(posixpath.dirname(path), exist_ok=True)
            tmp = f"{path}.{uuid.uuid4().hex}.partial"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            fs.pipe_file(path, data)

    def put_objects(self, objects: Mapping[str, bytes | memoryview]) -> None:
        """Write whole objects (e.g. Zarr chunks) at ``<url>/<key>``: plain file writes on local disk,
        one concurrent batch of PUTs elsewhere."""
        fs, root = self.filesystem()
        if self.is_local:
            made: set[str] = set()
            for key, value in objects.items():
                path = posixpath.join(root, key)
                parent = posixpath.dirname(path)
                if parent not in made:
                    os.makedirs(parent, exist_ok=True)
                    made.add(parent)
                with open(path, "wb") as f:
                    f.write(value)
        else:
            fs.pipe({posixpath.join(root, key): bytes(value) for key, value in objects.items()})

    def list_json(self, prefix: str) -> dict[str, Any]:
        """Every JSON object directly under ``<url>/<prefix>/``, by file name (one listing, one batch
        of reads); temporary ``.partial`` files are skipped."""
        fs, root = self.filesystem()
        base = posixpath.join(root, prefix)
        fs.invalidate_cache(base)  # s3fs & co. cache listings; markers appear while we run
        try:
            paths = [p for p in fs.ls(base, detail=False) if p.endswith(".json")]
        except FileNotFoundError:
            return {}
        if not paths:
            return {}
        contents = fs.cat(paths, on_error="omit")
        return {posixpath.basename(p): json.loads(data) for p, data in contents.items()}

    def remove(self, key: str = "") -> None:
        """Delete ``<url>/<key>`` and everything under it; a missing path is not an error."""
        fs, root = self.filesystem()
        path = posixpath.join(root, key) if key else root
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        fs.invalidate_cache()


#: What public functions accept as a store: an fsspec URL, a local path, or a StoreLocation.
UrlLike: TypeAlias = "str | os.PathLike[str] | StoreLocation"
