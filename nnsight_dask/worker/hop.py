"""What travels on the direct route: a batch of experiments between two of its stages, and its outcome.

Pure data (no Dask), serialized with our tensor-aware serializer (:mod:`.serialization`): carries'
tensors travel as raw frames, bf16 included.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any

from ..errors import InterventionError
from ..execution.stage import Carry, Stage
from .registry import ExperimentCancelledError


@dataclass
class Hop:
    """A batch of experiments on its way along its chain of stages.

    ``position`` is the stage to run next. Members that failed or were stopped leave ``carries``
    for ``ended`` and travel on only as their error, so the others carry on.
    """

    #: Unique id of this route (the origin worker keeps the client's call under it).
    route: str
    #: Address of the worker the client called: the last stage's outcome goes back there.
    origin: str
    deployment: str
    stages: list[Stage]
    #: Shard index -> address of the worker holding it (the client's record of the deployment).
    workers: dict[int, str]
    #: Experiment -> its graph (JSON), kept only while a shard it has not reached yet needs it.
    graphs: dict[str, str]
    #: Experiment -> what its next stage starts from (``None`` before the first stage).
    carries: dict[str, Carry | None]
    ended: dict[str, BaseException] = field(default_factory=dict)
    #: Experiments whose graph a shard of this route checked: later shards only decode it.
    checked: set[str] = field(default_factory=set)
    position: int = 0
    #: Positions that are a shard's first visit: only there does a stage start from the graph.
    first_visits: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if not self.first_visits:
            first: dict[int, int] = {}
            for position, stage in enumerate(self.stages):
                first.setdefault(stage.shard, position)
            self.first_visits = frozenset(first.values())

    def graph_for(self, experiment: str) -> str | None:
        """The graph to send with this stage: on the shard's first visit only (a later stage of an
        experiment whose state a shard lost must fail, not start over mid-way)."""
        return self.graphs.get(experiment) if self.position in self.first_visits else None

    @property
    def stage(self) -> Stage:
        return self.stages[self.position]

    @property
    def final(self) -> bool:
        return self.position == len(self.stages) - 1

    def members(self) -> list[tuple[str, str | None]]:
        """``(experiment, graph or None)`` of the members still running, for this stage."""
        return [(experiment, self.graph_for(experiment)) for experiment in self.carries]

    def record(self, answers: dict[str, Any]) -> None:
        """Take a stage's answers: a carry (or results) goes on; an error ends its member, who travels
        on only as that error (in a form that survives pickling)."""
        for experiment, answer in answers.items():
            if isinstance(answer, BaseException):
                self.carries.pop(experiment, None)
                self.ended[experiment] = answer if isinstance(answer, ExperimentCancelledError) \
                    else portable_error(answer)  # type: ignore[arg-type]
            else:
                self.carries[experiment] = answer

    def distrust(self) -> None:
        """A hop from outside the cluster (a client's) has had nothing checked yet, whatever it says."""
        self.checked = set()

    def end_all(self, error: BaseException) -> None:
        """Every member still running ends with ``error``."""
        self.record(dict.fromkeys(self.carries, error))

    def outcome(self) -> Outcome:
        return Outcome({**self.ended, **self.carries})

    def step(self) -> None:
        """Move to the next stage; graphs no shard ahead needs stay behind."""
        self.position += 1
        if self.position > max(self.first_visits):
            self.graphs = {}


@dataclass
class Outcome:
    """What a route answers its client: experiment -> its results, or the error that ended it."""

    answers: dict[str, Any]


def portable_error(exc: Exception) -> Exception:
    """``exc`` if it survives pickling (it travels as a value to the client), else its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return InterventionError(f"{type(exc).__name__}: {exc}")
