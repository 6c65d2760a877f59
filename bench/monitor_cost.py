"""Scheduler CPU the experiment monitor spends per experiment, and what its once-a-second sampling costs.

The monitor runs in the scheduler's event loop, on every experiment's messages: one "submitted" and
one "finished" on the client's stream, and the experiment's passes in the shards' batched telemetry
(``{"passes": [...]}`` every 0.2 s). This drives a bare ``ExperimentMonitor`` through those same
hooks (no cluster, no network: only the monitor's own work is timed), then times ``sample()``, the
periodic callback behind the Experiments page's plots.

    python bench/monitor_cost.py                       # this checkout
    PYTHONPATH=/path/to/other/tree python bench/monitor_cost.py   # another version, to compare

It prints microseconds per experiment (its messages, and the run-time histogram wherever a version
counts it), and the sampling's cost per second (the histogram included) as a fraction of the
per-experiment cost at RATE experiments per second: what the plots add at that load.
"""
from __future__ import annotations

import argparse
import gc
import time

from nnsight_dask.scheduler import monitor
from nnsight_dask.worker.telemetry import STAGES_TOPIC


def drive(m: monitor.ExperimentMonitor, n: int, deployments: int, shards: int, per_pass: int) -> float:
    """Seconds the monitor spent on ``n`` experiments' messages, ``per_pass`` sharing each pass."""
    now = time.time()
    started = time.perf_counter()
    pending: list[dict] = []
    for i in range(n):
        deployment = f"d{i % deployments}"
        m.handle_message(client="c", event="submitted", experiment=f"e{i}", deployment=deployment, user="u",
                         stages=shards, shards=list(range(shards)), workers=[f"w{s}" for s in range(shards)])
        if (i + 1) % per_pass == 0:
            members = [f"e{j}" for j in range(i + 1 - per_pass, i + 1)]
            for shard in range(shards):
                pending.append({"deployment": deployment, "shard": shard, "experiments": members,
                                "labels": ["p0-t0-fwd-s0"] * per_pass, "start": now, "stop": now + 0.001,
                                "thread": 1})
            if len(pending) >= 50:  # one telemetry event carries many passes
                m.log_event(STAGES_TOPIC, {"worker": "w0", "passes": pending})
                pending = []
            for member in members:
                m.handle_message(client="c", event="finished", experiment=member, status="completed",
                                 bytes_returned=64)
    if pending:
        m.log_event(STAGES_TOPIC, {"worker": "w0", "passes": pending})
    if hasattr(m, "fold"):  # the run-time histogram, counted per experiment by older versions
        m.fold()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20000, help="experiments")
    parser.add_argument("--deployments", type=int, default=4)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-pass", type=int, default=8, help="experiments sharing each pass")
    parser.add_argument("--rate", type=float, default=200.0, help="experiments/s to weigh the sampling against")
    args = parser.parse_args()
    gc.disable()
    best = min(drive(monitor.ExperimentMonitor(), args.n, args.deployments, args.shards, args.per_pass)
               for _ in range(3))
    per_experiment = best / args.n
    print(f"monitor: {per_experiment * 1e6:.1f} us of scheduler CPU per experiment "
          f"({args.deployments} deployments x {args.shards} shards, {args.per_pass} experiments a pass)")
    if not hasattr(monitor.ExperimentMonitor(), "sample"):
        print("this version has no sampling (no plotted series)")
        return
    from nnsight_dask.scheduler.series import LATENCY_WINDOW

    clock = [time.time()]
    m = monitor.ExperimentMonitor(clock=lambda: clock[0])
    drive(m, args.n, args.deployments, args.shards, args.per_pass)
    per_tick = max(1, round(args.rate))
    warm, ticks, spent = int(LATENCY_WINDOW) + 2, 60, 0.0
    for tick in range(warm + ticks):  # RATE experiments/s, one sample a second; timed once in steady state
        for i in range(per_tick):
            clock[0] += 1 / per_tick
            experiment = f"s{tick}-{i}"
            m.handle_message(client="c", event="submitted", experiment=experiment, deployment=f"d{i % args.deployments}",
                             stages=1, shards=[0], workers=["w0"])
            m.handle_message(client="c", event="finished", experiment=experiment, status="completed")
        started = time.perf_counter()
        m.sample()
        if tick >= warm:
            spent += time.perf_counter() - started
    sample = spent / ticks
    print(f"sampling: {sample * 1e6:.0f} us per second at {args.rate:g} experiments/s = "
          f"{sample / (per_experiment * args.rate):.3f} x the monitor's per-experiment work in that second")

if __name__ == "__main__":
    main()
