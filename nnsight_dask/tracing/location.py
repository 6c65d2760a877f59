"""Where in the user's code a node was recorded, so errors can point at the line they wrote.

Every recorded node carries one, so finding it must cost little: whether a code object is ours
(nnsight_dask, torch, contextlib) is decided once per code object, and the text of a location once
per place in the code (code object and instruction offset).
"""
from __future__ import annotations

import os
import sys
from types import CodeType

import torch

_INTERNAL = (
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
    os.path.dirname(os.path.abspath(os.__file__)) + os.sep + "contextlib.py",
)
#: Bound on the caches below (code objects of cells and ``exec`` strings come and go).
_MAX_CACHED = 4096
_INTERNAL_CODE: dict[CodeType, bool] = {}
_LOCATIONS: dict[tuple[CodeType, int], str] = {}


def user_location() -> str | None:
    """``"file.py:12"`` of the innermost frame outside nnsight_dask, torch and contextlib."""
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        internal = _INTERNAL_CODE.get(code)
        if internal is None:
            if len(_INTERNAL_CODE) >= _MAX_CACHED:
                _INTERNAL_CODE.clear()
            internal = _INTERNAL_CODE[code] = code.co_filename.startswith(_INTERNAL)
        if not internal:
            key = (code, frame.f_lasti)
            location = _LOCATIONS.get(key)
            if location is None:
                if len(_LOCATIONS) >= _MAX_CACHED:
                    _LOCATIONS.clear()
                location = _LOCATIONS[key] = f"{_short(code.co_filename)}:{frame.f_lineno}"
            return location
        frame = frame.f_back
    return None


_SHORT: dict[str, str] = {}


def _short(filename: str) -> str:
    short = _SHORT.get(filename)
    if short is None:
        try:
            rel = os.path.relpath(filename)
            short = rel if not rel.startswith("..") else filename
        except ValueError:
            short = filename
        _SHORT[filename] = short
    return short
