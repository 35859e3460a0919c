"""Progressive low-rank decoding: schedules that lower the active rank as generation proceeds.

A schedule form ``f(t)`` maps the decode step ``t`` (1 for the first token generated
after the prompt) to a rank fraction in (0, 1]. Each low-rank projection ``p`` with
stored rank ``R_p`` then runs at ``r_p(t) = max(r_min, align(f(t) · R_p))``. The prompt
(prefill) runs at ``prefill`` (1.0 by default). Dense projections stay dense.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lrexport.config import Registry, register_config
from lrexport.errors import ConfigError

FORMS = Registry("schedule form")


def _check_frac(name: str, v: float) -> None:
    if not (isinstance(v, (int, float)) and 0 < v <= 1):
        raise ConfigError(f"schedule {name} must be in (0, 1], got {v!r}")


@register_config
@dataclass(frozen=True)
class Constant:
    frac: float = 1.0

    def __post_init__(self):
        _check_frac("frac", self.frac)


@register_config
@dataclass(frozen=True)
class Steps:
    """``points`` = ((from_step, frac), ...): the frac of the last point whose step <= t."""

    points: tuple[tuple[int, float], ...] = ((1, 1.0),)

    def __post_init__(self):
        if not self.points:
            raise ConfigError("Steps needs at least one (step, frac) point")
        steps = [int(s) for s, _ in self.points]
        if steps != sorted(steps) or steps[0] > 1:
            raise ConfigError(f"Steps points must be sorted by step and start at step <= 1, got {self.points}")
        for _, f in self.points:
            _check_frac("frac", f)


@register_config
@dataclass(frozen=True)
class Linear:
    """From ``start`` at step 1 to ``end`` at step ``steps``, then ``end``."""

    start: float = 1.0
    end: float = 0.5
    steps: int = 64

    def __post_init__(self):
        _check_frac("start", self.start)
        _check_frac("end", self.end)
        if self.steps < 1:
            raise ConfigError(f"schedule steps must be >= 1, got {self.steps}")


@register_config
@dataclass(frozen=True)
class Cosine(Linear):
    """Cosine decay from ``start`` to ``end`` over ``steps``, then ``end``."""


@FORMS.register(Constant)
def _constant(form: Constant, t: int) -> float:
    return form.frac


@FORMS.register(Steps)
def _steps(form: Steps, t: int) -> float:
    frac = form.points[0][1]
    for s, f in form.points:
        if t >= s:
            frac = f
    return frac


def _progress(t: int, steps: int) -> float:
    """0 at step 1, 1 at step ``steps`` and after (1 right away when steps == 1)."""
    return 1.0 if steps <= 1 else min(max(t - 1, 0) / (steps - 1), 1.0)


@FORMS.register(Linear)
def _linear(form: Linear, t: int) -> float:
    x = _progress(t, form.steps)
    return form.start + (form.end - form.start) * x


@FORMS.register(Cosine)
def _cosine(form: Cosine, t: int) -> float:
    x = _progress(t, form.steps)
    return form.end + (form.start - form.end) * 0.5 * (1 + math.cos(math.pi * x))


@register_config
@dataclass(frozen=True)
class Schedule:
    form: Constant | Steps | Linear | Cosine = Constant()
    min_rank: int = 8
    align: int = 1
    prefill: float = 1.0

    def __post_init__(self):
        FORMS(self.form)  # unknown forms fail here
        _check_frac("prefill", self.prefill)
        if self.min_rank < 1:
            raise ConfigError(f"schedule min_rank must be >= 1, got {self.min_rank}")
        if self.align < 1:
            raise ConfigError(f"schedule align must be >= 1, got {self.align}")

    def fraction(self, step: int) -> float:
        """Rank fraction at decode step ``step`` (>= 1); ``step = 0`` is the prefill."""
        return self.prefill if step <= 0 else FORMS(self.form)(self.form, step)

    def ranks(self, step: int, max_ranks: list[int]) -> list[int]:
        f = self.fraction(step)
        if f >= 1.0:
            return list(max_ranks)
        out = []
        for R in max_ranks:
            r = round(f * R / self.align) * self.align
            out.append(min(R, max(min(self.min_rank, R), r)))
        return out

    def describe(self) -> str:
        f = self.form
        if isinstance(f, Constant):
            return f"constant {f.frac:g}"
        if isinstance(f, Steps):
            return "steps " + ", ".join(f"t>={s}:{v:g}" for s, v in f.points)
        return f"{type(f).__name__.lower()} {f.start:g}->{f.end:g} over {f.steps} steps"


def active_params(ranks: list[int], per_rank: list[int], dense_params: int) -> int:
    """Parameters touched per token: low-rank pairs at ``ranks`` plus the dense rest."""
    return dense_params + sum(r * c for r, c in zip(ranks, per_rank))


def pooled_fraction(schedule, rank_max: list[int], rank_cost: list[int], dense_params: int, total_params: int,
                    step_counts: Sequence[int]) -> float:
    """Activated fraction of the projection parameters averaged over every decode step of
    generations with ``step_counts`` decode steps each (what the generation loop reports)."""
    steps = [t for c in step_counts for t in range(1, c + 1)]
    if not steps:
        raise ConfigError("pooled_fraction needs at least one decode step")
    vals = {t: active_params(schedule.ranks(t, rank_max), rank_cost, dense_params) / total_params for t in set(steps)}
    return sum(vals[t] for t in steps) / len(steps)


def solve_end(make: Callable[[float], Any], target: float, rank_max: list[int], rank_cost: list[int],
              dense_params: int, total_params: int, step_counts: Sequence[int], *, lowest: float = 0.05):
    """The schedule ``make(end)`` whose pooled activated fraction (:func:`pooled_fraction`) is
    ``target``: bisection on the end fraction in ``[lowest, 1]`` (the returned end errs high, so
    the average is at most a hair above ``target``). Raises when even ``lowest`` stays above it."""
    def pooled(end: float) -> float:
        return pooled_fraction(make(end), rank_max, rank_cost, dense_params, total_params, step_counts)

    if pooled(lowest) > target + 1e-9:
        raise ConfigError(f"the schedule cannot average {target:.4f} of the parameters over "
                          f"{sum(step_counts) / len(step_counts):g} decode steps: even decaying to {lowest:g} leaves "
                          f"{pooled(lowest):.4f}; store fewer parameters (a smaller margin) or decay faster")
    lo, hi = lowest, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if pooled(mid) < target else (lo, mid)
    return make(hi)


@register_config
@dataclass(frozen=True)
class Progressive:
    """Progressive decoding at an average budget.

    Compressing to ``ratio`` with this stores ranks for ``ratio * (1 - margin)`` (more
    parameters than the budget) and decays them with a ``form`` ("linear" or "cosine") over
    ``decay_steps`` decode steps (default: two thirds of ``tokens``) to an end fraction solved
    so that the activated parameters, averaged over a generation of ``tokens`` decode steps,
    equal ``1 - ratio`` of the dense projections. ``margin = 0.4`` was the best of 0.25-0.45 on
    SmolLM2's XSum summaries, with a cosine over 32 steps (``bench/results/schedule_sweep.md``).
    """

    form: str = "cosine"
    margin: float = 0.4
    tokens: int = 48
    decay_steps: int | None = None
    min_rank: int = 8

    def __post_init__(self):
        if self.form not in ("linear", "cosine"):
            raise ConfigError(f"progressive form must be 'linear' or 'cosine', got {self.form!r}")
        if not 0 <= self.margin < 1:
            raise ConfigError(f"progressive margin must be in [0, 1), got {self.margin!r}")
        if (self.decay_steps is not None and self.decay_steps < 1) or self.tokens < 1 or self.min_rank < 1:
            raise ConfigError(f"progressive decay_steps, tokens and min_rank must be >= 1, got {self.decay_steps}, "
                              f"{self.tokens}, {self.min_rank}")

    @property
    def steps(self) -> int:
        """Decode steps of the decay."""
        return self.decay_steps if self.decay_steps is not None else max(1, round(self.tokens * 2 / 3))

    def stored_ratio(self, ratio: float) -> float:
        return ratio * (1 - self.margin)

    def schedule(self, end: float, align: int = 1) -> Schedule:
        form = (Linear if self.form == "linear" else Cosine)(start=1.0, end=end, steps=self.steps)
        return Schedule(form=form, min_rank=self.min_rank, align=align)

    def solve(self, ratio: float, rank_max: list[int], rank_cost: list[int], dense_params: int, total_params: int,
              *, align: int = 1, step_counts: Sequence[int] | None = None) -> Schedule:
        """The schedule whose average over ``step_counts`` (default: one generation of ``tokens``
        decode steps) activates ``1 - ratio`` of the dense projection parameters."""
        return solve_end(lambda end: self.schedule(end, align), 1.0 - ratio, rank_max, rank_cost, dense_params,
                         total_params, step_counts or [self.tokens])
