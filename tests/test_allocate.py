"""Tests of lrexport.allocate: Uniform, PaluFisher, Flrc, Strs.

Budgets are numbers of parameters: a projection ``[m, n]`` kept at rank r costs r(m+n),
kept dense (absent from ``Allocation.ranks``) it costs mn. References (exhaustive search,
convex hulls, water-filling shares) are computed independently in this file.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from lrexport.allocate import AllocContext, Flrc, PaluFisher, ProjectionInfo, Strs, Uniform, allocate
from lrexport.errors import ConfigError

# The seven projections of a SmolLM-135M layer (hidden 576, intermediate 1536, 9 q / 3 kv heads of 64).
HID, INTER, KV = 576, 1536, 192
LAYER_SHAPES = {"self_attn.q_proj": (HID, HID), "self_attn.k_proj": (KV, HID), "self_attn.v_proj": (KV, HID),
                "self_attn.o_proj": (HID, HID), "mlp.gate_proj": (INTER, HID), "mlp.up_proj": (INTER, HID),
                "mlp.down_proj": (HID, INTER)}
ALLOCATORS = [Uniform, PaluFisher, Flrc]


def decaying_sigma2(rng, K: int) -> torch.Tensor:
    """Random, strictly positive, non-increasing squared singular values with a random decay."""
    s2 = rng.exponential(1.0, K) * np.exp(-np.arange(K) / rng.uniform(5, K / 2)) + 1e-9
    return torch.from_numpy(np.sort(s2)[::-1].copy())


def realistic_infos(rng, layers: int = 3) -> list[ProjectionInfo]:
    infos = []
    for layer in range(layers):
        for name, (m, n) in LAYER_SHAPES.items():
            infos.append(ProjectionInfo(f"model.layers.{layer}.{name}", m, n, decaying_sigma2(rng, min(m, n)),
                                        loss_weight=float(rng.lognormal(0, 1)),
                                        fisher_w=float(rng.uniform(0.5, 2.0))))
    return infos


def kept_params(infos, ranks) -> int:
    """Independent count: r(m+n) for a low-rank projection, mn for a dense one."""
    return sum(p.m * p.n if p.name not in ranks else ranks[p.name] * (p.m + p.n) for p in infos)


def est_loss(infos, ranks) -> float:
    return sum(0.0 if p.name not in ranks else p.loss_weight * float(p.sigma2.numpy()[ranks[p.name]:].sum())
               for p in infos)


def check_ranks_valid(infos, alloc):
    by = {p.name: p for p in infos}
    assert set(alloc.ranks) <= set(by)
    for name, r in alloc.ranks.items():
        p = by[name]
        assert isinstance(r, int) and 1 <= r <= min(p.m, p.n), f"{name}: rank {r}"
        assert r * (p.m + p.n) < p.m * p.n, f"{name}: rank {r} does not save parameters; it should be dense"


# ------------------------------------------------------------------ budgets


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.5])
def test_flrc_meets_budget_within_half_percent(rng, ratio):
    infos = realistic_infos(rng)
    total = sum(p.m * p.n for p in infos)
    alloc = allocate(Flrc(ratio), AllocContext(infos))
    budget = int(round((1 - ratio) * total))
    assert alloc.budget == budget and alloc.total_dense == total
    assert alloc.params_kept == kept_params(infos, alloc.ranks)
    assert alloc.params_kept <= budget
    assert alloc.params_kept >= 0.995 * budget, f"kept {alloc.params_kept} of budget {budget}"
    assert alloc.kept_fraction == pytest.approx(alloc.params_kept / total)
    check_ranks_valid(infos, alloc)
    assert alloc.details["estimated_loss"] == pytest.approx(est_loss(infos, alloc.ranks), rel=1e-9)


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.5])
@pytest.mark.parametrize("cls", [Uniform, PaluFisher])
def test_uniform_and_palu_meet_budget_within_one_percent(rng, cls, ratio):
    infos = realistic_infos(rng)
    alloc = allocate(cls(ratio), AllocContext(infos))
    budget = int(round((1 - ratio) * sum(p.m * p.n for p in infos)))
    assert alloc.params_kept == kept_params(infos, alloc.ranks)
    assert abs(alloc.params_kept - budget) <= 0.01 * budget, f"kept {alloc.params_kept} of budget {budget}"
    check_ranks_valid(infos, alloc)


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.6])
def test_uniform_keeps_the_same_fraction_everywhere(rng, ratio):
    infos = realistic_infos(rng, layers=1)
    alloc = allocate(Uniform(ratio), AllocContext(infos))
    assert set(alloc.ranks) == {p.name for p in infos}  # uniform never keeps a projection dense
    for p in infos:
        r = alloc.ranks[p.name]
        exact = (1 - ratio) * p.m * p.n / (p.m + p.n)  # the rank that keeps exactly 1 - ratio
        assert exact - 1 < r <= exact, f"{p.name}: rank {r}, exact {exact:.2f}"


def test_palu_shares_are_proportional_to_fisher_with_water_filling(rng):
    """One projection with a huge Fisher score is capped at dense; the rest of the budget is
    shared in proportion to Palu's score sqrt(fisher_w / (m n)) times m n (to within one rank)."""
    shapes = [(256, 256), (128, 256), (256, 512), (384, 128)]
    fw = [1000.0, 1.0, 2.0, 1.5]  # chosen so that only p0 hits its dense cap
    infos = [ProjectionInfo(f"p{i}", m, n, decaying_sigma2(rng, min(m, n)), fisher_w=f)
             for i, ((m, n), f) in enumerate(zip(shapes, fw))]
    ratio = 0.4
    alloc = allocate(PaluFisher(ratio), AllocContext(infos))
    budget = int(round((1 - ratio) * sum(m * n for m, n in shapes)))
    assert "p0" not in alloc.ranks  # capped: dense
    rest = budget - 256 * 256
    w = [math.sqrt(f / (m * n)) * m * n for (m, n), f in zip(shapes, fw)]
    for p, wi in zip(infos[1:], w[1:]):
        share = rest * wi / sum(w[1:])
        assert share - (p.m + p.n) < alloc.ranks[p.name] * (p.m + p.n) <= share, p.name


