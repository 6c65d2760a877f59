"""Per-user admission of expensive requests, before their bodies are read.

A submission costs the gateway a body to hold, JSON to parse and a graph to decode and check, all
before it is known whether the graph is any good. Three per-user bounds keep one key holder from
spending that for everyone:

- **Submissions in progress** (:class:`Admission`): a user may have at most ``max_submitting`` bodies
  being read, parsed or validated at once; one more is answered ``429`` from its headers alone.
- **Refusals** (:class:`RefusalBudget`): every request answered with a refusal (``400``, ``403``,
  ``404``, ``413``, ``416``, ``422``) spends one token of the user's bucket, which refills at
  ``per_minute`` tokens a minute up to ``per_minute``; with no token left, the user's submissions are
  answered ``429`` (with ``Retry-After``) before their bodies are read. Refused requests cost no
  experiment quota, so without this nothing would bound how often they come.
- **The validation pool** (:class:`FairPool`): parsing and validating run in threads shared by all
  users in turn (the order of :class:`~.fairqueue.FairQueue`), each user holding at most
  ``per_user`` threads, so a user's pile of huge graphs waits in its own line while another user's
  graph takes the next free thread.
"""
from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import Any

from ...errors import NNsightDaskError
from .fairqueue import FairQueue


class Refused(NNsightDaskError):
    """A request refused before its body is read (HTTP 429); ``retry_after`` in seconds, or None."""


class RefusalBudget:
    """A token bucket per user, spent by refused requests (thread-safe)."""

    def __init__(self, per_minute: float) -> None:
        self.rate = max(float(per_minute), 1e-9) / 60.0
        self.capacity = max(float(per_minute), 1.0)
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # user -> (tokens, when)

    def _tokens(self, user: str, now: float) -> float:
        tokens, when = self._buckets.get(user, (self.capacity, now))
        return min(self.capacity, tokens + (now - when) * self.rate)

    def spend(self, user: str) -> None:
        """Count one refused request of ``user``."""
        now = time.monotonic()
        with self._lock:
            self._buckets[user] = (self._tokens(user, now) - 1.0, now)

    def wait(self, user: str) -> float:
        """Seconds until ``user`` has a whole token again (0: the user may be served now)."""
        with self._lock:
            tokens = self._tokens(user, time.monotonic())
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate


class Admission:
    """Which submissions may start reading their bodies (see the module docstring; thread-safe)."""

    def __init__(self, max_submitting: int, refusals_per_minute: float) -> None:
        self.max_submitting = max(1, int(max_submitting))
        self.refusals = RefusalBudget(refusals_per_minute)
        self._lock = threading.Lock()
        self._submitting: dict[str, int] = {}

    def submitting(self, user: str) -> int:
        with self._lock:
            return self._submitting.get(user, 0)

    def begin(self, user: str, active: int, max_concurrent: int) -> None:
        """Admit one submission of ``user``, who has ``active`` experiments queued or running; raise
        :class:`Refused` (nothing held) when the user is over a bound."""
        wait = self.refusals.wait(user)
        if wait > 0:
            raise Refused(f"user {user!r} sent too many requests the gateway refused (400/403/404/413/422); "
                          f"submissions are accepted again in {wait:.0f} s (gateway-refusals-per-minute = "
                          f"{self.refusals.capacity:g})", limit="refusals_per_minute", retry_after=wait)
        with self._lock:
            held = self._submitting.get(user, 0)
            if held >= self.max_submitting:
                raise Refused(f"user {user!r} already has {held} submission(s) being read or validated, the most "
                              f"allowed (gateway-max-submitting-per-user = {self.max_submitting}); wait for "
                              "their answers", limit="max_submitting", value=self.max_submitting, retry_after=1.0)
            if active + held >= max_concurrent:
                raise Refused(f"user {user!r} already has {active} experiment(s) queued or running and {held} being "
                              f"submitted, the most allowed (max_concurrent = {max_concurrent} in the gateway's "
                              "keys.toml); wait for one to finish", limit="max_concurrent", value=max_concurrent,
                              retry_after=None)
            self._submitting[user] = held + 1

    def end(self, user: str) -> None:
        """A submission admitted by :meth:`begin` was answered (or its client left)."""
        with self._lock:
            held = self._submitting.get(user, 0) - 1
            if held > 0:
                self._submitting[user] = held
            else:
                self._submitting.pop(user, None)


class FairPool:
    """Worker threads shared by users in turn (see the module docstring).

    :meth:`submit` queues a call in its user's line; a free thread takes the next call in
    :class:`~.fairqueue.FairQueue` order, skipping users who already hold ``per_user`` threads.
    """

    def __init__(self, workers: int, per_user: int = 1, name: str = "nnsight-gateway-validate") -> None:
        self.per_user = max(1, int(per_user))
        self._cond = threading.Condition()
        self._queue: FairQueue[_Call] = FairQueue()
        self._running: dict[str, int] = {}
        self._stopping = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(max(1, int(workers)))]
        for thread in self._threads:
            thread.start()

    def submit(self, user: str, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        call = _Call(user, fn, args)
        with self._cond:
            if self._stopping:
                raise RuntimeError("the gateway's validation pool is shut down")
            self._queue.push(user, call)
            self._cond.notify_all()
        return call.future

    def shutdown(self) -> None:
        """Stop the threads once the calls queued so far have run."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)

    def _work(self) -> None:
        while True:
            with self._cond:
                while True:
                    call = self._queue.pop(self._running, self.per_user)
                    if call is not None:
                        break
                    if self._stopping and not len(self._queue):
                        return
                    self._cond.wait()
                self._running[call.user] = self._running.get(call.user, 0) + 1
            try:
                call.run()
            finally:
                with self._cond:
                    left = self._running[call.user] - 1
                    if left:
                        self._running[call.user] = left
                    else:
                        del self._running[call.user]
                    self._cond.notify_all()  # the user's next call may go now


class _Call:
    __slots__ = ("user", "fn", "args", "future")

    def __init__(self, user: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.user, self.fn, self.args = user, fn, args
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            self.future.set_result(self.fn(*self.args))
        except BaseException as exc:
            self.future.set_exception(exc)


__all__ = ["Admission", "FairPool", "RefusalBudget", "Refused"]
