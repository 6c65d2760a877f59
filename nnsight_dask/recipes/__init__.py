"""Research workflows written on the public API only (``nd.collect``)."""
from __future__ import annotations

from .collect import collect

__all__ = ["collect"]
