"""Every operation a graph may name is bounded before it runs (issue 23 items 1 and 2), in-process.

- The rule table (``graph/op_rules.py``) covers the whole whitelist, every estimate bounds what the
  operation really makes (a battery of arguments and a property test), and work estimates follow
  the time operations take.
- On a shard (an in-process ``ShardActor``, the real path), the red team's allocations are refused
  under ``max_tensor_bytes=1 MiB`` with the rule, the operation and the user's line; operations that
  never yield (``sum(range(2e9))``, huge products) are refused by ``max_op_work``/``max_op_items``
  before they start; one experiment's values are bounded by ``max_experiment_bytes``; a cancel stops
  an experiment between two of its nodes, not only before a decoder layer.

The same on a real LocalCluster, with another user's latency as the measure: ``test_op_bounds_cluster.py``.
"""
from __future__ import annotations

import math
import threading
import time
import warnings
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nnsight_dask as nd
from nnsight_dask.errors import ForbiddenOperationError, PolicyError
from nnsight_dask.execution.partition import assign_shards
from nnsight_dask.execution.stage import plan_stages
from nnsight_dask.graph import InterventionGraph, Ref
from nnsight_dask.graph import op_rules, shapes
from nnsight_dask.graph.allocation import ExperimentBudget, OpBounds, check_cost, measured_rates
from nnsight_dask.graph.node import Kind, Node
from nnsight_dask.graph.ops import KEY_FUNCTIONS, MethodRef, check_op_call, container_method_names, registry
from nnsight_dask.graph.validate import validate_graph
from nnsight_dask.models import owner_of, tiny_llama
from nnsight_dask.worker.plugin import cancel_experiments
from nnsight_dask.worker.registry import ExperimentCancelledError
from nnsight_dask.worker.shard_actor import ShardActor

torch.set_num_threads(1)
PROMPT = "The Eiffel Tower is in the city of"


# -- the table ------------------------------------------------------------------------------------------
def whitelist() -> list[str]:
    return sorted(registry()._by_name) + container_method_names() + ["getattr"]


def test_every_whitelisted_operation_has_a_rule() -> None:
    """Each name: a size/work estimate, or declared a view / non-allocating (with the reason), or
    refused on shared deployments (with the reason). No name falls through to "unbounded"."""
    missing, unexplained = [], []
    for name in whitelist():
        rule = op_rules.rule_for(name)
        if rule is None:
            missing.append(name)
            continue
        assert rule.kind in op_rules.KINDS, name
        if rule.kind == op_rules.REFUSED:
            assert rule.estimate is None and rule.reason, name
        else:
            assert rule.estimate is not None, name
        if rule.kind in (op_rules.VIEW, op_rules.NO_ALLOCATION, op_rules.REFUSED) and not rule.reason:
            unexplained.append(name)
    assert not missing, f"whitelisted operations without a cost rule: {missing}"
    assert not unexplained, f"views, non-allocating or refused operations without a reason: {unexplained}"


def test_the_table_names_only_whitelisted_operations() -> None:
    names = set(whitelist())
    shorts = {n.partition(".")[2] for n in names if n.startswith(("torch.", "Tensor.")) and n.count(".") == 1}
    stale = [n for n in op_rules.rules() if n not in names and n.partition(".")[2] not in shorts]
    assert not stale, f"rules for names outside the whitelist: {stale}"


def test_refused_operations_are_refused_before_a_remote_graph_is_queued(lm: Any) -> None:
    graph = hostile(lm, [("torch.lstm_cell", ("h", ("h", "h"), "h", "h"), {})])
    with pytest.raises(ForbiddenOperationError, match=r"torch\.lstm_cell is refused on a shared deployment: "
                                                      r"recurrent kernels"):
        validate_graph(graph, remote=True)
    validate_graph(graph, remote=False)  # locally it may run


