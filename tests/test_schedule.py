"""Tests of lrexport.schedule: progressive-decoding rank schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lrexport.allocate import Uniform
from lrexport.errors import ConfigError
from lrexport.schedule import Constant, Cosine, Linear, Progressive, Schedule, Steps, active_params, pooled_fraction

FORMS = [Constant(0.6), Steps(((1, 1.0), (4, 0.5), (10, 0.25))), Linear(1.0, 0.3, 20), Cosine(0.9, 0.2, 15)]


@pytest.mark.parametrize("form", FORMS, ids=lambda f: type(f).__name__)
@pytest.mark.parametrize("prefill", [1.0, 0.75])
def test_prefill_fraction(form, prefill):
    s = Schedule(form=form, prefill=prefill)
    assert s.fraction(0) == prefill
    assert s.fraction(-3) == prefill


def test_default_schedule_is_constant_full_rank():
    s = Schedule()
    assert [s.fraction(t) for t in range(6)] == [1.0] * 6
    assert s.ranks(7, [16, 40, 3]) == [16, 40, 3]


def test_constant():
    s = Schedule(form=Constant(0.6))
    assert all(s.fraction(t) == 0.6 for t in range(1, 50))


@pytest.mark.parametrize("start,end,steps", [(1.0, 0.5, 64), (0.9, 0.1, 7), (1.0, 0.25, 2), (0.5, 0.5, 10)])
def test_linear(start, end, steps):
    s = Schedule(form=Linear(start, end, steps))
    assert s.fraction(1) == pytest.approx(start, abs=1e-15)
    for t in (steps, steps + 1, steps + 100, 10**6):
        assert s.fraction(t) == pytest.approx(end, abs=1e-15)
    vals = [s.fraction(t) for t in range(1, steps + 1)]
    assert all(a >= b for a, b in zip(vals, vals[1:])), vals
    for t in range(1, steps + 1):  # the straight line through (1, start) and (steps, end)
        assert s.fraction(t) == pytest.approx(start + (end - start) * (t - 1) / (steps - 1), abs=1e-12)


@pytest.mark.parametrize("start,end,steps", [(1.0, 0.5, 65), (0.9, 0.1, 7), (0.8, 0.2, 3)])
def test_cosine(start, end, steps):
    s = Schedule(form=Cosine(start, end, steps))
    assert s.fraction(1) == pytest.approx(start, abs=1e-15)
    for t in (steps, steps + 1, 10**6):
        assert s.fraction(t) == pytest.approx(end, abs=1e-15)
    vals = [s.fraction(t) for t in range(1, steps + 1)]
    assert all(a >= b for a, b in zip(vals, vals[1:])), vals
    assert s.fraction((steps + 1) // 2) == pytest.approx((start + end) / 2, abs=1e-12)  # midpoint (steps odd)
    for t in range(1, steps + 1):
        x = (t - 1) / (steps - 1)
        assert s.fraction(t) == pytest.approx(end + (start - end) * (1 + math.cos(math.pi * x)) / 2, abs=1e-12)
    # cosine decays slower than linear at first and faster later (both start and end equal)
    lin = Schedule(form=Linear(start, end, steps))
    assert s.fraction(2) >= lin.fraction(2) and s.fraction(steps - 1) <= lin.fraction(steps - 1)


def test_increasing_linear_is_allowed_and_monotone():
    s = Schedule(form=Linear(0.25, 1.0, 4))
    assert [s.fraction(t) for t in range(1, 6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_steps_picks_the_last_point_at_or_before_t():
    s = Schedule(form=Steps(((1, 1.0), (4, 0.5), (10, 0.25))))
    expected = {1: 1.0, 2: 1.0, 3: 1.0, 4: 0.5, 9: 0.5, 10: 0.25, 11: 0.25, 1000: 0.25}
    assert {t: s.fraction(t) for t in expected} == expected
    s0 = Schedule(form=Steps(((0, 0.8), (3, 0.4))))  # points may start before step 1
    assert [s0.fraction(t) for t in (1, 2, 3, 4)] == [0.8, 0.8, 0.4, 0.4]
    s_same = Schedule(form=Steps(((1, 1.0), (5, 0.7), (5, 0.3))))  # equal steps: the last one wins
    assert s_same.fraction(5) == 0.3 and s_same.fraction(4) == 1.0


@pytest.mark.parametrize("align,min_rank", [(1, 1), (1, 8), (4, 8), (8, 8), (8, 3), (16, 32)])
def test_ranks_bounds_alignment_and_rounding(rng, align, min_rank):
    s_base = Schedule(min_rank=min_rank, align=align)
    max_ranks = [int(x) for x in rng.integers(1, 300, size=40)] + [1, 2, 7, align, 5 * align]
    for f in [1.0, 0.9, 0.5, 0.33, 0.1, 0.01] + list(rng.uniform(0.001, 1.0, 10)):
        s = Schedule(form=Constant(float(f)), min_rank=min_rank, align=align)
        out = s.ranks(1, max_ranks)
        assert len(out) == len(max_ranks)
        for R, r in zip(max_ranks, out):
            lo = min(min_rank, R)
            assert lo <= r <= R, (f, R, r)
            clamped = r in (lo, R)
            if not clamped:
                assert r % align == 0, (f, R, r)
                assert abs(r - f * R) <= align / 2 + 1e-9, (f, R, r)  # the nearest multiple of align
            if f == 1.0 and R % align == 0:
                assert r == R
    assert s_base.ranks(0, [align * 5, align * 9]) == [align * 5, align * 9]


def test_ranks_at_fraction_one_are_the_stored_ranks_for_any_align():
    s = Schedule(align=8, min_rank=1)  # Constant(1.0), prefill 1.0
    assert s.ranks(0, [10, 11, 12, 13]) == [10, 11, 12, 13]


def test_ranks_decrease_along_a_decaying_schedule():
    s = Schedule(form=Linear(1.0, 0.25, 32), min_rank=4, align=4)
    R = [64, 128, 20]
    prev = s.ranks(0, R)
    assert prev == R
    for t in range(1, 40):
        cur = s.ranks(t, R)
        assert all(c <= p for c, p in zip(cur, prev)), (t, prev, cur)
        prev = cur
    assert prev == [16, 32, 4]  # 0.25 * R, aligned to 4 (5 -> 4)


def test_active_params_by_hand():
    # two low-rank projections [m, n] = [6, 10] and [12, 4]: per_rank 16 and 16; 100 dense params
    assert active_params([3, 2], [16, 16], 100) == 100 + 3 * 16 + 2 * 16 == 180
    assert active_params([], [], 42) == 42
    assert active_params([0, 5], [7, 11], 0) == 55
    s = Schedule(form=Steps(((1, 1.0), (3, 0.5))), min_rank=2)
    per_rank = [16 + 48, 64 + 64]
    assert active_params(s.ranks(1, [8, 20]), per_rank, 1000) == 1000 + 8 * 64 + 20 * 128
    assert active_params(s.ranks(3, [8, 20]), per_rank, 1000) == 1000 + 4 * 64 + 10 * 128


def test_describe():
    assert Schedule().describe() == "constant 1"
    assert Schedule(form=Steps(((1, 1.0), (8, 0.5)))).describe() == "steps t>=1:1, t>=8:0.5"
    assert Schedule(form=Cosine(1.0, 0.5, 64)).describe() == "cosine 1->0.5 over 64 steps"


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("make,match", [
    (lambda: Constant(0), r"schedule frac must be in \(0, 1\], got 0"),
    (lambda: Constant(1.5), r"schedule frac must be in \(0, 1\], got 1.5"),
    (lambda: Constant(-0.2), "schedule frac"),
    (lambda: Linear(start=0.0), "schedule start"),
    (lambda: Linear(end=1.5), "schedule end"),
    (lambda: Cosine(start=1.01), "schedule start"),
    (lambda: Linear(steps=0), "schedule steps must be >= 1, got 0"),
    (lambda: Cosine(steps=-3), "schedule steps must be >= 1, got -3"),
    (lambda: Steps(()), "at least one"),
    (lambda: Steps(((1, 1.0), (5, 0.5), (3, 0.7))), "sorted by step"),
    (lambda: Steps(((2, 1.0), (5, 0.5))), "start at step <= 1"),
    (lambda: Steps(((1, 1.0), (5, 0.0))), "schedule frac"),
    (lambda: Steps(((1, 1.5),)), "schedule frac"),
    (lambda: Schedule(prefill=0.0), "schedule prefill"),
    (lambda: Schedule(prefill=1.5), "schedule prefill"),
    (lambda: Schedule(min_rank=0), "schedule min_rank must be >= 1"),
    (lambda: Schedule(align=0), "schedule align must be >= 1"),
    (lambda: Schedule(form=Uniform(0.5)), "unknown schedule form Uniform"),
    (lambda: Constant("0.5"), "schedule frac"),
])
def test_bad_schedules(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_fraction_is_always_in_range(rng):
    for form in FORMS:
        s = Schedule(form=form)
        fr = np.array([s.fraction(int(t)) for t in rng.integers(0, 500, 50)])
        assert np.all((fr > 0) & (fr <= 1))


# ---- Progressive: a schedule solved for an average budget


def _accounting(seed: int = 0):
    """A random set of low-rank projections: stored ranks, parameters per rank, dense rest, total."""
    g = np.random.default_rng(seed)
    rank_max = [int(r) for r in g.integers(20, 200, size=12)]
    rank_cost = [int(c) for c in g.integers(300, 900, size=12)]
    dense = int(g.integers(50_000, 100_000))
    total = dense + sum(r * c for r, c in zip(rank_max, rank_cost)) + int(g.integers(50_000, 100_000))
    return rank_max, rank_cost, dense, total


@pytest.mark.parametrize("form", ["linear", "cosine"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_progressive_solve_meets_the_average(form, seed):
    rank_max, rank_cost, dense, total = _accounting(seed)
    stored = active_params(rank_max, rank_cost, dense) / total
    target = stored - 0.05  # the schedule must remove 5% more on average than the stored ranks
    p = Progressive(form=form, margin=0.4, decay_steps=16, tokens=40, min_rank=1)
    sched = p.solve(1 - target, rank_max, rank_cost, dense, total)
    got = pooled_fraction(sched, rank_max, rank_cost, dense, total, [40])
    # bisection on the end fraction errs high by at most one rank step of one projection per step
    assert target - 1e-12 <= got <= target + max(rank_cost) / total
    # the same average, recomputed by hand from the ranks of every step
    by_hand = np.mean([active_params(sched.ranks(t, rank_max), rank_cost, dense) / total for t in range(1, 41)])
    assert got == pytest.approx(by_hand, rel=1e-12)
    assert isinstance(sched.form, Cosine if form == "cosine" else Linear) and sched.form.start == 1.0
    assert 0 < sched.form.end < 1 and sched.ranks(1, rank_max) == rank_max


def test_progressive_pools_generations_of_different_lengths():
    rank_max, rank_cost, dense, total = _accounting(3)
    target = active_params(rank_max, rank_cost, dense) / total - 0.04
    p = Progressive(form="linear", decay_steps=8, min_rank=1)
    sched = p.solve(1 - target, rank_max, rank_cost, dense, total, step_counts=[5, 30, 12])
    got = pooled_fraction(sched, rank_max, rank_cost, dense, total, [5, 30, 12])
    assert target - 1e-12 <= got <= target + max(rank_cost) / total
    assert p.stored_ratio(0.1) == pytest.approx(0.06)


def test_progressive_errors():
    with pytest.raises(ConfigError, match="'linear' or 'cosine'"):
        Progressive(form="steps")
    with pytest.raises(ConfigError, match="margin must be in"):
        Progressive(margin=1.0)
    with pytest.raises(ConfigError, match=">= 1"):
        Progressive(tokens=0)
    rank_max, rank_cost, dense, total = _accounting(4)
    # a budget the decay cannot reach in 4 decode steps of a 64-step decay
    with pytest.raises(ConfigError, match="cannot average"):
        Progressive(decay_steps=64, tokens=4, min_rank=1).solve(0.9, rank_max, rank_cost, dense, total)
