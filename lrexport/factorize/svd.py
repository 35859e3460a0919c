"""Plain truncated SVD of the weight."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lrexport.config import register_config
from lrexport.factorize.registry import FACTORIZERS, Decomposition, balanced_split, output_sensitivity


@register_config
@dataclass(frozen=True)
class PlainSvd:
    """``W = U Σ Vᵀ``, truncated: best in the Frobenius norm of the weight."""


@FACTORIZERS.register(PlainSvd)
def _plain_svd(W, cfg, stats, fqn) -> Decomposition:
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    A, B = balanced_split(U, s, Vh)
    return Decomposition(A, B, s**2, loss_weight=output_sensitivity(stats, fqn))
