"""Co-tenant batching, driven by hand through in-process shard actors: experiments waiting on a
shard run as one forward pass, and each member gets what it gets alone.

Every member is checked against the same graph run alone by the local engine, with the tolerance
batched matrix products need (``max|batched - solo| <= 1e-4 * max(1, max|solo|)``, equal argmax);
``batching=False`` members are checked bit for bit. The same batches on a real LocalCluster with
separate clients are in ``test_cotenancy_cluster.py``.
"""
from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch
from distributed.protocol import deserialize, serialize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nnsight_dask as nd
from nnsight_dask.errors import GraphValidationError, InterventionError
from nnsight_dask.execution.partition import assign_shards
from nnsight_dask.execution.local_runner import run_graph
from nnsight_dask.execution.stage import Carry, plan_stages
from nnsight_dask.graph import InterventionGraph
from nnsight_dask.models import owner_of, plan_shards, tiny_gpt2, tiny_llama
from nnsight_dask.storage.results import TensorRef
from nnsight_dask.worker.plugin import cancel_experiments
from nnsight_dask.worker.registry import ExperimentCancelledError
from nnsight_dask.worker.results import Results
from nnsight_dask.worker.shard_actor import ShardActor
from nnsight_dask.worker.stage_queue import StageQueue, StageRequest
from tests.routes import run_route

torch.set_num_threads(1)

PROMPTS = ["The Eiffel Tower is in the city of", "The capital of Italy is", "Hello world"]


@pytest.fixture(scope="module")
def shards(tiny_tokenizer: Any) -> Any:
    """Two in-process shards of the same 4-layer tiny Llama (layers 0-1 and 2-3)."""
    source = lambda: (tiny_llama(n_layer=4), tiny_tokenizer)
    actors = [ShardActor(deployment="cotenants", index=i, n_shards=2, source=source) for i in range(2)]
    yield actors
    for actor in actors:
        actor.close()


def run_together(actors: list[ShardActor], graphs: dict[str, InterventionGraph], *,
                 before_run: Any = None) -> dict[str, Any]:
    """What a route carrying several experiments does on each shard, hops crossing the wire."""
    owner = shard_owner(actors) if len(actors) > 1 else (lambda path: 0)
    stages = {tuple(plan_stages(g, assign_shards(g, owner, len(actors)), len(actors))) for g in graphs.values()}
    (chain,) = stages
    return run_route(actors, {name: g.to_json() for name, g in graphs.items()}, list(chain), before_run=before_run)


def solo(model: torch.nn.Module, graph: InterventionGraph, pad: int) -> dict[str, Any]:
    return run_graph(model, graph, pad_token_id=pad).saves


def assert_matches_solo(got: Any, expected: Any, *, exact: bool = False) -> None:
    """The co-tenant tolerance: ``max|batched - solo| <= 1e-4 * max(1, max|solo|)``, same shape,
    same argmax over the last dimension; ``exact``: bit for bit."""
    assert isinstance(got, torch.Tensor) and got.shape == expected.shape, (getattr(got, "shape", got), expected.shape)
    if exact:
        assert torch.equal(got, expected)
        return
    bound = 1e-4 * max(1.0, expected.abs().max().item())
    assert (got - expected).abs().max().item() <= bound
    if expected.dim() and expected.is_floating_point():
        assert torch.equal(got.argmax(-1), expected.argmax(-1))


def record(lm: Any, prompts: Any, body: Any, **options: Any) -> InterventionGraph:
    with lm.trace(prompts, execute=False, **options) as tracer:
        body(lm, tracer)
    return tracer.graph


def reads_and_writes(lm: Any, tracer: Any) -> None:
    """Getters, an in-place write, a replacement of a layer's output, the logits."""
    lm.model.layers[0].output.save(name="h0")
    lm.model.layers[1].output[:, -1] *= 2
    lm.model.layers[2].output = lm.model.layers[2].output * 0.5
    lm.model.layers[3].mlp.down_proj.input[:, -1, :4] = 3.0
    lm.model.layers[3].output.save(name="h3")
    lm.output.logits[:, -1].save(name="last")
    lm.output.logits.save(name="logits")


