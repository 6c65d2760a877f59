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
import sys
from collections.abc import Callable
from types import FrameType

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


def inject_saves(frame: FrameType, recorder: Recorder, names: list[str]) -> list[str]:
    """Rebind the local ``names`` of ``frame`` that hold a saved, filled proxy of ``recorder`` to its value.

    ``names`` are those :meth:`Recorder.rename_saves` found bound to saved proxies (the setting is
    read, and the frame's locals are read again, only when there are some). Returns the names rebound.
    Module-level and class-body frames (whose locals are a plain dict) are written directly; function
    frames through ``f_locals`` (write-through from Python 3.13, ``PyFrame_LocalsToFast`` before).
    """
    if not names or not enabled():
        return []
    local_vars = frame.f_locals
    found = {}
    for name in names:
        value = local_vars.get(name)
        if type(value) is Proxy and value._recorder is recorder and value._save_node is not None \
                and value._has_value():
            found[name] = value._value
    if not found:
        return []
    if frame.f_locals is frame.f_globals or _WRITE_THROUGH:
        for name, value in found.items():
            local_vars[name] = value
    elif isinstance(local_vars, dict):
        local_vars.update(found)
        ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))
    return list(found)
