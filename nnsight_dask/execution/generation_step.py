"""The token inputs of a pass on the shards: the first step's (the graph's invokes, batched), and
each later generation step's (the token just picked, one column more of mask and positions)."""
from __future__ import annotations


import torch

from .batching import batch_token_inputs, forward_position_ids, position_ids_for, resolve_inputs
from .sampling import SeededSampler
from .shard_state import ExperimentState
from .stage import Carry, Stage


def first_inputs(state: ExperimentState, carry: Carry, pass_index: int, pad_token_id: int) -> None:
    """The pass's first inputs into ``carry`` (on shard 0 at step 0): its invokes batched, its layout."""
    run = state.graph.passes[pass_index]
    invokes = resolve_inputs(run.invokes, {**state.values, **carry.values}, pass_index,
                             vocab_size=state.vocab_size, max_prompt_tokens=state.max_prompt_tokens)
    batch, carry.layout = batch_token_inputs(invokes, pad_token_id)
    carry.inputs = dict(batch)
    if run.kind == "generate":
        # as transformers' generate: positions from the attention mask (padding is masked out)
        mask = batch["attention_mask"]
        positions = position_ids_for(mask).masked_fill(mask == 0, 1)
        carry.inputs["position_ids"] = positions
        carry.tokens = batch["input_ids"]
        carry.unfinished = torch.ones(batch["input_ids"].shape[0], dtype=torch.bool)
    else:  # as the local runner: the model's own positions unless the graph asks for solo ones
        positions = forward_position_ids(batch, state.graph.options)
        if positions is not None:
            carry.inputs["position_ids"] = positions
    carry.stopped = False


def next_token(state: ExperimentState, stage: Stage, carry: Carry, logits: torch.Tensor, pad_token_id: int,
               eos: list[int]) -> None:
    """On the last shard after a generation step (``logits``: the experiment's): pick the next token
    (greedy, or the pass's seeded sampler), mark sequences that reached ``eos`` finished, and make the
    next step's inputs."""
    sampler = state.samplers.get(stage.pass_index)
    if sampler is None and stage.pass_index not in state.samplers:
        sampler = state.samplers[stage.pass_index] = SeededSampler.from_options(
            state.graph.passes[stage.pass_index].kwargs)
    tokens = logits[:, -1].argmax(-1) if sampler is None else sampler.pick(logits[:, -1].float())
    unfinished = carry.unfinished if carry.unfinished is not None else torch.ones_like(tokens, dtype=torch.bool)
    tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad_token_id))
    carry.tokens = torch.cat([carry.tokens, tokens[:, None]], dim=1)  # type: ignore[list-item]
    if eos:
        unfinished = unfinished & ~torch.isin(tokens, torch.tensor(eos))
    carry.unfinished = unfinished
    mask = carry.inputs["attention_mask"]
    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    positions = carry.inputs["position_ids"][:, -1:] + 1
    carry.inputs = {"input_ids": tokens[:, None], "attention_mask": mask, "position_ids": positions}