def test_members_of_different_lengths_get_their_solo_values(shards: list[ShardActor], lm: Any,
                                                            tiny_tokenizer: Any) -> None:
    graphs = {
        "long": record(lm, PROMPTS[0], reads_and_writes),
        "mid": record(lm, PROMPTS[1], reads_and_writes),
        "short": record(lm, PROMPTS[2], reads_and_writes),
        "two-prompts": record(lm, PROMPTS[1:], reads_and_writes),  # its own invokes, left-padded its own way
    }
    before = [dict(actor.server.batch_sizes) for actor in shards]
    answers = run_together(shards, graphs)
    assert [actor.server.batch_sizes.get(4, 0) - b.get(4, 0) for actor, b in zip(shards, before)] == [1, 1]
    for name, graph in graphs.items():
        expected = solo(lm._module, graph, tiny_tokenizer.pad_token_id)
        got = answers[name]
        assert isinstance(got, Results), (name, got)
        assert sorted(got) == sorted(expected)
        for key in expected:
            assert_matches_solo(got[key], expected[key])
    assert answers["short"]["logits"].shape[1] == len(tiny_tokenizer(PROMPTS[2])["input_ids"])  # its own length


def test_a_member_cannot_reach_another_members_rows(shards: list[ShardActor], lm: Any, tiny_tokenizer: Any) -> None:
    def vandal(lm: Any, tracer: Any) -> None:
        lm.model.layers[0].output[:] = 0                   # every row and column it can see
        lm.model.layers[1].output = lm.model.layers[1].output * 0 + 1e4
        lm.model.layers[1].output.save(name="h1")

    def reader(lm: Any, tracer: Any) -> None:
        lm.model.layers[1].output.save(name="h1")
        lm.output.logits.save(name="logits")

    graphs = {"vandal": record(lm, PROMPTS[0], vandal), "reader": record(lm, PROMPTS[2], reader)}
    answers = run_together(shards, graphs)
    assert torch.equal(answers["vandal"]["h1"], torch.full_like(answers["vandal"]["h1"], 1e4))
    expected = solo(lm._module, graphs["reader"], tiny_tokenizer.pad_token_id)
    for key in expected:
        assert_matches_solo(answers["reader"][key], expected[key])


def test_a_failing_or_stopping_member_leaves_the_others_running(shards: list[ShardActor], lm: Any,
                                                              tiny_tokenizer: Any) -> None:
    def wrong_shape(lm: Any, tracer: Any) -> None:
        lm.model.layers[2].output = torch.zeros(1, 3, 7)

    def stops(lm: Any, tracer: Any) -> None:
        lm.model.layers[0].output.save(name="h0")
        tracer.stop()

    graphs = {"ok": record(lm, PROMPTS[0], reads_and_writes), "wrong": record(lm, PROMPTS[1], wrong_shape),
              "stops": record(lm, PROMPTS[2], stops), "ok2": record(lm, PROMPTS[2], reads_and_writes)}
    answers = run_together(shards, graphs)
    assert isinstance(answers["wrong"], InterventionError)
    assert "test_cotenancy.py:" in str(answers["wrong"]) and "(1, 3, 7)" in str(answers["wrong"])
    stopped = solo(lm._module, graphs["stops"], tiny_tokenizer.pad_token_id)
    assert_matches_solo(answers["stops"]["h0"], stopped["h0"])
    for name in ("ok", "ok2"):
        expected = solo(lm._module, graphs[name], tiny_tokenizer.pad_token_id)
        for key in expected:
            assert_matches_solo(answers[name][key], expected[key])
    assert all(not actor.server.experiments for actor in shards)


def test_a_member_cancelled_mid_pass_leaves_at_the_next_layer(shards: list[ShardActor], lm: Any,
                                                             tiny_tokenizer: Any) -> None:
    graphs = {"stays": record(lm, PROMPTS[0], reads_and_writes), "leaves": record(lm, PROMPTS[1], reads_and_writes)}
    layer1 = shards[0].server.runner.model.model.layers[1]
    # the cancel arrives (from the worker's event loop, lock-free) while shard 0 computes layer 0
    def cancel_now(*_: Any) -> None:
        cancel_experiments(["leaves"], "the user pressed stop")

    handle = layer1.register_forward_pre_hook(cancel_now)
    try:
        answers = run_together(shards, graphs)
    finally:
        handle.remove()
    assert isinstance(answers["leaves"], ExperimentCancelledError)
    assert "the user pressed stop" in str(answers["leaves"])
    expected = solo(lm._module, graphs["stays"], tiny_tokenizer.pad_token_id)
    for key in expected:
        assert_matches_solo(answers["stays"][key], expected[key])


