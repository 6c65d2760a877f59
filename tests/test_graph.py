"""The intervention graph as data: JSON round trip, whitelist, binding, validation."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nnsight_dask as nd
from nnsight_dask.errors import ForbiddenOperationError, GraphValidationError
from nnsight_dask.execution import run_graph
from nnsight_dask.graph import InterventionGraph, Kind
from nnsight_dask.graph.ops import registry
from nnsight_dask.graph.validate import validate_graph
from nnsight_dask.models import tiny_llama

PROMPT = "The Eiffel Tower is in the city of"


@pytest.fixture(scope="module")
def lm(tiny_tokenizer):
    return nd.LanguageModel(tiny_llama(n_layer=3), tokenizer=tiny_tokenizer)


def module_paths(lm):
    return {name for name, _ in lm._module.named_modules()}


def test_execute_false_records_and_round_trips(lm):
    steer = torch.randn(64).to(torch.bfloat16)
    with lm.trace(PROMPT, execute=False) as tracer:
        h = lm.model.layers[1].output.save()
        lm.model.layers[2].output[:, -1] += steer
        lm.model.layers[0].mlp.down_proj.output[:, :, [1, 2]] = torch.tensor([0.5, -0.5])
        top = lm.output.logits[:, -1].softmax(-1).topk(3).indices.save()
        lens = lm.lm_head(lm.model.norm(lm.model.layers[0].output))[..., 1:3].save()
    graph = tracer.graph
    text = graph.to_json()
    json.loads(text)  # plain JSON
    again = InterventionGraph.from_json(text)
    assert again.to_json() == text
    first, second = run_graph(lm._module, graph), run_graph(lm._module, again)
    assert set(first.saves) == {"h", "top", "lens"}
    for name in first.saves:
        assert torch.equal(first.saves[name], second.saves[name]), name
    # bf16 constants survive bit for bit
    consts = [a for n in again.nodes for a in _flatten(n.args) if isinstance(a, torch.Tensor)]
    assert any(c.dtype == torch.bfloat16 and torch.equal(c, steer) for c in consts)


def _flatten(obj):
    if isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _flatten(item)
    else:
        yield obj


def test_every_node_is_whitelisted_and_bound_or_free(lm):
    with lm.generate(PROMPT, max_new_tokens=2, execute=False) as tracer:
        with tracer.all():
            lm.model.layers[1].output[:] = lm.model.layers[1].output * 2
        logits = lm.output.logits.save()
        ids = tracer.result.save()
    graph = tracer.graph
    validate_graph(graph, module_paths=module_paths(lm), remote=True)
    for node in graph.nodes:
        if node.kind == Kind.OP:
            assert node.target in registry()
        if node.kind in Kind.MODULE_BOUND:
            assert node.module in module_paths(lm)
        else:
            assert node.module is None
    assert not graph.local_only


def test_apply_marks_graph_local_only(lm):
    with lm.trace(PROMPT, execute=False) as tracer:
        nd.apply(print, lm.model.layers[0].output.shape)
    assert tracer.graph.local_only
    with pytest.raises(ForbiddenOperationError, match="builtins.print"):
        tracer.graph.to_json()
    with pytest.raises(ForbiddenOperationError, match="runs only locally|run only locally"):
        validate_graph(tracer.graph, remote=True)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["nodes"][1].update(target="os.system"), "not in the operation whitelist"),
    (lambda d: d["nodes"][0].update(module="model.layers.99"), "no module 'model.layers\\[99\\]'"),
    (lambda d: d["nodes"][1].update(args=[{"ref": 5}]), "may only use values of earlier nodes"),
    (lambda d: d["nodes"][0].update(kind="exec"), "unknown kind 'exec'"),
    (lambda d: d.update(version=99), "format version"),
    (lambda d: d["nodes"][1].update(target="getattr", args=[{"ref": 0}, "__class__"]), "public attribute"),
    (lambda d: d["nodes"][1].update(args=[{"pickle": "gASV"}]), "unknown argument tag 'pickle'"),
])
def test_malformed_graphs_are_refused(lm, mutate, message):
    with lm.trace(PROMPT, execute=False) as tracer:
        lm.model.layers[0].output.abs().save()
    data = tracer.graph.to_dict()
    mutate(data)
    with pytest.raises(GraphValidationError, match=message):
        graph = InterventionGraph.from_dict(data)
        validate_graph(graph, module_paths=module_paths(lm), remote=True)


def test_limits(lm):
    with lm.generate(PROMPT, max_new_tokens=50, execute=False) as tracer:
        lm.output.logits.save()
    with pytest.raises(GraphValidationError, match="max_new_tokens=50"):
        validate_graph(tracer.graph, max_new_tokens=10)
    with lm.trace(PROMPT, execute=False) as tracer:
        lm.model.layers[0].output.add(torch.zeros(1000)[:64]).save()
    with pytest.raises(GraphValidationError, match="bytes of tensors"):
        validate_graph(tracer.graph, max_constant_bytes=100)


# -- property: random valid graphs survive the JSON round trip --------------------------------------
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool]
UNARY = ["abs", "neg", "relu", "tanh", "sum", "mean"]


@st.composite
def experiments(draw):
    steps = draw(st.lists(st.tuples(
        st.integers(0, 2),                         # layer
        st.sampled_from(["save", "scale", "unary", "slice", "set_last", "const"]),
        st.floats(-2, 2, allow_nan=False, width=32),
        st.sampled_from(DTYPES),
        st.sampled_from(UNARY),
    ), min_size=1, max_size=6))
    return steps


def record(lm, steps):
    with lm.trace(PROMPT, execute=False) as tracer:
        for i, (layer, action, number, dtype, unary) in enumerate(steps):
            out = lm.model.layers[layer].output
            if action == "save":
                out.save(name=f"s{i}")
            elif action == "scale":
                (out * number + 1).save(name=f"s{i}")
            elif action == "unary":
                getattr(out, unary)().save(name=f"s{i}")
            elif action == "slice":
                out[:, 1:-1, ::2].save(name=f"s{i}")
            elif action == "set_last":
                lm.model.layers[layer].output[:, -1] = out[:, -1] * number
            else:
                constant = (torch.arange(64) % 3).to(dtype)
                (out + constant.float()).save(name=f"s{i}")
    return tracer.graph


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=experiments())
def test_random_graphs_survive_json_round_trip(lm, steps):
    graph = record(lm, steps)
    again = InterventionGraph.from_json(graph.to_json())
    assert again.to_json() == graph.to_json()
    first, second = run_graph(lm._module, graph), run_graph(lm._module, again)
    assert first.saves.keys() == second.saves.keys()
    for name, value in first.saves.items():
        assert torch.equal(value, second.saves[name])
