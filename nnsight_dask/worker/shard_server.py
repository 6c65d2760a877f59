"""ShardServer: how one loaded shard serves experiments' stages. No Dask in it.

Stages arrive in batches (:meth:`ShardServer.submit_batch`, from the worker's router on its event
loop) and wait in the shard's queue (:mod:`.stage_queue`); the shard's compute thread serves
everything waiting whenever it is free: experiments that may share a pass run as one co-tenant
forward pass (:mod:`..execution.cotenancy`), each with its own state and rows, the others alone.

At an experiment's first stage here the server admits it: a graph from outside (JSON) is decoded
and checked with this worker's settings and the deployment's policy (:mod:`nnsight_dask.limits`); a graph a
peer shard of its route already checked is trusted. It gets a Zarr sink when it asks for a store.

Stopping never waits for a running stage: :meth:`~ShardServer.release_many` and the flags set by
:meth:`~ShardServer.close` and :meth:`~ShardServer.retire` are read by the running stage, which sees
the stop flag (:mod:`.registry`) before its next decoder layer or intervention and ends with the
reason. What the shard tells the scheduler (passes run, who computes now) is in :mod:`.telemetry`.
"""
from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from ..errors import ExperimentFailedError
from ..execution.cotenancy import CoTenant, can_share, footprint
from ..execution.interleaver import ExperimentStopped
from ..execution.saves import collect_saves
from ..execution.shard_runner import ShardRunner, run_alone
from ..execution.shard_state import ExperimentState
from ..execution.stage import Carry, Stage
from ..graph.policy import Policy
from ..limits import check_graph, check_inline_size, decode_graph
from ..storage.results import ZarrSink
from . import registry, telemetry
from .op_bounds import op_bounds
from .registry import ShardClosedError, ShardStateLostError, ShardUnavailableError
from .results import Results
from .stage_queue import StageQueue, StageRequest

#: An experiment's state is dropped when untouched this long (its client vanished mid-way).
STALE_SECONDS = 600.0


