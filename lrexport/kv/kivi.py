"""The baseline a user would pick instead of Palu: plain low-bit KV quantization (KIVI-style).

Keys are quantized per channel over blocks of ``token_group`` consecutive positions (post-
RoPE, as KIVI does), values per token over groups of ``channel_group`` channels, both
asymmetric with float16 scale and zero point. This is a quality simulation: the cache is
kept in float and every attention reads the quantize-dequantized values of all valid
positions (no full-precision window, the same treatment the quantized Palu latents get).
True bytes per token are computed from the layout (:func:`kivi_bytes_per_token`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lrexport.config import register_config
from lrexport.errors import ConfigError
from lrexport.passes.base import PassResult
from lrexport.trace.attention_op import causal_mask, rope_and_store
from lrexport.trace.export import TracedGraph


@register_config
@dataclass(frozen=True)
class KiviKV:
    bits: int = 2
    token_group: int = 64  # keys: positions per (channel) scale / zero point
    channel_group: int = 64  # values: channels per (token) scale / zero point

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 8):
            raise ConfigError(f"KIVI bits must be 2, 3, 4 or 8, got {self.bits}")
        for name, g in (("token_group", self.token_group), ("channel_group", self.channel_group)):
            if g < 1:
                raise ConfigError(f"{name} must be >= 1, got {g}")


def kivi_bytes_per_token(kv_dim: int, num_layers: int, cfg: KiviKV) -> float:
    """Codes plus float16 scale and zero point, per token, all layers."""
    k = kv_dim * cfg.bits / 8 + kv_dim * 4 / cfg.token_group
    v = kv_dim * cfg.bits / 8 + kv_dim * 4 / cfg.channel_group
    return num_layers * (k + v)


def _fake_quant(x: torch.Tensor, bits: int, dim: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Asymmetric quantize-dequantize of ``x`` with min/max reduced over ``dim`` (valid entries only)."""
    levels = (1 << bits) - 1
    hi_src = x if valid is None else x.masked_fill(~valid, float("-inf"))
    lo_src = x if valid is None else x.masked_fill(~valid, float("inf"))
    hi, lo = hi_src.amax(dim, keepdim=True), lo_src.amin(dim, keepdim=True)
    hi, lo = torch.where(torch.isfinite(hi), hi, 0), torch.where(torch.isfinite(lo), lo, 0)
    scale = ((hi - lo) / levels).clamp_min(1e-8).half().to(x.dtype)
    zero = lo.half().to(x.dtype)
    return torch.round((x - zero) / scale).clamp(0, levels) * scale + zero


def _quant_keys(k_BPK: torch.Tensor, valid_BP: torch.Tensor, bits: int, tg: int) -> torch.Tensor:
    B, P, K = k_BPK.shape
    pad = (-P) % tg
    x = F.pad(k_BPK, (0, 0, 0, pad)).view(B, -1, tg, K)
    m = F.pad(valid_BP, (0, pad)).view(B, -1, tg, 1)
    return _fake_quant(x, bits, 2, m).view(B, -1, K)[:, :P]


def _quant_values(v_BPK: torch.Tensor, bits: int, cg: int) -> torch.Tensor:
    B, P, K = v_BPK.shape
    if K % cg:
        raise ConfigError(f"value width {K} is not a multiple of channel_group {cg}")
    return _fake_quant(v_BPK.view(B, P, K // cg, cg), bits, 3).view(B, P, K)


@torch.library.custom_op("lrexport::kivi_attention", mutates_args=())
def kivi_attention(query_BSQ: torch.Tensor, key_BSK: torch.Tensor, value_BSK: torch.Tensor,
                   key_cache_BPK: torch.Tensor, value_cache_BPK: torch.Tensor, past_len_B: torch.Tensor,
                   cos_Pd: torch.Tensor, sin_Pd: torch.Tensor, num_heads: int, num_kv_heads: int, window: int,
                   scale: float, bits: int, token_group: int, channel_group: int,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, kc, vc, pos_BS = rope_and_store(query_BSQ, key_BSK, value_BSK, key_cache_BPK, value_cache_BPK, past_len_B,
                                       cos_Pd, sin_Pd, num_heads, num_kv_heads, "kivi_attention")
    B, S, _ = query_BSQ.shape
    P = key_cache_BPK.shape[1]
    D = query_BSQ.shape[-1] // num_heads
    valid = torch.arange(P)[None, :] < (past_len_B + S)[:, None]
    kq = _quant_keys(kc, valid, bits, token_group)
    vq = _quant_values(vc, bits, channel_group)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), kq.view(B, P, num_kv_heads, D).transpose(1, 2),
        vq.view(B, P, num_kv_heads, D).transpose(1, 2), attn_mask=causal_mask(pos_BS, P, window), scale=scale,
        enable_gqa=True)
    return out.transpose(1, 2).reshape(B, S, num_heads * D), kc, vc


@kivi_attention.register_fake
def _kivi_fake(query_BSQ, key_BSK, value_BSK, key_cache_BPK, value_cache_BPK, past_len_B, cos_Pd, sin_Pd, num_heads,
               num_kv_heads, window, scale, bits, token_group, channel_group):
    return torch.empty_like(query_BSQ), torch.empty_like(key_cache_BPK), torch.empty_like(value_cache_BPK)


class KiviPass:
    """Swap every ``lrexport.attention`` for the KIVI-quantized attention (in place)."""

    name = "kivi_kv"

    def __init__(self, cfg: KiviKV):
        self.cfg = cfg

    def __call__(self, tg: TracedGraph) -> PassResult:
        result = PassResult(self.name)
        g = tg.gm.graph
        for node in list(g.nodes):
            if node.op == "call_function" and node.target == torch.ops.lrexport.attention.default:
                node.target = torch.ops.lrexport.kivi_attention.default
                node.args = (*node.args, self.cfg.bits, self.cfg.token_group, self.cfg.channel_group)
                result.changed += 1
        if not result.changed:
            result.unmatched = "the graph has no lrexport.attention node"
        tg.gm.recompile()
        tg.meta["kivi"] = {"bits": self.cfg.bits, "token_group": self.cfg.token_group,
                           "channel_group": self.cfg.channel_group}
        return result.log()
