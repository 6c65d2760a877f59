"""Safe shared shards, items 1 and 2 of issue 11: the model cannot be changed, the whitelist cannot be escaped.

Tried as an attacker would, with real parts only: hostile traces recorded through the public tracer,
hostile graphs that bypass the tracer (an edited ``to_json()`` decoded with ``InterventionGraph.from_json``
and run with ``run_graph``, or sent to a deployment as is), first on a local tiny Llama, then on one
``LocalCluster`` deployment of two shards. After each: the parameters and buffers hash the same, and
another user's logits are bit-identical.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch

import nnsight_dask as nd
from nnsight_dask.errors import ForbiddenOperationError
from nnsight_dask.execution import run_graph
from nnsight_dask.graph import InterventionGraph, Ref
from nnsight_dask.graph.node import Kind, Node
from nnsight_dask.graph.ops import (
    DENIED_FAMILIES,
    MethodRef,
    check_op_call,
    check_result,
    denied_family,
    registry,
)

torch.set_num_threads(1)

PROMPT = "The Eiffel Tower is in the city of"
NAME = "safety-model"


def checksum(model: torch.nn.Module) -> tuple[float, str]:
    """Sum of every parameter and buffer (float64) and a SHA-256 of their names and bytes."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    digest, total = hashlib.sha256(), 0.0
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        total += float(tensor.double().sum())
        digest.update(name.encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return total, digest.hexdigest()


def logits_of(lm: Any) -> torch.Tensor:
    with lm.trace(PROMPT):
        logits = lm.output.logits.save()
    return logits


@pytest.fixture(scope="module")
def reference(local: Any) -> dict[str, Any]:
    """The local model's checksum and logits before any hostile trace."""
    return {"checksum": checksum(local._module), "logits": logits_of(local)}


def assert_untouched(lm: Any, reference: dict[str, Any]) -> None:
    assert checksum(lm._module) == reference["checksum"]
    assert torch.equal(logits_of(lm), reference["logits"])


# -- 1. writes reach copies only ----------------------------------------------------------------------------
def _weight(lm: Any) -> Any:
    return lm.lm_head.weight


WRITES: dict[str, Callable[[Any], Any]] = {
    "w[:] = 0": lambda lm: _weight(lm).__setitem__(slice(None), 0),
    "down_proj.weight.mul_(0)": lambda lm: lm.model.layers[0].mlp.down_proj.weight.mul_(0),
    "inv_freq buffer fill_": lambda lm: lm.model.rotary_emb.inv_freq.fill_(0),
    "original_inv_freq buffer zero_": lambda lm: lm.model.rotary_emb.original_inv_freq.zero_(),
    "in place on a view (t())": lambda lm: lm.model.embed_tokens.weight.t()[0].zero_(),
    "in place on a view (view(-1))": lambda lm: lm.model.layers[1].self_attn.q_proj.weight.view(-1).add_(1),
    "in place on a view (.T)": lambda lm: lm.model.norm.weight.unsqueeze(0).T.add_(5),
    "copy_ into a weight": lambda lm: lm.model.layers[2].input_layernorm.weight.copy_(torch.zeros(64)),
    "setitem with an index tensor": lambda lm: _weight(lm).__setitem__(torch.tensor([0, 3]), 7.0),
    "requires_grad_ then in place": lambda lm: _weight(lm).requires_grad_(False).zero_(),
    "embedding(max_norm=) renormalizes its weight": lambda lm: torch.nn.functional.embedding(
        lm.model.embed_tokens.input, lm.model.embed_tokens.weight, max_norm=0.01).save(),
    "torch.embedding_renorm_": lambda lm: torch.embedding_renorm_(
        lm.model.embed_tokens.weight, torch.tensor([1, 2, 3]), 0.01, 2.0),
}


@pytest.mark.parametrize("write", WRITES.values(), ids=WRITES.keys())
def test_writes_to_weights_change_only_copies(local: Any, reference: dict[str, Any], write: Any) -> None:
    with local.trace(PROMPT):
        write(local)
        logits = local.output.logits.save()
    assert torch.equal(logits, reference["logits"])  # this very trace ran on the model's weights
    assert_untouched(local, reference)  # and so do later ones


def test_weight_copies_are_copies_with_the_weights_values(local: Any, reference: dict[str, Any]) -> None:
    with local.trace(PROMPT):
        w = local.lm_head.weight
        before = w.clone().save()
        w[:] = 0
        after = w.save()
        freq = local.model.rotary_emb.inv_freq.save()
    assert torch.equal(before, local._module.lm_head.weight) and not torch.any(after)
    assert torch.equal(freq, local._module.model.rotary_emb.inv_freq)
    assert freq.untyped_storage().data_ptr() != local._module.model.rotary_emb.inv_freq.untyped_storage().data_ptr()
    assert_untouched(local, reference)


def test_generation_and_gradient_traces_leave_the_weights(local: Any, reference: dict[str, Any]) -> None:
    with local.generate(PROMPT, max_new_tokens=3) as tracer:
        with tracer.all():
            local.lm_head.weight.mul_(0)
        ids = tracer.result.save()
    with local.generate(PROMPT, max_new_tokens=3) as tracer:
        clean = tracer.result.save()
    assert torch.equal(ids, clean)
    with local.trace(PROMPT):
        w = local.lm_head.weight
        w.add_(1)
        g = local.model.layers[1].output.grad.save()
        (local.lm_head.input[:, -1] @ w.T).sum().backward()
    assert g.abs().sum() > 0
    local._module.zero_grad(set_to_none=True)
    assert_untouched(local, reference)


# -- 2. refused while recording ---------------------------------------------------------------------------------
def _out(lm: Any) -> Any:
    return lm.model.layers[0].output


def _self_holding_list() -> None:
    kept = nd.list(1)
    kept.append(nd.list(kept))  # recorded; refused when it runs (only then is the list known)


RECORDING: list[tuple[str, Callable[[Any], Any], str]] = [
    (".data write", lambda lm: _weight(lm).data.__setitem__(slice(None), 0), "'data'"),
    (".data assignment", lambda lm: setattr(_weight(lm), "data", torch.zeros(1)), "'data'"),
    ("set_", lambda lm: _weight(lm).set_(torch.zeros(1)), "set_"),
    ("untyped_storage", lambda lm: _weight(lm).untyped_storage(), "untyped_storage"),
    ("storage", lambda lm: _weight(lm).storage(), "storage"),
    ("data_ptr", lambda lm: _weight(lm).data_ptr(), "data_ptr"),
    ("as_strided method", lambda lm: _weight(lm).as_strided((2,), (1,)), "as_strided"),
    ("torch.as_strided", lambda lm: torch.as_strided(_weight(lm), (2,), (1,)), "as_strided"),
    ("out= into a weight", lambda lm: torch.mul(_out(lm), 0, out=_weight(lm)), "out="),
    ("out= into an activation", lambda lm: torch.add(_out(lm), 1, out=_out(lm)), "out="),
    ("numpy", lambda lm: _weight(lm).numpy(), "numpy"),
    ("register_hook", lambda lm: _out(lm).register_hook(print), "register_hook"),
    ("retain_grad of a weight", lambda lm: _weight(lm).retain_grad(), "copies"),
    ("share_memory_", lambda lm: _weight(lm).share_memory_(), "share_memory_"),
    ("pin_memory", lambda lm: _weight(lm).pin_memory(), "pin_memory"),
    ("empty_like", lambda lm: torch.empty_like(_out(lm)), "empty_like"),
    ("new_empty", lambda lm: _out(lm).new_empty(3), "new_empty"),
    ("resize_", lambda lm: _out(lm).resize_(3), "resize_"),
    ("grad_fn", lambda lm: lm.output.logits.grad_fn, "grad_fn"),
    (".grad of a weight", lambda lm: _weight(lm).grad, "copies"),
    ("assigning a weight", lambda lm: setattr(lm.lm_head, "weight", torch.nn.Parameter(torch.zeros(2))),
     "lm_head.weight"),
    ("save_pretrained", lambda lm: lm.output.save_pretrained("/tmp/stolen"), "save_pretrained"),
    ("to_json_file", lambda lm: lm.output.to_json_file("/tmp/config.json"), "to_json_file"),
    ("sort(key=)", lambda lm: nd.list(1, 2).sort(key=len), "len"),
    ("a function as argument", lambda lm: _out(lm).add(print), "callable"),
    ("a function in a list", lambda lm: nd.list(print), "callable"),
    ("a list holding itself", lambda lm: _self_holding_list(), "into itself"),
]


@pytest.mark.parametrize("hostile, match", [(f, m) for _, f, m in RECORDING], ids=[r[0] for r in RECORDING])
def test_hostile_recording_is_refused(local: Any, reference: dict[str, Any], hostile: Any, match: str) -> None:
    with pytest.raises(ForbiddenOperationError, match=re.escape(match)), local.trace(PROMPT):
        hostile(local)
    assert checksum(local._module) == reference["checksum"]


def test_data_reads_still_work(local: Any) -> None:
    with local.trace(PROMPT):
        out = local.output
        shape = out.logits.shape.save()
        dtype = local.lm_head.weight.dtype.save()
        keys = out.keys().save()
        top = out.logits[:, -1].topk(3).indices.save()
        flat = local.lm_head.weight.T.abs().sum().save()
        kept = nd.list()
        kept.append(shape)
        kept = kept.save()
    assert shape == torch.Size([1, 8, local._module.config.vocab_size]) and dtype == torch.float32
    assert "logits" in list(keys) and top.shape == (1, 3) and kept[0] == shape
    assert torch.allclose(flat, local._module.lm_head.weight.abs().sum())


# -- 3. refused when a hand-built graph bypasses the tracer -----------------------------------------------------
def base_graph(lm: Any) -> dict[str, Any]:
    """%0 = lm_head.weight (a copy), %1 = layers[0].output, %2 = the model's output; hostile nodes go after."""
    with lm.trace(PROMPT, execute=False) as tracer:
        lm.lm_head.weight  # noqa: B018
        lm.model.layers[0].output  # noqa: B018
        lm.output  # noqa: B018
    data = tracer.graph.to_dict()
    assert [n["kind"] for n in data["nodes"]] == ["module_attr", "getter", "getter"]
    return data


def op(target: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return {"kind": "op", "target": target, "args": list(args), "kwargs": kwargs}


def ref(i: int) -> dict[str, int]:
    return {"ref": i}


W, H, OUT = ref(0), ref(1), ref(2)

#: (label, nodes appended to the base graph, what the error names, refused statically by check_op_call).
JSON_GRAPHS: list[tuple[str, list[dict[str, Any]], str, bool]] = [
    ("getattr to_json_file", [op("getattr", OUT, "to_json_file")], "to_json_file", True),
    ("getattr save_pretrained", [op("getattr", H, "save_pretrained")], "save_pretrained", True),
    ("getattr __class__", [op("getattr", W, "__class__")], "__class__", True),
    ("getattr grad_fn", [op("getattr", H, "grad_fn")], "grad_fn", True),
    ("getattr data", [op("getattr", W, "data")], "data", True),
    ("getattr numpy", [op("getattr", W, "numpy")], "numpy", True),
    ("getattr of a model output's non-field", [op("getattr", OUT, "cache_position")], "cache_position", False),
    ("getattr of a method record's owner", [op("getattr", W, "abs"), op("getattr", ref(3), "owner")], "owner", False),
    ("module_attr save_pretrained", [{"kind": "module_attr", "module": "", "target": "save_pretrained"}],
     "save_pretrained", True),
    ("module_attr config", [{"kind": "module_attr", "module": "", "target": "config"}], "config", True),
    ("module_attr forward", [{"kind": "module_attr", "module": "lm_head", "target": "forward"}], "forward", True),
    ("submodule as a value", [{"kind": "module_attr", "module": "model", "target": "layers"}], "submodule", False),
    ("module_attr _modules", [{"kind": "module_attr", "module": "", "target": "_modules"}], "_modules", True),
    ("call a tensor", [op("call", H)], "only methods", False),
    ("sorted(key=)", [op("getattr", W, "abs"), op("builtins.sorted", [3, 1, 2], key=ref(3))], "key", True),
    ("max(key=)", [op("getattr", W, "abs"), op("builtins.max", [3, 1, 2], key=ref(3))], "key", True),
    ("out= into the weight", [op("torch.mul", H, 0, out=W)], "out=", True),
    ("out= into an activation", [op("torch.add", H, 1, out=H)], "out=", True),
    ("Tensor.set_", [op("Tensor.set_", W)], "set_", True),
    ("Tensor.untyped_storage", [op("Tensor.untyped_storage", W)], "untyped_storage", True),
    ("Tensor.storage", [op("Tensor.storage", W)], "storage", True),
    ("Tensor.data_ptr", [op("Tensor.data_ptr", W)], "data_ptr", True),
    ("torch.as_strided", [op("torch.as_strided", H, {"tuple": [4]}, {"tuple": [1]}, 0)], "as_strided", True),
    ("torch.manual_seed", [op("torch.manual_seed", 0)], "manual_seed", True),
    ("torch.seed", [op("torch.seed")], "seed", True),
    ("torch.set_default_dtype", [op("torch.set_default_dtype", {"dtype": "float64"})], "set_default_dtype", True),
    ("torch.set_default_device", [op("torch.set_default_device", "meta")], "set_default_device", True),
    ("torch.set_num_threads", [op("torch.set_num_threads", 8)], "set_num_threads", True),
    ("torch.use_deterministic_algorithms", [op("torch.use_deterministic_algorithms", True)],
     "use_deterministic_algorithms", True),
    ("torch.set_printoptions", [op("torch.set_printoptions", precision=1)], "set_printoptions", True),
    ("torch.set_flush_denormal", [op("torch.set_flush_denormal", True)], "set_flush_denormal", True),
    ("torch.save", [op("torch.save", W, "/tmp/stolen.pt")], "save", True),
    ("torch.load", [op("torch.load", "/etc/passwd")], "load", True),
    ("torch.from_file", [op("torch.from_file", "/etc/passwd")], "from_file", True),
    ("Tensor.numpy", [op("Tensor.numpy", W)], "numpy", True),
    ("Tensor.register_hook", [op("Tensor.register_hook", H, W)], "register_hook", True),
    ("Tensor.share_memory_", [op("Tensor.share_memory_", W)], "share_memory_", True),
    ("Tensor.pin_memory", [op("Tensor.pin_memory", W)], "pin_memory", True),
    ("Tensor.retain_grad", [op("Tensor.retain_grad", H)], "retain_grad", True),
    ("torch.empty", [op("torch.empty", 1024)], "empty", True),
    ("Tensor.new_empty", [op("Tensor.new_empty", H, {"tuple": [8]})], "new_empty", True),
    ("Tensor.resize_", [op("Tensor.resize_", H, 1 << 20)], "resize_", True),
    ("torch.sparse_coo_tensor", [op("torch.sparse_coo_tensor", [[99]], [1.0], {"tuple": [2]})],
     "sparse_coo_tensor", True),
    ("torch.fbgemm_linear_fp16_weight", [op("torch.fbgemm_linear_fp16_weight", H, W, W)], "fbgemm", True),
    ("segment_reduce(unsafe=True)", [op("torch.segment_reduce", H, "sum", unsafe=True)], "unsafe", True),
    ("zeros(pin_memory=True)", [op("torch.zeros", 2, pin_memory=True)], "pin_memory", True),
    ("Tensor.type with a type name", [op("Tensor.type", H, "torch.cuda.FloatTensor")], "Tensor.type", True),
    ("to another device", [op("Tensor.to", H, "cuda")], "cuda", False),
    ("Tensor.cuda", [op("Tensor.cuda", H)], "cuda", False),
    ("factory on another device", [op("torch.zeros", 2, device="cuda:1")], "cuda:1", False),
    ("backward(create_graph=True)", [op("Tensor.sum", H), {"kind": "backward", "args": [ref(3)],
                                                           "kwargs": {"create_graph": True}}], "create_graph", False),
    (".grad of a weight", [{"kind": "grad", "args": [W]}], "copies", False),
    ("a list set into itself", [op("builtins.list", [1]), op("operator.setitem", ref(3), 0, [ref(3)])],
     "into itself", False),
]


def hostile_graph(lm: Any, nodes: list[dict[str, Any]]) -> InterventionGraph:
    """The base graph with ``nodes`` appended, as JSON text and back (what a server receives)."""
    data = base_graph(lm)
    for node in nodes:
        data["nodes"].append({"id": len(data["nodes"]), **node})
    return InterventionGraph.from_json(json.dumps(data))


@pytest.mark.parametrize("nodes, match, static", [(n, m, s) for _, n, m, s in JSON_GRAPHS],
                         ids=[g[0] for g in JSON_GRAPHS])
def test_hostile_json_graphs_are_refused_when_run(local: Any, reference: dict[str, Any], nodes: Any, match: str,
                                                  static: bool) -> None:
    graph = hostile_graph(local, nodes)
    with pytest.raises(ForbiddenOperationError, match=re.escape(match)) as caught:
        run_graph(local._module, graph, pad_token_id=local.tokenizer.pad_token_id)
    assert caught.value.node is not None  # names the node (and its line when the tracer recorded one)
    last = graph.nodes[-1]
    if static and last.kind == Kind.OP:  # what the validator can refuse before anything runs
        with pytest.raises(ForbiddenOperationError, match=re.escape(match)):
            check_op_call(last.target, last.args, last.kwargs)  # type: ignore[arg-type]
    assert_untouched(local, reference)


def test_data_reads_through_json_graphs_run(local: Any) -> None:
    graph = hostile_graph(local, [
        op("getattr", W, "shape"), op("getattr", W, "abs"), op("call", ref(4)), op("getattr", OUT, "logits"),
        op("getattr", OUT, "keys"), op("call", ref(7)), op("builtins.sorted", [3, 1, 2]),
        {"kind": "module_attr", "module": "", "target": "training"},
        {"kind": "save", "target": "shape", "args": [ref(3)]}, {"kind": "save", "target": "abs", "args": [ref(5)]},
        {"kind": "save", "target": "logits", "args": [ref(6)]}, {"kind": "save", "target": "keys", "args": [ref(8)]},
        {"kind": "save", "target": "sorted", "args": [ref(9)]},
        {"kind": "save", "target": "training", "args": [ref(10)]},
    ])
    saves = run_graph(local._module, graph, pad_token_id=local.tokenizer.pad_token_id).saves
    weight = local._module.lm_head.weight
    assert saves["shape"] == weight.shape and torch.equal(saves["abs"], weight.abs())
    assert next(iter(saves["keys"])) == "logits" and saves["sorted"] == [1, 2, 3] and saves["training"] is False


def test_callables_in_graph_objects_are_refused(local: Any, reference: dict[str, Any]) -> None:
    """A graph built in Python (not JSON) can hold callables; the runtime refuses them anyway."""
    for node, match in [
        (Node(id=3, kind=Kind.OP, target="builtins.sorted", args=([3, 1, 2],), kwargs={"key": len}), "key"),
        (Node(id=3, kind=Kind.OP, target="torch.add", args=(Ref(1), print)), "callable"),
        (Node(id=3, kind=Kind.OP, target="builtins.list", args=([len],)), "callable"),
        (Node(id=3, kind=Kind.MODULE_CALL, module="lm_head", args=(Ref(1),), kwargs={"hook": print}), "callable"),
        (Node(id=3, kind=Kind.OP, target="call", args=(len, "abc")), "only methods"),
    ]:
        graph = hostile_graph(local, [])
        graph.nodes.append(node)
        with pytest.raises(ForbiddenOperationError, match=match):
            run_graph(local._module, graph, pad_token_id=local.tokenizer.pad_token_id)
    with pytest.raises(ForbiddenOperationError, match="callable"):
        check_result(local._module.lm_head, "operator.getitem")
    assert_untouched(local, reference)


def test_check_op_call_for_the_validator() -> None:
    check_op_call("torch.add", (Ref(0), 1), {})
    check_op_call("getattr", (Ref(0), "shape"), {})
    check_op_call("call", (Ref(0), 1), {"dim": 0})
    check_op_call("builtins.sorted", ([Ref(0), 2],), {"reverse": True})
    for name, args, kwargs, match in [
        ("torch.add", (Ref(0), 1), {"out": Ref(1)}, "out="),
        ("builtins.min", ([1, 2],), {"key": Ref(1)}, "key="),
        ("getattr", (Ref(0), "_modules"), {}, "private"),
        ("getattr", (Ref(0), "to_json_file"), {}, "to_json_file"),
        ("getattr", (Ref(0), 3), {}, "string"),
        ("os.system", ("id",), {}, "not in the whitelist"),
        ("torch.manual_seed", (0,), {}, "process-wide state"),
        ("call", (print,), {}, "only methods"),
    ]:
        with pytest.raises(ForbiddenOperationError, match=re.escape(match)):
            check_op_call(name, args, kwargs)
    ref_ = MethodRef(torch.ones(2), "add")
    check_op_call("call", (ref_, 1), {})
    with pytest.raises(ForbiddenOperationError, match="out="):
        check_op_call("call", (ref_, 1), {"out": torch.ones(2)})


def test_no_denied_or_dangerous_name_is_whitelisted() -> None:
    """The audit, re-run on this torch: ``dir(torch)`` and ``dir(torch.Tensor)`` against the denied families."""
    ops = registry()
    for spec in DENIED_FAMILIES.values():
        for name in spec.names:
            assert f"torch.{name}" not in ops and f"Tensor.{name}" not in ops, name
    danger = re.compile(r"seed|storage(?!_offset)|save|load|file|thread|numpy|ptr|^empty|^new$|hook|deterministic|"
                        r"printoptions|default|flush|share_memory|pin_memory|as_strided|resize|^set_|retain_grad|"
                        r"^apply_$|^map2?_$|dlpack|fbgemm|cudnn|miopen|^sparse_.*_tensor$")
    leaks = [f"{prefix}.{name}" for prefix, names in (("torch", dir(torch)), ("Tensor", dir(torch.Tensor)))
             for name in names if danger.search(name) and f"{prefix}.{name}" in ops]
    assert leaks == []
    whitelisted = [name for name in ops._by_name if denied_family(name) is not None]
    assert whitelisted == []
    assert "operator.setitem" in ops and "Tensor.requires_grad_" in ops and "Tensor.tolist" in ops


# -- 4. a shared deployment ------------------------------------------------------------------------------------------
def _shard_checksums(client: Any, name: str) -> dict[int, tuple[float, str]]:
    """Every shard's parameter/buffer checksum, read on its worker."""

    def on_worker(name: str) -> dict[int, tuple[float, str]]:
        import hashlib

        import torch

        from nnsight_dask.worker import registry

        found = {}
        for deployment, index in registry.held():
            if deployment != name:
                continue
            model = registry.lookup(deployment, index).server.runner.model
            tensors = dict(model.named_parameters(remove_duplicate=False))
            tensors.update(model.named_buffers(remove_duplicate=False))
            digest, total = hashlib.sha256(), 0.0
            for key in sorted(tensors):
                tensor = tensors[key].detach()
                if tensor.device.type == "meta":
                    continue
                total += float(tensor.double().sum())
                digest.update(key.encode())
                digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            found[index] = (total, digest.hexdigest())
        return found

    merged: dict[int, tuple[float, str]] = {}
    for shards in client.run(on_worker, name).values():
        merged.update(shards)
    return merged


@pytest.fixture(scope="module")
def deployment(client: Any, model_dir: str) -> dict[str, Any]:
    nd.serve(client, model_dir, shards=2, name=NAME)
    attacker = nd.RemoteModel(client, NAME)
    bystander = nd.RemoteModel(client, NAME)
    return {"attacker": attacker, "bystander": bystander, "logits": logits_of(bystander),
            "checksums": _shard_checksums(client, NAME)}


def assert_deployment_untouched(client: Any, deployment: dict[str, Any]) -> None:
    assert torch.equal(logits_of(deployment["bystander"]), deployment["logits"])
    assert _shard_checksums(client, NAME) == deployment["checksums"]


def test_remote_weight_writes_change_nothing(client: Any, deployment: dict[str, Any], local: Any) -> None:
    lm = deployment["attacker"]
    assert sorted(deployment["checksums"]) == [0, 1]
    assert torch.allclose(deployment["logits"], logits_of(local), atol=1e-5)
    with lm.trace(PROMPT):
        lm.lm_head.weight[:] = 0
        lm.model.layers[0].mlp.down_proj.weight.mul_(0)
        lm.model.rotary_emb.inv_freq.fill_(0)
        lm.model.embed_tokens.weight.t()[0].zero_()
        torch.embedding_renorm_(lm.model.embed_tokens.weight, torch.tensor([1, 2, 3]), 0.01, 2.0)
        zeroed = lm.lm_head.weight.abs().sum().save()
        logits = lm.output.logits.save()
    assert float(zeroed) > 0  # each read is a fresh copy
    assert torch.equal(logits, deployment["logits"])
    assert_deployment_untouched(client, deployment)


@pytest.mark.parametrize("hostile, match", [
    (lambda lm: lm.lm_head.weight.data.__setitem__(slice(None), 0), "'data'"),
    (lambda lm: torch.mul(lm.model.layers[0].output, 0, out=lm.model.layers[0].mlp.down_proj.weight), "out="),
    (lambda lm: lm.lm_head.weight.set_(torch.zeros(1)), "set_"),
], ids=["data", "out=", "set_"])
def test_remote_hostile_recording_is_refused(client: Any, deployment: dict[str, Any], hostile: Any,
                                             match: str) -> None:
    with pytest.raises(ForbiddenOperationError, match=re.escape(match)), deployment["attacker"].trace(PROMPT):
        hostile(deployment["attacker"])


REMOTE_GRAPHS = [g for g in JSON_GRAPHS if g[0] in {
    "module_attr save_pretrained", "module_attr config", "submodule as a value", "getattr to_json_file",
    "getattr grad_fn", "call a tensor", "sorted(key=)", "out= into the weight", "Tensor.set_",
    "torch.manual_seed", "torch.set_default_dtype", "to another device", ".grad of a weight"}]


@pytest.mark.parametrize("nodes, match", [(n, m) for _, n, m, _ in REMOTE_GRAPHS], ids=[g[0] for g in REMOTE_GRAPHS])
def test_remote_hostile_graphs_are_refused(client: Any, deployment: dict[str, Any], nodes: Any, match: str) -> None:
    """Sent as is, past the tracer: refused (by the client's checks or on the shards) with the named error."""
    lm = deployment["attacker"]
    graph = hostile_graph(lm, nodes)
    with pytest.raises(ForbiddenOperationError, match=re.escape(match)):
        lm.backend_for(client).run(graph)


def test_remote_deployment_is_untouched_after_the_attacks(client: Any, deployment: dict[str, Any]) -> None:
    assert_deployment_untouched(client, deployment)


def test_remote_data_reads_still_work(deployment: dict[str, Any]) -> None:
    lm = deployment["attacker"]
    with lm.trace(PROMPT):
        shape = lm.output.logits.shape.save()
        keys = lm.output.keys().save()
        w = lm.model.layers[0].mlp.down_proj.weight.sum().save()
    assert shape[-1] == lm._module.config.vocab_size and "logits" in list(keys)
    assert torch.isfinite(w)

