"""Putting several invokes into one batch, and giving each invoke back only its rows.

Every invoke owns a contiguous row range of the batch. A getter of invoke ``i`` sees a view of
those rows (so in-place edits reach the model); a setter of invoke ``i`` replaces only those rows.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import GraphValidationError

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


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a padded row computes what it would alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


#: How a batch of token inputs gets its positions (graph option ``positions``):
#: ``"model"`` (default, nnsight's rule): no position ids are passed, the model computes them as
#: ``model(**tokenizer(prompts, padding=True))`` does, so on a model with absolute position embeddings
#: (GPT-2) a left-padded prompt differs from its solo run; ``"solo"``: position ids from the attention
#: mask (:func:`position_ids_for`), so every prompt computes what it computes alone.
POSITIONS = ("model", "solo")


def positions_option(options: dict[str, Any]) -> str:
    """The graph's ``positions`` option, checked (default ``"model"``)."""
    value = options.get("positions", "model")
    if value not in POSITIONS:
        raise GraphValidationError(f"graph option 'positions' must be one of {', '.join(map(repr, POSITIONS))}, "
                                   f"got {value!r}", field="options.positions")
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


def narrow(value: Any, start: int, stop: int, batch: int) -> Any:
    """The rows ``start:stop`` of every tensor in ``value`` whose first dimension is the batch."""
    if isinstance(value, torch.Tensor):
        return value[start:stop] if value.dim() and value.shape[0] == batch else value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(narrow(v, start, stop, batch) for v in value)
    if isinstance(value, list):
        return [narrow(v, start, stop, batch) for v in value]
    if isinstance(value, dict):
        items = {k: narrow(v, start, stop, batch) for k, v in value.items()}
        try:
            return type(value)(**items)
        except TypeError:
            return items
    return value


def splice(full: Any, part: Any, start: int, stop: int, batch: int) -> Any:
    """``full`` with rows ``start:stop`` replaced by ``part`` (autograd-friendly, no in-place)."""
    if isinstance(full, torch.Tensor):
        if not (full.dim() and full.shape[0] == batch):
            return part
        part = conform(part, full[start:stop])
        return torch.cat([full[:start], part, full[stop:]])
    if isinstance(full, (tuple, list)) and isinstance(part, (tuple, list)):
        merged = [splice(f, p, start, stop, batch) for f, p in zip(full, part)]
        return type(full)(merged) if isinstance(full, tuple) else merged
    return part


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
