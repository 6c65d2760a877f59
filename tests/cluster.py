"""One cluster harness for the tests: a real LocalCluster with worker processes, bounded in time."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