# -- estimates are upper bounds -------------------------------------------------------------------------
def _arguments() -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    a, b, v = torch.rand(3, 4) + 0.1, torch.rand(4, 5) + 0.1, torch.rand(4) + 0.1
    q, m, h = torch.rand(2, 3, 4) + 0.1, torch.rand(4, 4) + 4 * torch.eye(4), torch.rand(2, 5, 8, dtype=torch.bfloat16)
    ids, ints = torch.tensor([0, 2, 1]), torch.randint(0, 5, (2, 3))
    mask = torch.tensor([True, False, True])
    return [((a,), {}), ((a, a), {}), ((a, 1), {}), ((a, -1), {}), ((a, 0), {}), ((v, v), {}), ((a, b), {}),
            ((m,), {}), ((m, m), {}), ((q, -1), {}), ((q, 1), {}), ((v,), {}), ((ids,), {}), ((ids, 5), {}),
            ((a, 2), {}), ((q, q), {}), ((a, (2, 2)), {}), ((a, [1, 0]), {}), ((a, 0, ids[:2]), {}),
            ((a, 1, ids), {}), (((3, 4),), {}), ((5,), {}), ((2, 3), {}), ((a, 1, ids, a[:, :3]), {}),
            ((a, mask[:, None].expand(3, 4), 1.0), {}), (([a, a],), {}), (([a, a], 0), {}), ((a, 3), {}),
            ((m, 3), {}), ((m, -1), {}), ((v, v, v), {}), ((a, a, a), {}), ((q, q, q), {}), ((a, 2, 1), {}),
            ((ids, v), {}), ((h,), {}), ((h,), {"dim": -1}), ((h,), {"dim": 1, "keepdim": True}),
            ((h, -1), {"keepdim": True}), ((torch.tensor(3.0),), {}), ((torch.zeros(0, 4),), {}),
            ((torch.zeros(0, 4), 0), {}), ((ints,), {}), ((ints, 1), {}), ((h, h), {}), ((h, 2), {}),
            ((h,), {"dtype": torch.float64}), ((ints, ints), {}), ((h, (0, 2)), {}), ((h, (1, 1, 2, 2)), {}),
            ((ints,), {"num_classes": 7}), ((ints.flatten(),), {"minlength": 9}), (((2, 3),), {"dtype": torch.float16}),
            ((0, 7, (3,)), {}), ((7,), {}), ((5, 6), {"offset": 1}), ((h, 3), {"dim": 1}),
            (("ij,jk->ik", torch.rand(2, 3), torch.rand(3, 4)), {}), (("bij,bjk", torch.rand(2, 2, 3), torch.rand(2, 3, 4)), {}),
            (("...ij,...jk->...ik", torch.rand(2, 2, 3), torch.rand(3, 4)), {}), (("ii->i", torch.rand(3, 3)), {}),
            (("i,i,i->", torch.rand(3), torch.rand(3), torch.rand(3)), {}), ((range(10),), {}), (([1, 2, 3],), {}),
            (([[1, 2], [3, 4]],), {}), (([h, h],), {}), ((torch.rand(1, 2, 16), torch.rand(3, 2, 4)), {"padding": 2}),
            ((torch.rand(1, 2, 16), torch.rand(2, 3, 4)), {"stride": 2}), ((torch.rand(1, 2, 16), 3), {}),
            ((torch.rand(1, 2, 16), 3), {"stride": 1, "padding": 1}), ((torch.rand(32),), {"n_fft": 8, "return_complex": True}),
            ((torch.rand(16),), {"n": 40}), ((torch.rand(4, 4),), {"s": (6, 7)}),
            ((torch.rand(2, 3, 4), torch.rand(2, 5, 4), torch.rand(2, 5, 6)), {}), ((torch.rand(6, 4), torch.rand(3, 4)), {}),
            ((torch.rand(5, 4),), {"indexing": "ij"}), (([0, 1, 2], 3), {}), (([0], [1, 2]), {}), ((2, 100), {}),
            (("%5d", 3), {}), ((3, 7), {})]


