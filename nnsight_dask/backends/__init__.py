"""Where recorded graphs run: the contracts (``base``) and the in-process backend (``local``).

Only the contracts are imported here, so importing them (as tracing does) does not load the
execution engine.
"""
from __future__ import annotations

from .base import Backend, RunResult, SaveSink

__all__ = ["Backend", "RunResult", "SaveSink"]
