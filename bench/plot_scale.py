"""Plot a ``bench/scale.py --json`` run: exp/s and p99 latency against users, one line per shard count.

Usage::

    python bench/scale.py --json /tmp/scale.json            # the full grid (shards 1/2/4/8 x users 1/16/64/256)
    python bench/plot_scale.py /tmp/scale.json docs/scaling.png [--mode threads]

With two trees in the run (``--compare``), the baseline is drawn dashed. Each point is the mean of
the cell's runs; needs matplotlib (``pip install -e .[bench]``).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="JSON written by bench/scale.py --json")
    parser.add_argument("out", help="PNG to write")
    parser.add_argument("--mode", default="threads")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = json.loads(Path(args.run).read_text())
    cells = [c for c in run["cells"] if c["mode"] == args.mode and c["runs"]]
    trees = sorted({c["tree"] for c in cells}, key=lambda t: t != "base")  # the baseline first, if any
    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(11, 4.2))
    for tree in trees:
        for shards in sorted({c["shards"] for c in cells if c["tree"] == tree}):
            mine = sorted((c for c in cells if c["tree"] == tree and c["shards"] == shards), key=lambda c: c["users"])
            users = [c["users"] for c in mine]
            style = {"linestyle": "--", "alpha": 0.6} if tree == "base" else {}
            label = f"{shards} shard{'s' * (shards > 1)}" + (f" ({tree})" if len(trees) > 1 else "")
            throughput.plot(users, [statistics.mean(r["exp_s"] for r in c["runs"]) for c in mine], marker="o",
                            label=label, **style)
            latency.plot(users, [statistics.mean(r["p99"] for r in c["runs"]) for c in mine], marker="o",
                         label=label, **style)
    for axes, title, unit in ((throughput, "throughput", "experiments / s"), (latency, "p99 latency", "ms")):
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xlabel("concurrent users")
        axes.set_ylabel(unit)
        axes.set_title(title)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(f"bench/scale.py, simulated GPU (8 layers x 4 ms), {args.mode}, {run.get('when', '')}", fontsize=10)
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
