"""Causal tracing, as in ROME: which hidden states carry the fact "the Eiffel Tower is in Paris"?

Meng et al. 2022 ("Locating and Editing Factual Associations in GPT", section 2.1):

1. the clean run: "The Eiffel Tower is located in the city of" gives p(" Paris");
2. the corrupted run: Gaussian noise (3 times the standard deviation of the prompt's token
   embeddings) is added to the embeddings of the subject's tokens, and p(" Paris") drops;
3. for every layer L and position P, the corrupted run with the clean hidden state restored at
   (L, P) alone: the recovered p(" Paris") says how much of the fact that one state carries.

One trace per layer: a clean invoke, then one corrupted invoke per position, restoring that position
from the clean invoke's hidden state (the noise is the same in every corrupted invoke: a constant of
the graph). Prints the layers x positions table of p(" Paris") and saves it as a heat map PNG.
ROME finds two sites: the last subject token at early-to-middle layers, and the last token at late ones.

    python examples/causal_tracing.py            # SmolLM2 in 2 shards on a LocalCluster
    python examples/causal_tracing.py --local    # in-process
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import open_model, parser, token_id  # noqa: E402
from _figures import heatmap, save_png  # noqa: E402

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"
ANSWER = " Paris"
NOISE = 3.0  # ROME's noise level: 3 standard deviations of the embeddings


def subject_positions(tokenizer: Any, prompt: str, subject: str) -> list[int]:
    """The positions of ``subject``'s tokens in ``prompt``'s tokens (a clear error if it is not there)."""
    ids = tokenizer(prompt)["input_ids"]
    wanted = tokenizer(subject, add_special_tokens=False)["input_ids"]
    for start in range(len(ids) - len(wanted) + 1):
        if ids[start:start + len(wanted)] == wanted:
            return list(range(start, start + len(wanted)))
    raise ValueError(f"the subject {subject!r} is not a run of tokens of the prompt {prompt!r}")


def trace_causes(lm: Any, prompt: str = PROMPT, subject: str = SUBJECT, answer: str = ANSWER,
                 noise: float = NOISE, seed: int = 0) -> dict[str, Any]:
    """p(answer): clean, corrupted, and corrupted with the clean state restored at each (layer, position)."""
    answer_id = token_id(lm.tokenizer, answer)
    subject_at = subject_positions(lm.tokenizer, prompt, subject)
    ids = lm.tokenizer(prompt)["input_ids"]
    layers = lm.model.layers
    embed = lm.model.embed_tokens
    with lm.trace(prompt):
        clean_p = lm.output.logits[0, -1].softmax(-1)[answer_id].save()
        scale = embed.output.std().save()
    hidden = lm.config.hidden_size
    generator = torch.Generator().manual_seed(seed)
    shift = noise * float(scale) * torch.randn(len(subject_at), hidden, generator=generator)
    rows = slice(subject_at[0], subject_at[-1] + 1)

    def corrupt() -> None:
        embed.output[:, rows] = embed.output[:, rows] + shift

    with lm.trace(prompt):
        corrupt()
        corrupted_p = lm.output.logits[0, -1].softmax(-1)[answer_id].save()
    restored = torch.zeros(len(layers), len(ids))
    for layer in range(len(layers)):
        saved = []
        with lm.trace() as tracer:
            with tracer.invoke(prompt):
                clean = layers[layer].output
            for position in range(len(ids)):
                with tracer.invoke(prompt):
                    corrupt()
                    layers[layer].output[:, position] = clean[:, position]
                    saved.append(lm.output.logits[0, -1].softmax(-1)[answer_id].save())
        restored[layer] = torch.stack([p.value for p in saved])  # in a list: proxies keep .value
    tokens = [lm.tokenizer.decode(i) for i in ids]
    return {"clean": float(clean_p), "corrupted": float(corrupted_p), "restored": restored, "tokens": tokens,
            "subject": subject_at, "answer": answer, "noise": shift}


def report(result: dict[str, Any]) -> None:
    answer, tokens, restored = result["answer"], result["tokens"], result["restored"]
    print(f"p({answer!r}): clean {result['clean']:.3f}, subject corrupted {result['corrupted']:.3f}")
    print(f"\np({answer!r}) with the clean hidden state restored at one (layer, position); * marks the subject")
    labels = [f"{t.strip()[:7]}{'*' if i in result['subject'] else ''}" for i, t in enumerate(tokens)]
    print("layer | " + " ".join(f"{label:>8}" for label in labels))
    for layer in range(restored.shape[0]):
        print(f"{layer:>5} | " + " ".join(f"{float(p):>8.3f}" for p in restored[layer]))
    best = restored.flatten().argmax()
    layer, position = divmod(int(best), restored.shape[1])
    print(f"most recovered: layer {layer}, position {position} ({tokens[position]!r}): {float(restored.max()):.3f}")


def main(model: str = "smollm2", scheduler: Any = None, local: bool = False, prompt: str = PROMPT,
         subject: str = SUBJECT, answer: str = ANSWER, figure: str | Path = "causal_tracing.png",
         seed: int = 0) -> dict[str, Any]:
    started = time.perf_counter()
    with open_model(model, scheduler, local) as lm:
        result = trace_causes(lm, prompt, subject, answer, seed=seed)
    report(result)
    labels = [f"{t.strip()[:7]}{'*' if i in result['subject'] else ''}" for i, t in enumerate(result["tokens"])]
    rows = [str(i) for i in range(result["restored"].shape[0])]
    result["figure"] = save_png(figure, heatmap(result["restored"], rows, labels,
                                                f"p({answer.strip()!r}) restoring one state (rows: layers)", cell=18))
    print(f"figure: {result['figure']} ({'local' if local else 'remote'}, {time.perf_counter() - started:.1f} s)")
    return result


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--subject", default=SUBJECT, help="the tokens to corrupt (a run of the prompt's tokens)")
    p.add_argument("--answer", default=ANSWER)
    p.add_argument("--figure", default="causal_tracing.png", help="where to save the PNG")
    args = p.parse_args()
    main(args.model, args.scheduler, args.local, args.prompt, args.subject, args.answer, args.figure)
