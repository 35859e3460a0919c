"""STRS (ASVD's sensitivity-based truncation rank search): the slow baseline.

For every projection and every kept-parameter fraction in ``grid`` it measures the
perplexity of the model with only that projection truncated. A threshold ``τ`` then
picks, for each projection, the smallest fraction whose perplexity stays under ``τ``
(dense when none does); a binary search over ``τ`` meets the parameter budget.
``len(projections) × len(grid)`` perplexity evaluations make it slow by design.
"""

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
from lrexport.errors import ConfigError
from lrexport.util import progress


@register_config
@dataclass(frozen=True)
class Strs(RatioAllocation):
    """ASVD's sensitivity search over kept fractions ``grid`` (this module)."""

    grid: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

    def __post_init__(self):
        super().__post_init__()
        if not self.grid or any(not 0 < g < 1 for g in self.grid):
            raise ConfigError(f"Strs.grid must hold fractions in (0, 1), got {self.grid}")


@ALLOCATORS.register(Strs)
def _strs(cfg: Strs, ctx: AllocContext):
    if ctx.evaluate is None:
        raise ConfigError("Strs needs a perplexity evaluator (AllocContext.evaluate)")
    t0 = time.perf_counter()
    budget = budget_for(cfg.ratio, ctx)
    table: dict[str, list[tuple[int, float]]] = {}
    total = len(ctx.infos) * len(cfg.grid)
    bar = progress(total=total, desc="strs: sensitivity", unit="eval")
    for p in ctx.infos:
        rows = []
        for g in sorted(cfg.grid):
            r = min(max(align_down(int(g * p.dense / p.per_rank), cfg.align), align_up(cfg.min_rank, cfg.align)),
                    align_down(p.max_lowrank, cfg.align))
            rows.append((r, ctx.evaluate(p.name, r)))
            bar.update(1)
        table[p.name] = rows
    bar.close()
    infos = {p.name: p for p in ctx.infos}

    def pick(tau: float) -> dict[str, int | None]:
        return {n: next((r for r, ppl in rows if ppl <= tau), None) for n, rows in table.items()}

    def params(ranks) -> int:
        return sum(infos[n].cost(r) for n, r in ranks.items())

    taus = sorted({ppl for rows in table.values() for _, ppl in rows})
    lo, hi = 0, len(taus) - 1
    if params(pick(taus[hi])) > budget:
        raise ConfigError(f"STRS cannot meet ratio {cfg.ratio} with grid {cfg.grid}: add smaller fractions")
    while lo < hi:  # the smallest threshold whose allocation fits the budget
        mid = (lo + hi) // 2
        if params(pick(taus[mid])) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return finish(pick(taus[lo]), ctx, budget, t0, threshold=taus[lo], evaluations=total)
