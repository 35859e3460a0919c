"""FLRC fine-grained allocation: a greedy knapsack over every projection's rank prefixes.

Dropping component ``i`` of projection ``p`` costs an estimated ``s_p σ_{p,i}²`` of loss
(``σ`` from the whitened, optionally Fisher-weighted SVD; ``s_p`` its Fisher
sensitivity); keeping it costs ``m_p + n_p`` parameters. Keeping the whole projection
dense costs ``m_p n_p`` and loses nothing. Components are kept in order of loss saved
per parameter until the budget is spent.

Because a projection's components must be kept as a prefix, the greedy works on the
lower convex hull of each projection's (cost, loss) curve: each hull segment is a block
of components (possibly ending in "dense") with one gain per parameter, and the blocks
of all projections are taken in decreasing order of that ratio. Whatever budget is left
when a block no longer fits is filled with the largest prefix of that block that fits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from lrexport.allocate.registry import (
    ALLOCATORS,
    AllocContext,
    ProjectionInfo,
    RatioAllocation,
    align_up,
    budget_for,
    finish,
)
from lrexport.config import register_config
from lrexport.errors import ConfigError


@register_config
@dataclass(frozen=True)
class Flrc(RatioAllocation):
    """Fine-grained greedy allocation over every projection's rank prefixes (this module)."""


def candidates(p: ProjectionInfo, align: int, min_rank: int) -> list[tuple[int | None, int, float]]:
    """(rank or None for dense, cost, loss) for the ranks a projection may take, by cost."""
    lo = align_up(min_rank, align)
    ranks = list(range(lo, p.max_lowrank + 1, align))
    tail = p.sigma2.flip(0).cumsum(0).flip(0).tolist() + [0.0]  # tail[r] = Σ_{i>=r} σ²
    pts = [(r, r * p.per_rank, p.loss_weight * tail[r]) for r in ranks]
    pts.append((None, p.dense, 0.0))
    return pts


def lower_hull(pts: list[tuple[int | None, int, float]]) -> list[int]:
    """Indices of the lower convex hull of (cost, loss) points sorted by cost."""
    hull: list[int] = []
    for i, (_, c, loss) in enumerate(pts):
        while len(hull) >= 2:
            (_, c1, l1), (_, c2, l2) = pts[hull[-2]], pts[hull[-1]]
            # drop the middle point if it lies on or above the chord to the new point
            if (l2 - l1) * (c - c1) >= (loss - l1) * (c2 - c1):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


@ALLOCATORS.register(Flrc)
def _flrc(cfg: Flrc, ctx: AllocContext):
    t0 = time.perf_counter()
    budget = budget_for(cfg.ratio, ctx)
    cands = {p.name: candidates(p, cfg.align, cfg.min_rank) for p in ctx.infos}
    state = {name: 0 for name in cands}  # index into cands[name] of the chosen point
    spent = sum(c[0][1] for c in cands.values())
    if spent > budget:
        raise ConfigError(f"ratio {cfg.ratio} leaves {budget:,} parameters, fewer than the {spent:,} that rank "
                          f"{align_up(cfg.min_rank, cfg.align)} everywhere needs; lower the ratio or min_rank")
    segments = []  # (gain per param, name, from index, to index)
    for name, pts in cands.items():
        hull = lower_hull(pts)
        for a, b in zip(hull, hull[1:]):
            dc, dl = pts[b][1] - pts[a][1], pts[a][2] - pts[b][2]
            segments.append((dl / dc if dc > 0 else float("inf"), name, a, b))
    segments.sort(key=lambda s: -s[0])
    blocked: set[str] = set()
    for _, name, a, b in segments:
        if name in blocked or state[name] != a:
            continue
        pts = cands[name]
        extra = pts[b][1] - pts[a][1]
        if spent + extra <= budget:
            state[name], spent = b, spent + extra
            continue
        # take the largest prefix of this block that fits, then stop growing this projection
        best = a
        for j in range(a + 1, b):
            if spent + pts[j][1] - pts[a][1] <= budget:
                best = j
        spent += pts[best][1] - pts[a][1]
        state[name] = best
        blocked.add(name)
    ranks = {name: cands[name][i][0] for name, i in state.items()}
    est = sum(cands[n][i][2] for n, i in state.items())
    return finish(ranks, ctx, budget, t0, estimated_loss=est)