def test_batching_false_gradients_and_skips_run_alone_bit_exact(shards: list[ShardActor], lm: Any,
                                                                tiny_tokenizer: Any) -> None:
    def grads(lm: Any, tracer: Any) -> None:
        lm.model.layers[1].output.grad.save(name="g1")
        lm.output.logits[0, -1].max().backward()

    graphs = {"a": record(lm, PROMPTS[0], reads_and_writes), "b": record(lm, PROMPTS[2], reads_and_writes),
              "exact": record(lm, PROMPTS[1], reads_and_writes, batching=False)}
    answers = run_together(shards, graphs)
    expected = solo(lm._module, graphs["exact"], tiny_tokenizer.pad_token_id)
    for key in expected:
        assert_matches_solo(answers["exact"][key], expected[key], exact=True)

    # a gradient experiment meets a forward-only one in shard 0's queue: it runs alone, the other too
    graphs = {"grad": record(lm, PROMPTS[0], grads), "plain": record(lm, PROMPTS[1], reads_and_writes)}
    chains = {name: plan_stages(g, assign_shards(g, shard_owner(shards), 2), 2) for name, g in graphs.items()}
    first = {name: StageRequest(name, chain[0], graphs[name].to_json(), None, False) for name, chain in chains.items()}
    before = dict(shards[0].server.batch_sizes)
    shards[0].server.queue.run(list(first.values()))
    assert shards[0].server.batch_sizes.get(1, 0) - before.get(1, 0) == 2 and shards[0].server.batch_sizes.get(2) == before.get(2)
    for name, chain in chains.items():
        carries: dict[str, Any] = {name: first[name].outcome}
        for position, stage in enumerate(chain[1:], start=1):
            graph_json = graphs[name].to_json() if stage.shard == 1 and stage.direction == "forward" else None
            carries = shards[stage.shard].server.run_batch([(name, graph_json)], stage, carries, position == len(chain) - 1)
        expected = solo(lm._module, graphs[name], tiny_tokenizer.pad_token_id)
        for key in expected:
            assert_matches_solo(carries[name][key], expected[key], exact=name == "grad")


def shard_owner(actors: list[ShardActor]) -> Any:
    plan = plan_shards(actors[0].server.runner.model, len(actors))
    return lambda path: owner_of(plan, path)


def test_absolute_positions_keep_their_solo_values(tiny_tokenizer: Any) -> None:
    """GPT-2 adds learned position embeddings: right padding keeps every member's positions."""
    model = tiny_gpt2()
    gpt = nd.LanguageModel(model, tokenizer=tiny_tokenizer)
    actor = ShardActor(deployment="cotenants-gpt2", index=0, n_shards=1, source=lambda: (tiny_gpt2(), tiny_tokenizer))
    try:
        def body(lm: Any, tracer: Any) -> None:
            lm.transformer.h[0].output[0][:, -1] += 1
            lm.transformer.h[1].output[0].save(name="h1")
            lm.output.logits.save(name="logits")

        graphs = {str(i): record(gpt, prompt, body) for i, prompt in enumerate(PROMPTS)}
        answers = run_together([actor], graphs)
        assert actor.server.batch_sizes == {3: 1}
        for name, graph in graphs.items():
            expected = solo(model, graph, tiny_tokenizer.pad_token_id)
            for key in expected:
                assert_matches_solo(answers[name][key], expected[key])
    finally:
        actor.close()