# ------------------------------------------------------------------ FLRC optimality


def candidate_points(p: ProjectionInfo, align: int, min_rank: int):
    """(rank or None, cost, loss) of every choice allowed: ranks lo, lo+align, ... that save
    parameters (lo = max(min_rank, align)), and dense."""
    s2 = p.sigma2.numpy()
    pts, r = [], max(min_rank, align)
    while r <= len(s2) and r * (p.m + p.n) < p.m * p.n:
        pts.append((r, r * (p.m + p.n), p.loss_weight * float(s2[r:].sum())))
        r += align
    return pts + [(None, p.m * p.n, 0.0)]


def hull_block_costs(pts) -> list[int]:
    """Costs of the blocks of the lower convex hull by gift wrapping: from a hull vertex, the
    next vertex is the point of least slope (the farthest one on ties)."""
    i, costs = 0, []
    while i < len(pts) - 1:
        best_slope, best_j = None, None
        for j in range(i + 1, len(pts)):
            slope = (pts[j][2] - pts[i][2]) / (pts[j][1] - pts[i][1])
            if best_slope is None or slope <= best_slope + 1e-12 * abs(best_slope):
                best_slope, best_j = slope, j
        costs.append(pts[best_j][1] - pts[i][1])
        i = best_j
    return costs


def exhaustive_best(cands, budget) -> float:
    best = np.inf
    for combo in itertools.product(*cands):
        if sum(c for _, c, _ in combo) <= budget:
            best = min(best, sum(loss for _, _, loss in combo))
    return best


def test_flrc_is_near_optimal_against_exhaustive_search():
    """Bound asserted: loss(FLRC, budget B) <= OPT(B - c_max), with OPT(b) the exhaustive
    optimum over all allowed rank combinations of cost <= b and c_max the largest block of any
    projection's lower convex hull.

    Why: the blocks are taken in decreasing gain per parameter, so until the first block that
    does not fit (cost c <= c_max) the greedy is exactly the optimum of the continuous
    relaxation over the hulls at the budget S it has spent, with S > B - c. That relaxation is
    a lower bound of every integer allocation of cost <= S, and everything the greedy does
    afterwards only lowers its loss: loss <= LP(S) <= OPT(S) <= OPT(B - c_max).
    Also asserted: cost <= B and loss >= OPT(B) (no allocation beats the true optimum)."""
    shapes = [(10, 10), (8, 12), (6, 14)]
    checked = exact = 0
    for seed in range(40):
        rng = np.random.default_rng(1000 + seed)
        k = int(rng.integers(2, 4))
        align = int(rng.choice([1, 2]))
        infos = [ProjectionInfo(f"p{i}", m, n, torch.from_numpy(np.sort(rng.exponential(1.0, min(m, n)))[::-1].copy()),
                                loss_weight=float(rng.lognormal(0, 1.5))) for i, (m, n) in enumerate(shapes[:k])]
        ratio = float(rng.uniform(0.1, 0.6))
        budget = int(round((1 - ratio) * sum(m * n for m, n in shapes[:k])))
        cands = [candidate_points(p, align, 1) for p in infos]
        if sum(c[0][1] for c in cands) > budget:
            with pytest.raises(ConfigError, match="ratio"):
                allocate(Flrc(ratio, align=align), AllocContext(infos))
            continue
        alloc = allocate(Flrc(ratio, align=align), AllocContext(infos))
        loss = est_loss(infos, alloc.ranks)
        assert alloc.details["estimated_loss"] == pytest.approx(loss, rel=1e-12, abs=1e-12)
        assert kept_params(infos, alloc.ranks) == alloc.params_kept <= budget
        assert all(r % align == 0 for r in alloc.ranks.values())
        c_max = max(max(hull_block_costs(c)) for c in cands)
        opt_b = exhaustive_best(cands, budget)
        opt_less = exhaustive_best(cands, budget - c_max)
        assert loss >= opt_b - 1e-12
        assert loss <= opt_less + 1e-12, f"seed {seed}: loss {loss} > OPT(B - {c_max}) = {opt_less}"
        checked += 1
        exact += loss <= opt_b + 1e-12
    assert checked >= 30
    assert exact >= checked // 2  # on such small problems the greedy is usually exactly optimal


