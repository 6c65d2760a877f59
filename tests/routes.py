"""A route run by hand through in-process shards: what the workers' routers do, without a cluster."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from distributed.protocol import deserialize, serialize

from nnsight_dask.execution.stage import Stage
from nnsight_dask.worker.hop import Hop


def run_route(actors: list[Any], graphs: dict[str, str], stages: list[Stage],
              before_run: Callable[[Stage], None] | None = None) -> dict[str, Any]:
    """Run one batch (``{experiment: graph JSON}``) along ``stages`` through ``actors`` (by shard
    index), the hop crossing the wire (our serializer) between stages; the outcome by experiment."""
    hop = Hop(route="by-hand", origin="", deployment="", stages=list(stages), workers={},
              graphs=dict(graphs), carries=dict.fromkeys(graphs))
    while True:
        if before_run is not None:
            before_run(hop.stage)
        hop.record(actors[hop.stage.shard].server.run_batch(hop.members(), hop.stage, hop.carries, hop.final,
                                                           hop.checked))
        if hop.final or not hop.carries:
            return deserialize(*serialize(hop.outcome())).answers  # type: ignore[no-any-return]
        hop.step()
        hop = deserialize(*serialize(hop))
