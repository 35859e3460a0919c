"""The attention marker op: ``lrexport::attention``.

Each decoder layer's attention is one call of this op, so that it is one identifiable
node in the traced graph, which the Palu pass rewrites and the ONNX emitter lowers.

Semantics (the same as the ONNX ``LowRankKVAttention`` op at full rank):

* ``query_BSQ [B, S, Hq*D]``, ``key_BSK [B, S, Hkv*D]``, ``value_BSK [B, S, Hkv*D]``
  are the projections of the new tokens, *before* RoPE.
* ``key_cache_BPK`` / ``value_cache_BPK [B, P, Hkv*D]`` are fixed-capacity buffers;
  ``past_len_B [B]`` (int64) says how many positions of each row are valid.
* New token ``s`` of row ``b`` sits at position ``p = past_len[b] + s``: its RoPE'd key
  and its value are written at ``p`` and it attends to keys ``0..p`` (and, with a
  sliding ``window`` > 0, only to the last ``window`` of them).
* Returns the attention output ``[B, S, Hq*D]`` and the updated buffers.

Rows of a batch may have different ``past_len``. Padding tokens at the end of a row write
junk at positions that later steps overwrite, and are never attended by real tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lrexport.errors import CacheOverflowError, ShapeError


def apply_rope(x_BSHD: torch.Tensor, cos_BSd: torch.Tensor, sin_BSd: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the Hugging Face Llama convention); ``d = D // 2``."""
    half = x_BSHD.shape[-1] // 2
    x1, x2 = x_BSHD[..., :half], x_BSHD[..., half:]
    cos = cos_BSd[:, :, None, :].to(x_BSHD.dtype)
    sin = sin_BSd[:, :, None, :].to(x_BSHD.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def positions(past_len_B: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Absolute positions ``[B, S]`` of the new tokens."""
    return past_len_B[:, None] + torch.arange(seq_len, device=past_len_B.device)[None, :]


def causal_mask(pos_BS: torch.Tensor, capacity: int, window: int) -> torch.Tensor:
    """Boolean mask ``[B, 1, S, P]``: True where query at ``pos`` may attend key ``j``."""
    j = torch.arange(capacity, device=pos_BS.device)[None, None, :]
    mask = j <= pos_BS[:, :, None]
    if window > 0:
        mask = mask & (j > pos_BS[:, :, None] - window)
    return mask[:, None]


def check_positions(pos_BS: torch.Tensor, capacity: int, rope_len: int, what: str) -> None:
    """Raise a clear error when new tokens would not fit in the cache or RoPE table."""
    if pos_BS.numel() == 0:
        return
    top = int(pos_BS.max())
    if int(pos_BS.min()) < 0:
        raise ShapeError(f"{what}: past_len must be >= 0, got {pos_BS[:, 0].tolist()}")
    if top >= capacity:
        raise CacheOverflowError(
            f"{what}: position {top} does not fit in a cache of {capacity} positions "
            f"(past_len + new tokens must be <= {capacity})"
        )
    if top >= rope_len:
        raise CacheOverflowError(f"{what}: position {top} exceeds the RoPE table of {rope_len} positions")


def write_cache(cache_BPK: torch.Tensor, new_BSK: torch.Tensor, pos_BS: torch.Tensor) -> torch.Tensor:
    """Out-of-place scatter of the new rows at their positions."""
    b_idx = torch.arange(cache_BPK.shape[0], device=cache_BPK.device)[:, None].expand_as(pos_BS)
    return cache_BPK.index_put((b_idx, pos_BS), new_BSK.to(cache_BPK.dtype))


def _check_inputs(query, key, value, key_cache, value_cache, past_len, num_heads, num_kv_heads):
    if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
        raise ShapeError(
            f"attention: query/key/value must be [B, S, H*D], got {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        )
    if query.shape[-1] % num_heads:
        raise ShapeError(f"attention: query width {query.shape[-1]} is not a multiple of {num_heads} heads")
    head_dim = query.shape[-1] // num_heads
    kv = num_kv_heads * head_dim
    if key.shape[-1] != kv or value.shape[-1] != kv:
        raise ShapeError(f"attention: key/value width must be {kv} ({num_kv_heads} heads x {head_dim})")
    for name, c in (("key_cache", key_cache), ("value_cache", value_cache)):
        if c.dim() != 3 or c.shape[0] != query.shape[0] or c.shape[2] != kv:
            raise ShapeError(f"attention: {name} must be [B={query.shape[0]}, P, {kv}], got {tuple(c.shape)}")
    if past_len.shape != (query.shape[0],):
        raise ShapeError(f"attention: past_len must be [B={query.shape[0]}], got {tuple(past_len.shape)}")


def rope_and_store(query_BSQ, key_BSK, value_BSK, key_cache_BPK, value_cache_BPK, past_len_B, cos_Pd, sin_Pd,
                   num_heads, num_kv_heads, what: str = "attention"):
    """Check the inputs, RoPE the new queries and keys, write keys and values into the caches.

    Returns ``(q_BSHD, key_cache, value_cache, pos_BS)``."""
    _check_inputs(query_BSQ, key_BSK, value_BSK, key_cache_BPK, value_cache_BPK, past_len_B, num_heads, num_kv_heads)
    B, S, _ = query_BSQ.shape
    D = query_BSQ.shape[-1] // num_heads
    pos_BS = positions(past_len_B, S)
    check_positions(pos_BS, key_cache_BPK.shape[1], cos_Pd.shape[0], what)
    cos, sin = cos_Pd[pos_BS], sin_Pd[pos_BS]
    q_BSHD = apply_rope(query_BSQ.view(B, S, num_heads, D), cos, sin)
    k_BSHD = apply_rope(key_BSK.view(B, S, num_kv_heads, D), cos, sin)
    kc = write_cache(key_cache_BPK, k_BSHD.reshape(B, S, -1), pos_BS)
    vc = write_cache(value_cache_BPK, value_BSK, pos_BS)
    return q_BSHD, kc, vc, pos_BS


def attention_reference(query_BSQ, key_BSK, value_BSK, key_cache_BPK, value_cache_BPK, past_len_B, cos_Pd, sin_Pd,
                        num_heads, num_kv_heads, window, scale):
    """The op's semantics in plain PyTorch (differentiable; any float dtype)."""
    q_BSHD, kc, vc, pos_BS = rope_and_store(query_BSQ, key_BSK, value_BSK, key_cache_BPK, value_cache_BPK,
                                            past_len_B, cos_Pd, sin_Pd, num_heads, num_kv_heads)
    B, S, _ = query_BSQ.shape
    P = key_cache_BPK.shape[1]
    D = query_BSQ.shape[-1] // num_heads
    keys_BHPD = kc.view(B, P, num_kv_heads, D).transpose(1, 2)
    vals_BHPD = vc.view(B, P, num_kv_heads, D).transpose(1, 2)
    mask = causal_mask(pos_BS, P, window)
    out = F.scaled_dot_product_attention(
        q_BSHD.transpose(1, 2), keys_BHPD, vals_BHPD, attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out.transpose(1, 2).reshape(B, S, num_heads * D), kc, vc


@torch.library.custom_op("lrexport::attention", mutates_args=())
def attention(
    query_BSQ: torch.Tensor,
    key_BSK: torch.Tensor,
    value_BSK: torch.Tensor,
    key_cache_BPK: torch.Tensor,
    value_cache_BPK: torch.Tensor,
    past_len_B: torch.Tensor,
    cos_Pd: torch.Tensor,
    sin_Pd: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    window: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_reference(query_BSQ, key_BSK, value_BSK, key_cache_BPK, value_cache_BPK, past_len_B, cos_Pd,
                               sin_Pd, num_heads, num_kv_heads, window, scale)


_DIFF_ARGS = 5  # query, key, value, key_cache, value_cache


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8])
    ctx.attrs = inputs[8:]


def _backward(ctx, grad_out, grad_kc, grad_vc):
    """Recompute the reference under autograd and pull the output gradients back."""
    saved = ctx.saved_tensors
    with torch.enable_grad():
        xs = [t.detach().requires_grad_(True) for t in saved[:_DIFF_ARGS]]
        outs = attention_reference(*xs, *saved[_DIFF_ARGS:], *ctx.attrs)
        pairs = [(o, g) for o, g in zip(outs, (grad_out, grad_kc, grad_vc)) if g is not None]
        grads = torch.autograd.grad([o for o, _ in pairs], xs, [g for _, g in pairs], allow_unused=True)
    return (*grads, None, None, None, None, None, None, None)


attention.register_autograd(_backward, setup_context=_setup_context)


@attention.register_fake
def _attention_fake(query_BSQ, key_BSK, value_BSK, key_cache_BPK, value_cache_BPK, past_len_B, cos_Pd, sin_Pd,
                    num_heads, num_kv_heads, window, scale):
    return torch.empty_like(query_BSQ), torch.empty_like(key_cache_BPK), torch.empty_like(value_cache_BPK)
