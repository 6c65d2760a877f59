"""Logit lens: decode the residual stream after every layer with the model's own final norm and head.

For each layer, ``lm.lm_head(lm.model.norm(layer.output))`` at the last position gives a next-token
distribution; print its top token and probability. On SmolLM2 with "The capital of France is",
" Paris" only becomes the top token at the last layer (it enters the top list around layer 27).

    python examples/logit_lens.py [--local] [--prompt "..."]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import open_model, parser, token_id  # noqa: E402

PROMPT = "The capital of France is"


def logit_lens(lm: Any, prompt: str = PROMPT, answer: str = " Paris") -> list[dict[str, Any]]:
    """Per layer: top token id, its probability, and p(answer), at the last position."""
    answer_id = token_id(lm.tokenizer, answer)
    saved = []
    with lm.trace(prompt):
        for layer in lm.model.layers:
            probs = lm.lm_head(lm.model.norm(layer.output))[0, -1].softmax(-1)
            best = probs.max(-1)
            saved.append((best.indices.save(), best.values.save(), probs[answer_id].save()))
    return [{"layer": i, "token": int(t.value), "p": float(p.value), "p_answer": float(pa.value)}
            for i, (t, p, pa) in enumerate(saved)]


def main(model: str = "smollm2", scheduler: Any = None, local: bool = False, prompt: str = PROMPT,
         answer: str = " Paris") -> list[dict[str, Any]]:
    started = time.perf_counter()
    with open_model(model, scheduler, local) as lm:
        rows = logit_lens(lm, prompt, answer)
        tok = lm.tokenizer
        print(f"Logit lens on {prompt!r} (last position):")
        print(f"layer | {'top token':>14} | p(top) | p({answer!r})")
        for r in rows:
            print(f"{r['layer']:>5} | {tok.decode(r['token'])!r:>14} | {r['p']:.3f}  | {r['p_answer']:.3f}")
        first = next((r["layer"] for r in rows if tok.decode(r["token"]) == answer), None)
        print(f"{answer!r} is the top token from layer {first} on" if first is not None
              else f"{answer!r} is never the top token")
    print(f"({'local' if local else 'remote'}, {time.perf_counter() - started:.1f} s)")
    return rows


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--prompt", default=PROMPT)
    args = p.parse_args()
    main(args.model, args.scheduler, args.local, args.prompt)
