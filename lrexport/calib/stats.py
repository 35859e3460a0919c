"""Calibration statistics and the one streaming pass that collects them.

For every linear of the decoder layers the pass collects:

* ``gram[key]`` -- ``XᵀX`` of the linear's input over all calibration tokens, accumulated
  in float64 (each batch's product is taken in float32, or float64 for float64 models).
  q/k/v share one input (key ``...self_attn.qkv``), gate/up share one (``...mlp.gate_up``).
* ``abs_mean[key]`` -- mean ``|x|`` per input channel (ASVD's activation scaling).
* ``fisher_out[fqn]`` -- ``Σ_t (∂L/∂y_t)²`` per output channel (the diagonal empirical
  Fisher of the linear's output), with ``L`` the summed next-token NLL of a window.
* ``fisher_w[fqn]`` -- ``Σ_windows ||∂L/∂W||²``, the weight Fisher total (Palu's score).
* ``fisher_full[fqn]`` -- ``Σ_t g_t g_tᵀ`` with ``g_t = ∂L/∂y_t``: the full output Fisher of
  the k/v projections (``[Hkv*D, Hkv*D]``), which the KV decomposition can whiten by.

The pass runs layer by layer: all windows go through layer ``l`` before layer ``l+1``
is touched, hidden states are kept between layers, and the backward pass recomputes
each layer from its stored input. Only one layer needs to be resident at a time.
Hooks are removed when the pass ends, also on error.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lrexport.errors import ConfigError
from lrexport.models.llama import LlamaLR
from lrexport.util import atomic_write_bytes, progress

log = logging.getLogger(__name__)


FULL_FISHER = ("k_proj", "v_proj")  # projections whose full output Fisher matrix is kept


def input_key(fqn: str) -> str:
    """The Gram-matrix key of a linear: linears that read the same input share one."""
    if fqn.endswith(("q_proj", "k_proj", "v_proj")):
        return fqn.rsplit(".", 1)[0] + ".qkv"
    if fqn.endswith(("gate_proj", "up_proj")):
        return fqn.rsplit(".", 1)[0] + ".gate_up"
    return fqn


@dataclass
class CalibStats:
    gram: dict[str, torch.Tensor] = field(default_factory=dict)
    abs_mean: dict[str, torch.Tensor] = field(default_factory=dict)
    fisher_out: dict[str, torch.Tensor] = field(default_factory=dict)
    fisher_w: dict[str, float] = field(default_factory=dict)
    fisher_full: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0
    windows: int = 0
    fisher_tokens: int = 0  # tokens of the windows the Fisher pass used (0: all of them)
    seconds_forward: float = 0.0
    seconds_fisher: float = 0.0

    @property
    def has_fisher(self) -> bool:
        return bool(self.fisher_out)

    @property
    def fisher_norm(self) -> int:
        """Token count that turns the summed Fisher statistics into per-token means."""
        return self.fisher_tokens or self.tokens

    def gram_of(self, fqn: str) -> torch.Tensor:
        return self.gram[input_key(fqn)]

    def abs_mean_of(self, fqn: str) -> torch.Tensor:
        return self.abs_mean[input_key(fqn)]

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save

        tensors = {f"gram/{k}": v.contiguous() for k, v in self.gram.items()}
        tensors |= {f"abs_mean/{k}": v.contiguous() for k, v in self.abs_mean.items()}
        tensors |= {f"fisher_out/{k}": v.contiguous() for k, v in self.fisher_out.items()}
        tensors |= {f"fisher_full/{k}": v.contiguous() for k, v in self.fisher_full.items()}
        tensors |= {f"fisher_w/{k}": torch.tensor([v], dtype=torch.float64) for k, v in self.fisher_w.items()}
        meta = {"tokens": str(self.tokens), "windows": str(self.windows), "fisher_tokens": str(self.fisher_tokens),
                "seconds_forward": str(self.seconds_forward), "seconds_fisher": str(self.seconds_fisher)}
        atomic_write_bytes(path, save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> CalibStats:
        from safetensors import safe_open

        s = cls()
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            for k in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                kind, name = k.split("/", 1)
                t = f.get_tensor(k)
                if kind == "fisher_w":
                    s.fisher_w[name] = float(t.item())
                else:
                    getattr(s, kind)[name] = t
        s.tokens, s.windows = int(meta.get("tokens", 0)), int(meta.get("windows", 0))
        s.fisher_tokens = int(meta.get("fisher_tokens", 0))
        s.seconds_forward = float(meta.get("seconds_forward", 0.0))
        s.seconds_fisher = float(meta.get("seconds_fisher", 0.0))
        return s


def _linears(layer: torch.nn.Module, prefix: str) -> dict[str, torch.nn.Linear]:
    return {f"{prefix}.{n}": m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


@torch.no_grad()
def _forward_layer_collect(layer, prefix, hidden, model, stats, zeros_B):
    """Run every batch through one layer, accumulating Gram and |x| per input key."""
    handles = []
    seen: set[str] = set()

    def make_hook(key):
        def hook(_mod, args):
            # per-batch products in float32 (float64 for float64 models), accumulated in float64
            x = args[0].reshape(-1, args[0].shape[-1])
            if x.dtype not in (torch.float32, torch.float64):
                x = x.float()
            stats.gram[key] = stats.gram.get(key, 0) + (x.T @ x).double()
            stats.abs_mean[key] = stats.abs_mean.get(key, 0) + x.abs().sum(0).double()
        return hook

    try:
        for fqn, lin in _linears(layer, prefix).items():
            key = input_key(fqn)
            if key in seen:
                continue
            seen.add(key)
            handles.append(lin.register_forward_pre_hook(make_hook(key)))
        out = []
        for h in hidden:
            B, S, _ = h.shape
            kc, vc = (torch.zeros(B, S, model.spec.kv_dim, dtype=h.dtype) for _ in range(2))
            out.append(layer(h, zeros_B[:B], kc, vc, model.rope_cos, model.rope_sin)[0])
        return out
    finally:
        for hd in handles:
            hd.remove()


def _backward_layer(layer, prefix, inputs, grads_out, model, stats, zeros_B):
    """Recompute one layer per window and backpropagate; accumulate Fisher statistics."""
    linears = _linears(layer, prefix)
    handles = []

    def make_hook(fqn):
        def fwd_hook(_mod, _args, out):
            def grad_hook(g):
                g2 = g.detach().reshape(-1, g.shape[-1])
                acc = g2.double().pow(2).sum(0)
                stats.fisher_out[fqn] = stats.fisher_out.get(fqn, 0) + acc
                if fqn.endswith(FULL_FISHER):
                    stats.fisher_full[fqn] = stats.fisher_full.get(fqn, 0) + (g2.T @ g2).double()
            out.register_hook(grad_hook)
        return fwd_hook

    params = [p for p in layer.parameters()]
    for p in params:
        p.requires_grad_(True)
    grads_in = []
    try:
        for fqn, lin in linears.items():
            handles.append(lin.register_forward_hook(make_hook(fqn)))
        for h, g in zip(inputs, grads_out):
            for b in range(h.shape[0]):  # one window at a time: per-sample weight Fisher
                x = h[b:b + 1].detach().requires_grad_(True)
                kc, vc = (torch.zeros(1, x.shape[1], model.spec.kv_dim, dtype=x.dtype) for _ in range(2))
                with torch.enable_grad():
                    y = layer(x, zeros_B[:1], kc, vc, model.rope_cos, model.rope_sin)[0]
                    y.backward(g[b:b + 1])
                grads_in.append(x.grad.detach())
                for fqn, lin in linears.items():
                    stats.fisher_w[fqn] = stats.fisher_w.get(fqn, 0.0) + float(lin.weight.grad.double().pow(2).sum())
                    lin.weight.grad = None
                for p in params:
                    p.grad = None
    finally:
        for hd in handles:
            hd.remove()
        for p in params:
            p.requires_grad_(False)
    # regroup per-window input grads into the batches of `inputs`
    out, i = [], 0
    for h in inputs:
        out.append(torch.cat(grads_in[i:i + h.shape[0]]))
        i += h.shape[0]
    return out


def collect_stats(model: LlamaLR, windows: torch.Tensor, *, fisher: bool = True, batch_size: int = 4,
                  fisher_windows: int | None = None) -> CalibStats:
    """One streaming pass over ``windows [N, L]``: Gram matrices, |x| and (optionally) Fisher.

    The Fisher statistics use the first ``fisher_windows`` windows (all when None); the
    backward pass costs about three forward passes, so fewer windows make it cheaper.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ConfigError(f"calibration windows must be [N, L >= 2] token ids, got {tuple(windows.shape)}")
    if fisher_windows is not None and fisher_windows < 1:
        raise ConfigError(f"fisher_windows must be >= 1, got {fisher_windows}")
    stats = CalibStats(windows=int(windows.shape[0]), tokens=int(windows.numel()))
    was_training = model.training
    grad_state = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        nf = len(windows) if fisher_windows is None else min(fisher_windows, len(windows))
        # the Fisher windows, spread evenly over the set, go first (the Gram sums are order-free)
        sel = fisher_subset(len(windows), nf)
        order = sel + [i for i in range(len(windows)) if i not in set(sel)]
        return _collect(model, windows[order], stats, nf if fisher else 0, batch_size)
    finally:
        model.train(was_training)
        for p, rg in grad_state:
            p.requires_grad_(rg)


