"""Activation patching across layers and positions: which hidden states carry "Italy"?

For every layer L and position P (the country token at position 3, and the last token), run the
corrupted prompt "The capital of France is" with the hidden state at (L, P) replaced by the one
from the clean prompt "The capital of Italy is" (both in one batched trace: two invokes), and read
p(" Rome"). On SmolLM2 (fp32) patching the country token at layers 0-22 flips the answer " Paris" -> " Rome";
at the last position only the top layers matter (the answer has been moved there by then).

    python examples/activation_patching.py            # SmolLM2 in 2 shards on a LocalCluster
    python examples/activation_patching.py --local    # in-process
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import open_model, parser, token_id  # noqa: E402

CLEAN = "The capital of Italy is"
CORRUPT = "The capital of France is"


def patch_table(lm: Any, clean: str = CLEAN, corrupt: str = CORRUPT, positions: tuple[int, ...] = (3, -1),
                answers: tuple[str, str] = (" Paris", " Rome")) -> dict[str, Any]:
    """p(answers[1]) and the top token for every (layer, position) patch; plus both baselines."""
    tok = lm.tokenizer
    a_id, b_id = (token_id(tok, a) for a in answers)
    layers = lm.model.layers
    n = len(layers)
    with lm.trace() as tracer:
        with tracer.invoke(clean):
            clean_probs = lm.output.logits[0, -1].softmax(-1)
            clean_p = clean_probs[b_id].save()
            clean_top = clean_probs.argmax(-1).save()
        with tracer.invoke(corrupt):
            probs = lm.output.logits[0, -1].softmax(-1)
            base_pa, base_pb, base_top = probs[a_id].save(), probs[b_id].save(), probs.argmax(-1).save()
    p_b = torch.zeros(n, len(positions))
    p_a = torch.zeros(n, len(positions))
    top = torch.zeros(n, len(positions), dtype=torch.long)
    for layer in range(n):
        saved = []
        with lm.trace() as tracer:
            with tracer.invoke(clean):
                source = [layers[layer].output[:, pos] for pos in positions]
            for j, pos in enumerate(positions):
                with tracer.invoke(corrupt):
                    layers[layer].output[:, pos] = source[j]
                    probs = lm.output.logits[0, -1].softmax(-1)
                    saved.append((probs[a_id].save(), probs[b_id].save(), probs.argmax(-1).save()))
        for j, (pa, pb, t) in enumerate(saved):
            p_a[layer, j], p_b[layer, j], top[layer, j] = pa.value, pb.value, t.value  # in a list: proxies
    return {"positions": list(positions), "answers": list(answers), "p_a": p_a, "p_b": p_b, "top": top,
            "clean": (float(clean_p), int(clean_top)),  # saved locals: tensors after the block
            "corrupt": (float(base_pa), float(base_pb), int(base_top))}


def report(lm: Any, result: dict[str, Any]) -> None:
    tok = lm.tokenizer
    a, b = result["answers"]
    pa, pb, top = result["corrupt"]
    print(f"clean   {CLEAN!r}: p({b!r})={result['clean'][0]:.3f}, top {tok.decode(result['clean'][1])!r}")
    print(f"corrupt {CORRUPT!r}: p({a!r})={pa:.3f} p({b!r})={pb:.3f}, top {tok.decode(top)!r}")
    names = [f"pos {p}" if p >= 0 else "last" for p in result["positions"]]
    print(f"\np({b!r}) after patching the clean hidden state into the corrupt run (top token in brackets):")
    print("layer | " + " | ".join(f"{n:^20}" for n in names))
    for layer in range(result["p_b"].shape[0]):
        cells = [f"{float(result['p_b'][layer, j]):.3f} [{tok.decode(int(result['top'][layer, j]))!r:>8}]"
                 for j in range(len(names))]
        print(f"{layer:>5} | " + " | ".join(f"{c:^20}" for c in cells))
    for j, n in enumerate(names):
        flipped = [layer for layer in range(result["p_b"].shape[0])
                   if tok.decode(int(result["top"][layer, j])) == b]
        print(f"{n}: top token becomes {b!r} at layers {flipped if flipped else 'none'}")


def main(model: str = "smollm2", scheduler: Any = None, local: bool = False, **kwargs: Any) -> dict[str, Any]:
    started = time.perf_counter()
    with open_model(model, scheduler, local) as lm:
        result = patch_table(lm, **kwargs)
        report(lm, result)
    print(f"\n({'local' if local else 'remote'}, {time.perf_counter() - started:.1f} s)")
    return result


if __name__ == "__main__":
    args = parser(__doc__).parse_args()
    main(args.model, args.scheduler, args.local)
