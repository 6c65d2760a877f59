"""Unit tests that need no cluster: shard assignment and stage plans, the tensor and carry codecs,
and a batch of experiments driven by hand through two in-process shard actors."""
from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from distributed.protocol import deserialize, serialize
from hypothesis import given, settings
from hypothesis import strategies as st

from nnsight_dask.execution.partition import assign_shards, backward_origins
from nnsight_dask.execution.local_runner import run_graph
from nnsight_dask.execution.stage import Carry, Stage, plan_stages
from nnsight_dask.graph import InterventionGraph, Kind
from nnsight_dask.models import owner_of, plan_shards, tiny_llama
from nnsight_dask.tensors import (
    DTYPE_NAMES,
    dtype_from_name,
    tensor_from_bytes,
    tensor_from_json,
    tensor_to_bytes,
    tensor_to_json,
)
from nnsight_dask.worker import registry, serialization
from tests.routes import run_route
from nnsight_dask.worker.results import Results
from nnsight_dask.worker.shard_actor import ShardActor

torch.set_num_threads(1)

PROMPT = "The Eiffel Tower is in the city of"


@pytest.fixture(scope="module")
def owner(lm: Any) -> Any:
    plan = plan_shards(lm._module, 2)
    assert [(s.layer_start, s.layer_stop) for s in plan] == [(0, 2), (2, 4)]
    return lambda path: owner_of(plan, path)


def by_name(graph: InterventionGraph, shards: list[int]) -> dict[str, tuple[int, int]]:
    """Save name -> (shard of the save, shard of the value it saves)."""
    return {name: (shards[node.id], shards[node.args[0].id]) for name, node in graph.saves.items()}


# -- partition and stage plans --------------------------------------------------------------------
def test_trace_nodes_run_where_their_modules_and_inputs_are(lm: Any, owner: Any) -> None:
    with lm.trace(PROMPT, execute=False) as tracer:
        lm.model.embed_tokens.output.save(name="embed")
        early = lm.model.layers[0].output
        late = lm.model.layers[3].output
        (early * 2).save(name="early2")
        (early[:, -1] + late[:, -1]).save(name="mixed")
        lm.model.layers[2].output[:, 0] = early[:, 0]       # an in-place write: a setitem op on shard 1
        lm.model.layers[2].mlp.output = early * 0.5         # a shard-1 setter fed from shard 0
        lm.lm_head(lm.model.norm(early)).save(name="lens")  # module calls of shard-1 modules
        lm.output.logits.save(name="logits")
    graph = tracer.graph
    shards = assign_shards(graph, owner, 2)
    assert len(shards) == len(graph.nodes)
    assert by_name(graph, shards) == {"embed": (0, 0), "early2": (0, 0), "mixed": (1, 1),
                                      "lens": (1, 1), "logits": (1, 1)}
    for node in graph.nodes:
        if node.kind in Kind.MODULE_BOUND:
            assert shards[node.id] == owner(node.module), node.describe()
        elif node.kind in (Kind.OP, Kind.SAVE):
            assert shards[node.id] == max((shards[d] for d in node.deps()), default=0), node.describe()
    setitem = next(n for n in graph.nodes if n.target == "operator.setitem")
    setter = next(n for n in graph.nodes if n.kind == Kind.SETTER)
    assert (shards[setitem.id], setter.module, shards[setter.id], shards[setter.args[0].id]) == (
        1, "model.layers.2.mlp", 1, 0)
    assert [(n.module, shards[n.id]) for n in graph.nodes if n.kind == Kind.MODULE_CALL] == [
        ("model.norm", 1), ("lm_head", 1)]
    assert backward_origins(graph, shards) == {}
    assert plan_stages(graph, shards, 2) == [Stage(0, 0, 0), Stage(0, 0, 1)]


