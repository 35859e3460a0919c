"""Whitened SVD (SVD-LLM) and its Fisher-weighted variant.

With ``G = XᵀX + λI = S Sᵀ`` (Cholesky), the SVD ``D W S = U Σ Zᵀ`` gives
``W ≈ D⁻¹ U_r Σ_r Z_rᵀ S⁻¹``. For ``D = I`` and ``λ = 0`` the output error is exact:
``||(W - W_r) X||²_F = Σ_{i>r} σ_i²`` (truncation-aware whitening). ``D = diag(√f)``
weights each output row by its Fisher sensitivity ``f``, so that ``σ_i²`` estimates the
loss increase (in units of the summed next-token NLL, up to a factor 2) of dropping
component ``i``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lrexport.config import register_config
from lrexport.errors import ConfigError
from lrexport.factorize.registry import FACTORIZERS, Decomposition, balanced_split, output_sensitivity


@register_config
@dataclass(frozen=True)
class WhitenSvd:
    """SVD-LLM's truncation-aware whitening. ``ridge`` is λ relative to mean(diag G)."""

    ridge: float = 1e-6

    def __post_init__(self):
        if not 0 <= self.ridge < 1:
            raise ConfigError(f"ridge must be in [0, 1), got {self.ridge}")


@register_config
@dataclass(frozen=True)
class FisherWhitenSvd:
    """Whitened SVD with output rows weighted by ``(fisher + floor·mean)^power``, power 1/2 exact."""

    ridge: float = 1e-6
    power: float = 0.5
    floor: float = 1e-2
    full: bool = False  # weight by the full output Fisher matrix where calibration kept one (k/v)

    def __post_init__(self):
        if not 0 <= self.ridge < 1:
            raise ConfigError(f"ridge must be in [0, 1), got {self.ridge}")
        if not 0 <= self.power <= 1:
            raise ConfigError(f"power must be in [0, 1], got {self.power}")
        if not self.floor >= 0:
            raise ConfigError(f"floor must be >= 0, got {self.floor}")


def whitening(G: torch.Tensor, ridge: float) -> torch.Tensor:
    """Lower-triangular ``S`` with ``S Sᵀ = G + λI``; λ grows until Cholesky succeeds."""
    n = G.shape[0]
    eye = torch.eye(n, dtype=torch.float64)
    base = float(G.diagonal().mean()) or 1.0
    lam = ridge * base
    for _ in range(12):
        S, info = torch.linalg.cholesky_ex(G + lam * eye)
        if int(info) == 0:
            return S
        lam = max(lam * 10, 1e-10 * base)
    raise ConfigError("Gram matrix is not positive definite even with a large ridge")


def _whitened(W: torch.Tensor, G: torch.Tensor, ridge: float, row_w: torch.Tensor | None,
              left: tuple[torch.Tensor, torch.Tensor] | None = None):
    """SVD of ``L W S``; ``L`` is ``diag(row_w)`` or, with ``left = (L, L⁻¹)``, a full matrix."""
    S = whitening(G.to(torch.float64), ridge)
    M = W @ S
    if row_w is not None:
        M = row_w[:, None] * M
    if left is not None:
        M = left[0] @ M
    U, s, Zh = torch.linalg.svd(M, full_matrices=False)
    # V = Zᵀ S⁻¹  <=>  V S = Zᵀ  <=>  Sᵀ Vᵀ = Z
    V = torch.linalg.solve_triangular(S.T, Zh.T, upper=True).T
    if row_w is not None:
        U = U / row_w[:, None]
    if left is not None:
        U = left[1] @ U
    A, B = balanced_split(U, s, V)
    return A, B, s**2


def _sqrt_pair(F: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F^½, F^-½)`` of a PSD matrix, its spectrum floored at ``floor · mean eigenvalue``."""
    lam, Q = torch.linalg.eigh(F)
    lam = lam.clamp_min(0)
    lam = (lam + floor * lam.mean()).clamp_min(float(lam.max()) * 1e-12)
    r = lam.sqrt()
    return (Q * r) @ Q.T, (Q / r) @ Q.T


@FACTORIZERS.register(WhitenSvd)
def _whiten_svd(W, cfg: WhitenSvd, stats, fqn) -> Decomposition:
    if stats is None:
        raise ConfigError("WhitenSvd needs calibration statistics (input Gram matrices)")
    A, B, s2 = _whitened(W, stats.gram_of(fqn), cfg.ridge, None)
    return Decomposition(A, B, s2, loss_weight=output_sensitivity(stats, fqn))


@FACTORIZERS.register(FisherWhitenSvd)
def _fisher_whiten_svd(W, cfg: FisherWhitenSvd, stats, fqn) -> Decomposition:
    if stats is None or not stats.has_fisher:
        raise ConfigError("FisherWhitenSvd needs calibration statistics with Fisher information")
    if cfg.full and fqn in stats.fisher_full and cfg.power == 0.5:
        F = stats.fisher_full[fqn].to(torch.float64) / max(stats.fisher_norm, 1)
        A, B, s2 = _whitened(W, stats.gram_of(fqn), cfg.ridge, None, left=_sqrt_pair(F, cfg.floor))
        return Decomposition(A, B, s2, loss_weight=1.0)
    f = stats.fisher_out[fqn].to(torch.float64) / max(stats.fisher_norm, 1)
    if not bool(f.gt(0).any()):
        raise ConfigError(f"{fqn}: its Fisher information is all zero; use WhitenSvd for it")
    f = f + cfg.floor * f.mean()
    f = f.clamp_min(float(f.max()) * 1e-12)  # rows without any gradient keep a tiny weight, not 0
    row_w = f.pow(cfg.power)
    A, B, s2 = _whitened(W, stats.gram_of(fqn), cfg.ridge, row_w)
    # with power 1/2, s2 is already in loss units; otherwise rescale by the mean sensitivity
    lw = 1.0 if cfg.power == 0.5 else output_sensitivity(stats, fqn) / float(row_w.pow(2).mean())
    return Decomposition(A, B, s2, loss_weight=lw)
