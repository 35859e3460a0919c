"""Tests of lrexport.factorize: PlainSvd, Asvd, WhitenSvd, FisherWhitenSvd.

Conventions: ``W [m, n]`` is a weight, ``X [T, n]`` holds T calibration inputs as rows (so the
layer output is ``X Wᵀ``), ``G = XᵀX``. The output error of an approximation ``W_r`` is
``||(W - W_r) Xᵀ||_F²``. Every reference below is computed in float64 with numpy, never by
calling lrexport again.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lrexport.calib.stats import CalibStats, input_key
from lrexport.errors import ConfigError, LrexportError
from lrexport.factorize import Asvd, Decomposition, FisherWhitenSvd, PlainSvd, WhitenSvd, factorize
from lrexport.factorize.registry import output_sensitivity

FQN = "model.layers.0.mlp.down_proj"  # its own input key
FQN_SHARED = "model.layers.1.self_attn.k_proj"  # input key ...self_attn.qkv

SHAPES = [(6, 9), (10, 7), (8, 8)]
ALL_METHODS = [PlainSvd(), Asvd(alpha=0.5), WhitenSvd(ridge=0.0), WhitenSvd(), FisherWhitenSvd(ridge=0.0),
               FisherWhitenSvd(power=0.25, floor=0.1)]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float64)


def make_problem(rng, m, n, T=40, fqn=FQN, fisher_spread=3.0):
    """Random W, inputs X with correlated, unevenly scaled channels, and CalibStats for fqn."""
    W = rng.standard_normal((m, n))
    mix = rng.standard_normal((n, n)) * 0.5 + np.diag(rng.uniform(0.2, 3.0, n))
    X = rng.standard_normal((T, n)) @ mix
    fisher_out = np.exp(fisher_spread * rng.standard_normal(m)) * T  # summed over T tokens
    key = input_key(fqn)
    stats = CalibStats(
        gram={key: torch.from_numpy(X.T @ X)},
        abs_mean={key: torch.from_numpy(np.abs(X).mean(0))},
        fisher_out={fqn: torch.from_numpy(fisher_out)},
        fisher_w={fqn: 1.0},
        tokens=T,
        windows=1,
    )
    return W, X, fisher_out, stats


def out_err(W, Wr, X, row_weight=None):
    """||diag(row_weight)^{1/2} (W - Wr) Xᵀ||_F² in float64 numpy."""
    E = (W - Wr) @ X.T
    if row_weight is not None:
        E = np.sqrt(row_weight)[:, None] * E
    return float((E**2).sum())


def eckart_young_tail(M: np.ndarray, K: int | None = None) -> np.ndarray:
    """tail[r] (r = 0..K) = min over rank-r A of ||M - A||_F² = sum of the squared singular
    values of M past r (Eckart-Young); K defaults to min(M.shape)."""
    s2 = np.linalg.svd(M, compute_uv=False) ** 2
    K = len(s2) if K is None else K
    s2 = np.concatenate([s2, np.zeros(max(0, K - len(s2)))])
    return np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])[: K + 1]


def fisher_row_weights(fisher_out, T, cfg: FisherWhitenSvd) -> np.ndarray:
    """The per-output-row weights D of FisherWhitenSvd's norm, derived from its docstring:
    rows are scaled by ``(f + floor·mean f)^power`` with ``f = fisher_out / tokens``, so the
    squared error of row i is weighted by ``(f_i + floor·mean f)^(2·power)``."""
    f = fisher_out / T
    return (f + cfg.floor * f.mean()) ** (2 * cfg.power)


# ------------------------------------------------------------------ exact reconstruction & shapes


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cfg", ALL_METHODS, ids=lambda c: repr(c))
def test_full_rank_reconstructs_weight(rng, cfg, shape):
    m, n = shape
    W, X, _, stats = make_problem(rng, m, n)
    d = factorize(torch.from_numpy(W), cfg, stats, FQN)
    K = min(m, n)
    assert isinstance(d, Decomposition)
    assert d.U.shape == (m, K) and d.V.shape == (K, n) and d.sigma2.shape == (K,)
    assert d.U.dtype == d.V.dtype == d.sigma2.dtype == torch.float64
    assert d.shape == (m, n)
    rel = np.linalg.norm(_np(d.U) @ _np(d.V) - W) / np.linalg.norm(W)
    assert rel < 1e-8, f"{cfg}: full-rank U@V differs from W by {rel:.2e} (relative)"


@pytest.mark.parametrize("cfg", ALL_METHODS, ids=lambda c: repr(c))
def test_float32_weight_is_factorized_in_float64(rng, cfg):
    W, X, _, stats = make_problem(rng, 7, 5)
    W32 = torch.from_numpy(W).float()
    d = factorize(W32, cfg, stats, FQN)
    assert d.U.dtype == torch.float64
    rel = np.linalg.norm(_np(d.U) @ _np(d.V) - _np(W32)) / np.linalg.norm(W)
    assert rel < 1e-8


@pytest.mark.parametrize("cfg", ALL_METHODS, ids=lambda c: repr(c))
def test_sigma2_non_increasing_and_non_negative(rng, cfg):
    for m, n in SHAPES:
        W, X, _, stats = make_problem(rng, m, n)
        s2 = _np(factorize(torch.from_numpy(W), cfg, stats, FQN).sigma2)
        assert np.all(s2 >= 0), s2
        assert np.all(np.diff(s2) <= 1e-12 * s2[0]), f"{cfg}: sigma2 not non-increasing: {s2}"


def test_factors_and_truncate_are_prefixes(rng):
    W, X, _, stats = make_problem(rng, 9, 6)
    d = factorize(torch.from_numpy(W), WhitenSvd(), stats, FQN)
    f = d.factors(4)
    assert f.rank == 4 and f.U.shape == (9, 4) and f.V.shape == (4, 6)
    assert torch.equal(f.U, d.U[:, :4]) and torch.equal(f.V, d.V[:4])
    assert f.U.is_contiguous() and f.V.is_contiguous()
    t = f.truncate(2)
    assert torch.equal(t.U, d.U[:, :2]) and torch.equal(t.V, d.V[:2])
    np.testing.assert_allclose(_np(d.reconstruct(4)), _np(d.U[:, :4]) @ _np(d.V[:4]), rtol=0, atol=1e-12)


def test_factors_are_balanced(rng):
    """balanced_split: for PlainSvd the column norms of U equal the row norms of V (both sqrt(σ))."""
    W, _, _, _ = make_problem(rng, 8, 5)
    d = factorize(torch.from_numpy(W), PlainSvd())
    s = np.linalg.svd(W, compute_uv=False)
    np.testing.assert_allclose(np.linalg.norm(_np(d.U), axis=0), np.sqrt(s), rtol=1e-10)
    np.testing.assert_allclose(np.linalg.norm(_np(d.V), axis=1), np.sqrt(s), rtol=1e-10)


# ------------------------------------------------------------------ PlainSvd


@pytest.mark.parametrize("shape", SHAPES)
def test_plain_svd_prefix_is_eckart_young_optimal(rng, shape):
    m, n = shape
    W = rng.standard_normal((m, n)) * rng.uniform(0.1, 3.0, n)[None, :]
    d = factorize(torch.from_numpy(W), PlainSvd())
    opt = eckart_young_tail(W)  # independent optimum from numpy's SVD
    total = opt[0]
    np.testing.assert_allclose(_np(d.sigma2), np.linalg.svd(W, compute_uv=False) ** 2, rtol=1e-10)
    for r in range(min(m, n) + 1):
        err = float(((W - _np(d.reconstruct(r))) ** 2).sum())
        assert abs(err - opt[r]) <= 1e-9 * total, f"rank {r}: ||W - W_r||² = {err}, optimum {opt[r]}"


def test_plain_svd_loss_weight_is_mean_output_fisher_per_token(rng):
    W, X, fisher_out, stats = make_problem(rng, 6, 9, T=40)
    d = factorize(torch.from_numpy(W), PlainSvd(), stats, FQN)
    assert d.loss_weight == pytest.approx(fisher_out.mean() / 40, rel=1e-12)
    assert factorize(torch.from_numpy(W), PlainSvd()).loss_weight == 1.0  # no stats
    assert output_sensitivity(CalibStats(fisher_out={FQN: torch.ones(6)}, tokens=0), FQN) == 1.0


# ------------------------------------------------------------------ WhitenSvd


@pytest.mark.parametrize("shape", SHAPES)
def test_whiten_svd_prefix_is_optimal_in_output_norm(rng, shape):
    m, n = shape
    W, X, _, stats = make_problem(rng, m, n, T=30)
    d = factorize(torch.from_numpy(W), WhitenSvd(ridge=0.0), stats, FQN)
    S = np.linalg.cholesky(X.T @ X)  # numpy's Cholesky, S Sᵀ = XᵀX
    opt_chol = eckart_young_tail(W @ S)
    opt_direct = eckart_young_tail(W @ X.T, min(m, n))  # a second, Cholesky-free reference
    tail = np.concatenate([np.cumsum(_np(d.sigma2)[::-1])[::-1], [0.0]])
    total = opt_direct[0]
    np.testing.assert_allclose(opt_chol, opt_direct, rtol=0, atol=1e-10 * total)
    for r in range(min(m, n) + 1):
        err = out_err(W, _np(d.reconstruct(r)), X)
        assert abs(err - opt_direct[r]) <= 1e-8 * total, f"rank {r}: error {err} vs optimum {opt_direct[r]}"
        assert abs(err - tail[r]) <= 1e-8 * total, f"rank {r}: error {err} vs sum(sigma2[r:]) {tail[r]}"


@pytest.mark.parametrize("m,n,T", [(6, 9, 12), (10, 7, 8), (5, 5, 50), (12, 4, 5)])
def test_whitening_identity_with_ridge_zero(rng, m, n, T):
    """ridge=0, full-rank G = XᵀX: ||(W - W_r) Xᵀ||² equals the sum of the dropped sigma2."""
    W, X, _, stats = make_problem(rng, m, n, T=T)
    assert np.linalg.matrix_rank(X.T @ X) == n
    d = factorize(torch.from_numpy(W), WhitenSvd(ridge=0.0), stats, FQN)
    s2 = _np(d.sigma2)
    total = out_err(W, np.zeros_like(W), X)
    assert s2.sum() == pytest.approx(total, rel=1e-8)
    for r in range(len(s2) + 1):
        err = out_err(W, _np(d.reconstruct(r)), X)
        assert err == pytest.approx(s2[r:].sum(), rel=1e-8, abs=1e-8 * total), f"rank {r}"


def test_whiten_svd_uses_the_shared_input_key(rng):
    """k_proj reads the Gram matrix stored under '...self_attn.qkv'."""
    W, X, _, stats = make_problem(rng, 4, 8, fqn=FQN_SHARED)
    assert set(stats.gram) == {"model.layers.1.self_attn.qkv"}
    d = factorize(torch.from_numpy(W), WhitenSvd(ridge=0.0), stats, FQN_SHARED)
    assert out_err(W, _np(d.reconstruct(2)), X) == pytest.approx(eckart_young_tail(W @ X.T, 4)[2], rel=1e-8)


@pytest.mark.parametrize("ridge", [1e-3, 0.05, 0.5])
def test_whiten_svd_ridge_is_relative_to_mean_diagonal(rng, ridge):
    """With ridge λ_rel, the method is optimal in ||(W - W_r) S||_F, S Sᵀ = G + λ_rel·mean(diag G)·I."""
    W, X, _, stats = make_problem(rng, 7, 6, T=20)
    G = X.T @ X
    lam = ridge * np.mean(np.diag(G))
    S = np.linalg.cholesky(G + lam * np.eye(6))
    opt = eckart_young_tail(W @ S)
    d = factorize(torch.from_numpy(W), WhitenSvd(ridge=ridge), stats, FQN)
    np.testing.assert_allclose(_np(d.sigma2), np.linalg.svd(W @ S, compute_uv=False) ** 2, rtol=1e-9)
    for r in range(7):
        err = float((((W - _np(d.reconstruct(r))) @ S) ** 2).sum())
        assert abs(err - opt[r]) <= 1e-9 * opt[0], f"rank {r}"


def test_whiten_svd_rank_deficient_gram_still_works(rng):
    """Fewer tokens than input channels: G is singular; the ridge retry keeps it finite and
    the prefixes are still optimal on the calibration inputs (to within the tiny ridge)."""
    W = rng.standard_normal((6, 9))
    X = rng.standard_normal((4, 9))
    stats = CalibStats(gram={FQN: torch.from_numpy(X.T @ X)}, tokens=4)
    d = factorize(torch.from_numpy(W), WhitenSvd(ridge=0.0), stats, FQN)
    assert torch.isfinite(d.U).all() and torch.isfinite(d.V).all()
    opt = eckart_young_tail(W @ X.T, 6)  # rank(W Xᵀ) <= 4: ranks 4..6 are exact
    for r in range(7):
        err = out_err(W, _np(d.reconstruct(r)), X)
        assert abs(err - opt[r]) <= 1e-7 * opt[0], f"rank {r}"


# ------------------------------------------------------------------ FisherWhitenSvd


@pytest.mark.parametrize("power,floor", [(0.5, 0.0), (0.5, 1e-2), (0.5, 0.3), (0.25, 1e-2), (1.0, 0.1), (0.0, 0.0)])
def test_fisher_whiten_weighted_error_equals_dropped_sigma2(rng, power, floor):
    m, n, T = 8, 6, 25
    W, X, fisher_out, stats = make_problem(rng, m, n, T=T)
    cfg = FisherWhitenSvd(ridge=0.0, power=power, floor=floor)
    D = fisher_row_weights(fisher_out, T, cfg)
    d = factorize(torch.from_numpy(W), cfg, stats, FQN)
    s2 = _np(d.sigma2)
    opt = eckart_young_tail(np.sqrt(D)[:, None] * (W @ X.T), min(m, n))  # independent optimum in the weighted norm
    total = opt[0]
    for r in range(min(m, n) + 1):
        err = out_err(W, _np(d.reconstruct(r)), X, D)
        assert abs(err - s2[r:].sum()) <= 1e-8 * total, f"rank {r}: weighted error {err} vs {s2[r:].sum()}"
        assert abs(err - opt[r]) <= 1e-8 * total, f"rank {r}: weighted error {err} vs optimum {opt[r]}"


def test_fisher_whiten_beats_plain_whitening_in_the_weighted_norm(rng):
    m, n, T = 10, 8, 40
    W, X, fisher_out, stats = make_problem(rng, m, n, T=T, fisher_spread=3.0)
    cfg = FisherWhitenSvd(ridge=0.0)
    D = fisher_row_weights(fisher_out, T, cfg)
    fw = factorize(torch.from_numpy(W), cfg, stats, FQN)
    wh = factorize(torch.from_numpy(W), WhitenSvd(ridge=0.0), stats, FQN)
    total = out_err(W, np.zeros_like(W), X, D)
    gaps = []
    for r in range(min(m, n) + 1):
        e_f = out_err(W, _np(fw.reconstruct(r)), X, D)
        e_w = out_err(W, _np(wh.reconstruct(r)), X, D)
        assert e_f <= e_w + 1e-9 * total, f"rank {r}: Fisher-whitened {e_f} > whitened {e_w}"
        gaps.append(e_w - e_f)
    # with Fisher weights spread over e^±6, the weighting must actually matter somewhere
    assert max(gaps) > 1e-3 * total


def test_fisher_whiten_loss_weight(rng):
    T = 40
    W, X, fisher_out, stats = make_problem(rng, 6, 9, T=T)
    assert factorize(torch.from_numpy(W), FisherWhitenSvd(), stats, FQN).loss_weight == 1.0
    cfg = FisherWhitenSvd(power=0.25, floor=0.1)
    d = factorize(torch.from_numpy(W), cfg, stats, FQN)
    D = fisher_row_weights(fisher_out, T, cfg)
    # power != 1/2: sigma2 is rescaled to loss units by mean sensitivity / mean row weight
    assert d.loss_weight == pytest.approx((fisher_out.mean() / T) / D.mean(), rel=1e-10)


def test_fisher_whiten_with_uniform_fisher_equals_whiten(rng):
    """Constant Fisher: the row weighting is a constant, so the prefixes equal WhitenSvd's."""
    W, X, _, stats = make_problem(rng, 7, 5, T=20)
    stats.fisher_out[FQN] = torch.full((7,), 3.0 * 20, dtype=torch.float64)
    fw = factorize(torch.from_numpy(W), FisherWhitenSvd(ridge=0.0, floor=0.0), stats, FQN)
    wh = factorize(torch.from_numpy(W), WhitenSvd(ridge=0.0), stats, FQN)
    np.testing.assert_allclose(_np(fw.sigma2), 3.0 * _np(wh.sigma2), rtol=1e-9)
    for r in range(6):
        np.testing.assert_allclose(_np(fw.reconstruct(r)), _np(wh.reconstruct(r)), rtol=0, atol=1e-9 * np.abs(W).max())


