"""Putting several invokes into one batch, and giving each invoke back only its rows.

Every invoke owns a contiguous row range of the batch (a :class:`Window`). A getter of invoke ``i``
sees a view of those rows (so in-place edits reach the model); a setter of invoke ``i`` replaces only
those rows. Co-tenants (several experiments in one shared pass) use the same windows, with columns.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import GraphValidationError, InterventionError, PolicyError
from ..graph.node import Ref
from ..graph.options import option_problem

Layout = list[tuple[int, int]]


def batch_token_inputs(invokes: Sequence[dict[str, Any]], pad_token_id: int) -> tuple[dict[str, torch.Tensor], Layout]:
    """Left-pad each invoke's ``input_ids``/``attention_mask`` to one length and stack them.

    Left padding keeps ``[:, -1]`` the last real token of every row, which is what interventions
    written for a single prompt expect.
    """
    if len(invokes) == 1:
        only = invokes[0]
        ids = only["input_ids"]
        mask = only.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        return {"input_ids": ids, "attention_mask": mask}, [(0, ids.shape[0])]
    length = max(inv["input_ids"].shape[1] for inv in invokes)
    ids_parts, mask_parts, layout, row = [], [], [], 0
    for inv in invokes:
        ids = inv["input_ids"]
        mask = inv.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        pad = length - ids.shape[1]
        if pad:
            ids = torch.cat([ids.new_full((ids.shape[0], pad), pad_token_id), ids], dim=1)
            mask = torch.cat([mask.new_zeros((mask.shape[0], pad)), mask], dim=1)
        ids_parts.append(ids)
        mask_parts.append(mask)
        layout.append((row, row + ids.shape[0]))
        row += ids.shape[0]
    return {"input_ids": torch.cat(ids_parts), "attention_mask": torch.cat(mask_parts)}, layout


def resolve_inputs(invokes: Sequence[dict[str, Any]], values: Mapping[Any, Any], pass_index: int, *,
                   vocab_size: int | None = None, max_prompt_tokens: int | None = None) -> list[dict[str, Any]]:
    """The pass's invokes with inputs taken from earlier traces of the session (``{"input_ids": ref}``)
    replaced by those values, checked now that they exist: integer token ids, 1-d or ``[rows, tokens]``,
    inside the vocabulary and the prompt bound (what a graph's own token inputs are checked for before
    it runs). Their attention mask is all ones."""
    if not any(isinstance(invoke.get("input_ids"), Ref) for invoke in invokes):
        return list(invokes)
    out = []
    for position, invoke in enumerate(invokes):
        ref = invoke.get("input_ids")
        if not isinstance(ref, Ref):
            out.append(invoke)
            continue
        where = f"pass {pass_index}, invoke {position}: the input taken from %{ref.id} (an earlier trace)"
        ids = values.get(ref.id)
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            got = f"a {ids.dtype} tensor" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise InterventionError(f"{where} must be integer token ids, got {got}")
        ids = ids.detach().long()
        ids = ids[None] if ids.dim() == 1 else ids
        if ids.dim() != 2 or ids.numel() == 0:
            raise InterventionError(f"{where} must be token ids of shape [tokens] or [rows, tokens], "
                                    f"got shape {list(ids.shape)}")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or (vocab_size is not None and high >= vocab_size):
            raise InterventionError(f"{where} holds token id {low if low < 0 else high}, outside the vocabulary "
                                    f"[0, {vocab_size if vocab_size is not None else 'inf'})")
        if max_prompt_tokens is not None and ids.shape[1] > max_prompt_tokens:
            raise PolicyError(f"{where} is a prompt of {ids.shape[1]} tokens; this deployment allows at most "
                              f"{max_prompt_tokens}", rule="max_prompt_tokens")
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a padded row computes what it would alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def positions_option(options: dict[str, Any]) -> str:
    """The graph's ``positions`` option (:data:`~nnsight_dask.graph.options.POSITION_MODES`, default
    ``"model"``: no position ids are passed), checked again here: a graph built in this process never
    went through the JSON decoder that checks it."""
    value = options.get("positions", "model")
    problem = option_problem("positions", value)
    if problem is not None:
        raise GraphValidationError(f"graph option 'positions' {problem}, got {value!r}", field="options.positions")
    return value  # type: ignore[no-any-return]


def forward_position_ids(batch: dict[str, torch.Tensor], options: dict[str, Any]) -> torch.Tensor | None:
    """Position ids to pass to a (non-generating) forward of ``batch``; None: let the model decide."""
    if positions_option(options) == "solo":
        return position_ids_for(batch["attention_mask"])
    return None


def batch_module_inputs(invokes: Sequence[dict[str, Any]]) -> tuple[tuple[Any, ...], dict[str, Any], Layout]:
    """Concatenate invokes' positional tensor arguments along the batch dimension."""
    if len(invokes) == 1:
        args = tuple(invokes[0].get("args", ()))
        kwargs = dict(invokes[0].get("kwargs", {}))
        return args, kwargs, [(0, _rows(args, kwargs))]
    layout, row, columns = [], 0, []
    for inv in invokes:
        args = tuple(inv.get("args", ()))
        n = _rows(args, {})
        layout.append((row, row + n))
        row += n
        columns.append(args)
    merged = tuple(torch.cat(list(parts)) if isinstance(parts[0], torch.Tensor) else parts[0]
                   for parts in zip(*columns))
    return merged, dict(invokes[0].get("kwargs", {})), layout


