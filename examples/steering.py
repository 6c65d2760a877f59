"""A steering vector added during generation.

The vector is the difference of the mean layer-L hidden states (at the last token) of two
contrastive prompt sets -- positive ("I love ...") minus negative ("I hate ...") sentiment. It is
added to the last position of layer L at every generation step:

    with tracer.all():
        lm.model.layers[L].output[:, -1] += coef * vec

Prints the unsteered and the steered greedy continuations (and the negatively steered one).

    python examples/steering.py [--local] [--layer 12] [--coef 4]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import open_model, parser  # noqa: E402

POSITIVE = ["I love this movie", "I love the food", "I love my dog", "I love today", "I love the weather",
            "I love this book", "I love cats", "I love the city"]
NEGATIVE = ["I hate this movie", "I hate the food", "I hate my dog", "I hate today", "I hate the weather",
            "I hate this book", "I hate cats", "I hate the city"]
PROMPT = "I think the movie was"


def steering_vector(lm: Any, layer: int, positive: list[str] = POSITIVE, negative: list[str] = NEGATIVE) -> torch.Tensor:
    """mean(layer output at the last token | positive) - mean(... | negative)."""
    with lm.trace(positive + negative):
        hidden = lm.model.layers[layer].output[:, -1].save()   # left padding: -1 is the last real token
    h = hidden.detach().float()
    return h[: len(positive)].mean(0) - h[len(positive):].mean(0)


def generate(lm: Any, prompt: str, layer: int, vec: torch.Tensor | None, coef: float, max_new_tokens: int) -> str:
    with lm.generate(prompt, max_new_tokens=max_new_tokens) as tracer:
        if vec is not None:
            with tracer.all():
                lm.model.layers[layer].output[:, -1] += coef * vec
        ids = tracer.result.save()
    return lm.tokenizer.decode(ids[0, -max_new_tokens:], skip_special_tokens=True)


def main(model: str = "smollm2", scheduler: Any = None, local: bool = False, layer: int | None = None,
         coef: float = 4.0, prompt: str = PROMPT, max_new_tokens: int = 20) -> dict[str, Any]:
    started = time.perf_counter()
    with open_model(model, scheduler, local) as lm:
        n = len(lm.model.layers)
        layer = n // 3 if layer is None else layer
        vec = steering_vector(lm, layer)
        print(f"steering vector at layer {layer}/{n}: |v| = {float(vec.norm()):.2f}, coef {coef}")
        out = {"layer": layer, "vector": vec,
               "unsteered": generate(lm, prompt, layer, None, coef, max_new_tokens),
               "positive": generate(lm, prompt, layer, vec, coef, max_new_tokens),
               "negative": generate(lm, prompt, layer, vec, -coef, max_new_tokens)}
        print(f"prompt: {prompt!r}")
        print(f"  unsteered:         {out['unsteered']!r}")
        print(f"  steered +{coef:g} (love): {out['positive']!r}")
        print(f"  steered -{coef:g} (hate): {out['negative']!r}")
    print(f"({'local' if local else 'remote'}, {time.perf_counter() - started:.1f} s)")
    return out


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--layer", type=int)
    p.add_argument("--coef", type=float, default=4.0)
    p.add_argument("--prompt", default=PROMPT)
    args = p.parse_args()
    main(args.model, args.scheduler, args.local, args.layer, args.coef, args.prompt)