def test_flrc_prefers_the_sensitive_projection(rng):
    s2 = decaying_sigma2(rng, 64)
    infos = [ProjectionInfo("calm", 64, 96, s2.clone(), loss_weight=1.0),
             ProjectionInfo("sensitive", 64, 96, s2.clone(), loss_weight=100.0)]
    alloc = allocate(Flrc(0.5), AllocContext(infos))
    r_calm = alloc.ranks.get("calm", 10**9)
    r_sens = alloc.ranks.get("sensitive", 10**9)  # absent = dense = the most that can be kept
    assert r_sens > r_calm, alloc.ranks
    assert alloc.params_kept <= alloc.budget


def test_flrc_takes_loss_saving_components_first(rng):
    """sigma2 is zero past rank 2, so ranks 1 -> 2 are the only components that save loss; they
    must be taken before anything else, whatever the budget does with the rest."""
    s2 = torch.tensor([5.0, 3.0] + [0.0] * 30, dtype=torch.float64)
    infos = [ProjectionInfo("a", 32, 48, s2.clone()), ProjectionInfo("b", 32, 48, s2.clone())]
    for ratio in (0.3, 0.9):  # budget 2150 / 307 parameters; rank 2 in both costs 320
        alloc = allocate(Flrc(ratio), AllocContext(infos))
        assert alloc.params_kept == kept_params(infos, alloc.ranks) <= alloc.budget
        if ratio == 0.3:
            assert est_loss(infos, alloc.ranks) == 0.0
        else:  # only one of the two can reach rank 2
            assert sorted(alloc.ranks.values()) == [1, 2] and est_loss(infos, alloc.ranks) == 3.0


@pytest.mark.parametrize("cls", ALLOCATORS)
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_align_8_gives_multiples_of_8(rng, cls, ratio):
    infos = realistic_infos(rng, layers=2)
    alloc = allocate(cls(ratio, align=8), AllocContext(infos))
    assert alloc.ranks, "expected some low-rank projections"
    assert all(r % 8 == 0 for r in alloc.ranks.values()), alloc.ranks
    check_ranks_valid(infos, alloc)
    # rounding ranks down to multiples of 8 can cost at most 8 ranks per projection
    slack = sum(8 * (p.m + p.n) for p in infos)
    assert alloc.budget - slack <= alloc.params_kept, (alloc.params_kept, alloc.budget)
    if cls is not PaluFisher:  # Palu may round a near-dense share up to dense
        assert alloc.params_kept <= alloc.budget


@pytest.mark.parametrize("cls", [Uniform, PaluFisher])
def test_align_holds_when_aligned_rank_rounds_to_zero(cls):
    # keep 0.1 of a 24x24 projection: 0.1*576/48 = 1.2 -> align_down(1, 8) = 0 -> max(0, min_rank=1) = 1
    # (Palu: the small projection's share of the budget, 1e-4 of it, also rounds to rank 0)
    infos = [ProjectionInfo("small", 24, 24, torch.linspace(1, 0.1, 24, dtype=torch.float64), fisher_w=1e-4),
             ProjectionInfo("big", 256, 256, torch.linspace(1, 0.1, 256, dtype=torch.float64), fisher_w=1.0)]
    alloc = allocate(cls(0.9, align=8), AllocContext(infos))
    assert all(r % 8 == 0 for r in alloc.ranks.values()), alloc.ranks


def test_flrc_align_holds_when_min_rank_is_not_a_multiple(rng):
    infos = realistic_infos(rng, layers=1)
    alloc = allocate(Flrc(0.5, align=8, min_rank=12), AllocContext(infos))
    assert alloc.ranks
    assert all(r % 8 == 0 and r >= 12 for r in alloc.ranks.values()), alloc.ranks


# ------------------------------------------------------------------ STRS