def test_generate_runs_one_forward_chain_per_step(lm: Any, owner: Any) -> None:
    with lm.generate(PROMPT, max_new_tokens=3, execute=False) as tracer:
        with tracer.all():
            lm.model.layers[1].output[:, -1] *= 0.5
        lm.model.layers[1].output.save(name="h")
        tracer.result.save(name="ids")
    graph = tracer.graph
    shards = assign_shards(graph, owner, 2)
    assert by_name(graph, shards) == {"h": (0, 0), "ids": (1, 1)}
    assert [shards[n.id] for n in graph.nodes if n.kind == Kind.RESULT] == [1]
    stages = plan_stages(graph, shards, 2)
    assert [(s.step, s.shard, s.direction) for s in stages] == [
        (0, 0, "forward"), (0, 1, "forward"), (1, 0, "forward"), (1, 1, "forward"),
        (2, 0, "forward"), (2, 1, "forward")]
    assert [s.label for s in stages[:2]] == ["p0-t0-fwd-s0", "p0-t0-fwd-s1"]


def test_gradients_run_where_their_tensor_lives_and_backward_reverses(lm: Any, owner: Any) -> None:
    with lm.trace(PROMPT, execute=False) as tracer:
        lm.model.layers[1].output.grad.save(name="g1")
        lm.model.layers[3].output.grad.save(name="g3")
        lm.output.logits[0, -1].max().backward()
    graph = tracer.graph
    shards = assign_shards(graph, owner, 2)
    grads = [(graph.nodes[n.args[0].id].module, shards[n.id]) for n in graph.nodes if n.kind == Kind.GRAD]
    assert grads == [("model.layers.1", 0), ("model.layers.3", 1)]
    assert by_name(graph, shards) == {"g1": (0, 0), "g3": (1, 1)}
    (backward,) = [n for n in graph.nodes if n.kind == Kind.BACKWARD]
    assert shards[backward.id] == 1
    assert backward_origins(graph, shards) == {0: 1}
    assert plan_stages(graph, shards, 2) == [Stage(0, 0, 0), Stage(0, 0, 1), Stage(0, 0, 0, "backward")]

    with lm.trace(PROMPT, execute=False) as tracer:  # a loss on shard 0: no backward stage needed
        lm.model.layers[0].output.grad.save(name="g0")
        lm.model.layers[1].output.sum().backward()
    shards = assign_shards(tracer.graph, owner, 2)
    assert backward_origins(tracer.graph, shards) == {0: 0}
    assert plan_stages(tracer.graph, shards, 2) == [Stage(0, 0, 0), Stage(0, 0, 1)]


# -- tensor and carry codecs ----------------------------------------------------------------------
SHAPES = [(), (0,), (2, 0, 3), (3, 5)]


def raw(t: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    """A tensor's dtype, shape and exact bits (NaN payloads included)."""
    flat = t.detach().contiguous().reshape(-1)
    flat = flat.to(torch.uint8) if t.dtype == torch.bool else flat.view(torch.uint8)
    return str(t.dtype), tuple(t.shape), bytes(flat.numpy())


def random_tensor(name: str, shape: tuple[int, ...], data: bytes | None = None, seed: int = 0) -> torch.Tensor:
    """A tensor of dtype ``name`` made of ``data`` (else seeded random bits, with a NaN and an -inf)."""
    dtype = dtype_from_name(name)
    count = torch.Size(shape).numel()
    if dtype == torch.bool:
        bits = data if data is not None else torch.randint(0, 2, (count,), generator=torch.Generator().manual_seed(seed))
        return torch.tensor([*(int(b) % 2 for b in bits), *[1] * count][:count], dtype=torch.bool).reshape(shape)
    size = count * torch.empty(0, dtype=dtype).element_size()
    random = data is None
    if data is None:
        data = bytes(torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)))
    buffer = bytearray(data[:size].ljust(size, b"\x7f"))
    t = torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).reshape(shape) if size else torch.empty(shape, dtype=dtype)
    if random and count >= 2 and dtype.is_floating_point:
        t.view(-1)[0] = float("nan")
        if dtype != torch.float8_e4m3fn:  # e4m3fn has no infinity
            t.view(-1)[-1] = float("-inf")
    return t


