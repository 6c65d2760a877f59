"""Experiments on a deployment: a graph becomes a chain of stage tasks pinned to shard workers.

Stage k's future is an argument of stage k+1, so Dask moves the carry (hidden states, values)
straight from one shard's worker to the next. The client only waits for the last stage, watching
the deployment: if a shard's worker dies, the chain is cancelled, the lost shard re-created, and
the experiment retried once; every experiment ends completed, failed or cancelled.
"""
from __future__ import annotations

import concurrent.futures
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from distributed import Client, Future, fire_and_forget
from distributed import wait as wait_futures
from distributed.client import FutureCancelledError

from .. import config
from ..actors import tasks
from ..actors.results import Results
from ..errors import ExperimentFailedError, NNsightDaskError
from ..execution.partition import assign_shards
from ..execution.stage import plan_stages
from ..graph.graph import InterventionGraph
from ..graph.validate import validate_graph
from ..models.shards import owner_of
from .deployment import dead_shards, get_deployment, recover, shard_specs

EVENTS = "nnsight-dask-experiments"
POLL_SECONDS = 0.2


class _WorkerLost(Exception):
    pass


class _Cancelled(Exception):
    pass


def new_experiment_id() -> str:
    return uuid.uuid4().hex[:12]


def check_graph(graph: InterventionGraph, module_paths: list[str] | None = None) -> None:
    """Refuse a graph before it is queued: malformed, forbidden op, local-only function, limits."""
    validate_graph(graph, module_paths=module_paths, remote=True, max_new_tokens=config.max_new_tokens_limit,
                   max_constant_bytes=config.max_inline_result_bytes)
    for run in graph.passes:
        if run.kind == "generate" and run.kwargs.get("do_sample"):
            raise ExperimentFailedError("remote generation is greedy; do_sample=True runs only locally")


def submit_stages(client: Client, record: dict[str, Any], graph: InterventionGraph, graph_json: str,
                  experiment: str) -> list[Future]:
    """Submit the experiment's chain of stages; the last future resolves to its :class:`Results`."""
    specs = shard_specs(record)
    shards = assign_shards(graph, lambda path: owner_of(specs, path), len(specs))
    stages = plan_stages(graph, shards, len(specs))
    futures: list[Future] = []
    previous: Future | None = None
    for position, stage in enumerate(stages):
        worker = record["shards"][stage.shard]["worker"]
        previous = client.submit(
            tasks.run_stage, record["name"], stage.shard, experiment, stage, graph_json, previous,
            position == len(stages) - 1, key=f"nnsight-{experiment}-{position:03d}-{stage.label}",
            workers=[worker], allow_other_workers=False, pure=False)
        futures.append(previous)
    return futures


def run_experiment(client: Client, name: str, graph: InterventionGraph, *, module_paths: list[str] | None = None,
                   user: str | None = None, cancelled: threading.Event | None = None,
                   on_status: Callable[[str, dict[str, Any]], None] | None = None,
                   timeout: float | None = None) -> Results:
    """Run ``graph`` on deployment ``name`` and return its results (blocking)."""
    check_graph(graph, module_paths)
    graph_json = graph.to_json()
    experiment = new_experiment_id()
    timeout = timeout if timeout is not None else config.experiment_timeout
    notify = on_status or (lambda status, info: None)
    _log(client, experiment, name, "queued", user=user)
    notify("queued", {"experiment": experiment})
    started = time.monotonic()
    record = get_deployment(client, name)
    for attempt in (0, 1):
        if dead_shards(client, record):
            record = recover(client, name)
        futures = submit_stages(client, record, graph, graph_json, experiment)
        notify("running", {"experiment": experiment, "stages": len(futures)})
        try:
            results = _wait(client, futures, record, started + timeout, cancelled, notify)
        except _WorkerLost:
            client.cancel(futures)
            _release(client, record, experiment)
            _discard(graph, experiment)
            if attempt == 1:
                _log(client, experiment, name, "failed", error="a shard's worker died twice")
                raise ExperimentFailedError(
                    f"experiment {experiment} on {name!r} failed: a shard's worker died during the run and "
                    "again during the retry", experiment=experiment) from None
            _log(client, experiment, name, "retrying", error="a shard's worker died")
            notify("retrying", {"experiment": experiment})
            record = recover(client, name)
            experiment = new_experiment_id()
            continue
        except _Cancelled:
            client.cancel(futures)
            _release(client, record, experiment)
            _discard(graph, experiment)
            _log(client, experiment, name, "cancelled")
            raise concurrent.futures.CancelledError(f"experiment {experiment} was cancelled") from None
        except BaseException as exc:
            client.cancel(futures)
            _release(client, record, experiment)
            _discard(graph, experiment)
            _log(client, experiment, name, "failed", error=f"{type(exc).__name__}: {exc}")
            raise
        try:
            finish_results(graph, results, experiment)
        except BaseException as exc:
            _discard(graph, experiment)
            _log(client, experiment, name, "failed", error=f"{type(exc).__name__}: {exc}")
            raise
        _log(client, experiment, name, "completed", seconds=time.monotonic() - started)
        notify("completed", {"experiment": experiment})
        return results
    raise AssertionError("unreachable")