# ------------------------------------------------------------------ Asvd


@pytest.mark.parametrize("alpha", [0.25, 0.5, 1.0, 2.0])
def test_asvd_prefix_is_optimal_in_scaled_norm(rng, alpha):
    m, n = 6, 9
    W, X, _, stats = make_problem(rng, m, n)
    a = np.abs(X).mean(0)
    scale = a**alpha
    d = factorize(torch.from_numpy(W), Asvd(alpha=alpha), stats, FQN)
    opt = eckart_young_tail(W * scale[None, :])
    np.testing.assert_allclose(_np(d.sigma2), np.linalg.svd(W * scale, compute_uv=False) ** 2, rtol=1e-9)
    for r in range(min(m, n) + 1):
        err = float((((W - _np(d.reconstruct(r))) * scale[None, :]) ** 2).sum())
        assert abs(err - opt[r]) <= 1e-9 * opt[0], f"rank {r}"


def test_asvd_zero_channel_is_clamped_not_divided_by_zero(rng):
    W, X, _, stats = make_problem(rng, 5, 6)
    stats.abs_mean[FQN] = stats.abs_mean[FQN].clone()
    stats.abs_mean[FQN][2] = 0.0
    d = factorize(torch.from_numpy(W), Asvd(), stats, FQN)
    assert torch.isfinite(d.U).all() and torch.isfinite(d.V).all()
    assert np.linalg.norm(_np(d.U) @ _np(d.V) - W) / np.linalg.norm(W) < 1e-6


