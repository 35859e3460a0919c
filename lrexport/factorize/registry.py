"""Factorization registry: ``factorize(W, cfg, stats, fqn)`` dispatches on the config type.

Every method returns a :class:`Decomposition` whose components are ordered so that the
first ``r`` of them are the best rank-``r`` approximation in that method's norm. That
one property is what rank allocation, progressive decoding and any run-time rank switch
rely on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lrexport.calib.stats import CalibStats
from lrexport.config import Registry

FACTORIZERS = Registry("factorization method")


@dataclass
class Factors:
    """``W ≈ U @ V`` with ``U [m, r]`` and ``V [r, n]``; any prefix of r is best at its rank."""

    U: torch.Tensor
    V: torch.Tensor

    @property
    def rank(self) -> int:
        return self.V.shape[0]

    def truncate(self, r: int) -> Factors:
        return Factors(self.U[:, :r].contiguous(), self.V[:r].contiguous())


@dataclass
class Decomposition:
    """All ``K = min(m, n)`` components of ``W ≈ U @ V``.

    ``sigma2[i]`` is the squared singular value of component ``i`` in the method's
    norm, and ``loss_weight * sigma2[i]`` estimates the loss increase from dropping it
    (see :mod:`lrexport.allocate`).
    """

    U: torch.Tensor  # [m, K] float64
    V: torch.Tensor  # [K, n] float64
    sigma2: torch.Tensor  # [K] float64, non-increasing
    loss_weight: float = 1.0

    @property
    def shape(self) -> tuple[int, int]:
        return self.U.shape[0], self.V.shape[1]

    def factors(self, rank: int) -> Factors:
        return Factors(self.U[:, :rank].contiguous(), self.V[:rank].contiguous())

    def reconstruct(self, rank: int) -> torch.Tensor:
        return self.U[:, :rank] @ self.V[:rank]


def factorize(W: torch.Tensor, cfg, stats: CalibStats | None = None, fqn: str = "") -> Decomposition:
    """Decompose ``W [m, n]`` with the method ``cfg`` (using calibration ``stats``)."""
    return FACTORIZERS(cfg)(W.detach().to(torch.float64), cfg, stats, fqn)


def balanced_split(U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``U diag(s) Vh`` as ``(U sqrt(s), sqrt(s) Vh)``: both factors on the same scale."""
    r = s.clamp_min(0).sqrt()
    return U * r[None, :], r[:, None] * Vh


def output_sensitivity(stats: CalibStats | None, fqn: str) -> float:
    """Mean squared output gradient per token and channel (1.0 without Fisher data)."""
    if stats is None or fqn not in stats.fisher_out or stats.fisher_norm == 0:
        return 1.0
    return float(stats.fisher_out[fqn].mean()) / stats.fisher_norm
