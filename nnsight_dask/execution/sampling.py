"""Seeded sampling of the next token, the same draw locally and on the shards.

``model.generate(do_sample=True)`` draws from torch's process-wide random state: a shard serving
many users cannot give one experiment a seed of its own, and a remote run could never repeat a local
one. So a sampling generation carries its own seed (``seed=``, drawn on the client when not given)
and both engines pick tokens with :class:`SeededSampler`: temperature, then top-k, then top-p
(nucleus), then one uniform draw per row and step from a ``torch.Generator`` of that seed, mapped to a
token through the cumulative distribution. Locally the sampler runs as the last logits processor of
``model.generate`` (which then decodes greedily: the sampler leaves one finite score per row); on the
shards it picks the token where greedy decoding would take the argmax. Equal logits give equal tokens.
"""
from __future__ import annotations

from typing import Any

import torch

from ..graph.validate import check_sampling

#: The generation options that control sampling (besides ``do_sample``).
SAMPLING_OPTIONS = ("temperature", "top_k", "top_p", "seed")


class SeededSampler:
    """Picks one token per row from ``scores`` (float logits ``(rows, vocab)``), a draw per call."""

    def __init__(self, seed: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> None:
        self.temperature = float(temperature)
        self.top_k = int(top_k)
        self.top_p = float(top_p)
        self.generator = torch.Generator().manual_seed(int(seed))

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> SeededSampler | None:
        """The sampler a generation's options ask for; None for greedy decoding."""
        if not options.get("do_sample"):
            return None
        check_sampling(options)
        return cls(options["seed"], options.get("temperature", 1.0), options.get("top_k", 0), options.get("top_p", 1.0))

    def pick(self, scores: torch.Tensor) -> torch.Tensor:
        """The sampled token id of each row."""
        scores = scores.float() / self.temperature
        if 0 < self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if self.top_p < 1.0:
            ordered, order = torch.sort(probs, dim=-1, descending=True)
            before = ordered.cumsum(-1) - ordered  # probability mass of the tokens ranked above each one
            ordered = ordered.masked_fill(before >= self.top_p, 0.0)  # the top token always stays
            probs = torch.zeros_like(probs).scatter(-1, order, ordered)
        cumulative = probs.cumsum(-1)
        draw = torch.rand(scores.shape[0], 1, generator=self.generator) * cumulative[:, -1:]
        token = torch.searchsorted(cumulative, draw, right=True).clamp(max=scores.shape[-1] - 1)
        return token.squeeze(-1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """As a transformers logits processor: every score but the sampled token's becomes -inf."""
        token = self.pick(scores)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, token[:, None].to(scores.device), 0.0)
