"""Progressive low-rank decoding: schedules that lower the active rank as generation proceeds.

A schedule form ``f(t)`` maps the decode step ``t`` (1 for the first token generated
after the prompt) to a rank fraction in (0, 1]. Each low-rank projection ``p`` with
stored rank ``R_p`` then runs at ``r_p(t) = max(r_min, align(f(t) · R_p))``. The prompt
(prefill) runs at ``prefill`` (1.0 by default). Dense projections stay dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
