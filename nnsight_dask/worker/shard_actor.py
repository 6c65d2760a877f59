"""ShardActor: one shard of a deployed model, alive in a Dask actor on one worker.

The actor reads only its shard's weights (see :mod:`..models.shard_loading`) and registers itself in the worker's
process registry. Experiments reach it by the direct route (:mod:`.routing`): the worker's router
runs each batch of stages in one of the worker's threads, where it waits in the shard's queue
(:mod:`.stage_queue`); whatever waits together runs as one co-tenant forward pass
(:mod:`..execution.cotenancy`), each experiment with its own state and rows.

At an experiment's first stage here the shard validates its graph again, with this worker's
settings (:mod:`.limits`), and gives it a Zarr sink when it asks for a store.

Stopping never waits for the lock: :meth:`ShardActor.cancel`, :meth:`~ShardActor.release`,
:meth:`~ShardActor.close` and :meth:`~ShardActor.retire` are called from the worker's event loop
(the handlers of :mod:`.plugin`) while a stage may be running; the running stage sees the stop flag
(:mod:`.registry`) before its next decoder layer and ends with the reason. What the shard tells the
scheduler (passes run, who computes now) is in :mod:`.telemetry`.
"""
from __future__ import annotations

import copy
import os
import threading
import time
from typing import Any

import torch
from distributed import get_worker

from .. import config as settings
from ..errors import ExperimentFailedError
from ..execution.cotenancy import Member, can_share, footprint, forward_together
from ..execution.stage import (
    Carry,
    ExperimentState,
    ExperimentStopped,
    ShardRunner,
    Stage,
    collect_results,
)
from ..graph.graph import InterventionGraph
from ..graph.policy import Policy
from ..models import (
    ShardSpec,
    load_causal_lm,
    load_smollm2,
    owner_of,
    prepare_tokenizer,
)
from ..models.shard_loading import load_shard
from ..storage.results import ZarrSink
from ..tensors import nbytes
from . import registry, telemetry
from .limits import check_graph, check_inline_size, decode_graph, op_bounds
from .registry import (
    ExperimentCancelledError,
    ShardClosedError,
    ShardStateLostError,
    ShardUnavailableError,
)
from .results import Results
from .serialization import register as register_serializers
from .stage_queue import StageQueue, StageRequest

ModelSource = Any  # a path or hub id, "smollm2", or a callable returning (model, tokenizer)

#: Shards of one worker process load one at a time: transformers resolves its lazy top-level names
#: without a lock (two threads importing ``LlamaConfig`` at once can fail), and one load at a time
#: also bounds the worker's peak memory.
_LOADING = threading.Lock()

#: An experiment's state is dropped when untouched this long (its client vanished mid-way).
STALE_SECONDS = 600.0
#: A copy retired by rebalancing closes at the latest this long after, idle or not.
RETIRE_GRACE_SECONDS = 120.0


def load_source(source: ModelSource, dtype: torch.dtype | None = None, gguf_file: str | None = None) -> tuple[Any, Any]:
    """Build the whole ``(model, tokenizer)`` from a deployment's model source, on the worker.

    :func:`~nnsight_dask.models.shard_loading.load_shard` falls back to this when it cannot read a
    shard's weights alone (callables, GGUF files, hub ids).
    """
    if callable(source):
        return source()
    if source == "smollm2":
        return load_smollm2(dtype or torch.float32)
    return load_causal_lm(str(source), gguf_file=gguf_file, dtype=dtype)