def test_strs_meets_budget_and_favours_the_sensitive_projection():
    sensitivity = {"calm": 5.0, "sensitive": 200.0}
    calls = []

    def evaluate(name: str, rank: int) -> float:
        calls.append((name, rank))
        return 10.0 + sensitivity[name] / rank

    infos = [ProjectionInfo(n, 128, 128, torch.linspace(1, 0.01, 128, dtype=torch.float64)) for n in sensitivity]
    cfg = Strs(0.5)
    alloc = allocate(cfg, AllocContext(infos, evaluate=evaluate))
    assert alloc.params_kept == kept_params(infos, alloc.ranks) <= alloc.budget
    r = {n: alloc.ranks.get(n, 128) for n in sensitivity}
    assert r["sensitive"] > r["calm"], alloc.ranks
    assert len(calls) == alloc.details["evaluations"] == len(infos) * len(cfg.grid)
    # the probed ranks are the grid fractions of the parameters, rounded down
    probed = sorted({rk for n, rk in calls if n == "calm"})
    assert probed == [int(g * 128 * 128 / 256) for g in sorted(cfg.grid)]
    # the threshold is the smallest that fits: every projection sits at its least rank under it
    tau = alloc.details["threshold"]
    for n in sensitivity:
        ok = [rk for rk in probed if 10.0 + sensitivity[n] / rk <= tau]
        assert alloc.ranks.get(n) == (min(ok) if ok else None)


def test_strs_cannot_meet_the_budget_with_a_coarse_grid():
    infos = [ProjectionInfo("a", 64, 64, torch.linspace(1, 0.1, 64, dtype=torch.float64))]
    with pytest.raises(ConfigError, match=r"STRS cannot meet ratio 0.5 with grid \(0.8, 0.9\)"):
        allocate(Strs(0.5, grid=(0.8, 0.9)), AllocContext(infos, evaluate=lambda n, r: 10.0 + 1 / r))


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("ratio", [0, 1, -0.1, 1.5, 0.0, 1.0])
@pytest.mark.parametrize("cls", [Uniform, PaluFisher, Flrc, Strs])
def test_ratio_out_of_range(cls, ratio):
    with pytest.raises(ConfigError, match=r"ratio must be in \(0, 1\)"):
        cls(ratio)


@pytest.mark.parametrize("cls", [Uniform, PaluFisher, Flrc, Strs])
def test_bad_align_and_min_rank(cls):
    with pytest.raises(ConfigError, match="align must be one of 1, 2, 4, 8, 16, 32, 64, got 3"):
        cls(0.5, align=3)
    with pytest.raises(ConfigError, match="min_rank must be >= 1, got 0"):
        cls(0.5, min_rank=0)


@pytest.mark.parametrize("grid", [(), (0.0, 0.5), (0.5, 1.0)])
def test_strs_bad_grid(grid):
    with pytest.raises(ConfigError, match="Strs.grid"):
        Strs(0.5, grid=grid)


def test_flrc_ratio_too_high_for_min_rank(rng):
    infos = realistic_infos(rng, layers=1)
    # min_rank 64 everywhere costs sum 64(m+n) > 5% of the parameters
    with pytest.raises(ConfigError, match=r"ratio 0.95 leaves .* fewer than .* rank 64 everywhere needs"):
        allocate(Flrc(0.95, min_rank=64), AllocContext(infos))


def test_palu_needs_fisher(rng):
    infos = realistic_infos(rng, layers=1)
    for p in infos:
        p.fisher_w = 0.0
    with pytest.raises(ConfigError, match="PaluFisher needs weight Fisher information"):
        allocate(PaluFisher(0.3), AllocContext(infos))


def test_strs_needs_an_evaluator(rng):
    with pytest.raises(ConfigError, match=r"Strs needs a perplexity evaluator \(AllocContext.evaluate\)"):
        allocate(Strs(0.3), AllocContext(realistic_infos(rng, layers=1)))


def test_nothing_to_allocate_and_unknown_allocator(rng):
    with pytest.raises(ConfigError, match="no projections selected"):
        allocate(Flrc(0.3), AllocContext([]))
    with pytest.raises(ConfigError, match="unknown allocator dict; known: .*Flrc"):
        allocate({"ratio": 0.3}, AllocContext(realistic_infos(rng, layers=1)))


def test_projection_info_arithmetic():
    p = ProjectionInfo("x", 6, 10, torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64), loss_weight=2.0)
    assert p.dense == 60 and p.per_rank == 16
    assert p.max_lowrank == 3  # 3*16 = 48 < 60 <= 4*16
    assert p.cost(None) == 60 and p.cost(2) == 32
    assert p.loss(None) == 0.0 and p.loss(4) == pytest.approx(2.0 * 0.75)