def _rows(args: Sequence[Any], kwargs: dict[str, Any]) -> int:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 1


def conform(new: Any, old: Any) -> Any:
    """Make a replacement fit the value it replaces: numbers fill, broadcastable tensors expand,
    dtype and device follow the model; any other shape is an error naming both shapes."""
    if not isinstance(old, torch.Tensor):
        return new
    if isinstance(new, (int, float, bool)):
        return torch.full_like(old, new)
    if not isinstance(new, torch.Tensor):
        raise TypeError(f"the new value is a {type(new).__name__}, but the value it replaces is a tensor of shape "
                        f"{tuple(old.shape)}; write a tensor or a number")
    if isinstance(new, torch.Tensor):
        if new.dtype != old.dtype or new.device != old.device:
            new = new.to(dtype=old.dtype, device=old.device)
        if new.shape != old.shape:
            if not _broadcasts_to(new.shape, old.shape):
                raise ValueError(
                    f"the new value has shape {tuple(new.shape)} but the value it replaces has shape "
                    f"{tuple(old.shape)}")
            new = new.expand(old.shape)
    return new


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))


# -- windows: an invoke's (or a co-tenant's) part of every value of the batch -------------------------
#
# An invoke's window is its rows. Experiments of different users sharing a pass on a shard (co-tenants) must
# each see exactly what they would see alone: their rows are stacked and their sequences padded on the
# *right* (in a causal model a token attends only to tokens before it, so a co-tenant's real tokens never
# see the padding after them, and each co-tenant keeps its own positions 0..T-1 without any position
# ids), so a co-tenant's window is its rows and its first ``length`` columns. Every value read through a
# window is a view of it; every value written through it goes back into it.


class Window:
    """Rows ``start:stop`` of a batch of ``batch`` rows and, when ``length`` is given, the first
    ``length`` of its ``seq`` columns."""

    __slots__ = ("start", "stop", "batch", "length", "seq")

    def __init__(self, start: int, stop: int, batch: int, length: int | None = None, seq: int | None = None) -> None:
        self.start, self.stop, self.batch, self.length, self.seq = start, stop, batch, length, seq

    def __repr__(self) -> str:
        columns = f", columns :{self.length} of {self.seq}" if self.length is not None else ""
        return f"Window(rows {self.start}:{self.stop} of {self.batch}{columns})"


def _in_window(tensor: torch.Tensor, window: Window) -> bool:
    return tensor.dim() > 0 and tensor.shape[0] == window.batch


def _cuts_columns(tensor: torch.Tensor, window: Window) -> bool:
    return (window.length is not None and window.seq is not None and window.length < window.seq
            and tensor.dim() > 1 and tensor.shape[1] == window.seq)


def narrow_window(value: Any, window: Window) -> Any:
    """The window's view of ``value``: its rows of every batch-first tensor and, where the second
    dimension is the batch's sequence, its own columns. Views, so in-place edits reach the batch."""
    if isinstance(value, torch.Tensor):
        if not _in_window(value, window):
            return value
        value = value[window.start:window.stop]
        return value[:, :window.length] if _cuts_columns(value, window) else value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(narrow_window(v, window) for v in value)
    if isinstance(value, list):
        return [narrow_window(v, window) for v in value]
    if isinstance(value, dict):
        return _same_mapping(value, {k: narrow_window(v, window) for k, v in value.items()})
    return value