@pytest.mark.parametrize("alpha", [0.0, -0.5, 2.0001, 3.0])
def test_asvd_alpha_out_of_bounds(alpha):
    with pytest.raises(ConfigError, match=r"Asvd\.alpha must be in \(0, 2\]"):
        Asvd(alpha=alpha)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("cfg,what", [(Asvd(), "Asvd"), (WhitenSvd(), "WhitenSvd"),
                                      (FisherWhitenSvd(), "FisherWhitenSvd")])
def test_methods_needing_stats_raise_without_them(rng, cfg, what):
    W = torch.from_numpy(rng.standard_normal((4, 5)))
    with pytest.raises(ConfigError, match=f"{what} needs calibration statistics"):
        factorize(W, cfg, None, FQN)


def test_fisher_whiten_needs_fisher_information(rng):
    W, X, _, stats = make_problem(rng, 4, 5)
    stats.fisher_out.clear()
    with pytest.raises(ConfigError, match="Fisher information"):
        factorize(torch.from_numpy(W), FisherWhitenSvd(), stats, FQN)
    # plain whitening does not need it
    factorize(torch.from_numpy(W), WhitenSvd(), stats, FQN)


@pytest.mark.parametrize("make,field", [
    (lambda: WhitenSvd(ridge=-1e-3), "ridge"), (lambda: WhitenSvd(ridge=1.0), "ridge"),
    (lambda: FisherWhitenSvd(ridge=2.0), "ridge"), (lambda: FisherWhitenSvd(power=-0.1), "power"),
    (lambda: FisherWhitenSvd(power=1.5), "power"),
])
def test_config_validation(make, field):
    with pytest.raises(ConfigError, match=field):
        make()


