"""Shared timing helpers for the benchmarks in ``bench/``.

Measurements are interleaved round-robin (the order rotates every round) so that background load on
a shared machine hits every variant alike; results are medians, and differences between two variants
are medians of the per-round paired differences (less noisy than a difference of medians).
"""
from __future__ import annotations

import datetime
import gc
import os
import platform
import random
import sys
import warnings
import statistics
import subprocess
import time
from collections.abc import Callable


def use_this_checkout() -> str:
    """Set up a benchmark process; call it before importing torch. Libraries' logs and progress bars
    stay quiet, each process keeps to one OpenMP thread, and the package of this checkout is the one
    imported, here and in every process started from here (Dask workers, client processes), not
    whatever copy is pip-installed. Returns the checkout's root."""
    for name, value in (("TOKENIZERS_PARALLELISM", "false"), ("TRANSFORMERS_VERBOSITY", "error"),
                        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("OMP_NUM_THREADS", "1")):
        os.environ.setdefault(name, value)
    warnings.simplefilter("ignore")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, repo)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    return repo


def interleaved(variants: dict[str, Callable[[], object]], *, budget_s: float, min_rounds: int = 5,
                max_rounds: int = 1000, warmup: int = 2,
                clock: Callable[[], float] = time.perf_counter,
                shuffle: random.Random | None = None) -> dict[str, list[float]]:
    """Time each variant round-robin; return per-variant lists of seconds (one entry per round).

    The number of rounds is chosen from ``budget_s`` using the warm-up timings, clamped to
    ``[min_rounds, max_rounds]``. ``clock`` reads the time (``time.process_time``: CPU seconds of the
    process, which waiting for a core on a loaded machine does not add to).

    Each round starts one variant later (rotation), so each variant keeps the same neighbour before
    it in most rounds; a variant that runs right after a similar one finds the code it runs still in
    the CPU's caches. ``shuffle`` (a seeded ``random.Random``) orders every round at random instead.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    # Per-round cost estimated from one more pass over every variant.
    t0 = time.perf_counter()
    for name in names:
        variants[name]()
    round_s = max(time.perf_counter() - t0, 1e-9)
    rounds = int(min(max_rounds, max(min_rounds, budget_s / round_s)))
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    for r in range(rounds):
        k = r % len(names)
        order = names[k:] + names[:k]
        if shuffle is not None:
            shuffle.shuffle(order)
        for name in order:
            fn = variants[name]
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return times


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def paired_diff_ms(a: list[float], b: list[float]) -> float:
    """Median over rounds of ``a[i] - b[i]`` in ms (a and b measured in the same rounds)."""
    return statistics.median(x - y for x, y in zip(a, b)) * 1e3


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip() or "?"
    except Exception:
        return "?"


def today() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M")


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub-markdown table (also readable as plain text)."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    def fmt(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [fmt(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out.extend(fmt(r) for r in rows)
    return "\n".join(out)


def ratio_ci(a: list[float], b: list[float], *, n: int = 400, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Bootstrap CI (resampling rounds, paired) of ``median(a) / median(b)``."""
    import random

    rng = random.Random(seed)
    idx = range(len(a))
    ratios = []
    for _ in range(n):
        pick = rng.choices(idx, k=len(a))
        ratios.append(statistics.median(a[i] for i in pick) / statistics.median(b[i] for i in pick))
    ratios.sort()
    lo = ratios[int((1 - level) / 2 * n)]
    hi = ratios[min(n - 1, int((1 + level) / 2 * n))]
    return lo, hi