def splice_window(full: Any, part: Any, window: Window) -> Any:
    """``full`` with the co-tenant's window replaced by ``part`` (out of place, so autograd stays right).

    Objects the co-tenant got unchanged come back as they are; a replaced tensor must fit the window
    (:func:`conform` names both shapes when it does not).
    """
    if isinstance(full, torch.Tensor):
        if not _in_window(full, window):
            return part
        old = narrow_window(full, window)
        if part is old:
            return full
        part = conform(part, old)
        rows = full[window.start:window.stop]
        if _cuts_columns(full, window):
            part = torch.cat([part, rows[:, window.length:]], dim=1)
        return torch.cat([full[:window.start], part, full[window.stop:]])
    if isinstance(full, (tuple, list)) and isinstance(part, (tuple, list)) and not hasattr(full, "_fields"):
        merged = [splice_window(f, p, window) for f, p in zip(full, part)]
        return type(full)(merged) if isinstance(full, tuple) else merged
    if isinstance(full, dict) and isinstance(part, dict):
        merged_items = {k: splice_window(full[k], v, window) if k in full else v for k, v in part.items()}
        return _same_mapping(full, merged_items)
    return part


def _same_mapping(like: dict[str, Any], items: dict[str, Any]) -> Any:
    """``items`` as the mapping type of ``like`` (a transformers ``ModelOutput`` stays one)."""
    if type(like) is dict:
        return items
    try:
        return type(like)(**items)
    except TypeError:
        return items


def stack_cotenants(parts: Sequence[dict[str, torch.Tensor]], pad_token_id: int, pasts: Sequence[int] | None = None
                  ) -> tuple[dict[str, torch.Tensor], list[Window]]:
    """One batch from several experiments' token inputs: new tokens right-padded to the longest.

    Each part has ``input_ids`` and ``attention_mask`` (its own invokes already batched its own
    way) and may have ``position_ids``. ``pasts`` gives each co-tenant's KV-cache length (generation
    steps after the first; default none): the batch's cache holds ``max(pasts)`` columns with each
    co-tenant's own keys at the right end (:func:`.cache_rows.merge_caches`), so a co-tenant's mask is
    zeros over the cache columns it lacks, its own mask (``past + new`` columns), zeros over the
    padding after its new tokens. Pad columns get position 0; position ids are passed for every row
    as soon as one co-tenant has them (the others get ``past..past+T-1``, what the model computes when
    given none).
    """
    pasts = list(pasts) if pasts is not None else [0] * len(parts)
    longest_past = max(pasts)
    seq = max(int(p["input_ids"].shape[1]) for p in parts)
    batch = sum(int(p["input_ids"].shape[0]) for p in parts)
    with_positions = any("position_ids" in p for p in parts)
    pad = torch.nn.functional.pad
    ids, masks, positions, windows, row = [], [], [], [], 0
    for part, past in zip(parts, pasts):
        rows, length = part["input_ids"].shape
        after = seq - length
        ids.append(pad(part["input_ids"], (0, after), value=pad_token_id))
        masks.append(pad(part["attention_mask"], (longest_past - past, after), value=0))
        if with_positions:
            own = part.get("position_ids")
            if own is None:
                own = torch.arange(past, past + length).expand(rows, length)
            positions.append(pad(own, (0, after), value=0))
        windows.append(Window(row, row + rows, batch, length, seq))
        row += rows
    stacked = {"input_ids": torch.cat(ids), "attention_mask": torch.cat(masks)}
    if with_positions:
        stacked["position_ids"] = torch.cat(positions)
    return stacked, windows


def stack_hidden(parts: Sequence[torch.Tensor], seq: int) -> torch.Tensor:
    """Co-tenants' hidden states ``(rows, length, ...)`` right-padded with zeros to ``seq`` and stacked."""
    return torch.cat([torch.nn.functional.pad(h, (0, 0) * (h.dim() - 2) + (0, seq - h.shape[1])) for h in parts])