def new_bytes(value: Any, inputs: Any) -> int:
    """Bytes of the storages in ``value`` that none of ``inputs`` had."""
    known = {t.untyped_storage().data_ptr() for t in shapes.tensors(inputs, 3)}
    total, seen = 0, set()
    for t in shapes.tensors(value, 3):
        pointer = t.untyped_storage().data_ptr()
        if pointer not in known and pointer not in seen:
            seen.add(pointer)
            total += t.untyped_storage().nbytes()
    return total


def outcome(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[op_rules.Cost | None, int | None]:
    """The estimate and, when the operation runs on these arguments, the bytes it really made."""
    args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
    cost = op_rules.estimate(name, args, kwargs)
    if name.endswith("_") or name.partition(".")[0] not in ("torch", "Tensor", "builtins", "operator"):
        return cost, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = registry().resolve(name)(*args, **kwargs)
    except Exception:
        return cost, None
    return cost, new_bytes(value, (args, kwargs))


def bounded_names() -> list[str]:
    return [n for n in sorted(registry()._by_name) if op_rules.rule_for(n).kind != op_rules.REFUSED]  # type: ignore[union-attr]


def test_estimates_never_fail_and_bound_what_operations_make() -> None:
    under: dict[str, Any] = {}
    for name in bounded_names():
        for args, kwargs in _arguments():
            cost, made = outcome(name, args, kwargs)  # an estimate that raised would fail the test here
            assert isinstance(cost, op_rules.Cost), name
            if made is not None and made > max(cost.bytes, 64):
                under.setdefault(name, (args, kwargs, made, cost.bytes))
    assert not under, f"estimates below what the operation made: {under}"


_SHAPES = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)
_TENSORS = st.builds(lambda shape, dtype: (torch.rand(shape) * 4).to(dtype), _SHAPES,
                     st.sampled_from([torch.float32, torch.bfloat16, torch.float64, torch.int64, torch.bool]))
_ARGS = st.one_of(_TENSORS, st.integers(-3, 6), st.sampled_from([None, 0.5, (2, 3), [1, 0], True, "ij->ji", range(4)]))


