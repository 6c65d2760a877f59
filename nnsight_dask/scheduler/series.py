"""Time series behind the Experiments page's plots, sampled once a second on the scheduler.

Why sampled: what the scheduler does per experiment bounds a deployment's throughput (the control
plane's cost per experiment, docs/scaling.md), so the monitor only notes each finished experiment
(one list append) and :class:`Series` turns those notes, the queue and the shards' busy time into
one point per deployment and shard in a periodic callback of the scheduler
(:data:`SAMPLE_SECONDS`). Latency percentiles come from counts per bucket
(:class:`LatencyWindow`), so a point costs the buckets in use, not the experiments in its window.
Browsers read the points; however many pages are open, none of them adds work per experiment.
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
LATENCY_WINDOW = 10.0
#: Latencies are counted in buckets this much wider than the one before: percentiles within 2.5 %.
BUCKET_RATIO = 1.05
#: Latencies up to this many seconds share the first bucket.
SHORTEST = 1e-4


class Finished(NamedTuple):
    """One completed or failed experiment, as the monitor notes it (seconds; a named tuple: the
    cheapest record to make per experiment)."""

    deployment: str
    #: From submission to the client's answer: what its user waited, queue included.
    latency: float
    #: From its first stage to the answer (the Prometheus histogram's measure).
    run_time: float


def _points() -> deque[float]:
    return deque(maxlen=KEEP)


def bucket(seconds: float) -> int:
    """The latency bucket of ``seconds``: bucket ``i`` holds ``SHORTEST * BUCKET_RATIO**i`` up to the next."""
    return int(math.log(max(seconds, SHORTEST) / SHORTEST) / math.log(BUCKET_RATIO))


def bucket_value(index: int) -> float:
    """The middle (geometric) of bucket ``index``: what a percentile falling in it reads."""
    return SHORTEST * BUCKET_RATIO ** (index + 0.5)


class LatencyWindow:
    """Latencies of one deployment's experiments that finished within ``LATENCY_WINDOW``, as counts
    per bucket, one set of counts per point: a point costs the buckets in use, not the experiments in
    the window, so each experiment is touched twice (counted, then expired) however long it stays."""

    def __init__(self) -> None:
        #: Per point, oldest first: (time, counts per bucket, experiments).
        self.points: deque[tuple[float, dict[int, int], int]] = deque()
        self.counts: dict[int, int] = {}
        self.total = 0

    def add(self, now: float, latencies: list[float]) -> None:
        """The experiments finished since the last point (counted as finished at ``now``); forget
        those that finished ``LATENCY_WINDOW`` or more before ``now``."""
        counts: dict[int, int] = {}
        for seconds in latencies:
            index = bucket(seconds)
            counts[index] = counts.get(index, 0) + 1
        self.points.append((now, counts, len(latencies)))
        self._merge(counts, 1)
        while self.points and self.points[0][0] <= now - LATENCY_WINDOW:
            self._merge(self.points.popleft()[1], -1)

    def _merge(self, counts: dict[int, int], sign: int) -> None:
        for index, count in counts.items():
            left = self.counts.get(index, 0) + sign * count
            if left:
                self.counts[index] = left
            else:
                self.counts.pop(index, None)
            self.total += sign * count

    def finished_after(self, since: float) -> int:
        """Experiments counted at points after ``since``."""
        count = 0
        for when, _, finished in reversed(self.points):
            if when <= since:
                break
            count += finished
        return count

    def quantile(self, q: float) -> float:
        """The nearest-rank ``q`` quantile (0 < q <= 1) of the window; NaN (a gap in a plot) if empty."""
        if not self.total:
            return math.nan
        rank, seen = max(1, math.ceil(q * self.total)), 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return bucket_value(index)
        return bucket_value(max(self.counts))


@dataclass
class DeploymentSeries:
    """One deployment's points: experiments/s, latency percentiles and queue depth over time."""

    times: deque[float] = field(default_factory=_points)
    rate: deque[float] = field(default_factory=_points)
    p50: deque[float] = field(default_factory=_points)
    p99: deque[float] = field(default_factory=_points)
    queued: deque[float] = field(default_factory=_points)
    latencies: LatencyWindow = field(default_factory=LatencyWindow)


@dataclass
class ShardSeries:
    """One shard's busy fraction over time (each point: the fraction of the ``RATE_WINDOW`` before it)."""

    times: deque[float] = field(default_factory=_points)
    busy: deque[float] = field(default_factory=_points)
    #: (time, its busy seconds so far) over the last ``RATE_WINDOW``, oldest first.
    window: deque[tuple[float, float]] = field(default_factory=deque)


class Series:
    """Points per deployment (:class:`DeploymentSeries`) and per shard (:class:`ShardSeries`)."""

    def __init__(self) -> None:
        self.deployments: dict[str, DeploymentSeries] = {}
        self.shards: dict[tuple[str, int], ShardSeries] = {}

    def sample(self, now: float, finished: Iterable[Finished], queued: dict[str, int],
               shards: dict[tuple[str, int], ShardRecord]) -> None:
        """Add one point per deployment at ``now`` from what finished since the last point, the
        experiments queued per deployment now, and the shards' busy seconds so far."""
        latencies: dict[str, list[float]] = {}
        for item in finished:
            latencies.setdefault(item.deployment, []).append(item.latency)
        for name in [*latencies, *queued, *(key[0] for key in shards)]:
            self._series(name)
        for name, series in self.deployments.items():
            series.latencies.add(now, latencies.get(name, []))
            series.times.append(now)
            series.rate.append(series.latencies.finished_after(now - RATE_WINDOW) / RATE_WINDOW)
            series.p50.append(series.latencies.quantile(0.5))
            series.p99.append(series.latencies.quantile(0.99))
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
