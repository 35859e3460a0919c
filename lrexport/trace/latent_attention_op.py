"""``lrexport::latent_attention[_quant]``: attention over a cache of low-rank K/V latents (Palu).

The PyTorch form of the ONNX ``LowRankKVAttention`` operator (docs/custom_op.md).
KV heads come in ``G = Hkv / s`` groups of ``s`` heads; group ``g`` caches a key latent of
``rk`` channels and a value latent of ``rv`` channels per token.

Inputs (``B`` batch, ``S`` new tokens, ``P`` cache capacity):

* ``query_BSQ [B, S, Hq*D]`` -- before RoPE;
* ``latent_k_BSR [B, S, G*rk]``, ``latent_v_BSR [B, S, G*rv]`` -- the new tokens' latents;
* ``cache_k / cache_v`` -- ``[B, P, G*r]`` float, or packed codes ``uint8 [B, P, G*r*bits/8]``
  with ``cache_*_params float16 [B, P, 2*G*r/quant_group]`` (see :mod:`lrexport.kv.quant`);
* ``past_len_B [B]`` -- valid positions per row (new token ``s`` sits at ``past_len + s``);
* ``k_up_GrE [G, rk, s*D]`` -- keys of group ``g`` are ``latent_k_g @ k_up[g]`` (+ ``k_bias``),
  then RoPE'd per head;
* ``v_up_GrE [G, rv, s*D]`` or None -- with it the output is in head space ``[B, S, Hq*D]``;
  without it, each query head's output stays in its group's value-latent space,
  ``[B, S, Hq*rv]`` (``o_proj`` then holds ``B_v``, fused);
* ``cos_Pd / sin_Pd`` -- RoPE tables.

Attention reads the cache after the new latents are written (quantized when ``bits``), so
prefill and decode see exactly the same stored representation. Returns the output and the
updated cache tensors. ``latent_attention`` has float caches; ``latent_attention_quant``
has packed caches and returns their params too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lrexport.errors import ShapeError
from lrexport.kv.quant import dequantize, quantize
from lrexport.trace.attention_op import apply_rope, causal_mask, check_positions, positions, write_cache


def _check(query, lk, lv, ck, cv, past_len, k_up, v_up, num_heads, num_kv_heads, group_size, bits, quant_group):
    B, S, Q = query.shape
    if Q % num_heads:
        raise ShapeError(f"latent_attention: query width {Q} is not a multiple of {num_heads} heads")
    if num_kv_heads % group_size or num_heads % num_kv_heads:
        raise ShapeError(f"latent_attention: {num_kv_heads} KV heads cannot form groups of {group_size} "
                         f"for {num_heads} query heads")
    D = Q // num_heads
    G = num_kv_heads // group_size
    if k_up.dim() != 3 or k_up.shape[0] != G or k_up.shape[2] != group_size * D:
        raise ShapeError(f"latent_attention: k_up must be [G={G}, rk, s*D={group_size * D}], got {tuple(k_up.shape)}")
    rk = k_up.shape[1]
    if lk.shape != (B, S, G * rk):
        raise ShapeError(f"latent_attention: latent_k must be [{B}, {S}, {G * rk}], got {tuple(lk.shape)}")
    if lv.dim() != 3 or lv.shape[:2] != (B, S) or lv.shape[2] % G:
        raise ShapeError(f"latent_attention: latent_v must be [{B}, {S}, G*rv], got {tuple(lv.shape)}")
    rv = lv.shape[2] // G
    if v_up is not None and tuple(v_up.shape) != (G, rv, group_size * D):
        raise ShapeError(f"latent_attention: v_up must be [{G}, {rv}, {group_size * D}], got {tuple(v_up.shape)}")
    for name, c, r in (("cache_k", ck, rk), ("cache_v", cv, rv)):
        width = G * r if not bits else G * r * bits // 8
        if c.dim() != 3 or c.shape[0] != B or c.shape[2] != width:
            raise ShapeError(f"latent_attention: {name} must be [B={B}, P, {width}], got {tuple(c.shape)}")
    if past_len.shape != (B,):
        raise ShapeError(f"latent_attention: past_len must be [B={B}], got {tuple(past_len.shape)}")
    return D, G, rk, rv


def _store(cache, params, new, pos, bits, quant_group, width):
    """Write ``new`` at ``pos``; return (cache, params, the full cache as floats)."""
    if not bits:
        cache = write_cache(cache, new, pos)
        return cache, params, cache
    codes, p = quantize(new, bits, quant_group)
    cache = write_cache(cache, codes, pos)
    params = write_cache(params, p, pos)
    return cache, params, dequantize(cache, params, bits, quant_group, width, new.dtype)


def latent_attention_reference(query_BSQ, latent_k_BSR, latent_v_BSR, cache_k, cache_k_params, cache_v,
                               cache_v_params, past_len_B, k_up_GrE, k_bias, v_up_GrE, cos_Pd, sin_Pd, num_heads,
                               num_kv_heads, group_size, window, scale, bits, quant_group):
    """The op's semantics in plain PyTorch (any float dtype)."""
    D, G, rk, rv = _check(query_BSQ, latent_k_BSR, latent_v_BSR, cache_k, cache_v, past_len_B, k_up_GrE, v_up_GrE,
                          num_heads, num_kv_heads, group_size, bits, quant_group)
    B, S, _ = query_BSQ.shape
    P = cache_k.shape[1]
    s = group_size
    pos_BS = positions(past_len_B, S)
    check_positions(pos_BS, P, cos_Pd.shape[0], "latent_attention")
    cache_k, cache_k_params, lk_all = _store(cache_k, cache_k_params, latent_k_BSR, pos_BS, bits, quant_group, G * rk)
    cache_v, cache_v_params, lv_all = _store(cache_v, cache_v_params, latent_v_BSR, pos_BS, bits, quant_group, G * rv)
    dt = query_BSQ.dtype
    # keys: rebuild every cached position from its latent, then RoPE at its position
    k_BPGE = torch.einsum("bpgr,gre->bpge", lk_all.to(dt).view(B, P, G, rk), k_up_GrE.to(dt))
    k_BPHD = k_BPGE.reshape(B, P, num_kv_heads, D)
    if k_bias is not None:
        k_BPHD = k_BPHD + k_bias.to(dt).view(num_kv_heads, D)
    all_pos = torch.arange(P, device=query_BSQ.device)[None].expand(B, P)
    k_BPHD = apply_rope(k_BPHD, cos_Pd[all_pos], sin_Pd[all_pos])
    q_BSHD = apply_rope(query_BSQ.view(B, S, num_heads, D), cos_Pd[pos_BS], sin_Pd[pos_BS])
    # values stay in latent space: KV head j of group g attends over group g's latent
    lv_BGPr = lv_all.to(dt).view(B, P, G, rv).transpose(1, 2)
    v_BHPr = lv_BGPr.repeat_interleave(s, dim=1)  # [B, Hkv, P, rv]
    mask = causal_mask(pos_BS, P, window)
    o_BHSr = F.scaled_dot_product_attention(q_BSHD.transpose(1, 2), k_BPHD.transpose(1, 2), v_BHPr,
                                            attn_mask=mask, scale=scale, enable_gqa=True)
    o_BSHr = o_BHSr.transpose(1, 2)  # [B, S, Hq, rv]
    if v_up_GrE is None:
        out = o_BSHr.reshape(B, S, num_heads * rv)
    else:
        # query head h -> KV head j = h // (Hq/Hkv) -> group g = j // s, slot j % s
        rep = num_heads // num_kv_heads
        kv = torch.arange(num_heads, device=query_BSQ.device) // rep
        up_HrD = v_up_GrE.to(dt).view(G, rv, s, D)[kv // s, :, kv % s, :]  # [Hq, rv, D]
        out = torch.einsum("bshr,hrd->bshd", o_BSHr, up_HrD).reshape(B, S, num_heads * D)
    return out, cache_k, cache_k_params, cache_v, cache_v_params


@torch.library.custom_op("lrexport::latent_attention", mutates_args=())
def latent_attention(
    query_BSQ: torch.Tensor,
    latent_k_BSR: torch.Tensor,
    latent_v_BSR: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    past_len_B: torch.Tensor,
    k_up_GrE: torch.Tensor,
    k_bias: torch.Tensor | None,
    v_up_GrE: torch.Tensor | None,
    cos_Pd: torch.Tensor,
    sin_Pd: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    group_size: int,
    window: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float latent caches: returns (output, cache_k, cache_v)."""
    out, ck, _, cv, _ = latent_attention_reference(
        query_BSQ, latent_k_BSR, latent_v_BSR, cache_k, None, cache_v, None, past_len_B, k_up_GrE, k_bias, v_up_GrE,
        cos_Pd, sin_Pd, num_heads, num_kv_heads, group_size, window, scale, 0, 0)
    return out, ck, cv


@torch.library.custom_op("lrexport::latent_attention_quant", mutates_args=())
def latent_attention_quant(
    query_BSQ: torch.Tensor,
    latent_k_BSR: torch.Tensor,
    latent_v_BSR: torch.Tensor,
    cache_k: torch.Tensor,
    cache_k_params: torch.Tensor,
    cache_v: torch.Tensor,
    cache_v_params: torch.Tensor,
    past_len_B: torch.Tensor,
    k_up_GrE: torch.Tensor,
    k_bias: torch.Tensor | None,
    v_up_GrE: torch.Tensor | None,
    cos_Pd: torch.Tensor,
    sin_Pd: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    group_size: int,
    window: int,
    scale: float,
    bits: int,
    quant_group: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantized latent caches: returns (output, codes_k, params_k, codes_v, params_v)."""
    return latent_attention_reference(
        query_BSQ, latent_k_BSR, latent_v_BSR, cache_k, cache_k_params, cache_v, cache_v_params, past_len_B, k_up_GrE,
        k_bias, v_up_GrE, cos_Pd, sin_Pd, num_heads, num_kv_heads, group_size, window, scale, bits, quant_group)


def _fake_out(query_BSQ, latent_v_BSR, v_up_GrE, num_heads, num_kv_heads, group_size):
    B, S, _ = query_BSQ.shape
    if v_up_GrE is not None:
        return torch.empty_like(query_BSQ)
    G = num_kv_heads // group_size
    return query_BSQ.new_empty(B, S, num_heads * (latent_v_BSR.shape[2] // G))


@latent_attention.register_fake
def _latent_attention_fake(query_BSQ, latent_k_BSR, latent_v_BSR, cache_k, cache_v, past_len_B, k_up_GrE, k_bias,
                           v_up_GrE, cos_Pd, sin_Pd, num_heads, num_kv_heads, group_size, window, scale):
    out = _fake_out(query_BSQ, latent_v_BSR, v_up_GrE, num_heads, num_kv_heads, group_size)
    return out, torch.empty_like(cache_k), torch.empty_like(cache_v)


@latent_attention_quant.register_fake
def _latent_attention_quant_fake(query_BSQ, latent_k_BSR, latent_v_BSR, cache_k, cache_k_params, cache_v,
                                 cache_v_params, past_len_B, k_up_GrE, k_bias, v_up_GrE, cos_Pd, sin_Pd, num_heads,
                                 num_kv_heads, group_size, window, scale, bits, quant_group):
    out = _fake_out(query_BSQ, latent_v_BSR, v_up_GrE, num_heads, num_kv_heads, group_size)
    return (out, torch.empty_like(cache_k), torch.empty_like(cache_k_params), torch.empty_like(cache_v),
            torch.empty_like(cache_v_params))


def _triton_or_reference(query_BSQ, latent_k_BSR, latent_v_BSR, cache_k, cache_k_params, cache_v, cache_v_params,
                         past_len_B, k_up_GrE, k_bias, v_up_GrE, cos_Pd, sin_Pd, num_heads, num_kv_heads, group_size,
                         window, scale, bits, quant_group):
    """On CUDA: the Triton kernels (lrexport.kernels.triton_latent) where their shape rules hold."""
    from lrexport.kernels import triton_latent

    D = query_BSQ.shape[-1] // num_heads
    if triton_latent.available(query_BSQ.device) and triton_latent.supports(D, k_up_GrE.shape[1], bits, quant_group):
        return triton_latent.latent_attention(
            query_BSQ, latent_k_BSR, latent_v_BSR, cache_k, cache_k_params, cache_v, cache_v_params, past_len_B,
            k_up_GrE, k_bias, v_up_GrE, cos_Pd, sin_Pd, num_heads, num_kv_heads, group_size, window, scale, bits,
            quant_group)
    return latent_attention_reference(
        query_BSQ, latent_k_BSR, latent_v_BSR, cache_k, cache_k_params, cache_v, cache_v_params, past_len_B, k_up_GrE,
        k_bias, v_up_GrE, cos_Pd, sin_Pd, num_heads, num_kv_heads, group_size, window, scale, bits, quant_group)


@latent_attention.register_kernel("cuda")
def _latent_attention_cuda(query_BSQ, latent_k_BSR, latent_v_BSR, cache_k, cache_v, past_len_B, k_up_GrE, k_bias,
                           v_up_GrE, cos_Pd, sin_Pd, num_heads, num_kv_heads, group_size, window, scale):
    out, ck, _, cv, _ = _triton_or_reference(
        query_BSQ, latent_k_BSR, latent_v_BSR, cache_k, None, cache_v, None, past_len_B, k_up_GrE, k_bias, v_up_GrE,
        cos_Pd, sin_Pd, num_heads, num_kv_heads, group_size, window, scale, 0, 0)
    return out, ck, cv


@latent_attention_quant.register_kernel("cuda")
def _latent_attention_quant_cuda(query_BSQ, latent_k_BSR, latent_v_BSR, cache_k, cache_k_params, cache_v,
                                 cache_v_params, past_len_B, k_up_GrE, k_bias, v_up_GrE, cos_Pd, sin_Pd, num_heads,
                                 num_kv_heads, group_size, window, scale, bits, quant_group):
    return _triton_or_reference(
        query_BSQ, latent_k_BSR, latent_v_BSR, cache_k, cache_k_params, cache_v, cache_v_params, past_len_B, k_up_GrE,
        k_bias, v_up_GrE, cos_Pd, sin_Pd, num_heads, num_kv_heads, group_size, window, scale, bits, quant_group)