def check_carry(name: str, shape: tuple[int, ...], t: torch.Tensor) -> None:
    other = random_tensor(name, shape, seed=1)
    shared = [t, other]
    carry = Carry(values={0: t, (1, 2): shared, 3: shared, 4: {"nested": [other, 1.5]}}, hidden=t, grads={(1, 0, 0): other},
                  inputs={"input_ids": t}, tokens=torch.arange(3), steps_run=2, logs=["line"])
    header, frames = serialize(carry)
    assert header["serializer"] == "dask" and len(frames) == 1 + 3  # pickle + one frame per distinct tensor
    direct = serialization.loads(*serialization.dumps(carry))
    for back in (deserialize(header, frames), direct):
        assert isinstance(back, Carry) and (back.steps_run, back.logs) == (2, ["line"])
        for got, want in [(back.hidden, t), (back.values[0], t), (back.inputs["input_ids"], t), (back.grads[(1, 0, 0)], other),
                          (back.values[(1, 2)][1], other), (back.values[4]["nested"][0], other)]:
            assert raw(got) == raw(want)
        assert back.values[0] is back.hidden and back.inputs["input_ids"] is back.hidden
        assert back.values[(1, 2)] is back.values[3] and back.values[3][0] is back.hidden
        assert back.grads[(1, 0, 0)] is back.values[4]["nested"][0] and back.values[4]["nested"][1] == 1.5
        assert torch.equal(back.tokens, torch.arange(3))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", DTYPE_NAMES)
def test_every_dtype_round_trips_bit_exactly(name: str, shape: tuple[int, ...]) -> None:
    serialization.register()
    t = random_tensor(name, shape)
    assert raw(tensor_from_bytes(*tensor_to_bytes(t))) == raw(t)
    assert raw(tensor_from_json(tensor_to_json(t))) == raw(t)
    check_carry(name, shape, t)
    assert len(raw(t)[2]) == t.numel() * t.element_size()


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(DTYPE_NAMES), shape=st.lists(st.integers(0, 4), max_size=3).map(tuple),
       data=st.binary(min_size=0, max_size=512))
def test_arbitrary_bits_round_trip(name: str, shape: tuple[int, ...], data: bytes) -> None:
    serialization.register()
    t = random_tensor(name, shape, data=data)
    assert raw(tensor_from_json(tensor_to_json(t))) == raw(t)
    assert raw(serialization.loads(*serialization.dumps(Carry(hidden=t))).hidden) == raw(t)
    assert raw(deserialize(*serialize(Carry(values={7: [t]}))).values[7][0]) == raw(t)


def test_unknown_dtype_names_are_refused() -> None:
    good = tensor_to_json(torch.ones(2, dtype=torch.bfloat16))
    for name in ("bfloat17", "float128", "torch.float32"):
        with pytest.raises(ValueError, match=re.escape(repr(name))):
            tensor_from_json({**good, "dtype": name})
        with pytest.raises(ValueError, match=re.escape(repr(name))):
            tensor_from_bytes({"dtype": name, "shape": [2]}, b"\0\0\0\0")
    header, frames = serialization.dumps(Carry(hidden=torch.ones(2)))
    header["tensors"][0]["dtype"] = "float8_e9m9"
    with pytest.raises(ValueError, match="float8_e9m9"):
        serialization.loads(header, frames)


# -- a batch through two shard actors, one member failing ---------------------------------------
@pytest.fixture
def actors(tiny_tokenizer: Any) -> Any:
    source = lambda: (tiny_llama(n_layer=4), tiny_tokenizer)
    shards = [ShardActor(deployment="units", index=i, n_shards=2, source=source) for i in range(2)]
    assert [d for d, _ in registry.held()].count("units") == 2
    yield shards
    for actor in shards:
        actor.close()
    assert not [held for held in registry.held() if held[0] == "units"]


