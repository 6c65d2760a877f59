"""The bounds a shard puts on each operation and each experiment, from what its worker can do.

A shard sizes every op before it allocates (:mod:`nnsight_dask.graph.allocation`); the deployment's
:class:`~nnsight_dask.graph.policy.Policy` sets the bounds where it names them, and the rest are
derived on the worker from its measured speed and its memory. What a graph may ask of a deployment
at all (checked in the client, the gateway and the shards) is :mod:`nnsight_dask.limits`.
"""
from __future__ import annotations

import psutil
import torch
from distributed import get_worker

from .. import config
from ..graph.allocation import OpBounds, measured_rates
from ..graph.policy import Policy


def op_bounds(policy: Policy, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              memory_limit: int | None = None) -> OpBounds:
    """The bounds on each operation and each experiment of a shard on ``device``: the deployment's
    policy where it sets them, else derived here, on the worker, from what it can do: its measured
    speed (``nnsight-dask.op-seconds`` of it per operation) and its memory
    (``nnsight-dask.experiment-memory-fraction`` of ``memory_limit``, the worker's memory limit, or of
    the GPU's memory; without either, of the machine's)."""
    work_rate, item_rate = measured_rates(device, dtype)
    seconds = float(config.op_seconds)
    return OpBounds(
        max_tensor_bytes=policy.max_tensor_bytes,
        max_op_work=policy.max_op_work if policy.max_op_work is not None else work_rate * seconds,
        max_op_items=policy.max_op_items if policy.max_op_items is not None else max(int(item_rate * seconds), 1),
        max_experiment_bytes=policy.max_experiment_bytes if policy.max_experiment_bytes is not None
        else _memory_share(torch.device(device), memory_limit),
        work_rate=work_rate, item_rate=item_rate)


def _memory_share(device: torch.device, memory_limit: int | None) -> int:
    """``experiment-memory-fraction`` of the memory a shard's tensors live in."""
    fraction = float(config.experiment_memory_fraction)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * fraction)
    if not memory_limit:
        try:
            memory_limit = get_worker().memory_manager.memory_limit
        except (ValueError, AttributeError):  # not in a task of a worker (unit tests build shards directly)
            memory_limit = None
    return int((memory_limit or psutil.virtual_memory().total) * fraction)
