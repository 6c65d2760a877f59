"""Attention patterns: find previous-token heads and induction heads on repeated random tokens.

A sequence of T random tokens followed by the same T tokens again: from the second copy on, the
next token can be read off the first copy. Two kinds of heads show it (Olsson et al. 2022, "In-context
Learning and Induction Heads"):

- a **previous-token head** attends from each position to the one before it;
- an **induction head** attends from a token in the second copy to the token that followed the same
  token in the first copy (T - 1 positions back), and copies it.

The model is loaded with eager attention (``attn_implementation="eager"``, on every shard), so each
``self_attn`` returns its attention weights as ``output[1]``; the scores (mean attention on the
previous token, and on the induction target) are computed on the shards, and only ``[heads]`` per
layer comes back. Prints the top heads of each kind and saves both layers x heads maps as one PNG.

    python examples/attention_patterns.py            # SmolLM2 in 2 shards on a LocalCluster
    python examples/attention_patterns.py --local    # in-process
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import open_model, parser  # noqa: E402
from _figures import heatmap, save_png  # noqa: E402


def repeated_tokens(tokenizer: Any, length: int, batch: int, seed: int = 0) -> torch.Tensor:
    """``[batch, (bos) + 2 * length]`` token ids: random non-special tokens, then the same again."""
    special = set(tokenizer.all_special_ids)
    allowed = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    generator = torch.Generator().manual_seed(seed)
    first = allowed[torch.randint(len(allowed), (batch, length), generator=generator)]
    ids = torch.cat([first, first], dim=1)
    if tokenizer.bos_token_id is not None:
        ids = torch.cat([torch.full((batch, 1), tokenizer.bos_token_id), ids], dim=1)
    return ids


def head_scores(lm: Any, ids: torch.Tensor, length: int) -> dict[str, torch.Tensor]:
    """Per layer and head: mean attention on the previous token, and on the induction target."""
    start = ids.shape[1] - 2 * length  # 1 with a bos token, else 0
    saved = []
    with lm.trace(ids):
        for layer in lm.model.layers:
            weights = layer.self_attn.output[1]  # [batch, heads, query, key]
            previous = weights.diagonal(offset=-1, dim1=-2, dim2=-1)[..., start + 1:]  # query q, key q - 1
            # query q in the second copy, key q - (length - 1): what followed q's token in the first copy
            induction = weights.diagonal(offset=-(length - 1), dim1=-2, dim2=-1)[..., start + 1:start + 1 + length]
            saved.append((previous.mean((0, 2)).save(), induction.mean((0, 2)).save()))
    return {"previous": torch.stack([p.value for p, _ in saved]),  # in a list: proxies keep .value
            "induction": torch.stack([i.value for _, i in saved])}


def report(scores: dict[str, torch.Tensor], top: int) -> None:
    for kind, values in scores.items():
        heads = values.shape[1]
        best = values.flatten().topk(top)
        print(f"\ntop {top} {kind}-token heads" if kind == "previous" else f"\ntop {top} {kind} heads")
        print("layer.head | score")
        for score, index in zip(best.values.tolist(), best.indices.tolist()):
            print(f"{index // heads:>5}.{index % heads:<4} | {score:.3f}")


def main(model: str = "smollm2", scheduler: Any = None, local: bool = False, length: int = 25, batch: int = 4,
         top: int = 5, figure: str | Path = "attention_patterns.png", seed: int = 0) -> dict[str, Any]:
    started = time.perf_counter()
    with open_model(model, scheduler, local, attn_implementation="eager") as lm:
        ids = repeated_tokens(lm.tokenizer, length, batch, seed)
        scores = head_scores(lm, ids, length)
    print(f"{batch} sequences of {length} random tokens, repeated ({ids.shape[1]} tokens each)")
    report(scores, top)
    layers = [str(i) for i in range(scores["previous"].shape[0])]
    heads = [str(h) for h in range(scores["previous"].shape[1])]
    path = save_png(figure, *(heatmap(values, layers, heads, f"{kind} (rows: layers, columns: heads)", cell=18,
                                      value_range=(0.0, 1.0)) for kind, values in scores.items()))
    print(f"\nfigure: {path} ({'local' if local else 'remote'}, {time.perf_counter() - started:.1f} s)")
    return {"ids": ids, "figure": path, **scores}


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--length", type=int, default=25, help="random tokens before the repeat")
    p.add_argument("--figure", default="attention_patterns.png", help="where to save the PNG")
    args = p.parse_args()
    main(args.model, args.scheduler, args.local, length=args.length, figure=args.figure)
