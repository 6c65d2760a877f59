"""Every bad graph gets a named error (issue 11, item 7).

Whatever JSON the codec is given either decodes to a graph that ``validate_graph(remote=True)``
accepts, or raises :class:`GraphValidationError` naming the node (``node %3``) or pass and the
field; never a raw ``RecursionError``, ``TypeError``, ``binascii.Error``, ``MemoryError``, ...
(a) hand-written hostile graphs, each a JSON edit of a recorded graph; (b) a property test that
mutates recorded graphs anywhere and, when the result is accepted, runs it; (c) the same mutations,
and graphs whose operations call any whitelisted operation with sizes of any magnitude, run on a shard
whose policy bounds every operation (issue 23): refused or failed by name, or run, never for long.
"""
from __future__ import annotations

import base64
import copy
import json
import re
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nnsight_dask as nd
from nnsight_dask.errors import (
    ForbiddenOperationError,
    GraphValidationError,
    NNsightDaskError,
)
from nnsight_dask.execution import run_graph
from nnsight_dask.execution.partition import assign_shards
from nnsight_dask.execution.stage import plan_stages
from nnsight_dask.graph import InterventionGraph, Ref
from nnsight_dask.graph.ops import registry
from nnsight_dask.graph.validate import validate_graph
from nnsight_dask.models import tiny_llama, tiny_tokenizer
from nnsight_dask.tensors import tensor_from_bytes, tensor_from_json, tensor_to_json
from nnsight_dask.worker.shard_actor import ShardActor
from tests.routes import run_route

PROMPT = "The Eiffel Tower is in the city of"
MAX_NEW_TOKENS = 3
MAX_CONSTANT_BYTES = 1 << 20


@pytest.fixture(scope="module")
def lm() -> Any:
    """Its own model: mutated graphs may write to it (the session's tiny models stay untouched)."""
    return nd.LanguageModel(tiny_llama(n_layer=2), tokenizer=tiny_tokenizer())


def limits(lm: Any) -> dict[str, Any]:
    return {"module_paths": {name for name, _ in lm._module.named_modules()}, "remote": True,
            "max_new_tokens": MAX_NEW_TOKENS, "max_constant_bytes": MAX_CONSTANT_BYTES,
            "vocab_size": lm._module.config.vocab_size}


def record_trace(lm: Any) -> dict[str, Any]:
    """A forward pass touching most node kinds: getter, op, getattr, in-place write, setter,
    module attribute, module call, condition, log, constant tensors (bf16 included), save."""
    with lm.trace(PROMPT, execute=False) as tracer:
        h = lm.model.layers[0].output.save()
        lm.model.layers[1].output[:, -1] = lm.model.layers[1].output[:, -1] * 2
        w = lm.lm_head.weight[:2].save()
        lens = lm.lm_head(lm.model.norm(lm.model.layers[0].output))[..., 1:3].save()
        top = lm.output.logits[:, -1].softmax(-1).topk(3).indices.save()
        with tracer.cond(lm.model.layers[0].output.sum() > 0):
            tracer.log(lm.model.layers[0].output.shape)
        lm.model.layers[1].mlp.output = lm.model.layers[1].mlp.output + torch.ones(64, dtype=torch.bfloat16)
        lm.model.layers[0].mlp.skip(lm.model.layers[0].post_attention_layernorm.output)
        shifted = (lm.model.norm.output + torch.arange(64.0)).save()
    del h, w, lens, top, shifted
    return tracer.graph.to_dict()


def record_generate(lm: Any) -> dict[str, Any]:
    """A generation with two invokes, a write at every step, a save at some steps and the result."""
    with lm.generate(max_new_tokens=2, execute=False) as tracer:
        with tracer.invoke(PROMPT):
            first = lm.model.layers[0].output.save()
        with tracer.invoke("Paris is the capital of"), tracer.all():
            lm.model.layers[1].output[:] = lm.model.layers[1].output * 0.5
        with tracer.iter[1:2]:
            late = lm.model.layers[1].output.save()
        ids = tracer.result.save()
    del first, late, ids
    return tracer.graph.to_dict()


def record_grad(lm: Any) -> dict[str, Any]:
    """Gradients: read and replace a gradient, run backward from a loss, then stop."""
    with lm.trace(PROMPT, execute=False) as tracer:
        hidden = lm.model.layers[0].output
        grad = hidden.grad.save()
        lm.model.layers[1].output.grad = lm.model.layers[1].output.grad * 2
        loss = lm.output.logits.sum()
        loss.backward()
        tracer.stop()
    del grad
    return tracer.graph.to_dict()


@pytest.fixture(scope="module")
def recorded(lm: Any) -> dict[str, dict[str, Any]]:
    return {"trace": record_trace(lm), "generate": record_generate(lm), "grad": record_grad(lm)}


def test_recorded_graphs_are_valid_and_run(lm: Any, recorded: dict[str, dict[str, Any]]) -> None:
    for data in recorded.values():
        graph = InterventionGraph.from_json(json.dumps(data))
        validate_graph(graph, **limits(lm))
        run_graph(lm._module, graph, pad_token_id=lm.tokenizer.pad_token_id)


