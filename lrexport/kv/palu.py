"""Palu KV-cache compression: decompose k_proj/v_proj per group of KV heads, allocate the
latent ranks under a cache budget, fold in the Hadamard rotation, and hand the result to
:class:`lrexport.passes.latent_kv.LatentKVPass`.

Grouping: ``group_size = s`` KV heads share one latent. ``s = 1`` is M-LRD (one latent per
head), ``s = Hkv`` (or 0) is J-LRD (one latent for all heads), anything between is G-LRD.
Each group's rows of ``W_k`` (``[s*D, n]``) are decomposed by a whitened SVD using the
attention input's Gram matrix (the same statistics as the weight pass), weighted on the
output side by the projection's full output Fisher matrix by default (SVD of ``F^½ W S``),
so that components come ordered and every prefix is best at its rank in that norm.

Allocation: one rank for K and one for V per layer (all groups of a layer share it), chosen
by the same allocators as the weights (``Uniform``, ``PaluFisher``, ``Flrc``) with the
budget in latent channels per token: ``ratio`` is the fraction of the K/V cache
dimensions removed. With quantized latents the ranks are multiples of the quantization
group (the Hadamard block), and the true bytes per token count scales and zero points.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from lrexport.allocate import Allocation, AllocContext, Flrc, PaluFisher, ProjectionInfo, Uniform, allocate
from lrexport.calib.stats import CalibStats, input_key
from lrexport.config import config_to_dict, register_config
from lrexport.errors import ConfigError
from lrexport.factorize import Decomposition, FisherWhitenSvd, WhitenSvd, factorize
from lrexport.kv.quant import BITS, bytes_per_token, interleaved_hadamard
from lrexport.models.llama import LlamaLR
from lrexport.models.spec import ModelSpec
from lrexport.passes.latent_kv import LatentKVLayer

log = logging.getLogger(__name__)


@register_config
@dataclass(frozen=True)
class PaluKV:
    """Latent KV cache. ``allocation.ratio`` = fraction of K/V cache dimensions removed."""

    allocation: Uniform | PaluFisher | Flrc
    group_size: int = 1  # KV heads per latent group: 1 = M-LRD, 0 = all heads (J-LRD)
    factorization: WhitenSvd | FisherWhitenSvd = FisherWhitenSvd(full=True)
    bits: int | None = None  # quantized latents: 2, 3, 4 or 8 bits; None = float
    quant_group: int = 32  # channels per scale/zero point (and Hadamard block)
    hadamard: bool = True  # rotate quantized latents (folded into the projections)
    fuse_v: bool = True  # fuse B_v into o_proj where that adds no weight bytes

    def __post_init__(self):
        if not isinstance(self.allocation, (Uniform, PaluFisher, Flrc)):
            raise ConfigError("KV allocation must be Uniform, PaluFisher or Flrc, "
                              f"got {type(self.allocation).__name__}")
        if not isinstance(self.factorization, (WhitenSvd, FisherWhitenSvd)):
            raise ConfigError("KV factorization must be WhitenSvd or FisherWhitenSvd")
        if self.group_size < 0:
            raise ConfigError(f"group_size must be >= 0 (0 = all KV heads), got {self.group_size}")
        if self.bits is not None and self.bits not in BITS:
            raise ConfigError(f"bits must be one of {BITS} (or None for float latents), got {self.bits}")
        if self.quant_group < 8 or self.quant_group & (self.quant_group - 1) or self.quant_group > 64:
            raise ConfigError(f"quant_group must be 8, 16, 32 or 64, got {self.quant_group}")

    def heads_per_group(self, spec: ModelSpec) -> int:
        s = self.group_size or spec.num_kv_heads
        if s > spec.num_kv_heads or spec.num_kv_heads % s:
            raise ConfigError(f"group size {s} does not divide the {spec.num_kv_heads} KV heads of this model "
                              f"(use a divisor of {spec.num_kv_heads}, or 0 for J-LRD)")
        return s

    def grouping(self, spec: ModelSpec) -> str:
        s = self.heads_per_group(spec)
        return "M" if s == 1 else ("J" if s == spec.num_kv_heads else "G")


@dataclass
class KVBuild:
    layers: dict[int, LatentKVLayer]
    allocation: Allocation
    plan: dict[str, Any]
    seconds: float


def _group_decomps(W: torch.Tensor, kind_fqn: str, s: int, D: int, stats: CalibStats, method) -> list[Decomposition]:
    """Decompose each group's rows of ``W [Hkv*D, n]`` with the projection's statistics."""
    G = W.shape[0] // (s * D)
    gram = stats.gram_of(kind_fqn)
    out = []
    for g in range(G):
        rows = slice(g * s * D, (g + 1) * s * D)
        name = f"{kind_fqn}#group{g}"
        sub = CalibStats(gram={input_key(name): gram}, tokens=stats.tokens, fisher_tokens=stats.fisher_tokens)
        if kind_fqn in stats.fisher_out:
            sub.fisher_out[name] = stats.fisher_out[kind_fqn][rows]
        if kind_fqn in stats.fisher_full:
            sub.fisher_full[name] = stats.fisher_full[kind_fqn][rows, rows]
        out.append(factorize(W[rows], method, sub, name))
    return out


def kv_plan(spec: ModelSpec, cfg: PaluKV, ranks: dict[int, list[int]], dtype: torch.dtype,
            alloc_seconds: float = 0.0) -> dict:
    """The plan's ``kv`` section: the setting, every layer's ``[rk, rv]`` and the cache bytes."""
    s = cfg.heads_per_group(spec)
    G = spec.num_kv_heads // s
    fb = torch.empty((), dtype=dtype).element_size()
    kv_dims = sum(G * (rk + rv) for rk, rv in ranks.values())
    full_dims = spec.num_layers * 2 * spec.kv_dim
    bpt = sum(bytes_per_token(G * r, cfg.bits, cfg.quant_group, fb) for rr in ranks.values() for r in rr)
    return {"config": config_to_dict(cfg), "grouping": cfg.grouping(spec), "group_size": s, "groups": G,
            "ranks": {str(k): list(v) for k, v in ranks.items()}, "bits": cfg.bits, "quant_group": cfg.quant_group,
            "hadamard": bool(cfg.bits and cfg.hadamard), "kept_dims": kv_dims, "full_dims": full_dims,
            "kv_removed": 1 - kv_dims / full_dims, "bytes_per_token": bpt,
            "dense_bytes_per_token": full_dims * fb, "alloc_seconds": alloc_seconds}


def build_latent_kv(model: LlamaLR, stats: CalibStats, cfg: PaluKV) -> KVBuild:
    """Decompose, allocate and assemble every layer's latent projections."""
    t0 = time.perf_counter()
    spec = model.spec
    s, D, n = cfg.heads_per_group(spec), spec.head_dim, spec.hidden_size
    G = spec.num_kv_heads // s
    K = min(s * D, n)
    mods = dict(model.named_modules())
    alloc_cfg = cfg.allocation
    if cfg.bits:  # ranks are whole quantization groups (and Hadamard blocks)
        step = math.lcm(alloc_cfg.align, cfg.quant_group)
        if K % step:
            raise ConfigError(f"a group latent of at most {K} channels cannot be split in blocks of {step}")
        alloc_cfg = dataclasses.replace(alloc_cfg, align=step, min_rank=max(alloc_cfg.min_rank, step))
    decomps: dict[str, list[Decomposition]] = {}
    infos = []
    for layer in range(spec.num_layers):
        for kind in ("k", "v"):
            fqn = f"model.layers.{layer}.self_attn.{kind}_proj"
            ds = _group_decomps(mods[fqn].weight.detach(), fqn, s, D, stats, cfg.factorization)
            decomps[fqn] = ds
            sigma2 = sum(d.loss_weight * d.sigma2[:K] for d in ds)
            infos.append(ProjectionInfo(name=fqn, m=s * D, n=n, sigma2=sigma2, fisher_w=stats.fisher_w.get(fqn, 0.0),
                                        unit_cost=G, full_cost=G * K))
    alloc = allocate(alloc_cfg, AllocContext(infos=infos))
    layers: dict[int, LatentKVLayer] = {}
    ranks: dict[int, list[int]] = {}
    dtype = model.model.embed_tokens.weight.dtype
    for layer in range(spec.num_layers):
        parts = {}
        for kind in ("k", "v"):
            fqn = f"model.layers.{layer}.self_attn.{kind}_proj"
            r = alloc.ranks.get(fqn, K)
            A = [d.V[:r] for d in decomps[fqn]]  # [r, n] per group
            up = [d.U[:, :r].T for d in decomps[fqn]]  # [r, s*D] per group
            if cfg.bits and cfg.hadamard:
                H = interleaved_hadamard(r, cfg.quant_group)  # orthogonal: up^T H^T H A == up^T A
                A, up = [H @ a for a in A], [H @ u for u in up]
            parts[kind] = (torch.cat(A).to(dtype), torch.stack(up).to(dtype), r)
            bias = mods[fqn].bias
            parts[kind + "_bias"] = bias.detach().clone() if bias is not None else None
        layers[layer] = LatentKVLayer(A_k=parts["k"][0], k_up=parts["k"][1], A_v=parts["v"][0], v_up=parts["v"][1],
                                      group_size=s, k_bias=parts["k_bias"], v_bias=parts["v_bias"])
        ranks[layer] = [parts["k"][2], parts["v"][2]]
    plan = kv_plan(spec, cfg, ranks, dtype, alloc.seconds)
    kv_dims, full_dims, bpt = plan["kept_dims"], plan["full_dims"], plan["bytes_per_token"]
    seconds = time.perf_counter() - t0
    log.info("Palu KV: %s-LRD, kept %d/%d dims (%.1f%%), %d bytes/token", plan["grouping"], kv_dims, full_dims,
             100 * kv_dims / full_dims, bpt)
    return KVBuild(layers=layers, allocation=alloc, plan=plan, seconds=seconds)


