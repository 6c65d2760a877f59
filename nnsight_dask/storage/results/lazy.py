"""``LazyTensor``: a persisted result that reads only what is asked of it.

A saved activation of a remote trace may be gigabytes; the client holds this handle instead. It
wraps a dask array built from the Zarr array (one dask chunk per Zarr chunk), so slicing and
reductions stay lazy and, when computed, read only the chunks they cover. Materializing gives the
original torch dtype back exactly (bf16 included), which is what a researcher's torch code expects.

>>> x = ref.open()                        # doctest: +SKIP
>>> x[:, -1].mean(0).compute()            # doctest: +SKIP   (reads the chunks holding the last token)
"""
from __future__ import annotations

import posixpath
from typing import Any, NamedTuple, Sequence

import dask.array as da
import numpy as np
import torch
import zarr
from dask.base import tokenize

from ...tensors import (
    from_stored,
    is_bit_view,
    itemsize,
    map_leaves,
    stored_values,
    value_dtype,
)
from ..errors import ResultNotFoundError
from ..location import StoreLocation

Dim = int | Sequence[int] | None

#: Torch reduction name -> dask.array function computing it.
_DASK_REDUCTIONS = {"sum": "sum", "mean": "mean", "amax": "max", "amin": "min"}


class MinMax(NamedTuple):
    """``(values, indices)`` of :meth:`LazyTensor.max`/``min`` along a dim, like torch's."""

    values: LazyTensor
    indices: LazyTensor