def test_persisted_saves_go_to_each_members_own_arrays(shards: list[ShardActor], lm: Any, tiny_tokenizer: Any,
                                                       tmp_path: Any) -> None:
    def body(lm: Any, tracer: Any) -> None:
        lm.model.layers[1].output.save(name="h1")
        lm.output.logits.save(name="logits")

    graphs = {name: record(lm, prompt, body, store=str(tmp_path / name), persist_threshold=0)
              for name, prompt in zip(("first", "second"), PROMPTS)}
    answers = run_together(shards, graphs)
    for name, graph in graphs.items():
        expected = solo(lm._module, graph, tiny_tokenizer.pad_token_id)
        for key in expected:
            ref = answers[name][key]
            assert isinstance(ref, TensorRef) and ref.url.endswith(name)
            assert_matches_solo(ref.open().compute(), expected[key])


def test_the_queue_serves_waiting_stages_together_and_a_lone_one_at_once() -> None:
    """Stages queued while the shard is busy are served as one group by whichever thread is free."""
    groups: list[list[str]] = []
    release = threading.Event()

    def serve(requests: list[StageRequest]) -> None:
        groups.append([r.experiment for r in requests])
        if requests[0].experiment == "first":
            release.wait(10)
        for request in requests:
            request.outcome = request.experiment.upper()

    queue = StageQueue(serve, max_batch=3)
    lone = StageRequest("lone", None, None, None, False)  # type: ignore[arg-type]
    queue.run([lone])
    assert groups == [["lone"]] and lone.outcome == "LONE"
    requests = {name: StageRequest(name, None, None, None, False) for name in  # type: ignore[arg-type]
                ("first", "a", "b", "c", "d")}
    threads = [threading.Thread(target=queue.run, args=([requests["first"]],))]
    threads[0].start()
    while len(groups) < 2:
        threading.Event().wait(0.001)
    for name in ("a", "b", "c", "d"):  # they arrive while "first" computes
        threads.append(threading.Thread(target=queue.run, args=([requests[name]],)))
        threads[-1].start()
    while len(queue) < 4:
        threading.Event().wait(0.001)
    release.set()
    for thread in threads:
        thread.join(10)
    assert groups[1:] == [["first"], ["a", "b", "c"], ["d"]]
    assert all(r.done and r.outcome == name.upper() for name, r in requests.items())


def test_under_load_a_free_shard_waits_briefly_for_the_group_to_come_back() -> None:
    """After a shared pass of 3, stages arriving a few ms apart are served as one pass again (not as
    a pass of the first one alone and one of the rest); a lone stage never waits; nor does anyone
    past ``gather_s`` or past the duration of the pass it would save."""
    groups: list[list[str]] = []
    pass_s = {"s": 0.0}

    def serve(requests: list[StageRequest]) -> None:
        groups.append([r.experiment for r in requests])
        time.sleep(pass_s["s"])
        for request in requests:
            request.outcome = request.experiment

    def request(name: str) -> StageRequest:
        return StageRequest(name, None, None, None, False)  # type: ignore[arg-type]

    def timed(*names: str) -> float:
        started = time.monotonic()
        queue.run([request(name) for name in names])
        return time.monotonic() - started

    queue = StageQueue(serve, max_batch=8, gather_s=0.5)
    assert timed("lone") < 0.25  # no recent shared pass: served at once
    pass_s["s"] = 0.6
    timed("a", "b", "c")  # one task with three members: a shared pass of 0.6 s
    threads = []
    for name in ("x", "y", "z"):  # the group's next stages, 20 ms apart
        threads.append(threading.Thread(target=queue.run, args=([request(name)],)))
        threads[-1].start()
        time.sleep(0.02)
    for thread in threads:
        thread.join(10)
    assert groups == [["lone"], ["a", "b", "c"], ["x", "y", "z"]]
    pass_s["s"] = 0.0
    assert 0.45 < timed("late") < 2 and groups[-1] == ["late"]  # one of three came back: waited gather_s
    assert timed("alone again") < 0.25  # its previous pass held one: no waiting
    pass_s["s"] = 0.05
    timed("d", "e")
    assert timed("f") < 0.25  # waited at most the 0.05 s pass it would have saved


