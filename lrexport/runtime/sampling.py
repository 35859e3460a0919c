"""Token sampling: greedy, temperature, top-k and top-p, reproducible with a seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lrexport.config import register_config
from lrexport.errors import ConfigError


@register_config
@dataclass(frozen=True)
class Sampling:
    """``temperature == 0`` is greedy decoding; ``top_k == 0`` and ``top_p == 1`` disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(logits_BV: torch.Tensor, cfg: Sampling, gen: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids ``[B]`` from the last-position logits ``[B, V]``."""
    logits_BV = logits_BV.float()
    if cfg.greedy:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits_BV, min(cfg.top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if cfg.top_p < 1:
        sorted_l, idx = torch.sort(logits_BV, descending=True, dim=-1)
        probs = sorted_l.softmax(-1)
        drop = probs.cumsum(-1) - probs > cfg.top_p  # keep the smallest set reaching top_p
        sorted_l = sorted_l.masked_fill(drop, float("-inf"))
        logits_BV = torch.full_like(logits_BV, float("-inf")).scatter(-1, idx, sorted_l)
    probs = logits_BV.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)