def reconstructed_weights(layer: LatentKVLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k_proj`` / ``v_proj`` weights ``[Hkv*D, n]`` (float64) that ``layer``'s float latents compute:
    the keys and values of KV head ``(g, slot)`` are ``latent_g @ up[g][:, slot*D:(slot+1)*D]``."""
    def rebuild(A: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        G, r, _ = up.shape
        return torch.cat([up[g].T.double() @ A[g * r:(g + 1) * r].double() for g in range(G)])

    return rebuild(layer.A_k, layer.k_up), rebuild(layer.A_v, layer.v_up)


@contextlib.contextmanager
def kv_compressed_weights(model: LlamaLR, latent: dict[int, LatentKVLayer]):
    """Within the block, ``k_proj`` / ``v_proj`` of every layer in ``latent`` compute the latent
    reconstruction (and its biases), so that ``model`` runs as the KV-compressed model with float
    latents; the original weights are put back after it, also on errors."""
    saved = []
    try:
        for i, layer in latent.items():
            attn = model.model.layers[i].self_attn
            for lin, W, bias in zip((attn.k_proj, attn.v_proj), reconstructed_weights(layer),
                                    (layer.k_bias, layer.v_bias)):
                saved.append((lin, lin.weight.data, lin.bias.data if lin.bias is not None else None))
                lin.weight.data = W.to(lin.weight.dtype)
                if bias is not None and lin.bias is not None:
                    lin.bias.data = bias.to(lin.bias.dtype)
        yield model
    finally:
        for lin, w, b in saved:
            lin.weight.data = w
            if b is not None:
                lin.bias.data = b
