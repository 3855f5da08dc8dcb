"""How the next text token is chosen: the sampling options, and temperature + top-p sampling as tensor ops."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How the next text token is chosen. Visual tokens are always the head's (deterministic) prediction.

    Args:
        max_new_tokens: budget of generated positions per sample: text tokens, image markers and visual tokens
            all count. An image that has started is always finished (up to tokens_per_image + 1 positions past
            the budget), so outputs never hold a truncated image.
        temperature: 0 = greedy; otherwise logits are divided by it before sampling.
        top_p: nucleus sampling: sample among the most likely tokens whose probabilities sum to top_p.
        seed: each sample draws its uniforms for all steps up front from a generator seeded by (seed, sample
            seed), and step i samples by inverse CDF with the i-th: a sample's output does not depend on the batch
            it was decoded in, and the draw is a tensor op (no per-row generator calls during decoding).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")


def sample_from_logits(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float,
                       top_p: float) -> torch.Tensor:
    """Temperature + top-p sampling by inverse CDF: one token per row of `logits` [B, V] from `uniforms` [B] in
    [0, 1). Tensor ops only, the same for every row (no generator calls)."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        probs, order = probs.sort(dim=-1, descending=True)
        # Keep a token while the mass before it is < top_p (so the most likely token is always kept).
        probs = probs.masked_fill((probs.cumsum(dim=-1) - probs) >= top_p, 0.0)
    cdf = probs.cumsum(dim=-1)
    # The first token whose cumulative mass exceeds u * total: never one of zero probability.
    index = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True).clamp(max=cdf.shape[-1] - 1)
    return (order.gather(-1, index) if top_p < 1 else index)[:, 0]
