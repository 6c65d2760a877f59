"""Where in the user's code a node was recorded, so errors can point at the line they wrote."""
from __future__ import annotations

import os
import sys

import torch

_INTERNAL = (
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
    os.path.dirname(os.path.abspath(os.__file__)) + os.sep + "contextlib.py",
)


def user_location() -> str | None:
    """``"file.py:12"`` of the innermost frame outside nnsight_dask, torch and contextlib."""
    frame = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(_INTERNAL):
            return f"{_short(filename)}:{frame.f_lineno}"
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