def describe_model(model: torch.nn.Module, tokenizer: Any) -> dict[str, Any]:
    """What a client needs to trace without weights: config, module paths, the tokenizer (prepared
    here, on the worker, so every client pads the way the deployment does)."""
    config = getattr(model, "config", None)
    description: dict[str, Any] = {
        "config": config.to_dict() if config is not None else None,
        "module_paths": [name for name, _ in model.named_modules()],
        "tokenizer": None,
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        prepare_tokenizer(tokenizer)
        description["tokenizer"] = {
            "padding_side": tokenizer.padding_side,
            "json": backend.to_str(),
            "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)},
        }
    return description


def shard_runner(model: torch.nn.Module, plan: list[ShardSpec], index: int, pad_token_id: int) -> ShardRunner:
    """The runner of shard ``index`` of ``plan`` over ``model`` (already cut to that shard)."""
    spec = plan[index]
    layers = model.get_submodule(spec.layers_path)
    return ShardRunner(model, index, len(plan), lambda path: owner_of(plan, path),
                       layers[spec.layer_start], layers[spec.layer_stop - 1], pad_token_id)


class ShardActor:
    """Holds shard ``index`` of ``n_shards`` of a model for deployment ``deployment``."""

    #: Why the shard was closed on purpose (undeploy); its running stage stops with this reason.
    closed: str = ""
    #: Replaced by a copy on another worker: finishes the experiments it holds, takes no new one.
    retiring: bool = False

    def __init__(self, deployment: str, index: int, n_shards: int, source: ModelSource,
                 dtype: torch.dtype | None = None, device: str | None = None, gguf_file: str | None = None,
                 policy: dict[str, Any] | None = None) -> None:
        self.policy = Policy.from_dict(policy)
        register_serializers()  # also done by ShardWorkerPlugin; here for actors made without serve()
        torch.set_num_threads(int(os.environ.get("NNSIGHT_DASK_TORCH_THREADS", "1")))
        started = time.perf_counter()
        # Only this shard's weights are read when the source is a safetensors checkpoint; otherwise
        # the whole model is loaded (load_source) and cut.
        with _LOADING:
            shard = load_shard(source, n_shards, index, full_loader=load_source, dtype=dtype, gguf_file=gguf_file,
                               describe=describe_model if index == 0 else None)
        model, tokenizer, plan, self.description = shard.model, shard.tokenizer, shard.plan, shard.description
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device)
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(getattr(model, "config", None), "eos_token_id", None) or 0
        self.plan = plan
        config = getattr(model, "config", None)
        context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.context_length = int(context) if isinstance(context, int) else None
        vocab = getattr(config, "vocab_size", None)
        self.vocab_size = int(vocab) if isinstance(vocab, int) else None
        self.runner = shard_runner(model, plan, index, int(pad))
        self.deployment = deployment
        self.index = index
        self.experiments: dict[str, ExperimentState] = {}
        self.busy_seconds = 0.0
        self.stages_run = 0
        #: How many forward passes ran with each number of experiments in them (1: alone).
        self.batch_sizes: dict[int, int] = {}
        # co-tenant batching: the worker's settings decide, whatever clients ask
        self.batching = bool(settings.cotenant_batching)
        self.max_batch_tokens = int(settings.cotenant_max_tokens)
        self.queue = StageQueue(self._serve, int(settings.cotenant_max_batch),
                                float(settings.cotenant_gather_ms) / 1000)
        worker = _this_worker()
        self.announcer = telemetry.RunningAnnouncer(worker, deployment, index)
        #: The worker's memory limit (stages may run outside a task, where get_worker() knows none).
        self.memory_limit = getattr(getattr(worker, "memory_manager", None), "memory_limit", None)
        self.load_seconds = time.perf_counter() - started
        self.weight_bytes = nbytes(list({id(p): p for p in model.parameters()}.values()))
        registry.register(deployment, index, self)

    # -- actor methods (called through the Dask actor handle) -------------------------------------
    def describe(self) -> dict[str, Any] | None:
        return self.description

    def shard_plan(self) -> list[Any]:
        return list(self.plan)

    def status(self) -> dict[str, Any]:
        spec = self.plan[self.index]
        return {
            "deployment": self.deployment, "shard": self.index,
            "layers": [spec.layer_start, spec.layer_stop],
            "in_flight": len(self.experiments), "busy_seconds": self.busy_seconds,
            "stages_run": self.stages_run, "weight_bytes": self.weight_bytes,
            "batch_sizes": dict(self.batch_sizes), "queued": len(self.queue),
            "load_seconds": self.load_seconds, "pid": os.getpid(),
        }

    def close(self, reason: str | None = None) -> None:
        """Leave the registry and free every experiment's state, without waiting for a running stage.

        With ``reason`` (undeploy), the running stage stops before its next decoder layer and every
        later stage sent here is refused, both with :class:`~.registry.ShardClosedError` (``reason``).
        """
        if reason:
            self.closed = reason
        registry.unregister(self.deployment, self.index, self, reason=reason or "")
        self.experiments.clear()

    def retire(self) -> None:
        """This copy was replaced by one on another worker (rebalancing): the experiments it holds
        finish here, a new one is refused (its client resubmits to the new copy), and the copy
        leaves the registry once idle (at the latest after ``RETIRE_GRACE_SECONDS``)."""
        self.retiring = True
        if not self.experiments:
            registry.unregister(self.deployment, self.index, self)
            return
        timer = threading.Timer(RETIRE_GRACE_SECONDS, self.close)
        timer.daemon = True
        timer.start()

    def cancel(self, experiments: list[str], reason: str = "cancelled") -> int:
        """Stop ``experiments`` (lock-free): a running stage of theirs ends before its next decoder
        layer, later ones are refused, their state is freed now. Returns how many were held here."""
        registry.stop(experiments, ExperimentCancelledError(
            f"experiment(s) {', '.join(experiments)} stopped on the deployment's shards: {reason}",
            experiments=list(experiments), reason=reason))
        return self.release_many(experiments)

    def release_many(self, experiments: list[str]) -> int:
        """Forget the state of ``experiments`` (lock-free); returns how many were held here."""
        return sum(self._forget(experiment) for experiment in experiments)

    # -- called in-process by stage tasks -----------------------------------------------------------
    def run(self, experiment: str, stage: Stage, graph_json: str | InterventionGraph | None, carry: Carry | None,
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

    def run_batch(self, members: list[tuple[str, str | InterventionGraph | None]], stage: Stage,
                  carries: dict[str, Carry | None] | None, final: bool,
                  admitted: dict[str, InterventionGraph] | None = None) -> dict[str, Any]:
        """Run ``stage`` for each ``(experiment, graph)`` of a batch travelling together.

        Answers each experiment with its next carry, its results (``final``) or the error that ended
        it here, so one member's error never stops the others. A graph is JSON from outside, which
        this shard decodes and checks (the checked graphs go into ``admitted``, for the route's later
        shards), or a graph a peer shard of the route already checked.
        """
        requests = [StageRequest(experiment, stage, graph, (carries or {}).get(experiment), final)
                    for experiment, graph in members]
        self.queue.run(requests)
        if admitted is not None:
            admitted.update((r.experiment, r.admitted) for r in requests if r.admitted is not None)
        return {request.experiment: request.outcome for request in requests}

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
            if request.graph is None:
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
            state = self._start(experiment, request.graph)
            if isinstance(request.graph, str):
                request.admitted = state.graph
            state.should_stop = self._should_stop(experiment, state)
            self.experiments[experiment] = state
        state.touched = time.monotonic()
        return state

    def _serve_alone(self, request: StageRequest, state: ExperimentState) -> None:
        experiment, stage = request.experiment, request.stage
        announcement = self.announcer.watch(experiment, self._others_waiting(experiment))
        started = time.perf_counter()
        try:
            carry = request.carry if request.carry is not None else Carry()
            if stage.direction == "forward":
                carry = self.runner.forward(state, stage, carry)
            else:
                carry = self.runner.backward(state, stage, carry)
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
        members = [Member(state, request.stage, request.carry or Carry()) for request, state in group]
        announcements = [self.announcer.watch(request.experiment, True) for request, _ in group]
        started = time.perf_counter()
        try:
            forward_together(self.runner, members)
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
            results = Results(collect_results(state.graph, carry.values), experiment_id=request.experiment,
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

    def _start(self, experiment: str, graph: str | InterventionGraph) -> ExperimentState:
        """A new experiment's state here. A graph from outside (JSON) is decoded and checked with this
        worker's settings and the deployment's policy; one that a peer shard of its route admitted
        that way arrives checked (decoding and checking it on every shard cost each experiment
        about 1.2 ms of CPU per shard, docs/scaling.md)."""
        if isinstance(graph, str):
            graph = decode_graph(graph)
            check_graph(graph, policy=self.policy, context_length=self.context_length, vocab_size=self.vocab_size)
        device, dtype = _device_and_dtype(self.runner.model)
        return self.runner.start(graph, ZarrSink.from_options(graph.options, experiment),
                                 bounds=op_bounds(self.policy, device, dtype, self.memory_limit),
                                 vocab_size=self.vocab_size,
                                 max_prompt_tokens=self.policy.max_prompt_tokens or self.context_length)

    def release(self, experiment: str) -> None:
        """Forget an experiment's state (lock-free: never waits for a running stage)."""
        self._forget(experiment)

    def _forget(self, experiment: str) -> bool:
        """Free an experiment's state (whether it was held); the one way experiments leave a shard, so
        a retiring copy leaves the registry with its last experiment whichever way that one ended."""
        held = self.experiments.pop(experiment, None) is not None
        if self.retiring and not self.experiments:
            registry.unregister(self.deployment, self.index, self)
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
        timeout = float(getattr(getattr(self, "policy", None), "timeout", 0) or 0)
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


def _this_worker() -> Any:
    """The Dask worker this shard lives in (``None`` outside one: unit tests build shards directly)."""
    try:
        return get_worker()
    except ValueError:
        return None


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
