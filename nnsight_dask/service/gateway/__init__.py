"""The authenticated HTTP gateway: API keys, fair queues and statuses in front of a cluster's deployments.

:class:`Gateway` serves the API (docs/gateway.md); :class:`KeyRing` reads ``keys.toml``. Modules,
one job each: ``keys`` (who), ``fairqueue`` (in which order), ``dispatch`` (admission and running),
``state`` (what survives a restart), ``events`` (status events to watchers), ``deployments``
(cached records and model descriptions), ``handlers`` (the HTTP surface), ``server`` (lifecycle).
"""
from __future__ import annotations

from .keys import KeyRing, User, hash_key, new_key
from .server import Gateway

__all__ = ["Gateway", "KeyRing", "User", "hash_key", "new_key"]