def drive(actors: list[ShardActor], graphs: dict[str, InterventionGraph], joins: dict[str, int]) -> dict[str, Any]:
    """A pipeline by hand: in each round every shard serves, as one queue group, the next stage of
    every experiment waiting for it; ``joins`` says in which round an experiment arrives."""
    owner = shard_owner(actors)
    chains = {name: plan_stages(g, assign_shards(g, owner, len(actors)), len(actors)) for name, g in graphs.items()}
    position = dict.fromkeys(graphs, 0)
    carries: dict[str, Any] = {}
    seen: dict[str, set[int]] = {name: set() for name in graphs}
    answers: dict[str, Any] = {}
    round_ = 0
    while len(answers) < len(graphs):
        for shard, actor in enumerate(actors):
            requests = []
            for name, chain in chains.items():
                if name in answers or joins.get(name, 0) > round_ or chain[position[name]].shard != shard:
                    continue
                stage = chain[position[name]]
                graph_json = graphs[name].to_json() if shard not in seen[name] else None
                seen[name].add(shard)
                requests.append(StageRequest(name, stage, graph_json, carries.get(name),
                                             position[name] == len(chain) - 1))
            actor.server.queue.run(requests)
            for request in requests:
                name = request.experiment
                outcome = request.outcome
                outcome = deserialize(*serialize(outcome)) if isinstance(outcome, Carry) else outcome
                position[name] += 1
                if isinstance(outcome, (Results, BaseException)):
                    answers[name] = outcome
                else:
                    carries[name] = outcome
        round_ += 1
    return answers


def test_generations_share_steps_join_and_leave_with_their_own_caches(shards: list[ShardActor], lm: Any,
                                                                      tiny_tokenizer: Any) -> None:
    def generation(prompt: Any, steps: int, scale: float) -> InterventionGraph:
        with lm.generate(prompt, max_new_tokens=steps, execute=False) as tracer:
            with tracer.all():
                lm.model.layers[1].output[:, -1] *= scale
                lm.model.layers[3].output[:, -1].save(name="h3")
            lm.generator.output.save(name="ids")
        return tracer.graph

    graphs = {"long": generation(PROMPTS[0], 5, 1.5), "short": generation(PROMPTS[2], 2, 0.5),
              "newcomer": generation(PROMPTS[1], 4, 2.0), "trace": record(lm, PROMPTS[1], reads_and_writes),
              "pair": generation([PROMPTS[0], PROMPTS[2]], 3, 1.0)}  # its own two rows, left-padded its way
    before = [dict(actor.server.batch_sizes) for actor in shards]
    answers = drive(shards, graphs, joins={"pair": 1, "newcomer": 2})
    grown = [{k: v - b.get(k, 0) for k, v in actor.server.batch_sizes.items() if v - b.get(k, 0)}
             for actor, b in zip(shards, before)]
    # round 0: long + short + trace; 1: long + short + pair (joins); 2-3: long + newcomer (joins) + pair
    # (short finished after two steps); 4: long + newcomer; 5: the newcomer's last step, alone
    assert grown == [{3: 4, 2: 1, 1: 1}] * 2, grown
    for name, graph in graphs.items():
        expected = solo(lm._module, graph, tiny_tokenizer.pad_token_id)
        got = answers[name]
        assert isinstance(got, Results), (name, got)
        for key, value in expected.items():
            if isinstance(value, list):
                assert len(got[key]) == len(value), (name, key)
                for step_got, step_expected in zip(got[key], value):
                    assert_matches_solo(step_got, step_expected)
            elif key == "ids":
                assert torch.equal(got[key], value), (name, got[key], value)
            else:
                assert_matches_solo(got[key], value)
    assert all(not actor.server.experiments for actor in shards)


def test_the_workers_setting_turns_batching_off(lm: Any, tiny_tokenizer: Any) -> None:
    """``nnsight-dask.cotenant-batching`` is read by the worker when it loads a shard: the cluster decides."""
    import dask

    with dask.config.set({"nnsight-dask.cotenant-batching": False}):
        actor = ShardActor(deployment="cotenants-off", index=0, n_shards=1,
                           source=lambda: (tiny_llama(n_layer=4), tiny_tokenizer))
    try:
        graphs = {str(i): record(lm, prompt, reads_and_writes) for i, prompt in enumerate(PROMPTS)}
        answers = run_together([actor], graphs)
        assert actor.server.batch_sizes == {1: 3}
        for name, graph in graphs.items():
            expected = solo(lm._module, graph, tiny_tokenizer.pad_token_id)
            for key in expected:
                assert_matches_solo(answers[name][key], expected[key], exact=True)
    finally:
        actor.close()


