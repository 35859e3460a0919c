"""ASVD: SVD of the weight with its input channels scaled by activation magnitude."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lrexport.config import register_config
from lrexport.errors import ConfigError
from lrexport.factorize.registry import FACTORIZERS, Decomposition, balanced_split, output_sensitivity


@register_config
@dataclass(frozen=True)
class Asvd:
    """``W S = U Σ Vᵀ`` with ``S = diag(mean|x|^alpha)``; factors ``U Σ`` and ``Vᵀ S⁻¹``."""

    alpha: float = 0.5

    def __post_init__(self):
        if not 0 < self.alpha <= 2:
            raise ConfigError(f"Asvd.alpha must be in (0, 2], got {self.alpha}")


@FACTORIZERS.register(Asvd)
def _asvd(W, cfg: Asvd, stats, fqn) -> Decomposition:
    if stats is None:
        raise ConfigError("Asvd needs calibration statistics (mean |x| per input channel)")
    a = stats.abs_mean_of(fqn).to(torch.float64)
    scale = a.clamp_min(a.mean() * 1e-6 + 1e-12).pow(cfg.alpha)
    U, s, Vh = torch.linalg.svd(W * scale[None, :], full_matrices=False)
    A, B = balanced_split(U, s, Vh / scale[None, :])
    return Decomposition(A, B, s**2, loss_weight=output_sensitivity(stats, fqn))
