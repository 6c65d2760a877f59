"""One cluster harness for the tests: a real LocalCluster with worker processes, bounded in time."""
from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

from distributed import Client, LocalCluster


@contextlib.contextmanager
def local_cluster(n_workers: int = 2, threads: int = 1) -> Iterator[Client]:
    """A LocalCluster of ``n_workers`` worker processes (with nannies) and a client. Workers run
    ``threads`` Dask threads (stages waiting for a shard meet in its queue only with several) and
    one torch thread each."""
    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads, processes=True, dashboard_address=":0",
                           env={"OMP_NUM_THREADS": "1", "NNSIGHT_DASK_TORCH_THREADS": "1"})
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def route_by_hand(client: Client, record: Any, graphs: dict[str, str], stages: list[Any],
                  carries: dict[str, Any] | None = None, checked: set[str] | None = None) -> dict[str, Any]:
    """Send experiments straight to the first stage's shard worker on the direct route, as a client
    of another version (or a hostile one) could, skipping every check of ours on the client side;
    the outcome by experiment."""
    from distributed.protocol import to_serialize

    from nnsight_dask.worker.hop import Hop
    from nnsight_dask.worker.serialization import register

    register()
    workers = {shard.index: shard.worker for shard in record.shards}
    hop = Hop(route=f"by-hand-{uuid.uuid4().hex[:6]}", origin=workers[stages[0].shard], deployment=record.name,
              stages=list(stages), workers=workers, graphs=dict(graphs),
              carries=dict(carries) if carries is not None else dict.fromkeys(graphs), checked=set(checked or ()))
    answer = client.sync(client.rpc(hop.origin).nnsight_dask_route, hop=to_serialize(hop))
    return answer["outcome"].answers
