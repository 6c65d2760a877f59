"""Running a finished recording on a backend and handing the saved values to their proxies.

A tracer or a session decides *how* its recording runs (:class:`RunRequest`); the model decides
*where* (:meth:`~.traceable.Traceable.backend_for`); this module does the rest, the same way for both.
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ..backends.base import RunResult
from .recorder import Recorder
from .scanning import typed_intervention_error
from .traceable import Traceable


@dataclass(frozen=True)
class RunRequest:
    """How a recording runs: ``remote`` (passed to the model's ``backend_for``), ``scan_first``
    (a fake run first, so errors surface with their type before the model runs), ``fake_only`` (only
    the fake run: saves are fake tensors), ``blocking`` (False: return a future) and the backend's
    ``options`` (e.g. ``verbose``)."""

    remote: Any = None
    scan_first: bool = False
    fake_only: bool = False
    blocking: bool = True
    options: dict[str, Any] = field(default_factory=dict)


def run_recording(model: Traceable, recorder: Recorder, request: RunRequest,
                  deliver: Callable[[RunResult], None]) -> Future[Any] | None:
    """Run ``recorder``'s graph as ``request`` says; ``deliver`` gets the result (and hands saved values
    to their proxies, see :func:`hand_out`). Returns the future of a non-blocking run, else ``None``.
    A failed run closes the recording: its proxies say they have no value."""
    graph = recorder.graph
    try:
        backend = model.backend_for(request.remote)
        if request.scan_first or request.fake_only:
            try:
                fake_result = backend.scan(graph)
            except Exception as exc:
                typed = typed_intervention_error(exc)
                if typed is exc:
                    raise
                raise typed.with_traceback(exc.__traceback__) from None
            if request.fake_only:
                recorder.finish(fake_result.saves)
                return None
        if not request.blocking:
            future = backend.submit(graph, deliver=deliver)
            future.add_done_callback(lambda done: _close_unless_done(recorder, done))
            return future
        result = backend.run(graph, **request.options)
    except BaseException:
        recorder.close()
        raise
    deliver(result)
    return None


def hand_out(recorder: Recorder, result: RunResult) -> list[str]:
    """Give saved proxies their values and print the run's logs; returns the logs."""
    recorder.finish(result.saves)
    logs = list(result.logs)
    for line in logs:
        print(line)
    return logs


def _close_unless_done(recorder: Recorder, future: Future[Any]) -> None:
    """A cancelled or failed run hands out nothing: its proxies are closed."""
    if future.cancelled() or future.exception() is not None:
        recorder.close()
