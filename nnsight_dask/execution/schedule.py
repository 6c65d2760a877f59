"""Which node of a pass runs next: a countdown of missing arguments per instance, and the free
instances whose arguments all exist, in program order.

The :class:`~.plan.PassPlan` says what waits for what; a :class:`Schedule` is one run's progress
through it. It also knows when a ``stop()`` is due: a line's once every instance before it has a
value, a value's (``proxy.stop()``) once that value exists.
"""
from __future__ import annotations

import heapq
from typing import Any

from .plan import Key, PassPlan, node_id, order


class Schedule:
    """Progress of one pass; ``values`` are those that exist when it starts (earlier passes')."""

    def __init__(self, plan: PassPlan, values: dict[Key, Any]) -> None:
        self.plan = plan
        deps = plan.deps
        if values:  # earlier passes' values exist: what waits for them only does not wait
            self.pending = {key: sum(1 for dep in deps[key] if dep not in values) for key in plan.instances}
            free = plan.free
            heap = [(*order(key), key) for key in plan.instances if key in free and not self.pending[key]]
        else:
            self.pending = {key: len(deps[key]) for key in plan.instances}
            heap = [(*order(key), key) for key in plan.ready]
        #: Ready free instances as ``(node id, step, key)``, a heap (program order first); instances
        #: are in program order, so either list above is already one.
        self.heap = heap
        #: Whether the pass has a ``stop()`` (else :meth:`stop_due` needs no asking).
        self.has_stop = plan.stop_key is not None
        #: Instances before ``stop()`` still without a value (the stop is due at 0).
        self.before_stop = plan.before_stop
        self.stopped = False

    def done(self, key: Key) -> None:
        """``key`` has its value: count it off its dependents; free ones with nothing left are ready."""
        plan = self.plan
        stop = plan.stop_key
        if stop is not None and key in self.pending and node_id(key) < node_id(stop):
            self.before_stop -= 1
        dependents = plan.dependents.get(key)
        if dependents is None:
            return
        pending, free = self.pending, plan.free
        for dependent in dependents:
            left = pending[dependent] - 1
            pending[dependent] = left
            if left == 0 and dependent in free:
                heapq.heappush(self.heap, (dependent[0], dependent[1], dependent) if type(dependent) is tuple
                               else (dependent, -1, dependent))

    def next_ready(self, before: tuple[int, int] | None) -> Key | None:
        """The first ready free instance in program order (only one before ``before``), or None."""
        heap = self.heap
        if not heap or (before is not None and (heap[0][0], heap[0][1]) >= before):
            return None
        return heapq.heappop(heap)[2]

    def stop_due(self, before: tuple[int, int] | None = None) -> bool:
        """Whether ``stop()`` is due now (once: it answers True a single time); with ``before``, only
        a stop that comes before that point in program order (what precedes it may still run)."""
        stop = self.plan.stop_key
        if stop is None or self.stopped or (before is not None and order(stop) >= before):
            return False
        if self.before_stop > 0 if not self.plan.stop_on_value else self.pending[stop] > 0:
            return False
        self.stopped = True
        return True