@settings(max_examples=600, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_random_calls_of_random_operations_stay_within_their_estimate(data: Any) -> None:
    name = data.draw(st.sampled_from(bounded_names()))
    args = tuple(data.draw(st.lists(_ARGS, min_size=1, max_size=4)))
    cost, made = outcome(name, args, {})
    assert isinstance(cost, op_rules.Cost)
    assert made is None or made <= max(cost.bytes, 64), (name, args, made, cost)


@pytest.mark.parametrize("name, args", [
    ("torch.matmul", (torch.rand(384, 384), torch.rand(384, 384))),
    ("torch.bmm", (torch.rand(8, 128, 128), torch.rand(8, 128, 128))),
    ("torch.einsum", ("bij,bjk->bik", torch.rand(8, 128, 128), torch.rand(8, 128, 128))),
    ("Tensor.sort", (torch.rand(400_000),)),
    ("torch.linalg.svd", (torch.rand(160, 160),)),
    ("torch.cdist", (torch.rand(400, 64), torch.rand(400, 64))),
    ("torch.conv1d", (torch.rand(1, 16, 4096), torch.rand(16, 16, 9))),
    ("torch.special.zeta", (torch.rand(100_000) + 1.5, torch.rand(100_000) + 1)),
    ("Tensor.exp", (torch.rand(2_000_000),)),
    ("builtins.sum", (range(2_000_000),)),
    ("builtins.sorted", (list(range(300_000, 0, -1)),)),
])
def test_work_estimates_follow_the_time_operations_take(name: str, args: tuple[Any, ...]) -> None:
    """An estimate turned into seconds at this process's measured rates is not far below the time the
    operation takes (so ``max_op_work``/``max_op_items`` bound time), whatever the kind of operation."""
    work_rate, item_rate = measured_rates()
    cost = op_rules.estimate(name, args, {})
    assert cost is not None
    estimated = cost.work / work_rate + cost.items / item_rate
    fn = registry().resolve(name)
    fn(*args)  # warm up
    took = min(_timed(fn, args) for _ in range(3))
    assert took <= 8 * estimated + 0.02, f"{name}: took {took:.3f} s, estimated {estimated:.3f} s"


def _timed(fn: Any, args: tuple[Any, ...]) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


# -- interpretability on big models passes ------------------------------------------------------------
def big(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")  # shapes only: estimates never compute


HIDDEN, SEQ, VOCAB, HEADS, FEATURES = 16384, 8192, 262144, 128, 131072
NORMAL_OPS = [
    ("logit lens at every position", "torch.nn.functional.linear", (big(1, SEQ, HIDDEN), big(VOCAB, HIDDEN))),
    ("attention pattern of one layer", "torch.matmul", (big(1, HEADS, SEQ, 128), big(1, HEADS, 128, SEQ))),
    ("attention by einsum", "torch.einsum", ("bhqd,bhkd->bhqk", big(1, HEADS, SEQ, 128), big(1, HEADS, SEQ, 128))),
    ("SAE encoder", "operator.matmul", (big(SEQ, HIDDEN), big(HIDDEN, FEATURES))),
    ("log-softmax over the vocabulary", "Tensor.log_softmax", (big(1, SEQ, VOCAB), -1)),
    ("top-k tokens", "Tensor.topk", (big(1, SEQ, VOCAB), 10)),
    ("patch a position", "operator.setitem", (big(1, SEQ, HIDDEN), (slice(None), -1), big(1, HIDDEN))),
    ("mean activation", "Tensor.mean", (big(1, SEQ, HIDDEN), 1)),
    ("cosine similarity to a direction", "torch.nn.functional.cosine_similarity", (big(1, SEQ, HIDDEN), big(HIDDEN))),
    ("steering vector added", "operator.add", (big(1, SEQ, HIDDEN), big(HIDDEN))),
    ("PCA of activations", "torch.linalg.svd", (big(4096, HIDDEN, dtype=torch.float32),)),
]


@pytest.mark.parametrize("what, name, args", NORMAL_OPS, ids=[o[0] for o in NORMAL_OPS])
def test_normal_interpretability_ops_on_a_big_model_pass_a_gpu_shards_default(what: str, name: str,
                                                                              args: tuple[Any, ...]) -> None:
    """Hidden 16384, 8192 tokens, a 256k vocabulary: each op fits the work bound a shard derives on a
    GPU measured at 2.5e14 work units/s (an A100 in bf16) with the default op-seconds (0.5 s); the
    policy's byte bounds are the operator's to size for such a model (the logits alone are 4 GiB)."""
    bounds = OpBounds(max_op_work=2.5e14 * nd.config.op_seconds, max_op_items=10**7)
    check_cost(name, args, {}, bounds, "probe.py:1")


# -- on a shard: the red team's operations ---------------------------------------------------------------
def shard(tiny_tokenizer: Any, name: str, **policy: Any) -> ShardActor:
    return ShardActor(deployment=name, index=0, n_shards=1, source=lambda: (tiny_llama(n_layer=4), tiny_tokenizer),
                      policy=nd.Policy(**policy).to_dict())


def hostile(lm: Any, ops: list[tuple[str, tuple[Any, ...], dict[str, Any]]]) -> InterventionGraph:
    """A graph reading layer 0's output, then the operations ``ops`` (``Ref(-k)``: the value of the
    k-th operation before; ``"h"``: the activation), each on its own line of ``hog.py``, the last saved."""
    with lm.trace(PROMPT, execute=False) as tracer:
        lm.model.layers[0].output.save()
    graph = tracer.graph
    getter = next(n.id for n in graph.nodes if n.kind == Kind.GETTER)

    def bind(value: Any, position: int) -> Any:
        if isinstance(value, str) and value == "h":
            return Ref(getter)
        if isinstance(value, Ref) and value.id < 0:
            return Ref(position + value.id)
        if isinstance(value, tuple):
            return tuple(bind(v, position) for v in value)
        if isinstance(value, list):
            return [bind(v, position) for v in value]
        return value

    for line, (target, args, kwargs) in enumerate(ops, start=1):
        position = len(graph.nodes)
        graph.nodes.append(Node(id=position, kind=Kind.OP, target=target, args=bind(args, position),
                                kwargs={k: bind(v, position) for k, v in kwargs.items()}, location=f"hog.py:{line}"))
    graph.nodes.append(Node(id=len(graph.nodes), kind=Kind.SAVE, target="hog", args=(Ref(len(graph.nodes) - 1),)))
    return graph


def run_on(actor: ShardActor, graph: InterventionGraph, experiment: str) -> Any:
    (stage,) = plan_stages(graph, assign_shards(graph, lambda path: owner_of(actor.plan, path), 1), 1)
    return actor.server.run(experiment, stage, graph.to_json(), None, True)


RED_TEAM_ALLOCATIONS: dict[str, list[tuple[str, tuple[Any, ...], dict[str, Any]]]] = {
    # each made 4-33x the 1 MiB bound in the red team's run; the last operation is the one refused
    "torch.randint": [("torch.randint", (0, 10, (1 << 20,)), {})],
    "torch.randperm": [("torch.randperm", (1 << 20,), {})],
    "torch.tril_indices": [("torch.tril_indices", (4096, 4096), {})],
    "torch.nn.functional.one_hot": [("Tensor.argmax", ("h", -1), {}),
                                    ("torch.nn.functional.one_hot", (Ref(-1),), {"num_classes": 65536})],
    "torch.einsum": [("torch.ones", (2048,), {}), ("torch.ones", (2048,), {}),
                     ("torch.einsum", ("i,j->ij", Ref(-2), Ref(-1)), {})],
    "torch.nn.functional.pad": [("torch.nn.functional.pad", ("h", (0, 1 << 20)), {})],
    "torch.bincount": [("torch.zeros", (4,), {"dtype": torch.int64}),
                       ("torch.bincount", (Ref(-1),), {"minlength": 4 << 20})],
}


@pytest.mark.parametrize("target", sorted(RED_TEAM_ALLOCATIONS))
def test_the_red_teams_allocations_are_refused_under_one_mib(lm: Any, tiny_tokenizer: Any, target: str) -> None:
    actor = shard(tiny_tokenizer, f"alloc-{target}", max_tensor_bytes=1 << 20)
    try:
        graph = hostile(lm, RED_TEAM_ALLOCATIONS[target])
        line = len(RED_TEAM_ALLOCATIONS[target])
        with pytest.raises(PolicyError, match=rf"hog\.py:{line}: {target} would make a tensor of [\d,]+ bytes; this "
                                              r"deployment allows at most 1,048,576 bytes per tensor \(max_tensor_bytes\)") \
                as info:
            run_on(actor, graph, "hog")
        assert (info.value.rule, info.value.op) == ("max_tensor_bytes", target)
        assert actor.server.experiments == {}
    finally:
        actor.close()


NEVER_YIELDING = [  # each would hold the shard for seconds to hours; refused in microseconds
    ("builtins.sum over range(2e9)", [("builtins.range", (2_000_000_000,), {}), ("builtins.sum", (Ref(-1),), {})],
     "max_op_items", "builtins.sum would walk 2,000,000,000 Python items"),
    ("a 6k x 6k product", [("Tensor.new_ones", ("h", (6144, 6144)), {}), ("operator.matmul", (Ref(-1), Ref(-1)), {})],
     "max_op_work", r"operator\.matmul would do about [\d.e+]+ units of work \(about [\d.e+]+ s on this shard\)"),
    ("matrix_power", [("Tensor.new_ones", ("h", (2048, 2048)), {}), ("torch.linalg.matrix_power", (Ref(-1), 2**40), {})],
     "max_op_work", "torch.linalg.matrix_power would do about"),
    ("an einsum of four letters", [("Tensor.new_ones", ("h", (1024, 1024)), {}),
                                   ("torch.einsum", ("ij,kl->", Ref(-1), Ref(-1)), {})],
     "max_op_work", "torch.einsum would do about"),
    ("a polynomial of degree 1e12", [("torch.special.hermite_polynomial_h", ("h", 10**12), {})],
     "max_op_work", "hermite_polynomial_h would do about"),
    ("diff 1e9 times", [("torch.diff", ("h",), {"n": 10**9})], "max_op_work", "torch.diff would do about"),
    ("a big integer", [("operator.pow", (3, 10**9), {})], "max_op_items", "operator.pow would walk"),
    ("sorted of 1e7 items", [("builtins.range", (10**7,), {}), ("builtins.sorted", (Ref(-1),), {})],
     "max_op_items", "builtins.sorted would walk"),
]


@pytest.mark.parametrize("graph_ops, rule, message", [o[1:] for o in NEVER_YIELDING], ids=[o[0] for o in NEVER_YIELDING])
def test_operations_that_never_yield_are_refused_before_they_start(lm: Any, tiny_tokenizer: Any, graph_ops: Any,
                                                                   rule: str, message: str) -> None:
    """With the default policy: the shard derives max_op_work and max_op_items from its own speed."""
    actor = shard(tiny_tokenizer, "never-yields")
    try:
        started = time.monotonic()
        with pytest.raises(PolicyError, match=message) as info:
            run_on(actor, hostile(lm, graph_ops), "hog")
        assert info.value.rule == rule and "hog.py:" in str(info.value)
        assert time.monotonic() - started < 2.0
    finally:
        actor.close()


def test_one_experiments_values_are_bounded_in_all(lm: Any, tiny_tokenizer: Any) -> None:
    """Three tensors each within max_tensor_bytes, together over max_experiment_bytes: the one that
    would cross it is refused, naming what the experiment already holds."""
    mib = 1 << 20
    actor = shard(tiny_tokenizer, "memory", max_tensor_bytes=4 * mib, max_experiment_bytes=10 * mib)
    try:
        ones = ("torch.ones", (mib,), {})  # 4 MiB of float32 each
        graph = hostile(lm, [ones, ones, ("operator.add", (Ref(-1), Ref(-2)), {})])
        with pytest.raises(PolicyError, match=r"hog\.py:3: operator\.add would make 4,194,304 bytes while this "
                                              r"experiment's values already hold 8,388,608; .* at most 10,485,760 "
                                              r"bytes at once \(max_experiment_bytes") as info:
            run_on(actor, graph, "big")
        assert info.value.rule == "max_experiment_bytes"
        assert run_on(actor, hostile(lm, [ones, ones]), "fits")["hog"].shape == (mib,)  # two fit
    finally:
        actor.close()


def test_the_budget_counts_new_storages_until_they_are_freed() -> None:
    budget = ExperimentBudget(OpBounds(max_experiment_bytes=1000))
    h = torch.zeros(100)  # an activation: not the experiment's
    cost = budget.check_op("Tensor.view", (h, 10, 10), {}, "x.py:1")
    budget.account(h.view(10, 10), ((h,), {}), cost)
    assert budget.held == 0  # a view of an input
    made = torch.ones(200)
    budget.account(made, ((), {}), budget.check_op("torch.ones", (200,), {}, "x.py:2"))
    assert budget.held == 800
    with pytest.raises(PolicyError, match="max_experiment_bytes"):
        budget.check_op("torch.ones", (100,), {}, "x.py:3")
    del made
    assert budget.held == 0  # freed: room again
    budget.check_op("torch.ones", (100,), {}, "x.py:4")


# -- stopping between nodes -----------------------------------------------------------------------------
def test_a_cancel_stops_an_experiment_between_two_of_its_nodes(lm: Any, tiny_tokenizer: Any) -> None:
    """A hog spreading heavy products over the hooks of one decoder layer's submodules: before, the
    stop was checked only before decoder layers, so all of them ran after the cancel (11 s in the red
    team's run); now the cancel ends it after the product running when it came."""
    actor = shard(tiny_tokenizer, "between-nodes")
    size = 1024
    with lm.trace(PROMPT, execute=False) as tracer:
        total = 0
        for module in (lm.model.layers[0].self_attn, lm.model.layers[0].mlp):
            x = module.output[0] if module is lm.model.layers[0].self_attn else module.output
            big = x.new_ones((size, size))
            for _ in range(60):
                total = total + (big @ big).sum()
        total.save()
    one = _timed(torch.matmul, (torch.ones(size, size), torch.ones(size, size)))
    try:
        # an id of its own: stop flags are per process, and other tests run experiments named "hog"
        timer = threading.Timer(0.3, cancel_experiments, args=(["cancelled-hog"], "cancelled by its owner"))
        started = time.monotonic()
        timer.start()
        with pytest.raises(ExperimentCancelledError, match="cancelled by its owner"):
            run_on(actor, tracer.graph, "cancelled-hog")
        stopped = time.monotonic() - started
        print(f"\n120 products of {one * 1000:.0f} ms each; the cancel at 0.3 s ended the stage at {stopped:.2f} s")
        assert stopped < 0.3 + 3 * one + 0.3
        assert actor.server.experiments == {}
        assert run_on(actor, hostile(lm, [("Tensor.sum", ("h",), {})]), "next")["hog"].shape == ()  # serves on
    finally:
        actor.close()


# -- the key= table ---------------------------------------------------------------------------------------
def test_key_functions_are_one_table_for_static_and_run_time_checks(lm: Any) -> None:
    assert "list.sort" in KEY_FUNCTIONS and "builtins.sorted" in KEY_FUNCTIONS
    for name in KEY_FUNCTIONS:  # the run-time check refuses each, with a value in key=
        args: tuple[Any, ...] = ([3, 1],) if name.startswith("builtins.") else (MethodRef([3, 1], "sort"),)
        with pytest.raises(ForbiddenOperationError, match=r"key=\.\.\.\) is refused"):
            check_op_call(name if name.startswith("builtins.") else "call", args, {"key": 0})
    # the static check sees list.sort through getattr + call (a tracer records l.sort() as Tensor.sort)
    graph = hostile(lm, [("builtins.list", ([3, 1, 2],), {}), ("getattr", (Ref(-1), "sort"), {}),
                         ("call", (Ref(-1),), {"key": 0})])
    with pytest.raises(ForbiddenOperationError, match=r"hog\.py:3.*key= would call a function"):
        validate_graph(graph, remote=True)
    graph.nodes[-2].kwargs = {}
    validate_graph(graph, remote=True)


def test_the_rates_a_shard_measures_are_plausible() -> None:
    work_rate, item_rate = measured_rates()
    assert 1e8 < work_rate < 1e14 and 1e5 < item_rate < 1e9
    assert math.isclose(measured_rates()[0], work_rate)  # measured once per process


def test_an_operation_on_constants_is_sized_before_the_graph_is_queued(lm: Any) -> None:
    """The client's (and the gateway's) policy check sizes operations whose arguments are all
    constants, so ``torch.ones(2**31)`` is refused before it reaches a shard."""
    from nnsight_dask.graph.policy import check_policy

    with pytest.raises(PolicyError, match=r"hog\.py:1: torch\.ones would make a tensor of 8,589,934,592 bytes"):
        check_policy(hostile(lm, [("torch.ones", (2**31,), {})]), nd.Policy())
    with pytest.raises(PolicyError, match=r"hog\.py:1: torch\.tril_indices would do about"):
        check_policy(hostile(lm, [("torch.tril_indices", (4096, 4096), {})]), nd.Policy(max_op_work=1e6))
    check_policy(hostile(lm, [("torch.ones", (4,), {})]), nd.Policy())
