"""Every default in one place. Override by assigning, e.g. ``nnsight_dask.config.persist_threshold = 4 << 20``."""
from __future__ import annotations

import os
import getpass
from pathlib import Path

#: Where converted model weights (e.g. SmolLM2 from GGUF to safetensors) are cached.
cache_dir: Path = Path(os.environ.get("NNSIGHT_DASK_CACHE", Path.home() / ".cache" / "nnsight-dask"))

#: Saved values larger than this many bytes are persisted to Zarr when a store is given.
persist_threshold: int = 1 << 20

#: Largest total of inline (non-persisted) result bytes a remote experiment may return.
max_inline_result_bytes: int = 256 << 20

#: Show progress of remote experiments and collect() in the terminal/notebook.
verbose: bool = True

#: Wall-time limit of one remote experiment, in seconds.
experiment_timeout: float = 600.0

#: Largest number of generation steps a remote experiment may ask for.
max_new_tokens_limit: int = 1024

#: Who submits remote experiments (shown on the dashboard's Experiments page).
user: str = os.environ.get("NNSIGHT_DASK_USER") or getpass.getuser()

#: Longest time (s) a client holds its messages to the scheduler before sending them. Dask batches a
#: client's messages for 10 ms, so an experiment submitted right after another one (whose futures were
#: just released) waits up to 10 ms before the scheduler even hears of it; remote traces shorten it
#: on the client they use. ``None`` leaves Dask's default.
client_batch_interval: float | None = 0.002

#: Most experiments one chain of stage tasks carries. Experiments in flight together from one process
#: (threads, ``blocking=False`` traces) share stage tasks once every shard of the deployment is busy;
#: each still runs alone on the shard, with its own state. ``1`` turns sharing off: every experiment
#: then leaves at once in a chain of its own.
max_batch_experiments: int = 8

#: Fetch remote results straight from the worker that holds them (one message less for the scheduler,
#: faster under load). Set ``False`` when clients cannot reach the workers' addresses; Dask also falls
#: back to fetching through the scheduler when a worker does not answer.
direct_results: bool = True
