"""Summaries of py-spy profiles for ``bench/scale.py --profile``: top functions, and what each
process's samples were doing (activities), from py-spy's raw (collapsed-stack) files."""
from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

#: Frames that only wrap the work (thread and event-loop plumbing): left out of the inclusive ranking.
_WRAPPERS = ("threading.py", "asyncio/base_events.py", "asyncio/runners.py", "asyncio/events.py", "click/", "runpy",
             "multiprocessing/", "distributed/compatibility.py", "distributed/process.py", "distributed/cli/",
             "concurrent/futures/thread.py", "tornado/ioloop.py", "<string>", "scale.py")


def summarize_profile(path: str, top: int = 12) -> dict[str, Any]:
    """From py-spy's raw (collapsed) stacks: samples, and the top functions by self % and by inclusive %
    (plumbing left out)."""
    by_self: collections.Counter = collections.Counter()
    by_incl: collections.Counter = collections.Counter()
    total = 0
    try:
        text = Path(path).read_text()
    except OSError:
        return {"samples": 0, "self": [], "inclusive": []}
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame(f) for f in stack.split(";")]
        by_self[frames[-1][0]] += n
        for name in {name for name, where in frames if not any(w in where for w in _WRAPPERS)}:
            by_incl[name] += n
    as_pct = lambda c: [(k, 100.0 * v / total) for k, v in c.most_common(top)]  # noqa: E731
    return {"samples": total, "self": as_pct(by_self), "inclusive": as_pct(by_incl)}


def _frame(frame: str) -> tuple[str, str]:
    """'func (/path/site-packages/pkg/module.py:123)' -> ('func (pkg/module.py)', 'pkg/module.py')."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3.11/", "nnsight_dask/"):
        if marker in where:
            where = ("nnsight_dask/" if marker == "nnsight_dask/" else "") + where.split(marker, 1)[1]
            break
    return f"{name} ({where})", where


#: What a sample was doing, by process kind: the first rule with a frame matching one of its
#: substrings wins (so the order matters: specific before generic).
ACTIVITIES: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "client": [
        ("check_graph before submitting", ("check_graph",)),
        ("dead_shards polling (scheduler_info RPC)", ("dead_shards", "_update_scheduler_info")),
        ("submit the stage tasks", ("launch_route", "Client.submit", "_graph_to_futures")),
        ("fetch the result from the last worker", ("get_data_from_worker", "Client._gather")),
        ("rest of run_experiment", ("run_experiment",)),
        ("record the trace (tracing/)", ("nnsight_dask/tracing/",)),
        ("gateway (HTTP, dispatch)", ("nnsight_dask/service/",)),
        ("comms: read/write, (de)serialize", ("TCP.read", "TCP.write", "iostream", "distributed/protocol/")),
        ("event loop plumbing", ("asyncio/", "tornado/", "selectors.py")),
    ],
    "scheduler": [
        ("update_graph (new tasks)", ("Scheduler.update_graph",)),
        ("task finished, transitions, releases", ("handle_task_finished", "stimulus_task_finished", "_transition",
                                                  "client_releases_keys")),
        ("nnsight monitor plugin", ("scheduler/monitor.py",)),
        ("worker heartbeats", ("heartbeat_worker",)),
        ("streams from clients/workers: read, decode", ("handle_stream",)),
        ("RPC comms (scheduler_info, ...): read, write", ("Server._handle_comm",)),
        ("batched sends", ("BatchedSend",)),
        ("periodic (system monitor, idle checks)", ("SystemMonitor", "PeriodicCallback", "_measure_tick")),
        ("event loop plumbing", ("asyncio/", "tornado/", "selectors.py")),
    ],
    "worker": [
        ("stage: decode + validate the graph", ("ShardActor._admit", "ShardActor._start")),
        ("stage: forward pass (hooks, layers)", ("ShardRunner.forward",)),
        ("stage: rest of run_stage", ("run_stage",)),
        ("Dask's own profiler thread", ("distributed/profile.py",)),
        ("fetch carry from previous worker", ("Worker.gather_dep", "get_data_from_worker")),
        ("serve carry to next worker / client", ("Worker.get_data",)),
        ("worker state machine", ("handle_stimulus", "worker_state_machine", "Worker.handle_scheduler")),
        ("stream to/from scheduler", ("BatchedSend", "handle_stream")),
        ("heartbeat, system monitor, metrics", ("heartbeat", "SystemMonitor", "digest_metric", "trigger_profile",
                                                "memory_monitor")),
        ("comms: read/write, (de)serialize", ("TCP.read", "TCP.write", "iostream", "distributed/protocol/")),
        ("event loop plumbing", ("asyncio/", "tornado/", "selectors.py")),
    ],
}


def activities(path: str, kind: str) -> list[tuple[str, float]]:
    """Shares of the samples in ``path`` by activity (:data:`ACTIVITIES`), largest first."""
    rules = ACTIVITIES.get(kind, [])
    counts: collections.Counter = collections.Counter()
    total = 0
    try:
        text = Path(path).read_text()
    except OSError:
        return []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        for label, keys in rules:
            if any(key in stack for key in keys):
                counts[label] += n
                break
        else:
            counts["other"] += n
    return [(label, 100.0 * n / total) for label, n in counts.most_common()] if total else []


def profile_kind(name: str) -> str:
    """'w3' -> 'worker'; 'client', 'client-2' (one of several client processes), 'runner' -> 'client'."""
    if name.startswith("w") and name[1:].isdigit():
        return "worker"
    return "client" if name.split("-")[0] in ("client", "runner") else name


def profile_report(profiles: list[tuple[str, dict, list]], top: int) -> str:
    lines = ["### profiles (py-spy --gil: samples of a thread holding the GIL)", "",
             "Per process: CPU ms per experiment (psutil), then what the samples were doing (share, and that share "
             "of the CPU ms), then the top functions by own time and by inclusive time (plumbing frames left out).", ""]
    for label, cell, files in profiles:
        lines.append(f"#### {label} ({cell['n']} experiments in the window, {cell['exp_s']:.1f} exp/s)")
        lines.append("")
        for name, path, *cpu_s in files:
            summary = summarize_profile(path, top)
            # this process's CPU in the window per experiment (older saved runs: its group's)
            cpu = (cpu_s[0] * 1e3 / cell["n"] if cpu_s and cell["n"] else
                   cell["cpu_ms"].get(name, float("nan")))
            shares = activities(path, profile_kind(name))
            lines.append(f"- **{name}** ({summary['samples']} samples; {cpu:.1f} CPU ms/exp; {path})")
            if shares:
                lines.append("  - activities: " + "; ".join(
                    f"{a} {p:.0f}%" + (f" ({p * cpu / 100:.1f} ms)" if cpu == cpu else "") for a, p in shares))
            lines.append("  - self: " + "; ".join(f"{f} {p:.0f}%" for f, p in summary["self"]))
            lines.append("  - inclusive: " + "; ".join(f"{f} {p:.0f}%" for f, p in summary["inclusive"]))
        lines.append("")
    return "\n".join(lines)
