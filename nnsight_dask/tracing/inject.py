"""Frame injection: after a trace ran, the caller's local names bound to its saved proxies get the values.

As in nnsight 0.4, ``h = lm.model.layers[0].output.save()`` is a plain tensor after the ``with`` block
(``isinstance(h, torch.Tensor)``, numpy, pickling). Only names bound directly in the frame that ran
the ``with`` block are replaced; proxies inside lists or dicts stay proxies (read them with ``.value``).

Whether it happens is a process setting, ``nnsight-dask.frame-injection`` in dask.config (default
on; ``dask.config.set({"nnsight-dask.frame-injection": False})`` or the environment variable
``DASK_NNSIGHT_DASK__FRAME_INJECTION=False`` keep saved proxies as proxies), read through the reader
:mod:`nnsight_dask.api` installs (tracing itself never imports Dask). ``FRAME_INJECTION =
True``/``False`` here forces it either way (nnsight's ``CONFIG.APP.FRAME_INJECTION``).
"""
from __future__ import annotations

import ctypes
import inspect
import sys
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

from .proxy import Proxy
from .recorder import Recorder

#: Replace saved proxies in the caller's local variables by their values when a trace has run:
#: ``None`` follows the process setting, ``True``/``False`` force it.
FRAME_INJECTION: bool | None = None

_setting: Callable[[], bool] = lambda: True  # the setting's default, until api installs its reader


def set_setting_reader(reader: Callable[[], bool]) -> None:
    """Install where the process setting is read (:mod:`nnsight_dask.api` reads dask.config)."""
    global _setting
    _setting = reader


def enabled() -> bool:
    """Whether saved proxies in the caller's locals become their values after a trace."""
    return _setting() if FRAME_INJECTION is None else FRAME_INJECTION


_WRITE_THROUGH = sys.version_info >= (3, 13)  # PEP 667: frame.f_locals writes through to the frame


def inject_saves(frame: FrameType, local_vars: Mapping[str, Any], recorder: Recorder, names: list[str]) -> list[str]:
    """Rebind the local ``names`` of ``frame`` that hold a saved, filled proxy of ``recorder`` to its value.

    ``local_vars`` is ``frame.f_locals`` as read when the block closed (reading it again would copy
    the frame's locals again; the frame has not run since). ``names`` are those
    :meth:`Recorder.rename_saves` found bound to saved proxies (the setting is read only when there
    are some). Returns the names rebound. Module-level and class-body frames (whose locals are a
    plain dict) are written directly; function frames through ``f_locals`` (write-through from
    Python 3.13, ``PyFrame_LocalsToFast`` before).
    """
    if not names or not enabled():
        return []
    found = {}
    for name in names:
        value = local_vars.get(name)
        if type(value) is Proxy and value._recorder is recorder and value._save_node is not None \
                and value._has_value():
            found[name] = value._value
    if not found:
        return []
    if local_vars is frame.f_globals or _WRITE_THROUGH:
        for name, value in found.items():
            local_vars[name] = value  # type: ignore[index]
    elif isinstance(local_vars, dict):
        local_vars.update(found)
        _locals_to_fast(frame, 0)
    return list(found)


#: ``PyFrame_LocalsToFast(frame, 0)`` (Python < 3.13), bound once with its argument types.
_locals_to_fast = None if _WRITE_THROUGH else ctypes.PYFUNCTYPE(None, ctypes.py_object, ctypes.c_int)(
    ("PyFrame_LocalsToFast", ctypes.pythonapi))


class CallerLocals:
    """``with CallerLocals(frame) as local_vars:``: the locals of the frame that ran a ``with`` block,
    read once when the block closes (each read of a function frame's ``f_locals`` copies them; the
    frame does not run meanwhile, so one read serves naming the saves and :func:`inject_saves`).

    On leaving, the copy that the read left on a function frame is let go of (Python < 3.13): it
    lives as long as the frame and is refreshed only by the next read, so a value the user ``del``s
    after a trace (an activation, a list of saves) would stay alive in it until the function returns.
    The frame's own variables are not in the copy (:func:`inject_saves` has written to them already),
    so emptying it changes nothing the code sees; a later ``locals()`` (or a debugger's next stop)
    fills it again. Only a ``locals()`` dict kept across the block sees it empty, as from Python 3.13
    on it would not see the block's names either (PEP 667: each call, its own snapshot). Module-level
    and class-body frames, whose locals *are* the dict, are left alone.
    """

    __slots__ = ("frame", "values")

    def __init__(self, frame: FrameType) -> None:
        self.frame = frame
        self.values: Mapping[str, Any] = frame.f_locals

    def __enter__(self) -> Mapping[str, Any]:
        return self.values

    def __exit__(self, *exc: object) -> None:
        values = self.values
        if not _WRITE_THROUGH and self.frame.f_code.co_flags & inspect.CO_OPTIMIZED and isinstance(values, dict):
            values.clear()
