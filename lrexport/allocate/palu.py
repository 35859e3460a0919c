"""Fisher-proportional allocation (Palu): each projection keeps a fraction of its rank in
proportion to its Fisher score, capped at dense and redistributed (water-filling).

The score is Palu's: the root-mean-square weight gradient, ``sqrt(fisher_w / (m n))``.
Kept parameters are ``c * score * (m n)``, so for projections of one shape (Palu's K/V
case) ranks are proportional to the score."""

from __future__ import annotations

import math
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
from lrexport.errors import ConfigError


@register_config
@dataclass(frozen=True)
class PaluFisher(RatioAllocation):
    """Palu's Fisher-proportional allocation (this module)."""


@ALLOCATORS.register(PaluFisher)
def _palu(cfg: PaluFisher, ctx: AllocContext):
    t0 = time.perf_counter()
    budget = budget_for(cfg.ratio, ctx)
    if sum(p.fisher_w for p in ctx.infos) <= 0:
        raise ConfigError("PaluFisher needs weight Fisher information (calibrate with fisher=True)")
    weight = {p.name: math.sqrt(p.fisher_w / (p.m * p.n)) * p.dense for p in ctx.infos}
    free = {p.name: p for p in ctx.infos}
    share: dict[str, float] = {}
    remaining = float(budget)
    while free:  # water-filling: cap at dense, give the excess to the others
        total = sum(weight[k] for k in free) or 1.0
        capped = {k: p for k, p in free.items() if remaining * weight[k] / total >= p.dense}
        if not capped:
            for k in free:
                share[k] = remaining * weight[k] / total
            break
        for k, p in capped.items():
            share[k] = float(p.dense)
            remaining -= p.dense
            del free[k]
    ranks: dict[str, int | None] = {}
    for p in ctx.infos:
        r = align_down(int(share[p.name] / p.per_rank), cfg.align)
        ranks[p.name] = None if r > p.max_lowrank else max(r, align_up(cfg.min_rank, cfg.align))
    return finish(ranks, ctx, budget, t0)