class LazyTensor:
    """A lazy n-d array with a torch dtype, backed by a dask array.

    Parameters
    ----------
    array
        The dask array. Holds the stored bits (``uint16`` for bf16) unless ``values`` is true.
    dtype
        The torch dtype the data has (or, for reductions, will have) when materialized.
    values
        True when ``array`` already holds numeric values (e.g. float32 for a bf16 mean) rather than
        stored bits.
    source
        Where the data lives, for the repr.
    """

    __slots__ = ("_array", "_dtype", "_values", "_source")

    def __init__(self, array: da.Array, dtype: torch.dtype, *, values: bool = False, source: str = "") -> None:
        self._array = array
        self._dtype = dtype
        self._values = values or not is_bit_view(dtype)
        self._source = source

    @classmethod
    def open(cls, location: StoreLocation, path: str, dtype: torch.dtype) -> LazyTensor:
        """Open the Zarr array at ``path`` in ``location``, holding ``dtype`` data (reads its metadata
        only); what :meth:`TensorRef.open <nnsight_dask.storage.results.ref.TensorRef.open>` returns."""
        store = location.zarr_store(read_only=True)
        source = posixpath.join(location.url, path)
        try:
            z = zarr.open_array(store=store, path=path, mode="r", zarr_format=3)
        except FileNotFoundError as exc:
            raise ResultNotFoundError(
                f"no persisted tensor at {source}: it was never written, or was deleted "
                "(experiments expire after their TTL; see nnsight_dask.storage.cleanup)",
                url=location.url, path=path) from exc
        return cls.from_zarr(z, dtype, source=source)

    @classmethod
    def from_zarr(cls, z: zarr.Array, dtype: torch.dtype, *, source: str = "") -> LazyTensor:
        """Wrap an open Zarr array holding ``dtype`` data (one dask chunk per Zarr chunk)."""
        name = "zarr-" + tokenize(source, z.shape, z.chunks, str(z.dtype), str(dtype))
        return cls(da.from_zarr(z, name=name), dtype, source=source)

    # -- description ---------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        """Shape, as ``torch.Size``."""
        return torch.Size(int(s) for s in self._array.shape)

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype of the materialized tensor."""
        return self._dtype

    @property
    def ndim(self) -> int:
        return self._array.ndim

    @property
    def chunks(self) -> tuple[tuple[int, ...], ...]:
        """Dask chunks (equal to the Zarr chunks until sliced)."""
        return self._array.chunks

    @property
    def nbytes(self) -> int:
        """Size of the materialized tensor in bytes."""
        return int(np.prod(self._array.shape)) * itemsize(self._dtype)

    @property
    def dask(self) -> da.Array:
        """The data as a dask array of values numpy can hold (bf16/fp8 decoded to float32, exactly)."""
        return self._value_array()

    def __len__(self) -> int:
        return int(self._array.shape[0])

    def size(self, dim: int | None = None) -> torch.Size | int:
        """Like ``torch.Tensor.size``."""
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return int(np.prod(self._array.shape))

    def __repr__(self) -> str:
        where = f", source={self._source!r}" if self._source else ""
        chunk = tuple(c[0] if c else 0 for c in self._array.chunks)
        return f"LazyTensor(shape={tuple(self.shape)}, dtype={self._dtype}, chunks={chunk}{where})"

    # -- laziness ------------------------------------------------------------------------------
    def __getitem__(self, key: Any) -> LazyTensor:
        """A lazy slice; computing it reads only the chunks it covers."""
        return LazyTensor(self._array[_numpy_index(key)], self._dtype, values=self._values, source=self._source)

    def float(self) -> LazyTensor:
        """Lazily convert to float32 (exact for bf16/fp16/fp8)."""
        return LazyTensor(self._value_array().astype(np.float32), torch.float32, values=True, source=self._source)

    def sum(self, dim: Dim = None, keepdim: bool = False) -> LazyTensor:
        return self._reduce("sum", dim, keepdim)

    def mean(self, dim: Dim = None, keepdim: bool = False) -> LazyTensor:
        return self._reduce("mean", dim, keepdim)

    def amax(self, dim: Dim = None, keepdim: bool = False) -> LazyTensor:
        return self._reduce("amax", dim, keepdim)

    def amin(self, dim: Dim = None, keepdim: bool = False) -> LazyTensor:
        return self._reduce("amin", dim, keepdim)

    def std(self, dim: Dim = None, *, correction: int = 1, keepdim: bool = False) -> LazyTensor:
        return self._reduce("std", dim, keepdim, correction=correction)

    def var(self, dim: Dim = None, *, correction: int = 1, keepdim: bool = False) -> LazyTensor:
        return self._reduce("var", dim, keepdim, correction=correction)

    def max(self, dim: int | None = None, keepdim: bool = False) -> LazyTensor | MinMax:
        """The maximum; along ``dim``, ``(values, indices)`` as in torch."""
        return self._extremum("max", dim, keepdim)

    def min(self, dim: int | None = None, keepdim: bool = False) -> LazyTensor | MinMax:
        """The minimum; along ``dim``, ``(values, indices)`` as in torch."""
        return self._extremum("min", dim, keepdim)

    # -- materializing -------------------------------------------------------------------------
    def compute(self) -> torch.Tensor:
        """Read and return a torch tensor of the original dtype (same as :meth:`torch`)."""
        return self.torch()

    def torch(self) -> torch.Tensor:
        """Read and return a torch tensor of the original dtype; bf16 and fp8 are bit-exact."""
        data = np.asarray(self._array.compute())
        if self._values:
            return torch.from_numpy(_writable(data)).to(self._dtype)
        return from_stored(data, self._dtype)

    def numpy(self) -> np.ndarray:
        """Read and return a numpy array (bf16/fp8 as float32, exactly)."""
        return np.asarray(self._value_array().compute())

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self.numpy()
        return out if dtype is None else out.astype(dtype)

    def __dlpack__(self, **kwargs: Any) -> Any:
        """``torch.as_tensor(x)``/``torch.tensor(x)`` read the whole array (torch asks its data
        this way before treating an object as a sequence of rows)."""
        return self.torch().__dlpack__(**kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        """Read arrays live on the CPU (DLPack's device type 1, ``kDLCPU``)."""
        return (1, 0)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        """A torch function given a lazy tensor reads it whole first, in its own dtype:
        ``torch.as_tensor(x)``, ``torch.softmax(x, -1)``, ``torch.cat([x, y])`` work on a persisted save.
        Slice first (``x[0, -1]``) to read only what is needed."""
        read = lambda value: value.torch() if isinstance(value, LazyTensor) else value  # noqa: E731
        return func(*map_leaves(read, tuple(args)), **map_leaves(read, dict(kwargs or {})))

    # -- internals -----------------------------------------------------------------------------
    def _value_array(self) -> da.Array:
        if self._values:
            return self._array
        return self._array.map_blocks(stored_values, self._dtype, dtype=value_dtype(self._dtype))

    def _compute_array(self) -> da.Array:
        """Values in a dtype numpy reduces accurately: half precision is widened to float32."""
        arr = self._value_array()
        return arr.astype(np.float32) if arr.dtype == np.float16 else arr

    def _result(self, array: da.Array, torch_op: str, dim: Dim, keepdim: bool, **kw: Any) -> LazyTensor:
        meta = torch.empty(tuple(self.shape), dtype=self._dtype, device="meta")
        args: dict[str, Any] = {"keepdim": keepdim, **kw} if dim is not None else dict(kw)
        out = getattr(meta, torch_op)(*(() if dim is None else (dim,)), **args)
        out = out[0] if isinstance(out, tuple) else out
        return LazyTensor(array, out.dtype, values=True, source=self._source)

    def _reduce(self, op: str, dim: Dim, keepdim: bool, **kw: Any) -> LazyTensor:
        axis = _axis(dim)
        arr = self._compute_array()
        if op in ("std", "var"):
            result = getattr(da, op)(arr, axis=axis, keepdims=keepdim, ddof=kw["correction"])
        else:
            result = getattr(da, _DASK_REDUCTIONS[op])(arr, axis=axis, keepdims=keepdim)
        return self._result(result, op, dim, keepdim, **kw)

    def _extremum(self, op: str, dim: int | None, keepdim: bool) -> LazyTensor | MinMax:
        if dim is None:
            return self._reduce("amax" if op == "max" else "amin", None, False)
        values = self._reduce("amax" if op == "max" else "amin", dim, keepdim)
        arg = getattr(da, "argmax" if op == "max" else "argmin")(self._compute_array(), axis=dim, keepdims=keepdim)
        return MinMax(values, LazyTensor(arg.astype(np.int64), torch.int64, values=True, source=self._source))


def _axis(dim: Dim) -> int | tuple[int, ...] | None:
    if dim is None or isinstance(dim, int):
        return dim
    return tuple(int(d) for d in dim)


def _numpy_index(key: Any) -> Any:
    """Torch tensors inside an index become numpy arrays, which dask understands."""
    if isinstance(key, tuple):
        return tuple(_numpy_index(k) for k in key)
    if isinstance(key, torch.Tensor):
        return key.cpu().numpy()
    return key


def _writable(array: np.ndarray) -> np.ndarray:
    ok = array.flags.c_contiguous and array.flags.writeable
    return array if ok else array.copy(order="C")  # not ascontiguousarray: it turns 0-d into 1-d
