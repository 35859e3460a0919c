"""Describe a compressed model: its plan as text, and its ranks and schedule as a figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lrexport.errors import PlanError
from lrexport.models.spec import PROJECTIONS, spec_from_hf_config
from lrexport.plan import Plan


def _rank_matrix(plan: Plan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kept fraction, rank, label) per layer x projection: dense -> 1.0 / -1 / "D"; k/v
    projections of a latent KV cache -> the kept fraction of their latent and "L<rank>"."""
    spec = spec_from_hf_config(plan.model)
    frac = np.ones((spec.num_layers, len(PROJECTIONS)))
    rank = -np.ones((spec.num_layers, len(PROJECTIONS)), dtype=int)
    label = np.full((spec.num_layers, len(PROJECTIONS)), "D", dtype=object)
    ranks = plan.weights.ranks if plan.weights else {}
    for name, r in ranks.items():
        parts = name.split(".")
        li, pj = int(parts[2]), PROJECTIONS.index(parts[-1])
        m, n = spec.projection_shape(parts[-1])
        frac[li, pj] = r * (m + n) / (m * n)
        rank[li, pj], label[li, pj] = r, str(r)
    if plan.kv:
        sD = plan.kv["group_size"] * spec.head_dim
        for li, (rk, rv) in plan.kv["ranks"].items():
            for pj, r in ((PROJECTIONS.index("k_proj"), rk), (PROJECTIONS.index("v_proj"), rv)):
                frac[int(li), pj], rank[int(li), pj], label[int(li), pj] = r / sD, r, f"L{r}"
    return frac, rank, label


def summarize(folder: str | Path) -> str:
    plan = Plan.load(folder)
    spec = spec_from_hf_config(plan.model)
    lines = [f"lrexport plan v{plan.version} ({plan.created})",
             f"source: {plan.source.get('path', plan.source)}",
             f"model: {spec.model_type}, {spec.num_layers} layers, hidden {spec.hidden_size}, "
             f"{spec.num_heads} heads / {spec.num_kv_heads} kv heads, max_len {plan.max_len}, {plan.dtype}"]
    if plan.calibration:
        lines.append(f"calibration: {plan.calibration}")
    w = plan.weights
    if w is None:
        lines.append("weights: uncompressed")
    else:
        lines.append(f"weights: {type(w.factorization).__name__} + {type(w.allocation).__name__}"
                     f"(ratio={w.allocation.ratio}); kept {w.params_kept:,}/{w.params_total:,} "
                     f"({w.params_kept / w.params_total:.1%}), {len(w.ranks)} low-rank linears, "
                     f"allocation {w.alloc_seconds:.2f}s")
        frac, rank, label = _rank_matrix(plan)
        lines.append("kept fraction per projection (mean over layers): " + ", ".join(
            f"{p} {frac[:, j].mean():.2f}" for j, p in enumerate(PROJECTIONS)))
        header = "layer " + " ".join(f"{p[:6]:>7s}" for p in PROJECTIONS)
        lines.append(header)
        for li in range(rank.shape[0]):
            lines.append(f"{li:5d} " + " ".join(f"{'dense' if lab == 'D' else lab:>7}" for lab in label[li]))
    lines.append(f"schedule: {plan.schedule.describe() if plan.schedule else 'none'}")
    if plan.kv:
        k = plan.kv
        lines.append(f"kv cache: Palu {k['grouping']}-LRD ({k['groups']} group(s) of {k['group_size']} KV heads), "
                     f"{k['kv_removed']:.1%} of K/V dims removed, "
                     f"{'float' if not k['bits'] else str(k['bits']) + '-bit'} latents"
                     f"{' (Hadamard-rotated)' if k.get('hadamard') else ''}, {k['bytes_per_token']:,} bytes/token "
                     f"(uncompressed {k['dense_bytes_per_token']:,})")
        lines.append("kv ranks per layer [k, v]: " + ", ".join(f"{i}:{r}" for i, r in k["ranks"].items()))
    return "\n".join(lines)


def plot_plan(folder: str | Path, png: str | Path) -> Path:
    """Heatmap of the kept fraction (rank annotated) per layer x projection, plus the schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan = Plan.load(folder)
    if plan.weights is None:
        raise PlanError(f"{folder}: the plan has no weight compression to plot")
    frac, rank, label = _rank_matrix(plan)
    ncols = 2 if plan.schedule else 1
    fig, axes = plt.subplots(1, ncols, figsize=(7 + 4 * (ncols - 1), max(4, 0.28 * frac.shape[0] + 1.5)),
                             gridspec_kw={"width_ratios": [3, 2][:ncols]})
    ax = axes[0] if ncols > 1 else axes
    im = ax.imshow(frac, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(PROJECTIONS)), PROJECTIONS, rotation=45, ha="right")
    ax.set_ylabel("layer")
    ax.set_title(f"{type(plan.weights.allocation).__name__}: kept fraction (rank; D dense, L KV latent)")
    if frac.shape[0] <= 40:
        for (i, j), lab in np.ndenumerate(label):
            ax.text(j, i, lab, ha="center", va="center", fontsize=6, color="white" if frac[i, j] < 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    if plan.schedule:
        ax2 = axes[1]
        steps = np.arange(1, 129)
        ax2.plot(steps, [plan.schedule.fraction(int(t)) for t in steps])
        ax2.set_ylim(0, 1.05)
        ax2.set_xlabel("decode step")
        ax2.set_ylabel("rank fraction")
        ax2.set_title(plan.schedule.describe())
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png
