"""The deployment record: which model, in how many shards, on which workers, at which generation.

It lives on the scheduler as JSON-able metadata (so any client of the cluster finds a deployment by
name) and is read in exactly one place, :meth:`Deployment.from_metadata`; everything else uses the
typed fields. ``generation`` counts recoveries: a client whose cached record has an older generation
knows its placement may be out of date.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import DeploymentError
from ..graph.policy import Policy
from ..models.shards import ShardSpec, owner_of


@dataclass(frozen=True)
class ShardPlacement:
    """Shard ``index``: layers ``[layers[0], layers[1])`` and the module subtrees it owns, on ``worker``."""

    index: int
    worker: str
    layers: tuple[int, int]
    prefixes: tuple[str, ...]
    layers_path: str

    @property
    def spec(self) -> ShardSpec:
        return ShardSpec(index=self.index, layer_start=self.layers[0], layer_stop=self.layers[1],
                         module_prefixes=self.prefixes, layers_path=self.layers_path)

    @classmethod
    def of(cls, spec: ShardSpec, worker: str) -> ShardPlacement:
        return cls(spec.index, worker, (spec.layer_start, spec.layer_stop), tuple(spec.module_prefixes),
                   spec.layers_path)


@dataclass(frozen=True)
class Deployment:
    """A model deployed on the cluster under ``name`` (see :func:`nnsight_dask.serve`).

    ``options`` are the load options (``dtype``, ``device``, ``gguf_file``, ``load_options``); ``monitor`` tells whether
    the scheduler's experiment monitor is installed; ``policy`` is what experiments may do (the
    shards enforce it; a client reads it only to fail fast).
    """

    name: str
    source: str
    shards: tuple[ShardPlacement, ...]
    created: float
    generation: int = 0
    options: Mapping[str, Any] = field(default_factory=dict)
    monitor: bool = False
    policy: Policy = field(default_factory=Policy)

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    @property
    def workers(self) -> list[str]:
        """The worker of each shard, in shard order."""
        return [shard.worker for shard in self.shards]

    def specs(self) -> list[ShardSpec]:
        return [shard.spec for shard in self.shards]

    def owner(self, module_path: str) -> int:
        """The shard that runs ``module_path``."""
        return owner_of(self.specs(), module_path)

    def moved(self, placement: Mapping[int, str]) -> Deployment:
        """This deployment with shards moved to new workers (``{index: worker}``), one generation on."""
        shards = tuple(dataclasses.replace(s, worker=placement.get(s.index, s.worker)) for s in self.shards)
        return dataclasses.replace(self, shards=shards, generation=self.generation + 1)

    # -- the scheduler's copy ---------------------------------------------------------------------
    def to_metadata(self) -> dict[str, Any]:
        """JSON-able form stored on the scheduler."""
        return {"name": self.name, "source": self.source, "generation": self.generation, "created": self.created,
                "options": dict(self.options), "monitor": self.monitor, "policy": self.policy.to_dict(),
                "shards": [{"index": s.index, "worker": s.worker, "layers": list(s.layers),
                            "prefixes": list(s.prefixes), "layers_path": s.layers_path} for s in self.shards]}

    @classmethod
    def from_metadata(cls, data: Mapping[str, Any]) -> Deployment:
        """Inverse of :meth:`to_metadata`; a clear error for a record this version cannot read."""
        try:
            shards = tuple(ShardPlacement(int(s["index"]), str(s["worker"]), (int(s["layers"][0]), int(s["layers"][1])),
                                          tuple(s["prefixes"]), str(s["layers_path"])) for s in data["shards"])
            return cls(name=str(data["name"]), source=str(data["source"]), shards=shards,
                       created=float(data["created"]), generation=int(data["generation"]),
                       options=dict(data.get("options") or {}), monitor=bool(data.get("monitor")),
                       policy=Policy.from_dict(data.get("policy")))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            name = data.get("name") if isinstance(data, Mapping) else None
            raise DeploymentError(f"the scheduler's record of deployment {name!r} cannot be read "
                                  f"({type(exc).__name__}: {exc}); it was written by another version of "
                                  "nnsight-dask. Undeploy and serve it again.") from exc
