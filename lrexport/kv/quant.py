"""Per-token asymmetric integer quantization of KV latents, stored packed, and the
Walsh-Hadamard rotation that is folded into the latent projections.

Layout of one quantized cache row (one token of one sequence), for ``R`` latent channels,
``bits`` in {2, 3, 4, 8} and quantization groups of ``group`` channels:

* ``codes`` -- ``R * bits / 8`` bytes (uint8). Channel ``c`` has code ``q_c`` in
  ``[0, 2^bits)``. Codes are packed little-endian: for 2/4/8 bits, ``8 / bits`` codes
  per byte, the lowest channel in the lowest bits; for 3 bits, each run of 8 channels
  is one 24-bit little-endian word (3 bytes) holding channel ``8k + i`` at bits ``3i``.
* ``params`` -- ``2 * R / group`` float16 values: the scales of the groups, then their
  zero points (``[scale_0 .. scale_{G-1}, zero_0 .. zero_{G-1}]``).

A value is ``q * scale + zero`` with ``scale = (max - min) / (2^bits - 1)`` and
``zero = min`` over its group. True bytes per token: ``R * bits / 8 + 4 * R / group``.
"""

from __future__ import annotations

import math

import torch

from lrexport.errors import ConfigError, ShapeError

BITS = (2, 3, 4, 8)


def check_quant(bits: int, group: int, width: int, what: str = "latent") -> None:
    if bits not in BITS:
        raise ConfigError(f"bits must be one of {BITS}, got {bits}")
    if group < 8 or group & (group - 1):
        raise ConfigError(f"quantization group must be a power of two >= 8, got {group}")
    if width % group:
        raise ConfigError(f"{what} width {width} is not a multiple of the quantization group {group}")


def code_bytes(width: int, bits: int) -> int:
    return width * bits // 8


