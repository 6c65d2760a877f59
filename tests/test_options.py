"""An experiment's options follow one table of rules, whichever way they reach a graph: the keywords
of ``lm.trace``/``generate``/``session`` (refused with a TracingError naming the keyword) or the
graph's JSON (refused with a GraphValidationError naming the field)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from nnsight_dask.errors import GraphValidationError, TracingError
from nnsight_dask.graph import InterventionGraph
from nnsight_dask.graph.options import OPTION_RULES, ExperimentOptions

BAD = [("persist_threshold", -1), ("storage_options", "anon"), ("storage_options", ["anon"]),
       ("positions", "absolute"), ("batching", 1), ("batching", "no")]


def _decode(options: dict[str, object]) -> InterventionGraph:
    document = json.loads(InterventionGraph().to_json())
    document["options"] = options
    return InterventionGraph.from_json(json.dumps(document))


@pytest.mark.parametrize(("name", "value"), BAD)
def test_keywords_and_json_refuse_the_same_values(name: str, value: object) -> None:
    expected = OPTION_RULES[name][0]
    with pytest.raises(TracingError, match="^" + re.escape(f"{name}= must be {expected}")):
        ExperimentOptions.from_keywords(**{name: value})
    with pytest.raises(GraphValidationError, match=f"options.{name}") as refused:
        _decode({name: value})
    assert refused.value.field == f"options.{name}"
    assert f"must be {expected}" in str(refused.value)


def test_keywords_reach_the_graph_as_json_the_decoder_takes(tmp_path: Path) -> None:
    options = ExperimentOptions.from_keywords(store=tmp_path / "runs", persist_threshold="4096",
                                              storage_options={"auto_mkdir": True}, positions="solo",
                                              batching=False)
    assert options.to_graph() == {"store": str(tmp_path / "runs"), "persist_threshold": 4096,
                                  "storage_options": {"auto_mkdir": True}, "positions": "solo", "batching": False}
    assert _decode(options.to_graph()).options == options.to_graph()


def test_defaults_add_nothing_to_the_graph() -> None:
    """None leaves the config's or the deployment's default; batching=True is the default too."""
    assert ExperimentOptions.from_keywords(batching=True, storage_options={}).to_graph() == {}
    assert ExperimentOptions().to_graph() == {}
