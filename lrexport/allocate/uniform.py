"""Uniform allocation (SVD-LLM): every projection keeps the same fraction of its parameters."""

from __future__ import annotations

import time
from dataclasses import dataclass

from lrexport.allocate.registry import (
    ALLOCATORS,
    AllocContext,
    RatioAllocation,
    align_down,
    align_up,
    budget_for,
    finish,
)
from lrexport.config import register_config


@register_config
@dataclass(frozen=True)
class Uniform(RatioAllocation):
    """The same kept fraction for every projection."""


@ALLOCATORS.register(Uniform)
def _uniform(cfg: Uniform, ctx: AllocContext):
    t0 = time.perf_counter()
    keep = 1.0 - cfg.ratio
    ranks = {}
    for p in ctx.infos:
        r = align_down(int(keep * p.dense / p.per_rank), cfg.align)
        ranks[p.name] = min(max(r, align_up(cfg.min_rank, cfg.align)), align_down(p.max_lowrank, cfg.align))
    return finish(ranks, ctx, budget_for(cfg.ratio, ctx), t0)
