"""``collect``: run prompts through a model in batches and write modules' activations to a dataset.

>>> ds = nd.collect(lm, prompts, modules=["model.layers.12", "model.layers.20.mlp"],
...                 store="s3://bucket/run1.zarr", batch_size=32)          # doctest: +SKIP
>>> ds["model.layers.12.output"]            # dask array [tokens, hidden]; ds.prompt_index: [tokens]

Works with a local :class:`~nnsight_dask.LanguageModel` (batches run in this process, one after
the other) and with a :class:`~nnsight_dask.RemoteModel` (several batches in flight on the
deployment at once, as non-blocking traces). Either way the client writes each batch's rows with
:class:`~.dataset_writer.DatasetWriter` as soon as the batch returns, so an interrupted run resumes
with exactly the batches it had not finished (``pending_batches``) and never writes one twice.

Written on the public API only: traces, invokes, ``.save()``, ``lm.encode`` and the storage package.
"""
from __future__ import annotations

import concurrent.futures
import sys
from collections.abc import Iterable, Sequence
from typing import Any, Mapping

import torch

from .. import config
from ..errors import TracingError
from ..storage import ActivationDataset, DatasetWriter, prompts_digest
from ..storage.location import UrlLike


def collect(
    lm: Any,
    prompts: Iterable[Any],
    modules: Sequence[str],
    store: UrlLike,
    *,
    batch_size: int = 32,
    storage_options: Mapping[str, Any] | None = None,
    progress: bool = True,
    max_in_flight: int | None = None,
) -> ActivationDataset:
    """Collect the outputs of ``modules`` for every token of ``prompts`` into a dataset at ``store``.

    Parameters
    ----------
    lm
        A ``LanguageModel`` (runs locally) or a ``RemoteModel`` (runs on its deployment).
    prompts
        Texts (or token-id lists); their order fixes the batches: batch ``b`` is
        ``prompts[b * batch_size:(b + 1) * batch_size]``.
    modules
        Module paths such as ``"model.layers.12"`` or ``"model.layers.20.mlp"``; each becomes the
        array ``"<path>.output"`` of shape ``[tokens, *feature]``, left padding removed.
    store
        fsspec URL or local path of the dataset. An existing unfinished dataset of the same
        model, modules and prompts is resumed; a different one is refused.
    max_in_flight
        Remote only: batches running at once (default: twice the deployment's shards).

    Returns
    -------
    ActivationDataset
        The finished dataset (``open_activations(store)`` reopens it anywhere).
    """
    prompts = list(prompts)
    if not prompts:
        raise TracingError("collect needs at least one prompt")
    if not modules:
        raise TracingError("collect needs at least one module path, e.g. modules=['model.layers.0']")
    if batch_size < 1:
        raise TracingError(f"batch_size must be >= 1, got {batch_size}")
    modules = [m[:-len(".output")] if m.endswith(".output") else m for m in modules]
    envoys = [_envoy(lm, m) for m in modules]
    names = [f"{m}.output" for m in modules]
    # One invoke per prompt: the batch is left-padded and traced with positions="solo" (position ids
    # that skip the padding), so every prompt's activations are what it computes alone.
    encoded = [_encode(lm, p) for p in prompts]
    batches = [encoded[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    capacity = max(sum(int(e["input_ids"].shape[1]) for e in batch) for batch in batches)

    # Feature shapes and dtypes: one real run of the first prompt (cheap, and exact for any deployment).
    probe = _run_sync(lm, batches[0][:1], envoys)[0]
    specs = {name: (tuple(value.shape[2:]), value.dtype) for name, value in zip(names, probe)}
    tokenizer = getattr(lm, "tokenizer", None)
    metadata = {
        "model": str(lm.model_id),
        "tokenizer": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        "prompts_digest": prompts_digest([p if isinstance(p, str) else repr(p) for p in prompts]),
        "n_prompts": len(prompts),
        "batch_size": batch_size,
        "modules": names,
        "dtype": {name: str(dtype).removeprefix("torch.") for name, (_, dtype) in specs.items()},
    }
    writer = DatasetWriter.create(store, specs, n_batches=len(batches), batch_capacity=capacity,
                                  metadata=metadata, storage_options=storage_options)
    pending = writer.pending_batches()
    bar = _progress(len(batches), len(batches) - len(pending), progress)
    try:
        def write(b: int, values: list[Any]) -> None:
            lengths = [int(e["input_ids"].shape[1]) for e in batches[b]]
            rows, index = _rows(values, b * batch_size, lengths)
            writer.write_batch(b, dict(zip(names, rows)), prompt_index=index)
            if bar is not None:
                bar.update(1)

        if _is_remote(lm):
            in_flight = max_in_flight or 2 * lm.deployment.n_shards
            _run_remote(lm, pending, batches, envoys, write, max(1, in_flight))
        else:
            for b in pending:
                write(b, _run_sync(lm, batches[b], envoys))
    finally:
        if bar is not None:
            bar.close()
    return writer.finalize()


def _envoy(lm: Any, path: str) -> Any:
    envoy = lm
    try:
        for part in path.split("."):
            envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    except (AttributeError, IndexError, KeyError, TypeError) as exc:
        raise TracingError(f"collect: the model has no module {path!r} ({exc})") from None
    return envoy


def _encode(lm: Any, prompt: Any) -> dict[str, torch.Tensor]:
    """One prompt's token ids, unpadded: ``input_ids`` ``[1, length]``."""
    encoded = lm.encode(prompt if isinstance(prompt, (str, torch.Tensor)) else list(prompt))
    if encoded["input_ids"].shape[0] != 1:
        raise TracingError("collect: each prompt must be one text or one list of token ids")
    keep = encoded["attention_mask"][0].bool()
    return {"input_ids": encoded["input_ids"][:, keep], "attention_mask": encoded["attention_mask"][:, keep]}


def _is_remote(lm: Any) -> bool:
    if "nnsight_dask.client" not in sys.modules:  # no remote model can exist without it
        return False
    from ..client import RemoteModel

    return isinstance(lm, RemoteModel)


def _record(lm: Any, batch: list[dict[str, torch.Tensor]], envoys: list[Any],
            **options: Any) -> tuple[Any, list[list[Any]]]:
    """One trace of the batch, one invoke a prompt; ``acts[prompt][module]`` are the saved proxies."""
    acts: list[list[Any]] = []
    with lm.trace(positions="solo", **options) as tracer:
        for inputs in batch:
            with tracer.invoke(inputs):
                acts.append([envoy.output.save() for envoy in envoys])
    return tracer, acts


def _value(proxy: Any) -> Any:
    return getattr(proxy, "value", proxy)


def _run_sync(lm: Any, batch: list[dict[str, torch.Tensor]], envoys: list[Any]) -> list[list[torch.Tensor]]:
    _, acts = _record(lm, batch, envoys)
    return [[_materialize(_value(a)) for a in prompt] for prompt in acts]


def _run_remote(lm: Any, pending: list[int], batches: list[list[dict[str, torch.Tensor]]], envoys: list[Any],
                write: Any, in_flight: int) -> None:
    """Keep ``in_flight`` non-blocking traces running; write each batch as it returns."""
    queue = list(pending)
    running: dict[Any, tuple[int, list[list[Any]]]] = {}
    try:
        while queue or running:
            while queue and len(running) < in_flight:
                b = queue.pop(0)
                tracer, acts = _record(lm, batches[b], envoys, blocking=False)
                running[tracer.future] = (b, acts)
            done, _ = concurrent.futures.wait(list(running), return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                b, acts = running.pop(future)
                future.result()  # raises the batch's failure; finished batches stay written
                # a non-blocking trace's saved proxies hold their values before its future is done
                write(b, [[_materialize(_value(a)) for a in prompt] for prompt in acts])
    finally:
        for future in running:
            future.cancel()


def _materialize(value: Any) -> torch.Tensor:
    """A saved output as a tensor: first element of a tuple output; persisted refs read back."""
    if isinstance(value, (tuple, list)):
        value = value[0]
    if hasattr(value, "open") and not isinstance(value, torch.Tensor):  # a TensorRef
        value = value.open()
    if hasattr(value, "torch") and not isinstance(value, torch.Tensor):  # a LazyTensor
        value = value.torch()
    if not isinstance(value, torch.Tensor):
        raise TracingError(f"collect: a module output is a {type(value).__name__}, not a tensor")
    return value.detach().cpu()


def _rows(values: list[list[torch.Tensor]], first_prompt: int,
          lengths: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-token rows ``[n_tokens, *feature]`` per module (left padding removed: the last
    ``length`` positions of each prompt's ``[1, padded, ...]`` output) and each token's prompt index."""
    n_modules = len(values[0])
    rows = []
    for m in range(n_modules):
        parts = []
        for prompt, length in zip(values, lengths):
            value = prompt[m]
            if value.dim() < 2 or value.shape[0] != 1 or value.shape[1] < length:
                raise TracingError(f"collect: a module output has shape {list(value.shape)}; expected "
                                   f"[1, >= {length} tokens, ...] per prompt")
            parts.append(value[0, value.shape[1] - length:])
        rows.append(torch.cat(parts).contiguous())
    index = torch.cat([torch.full((length,), first_prompt + i, dtype=torch.int64) for i, length in enumerate(lengths)])
    return rows, index


def _progress(total: int, initial: int, enabled: bool) -> Any:
    if not (enabled and config.verbose):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="batch", desc="collect")


__all__ = ["collect"]
