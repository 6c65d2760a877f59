"""The forward pass on a shard, driven directly on a ShardRunner (no server, no queue): any number of
co-tenants cost one pre-hook and one hook per module their graphs touch, each gets its solo values,
and a lone experiment is a pass of one. Also the fixed part of a pass, its :class:`PassPlan`.

Solo values come from the local engine (``run_graph``), checked with the co-tenancy tolerance.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

import nnsight_dask as nd
from nnsight_dask.execution.cotenancy import CoTenant
from nnsight_dask.execution.local_runner import run_graph
from nnsight_dask.execution.plan import PassPlan
from nnsight_dask.execution.saves import collect_saves
from nnsight_dask.execution.shard_runner import ShardRunner, run_alone
from nnsight_dask.execution.stage import Carry, Stage
from nnsight_dask.graph import InterventionGraph
from nnsight_dask.models import tiny_llama

torch.set_num_threads(1)

PROMPTS = ["The Eiffel Tower is in the city of", "The capital of Italy is", "Hello world"]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_llama(n_layer=2)


@pytest.fixture(scope="module")
def runner(model: torch.nn.Module, tiny_tokenizer: Any) -> ShardRunner:
    """The whole tiny Llama as one shard."""
    layers = model.model.layers
    return ShardRunner(model, 0, 1, lambda _path: 0, layers[0], layers[-1], tiny_tokenizer.pad_token_id)


def record(model: torch.nn.Module, tokenizer: Any, prompt: str, scale: float) -> InterventionGraph:
    lm = nd.LanguageModel(model, tokenizer=tokenizer)
    with lm.trace(prompt, execute=False) as tracer:
        lm.model.layers[0].output[:, -1] *= scale
        lm.model.layers[1].output.save(name="h1")
        lm.output.logits[:, -1].save(name="last")
        tracer.result.logits.save(name="result")  # the pass's result: the co-tenant's rows only
    return tracer.graph


def assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """The co-tenant tolerance: ``max|shared - solo| <= 1e-4 * max(1, max|solo|)``."""
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4 * max(1.0, expected.abs().max().item())


def test_co_tenants_share_one_hook_per_module_and_get_their_solo_values(runner: ShardRunner, model: torch.nn.Module,
                                                                         tiny_tokenizer: Any) -> None:
    graphs = [record(model, tiny_tokenizer, prompt, scale) for prompt, scale in zip(PROMPTS, (2.0, 0.5, -1.0))]
    hooked = model.model.layers[0]
    seen: list[tuple[int, int]] = []

    def count_hooks(module: torch.nn.Module, _args: Any) -> None:  # a plain torch hook, ours besides it
        seen.append((len(module._forward_pre_hooks), len(module._forward_hooks)))

    probe = hooked.register_forward_pre_hook(count_hooks)
    try:
        tenants = [CoTenant(runner.start(graph), Stage(0, 0, 0), Carry()) for graph in graphs]
        runner.forward(tenants)
    finally:
        probe.remove()
    # pre-hooks: the probe, the decoder layer's stop check and one of ours; one hook of ours: not one per co-tenant
    assert seen == [(3, 1)]
    assert not hooked._forward_pre_hooks and not hooked._forward_hooks  # all removed after the pass
    for tenant, graph in zip(tenants, graphs):
        assert isinstance(tenant.outcome, Carry), tenant.outcome
        got = collect_saves(graph, tenant.outcome.values)
        expected = run_graph(model, graph, pad_token_id=tiny_tokenizer.pad_token_id).saves
        for name in ("h1", "last", "result"):
            assert_close(got[name], expected[name])


def test_alone_is_a_pass_of_one_bit_for_bit(runner: ShardRunner, model: torch.nn.Module, tiny_tokenizer: Any) -> None:
    graph = record(model, tiny_tokenizer, PROMPTS[0], 3.0)
    carry = run_alone(runner, runner.start(graph), Stage(0, 0, 0), Carry())
    got = collect_saves(graph, carry.values)
    expected = run_graph(model, graph, pad_token_id=tiny_tokenizer.pad_token_id).saves
    assert torch.equal(got["h1"], expected["h1"]) and torch.equal(got["last"], expected["last"])


def test_a_lone_error_is_raised_and_a_co_tenants_stays_its_own(runner: ShardRunner, model: torch.nn.Module,
                                                               tiny_tokenizer: Any) -> None:
    lm = nd.LanguageModel(model, tokenizer=tiny_tokenizer)
    with lm.trace(PROMPTS[1], execute=False) as tracer:
        lm.model.layers[0].output = torch.zeros(3)  # cannot replace a (1, 5, 32) output
        lm.model.layers[1].output.save(name="h1")
    broken = tracer.graph
    with pytest.raises(nd.errors.InterventionError, match="layers\\[0\\]"):
        run_alone(runner, runner.start(broken), Stage(0, 0, 0), Carry())
    fine = record(model, tiny_tokenizer, PROMPTS[2], 2.0)
    tenants = [CoTenant(runner.start(g), Stage(0, 0, 0), Carry()) for g in (broken, fine)]
    runner.forward(tenants)
    assert isinstance(tenants[0].outcome, nd.errors.InterventionError)
    assert isinstance(tenants[1].outcome, Carry)
    expected = run_graph(model, fine, pad_token_id=tiny_tokenizer.pad_token_id).saves
    assert_close(collect_saves(fine, tenants[1].outcome.values)["h1"], expected["h1"])


def test_a_pass_plan_binds_each_step_to_its_module_call(model: torch.nn.Module, tiny_tokenizer: Any) -> None:
    lm = nd.LanguageModel(model, tokenizer=tiny_tokenizer)
    with lm.generate(PROMPTS[2], max_new_tokens=3, execute=False) as tracer:
        with tracer.all():
            lm.model.layers[1].output[:, -1].save(name="h")
    graph = tracer.graph
    plan = PassPlan(graph, 0, steps=3)
    assert plan.module_paths == {"model.layers.1"}  # the only module worth a hook
    (getter,) = [n.id for n in graph.nodes if n.kind == "getter"]
    assert [plan.events[("model.layers.1", "out", step)] for step in range(3)] == [[(getter, s)] for s in range(3)]
    (save,) = [n.id for n in graph.nodes if n.kind == "save"]
    assert {(save, s) for s in range(3)} <= plan.free  # saves run when their step's value exists
    saved = run_graph(model, graph, pad_token_id=tiny_tokenizer.pad_token_id).saves["h"]
    assert len(saved) == 3
