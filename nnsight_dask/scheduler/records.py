"""What the scheduler's monitor keeps per experiment and per shard: plain records, no behaviour."""
from __future__ import annotations

from dataclasses import dataclass, field

FINISHED = ("completed", "failed", "cancelled", "retried")
STATUSES = ("queued", "running", *FINISHED)
#: Upper bounds (seconds) of the run-time histogram's buckets (Prometheus ``le``).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class ExperimentRecord:
    """What the scheduler knows of one experiment."""

    experiment: str
    deployment: str
    user: str
    #: Its chain's length, and the shard of each stage.
    stages: int
    shards: list[int]
    submitted: float
    retry_of: str = ""
    status: str = "queued"
    started: float | None = None
    ended: float | None = None
    stages_done: int = 0
    #: The experiments it travelled with on the direct route (``a+b+c``; itself alone when it went alone).
    route: str = ""
    bytes_returned: int = 0
    bytes_persisted: int = 0
    error: str = ""
    #: The client that submitted it (its id on the scheduler) and the workers of its shards.
    client: str = ""
    workers: list[str] = field(default_factory=list)
    #: The worker that died while this experiment was computing on it ("" if none did).
    lost_on: str = ""
    #: Who vouches for ``user``: "gateway" (a registered gateway checked it against an API key) or
    #: "client" (the name a Dask client gave itself, see ``nd.config.user``).
    via: str = "client"
    #: Experiments it shared forward passes with on the shards (co-tenant batching).
    cotenants: set[str] = field(default_factory=set)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


@dataclass
class ShardRecord:
    """What the scheduler knows of one shard of a deployment, from its workers' telemetry."""

    deployment: str
    shard: int
    worker: str = ""
    stages_run: int = 0
    busy_seconds: float = 0.0
    #: Shared forward passes by how many experiments they ran (from the shards' batch events).
    shared_passes: dict[int, int] = field(default_factory=dict)