class ShardServer:
    """Serves the stages of experiments on shard ``index`` of ``deployment`` (see the module docstring).

    Everything it needs comes in through the constructor: the shard's runner, the deployment's
    policy, the model's limits, the worker's memory limit and co-tenancy settings, how to announce
    who computes (``announcer``), and what to do when a retiring copy has served its last
    experiment (``on_retired``).
    """

    def __init__(self, runner: ShardRunner, deployment: str, index: int, policy: Policy, *,
                 context_length: int | None, vocab_size: int | None, memory_limit: int | None,
                 announcer: telemetry.RunningAnnouncer, batching: bool, max_batch: int, max_batch_tokens: int,
                 gather_s: float, on_retired: Callable[[], None]) -> None:
        self.runner = runner
        self.deployment = deployment
        self.index = index
        self.policy = policy
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.memory_limit = memory_limit
        self.announcer = announcer
        self.batching = batching
        self.max_batch_tokens = max_batch_tokens
        self.on_retired = on_retired
        self.queue = StageQueue(self._serve, max_batch, gather_s, name=f"nnsight-dask {deployment}/{index}")
        self.device, self.dtype = _device_and_dtype(runner.model)
        self.experiments: dict[str, ExperimentState] = {}
        #: Why the shard was closed on purpose (undeploy); its running stage stops with this reason.
        self.closed = ""
        #: Replaced by a copy on another worker: finishes the experiments it holds, takes no new one.
        self.retiring = False
        self.busy_seconds = 0.0
        self.stages_run = 0
        #: How many forward passes ran with each number of experiments in them (1: alone).
        self.batch_sizes: dict[int, int] = {}

    def close(self, reason: str | None = None) -> None:
        """Free every experiment's state; with ``reason`` (undeploy), the running stage stops before
        its next decoder layer and every later stage is refused, with that reason."""
        if reason:
            self.closed = reason
        self.experiments.clear()

    def retire(self) -> bool:
        """Take no new experiment; ``on_retired`` runs once the last one held leaves. Whether idle now."""
        self.retiring = True
        return not self.experiments

    def release_many(self, experiments: list[str]) -> int:
        """Forget the state of ``experiments`` (lock-free); returns how many were held here."""
        return sum(self._forget(experiment) for experiment in experiments)

    def run(self, experiment: str, stage: Stage, graph_json: str | None, carry: Carry | None,
            final: bool) -> Carry | Results:
        """Run one stage; ``graph_json`` comes with the experiment's first stage on this shard only.

        The stage waits in the shard's queue and may run in one forward pass with other experiments
        waiting there (:mod:`.stage_queue`). A stopped experiment (cancelled, timed out, undeployed)
        raises its reason, before the stage or from within it (see :meth:`_should_stop`).
        """
        self._raise_if_stopped(experiment)  # it may have been cancelled while its task waited
        request = StageRequest(experiment, stage, graph_json, carry, final)
        self.queue.run([request])
        if isinstance(request.outcome, BaseException):
            raise request.outcome
        return request.outcome  # type: ignore[no-any-return]

    def submit_batch(self, members: list[tuple[str, str | None]], stage: Stage,
                     carries: dict[str, Carry | None] | None, final: bool, checked: set[str] | None,
                     on_done: Callable[[dict[str, Any]], None]) -> None:
        """Queue ``stage`` for each ``(experiment, graph JSON)`` of a batch travelling together;
        ``on_done(answers)`` is called from the shard's compute thread once all are served.

        Answers each experiment with its next carry, its results (``final``) or the error that ended
        it here, so one member's error never stops the others. ``checked`` names the experiments whose
        graph a peer shard of their route already checked (this one only decodes those); the ones
        this shard checks are added to it, for the route's later shards.
        """
        trusted = checked if checked is not None else set()
        requests = [StageRequest(experiment, stage, graph_json, (carries or {}).get(experiment), final,
                                 checked=experiment in trusted) for experiment, graph_json in members]

        def served() -> None:
            if checked is not None:
                checked.update(r.experiment for r in requests if r.graph_json is not None
                               and not isinstance(r.outcome, BaseException))
            on_done({request.experiment: request.outcome for request in requests})
        self.queue.submit(requests, served)

    def run_batch(self, members: list[tuple[str, str | None]], stage: Stage,
                  carries: dict[str, Carry | None] | None, final: bool,
                  checked: set[str] | None = None) -> dict[str, Any]:
        """:meth:`submit_batch`, waiting for the answers (for callers on a thread of their own)."""
        answers: dict[str, Any] = {}
        served = threading.Event()

        def done(result: dict[str, Any]) -> None:
            answers.update(result)
            served.set()
        self.submit_batch(members, stage, carries, final, checked, done)
        served.wait()
        return answers

    def _serve(self, requests: list[StageRequest]) -> None:
        """Serve a group taken from the queue: experiments that may share a pass run in one (within
        ``max_batch_tokens``), the others alone. Every outcome is set here; nothing raises."""
        admitted: list[tuple[StageRequest, ExperimentState]] = []
        for request in requests:
            try:
                admitted.append((request, self._admit(request)))
            except BaseException as exc:
                self._forget(request.experiment)
                request.outcome = exc
        # a lone stage (the common case with one user) goes straight to its solo run
        together = [(r, s) for r, s in admitted if can_share(s, r.stage)] \
            if self.batching and len(admitted) > 1 else []
        groups = self._token_groups(together) if len(together) > 1 else []
        grouped = {id(r) for group in groups for r, _ in group}
        for request, state in admitted:
            if id(request) not in grouped:
                self._serve_alone(request, state)
        for group in groups:
            self._serve_together(group)

    def _token_groups(self, together: list[tuple[StageRequest, ExperimentState]]
                      ) -> list[list[tuple[StageRequest, ExperimentState]]]:
        """Split shareable requests, in queue order, into passes of at most ``max_batch_tokens``
        padded tokens; a group of one runs alone."""
        groups: list[list[tuple[StageRequest, ExperimentState]]] = [[]]
        rows = length = 0
        for request, state in together:
            request.carry = request.carry or Carry()
            member_rows, member_length = footprint(request.carry, state, request.stage)
            new_rows, new_length = rows + member_rows, max(length, member_length)
            if groups[-1] and new_rows * new_length > self.max_batch_tokens:
                groups.append([])
                new_rows, new_length = member_rows, member_length
            groups[-1].append((request, state))
            rows, length = new_rows, new_length
        return [group for group in groups if len(group) > 1]

    def _admit(self, request: StageRequest) -> ExperimentState:
        """The experiment's state for this stage: made (and its graph validated) at its first stage
        here, refused when the experiment was stopped or the shard moved or lost its state."""
        experiment = request.experiment
        self._raise_if_stopped(experiment)
        state = self.experiments.get(experiment)
        if state is None:
            if request.graph_json is None:
                raise ShardStateLostError(
                    f"shard {self.index} of {self.deployment!r} no longer holds experiment {experiment} "
                    "(it was restarted or the experiment was released); resubmit the experiment",
                    deployment=self.deployment, shard=self.index)
            if self.retiring:
                raise ShardUnavailableError(
                    f"shard {self.index} of {self.deployment!r} moved to another worker; resubmit the "
                    "experiment with the deployment's current record", deployment=self.deployment,
                    shard=self.index)
            self._drop_stale()
            state = self._start(experiment, request.graph_json, request.checked)
            state.should_stop = self._should_stop(experiment, state)
            self.experiments[experiment] = state
        state.touched = time.monotonic()
        return state

    def _serve_alone(self, request: StageRequest, state: ExperimentState) -> None:
        experiment, stage = request.experiment, request.stage
        announcement = self.announcer.watch(experiment, self._others_waiting(experiment))
        started = time.perf_counter()
        try:
            carry = run_alone(self.runner, state, stage, request.carry if request.carry is not None else Carry())
            self._raise_if_stopped(experiment)  # stopped during the stage's last layer
            request.outcome = self._after(request, state, carry)
        except ExperimentStopped as stop:
            self._forget(experiment)
            request.outcome = _fresh(stop.error)
        except BaseException as exc:
            self._forget(experiment)
            request.outcome = exc
        finally:
            announcement.cancel()
            self._record([request], started)

    def _serve_together(self, group: list[tuple[StageRequest, ExperimentState]]) -> None:
        members = [CoTenant(state, request.stage, request.carry or Carry()) for request, state in group]
        announcements = [self.announcer.watch(request.experiment, True) for request, _ in group]
        started = time.perf_counter()
        try:
            self.runner.forward(members)
        finally:
            for announcement in announcements:
                announcement.cancel()
            self._record([request for request, _ in group], started)
        for (request, state), member in zip(group, members):
            outcome = member.outcome
            try:
                if isinstance(outcome, ExperimentStopped):
                    raise _fresh(outcome.error)
                if isinstance(outcome, BaseException):
                    raise outcome
                self._raise_if_stopped(request.experiment)
                request.outcome = self._after(request, state, outcome)  # type: ignore[arg-type]
            except BaseException as exc:
                self._forget(request.experiment)
                request.outcome = exc

    def _after(self, request: StageRequest, state: ExperimentState, carry: Carry) -> Carry | Results:
        """What a stage answers: the next carry, or (last stage) the results, checked for size."""
        if request.final or request.stage == state.last_stage:  # nothing more of it runs here
            self._forget(request.experiment)
        if request.final:
            results = Results(collect_saves(state.graph, carry.values), experiment_id=request.experiment,
                              logs=carry.logs)
            check_inline_size(results, state.graph.options, self.policy)
            return results
        return carry

    def _record(self, requests: list[StageRequest], started: float) -> None:
        """Count a pass of ``requests`` that began at ``started`` (``perf_counter``) and log it for the
        scheduler's monitor (sent in batches, see :mod:`.telemetry`)."""
        seconds = time.perf_counter() - started
        self.busy_seconds += seconds
        self.stages_run += 1
        self.batch_sizes[len(requests)] = self.batch_sizes.get(len(requests), 0) + 1
        start = telemetry.wall_clock(started)
        telemetry.PASSES.add(self.deployment, self.index,
                             [(request.experiment, request.stage.label) for request in requests],
                             start, start + seconds)

    def _start(self, experiment: str, graph_json: str, checked: bool = False) -> ExperimentState:
        """A new experiment's state here. Its graph is decoded (refusing oversized ones) and, unless a
        peer shard of its route already did, checked with this worker's settings and the deployment's
        policy (checking it on every shard cost each experiment about 0.7 ms of CPU per shard,
        docs/scaling.md)."""
        graph = decode_graph(graph_json)
        if not checked:
            check_graph(graph, policy=self.policy, context_length=self.context_length, vocab_size=self.vocab_size)
        return self.runner.start(graph, ZarrSink.from_options(graph.options, experiment),
                                 bounds=op_bounds(self.policy, self.device, self.dtype, self.memory_limit),
                                 vocab_size=self.vocab_size,
                                 max_prompt_tokens=self.policy.max_prompt_tokens or self.context_length)

    def _forget(self, experiment: str) -> bool:
        """Free an experiment's state (whether it was held); the one way experiments leave a shard, so
        a retiring copy leaves the registry with its last experiment whichever way that one ended."""
        held = self.experiments.pop(experiment, None) is not None
        if held and self.retiring and not self.experiments:
            self.on_retired()
        return held

    def _drop_stale(self) -> None:
        now = time.monotonic()
        for key in [k for k, s in list(self.experiments.items()) if now - s.touched > STALE_SECONDS]:
            self._forget(key)

    def _should_stop(self, experiment: str, state: ExperimentState) -> Any:
        """What the runner asks before every stage and decoder layer: the error to stop with, or None.

        Stopped when told to (:func:`.registry.stop`), when the shard was closed (undeploy), or when
        the experiment has run here longer than the deployment policy's ``timeout``.
        """
        timeout = float(self.policy.timeout or 0)
        deadline = state.started + timeout if timeout > 0 else None

        def should_stop() -> BaseException | None:
            error = registry.stopped(experiment)
            if error is not None:
                return error
            if self.closed:
                return ShardClosedError(self.closed, deployment=self.deployment, shard=self.index)
            if deadline is not None and time.monotonic() > deadline:
                return ExperimentFailedError(
                    f"experiment {experiment} ran longer than deployment {self.deployment!r} allows "
                    f"(its policy's timeout is {timeout:g} s); shard {self.index} stopped it", experiment=experiment)
            return None
        return should_stop

    def _raise_if_stopped(self, experiment: str) -> None:
        error = registry.stopped(experiment)
        if error is None and self.closed:
            error = ShardClosedError(self.closed, deployment=self.deployment, shard=self.index)
        if error is not None:
            self._forget(experiment)
            raise _fresh(error)

    def _others_waiting(self, experiment: str) -> bool:
        """Whether other experiments have state or stages waiting here (then who computes matters)."""
        return len(self.queue) > 0 or any(other != experiment for other in self.experiments)


def _device_and_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where and in what dtype the shard computes (its first parameter's), for its measured speed."""
    parameter = next(model.parameters(), None)
    if parameter is None:
        return torch.device("cpu"), torch.float32
    return parameter.device, parameter.dtype


def _fresh(error: BaseException) -> BaseException:
    """A copy of a stored error to raise (the stored one is shared by every stage that raises it)."""
    try:
        return copy.copy(error)
    except Exception:
        return error
