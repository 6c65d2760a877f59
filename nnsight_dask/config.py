"""Settings, kept in ``dask.config`` under the ``nnsight-dask`` namespace.

Why dask.config: client, scheduler and workers each read their own copy, set the same ways (YAML
files, ``DASK_NNSIGHT_DASK__MAX_NEW_TOKENS_LIMIT=64`` environment variables, ``dask.config.set``),
and a ``LocalCluster``'s workers start with the config of the process that made them. So the
limits a worker enforces are the worker's, whatever a client sets for itself.

This module is the friendly front: ``nnsight_dask.config.persist_threshold = 4 << 20`` sets
``nnsight-dask.persist-threshold`` for this process, and reading the attribute reads it back.

>>> import nnsight_dask as nd
>>> nd.config.max_new_tokens_limit
1024
>>> import dask
>>> with dask.config.set({"nnsight-dask.max-new-tokens-limit": 64}):
...     nd.config.max_new_tokens_limit
64
"""
from __future__ import annotations

import getpass
import os
import sys
import types
from pathlib import Path
from typing import Any

import dask.config

NAMESPACE = "nnsight-dask"

#: Every setting with its default. Keys are the attribute names; in dask.config they are spelled
#: with dashes (``persist_threshold`` -> ``nnsight-dask.persist-threshold``).
DEFAULTS: dict[str, Any] = {
    #: Where converted model weights (e.g. SmolLM2 from GGUF to safetensors) are cached.
    "cache_dir": os.environ.get("NNSIGHT_DASK_CACHE") or str(Path.home() / ".cache" / "nnsight-dask"),
    #: Saved values larger than this many bytes are persisted to Zarr when a store is given.
    "persist_threshold": 1 << 20,
    #: Largest total of inline (non-persisted) result bytes a remote experiment may return; also the
    #: largest total of tensors a graph may carry in. Enforced by the shard that returns the results.
    "max_inline_result_bytes": 256 << 20,
    #: Show progress of remote experiments and collect() in the terminal/notebook.
    "verbose": True,
    #: Wall-time limit of one remote experiment, in seconds.
    "experiment_timeout": 600.0,
    #: Largest number of generation steps a remote experiment may ask for (checked on the shards).
    "max_new_tokens_limit": 1024,
    #: Seconds of a shard's measured speed one operation of a graph may take, where the deployment's
    #: policy sets no ``max_op_work``/``max_op_items``: an operation cannot be interrupted, so a cancelled
    #: experiment holds its shard at most about this long. Read by each worker.
    "op_seconds": 0.5,
    #: Share of a shard's memory (the worker's memory limit, or its GPU's) one experiment's values may
    #: hold at once, where the deployment's policy sets no ``max_experiment_bytes``. Read by each worker.
    "experiment_memory_fraction": 0.25,
    #: Who submits remote experiments (shown on the dashboard's Experiments page).
    "user": os.environ.get("NNSIGHT_DASK_USER") or getpass.getuser(),
    #: Longest time (s) a client holds its messages to the scheduler before sending them. Dask batches
    #: a client's messages for 10 ms, so an experiment submitted right after another one waits up to
    #: 10 ms before the scheduler even hears of it; remote traces shorten it on the client they use.
    #: ``None`` leaves Dask's default.
    "client_batch_interval": 0.002,
    #: Most experiments one route carries (a batch of experiments in flight together from one process:
    #: threads, ``blocking=False`` traces). They share the messages of the direct route and meet in
    #: the same co-tenant passes on the shards; each keeps its own state and rows. ``1`` turns sharing
    #: off: every experiment then leaves at once on a route of its own. As many as one co-tenant pass
    #: takes (``cotenant_max_batch``): with 8, a 1-shard deployment held 64 users of one process to
    #: 158-173 exp/s on the simulated GPU where 16 gave 240-252 (bench/scale.py, docs/scaling.md).
    "max_batch_experiments": 16,
    #: Routes one process keeps in flight per shard of a deployment before newcomers wait to leave
    #: together (with ``2``, the next batch already waits on a shard while it computes one).
    "max_routes_per_shard": 2,
    #: The HTTP gateway (``nnsight-dask gateway``): where it keeps its sqlite database of statuses and
    #: the inline results of completed experiments ("": ``<cache_dir>/gateway``).
    "gateway_state_dir": "",
    #: Where the gateway's users' persisted saves go, each under ``<store>/<user>/`` (an fsspec URL the
    #: workers and the gateway both reach; "": ``<gateway_state_dir>/store``, for workers on the gateway's disk).
    "gateway_result_store": "",
    #: Largest request body the gateway reads (a graph with its constants); larger ones answer 413.
    "gateway_max_body_bytes": 16 << 20,
    #: Most JSON values (counted by their marks ``[{,:``) a body, or a graph sent as text, may hold:
    #: parsing holds the interpreter lock, ~0.2-0.4 us a value. More answer 413 unparsed.
    "gateway_max_json_values": 1_000_000,
    #: Seconds a connection has to send a request's headers (and may stay idle between requests).
    "gateway_header_timeout": 10.0,
    #: Seconds a request body has to arrive.
    "gateway_body_timeout": 30.0,
    #: Connections without a valid key yet open at once; a new one beyond closes the oldest of them
    #: (0: a quarter of the process's file descriptor limit, 16 to 1024).
    "gateway_max_unauthenticated": 0,
    #: Submissions of one user being read, parsed or validated at once; more answer 429 from their headers.
    "gateway_max_submitting_per_user": 2,
    #: Refused requests (400/403/404/413/416/422) a user may make per minute (and in a burst); past
    #: that, the user's submissions answer 429 before their bodies are read.
    "gateway_refusals_per_minute": 30,
    #: Threads that parse and validate submissions, taken by users in turn (one per user at a time).
    "gateway_validation_threads": 4,
    #: Experiments the gateway runs at once on one deployment; the rest wait in its fair queue, so a
    #: newly arrived user's experiment waits for about as long as these take. They travel and share
    #: passes together on the shards (routes of up to ``max_batch_experiments`` each), so they finish
    #: together: 8 held 64 users to 12 exp/s on the simulated-GPU deployment where 32 gave 59
    #: (bench/scale.py --mode gateway, docs/scaling.md); 64 fills routes of 16 (``max_batch_experiments``)
    #: and cost 8% less CPU per experiment than 32 (11.0 against 12.2 ms, all processes summed).
    "gateway_max_in_flight": 64,
    #: Of those, the most one user's experiments may hold: a user alone never fills the deployment, so
    #: another user's experiment usually starts at once instead of after a batch.
    "gateway_max_in_flight_per_user": 2,
    #: A user's experiments queued or running at once, when keys.toml gives no ``max_concurrent``.
    "gateway_max_concurrent": 4,
    #: Shards run the stages waiting for them together, as one forward pass (co-tenant batching). Read
    #: by each worker when it loads a shard: the cluster decides, not the client. ``False``: every
    #: experiment runs alone (bit-exact with a solo run; a trace can ask for that with ``batching=False``).
    "cotenant_batching": True,
    #: Most experiments in one co-tenant forward pass.
    "cotenant_max_batch": 16,
    #: Most padded tokens (rows x longest sequence) in one co-tenant forward pass.
    "cotenant_max_tokens": 16384,
    #: Under load, how long (ms) a shard that has just become free may wait for as many stages as its
    #: previous pass held before starting the next one: stages of a group return to clients together
    #: and come back a few ms apart, and starting on the first alone splits the group for good. Only
    #: after a shared pass (within the last second); a lone experiment never waits. ``0``: never wait.
    "cotenant_gather_ms": 20,
    #: Send experiments straight to the first shard's worker, and take their results from it (the
    #: direct route: no scheduler on an experiment's path). ``False``: through the scheduler, for
    #: clients that cannot reach the workers' addresses (each message then costs the scheduler CPU).
    "direct_to_workers": True,
    #: After a ``trace``/``generate``/``session`` block has run, the caller's local names bound to saved
    #: proxies are rebound to the values (nnsight 0.4's frame injection); proxies inside lists and
    #: dicts keep ``.value``. ``False`` leaves every saved proxy a proxy.
    "frame_injection": True,
    #: Shards may load checkpoints that bring their own Python code (``nd.serve(..., load_options=
    #: {"trust_remote_code": True})``, or an ``attn_implementation`` fetched from the hub): that code runs
    #: on the workers with their files and credentials. Read by each worker when it loads a shard: the
    #: operator decides, not the client.
    "trust_remote_code": False,
}

dask.config.update_defaults({NAMESPACE: {_name.replace("_", "-"): _value for _name, _value in DEFAULTS.items()}})


def key(name: str) -> str:
    """The dask.config key of setting ``name``: ``persist_threshold`` -> ``nnsight-dask.persist-threshold``."""
    return f"{NAMESPACE}.{name.replace('_', '-')}"


def get(name: str) -> Any:
    """The current value of setting ``name`` in this process."""
    if name not in DEFAULTS:
        raise AttributeError(f"nnsight_dask.config has no setting {name!r}; settings: {sorted(DEFAULTS)}")
    value = dask.config.get(key(name), DEFAULTS[name])
    return Path(value) if name == "cache_dir" else value


class _Settings(types.ModuleType):
    """Module attributes that read and write dask.config (see the module docstring)."""

    def __getattr__(self, name: str) -> Any:
        if name in DEFAULTS:
            return get(name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in DEFAULTS:
            dask.config.set({key(name): str(value) if isinstance(value, Path) else value})
        else:
            super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *DEFAULTS})


sys.modules[__name__].__class__ = _Settings