def fisher_subset(n: int, k: int) -> list[int]:
    """Indices of ``k`` of ``n`` windows spread evenly (all of them when k >= n)."""
    if k >= n:
        return list(range(n))
    return [i * n // k for i in range(k)]


def _first(batches: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    """The first ``n`` rows of a list of batches, as a list of batches."""
    out = []
    for b in batches:
        if n <= 0:
            break
        out.append(b[:n])
        n -= b.shape[0]
    return out


def _collect(model: LlamaLR, windows: torch.Tensor, stats: CalibStats, nf: int, batch_size: int) -> CalibStats:
    zeros_B = torch.zeros(max(batch_size, 1), dtype=torch.int64)
    t0 = time.perf_counter()
    with torch.no_grad():
        hidden = [model.model.embed_tokens(windows[i:i + batch_size]) for i in range(0, len(windows), batch_size)]
    boundaries = [_first(hidden, nf)]
    layers = list(model.model.layers)
    for li, layer in enumerate(progress(layers, desc="calibrate: forward", unit="layer")):
        hidden = _forward_layer_collect(layer, f"model.layers.{li}", hidden, model, stats, zeros_B)
        if nf:
            boundaries.append(_first(hidden, nf))
    for k in stats.abs_mean:
        stats.abs_mean[k] = stats.abs_mean[k] / stats.tokens
    stats.seconds_forward = time.perf_counter() - t0
    if not nf:
        return stats
    t1 = time.perf_counter()
    stats.fisher_tokens = nf * windows.shape[1]
    grads = []
    targets = _first([windows[i:i + batch_size] for i in range(0, len(windows), batch_size)], nf)
    for h, ids in zip(boundaries[-1], targets):
        x = h.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model.lm_head(model.model.norm(x)).float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                   reduction="sum")
            loss.backward()
        grads.append(x.grad.detach())
    bar = progress(total=len(layers), desc="calibrate: fisher", unit="layer")
    for li in reversed(range(len(layers))):
        grads = _backward_layer(layers[li], f"model.layers.{li}", boundaries[li], grads, model, stats, zeros_B)
        boundaries[li + 1] = None  # free what is no longer needed
        bar.update(1)
    bar.close()
    stats.seconds_fisher = time.perf_counter() - t1
    log.info("calibration: %d tokens, forward %.1fs, fisher %.1fs", stats.tokens, stats.seconds_forward,
             stats.seconds_fisher)
    return stats