def bytes_per_token(width: int, bits: int | None, group: int, float_bytes: int = 4) -> int:
    """Cache bytes per token for ``width`` latent channels (float when ``bits`` is None)."""
    if bits is None:
        return width * float_bytes
    return code_bytes(width, bits) + 2 * 2 * (width // group)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[..., R]`` (values < 2^bits) into uint8 ``[..., R*bits/8]``."""
    c = codes.to(torch.int32)
    if bits == 8:
        return c.to(torch.uint8)
    if bits in (2, 4):
        per = 8 // bits
        c = c.reshape(*c.shape[:-1], -1, per)
        shifts = torch.arange(per, dtype=torch.int32, device=c.device) * bits
        return (c << shifts).sum(-1).to(torch.uint8)
    # 3 bits: 8 codes -> one 24-bit word -> 3 bytes
    c = c.reshape(*c.shape[:-1], -1, 8)
    word = (c << (torch.arange(8, dtype=torch.int32, device=c.device) * 3)).sum(-1)
    out = torch.stack([(word >> (8 * i)) & 0xFF for i in range(3)], dim=-1)
    return out.reshape(*out.shape[:-2], -1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 ``[..., R*bits/8]`` -> int64 codes ``[..., R]``."""
    p = packed.to(torch.int32)
    if bits == 8:
        return p.long()
    if bits in (2, 4):
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.int32, device=p.device) * bits
        c = (p[..., None] >> shifts) & ((1 << bits) - 1)
        return c.reshape(*p.shape[:-1], width).long()
    p = p.reshape(*p.shape[:-1], -1, 3)
    word = p[..., 0] | (p[..., 1] << 8) | (p[..., 2] << 16)
    c = (word[..., None] >> (torch.arange(8, dtype=torch.int32, device=p.device) * 3)) & 7
    return c.reshape(*p.shape[:-2], width).long()


SEARCH_BITS = 2  # the width whose groups get their range searched
SEARCH_STEPS = 16  # trims of k/64 of the range, k < 16, at each end: 256 candidates
SEARCH_DENOM = 64  # a power of two: the trims' scaling is exact
SEARCH_MAX_GROUP = 256


def searches(bits: int, group: int) -> bool:
    """Whether groups of ``bits``-bit codes get their range searched (:func:`quantize`)."""
    return bits == SEARCH_BITS and group & (group - 1) == 0 and group <= SEARCH_MAX_GROUP


def _halving_sum(v: torch.Tensor) -> torch.Tensor:
    """Sum over the last (power-of-two) axis by adding halves: ``v[i] + v[i + n/2]``, repeated.

    The order every implementation of the search uses, so that they choose the same candidate."""
    while v.shape[-1] > 1:
        h = v.shape[-1] // 2
        v = v[..., :h] + v[..., h:]
    return v[..., 0]


def _div(x: torch.Tensor, d: int) -> torch.Tensor:
    """``x / d`` rounded once (IEEE), on every device: PyTorch's CUDA kernels turn a division by a
    Python scalar into a multiplication by its reciprocal, which rounds differently now and then;
    the kernels (CPU, CUDA, Triton) divide."""
    return x / torch.full_like(x, d)


def _searched(xg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, levels: int):
    """(codes, scale, zero) of the candidate range with the least squared error per group.

    Candidates trim ``a/64`` of the range from the bottom and ``b/64`` from the top (a, b < 16),
    ``a`` major; ``(0, 0)`` is the plain min/max. The error of a candidate is
    ``scale**2 * sum((q - t)**2)`` in float64, where ``t`` is the unrounded level and ``q`` the
    code: the squares are exact in float64 and the sum runs in :func:`_halving_sum`'s order, so
    the choice does not depend on fused multiply-adds or reduction order. Ties keep the first.
    ``custom_ops/src/quant.h`` and the Triton store kernel compute the same.
    """
    span = hi - lo
    best = None
    for a in range(SEARCH_STEPS):
        for b in range(SEARCH_STEPS):
            scale = _div(((span * float(SEARCH_DENOM - a - b)) * (1.0 / SEARCH_DENOM)), levels).clamp_min(1e-8).half()
            zero = lo.half() if a == 0 else (lo + (span * float(a)) * (1.0 / SEARCH_DENOM)).half()
            sf, zf = scale.float()[..., None], zero.float()[..., None]
            t = (xg - zf) / sf
            q = torch.nan_to_num(torch.round(t), nan=0.0).clamp(0, levels)
            d = q.double() - t.double()
            err = _halving_sum(d * d) * (scale.double() * scale.double())
            if best is None:
                best = [err, q, scale, zero]
                continue
            m = err < best[0]
            best = [torch.where(m, err, best[0]), torch.where(m[..., None], q, best[1]),
                    torch.where(m, scale, best[2]), torch.where(m, zero, best[3])]
    return best[1], best[2], best[3]


def quantize(x: torch.Tensor, bits: int, group: int, *, search: bool | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., R]`` -> (packed codes uint8 ``[..., R*bits/8]``, params float16 ``[..., 2R/group]``).

    Per group: asymmetric, scale and zero point in float16. 2-bit groups (power-of-two sizes up
    to 256) search their range over 256 trims of its ends (:func:`_searched`); the others use
    their min and max. Dequantization is the same either way. ``search``: force the search on
    or off (experiments; the op's kernels follow :func:`searches`).
    """
    R = x.shape[-1]
    if R % group:
        raise ShapeError(f"latent width {R} is not a multiple of the quantization group {group}")
    xg = x.float().reshape(*x.shape[:-1], R // group, group)
    lo, hi = xg.amin(-1), xg.amax(-1)
    levels = (1 << bits) - 1
    if searches(bits, group) if search is None else search:
        q, scale, zero = _searched(xg, lo, hi, levels)
        return pack(q.reshape(x.shape).long(), bits), torch.cat([scale, zero], dim=-1)
    # scale and zero are stored in float16; quantize against the stored values
    scale = _div(hi - lo, levels).clamp_min(1e-8).half()
    zero = lo.half()
    q = torch.round((xg - zero.float()[..., None]) / scale.float()[..., None]).clamp(0, levels)
    return pack(q.reshape(x.shape).long(), bits), torch.cat([scale, zero], dim=-1)


def dequantize(packed: torch.Tensor, params: torch.Tensor, bits: int, group: int, width: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values ``[..., R]`` from packed codes and float16 (scale, zero) params."""
    q = unpack(packed, bits, width).to(torch.float32)
    ng = width // group
    scale, zero = params[..., :ng].float(), params[..., ng:].float()
    x = q.reshape(*q.shape[:-1], ng, group) * scale[..., None] + zero[..., None]
    return x.reshape(*q.shape[:-1], width).to(dtype)


def hadamard(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthonormal Walsh-Hadamard matrix of order ``n`` (a power of two)."""
    if n < 1 or n & (n - 1):
        raise ConfigError(f"Hadamard order must be a power of two, got {n}")
    H = torch.ones(1, 1, dtype=dtype)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H / math.sqrt(n)


def block_hadamard(width: int, block: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Block-diagonal ``[width, width]`` rotation: one Hadamard block per quantization group."""
    if width % block:
        raise ConfigError(f"width {width} is not a multiple of the Hadamard block {block}")
    return torch.block_diag(*[hadamard(block, dtype)] * (width // block))


def interleaved_hadamard(width: int, block: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The rotation folded into quantized latents: interleave, then one Hadamard block per group.

    Output group ``j`` mixes channels ``j, j + n, j + 2n, ...`` (``n = width / block``), so every
    quantization group holds leading and trailing singular directions alike instead of the
    group's own contiguous slice. Orthogonal, like :func:`block_hadamard`. On SmolLM2 (J-LRD,
    50%, 3 bits, groups of 32) it cut the perplexity added by 3-bit latents over an 8-bit cache
    from 3.75 to 2.74 (``bench/results/kv_quant_experiments_rotation.md``).
    """
    H = block_hadamard(width, block, dtype)
    perm = torch.arange(width).reshape(block, width // block).T.reshape(-1)
    return H[:, torch.argsort(perm)]
