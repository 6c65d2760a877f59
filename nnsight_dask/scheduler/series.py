"""Time series behind the Experiments page's plots, sampled once a second on the scheduler.

Why sampled: what the scheduler does per experiment bounds a deployment's throughput (the control
plane's cost per experiment, docs/scaling.md), so the monitor only notes each finished experiment
(one list append) and :class:`Series` turns those notes, the queue and the shards' busy time into
one point per deployment and shard in a periodic callback of the scheduler
(:data:`SAMPLE_SECONDS`). Browsers read the points; however many pages are open, none of them
adds work per experiment.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from .records import ShardRecord

SAMPLE_SECONDS = 1.0
#: Points kept per series: ten minutes at one a second.
KEEP = 600
#: Experiments per second and busy fractions are averages over this many seconds.
RATE_WINDOW = 5.0
#: p50 and p99 are over the experiments that finished within this many seconds.
LATENCY_WINDOW = 30.0


class Finished(NamedTuple):
    """One completed or failed experiment, as the monitor notes it (scheduler clock, seconds; a
    named tuple: the cheapest record to make per experiment)."""

    deployment: str
    ended: float
    #: From submission to the client's answer: what its user waited, queue included.
    latency: float
    #: From its first stage to the answer (the Prometheus histogram's measure).
    run_time: float


def _points() -> deque[float]:
    return deque(maxlen=KEEP)


@dataclass
class DeploymentSeries:
    """One deployment's points: experiments/s, latency percentiles and queue depth over time."""

    times: deque[float] = field(default_factory=_points)
    rate: deque[float] = field(default_factory=_points)
    p50: deque[float] = field(default_factory=_points)
    p99: deque[float] = field(default_factory=_points)
    queued: deque[float] = field(default_factory=_points)
    #: Finished experiments within ``LATENCY_WINDOW`` of the last point, oldest first.
    recent: deque[Finished] = field(default_factory=deque)


@dataclass
class ShardSeries:
    """One shard's busy fraction over time (each point: the fraction of the ``RATE_WINDOW`` before it)."""

    times: deque[float] = field(default_factory=_points)
    busy: deque[float] = field(default_factory=_points)
    #: (time, its busy seconds so far) over the last ``RATE_WINDOW``, oldest first.
    window: deque[tuple[float, float]] = field(default_factory=deque)


def percentile(sorted_values: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0 < q <= 1) of ascending values; NaN (a gap in a plot) if none."""
    if not sorted_values:
        return math.nan
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


class Series:
    """Points per deployment (:class:`DeploymentSeries`) and per shard (:class:`ShardSeries`)."""

    def __init__(self) -> None:
        self.deployments: dict[str, DeploymentSeries] = {}
        self.shards: dict[tuple[str, int], ShardSeries] = {}

    def sample(self, now: float, finished: Iterable[Finished], queued: dict[str, int],
               shards: dict[tuple[str, int], ShardRecord]) -> None:
        """Add one point per deployment at ``now`` from what finished since the last point, the
        experiments queued per deployment now, and the shards' busy seconds so far."""
        for item in finished:
            self._series(item.deployment).recent.append(item)
        for name in queued:
            self._series(name)
        for key in shards:
            self._series(key[0])
        for name, series in self.deployments.items():
            while series.recent and series.recent[0].ended <= now - LATENCY_WINDOW:
                series.recent.popleft()
            latencies = sorted(item.latency for item in series.recent)
            series.times.append(now)
            series.rate.append(sum(item.ended > now - RATE_WINDOW for item in series.recent) / RATE_WINDOW)
            series.p50.append(percentile(latencies, 0.5))
            series.p99.append(percentile(latencies, 0.99))
            series.queued.append(float(queued.get(name, 0)))
        for key, shard in shards.items():
            points = self.shards.get(key)
            if points is None:
                points = self.shards[key] = ShardSeries()
            window = points.window
            window.append((now, shard.busy_seconds))
            while len(window) > 1 and window[1][0] <= now - RATE_WINDOW:
                window.popleft()
            (first, busy_then), (_, busy_now) = window[0], window[-1]
            points.times.append(now)
            points.busy.append(min(1.0, max(0.0, (busy_now - busy_then) / max(now - first, SAMPLE_SECONDS))))

    def busy_fraction(self, shard: tuple[str, int]) -> float:
        """The fraction of the last ``RATE_WINDOW`` the shard spent running passes (0 if unknown)."""
        points = self.shards.get(shard)
        return points.busy[-1] if points is not None and points.busy else 0.0

    def _series(self, deployment: str) -> DeploymentSeries:
        series = self.deployments.get(deployment)
        if series is None:
            series = self.deployments[deployment] = DeploymentSeries()
        return series