def persisted_refs(value: Any) -> list[Any]:
    """Every :class:`~nnsight_dask.storage.TensorRef` in a result value (lists/dicts walked)."""
    from ..storage.ref import TensorRef

    if isinstance(value, TensorRef):
        return [value]
    if isinstance(value, dict):
        return [r for v in value.values() for r in persisted_refs(v)]
    if isinstance(value, (list, tuple)):
        return [r for v in value for r in persisted_refs(v)]
    return []


def finish_results(graph: InterventionGraph, results: Results, experiment: str) -> None:
    """After the last stage: refuse oversized inline results, then make persisted saves visible."""
    from ..actors.shard_actor import check_inline_size

    check_inline_size(results, graph.options)
    store = graph.options.get("store")
    if not store:
        return
    from ..storage import mark_complete

    names = [ref.path.split("/", 1)[1] for ref in persisted_refs(dict(results))]
    mark_complete(store, experiment, names=names, storage_options=graph.options.get("storage_options"))


def _discard(graph: InterventionGraph, experiment: str) -> None:
    """A failed, cancelled or retried experiment leaves nothing in the store (never anything complete)."""
    store = graph.options.get("store")
    if not store:
        return
    try:
        from ..storage import delete

        delete(store, experiment, storage_options=graph.options.get("storage_options"))
    except Exception:  # best effort: an incomplete group is invisible anyway, and cleanup() removes it
        pass


def _wait(client: Client, futures: list[Future], record: dict[str, Any], deadline: float,
          cancelled: threading.Event | None, notify: Callable[[str, dict[str, Any]], None]) -> Results:
    last = futures[-1]
    done_before = 0
    while True:
        try:
            # wait without fetching: a timed-out .result() cancels the Client's shared fetch for all threads
            if not wait_futures([last], timeout=POLL_SECONDS).done:
                raise TimeoutError
            result = last.result()
            if not isinstance(result, Results):
                raise ExperimentFailedError(f"the last stage returned {type(result).__name__}, not results")
            return result
        except TimeoutError:
            pass
        except FutureCancelledError:
            if dead_shards(client, record):
                raise _WorkerLost from None
            raise
        except Exception as exc:
            if type(exc).__name__ in ("KilledWorker", "ShardUnavailableError") or dead_shards(client, record):
                raise _WorkerLost from None
            raise
        if cancelled is not None and cancelled.is_set():
            raise _Cancelled
        if dead_shards(client, record):
            raise _WorkerLost
        if time.monotonic() > deadline:
            raise ExperimentFailedError(f"the experiment did not finish within {config.experiment_timeout:.0f} s "
                                        "(nnsight_dask.config.experiment_timeout)")
        done = sum(f.done() for f in futures)
        if done != done_before:
            done_before = done
            notify("running", {"stage": done, "stages": len(futures)})


def _release(client: Client, record: dict[str, Any], experiment: str) -> None:
    alive = set(client.scheduler_info(n_workers=-1)["workers"])
    for shard in record["shards"]:
        if shard["worker"] in alive:
            fire_and_forget(client.submit(tasks.release, record["name"], shard["index"], experiment,
                                          workers=[shard["worker"]], pure=False))


def _log(client: Client, experiment: str, deployment: str, status: str, **info: Any) -> None:
    try:
        client.log_event(EVENTS, {"experiment": experiment, "deployment": deployment, "status": status,
                                  "time": time.time(), **info})
    except Exception:  # monitoring must never fail an experiment
        pass


class ExperimentFuture(concurrent.futures.Future):  # type: ignore[type-arg]
    """A remote experiment running in the background; ``result()`` gives its :class:`Results`."""

    def __init__(self, client: Client, name: str, graph: InterventionGraph, **options: Any) -> None:
        super().__init__()
        self._cancel_event = threading.Event()
        self.set_running_or_notify_cancel()
        self._thread = threading.Thread(target=self._drive, args=(client, name, graph, options),
                                        name="nnsight-dask-experiment", daemon=True)
        self._thread.start()

    def _drive(self, client: Client, name: str, graph: InterventionGraph, options: dict[str, Any]) -> None:
        try:
            result = run_experiment(client, name, graph, cancelled=self._cancel_event, **options)
        except concurrent.futures.CancelledError:
            with self._condition:
                self._state = "CANCELLED_AND_NOTIFIED"
                self._condition.notify_all()
            self._invoke_callbacks()
        except BaseException as exc:
            self.set_exception(exc)
        else:
            self.set_result(result)

    def cancel(self) -> bool:
        """Stop the experiment: its queued and running stages are cancelled on the cluster."""
        if self.done():
            return False
        self._cancel_event.set()
        self._thread.join(timeout=10)
        return self.cancelled()


__all__ = ["ExperimentFuture", "NNsightDaskError", "check_graph", "run_experiment", "submit_stages"]
