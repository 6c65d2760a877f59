"""The deployments the gateway serves: their records and what a client needs to trace them.

Every submission is validated here against the deployment's module paths and policy, so the record
and the model's description (config, module paths, tokenizer, from shard 0) are cached: the record
for :data:`REFRESH_SECONDS`, the description for as long as the deployment is the same one (same
creation time).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from distributed import Client

from ...client.deployment import deployments, get_deployment
from ...client.record import Deployment
from ...worker import tasks

#: How long a cached deployment record is used before it is read again from the scheduler.
REFRESH_SECONDS = 2.0


@dataclass(frozen=True)
class Served:
    """A deployment as the gateway sees it: its record and its model's description."""

    record: Deployment
    description: dict[str, Any]

    @property
    def module_paths(self) -> list[str]:
        return list(self.description["module_paths"])

    def _config(self, *names: str) -> int | None:
        config = self.description.get("config") or {}
        value = next((config[n] for n in names if isinstance(config.get(n), int)), None)
        return int(value) if value is not None else None

    @property
    def context_length(self) -> int | None:
        return self._config("max_position_embeddings", "n_positions")

    @property
    def vocab_size(self) -> int | None:
        return self._config("vocab_size")


class DeploymentCache:
    """Deployment records and descriptions read through the gateway's Dask client (thread-safe)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._lock = threading.Lock()
        self._served: dict[str, tuple[float, Served]] = {}

    def get(self, name: str) -> Served:
        """The deployment ``name`` (a :class:`~nnsight_dask.errors.DeploymentError` if there is none)."""
        with self._lock:
            cached = self._served.get(name)
        if cached is not None and time.monotonic() - cached[0] < REFRESH_SECONDS:
            return cached[1]
        record = get_deployment(self.client, name)
        if cached is not None and cached[1].record.created == record.created:
            description = cached[1].description
        else:
            description = self.client.submit(tasks.describe, name, workers=[record.shards[0].worker],
                                              pure=False).result()
        served = Served(record, description)
        with self._lock:
            self._served[name] = (time.monotonic(), served)
        return served

    def update(self, record: Deployment) -> None:
        """A fresher record (the shards moved), reported by an experiment."""
        with self._lock:
            cached = self._served.get(record.name)
            if cached is not None:
                self._served[record.name] = (time.monotonic(), Served(record, cached[1].description))

    def all(self) -> dict[str, Deployment]:
        return deployments(self.client)