def test_unknown_factorization_config_is_rejected(rng):
    with pytest.raises(ConfigError, match=r"unknown factorization method str; known: .*PlainSvd"):
        factorize(torch.from_numpy(rng.standard_normal((3, 3))), "svd")


def test_fisher_whiten_negative_floor_is_a_config_error(rng):
    W, X, _, stats = make_problem(rng, 6, 9)
    with pytest.raises(ConfigError, match="floor"):
        cfg = FisherWhitenSvd(floor=-0.9)
        factorize(torch.from_numpy(W), cfg, stats, FQN)


@pytest.mark.parametrize("case", ["all_zero_fisher", "zero_row_with_floor_0"])
def test_fisher_whiten_zero_fisher_gives_finite_factors_or_error(rng, case):
    W, X, fisher_out, stats = make_problem(rng, 6, 9)
    f = torch.from_numpy(fisher_out).clone()
    if case == "all_zero_fisher":
        f.zero_()
        cfg = FisherWhitenSvd()
    else:
        f[0] = 0.0
        cfg = FisherWhitenSvd(floor=0.0)
    stats.fisher_out[FQN] = f
    try:
        d = factorize(torch.from_numpy(W), cfg, stats, FQN)
    except LrexportError:
        return  # a clear error is an acceptable outcome
    assert torch.isfinite(d.U).all() and torch.isfinite(d.V).all(), "non-finite factors"
    assert np.linalg.norm(_np(d.U) @ _np(d.V) - W) / np.linalg.norm(W) < 1e-8


