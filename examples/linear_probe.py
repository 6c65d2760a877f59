"""A linear probe trained offline on activations stored in a Zarr dataset made with ``collect``.

1. ``nd.collect(lm, prompts, modules=["model.layers.12"], store=path, batch_size=8)`` runs the
   prompts (on the cluster, or locally) and writes layer 12's output, one row per token.
2. ``nd.open_activations(path)["model.layers.12.output"]`` reads it back as a dask array
   [tokens, hidden]; ``.prompt_index`` maps each token row to its prompt.
3. Mean-pool each prompt's tokens, subtract each template's mean, and train a logistic-regression probe (plain torch): is the prompt
   about a city in France or in Italy? The test set holds *cities never seen in training*.

    python examples/linear_probe.py [--local] [--layer 12] [--store /tmp/probe.zarr]
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import open_model, parser  # noqa: E402

FRANCE = ["Paris", "Lyon", "Marseille", "Nice", "Toulouse", "Bordeaux", "Lille", "Nantes", "Strasbourg",
          "Montpellier"]
ITALY = ["Rome", "Milan", "Naples", "Turin", "Florence", "Venice", "Bologna", "Genoa", "Palermo", "Verona"]
TEMPLATES = ["I spent a week in {} last summer.", "The old market in {} is very famous.",
             "My cousin moved to {} for work."]
TEST_CITIES = {"Nice", "Lille", "Strasbourg", "Turin", "Genoa", "Verona"}


def dataset() -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Prompts, labels (1 = Italy) and a test mask (held-out cities)."""
    prompts, labels, test = [], [], []
    for label, cities in ((0, FRANCE), (1, ITALY)):
        for city in cities:
            for template in TEMPLATES:
                prompts.append(template.format(city))
                labels.append(label)
                test.append(city in TEST_CITIES)
    return prompts, torch.tensor(labels, dtype=torch.float32), torch.tensor(test)


def pooled_features(store: str, module: str, n_prompts: int) -> torch.Tensor:
    """Per-prompt mean of the stored token activations: [prompts, hidden]."""
    import nnsight_dask as nd

    ds = nd.open_activations(store)
    acts = torch.from_numpy(ds[f"{module}.output"].compute()).float()      # [tokens, hidden]
    index = torch.from_numpy(ds.prompt_index.compute()).long()             # [tokens]
    sums = torch.zeros(n_prompts, acts.shape[1]).index_add_(0, index, acts)
    counts = torch.bincount(index, minlength=n_prompts).clamp(min=1).unsqueeze(1)
    return sums / counts


def train_probe(x: torch.Tensor, y: torch.Tensor, steps: int = 300, lr: float = 0.05,
                weight_decay: float = 1e-2) -> torch.nn.Module:
    torch.manual_seed(0)
    probe = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(probe(x).squeeze(-1), y)
        loss.backward()
        opt.step()
    return probe


def main(model: str = "smollm2", scheduler: Any = None, local: bool = False, layer: int = 12,
         store: str | None = None, batch_size: int = 8) -> dict[str, Any]:
    import nnsight_dask as nd

    started = time.perf_counter()
    store = store or str(Path(tempfile.mkdtemp(prefix="probe-")) / "activations.zarr")
    module = f"model.layers.{layer}"
    prompts, y, test = dataset()
    with open_model(model, scheduler, local) as lm:
        nd.collect(lm, prompts, modules=[module], store=store, batch_size=batch_size, progress=False)
    collected = time.perf_counter() - started
    x = pooled_features(store, module, len(prompts))
    template = torch.arange(len(prompts)) % len(TEMPLATES)
    for k in range(len(TEMPLATES)):   # remove what the sentence frame contributes (train rows only)
        x[template == k] -= x[(template == k) & ~test].mean(0)
    mean, std = x[~test].mean(0), x[~test].std(0) + 1e-6                    # standardize on train only
    x = (x - mean) / std
    probe = train_probe(x[~test], y[~test])
    with torch.no_grad():
        pred = (probe(x).squeeze(-1) > 0).float()
    train_acc = float((pred[~test] == y[~test]).float().mean())
    test_acc = float((pred[test] == y[test]).float().mean())
    print(f"collected {len(prompts)} prompts, {module} -> {store} ({collected:.1f} s)")
    print(f"features {tuple(x.shape)}; train {int((~test).sum())} prompts, "
          f"test {int(test.sum())} prompts about held-out cities {sorted(TEST_CITIES)}")
    print(f"probe 'city in Italy?': train accuracy {train_acc:.3f}, test accuracy {test_acc:.3f} "
          f"(chance 0.5)")
    print(f"({'local' if local else 'remote'}, {time.perf_counter() - started:.1f} s)")
    return {"store": store, "features": tuple(x.shape), "train_acc": train_acc, "test_acc": test_acc}


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--layer", type=int, default=12)
    p.add_argument("--store", help="dataset location (a directory or s3:// URL); default: a temp directory")
    args = p.parse_args()
    main(args.model, args.scheduler, args.local, args.layer, args.store)