def record(lm: Any, prompt: str, layer: int, bad: bool) -> InterventionGraph:
    with lm.trace(prompt, execute=False) as tracer:
        if bad:
            lm.model.layers[layer].output[5].save(name="row5")  # batch of one: row 5 does not exist
        else:
            lm.model.layers[layer].output[:, -1] *= 2
            lm.model.layers[layer].output.save(name="h")
            lm.output.logits[:, -1].softmax(-1).save(name="probs")
    return tracer.graph


def run_by_hand(actors: list[ShardActor], members: dict[str, InterventionGraph], owner: Any) -> dict[str, Any]:
    """What a route does between workers: each shard's first stage carries the graphs; hops cross the wire."""
    plans = {name: plan_stages(g, assign_shards(g, owner, 2), 2) for name, g in members.items()}
    (stages,) = {tuple(p) for p in plans.values()}  # a batch shares one stage plan
    return run_route(actors, {name: g.to_json() for name, g in members.items()}, list(stages))


def test_a_failing_member_is_answered_with_its_error_while_the_others_go_on(actors: list[ShardActor], lm: Any,
                                                                            owner: Any, tiny_tokenizer: Any) -> None:
    members = {"ok-paris": record(lm, PROMPT, 1, bad=False), "bad-shard0": record(lm, PROMPT, 1, bad=True),
               "ok-rome": record(lm, "The capital of Italy is", 2, bad=False),
               "bad-shard1": record(lm, PROMPT, 3, bad=True)}
    answers = run_by_hand(actors, members, owner)
    assert sorted(answers) == sorted(members)
    for name in ("bad-shard0", "bad-shard1"):
        assert isinstance(answers[name], Exception), name
        message = str(answers[name])  # names the user's line, the operation and the problem
        assert "test_units.py:" in message and "operator.getitem" in message, message
        assert "IndexError: index 5 is out of bounds for dimension 0 with size 1" in message, message
    for name in ("ok-paris", "ok-rome"):
        got = answers[name]
        assert isinstance(got, Results) and got.experiment_id == name and sorted(got) == ["h", "probs"]
        expected = run_graph(lm._module, members[name], pad_token_id=tiny_tokenizer.pad_token_id).saves
        for key in ("h", "probs"):
            assert got[key].shape == expected[key].shape
            assert (got[key] - expected[key]).abs().max().item() <= 1e-5, (name, key)
        assert abs(got["probs"].sum().item() - 1.0) < 1e-4
    assert all(not actor.server.experiments for actor in actors)  # failed and finished experiments were freed
    # one forward pass per shard for the whole batch; shard 1 never ran the one that failed on shard 0
    assert [actor.server.batch_sizes for actor in actors] == [{4: 1}, {3: 1}]


def test_a_batch_of_one_failing_member_is_answered_with_its_error(actors: list[ShardActor], lm: Any,
                                                                  owner: Any) -> None:
    graph = record(lm, PROMPT, 1, bad=True)
    stage = plan_stages(graph, assign_shards(graph, owner, 2), 2)[0]
    error = actors[0].server.run_batch([("solo", graph.to_json())], stage, None, False)["solo"]
    assert isinstance(error, Exception) and "index 5 is out of bounds" in str(error)
    assert "test_units.py:" in str(error) and "operator.getitem" in str(error)
    assert actors[0].server.experiments == {} and actors[0].server.stages_run == 1
    ok = record(lm, PROMPT, 1, bad=False)  # the shard still serves the next batch of one
    carry = actors[0].server.run_batch([("next", ok.to_json())], stage, None, False)["next"]
    assert isinstance(carry, Carry) and carry.hidden is not None and tuple(carry.hidden.shape) == (1, 8, 64)
