"""The monitor's series in Prometheus' text format: experiments by status, their run times, shared
passes by size, bytes returned and persisted. Served at ``/nnsight/metrics`` and, when
``prometheus_client`` is installed, within Dask's own ``/metrics``."""
from __future__ import annotations

from typing import Any

from .book import ExperimentBook
from .records import LATENCY_BUCKETS, STATUSES


def text(monitor: ExperimentBook) -> str:
    """Experiments by status, latency histogram, bytes returned/persisted (Prometheus text format)."""
    monitor.fold()  # the experiments finished since the last sample count too
    live: dict[str, int] = dict.fromkeys(STATUSES, 0)
    for record in monitor.experiments.values():
        live[monitor.live_status(record)] += 1
    lines = ["# HELP nnsight_dask_experiments Experiments by current status (queued/running now; finished ones kept).",
             "# TYPE nnsight_dask_experiments gauge"]
    lines += [f'nnsight_dask_experiments{{status="{s}"}} {live[s]}' for s in STATUSES]
    lines += ["# HELP nnsight_dask_experiments_total Experiments that reached each status since the scheduler started.",
              "# TYPE nnsight_dask_experiments_total counter"]
    lines += [f'nnsight_dask_experiments_total{{status="{s}"}} {monitor.totals[s]}' for s in STATUSES]
    lines += ["# HELP nnsight_dask_experiment_seconds Run time of completed and failed experiments.",
              "# TYPE nnsight_dask_experiment_seconds histogram"]
    cumulative = 0
    for bound, count in zip((*LATENCY_BUCKETS, "+Inf"), monitor.latencies):
        cumulative += count
        lines.append(f'nnsight_dask_experiment_seconds_bucket{{le="{bound}"}} {cumulative}')
    lines.append(f"nnsight_dask_experiment_seconds_sum {monitor.latency_sum}")
    lines.append(f"nnsight_dask_experiment_seconds_count {cumulative}")
    lines += ["# HELP nnsight_dask_shared_passes_total Forward passes shards ran for several experiments at once, "
              "by how many (co-tenant batching; passes run alone are not counted).",
              "# TYPE nnsight_dask_shared_passes_total counter"]
    lines += [f'nnsight_dask_shared_passes_total{{deployment="{d}",shard="{s}",size="{size}"}} {count}'
              for (d, s), r in sorted(monitor.shards.items()) for size, count in sorted(r.shared_passes.items())]
    for name, value in (("returned", monitor.bytes_returned_total), ("persisted", monitor.bytes_persisted_total)):
        lines += [f"# HELP nnsight_dask_bytes_{name}_total Bytes of saved values {name} (inline results / Zarr).",
                  f"# TYPE nnsight_dask_bytes_{name}_total counter", f"nnsight_dask_bytes_{name}_total {value}"]
    return "\n".join(lines) + "\n"


def register(monitor: ExperimentBook) -> None:
    """Our series in Dask's own ``/metrics`` (it serves prometheus_client's global registry)."""
    try:
        from prometheus_client import REGISTRY
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        return

    class Collector:
        def collect(self) -> Any:
            return text_string_to_metric_families(text(monitor))

        def describe(self) -> list[Any]:
            return []  # no fixed description: collected fresh on every scrape

    previous = getattr(REGISTRY, "_nnsight_collector", None)
    if previous is not None:
        REGISTRY.unregister(previous)
    collector = Collector()
    REGISTRY.register(collector)
    REGISTRY._nnsight_collector = collector  # type: ignore[attr-defined]
