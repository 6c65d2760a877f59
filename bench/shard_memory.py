"""Peak memory of deploying one shard of 2, against the model's size (issue 20, item 1).

For a Llama, a Mixtral-style mixture of experts and a GPT-NeoX model, each built from a config with
random weights and saved with ``save_pretrained`` in bf16 (~0.6 GB each), every shard is loaded in
a fresh process the way a worker deploys it (``load_shard`` with the shard actor's full loader and,
for shard 0, its ``describe``), after a warm-up load of a tiny model of the same family (imports,
allocator arenas). The process's RSS high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` just before the load) gives the peak *during* the deploy, not only after;
"in use" is the RSS once every weight has been read (a memory-mapped checkpoint's pages count only
from then on), both over the RSS before the load.

For comparison, the same shard is also loaded the old way: the whole model, then cut (what every
shard of a converted checkpoint did before: transformers converts MoE and GPT-NeoX checkpoints
while loading them).

The target: peak growth <= 0.65 x model bytes + 300 MB per worker with 2 shards.

Run: ``nice -n 19 python bench/shard_memory.py`` (about 3 minutes on 2 cores; ``--scale 0.5`` halves
the models).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from _common import use_this_checkout

use_this_checkout()

import torch  # noqa: E402

MB = 2**20

#: family -> config fields at scale 1 (bf16 bytes ~0.6 GB); the width shrinks with --scale.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 20, "num_attention_heads": 16,
              "num_key_value_heads": 8},
    "mixtral": {"hidden_size": 768, "intermediate_size": 1536, "num_hidden_layers": 16, "num_attention_heads": 12,
                "num_key_value_heads": 4, "num_local_experts": 4, "num_experts_per_tok": 2},
    "gpt_neox": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 20,
                 "num_attention_heads": 16},
}

#: Runs in a fresh process: warm up on ``warm``, then load shard ``index`` of 2 of ``path``.
LOAD_ONE_SHARD = textwrap.dedent(r"""
    import gc, json, re, sys
    import psutil, torch
    torch.set_num_threads(1)
    from nnsight_dask.models import plan_shards
    from nnsight_dask.models.shard_loading import load_shard
    from nnsight_dask.models.surgery import cut_to_shard
    from nnsight_dask.worker.shard_actor import describe_model, load_source

    how, path, warm, index = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

    def deploy(where):
        if how == "shard":
            return load_shard(where, 2, index, full_loader=load_source,
                              describe=describe_model if index == 0 else None).model
        model, _ = load_source(where)  # the old way for converted checkpoints: all of it, then cut
        return cut_to_shard(model, plan_shards(model, 2), index)

    def high_water():
        return int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

    deploy(warm)
    gc.collect()
    before = psutil.Process().memory_info().rss
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark restarts from the current RSS
    model = deploy(path)
    peak = high_water()
    with torch.no_grad():  # serving reads every weight: pages of a memory-mapped checkpoint count from then on
        for p in model.parameters():
            p.sum()
    gc.collect()
    after = psutil.Process().memory_info().rss
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    print(json.dumps({"before": before, "peak": peak, "after": after, "weights": weights}))
""")


def save_model(path: Path, family: str, scale: float) -> int:
    """Save a random bf16 model of ``family`` and a tokenizer to ``path``; return its weight bytes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from nnsight_dask.models import tiny_tokenizer

    fields = dict(FAMILIES[family])
    for key in ("hidden_size", "intermediate_size"):
        fields[key] = int(fields[key] * scale) // 64 * 64
    config = AutoConfig.for_model(family, vocab_size=32000, max_position_embeddings=512, **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def save_warm(path: Path, family: str) -> None:
    """A tiny model of the same family: the warm-up load imports and allocates what the big one does."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from nnsight_dask.models import tiny_tokenizer

    fields = {**FAMILIES[family], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4}
    if "num_key_value_heads" in fields:
        fields["num_key_value_heads"] = 2
    config = AutoConfig.for_model(family, vocab_size=32000, max_position_embeddings=512, **fields)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)


def measure(how: str, path: Path, warm: Path, index: int) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", LOAD_ONE_SHARD, how, str(path), str(warm), str(index)],
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"loading shard {index} of {path} ({how}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="width factor of the models (1: ~0.6 GB bf16)")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated, of " + ", ".join(FAMILIES))
    args = parser.parse_args()
    if not Path("/proc/self/clear_refs").exists():
        sys.exit("needs Linux's /proc/self/clear_refs to reset the RSS high-water mark")
    print(f"{'model':<10} {'GB':>5} {'shard':>5} {'way':<14} {'peak +MB':>9} {'in use +MB':>10} {'own MB':>7} "
          f"{'peak/model':>10} {'target MB':>9}  ok")
    verdicts = []
    with tempfile.TemporaryDirectory(prefix="shard-memory-") as root:
        for family in args.families.split(","):
            path, warm = Path(root) / family, Path(root) / f"{family}-warm"
            model_bytes = save_model(path, family, args.scale)
            save_warm(warm, family)
            target = 0.65 * model_bytes + 300 * MB
            for index in range(2):
                for how, label in (("full", "whole then cut"), ("shard", "shard alone")):
                    got = measure(how, path, warm, index)
                    peak, after = got["peak"] - got["before"], got["after"] - got["before"]
                    ok = peak <= target
                    if how == "shard":
                        verdicts.append(ok)
                    print(f"{family:<10} {model_bytes / 1e9:>5.2f} {index:>5} {label:<14} {peak / MB:>9.0f} "
                          f"{after / MB:>10.0f} {got['weights'] / MB:>7.0f} {peak / model_bytes:>10.2f} "
                          f"{target / MB:>9.0f}  {'yes' if ok else 'NO'}", flush=True)
    print(f"shards alone within 0.65 x model + 300 MB: {sum(verdicts)} of {len(verdicts)}")


if __name__ == "__main__":
    main()