# -- (a) hand-written hostile graphs -------------------------------------------------------------
def node(data: dict[str, Any], kind: str, nth: int = 0, **match: Any) -> dict[str, Any]:
    """The ``nth`` node of ``kind`` (whose fields equal ``match``) in graph ``data``."""
    found = [n for n in data["nodes"] if n["kind"] == kind and all(n.get(k) == v for k, v in match.items())]
    return found[nth]


def first_tensor(data: dict[str, Any]) -> dict[str, Any]:
    """The JSON of the first constant tensor among the nodes' arguments."""
    return next(obj["tensor"] for obj in _walk(data["nodes"]) if isinstance(obj, dict) and "tensor" in obj)


def _walk(obj: Any) -> Any:
    yield obj
    if isinstance(obj, list):
        for item in obj:
            yield from _walk(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _walk(item)


def invoke_field(data: dict[str, Any], name: str, run: int = 0, position: int = 0) -> dict[str, Any]:
    """The tensor JSON of ``input_ids`` or ``attention_mask`` of one invoke."""
    pairs = data["passes"][run]["invokes"][position]["dict"]
    return next(value for key, value in pairs if key == name)["tensor"]


def set_tokens(data: dict[str, Any], values: torch.Tensor, name: str = "input_ids") -> None:
    invoke_field(data, name).update(tensor_to_json(values))


def nested(depth: int, leaf: Any = 1) -> Any:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


def gen_kwargs(data: dict[str, Any]) -> list[list[Any]]:
    return data["passes"][0]["kwargs"]["dict"]


def getattr_node(data: dict[str, Any]) -> dict[str, Any]:
    return node(data, "op", target="getattr")


def _id(data: dict[str, Any], kind: str) -> int:
    return int(node(data, kind)["id"])


def name_of(data: dict[str, Any], target: str) -> int:
    """Index among save nodes of the save named ``target``."""
    saves = [n for n in data["nodes"] if n["kind"] == "save"]
    return next(i for i, n in enumerate(saves) if n["target"] == target)


Edit = Callable[[dict[str, Any]], Any]

#: (name, base graph, edit, text the message must contain). Every message must also name a node
#: (``node %N``) or a pass (``pass N``) or a graph field.
HOSTILE: list[tuple[str, str, Edit, str]] = [
    # structure and JSON types
    ("nodes not a list", "trace", lambda d: d.update(nodes={"0": {}}), "field 'nodes': expected a list"),
    ("node not an object", "trace", lambda d: d["nodes"].__setitem__(3, [3, "op"]), "node %3, field 'node'"),
    ("args not a list", "trace", lambda d: d["nodes"][1].update(args={"ref": 0}), "node %1, field 'args'"),
    ("kwargs not an object", "trace", lambda d: d["nodes"][1].update(kwargs=[1]), "node %1, field 'kwargs'"),
    ("kind not a string", "trace", lambda d: d["nodes"][2].update(kind=["op"]), "node %2, field 'kind'"),
    ("unknown kind", "trace", lambda d: d["nodes"][0].update(kind="exec"), "unknown kind 'exec'"),
    ("call a float", "trace", lambda d: d["nodes"][0].update(call=1.0), "node %0, field 'call': expected an integer"),
    ("call a bool", "trace", lambda d: d["nodes"][0].update(call=True), "node %0, field 'call'"),
    ("pass a string", "trace", lambda d: d["nodes"][0].update({"pass": "0"}), "node %0, field 'pass'"),
    ("invoke a float", "trace", lambda d: d["nodes"][0].update(invoke=0.0), "node %0, field 'invoke'"),
    ("iteration a bool", "generate", lambda d: d["nodes"][2].update(iteration=False), "node %2, field 'iteration'"),
    ("cond a string", "trace", lambda d: d["nodes"][3].update(cond="16"), "node %3, field 'cond'"),
    ("id out of order", "trace", lambda d: d["nodes"][2].update(id=7), "node %2, field 'id'"),
    ("id a bool", "trace", lambda d: d["nodes"][1].update(id=True), "node %1, field 'id'"),
    ("unknown node field", "trace", lambda d: d["nodes"][1].update(code="import os"), "unknown node field(s) ['code']"),
    ("unknown graph field", "trace", lambda d: d.update(pickle="gASV"), "the graph, field 'pickle': unknown field"),
    ("version a bool", "trace", lambda d: d.update(version=True), "format version"),
    ("version 99", "trace", lambda d: d.update(version=99), "format version"),
    ("passes not a list", "trace", lambda d: d.update(passes={"kind": "trace"}), "field 'passes': expected a list"),
    ("iterations malformed", "generate", lambda d: d["iterations"].__setitem__(0, [0, 0, 0]), "'iterations[0]'"),
    ("iteration step 0", "generate", lambda d: d["iterations"][0].__setitem__(4, 0), "'iterations[0]'"),
    ("iteration start a float", "generate", lambda d: d["iterations"][0].__setitem__(2, 0.5), "'iterations[0]'"),
    ("options not an object", "trace", lambda d: d.update(options=["store"]), "field 'options'"),
    ("store not a string", "trace", lambda d: d.update(options={"store": {"url": 1}}), "graph field 'options.store'"),
    ("pass kwargs a raw object", "trace", lambda d: d["passes"][0].update(kwargs={}), "pass 0, field 'kwargs'"),
    ("invoke not a dict", "trace", lambda d: d["passes"][0]["invokes"].__setitem__(0, [1, 2]),
     "pass 0, field 'invokes[0]'"),
    # arguments: tags, nesting, numbers
    ("unknown tag", "trace", lambda d: d["nodes"][1].update(args=[{"pickle": "gASV"}]),
     "unknown argument tag 'pickle'"),
    ("two tags", "trace", lambda d: d["nodes"][1].update(args=[{"ref": 0, "tuple": []}]), "node %1, field 'args[0]'"),
    ("ref a string", "trace", lambda d: d["nodes"][1].update(args=[{"ref": "0"}]), "node %1, field 'args[0].ref'"),
    ("ref a bool", "trace", lambda d: d["nodes"][1].update(args=[{"ref": True}]), "node %1, field 'args[0].ref'"),
    ("ref negative", "trace", lambda d: d["nodes"][1].update(args=[{"ref": -1}]), "node %1, field 'args[0].ref'"),
    ("slice of two", "trace", lambda d: d["nodes"][3]["args"][1]["tuple"].__setitem__(0, {"slice": [None, None]}),
     "node %3, field 'args[1].tuple[0].slice'"),
    ("dict pairs malformed", "trace", lambda d: d["nodes"][3].update(args=[{"ref": 2}, {"dict": [[1]]}]),
     "node %3, field 'args[1].dict[0]'"),
    ("unhashable dict key", "trace", lambda d: d["nodes"][3].update(args=[{"ref": 2}, {"dict": [[[1], 2]]}]),
     "must be hashable"),
    ("bad dtype", "trace", lambda d: d["nodes"][3].update(args=[{"ref": 2}, {"dtype": "object"}]),
     "unknown tensor dtype"),
    ("bad device", "trace", lambda d: d["nodes"][3].update(args=[{"ref": 2}, {"device": "quantum:9"}]), "not a device"),
    ("tagged float", "trace", lambda d: d["nodes"][3].update(args=[{"ref": 2}, {"float": "1e999999"}]), "tagged float"),
    ("huge int", "trace", lambda d: d["nodes"][4].update(args=[{"ref": 3}, 10**30]), "does not fit in 64 bits"),
    ("complex with a string", "trace", lambda d: d["nodes"][4].update(args=[{"ref": 3}, {"complex": [1, "x"]}]),
     "complex"),
    ("nesting 65", "trace", lambda d: d["nodes"][4].update(args=[{"ref": 3}, nested(65)]), "nest more than 64 levels"),
    ("nesting 600", "trace", lambda d: d["nodes"][4].update(args=[{"ref": 3}, nested(600)]),
     "nest more than 64 levels"),
    ("tuples nesting 65", "trace", lambda d: d["nodes"][4].update(
        args=[{"ref": 3}, json.loads('{"tuple": [' * 65 + "1" + "]}" * 65)]), "node %4, field 'args[1].tuple[0]"),
    # tensors
    ("tensor bad base64", "trace", lambda d: first_tensor(d).update(b64="!" * len(first_tensor(d)["b64"])),
     "not valid base64"),
    ("tensor bytes mismatch", "trace", lambda d: first_tensor(d).update(shape=[65]), "base64 characters"),
    ("tensor huge shape", "trace", lambda d: first_tensor(d).update(shape=[2**40, 2**40]), "spans"),
    ("tensor over the byte limit", "trace", lambda d: first_tensor(d).update(
        shape=[1 << 19], b64=base64.b64encode(bytes(1 << 20)).decode()), "the limit is"),
    ("tensor negative dim", "trace", lambda d: first_tensor(d).update(shape=[-64]), "non-negative integers"),
    ("tensor float dim", "trace", lambda d: first_tensor(d).update(shape=[64.0]), "non-negative integers"),
    ("tensor bool dim", "trace", lambda d: first_tensor(d).update(shape=[True]), "non-negative integers"),
    ("tensor shape a string", "trace", lambda d: first_tensor(d).update(shape="64"), "field 'shape'"),
    ("tensor 65 dims", "trace", lambda d: first_tensor(d).update(shape=[1] * 65), "dimensions"),
    ("tensor unknown dtype", "trace", lambda d: first_tensor(d).update(dtype="float128"),
     "unknown tensor dtype 'float128'"),
    ("tensor extra field", "trace", lambda d: first_tensor(d).update(strides=[1]), "unknown tensor field"),
    ("tensor b64 a number", "trace", lambda d: first_tensor(d).update(b64=0), "field 'b64'"),
    # references
    ("reference to a later node", "trace", lambda d: d["nodes"][1].update(args=[{"ref": 5}]),
     "refers to %5, a later node"),
    ("reference to itself", "trace", lambda d: d["nodes"][4].update(args=[{"ref": 4}, 2]), "node %4, field 'args'"),
    ("reference out of range", "trace", lambda d: d["nodes"][4].update(args=[{"ref": 10**9}, 2]), "does not exist"),
    ("cond out of range", "trace", lambda d: node(d, "log").update(cond=10**6), "field 'cond'"),
    ("cond on itself", "trace", lambda d: d["nodes"][4].update(cond=4), "node %4, field 'cond'"),
    ("cycle", "trace", lambda d: (d["nodes"][3].update(args=[{"ref": 4}, 0]),
                                  d["nodes"][4].update(args=[{"ref": 3}, 2])), "node %3, field 'args'"),
    ("reference to a value-less node", "trace", lambda d: node(d, "save", 4).update(args=[{"ref": _id(d, "log")}]),
     "which has no value"),
    ("invoke out of range", "trace", lambda d: d["nodes"][0].update(invoke=3), "node %0, field 'invoke'"),
    ("pass out of range", "trace", lambda d: d["nodes"][0].update({"pass": 1}), "node %0, field 'pass'"),
    ("iteration out of range", "generate", lambda d: d["nodes"][0].update(iteration=5), "field 'iteration'"),
    ("negative call", "trace", lambda d: d["nodes"][0].update(call=-1), "node %0, field 'call'"),
    ("iteration value used outside", "generate", lambda d: node(d, "save", name_of(d, "late")).pop("iteration"),
     "from an iteration block outside the block"),
    # names: modules, accesses, attributes, ops, saves
    ("unknown module", "trace", lambda d: d["nodes"][0].update(module="model.layers.99"),
     "no module 'model.layers\\[99\\]'"),
    ("dunder module", "trace", lambda d: d["nodes"][0].update(module="model.__class__"), "no private or dunder names"),
    ("private module", "trace", lambda d: d["nodes"][0].update(module="model._modules"), "field 'module'"),
    ("module with a slash", "trace", lambda d: d["nodes"][0].update(module="model/../etc"), "field 'module'"),
    ("module a number", "trace", lambda d: d["nodes"][0].update(module=3), "node %0, field 'module'"),
    ("module on a free node", "trace", lambda d: d["nodes"][1].update(module="lm_head"), "not bound to a module"),
    ("unknown access", "trace", lambda d: d["nodes"][0].update(access="weight"), "unknown access 'weight'"),
    ("dunder module_attr", "trace", lambda d: node(d, "module_attr").update(target="__dict__"), "must be public"),
    ("module_attr path", "trace", lambda d: node(d, "module_attr").update(target="weight.data"), "must be public"),
    ("dunder getattr", "trace", lambda d: getattr_node(d)["args"].__setitem__(1, "__class__"), "public attribute"),
    ("private getattr", "trace", lambda d: getattr_node(d)["args"].__setitem__(1, "_version"), "public attribute"),
    ("bound method as a value", "trace", lambda d: getattr_node(d)["args"].__setitem__(1, "to_json_file.__self__"),
     "public attribute"),
    ("op outside the whitelist", "trace", lambda d: d["nodes"][4].update(target="os.system"),
     "not in the operation whitelist"),
    ("op target a list", "trace", lambda d: d["nodes"][4].update(target=["operator.mul"]), "node %4, field 'target'"),
    ("key= callable", "trace", lambda d: d["nodes"][4].update(target="builtins.sorted", args=[{"ref": 3}],
                                                               kwargs={"key": {"ref": 2}}), "key= would call"),
    ("duplicated save name", "trace", lambda d: node(d, "save", 1).update(target=node(d, "save")["target"]),
     "save names must be unique"),
    ("empty save name", "trace", lambda d: node(d, "save").update(target=""), "field 'target'"),
    ("target on a getter", "trace", lambda d: d["nodes"][0].update(target="weight"), "has no target"),
    ("setter writes a string", "trace", lambda d: node(d, "setter").update(args=["rm -rf"]), "writes 'rm -rf'"),
    ("setter without value", "trace", lambda d: node(d, "setter").update(args=[]), "needs an argument"),
    ("getter with arguments", "trace", lambda d: d["nodes"][0].update(args=[1]), "takes 0 argument"),
    ("grad of a constant", "grad", lambda d: node(d, "grad").update(args=[1.0]), "must refer to a traced tensor"),
    ("backward with create_graph", "grad", lambda d: node(d, "backward").update(kwargs={"create_graph": True}),
     "node %"),
    ("apply remotely", "trace", lambda d: d["nodes"][4].update(kind="apply", target="builtins.print"),
     "run only locally"),
    # passes and inputs
    ("no passes", "trace", lambda d: d.update(passes=[]), "no passes"),
    ("pass kind", "trace", lambda d: d["passes"][0].update(kind="train"), "pass 0, field 'kind'"),
    ("no invokes", "trace", lambda d: d["passes"][0].update(invokes=[]), "pass 0, field 'invokes'"),
    ("trace options", "trace", lambda d: d["passes"][0].update(kwargs={"dict": [["max_new_tokens", 5]]}),
     "a trace takes no run options"),
    ("max_new_tokens 0", "generate", lambda d: gen_kwargs(d)[0].__setitem__(1, 0),
     "max_new_tokens must be an integer >= 1"),
    ("max_new_tokens negative", "generate", lambda d: gen_kwargs(d)[0].__setitem__(1, -5), "max_new_tokens must be"),
    ("max_new_tokens float", "generate", lambda d: gen_kwargs(d)[0].__setitem__(1, 2.0), "max_new_tokens must be"),
    ("max_new_tokens bool", "generate", lambda d: gen_kwargs(d)[0].__setitem__(1, True), "max_new_tokens must be"),
    ("max_new_tokens over the limit", "generate", lambda d: gen_kwargs(d)[0].__setitem__(1, 10_000),
     "max_new_tokens=10000; this server allows at most 3"),
    ("max_new_tokens missing", "generate", lambda d: gen_kwargs(d).clear(), "must set max_new_tokens"),
    ("generation option outside the set", "generate", lambda d: gen_kwargs(d).append(["num_beams", 4]),
     "option 'num_beams' is not allowed"),
    ("streamer option", "generate", lambda d: gen_kwargs(d).append(["streamer", "x"]), "option 'streamer'"),
    ("do_sample without a seed", "generate", lambda d: gen_kwargs(d).append(["do_sample", True]),
     "carries the seed of its draws"),
    ("negative temperature", "generate", lambda d: gen_kwargs(d).extend([["do_sample", True], ["seed", 1],
                                                                        ["temperature", -1.0]]),
     "temperature must be a number > 0"),
    ("top_p above one", "generate", lambda d: gen_kwargs(d).extend([["do_sample", True], ["seed", 1],
                                                                   ["top_p", 2.0]]), "top_p must be"),
    ("a seed past 2**63", "generate", lambda d: gen_kwargs(d).extend([["do_sample", True], ["seed", 2**70]]),
     "does not fit in 64 bits"),
    ("a negative seed", "generate", lambda d: gen_kwargs(d).extend([["do_sample", True], ["seed", -5]]),
     "seed must be"),
    ("do_sample a string", "generate", lambda d: gen_kwargs(d).append(["do_sample", "yes"]), "do_sample must be"),
    ("float token ids", "trace", lambda d: set_tokens(d, torch.ones(1, 8)),
     "int64 or int32 tensor, got a torch.float32"),
    ("1-d token ids", "trace", lambda d: set_tokens(d, torch.ones(8, dtype=torch.long)), "must be 2-d"),
    ("empty prompt", "trace", lambda d: (set_tokens(d, torch.ones(1, 0, dtype=torch.long)),
                                         set_tokens(d, torch.ones(1, 0, dtype=torch.long), "attention_mask")),
     "the prompt is empty"),
    ("all-padding row", "trace", lambda d: set_tokens(d, torch.zeros(1, 8, dtype=torch.long), "attention_mask"),
     "row 0 of the prompt is empty"),
    ("token id out of vocabulary", "trace", lambda d: set_tokens(d, torch.full((1, 8), 50_000)),
     "token id 50000 is outside the vocabulary"),
    ("negative token id", "trace", lambda d: set_tokens(d, torch.full((1, 8), -1)), "token id -1"),
    ("mask shape mismatch", "trace", lambda d: set_tokens(d, torch.ones(1, 7, dtype=torch.long), "attention_mask"),
     "attention_mask has shape [1, 7]"),
    ("mask values", "trace", lambda d: set_tokens(d, torch.full((1, 8), 2), "attention_mask"), "only 0 and 1"),
    ("module inputs remotely", "trace", lambda d: d["passes"][0].update(
        invokes=[{"dict": [["args", [1]], ["kwargs", {"dict": []}]]}]), "takes token inputs"),
    ("extra input", "trace", lambda d: d["passes"][0]["invokes"][0]["dict"].append(["labels", 1]),
     "field 'invokes[0].labels'"),
]


@pytest.mark.parametrize("name, base, edit, message", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_graph_is_refused_by_name(lm: Any, recorded: dict[str, dict[str, Any]], name: str, base: str,
                                          edit: Edit, message: str) -> None:
    data = copy.deepcopy(recorded[base])
    edit(data)
    text = json.dumps(data)
    with pytest.raises(GraphValidationError) as caught:
        validate_graph(InterventionGraph.from_json(text), **limits(lm))
    error = caught.value
    assert message in str(error) or re.search(message, str(error)), f"{name}: {error}"
    assert re.search(r"node %\d+|pass \d+|field '|format version|nest|no passes", str(error)), f"{name}: {error}"


def test_very_deep_json_is_refused(lm: Any, recorded: dict[str, dict[str, Any]]) -> None:
    text = json.dumps(recorded["trace"]).replace('"args": [{"ref": 3}, 2]',
                                                  '"args": [{"ref": 3}, ' + "[" * 100_000 + "]" * 100_000 + "]", 1)
    assert len(text) > 200_000
    with pytest.raises(GraphValidationError, match="nests too deeply"):
        InterventionGraph.from_json(text)


def test_errors_carry_node_and_field(lm: Any, recorded: dict[str, dict[str, Any]]) -> None:
    data = copy.deepcopy(recorded["trace"])
    data["nodes"][3]["args"][1]["tuple"][0] = {"slice": [None, {"ref": "x"}, None]}
    with pytest.raises(GraphValidationError) as caught:
        InterventionGraph.from_dict(data)
    assert (caught.value.node, caught.value.field) == (3, "args[1].tuple[0].slice[1].ref")
    assert str(caught.value).startswith("node %3, field 'args[1].tuple[0].slice[1].ref': ")
    data = copy.deepcopy(recorded["trace"])
    data["nodes"][4]["target"] = "builtins.exec"
    with pytest.raises(ForbiddenOperationError) as forbidden:
        validate_graph(InterventionGraph.from_dict(data), **limits(lm))
    assert (forbidden.value.node, forbidden.value.field) == (4, "target")


def test_hand_built_graphs_are_checked_too(lm: Any) -> None:
    """A graph built in memory (not decoded) gets the same rules, without recursion either."""
    with lm.trace(PROMPT, execute=False) as tracer:
        lm.model.layers[0].output.save()
    graph = tracer.graph
    deep: Any = 1
    for _ in range(5000):
        deep = [deep]
    graph.nodes[1].args = (deep,)
    with pytest.raises(GraphValidationError, match="node %1, field 'args': arguments nest more than 64"):
        validate_graph(graph, **limits(lm))
    loop: list[Any] = []
    loop.append(loop)
    graph.nodes[1].args = (loop,)
    with pytest.raises(GraphValidationError, match="nest more than"):
        validate_graph(graph, **limits(lm))
    graph.nodes[1].args = (Ref(0),)
    graph.nodes[1].call = "0"  # type: ignore[assignment]
    with pytest.raises(GraphValidationError, match="node %1, field 'call'"):
        validate_graph(graph, **limits(lm))


CHANGES_OF_AN_EARLIER_PASS: list[tuple[str, Callable[[Any, Any, Any], None]]] = [
    ("list.append", lambda lm, kept, h: kept.append(lm.model.layers[1].output)),
    ("list.extend", lambda lm, kept, h: kept.extend([lm.model.layers[1].output])),
    ("setitem", lambda lm, kept, h: h.__setitem__(slice(None), lm.model.layers[1].output)),
    ("iadd", lambda lm, kept, h: h.__iadd__(lm.model.layers[1].output)),
    ("Tensor.mul_", lambda lm, kept, h: h.mul_(2)),
]


@pytest.mark.parametrize("change", [c[1] for c in CHANGES_OF_AN_EARLIER_PASS],
                         ids=[c[0] for c in CHANGES_OF_AN_EARLIER_PASS])
def test_changing_a_value_of_an_earlier_pass_is_refused_remotely(lm: Any, change: Callable[[Any, Any, Any], None]) -> None:
    """A later trace of a session may read an earlier trace's values but not change them in place: each
    shard keeps its own copy of them, so the change would be lost. Locally the same graph is fine."""
    with lm.session() as session:
        kept = nd.list()
        with lm.trace(PROMPT):
            h = lm.model.layers[0].output * 1
        with lm.trace(PROMPT):
            change(lm, kept, h)
    validate_graph(session.graph, **{**limits(lm), "remote": False})
    with pytest.raises(GraphValidationError, match=r"changes in place .* a value of an earlier trace \(pass 0\)"):
        validate_graph(session.graph, **limits(lm))
    data = session.graph.to_dict()
    changer = next(n for n in reversed(data["nodes"]) if n["kind"] == "op" and n.get("pass") == 1)
    changer["pass"] = 0  # the same change inside the trace that made the value: allowed
    for node in data["nodes"]:
        node.pop("pass", None)
    data["passes"] = data["passes"][:1]
    validate_graph(InterventionGraph.from_dict(data), **limits(lm))


def test_node_and_constant_caps(lm: Any, recorded: dict[str, dict[str, Any]]) -> None:
    graph = InterventionGraph.from_json(json.dumps(recorded["trace"]))
    with pytest.raises(GraphValidationError, match="nodes; the limit is 5"):
        validate_graph(graph, **{**limits(lm), "max_nodes": 5})
    with pytest.raises(GraphValidationError, match="the limit is 5"):
        InterventionGraph.from_json(json.dumps(recorded["trace"]), max_nodes=5)
    with pytest.raises(GraphValidationError, match="bytes of tensors; the limit is 100"):
        validate_graph(graph, **{**limits(lm), "max_constant_bytes": 100})
    with pytest.raises(GraphValidationError, match="in all"):  # refused while decoding, before allocating
        InterventionGraph.from_json(json.dumps(recorded["trace"]), max_constant_bytes=100)
    with pytest.raises(GraphValidationError, match="node %3, field 'args': arguments nest more than 1 level"):
        validate_graph(graph, **{**limits(lm), "max_nesting": 1})


def test_tensor_codec_checks_before_allocating() -> None:
    good = {"dtype": "float32", "shape": [2], "b64": base64.b64encode(bytes(8)).decode()}
    assert tensor_from_json(good).shape == (2,)
    with pytest.raises(ValueError, match="the limit is 4"):
        tensor_from_json(good, max_bytes=4)
    for shape in ([2**62, 2**62], [10**30], [-1], [2, "2"]):
        with pytest.raises(ValueError, match="shape"):
            tensor_from_json({**good, "shape": shape})
    with pytest.raises(ValueError, match="base64 characters"):
        tensor_from_json({**good, "shape": [10**6]})   # counted, not allocated
    with pytest.raises(ValueError, match="not valid base64"):
        tensor_from_json({**good, "b64": "AAAA====AAA="})
    with pytest.raises(ValueError, match="needs 8"):
        tensor_from_bytes({"dtype": "float32", "shape": [2]}, b"\0" * 7)
    with pytest.raises(ValueError, match="dtype"):
        tensor_from_json([1, 2])  # type: ignore[arg-type]


# -- (b) mutations of recorded graphs -----------------------------------------------------------
TAGS = ["ref", "tuple", "dict", "slice", "ellipsis", "tensor", "dtype", "device", "size", "float", "complex"]
FIELDS = ["id", "kind", "target", "module", "access", "invoke", "iteration", "cond", "location", "args",
          "kwargs", "call", "pass", "version", "passes", "nodes", "iterations", "options", "invokes",
          "input_ids", "attention_mask", "max_new_tokens", "dtype", "shape", "b64", "store"]
NAMES = ["getter", "setter", "skip", "op", "module_call", "module_attr", "grad", "grad_setter", "backward",
         "save", "log", "apply", "result", "stop", "trace", "generate", "output", "input", "inputs",
         "getattr", "call", "operator.add", "builtins.sorted", "builtins.str", "Tensor.sum", "torch.ones",
         "model.layers.0", "model.layers.1.mlp", "lm_head", "", "weight", "__class__", "shape", "int64",
         "bfloat16", "cpu", "nan", "AAAA", "h"]
INTS = st.one_of(st.integers(-3, 12), st.sampled_from([-(2**63), 2**63, 2**64, 10**30, 2**31, 255, 256, 50_000]),
                 st.integers())
LEAVES = st.one_of(st.none(), st.booleans(), INTS, st.floats(), st.text(max_size=8), st.sampled_from(NAMES))


JSON_VALUES = st.one_of(
    LEAVES,
    st.recursive(LEAVES, lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.sampled_from(TAGS + FIELDS), st.text(max_size=4)), inner, max_size=3),
        st.builds(lambda tag, payload: {tag: payload}, st.sampled_from(TAGS), inner),
    ), max_leaves=8),
    st.integers(60, 700).map(nested),
)


