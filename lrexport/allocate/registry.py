"""Rank allocation: one interface, one typed config per allocator.

``allocate(cfg, ctx)`` returns an :class:`Allocation`: a rank for every projection that
becomes low-rank; a projection that is absent stays dense. The budget is a number of
parameters over the projections in ``ctx.infos`` (the weights) -- the same machinery
serves a budget in cache bytes per token (the KV latents) by giving each item its cost.
A projection is made low-rank only when that saves parameters: ``r (m + n) < m n``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lrexport.config import Registry
from lrexport.errors import ConfigError

log = logging.getLogger(__name__)

ALLOCATORS = Registry("allocator")


@dataclass
class ProjectionInfo:
    """What an allocator knows of one projection ``W [m, n]``."""

    name: str
    m: int
    n: int
    sigma2: torch.Tensor  # [K] non-increasing: the squared singular values of its decomposition
    loss_weight: float = 1.0  # loss of dropping component i ≈ loss_weight * sigma2[i]
    fisher_w: float = 0.0  # total weight Fisher (Palu's score)
    unit_cost: int | None = None  # cost of one unit of rank (default m + n parameters)
    full_cost: int | None = None  # cost of keeping it whole (default m * n parameters)

    @property
    def dense(self) -> int:
        return self.full_cost if self.full_cost is not None else self.m * self.n

    @property
    def per_rank(self) -> int:
        return self.unit_cost if self.unit_cost is not None else self.m + self.n

    @property
    def max_lowrank(self) -> int:
        """Largest rank that still saves parameters."""
        return min((self.dense - 1) // self.per_rank, len(self.sigma2))

    def cost(self, rank: int | None) -> int:
        return self.dense if rank is None else rank * self.per_rank

    def loss(self, rank: int | None) -> float:
        if rank is None:
            return 0.0
        return self.loss_weight * float(self.sigma2[rank:].sum())


@dataclass
class AllocContext:
    infos: list[ProjectionInfo]
    # STRS only: perplexity with projection `name` truncated to `rank` (all else dense).
    evaluate: Callable[[str, int], float] | None = None

    @property
    def total_dense(self) -> int:
        return sum(p.dense for p in self.infos)


@dataclass
class Allocation:
    ranks: dict[str, int]
    budget: int
    params_kept: int
    total_dense: int
    seconds: float = 0.0
    details: dict = field(default_factory=dict)

    @property
    def kept_fraction(self) -> float:
        return self.params_kept / self.total_dense

    def summary(self) -> str:
        return (f"{len(self.ranks)} low-rank projections, kept {self.params_kept:,}/{self.total_dense:,} "
                f"params ({self.kept_fraction:.4f}), budget {self.budget:,}, {self.seconds:.2f}s")


def budget_for(ratio: float, ctx: AllocContext) -> int:
    return int(round((1.0 - ratio) * ctx.total_dense))


def align_down(r: int, align: int) -> int:
    return (r // align) * align


def align_up(r: int, align: int) -> int:
    return -(-r // align) * align


def finish(ranks: dict[str, int | None], ctx: AllocContext, budget: int, t0: float, **details) -> Allocation:
    infos = {p.name: p for p in ctx.infos}
    low = {k: int(v) for k, v in ranks.items() if v is not None}
    kept = sum(infos[k].cost(ranks.get(k)) for k in infos)
    return Allocation(ranks=low, budget=budget, params_kept=kept, total_dense=ctx.total_dense,
                      seconds=time.perf_counter() - t0, details=details)


def allocate(cfg, ctx: AllocContext) -> Allocation:
    """Run the allocator of ``cfg`` on ``ctx``; its wall time is in ``Allocation.seconds``."""
    if not ctx.infos:
        raise ConfigError("nothing to allocate: no projections selected")
    alloc = ALLOCATORS(cfg)(cfg, ctx)
    log.info("%s: %s", type(cfg).__name__, alloc.summary())
    return alloc


@dataclass(frozen=True)
class RatioAllocation:
    """Fields every allocator config shares: the fraction removed, rank granularity, rank floor."""

    ratio: float  # fraction of the budgeted quantity (parameters, cache channels) to remove
    align: int = 1  # ranks are multiples of this (8/16/32 suit the kernels)
    min_rank: int = 1

    def __post_init__(self):
        check_alloc_args(self.ratio, self.align, self.min_rank)


def check_alloc_args(ratio: float, align: int, min_rank: int) -> None:
    from lrexport.config import check_ratio

    check_ratio("ratio", ratio)
    if align not in (1, 2, 4, 8, 16, 32, 64):
        raise ConfigError(f"align must be one of 1, 2, 4, 8, 16, 32, 64, got {align}")
    if min_rank < 1:
        raise ConfigError(f"min_rank must be >= 1, got {min_rank}")
