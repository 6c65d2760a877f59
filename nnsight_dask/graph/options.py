"""An experiment's options: what its graph carries besides the nodes, each rule written once.

Options reach a graph two ways: from the user's keywords (``lm.trace(prompt, store=..., positions=...)``,
built into one :class:`ExperimentOptions` by the model's entry points), and from the JSON of a graph
made anywhere (checked by :meth:`~.graph.InterventionGraph.from_dict`, naming the field). Both ask
:func:`option_problem`, so a value one path takes the other takes too. In the graph they stay the plain
JSON object ``graph.options`` (:meth:`ExperimentOptions.to_graph`), which shards and sinks read.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import TracingError

#: How a batch of token inputs gets its positions (option ``positions``): ``"model"`` (the default,
#: nnsight's rule: the model's own batched forward from left-padded ids and mask, so on a model with
#: absolute position embeddings, GPT-2, a padded prompt differs from its solo run) or ``"solo"``
#: (position ids from the attention mask: each prompt computes what it would alone).
POSITION_MODES = ("model", "solo")


def _string_keyed(value: Any) -> bool:
    return isinstance(value, Mapping) and all(type(key) is str for key in value)


#: Each option a user sets: what its value must be, and the check. ``store_scope`` is not here: the
#: gateway sets it (see :func:`~.policy.check_policy`), and the graph decoder checks its form.
OPTION_RULES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "store": ("a URL or path string", lambda value: type(value) is str),
    "persist_threshold": ("an integer >= 0 (bytes)", lambda value: type(value) is int and value >= 0),
    "storage_options": ("an object with string keys", _string_keyed),
    "positions": (f"one of {list(POSITION_MODES)}", lambda value: value in POSITION_MODES),
    "batching": ("true or false", lambda value: type(value) is bool),
}
#: The fields ``graph.options`` may hold: the options above, and ``store_scope``
#: (``{"user": name, "stores": [URL prefixes]}``, where that user's saves may go).
OPTION_FIELDS = (*OPTION_RULES, "store_scope")


def option_problem(name: str, value: Any) -> str | None:
    """What is wrong with ``value`` for option ``name`` ("must be ..."), or None when it is fine."""
    expected, check = OPTION_RULES[name]
    return None if check(value) else f"must be {expected}"


@dataclass(frozen=True)
class ExperimentOptions:
    """The options a user gives one experiment: where large saves go (``store``, above
    ``persist_threshold`` bytes, opened with ``storage_options``), how padded prompts get their
    positions, and whether it may share passes with other experiments (``batching``).

    ``None`` leaves the deployment's or the config's default.
    """

    store: str | None = None
    persist_threshold: int | None = None
    storage_options: Mapping[str, Any] | None = None
    positions: str | None = None
    batching: bool | None = None

    @classmethod
    def from_keywords(cls, *, store: Any = None, persist_threshold: Any = None, storage_options: Any = None,
                      positions: Any = None, batching: Any = None) -> ExperimentOptions:
        """The options of a model's entry point (``trace``, ``generate``, ``session``): ``store`` may be
        any path-like, ``persist_threshold`` anything ``int()`` takes. A wrong value raises
        :class:`~nnsight_dask.errors.TracingError` naming the keyword and what it takes."""
        if store is None and persist_threshold is None and storage_options is None and positions is None \
                and batching is None:
            return _DEFAULTS  # (every trace without options: one shared, frozen instance)
        if store is not None:
            store = os.fspath(store)
        if persist_threshold is not None:
            persist_threshold = int(persist_threshold)
        given = {"store": store, "persist_threshold": persist_threshold, "storage_options": storage_options,
                 "positions": positions, "batching": batching}
        for name, value in given.items():
            problem = None if value is None else option_problem(name, value)
            if problem is not None:
                raise TracingError(f"{name}= {problem}, not {value!r}", option=name)
        return cls(**given)

    def to_graph(self) -> dict[str, Any]:
        """The JSON object a graph carries (``graph.options``): only what differs from the defaults."""
        options: dict[str, Any] = {}
        if self.store is not None:
            options["store"] = self.store
        if self.persist_threshold is not None:
            options["persist_threshold"] = self.persist_threshold
        if self.storage_options:
            options["storage_options"] = dict(self.storage_options)
        if self.batching is False:
            options["batching"] = False
        if self.positions is not None:
            options["positions"] = self.positions
        return options


_DEFAULTS = ExperimentOptions()