def _positions(data: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every position in a JSON tree (the root excluded), parents before children."""
    out = []
    if isinstance(data, dict):
        for key, value in data.items():
            out.append((*path, key))
            out.extend(_positions(value, (*path, key)))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            out.append((*path, index))
            out.extend(_positions(value, (*path, index)))
    return out


def _parent(data: Any, path: tuple[Any, ...]) -> Any:
    for step in path[:-1]:
        data = data[step]
    return data


@st.composite
def mutated_graphs(draw: Any, recorded: dict[str, dict[str, Any]]) -> dict[str, Any]:
    data = copy.deepcopy(recorded[draw(st.sampled_from(sorted(recorded)))])
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["replace", "replace", "tweak", "tweak", "borrow", "delete",
                                       "duplicate", "swap"]))
        positions = _positions(data)
        nodes = data.get("nodes")
        if action in ("duplicate", "swap") and isinstance(nodes, list) and len(nodes) >= 2:
            i = draw(st.integers(0, len(nodes) - 1))
            j = draw(st.integers(0, len(nodes) - 1))
            if action == "duplicate":
                nodes.insert(j, copy.deepcopy(nodes[i]))
            else:
                nodes[i], nodes[j] = nodes[j], nodes[i]
            continue
        if not positions:
            break
        path = draw(st.sampled_from(positions))
        parent = _parent(data, path)
        if action == "delete":
            del parent[path[-1]]
        elif action == "tweak":  # a near miss: another small number, another known name
            value = parent[path[-1]]
            if type(value) is int:
                parent[path[-1]] = draw(st.integers(-2, 40))
            elif type(value) is str:
                parent[path[-1]] = draw(st.sampled_from(NAMES))
            else:
                parent[path[-1]] = draw(JSON_VALUES)
        elif action == "borrow":  # a value from elsewhere in the graph: plausible but misplaced
            source = draw(st.sampled_from(positions))
            parent[path[-1]] = copy.deepcopy(_parent(data, source)[source[-1]])
        else:
            parent[path[-1]] = draw(JSON_VALUES)
    return data


def run_mutated(lm: Any, data: dict[str, Any]) -> str:
    text = json.dumps(data)
    try:
        graph = InterventionGraph.from_json(text)
        validate_graph(graph, **limits(lm))
    except GraphValidationError:
        return "refused"
    try:
        run_graph(lm._module, graph, pad_token_id=lm.tokenizer.pad_token_id)
    except NNsightDaskError:
        return "failed"
    return "ran"


@settings(max_examples=2000, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_mutated_graphs_are_refused_by_name_or_run(lm: Any, recorded: dict[str, dict[str, Any]], data: Any) -> None:
    graph = data.draw(mutated_graphs(recorded))
    run_mutated(lm, graph)


def test_a_written_non_tensor_fails_with_a_named_error(lm: Any, recorded: dict[str, dict[str, Any]]) -> None:
    data = copy.deepcopy(recorded["trace"])
    shape = next(n for n in data["nodes"] if n.get("target") == "getattr" and n["args"][1] == "shape")
    node(data, "setter")["args"] = [{"ref": shape["id"]}]
    assert run_mutated(lm, data) == "failed"


def test_mutations_reach_every_outcome(lm: Any, recorded: dict[str, dict[str, Any]]) -> None:
    """The property test is not vacuous: its mutations are refused, fail at run time, or run."""
    outcomes = set()
    data = copy.deepcopy(recorded["generate"])
    outcomes.add(run_mutated(lm, data))
    node(data, "op", target="operator.mul")["args"][1] = "0.5"
    outcomes.add(run_mutated(lm, data))
    data["nodes"][0]["call"] = 1.5
    outcomes.add(run_mutated(lm, data))
    assert outcomes == {"ran", "failed", "refused"}


def earlier_input_graph(lm: Any) -> dict[str, Any]:
    """A valid session: a generation, then a trace whose input is the generated token ids."""
    with lm.session() as session:
        with lm.generate("The Eiffel Tower is in", max_new_tokens=2):
            ids = lm.generator.output.save()
        with lm.trace(ids):
            lm.output.logits.save()
    return session.graph.to_dict()


def set_input_ref(data: dict[str, Any], value: Any) -> None:
    data["passes"][1]["invokes"][0] = {"dict": [["input_ids", value]]}


def add_mask(data: dict[str, Any]) -> None:
    mask = data["passes"][0]["invokes"][0]["dict"][1]
    data["passes"][1]["invokes"][0]["dict"].append(mask)


@pytest.mark.parametrize("name, mutate, message", [
    ("a later pass's value", lambda d: set_input_ref(d, {"ref": len(d["nodes"]) - 1}), "must be a value of an earlier"),
    ("a node that does not exist", lambda d: set_input_ref(d, {"ref": 10_000}), "does not exist"),
    ("extra keys beside the reference", add_mask, "input_ids alone"),
])
def test_inputs_from_earlier_traces_are_checked(lm: Any, name: str, mutate: Callable[[dict[str, Any]], None],
                                                message: str) -> None:
    data = earlier_input_graph(lm)
    validate_graph(InterventionGraph.from_dict(copy.deepcopy(data)), **limits(lm))  # the valid form passes
    mutate(data)
    with pytest.raises(GraphValidationError, match=message):
        validate_graph(InterventionGraph.from_dict(data), **limits(lm))


def test_a_module_call_takes_only_the_hooked_access(lm: Any) -> None:
    with lm.trace("The Eiffel Tower is in", execute=False) as tracer:
        lm.lm_head(lm.model.norm(lm.model.layers[0].output, hook=True)).save()
    data = tracer.graph.to_dict()
    validate_graph(InterventionGraph.from_dict(copy.deepcopy(data)), **limits(lm))  # hook=True is valid
    call = next(n for n in data["nodes"] if n["kind"] == "module_call" and n.get("access"))
    call["access"] = "output"
    with pytest.raises(GraphValidationError, match="a module call's access is 'hooks'"):
        validate_graph(InterventionGraph.from_dict(data), **limits(lm))


# -- (c) on a shard under a tight policy: every operation bounded before it runs (issue 23) ----------------
BOUNDED_POLICY = nd.Policy(max_tensor_bytes=1 << 20, max_op_work=1e9, max_op_items=10**6,
                           max_experiment_bytes=16 << 20, max_new_tokens=MAX_NEW_TOKENS)


@pytest.fixture(scope="module")
def bounded() -> Any:
    """An in-process shard of the same tiny model (same seed) under :data:`BOUNDED_POLICY`."""
    actor = ShardActor(deployment="hostile-bounded", index=0, n_shards=1,
                       source=lambda: (tiny_llama(n_layer=2), tiny_tokenizer()), policy=BOUNDED_POLICY.to_dict())
    yield actor
    actor.close()


def run_bounded(actor: Any, data: dict[str, Any]) -> str:
    """Run a JSON graph on the bounded shard (the path a gateway user's graph takes): refused, failed
    with a named error, or ran; anything else (a raw exception) fails the test."""
    try:
        graph = InterventionGraph.from_json(json.dumps(data))
        validate_graph(graph, **limits(actor_lm_limits(actor)))
    except GraphValidationError:
        return "refused"
    stages = plan_stages(graph, assign_shards(graph, lambda path: 0, 1), 1)
    outcome = run_route([actor], {"mutant": graph.to_json()}, stages)["mutant"]
    if isinstance(outcome, GraphValidationError):
        return "refused"
    if isinstance(outcome, BaseException):
        assert isinstance(outcome, NNsightDaskError), f"{type(outcome).__name__}: {outcome}"
        return "failed"
    return "ran"


class _Limits:
    """What :func:`limits` reads from a LanguageModel, for the bounded shard's model."""

    def __init__(self, module: Any) -> None:
        self._module = module


def actor_lm_limits(actor: Any) -> Any:
    return _Limits(actor.server.runner.model)


OP_NAMES = sorted(registry()._by_name)


@st.composite
def retargeted_graphs(draw: Any, recorded: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A recorded graph whose operations call other whitelisted operations, with sizes of any magnitude."""
    data = copy.deepcopy(recorded[draw(st.sampled_from(sorted(recorded)))])
    ops = [n for n in data["nodes"] if n["kind"] == "op" and n.get("target") not in ("getattr", "call")]
    for op in draw(st.lists(st.sampled_from(ops), min_size=1, max_size=3)) if ops else []:
        op["target"] = draw(st.sampled_from(OP_NAMES))
        op["args"] = [arg if isinstance(arg, dict) else draw(st.one_of(INTS, st.just(arg)))
                      for arg in op.get("args", [])] + draw(st.lists(INTS, max_size=2))
    return data


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_mutated_graphs_on_a_bounded_shard_are_refused_by_name_or_run(bounded: Any, recorded: dict[str, dict[str, Any]],
                                                                   data: Any) -> None:
    """Mutations of valid graphs, and graphs whose operations call any whitelisted operation with sizes
    of any magnitude, run on a shard whose policy bounds every operation (1 MiB per tensor, 1e9 work
    units, 1e6 Python items, 16 MiB per experiment): each is refused or fails with a named error, or
    runs, and none holds the shard for long."""
    graph = data.draw(st.one_of(mutated_graphs(recorded), retargeted_graphs(recorded)))
    started = time.monotonic()
    run_bounded(bounded, graph)
    assert time.monotonic() - started < 10
    assert bounded.server.experiments == {}