def test_full_fisher_weighting_identity_and_fallback():
    """With a full output Fisher F: ||F^½ (W - W_r) X||² equals the dropped σ² (ridge 0, floor 0);
    a linear without a full matrix falls back to the diagonal weighting."""
    g = torch.Generator().manual_seed(77)
    m, n, T = 12, 10, 64
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = torch.randn(n, T, generator=g, dtype=torch.float64)
    Gm = torch.randn(m, 3 * m, generator=g, dtype=torch.float64)
    F = Gm @ Gm.T  # PSD, full rank
    fqn = "model.layers.0.self_attn.k_proj"
    stats = CalibStats(gram={input_key(fqn): X @ X.T}, fisher_out={fqn: F.diagonal().clone()},
                       fisher_full={fqn: F.clone()}, tokens=1)
    d = factorize(W, FisherWhitenSvd(ridge=0.0, floor=0.0, full=True), stats, fqn)
    lam, Q = torch.linalg.eigh(F)
    Fh = (Q * lam.sqrt()) @ Q.T
    for r in (1, 4, 9):
        err = float(((Fh @ (W - d.reconstruct(r)) @ X) ** 2).sum())
        assert err == pytest.approx(float(d.sigma2[r:].sum()), rel=1e-8)
    assert torch.allclose(d.reconstruct(m), W, atol=1e-9)
    stats.fisher_full.clear()
    diag = factorize(W, FisherWhitenSvd(ridge=0.0, floor=0.0, full=True), stats, fqn)
    ref = factorize(W, FisherWhitenSvd(ridge=0.0, floor=0.0), stats, fqn)
    assert torch.allclose(diag.sigma2, ref.sigma2)