@pytest.mark.parametrize("options, field", [({"batching": "yes"}, "options.batching"),
                                            ({"batching": 1}, "options.batching")])
def test_a_malformed_batching_option_is_refused(lm: Any, options: dict[str, Any], field: str) -> None:
    graph = record(lm, PROMPTS[0], reads_and_writes).to_dict()
    graph.setdefault("options", {}).update(options)
    with pytest.raises(GraphValidationError, match=field):
        InterventionGraph.from_dict(graph)


WORDS = "The Eiffel Tower is in the city of capital Italy France Hello world Once upon a time".split()
#: Interventions a member may make: (label, body) with ``body(lm, layer, scale)``.
MENU = {
    "scale last token": lambda lm, k, s: lm.model.layers[k].output[:, -1].mul_(s),
    "replace output": lambda lm, k, s: setattr(lm.model.layers[k], "output", lm.model.layers[k].output * s),
    "zero first token": lambda lm, k, s: lm.model.layers[k].output[:, 0].zero_(),
    "write mlp input": lambda lm, k, s: lm.model.layers[k].mlp.down_proj.input[:, -1, :3].fill_(s),
    "read only": lambda lm, k, s: None,
    "bad row": lambda lm, k, s: lm.model.layers[k].output[5].save(name="never"),
}


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.lists(st.sampled_from(WORDS), min_size=1, max_size=12),
                          st.sampled_from(sorted(MENU)), st.integers(0, 3), st.floats(-3, 3, allow_nan=False),
                          st.booleans()),
                min_size=2, max_size=5))
def test_any_batch_of_members_gets_each_members_solo_values(shards: list[ShardActor], lm: Any, tiny_tokenizer: Any,
                                                           members: list[Any]) -> None:
    """Property: whatever members meet (lengths, rows, interventions, one failing), each gets what it
    gets alone, or fails alone with the error it has alone."""
    graphs = {}
    for index, (words, label, layer, scale, two_rows) in enumerate(members):
        prompt = " ".join(words)
        prompts = [prompt, " ".join(reversed(words))] if two_rows else prompt

        def body(lm: Any, tracer: Any, label: str = label, layer: int = layer, scale: float = scale) -> None:
            MENU[label](lm, layer, scale)
            lm.model.layers[layer].output.save(name="h")
            lm.output.logits.save(name="logits")

        graphs[f"m{index}"] = record(lm, prompts, body)
    answers = run_together(shards, graphs)
    for name, graph in graphs.items():
        try:
            expected = solo(lm._module, graph, tiny_tokenizer.pad_token_id)
        except InterventionError as alone:
            assert isinstance(answers[name], InterventionError), (name, answers[name])
            assert str(answers[name]).split(": ", 1)[1] == str(alone).split(": ", 1)[1]
            continue
        assert isinstance(answers[name], Results), (name, answers[name])
        for key in expected:
            assert_matches_solo(answers[name][key], expected[key])


def test_the_token_bound_splits_a_batch_into_passes(lm: Any, tiny_tokenizer: Any) -> None:
    """``cotenant-max-tokens`` bounds rows x longest length of one pass: 8- and 5-token prompts fit 20
    (2 x 8); with the 2-token one it would be 3 x 8 = 24, so that one runs in a pass of its own."""
    import dask

    with dask.config.set({"nnsight-dask.cotenant-max-tokens": 20}):
        actor = ShardActor(deployment="cotenants-tokens", index=0, n_shards=1,
                           source=lambda: (tiny_llama(n_layer=4), tiny_tokenizer))
    try:
        lengths = [len(tiny_tokenizer(p)["input_ids"]) for p in PROMPTS]
        assert lengths == [8, 5, 2]
        graphs = {str(i): record(lm, prompt, reads_and_writes) for i, prompt in enumerate(PROMPTS)}
        answers = run_together([actor], graphs)
        assert actor.server.batch_sizes == {2: 1, 1: 1}
        for name, graph in graphs.items():
            expected = solo(lm._module, graph, tiny_tokenizer.pad_token_id)
            for key in expected:
                assert_matches_solo(answers[name][key], expected[key])
    finally:
        actor.close()
