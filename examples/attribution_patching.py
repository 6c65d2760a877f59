"""Attribution patching: a gradient estimate of activation patching for every (layer, position) at once.

One trace over a batch of two prompts: the clean prompt "The capital of Italy is" and the corrupted prompt
"The capital of France is". On the corrupted run the metric is logit(" Rome") - logit(" Paris");
``metric.backward()`` inside the trace gives d metric / d hidden at every layer, and the first-order
estimate of patching (layer, position) with the clean state is

    (clean_act - corrupt_act) . grad        (summed over the hidden dimension)

Print the top attributions and check a few against real patching (one forward pass each).

    python examples/attribution_patching.py [--local]
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


def attribution(lm: Any, clean: str = CLEAN, corrupt: str = CORRUPT,
                answers: tuple[str, str] = (" Paris", " Rome")) -> dict[str, Any]:
    """Attribution [layers, positions] estimating metric(patched) - metric(corrupt); plus both metrics."""
    tok = lm.tokenizer
    a_id, b_id = (token_id(tok, a) for a in answers)
    layers = lm.model.layers
    # Both prompts go in as one batch of two rows (row 0 clean, row 1 corrupt) rather than two
    # invokes: .grad of a value read inside an invoke is never computed (the hook sits on the
    # invoke's narrowed slice, which is not on the backward path) -- see the report on this recipe.
    with lm.trace([clean, corrupt]):
        acts = [layer.output.save() for layer in layers]
        grads = [layer.output.grad.save() for layer in layers]
        logits = lm.output.logits[:, -1]
        metrics = (logits[:, b_id] - logits[:, a_id]).save()
        metrics[1].backward()
    act_t = torch.stack([x.value.detach().float() for x in acts])        # [layers, 2, seq, hidden]
    grad_t = torch.stack([g.value[1].detach().float() for g in grads])   # proxies in lists keep .value
    attr = ((act_t[:, 0] - act_t[:, 1]) * grad_t).sum(-1)                # [layers, seq]
    metrics = metrics.detach()  # a saved local: the tensor itself after the block
    return {"attribution": attr, "clean_metric": float(metrics[0]),
            "corrupt_metric": float(metrics[1]), "answers": list(answers),
            "tokens": [tok.decode(t) for t in tok(corrupt, add_special_tokens=False)["input_ids"]]}


def patched_metric(lm: Any, layer: int, pos: int, clean: str = CLEAN, corrupt: str = CORRUPT,
                   answers: tuple[str, str] = (" Paris", " Rome")) -> float:
    """The real thing: metric on the corrupted run with (layer, pos) taken from the clean run."""
    a_id, b_id = (token_id(lm.tokenizer, a) for a in answers)
    with lm.trace() as tracer:
        with tracer.invoke(clean):
            source = lm.model.layers[layer].output[:, pos]
        with tracer.invoke(corrupt):
            lm.model.layers[layer].output[:, pos] = source
            logits = lm.output.logits[0, -1]
            m = (logits[b_id] - logits[a_id]).save()
    return float(m.detach())


def main(model: str = "smollm2", scheduler: Any = None, local: bool = False, top: int = 8,
         check: int = 3) -> dict[str, Any]:
    started = time.perf_counter()
    with open_model(model, scheduler, local) as lm:
        res = attribution(lm)
        attr = res["attribution"]
        a, b = res["answers"]
        print(f"metric = logit({b!r}) - logit({a!r}):  clean {res['clean_metric']:+.3f}   "
              f"corrupt {res['corrupt_metric']:+.3f}")
        print(f"tokens of the corrupted prompt: {res['tokens']}")
        print(f"attribution table {tuple(attr.shape)} (layers x positions); per-position sum over layers: "
              + ", ".join(f"{p}:{float(s):+.2f}" for p, s in enumerate(attr.sum(0))))
        flat = attr.flatten().abs().argsort(descending=True)[:top]
        n_pos = attr.shape[1]
        ranked = [(int(i) // n_pos, int(i) % n_pos) for i in flat]
        print(f"\ntop {top} (layer, position) by |attribution| (estimated change of the metric):")
        for layer, pos in ranked:
            print(f"  layer {layer:>2}, pos {pos} {res['tokens'][pos]!r:>10}: {float(attr[layer, pos]):+.3f}")
        print("\nestimate vs actual patching (metric(patched) - metric(corrupt)):")
        checks = []
        country = int(attr[:, 3].abs().argmax()) if attr.shape[1] > 3 else 0
        points = ranked[:check] + [(country, 3 if attr.shape[1] > 3 else 0), (attr.shape[0] - 1, 0)]
        for layer, pos in points:  # the top ones, the best at the country token, and one expected ~0
            actual = patched_metric(lm, layer, pos) - res["corrupt_metric"]
            checks.append((layer, pos, float(attr[layer, pos]), actual))
            print(f"  layer {layer:>2}, pos {pos}: estimate {float(attr[layer, pos]):+.3f}   actual {actual:+.3f}")
        res["checks"] = checks
    print(f"({'local' if local else 'remote'}, {time.perf_counter() - started:.1f} s)")
    return res


if __name__ == "__main__":
    args = parser(__doc__).parse_args()
    main(args.model, args.scheduler, args.local)
