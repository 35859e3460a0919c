"""Fallback bodies, in standard ONNX ops, of lrexport's two attention operators.

Each exported model carries a model-local ``FunctionProto`` for every custom op it uses,
specialised to that model (head counts, group size, bits and which optional inputs exist
are the same in every layer of a model). ONNX Runtime runs the body when the custom-op
library is not registered, and the library's kernel when it is; both compute what the
PyTorch ops in :mod:`lrexport.trace.attention_op` and :mod:`lrexport.trace.latent_attention_op`
compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from lrexport.emit.builder import Builder
from lrexport.kv.quant import SEARCH_DENOM, SEARCH_STEPS, searches

DOMAIN = "lrexport"
DENSE_OP = "DenseAttention"
LOWRANK_OP = "LowRankKVAttention"
# the same op with past_len read in device memory by the CUDA kernel (exports for CUDA graphs)
LOWRANK_OP_DEVICE_LEN = "LowRankKVAttentionDeviceLen"
LOWRANK_OPS = (LOWRANK_OP, LOWRANK_OP_DEVICE_LEN)
LOWRANK_INPUTS = ["query", "latent_k", "latent_v", "past_k", "past_k_params", "past_v", "past_v_params", "past_len",
                  "k_up", "k_bias", "v_up", "cos", "sin"]
LOWRANK_OUTPUTS = ["output", "present_k", "present_k_params", "present_v", "present_v_params"]
ATTRS_DENSE = ["num_heads", "num_kv_heads", "window", "scale"]
ATTRS_LOWRANK = ["num_heads", "num_kv_heads", "group_size", "window", "scale", "bits", "quant_group"]


@dataclass(frozen=True)
class AttnShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    window: int
    scale: float
    group_size: int = 1
    bits: int = 0
    quant_group: int = 32
    has_k_bias: bool = False
    has_v_up: bool = True

    @property
    def groups(self) -> int:
        return self.num_kv_heads // self.group_size


# -- shared pieces ----------------------------------------------------------------
def _positions(b: Builder, past_len: str, S: str) -> str:
    """``past_len[:, None] + arange(S)`` -> [B, S] int64."""
    ar = b.op("Range", b.const(0), b.op("Squeeze", S, b.const([0])), b.const(1))
    return b.op("Add", b.unsqueeze(past_len, [1]), b.unsqueeze(ar, [0]))


def _rope(b: Builder, x_BSHD: str, cos: str, sin: str, pos_BS: str, D: int) -> str:
    c = b.op("CastLike", b.unsqueeze(b.op("Gather", cos, pos_BS), [2]), x_BSHD)
    s = b.op("CastLike", b.unsqueeze(b.op("Gather", sin, pos_BS), [2]), x_BSHD)
    x1, x2 = b.slice_last(x_BSHD, 0, D // 2), b.slice_last(x_BSHD, D // 2, D)
    lo = b.op("Sub", b.op("Mul", x1, c), b.op("Mul", x2, s))
    hi = b.op("Add", b.op("Mul", x2, c), b.op("Mul", x1, s))
    return b.op("Concat", lo, hi, axis=-1)


def _write(b: Builder, cache: str, new_BSK: str, pos_BS: str, B: str, S: str) -> str:
    """ScatterND of the new rows at (b, pos) into ``cache [B, P, K]``."""
    bidx = b.op("Range", b.const(0), b.op("Squeeze", B, b.const([0])), b.const(1))
    bidx = b.op("Expand", b.unsqueeze(bidx, [1]), b.op("Concat", B, S, axis=0))
    idx = b.op("Concat", b.unsqueeze(bidx, [2]), b.unsqueeze(pos_BS, [2]), axis=2)
    return b.op("ScatterND", cache, idx, b.op("CastLike", new_BSK, cache))


def _mask_bias(b: Builder, pos_BS: str, P: str, window: int, like: str) -> str:
    """Additive mask [B, 1, 1, S, P]: 0 where key j <= pos (and j > pos - window), else -inf."""
    j = b.op("Range", b.const(0), b.op("Squeeze", P, b.const([0])), b.const(1))
    j11P = b.unsqueeze(j, [0, 1])
    posBS1 = b.unsqueeze(pos_BS, [2])
    ok = b.op("LessOrEqual", j11P, posBS1)
    if window > 0:
        ok = b.op("And", ok, b.op("Greater", j11P, b.op("Sub", posBS1, b.const(window))))
    zero, ninf = b.const_like(0.0, like), b.const_like(float("-inf"), like)
    return b.unsqueeze(b.op("Where", ok, zero, ninf), [1, 2])


def _attend(b: Builder, q_BSHD: str, k_BPHD: str, v_BPHE: str, mask: str, sh: AttnShape, B: str, S: str) -> str:
    """GQA attention -> [B, S, Hq, E] (E: the value width)."""
    rep = sh.num_heads // sh.num_kv_heads
    q = b.transpose(b.reshape(q_BSHD, B, S, sh.num_kv_heads, rep, sh.head_dim), [0, 2, 3, 1, 4])
    k = b.unsqueeze(b.transpose(k_BPHD, [0, 2, 3, 1]), [2])  # [B, Hkv, 1, D, P]
    scores = b.op("Mul", b.op("MatMul", q, k), b.const_like(sh.scale, q_BSHD))
    p = b.op("Softmax", b.op("Add", scores, mask), axis=-1)
    v = b.unsqueeze(b.transpose(v_BPHE, [0, 2, 1, 3]), [2])  # [B, Hkv, 1, P, E]
    o = b.transpose(b.op("MatMul", p, v), [0, 3, 1, 2, 4])  # [B, S, Hkv, rep, E]
    return b.reshape(o, B, S, sh.num_heads, -1)


# -- dense attention (the uncompressed baseline, inlined into standard ops) ---------------
def dense_attention_function(sh: AttnShape, opset: int) -> onnx.FunctionProto:
    b = Builder("dense")
    q, k, v, kc, vc, past_len, cos, sin = "query", "key", "value", "past_key", "past_value", "past_len", "cos", "sin"
    B, S, P = b.dim(q, 0), b.dim(q, 1), b.dim(kc, 1)
    D, H, Hkv = sh.head_dim, sh.num_heads, sh.num_kv_heads
    pos = _positions(b, past_len, S)
    q_r = _rope(b, b.reshape(q, B, S, H, D), cos, sin, pos, D)
    k_r = _rope(b, b.reshape(k, B, S, Hkv, D), cos, sin, pos, D)
    kc2 = _write(b, kc, b.reshape(k_r, B, S, Hkv * D), pos, B, S)
    vc2 = _write(b, vc, v, pos, B, S)
    mask = _mask_bias(b, pos, P, sh.window, q)
    o = _attend(b, q_r, b.reshape(kc2, B, P, Hkv, D), b.reshape(vc2, B, P, Hkv, D), mask, sh, B, S)
    out = b.reshape(o, B, S, H * D)
    b.nodes += [onnx.helper.make_node("Identity", [out], ["output"]),
                onnx.helper.make_node("Identity", [kc2], ["present_key"]),
                onnx.helper.make_node("Identity", [vc2], ["present_value"])]
    return b.function(DOMAIN, DENSE_OP, [q, k, v, kc, vc, past_len, cos, sin],
                      ["output", "present_key", "present_value"], ATTRS_DENSE, opset,
                      "Causal GQA attention over fixed-capacity caches (see lrexport.trace.attention_op).")


# -- latent attention --------------------------------------------------------------
def _pack(b: Builder, codes: str, bits: int, B: str, S: str) -> str:
    """int64 codes [B, S, R] -> uint8 [B, S, R*bits/8] (lrexport.kv.quant.pack)."""
    if bits == 8:
        return b.op("Cast", codes, to=onnx.TensorProto.UINT8)
    if bits in (2, 4):
        per = 8 // bits
        w = b.const([1 << (bits * i) for i in range(per)])
        word = b.op("ReduceSum", b.op("Mul", b.reshape(codes, B, S, -1, per), w), b.const([-1]), keepdims=0)
        return b.op("Cast", word, to=onnx.TensorProto.UINT8)
    w = b.const([1 << (3 * i) for i in range(8)])
    word = b.op("ReduceSum", b.op("Mul", b.reshape(codes, B, S, -1, 8), w), b.const([-1]), keepdims=1)
    byts = b.op("Mod", b.op("Div", word, b.const([1, 256, 65536])), b.const([256]))
    return b.op("Cast", b.reshape(byts, B, S, -1), to=onnx.TensorProto.UINT8)


def _unpack(b: Builder, packed: str, bits: int, B: str, P: str) -> str:
    """uint8 [B, P, R*bits/8] -> int64 codes [B, P, R] (lrexport.kv.quant.unpack)."""
    x = b.op("Cast", packed, to=onnx.TensorProto.INT64)
    if bits == 8:
        return x
    if bits in (2, 4):
        per = 8 // bits
        sh = b.op("Div", b.unsqueeze(x, [3]), b.const([1 << (bits * i) for i in range(per)]))
        return b.reshape(b.op("Mod", sh, b.const([1 << bits])), B, P, -1)
    trip = b.reshape(x, B, P, -1, 3)
    word = b.op("ReduceSum", b.op("Mul", trip, b.const([1, 256, 65536])), b.const([-1]), keepdims=1)
    c = b.op("Mod", b.op("Div", word, b.const([1 << (3 * i) for i in range(8)])), b.const([8]))
    return b.reshape(c, B, P, -1)


def _searched_params(b: Builder, xg: str, lo: str, hi: str, qg: int, levels: int) -> tuple[str, str]:
    """float16 (scale, zero) ``[B, S, NG]`` of the least-error candidate range of each group, as
    ``lrexport.kv.quant._searched``: 256 candidates on a new axis, float64 errors of exact squares
    summed by halves, the first minimum (ArgMin keeps the first)."""
    cand = [(a, c) for a in range(SEARCH_STEPS) for c in range(SEARCH_STEPS)]
    f16, f32, f64 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE
    span = b.unsqueeze(b.op("Sub", hi, lo), [3])  # [B, S, NG, 1]
    lo4 = b.unsqueeze(lo, [3])
    inv = b.const(1.0 / SEARCH_DENOM, np.float32)
    num = b.op("Mul", b.op("Mul", span, b.const([SEARCH_DENOM - a - c + 0.0 for a, c in cand], np.float32)), inv)
    scale = b.op("Cast", b.op("Max", b.op("Div", num, b.const(float(levels), np.float32)),
                              b.const(1e-8, np.float32)), to=f16)  # [B, S, NG, 256]
    shifted = b.op("Add", lo4, b.op("Mul", b.op("Mul", span, b.const([float(a) for a, _ in cand], np.float32)), inv))
    zero = b.op("Cast", b.op("Where", b.const([a == 0 for a, _ in cand], np.bool_), lo4, shifted), to=f16)
    sf, zf = (b.unsqueeze(b.op("Cast", t, to=f32), [4]) for t in (scale, zero))  # [B, S, NG, 256, 1]
    t = b.op("Div", b.op("Sub", b.unsqueeze(xg, [3]), zf), sf)  # [B, S, NG, 256, qg]
    q = b.op("Clip", b.op("Round", t), b.const(0.0, np.float32), b.const(float(levels), np.float32))
    d = b.op("Sub", b.op("Cast", q, to=f64), b.op("Cast", t, to=f64))
    sq = b.op("Mul", d, d)  # exact in float64
    n = qg
    while n > 1:
        n //= 2
        sq = b.op("Add", b.slice_last(sq, 0, n), b.slice_last(sq, n, 2 * n))
    s64 = b.op("Cast", scale, to=f64)
    err = b.op("Mul", b.op("Squeeze", sq, b.const([-1])), b.op("Mul", s64, s64))
    err = b.op("Where", b.op("IsNaN", err), b.const(0.0, np.float64), err)  # all-NaN groups: the first
    idx = b.op("ArgMin", err, axis=-1, keepdims=1)
    pick = [b.op("Squeeze", b.op("GatherElements", v, idx, axis=-1), b.const([-1])) for v in (scale, zero)]
    return pick[0], pick[1]


def _store_latent(b: Builder, new: str, cache: str, params: str, pos: str, sh: AttnShape, B: str, S: str, P: str):
    """Write the new latents (quantized when bits) and return (cache', params', all latents as floats)."""
    if not sh.bits:
        c2 = _write(b, cache, new, pos, B, S)
        return c2, None, c2
    qg, levels = sh.quant_group, (1 << sh.bits) - 1
    xg = b.op("Cast", b.reshape(new, B, S, -1, qg), to=onnx.TensorProto.FLOAT)
    lo = b.op("ReduceMin", xg, b.const([-1]), keepdims=0)
    hi = b.op("ReduceMax", xg, b.const([-1]), keepdims=0)
    if searches(sh.bits, qg):
        scale, zero = _searched_params(b, xg, lo, hi, qg, levels)
    else:
        scale = b.op("Cast", b.op("Max", b.op("Div", b.op("Sub", hi, lo), b.const(float(levels), np.float32)),
                                  b.const(1e-8, np.float32)), to=onnx.TensorProto.FLOAT16)
        zero = b.op("Cast", lo, to=onnx.TensorProto.FLOAT16)
    sf, zf = (b.unsqueeze(b.op("Cast", t, to=onnx.TensorProto.FLOAT), [3]) for t in (scale, zero))
    q = b.op("Clip", b.op("Round", b.op("Div", b.op("Sub", xg, zf), sf)), b.const(0.0, np.float32),
             b.const(float(levels), np.float32))
    codes = _pack(b, b.reshape(b.op("Cast", q, to=onnx.TensorProto.INT64), B, S, -1), sh.bits, B, S)
    c2 = _write(b, cache, codes, pos, B, S)
    p2 = _write(b, params, b.op("Concat", scale, zero, axis=-1), pos, B, S)
    vals = b.op("Cast", _unpack(b, c2, sh.bits, B, P), to=onnx.TensorProto.FLOAT)
    sc, ze = b.op("Split", b.op("Cast", p2, to=onnx.TensorProto.FLOAT), axis=-1, num_outputs=2, outputs=2)
    deq = b.op("Add", b.op("Mul", b.reshape(vals, B, P, -1, qg), b.unsqueeze(sc, [3])), b.unsqueeze(ze, [3]))
    return c2, p2, b.reshape(deq, B, P, -1)


def lowrank_attention_function(sh: AttnShape, opset: int) -> onnx.FunctionProto:
    b = Builder("lrkv")
    (q, lk, lv, pk, pkp, pv, pvp, past_len, k_up, k_bias, v_up, cos, sin) = LOWRANK_INPUTS
    B, S, P = b.dim(q, 0), b.dim(q, 1), b.dim(pk, 1)
    D, H, Hkv, G, s = sh.head_dim, sh.num_heads, sh.num_kv_heads, sh.groups, sh.group_size
    pos = _positions(b, past_len, S)
    ck2, ckp2, lk_all = _store_latent(b, lk, pk, pkp, pos, sh, B, S, P)
    cv2, cvp2, lv_all = _store_latent(b, lv, pv, pvp, pos, sh, B, S, P)
    lk_all, lv_all = b.op("CastLike", lk_all, q), b.op("CastLike", lv_all, q)
    # keys of every cached position, rebuilt per group then RoPE'd at their positions
    k_BGPr = b.transpose(b.reshape(lk_all, B, P, G, -1), [0, 2, 1, 3])
    k_BGPE = b.op("MatMul", k_BGPr, k_up)
    k_BPHD = b.reshape(b.transpose(b.reshape(k_BGPE, B, G, P, s, D), [0, 2, 1, 3, 4]), B, P, Hkv, D)
    if sh.has_k_bias:
        k_BPHD = b.op("Add", k_BPHD, b.reshape(k_bias, Hkv, D))
    pos_all = b.op("Expand", b.unsqueeze(b.op("Range", b.const(0), b.op("Squeeze", P, b.const([0])), b.const(1)),
                                         [0]), b.op("Concat", B, P, axis=0))
    k_rot = _rope(b, k_BPHD, cos, sin, pos_all, D)
    q_rot = _rope(b, b.reshape(q, B, S, H, D), cos, sin, pos, D)
    # values stay in latent space: every KV head of group g reads group g's latent
    v_BPHr = b.reshape(b.op("Expand", b.reshape(lv_all, B, P, G, 1, -1),
                            b.op("Concat", B, P, b.const([G, s, 1]), axis=0)), B, P, Hkv, -1)
    o = _attend(b, q_rot, k_rot, v_BPHr, _mask_bias(b, pos, P, sh.window, q), sh, B, S)  # [B,S,Hq,rv]
    if sh.has_v_up:
        rep = H // Hkv
        up_GsrD = b.transpose(b.reshape(v_up, G, -1, s, D), [0, 2, 1, 3])
        up_HrD = b.op("Gather", b.reshape(up_GsrD, Hkv, -1, D), b.const([h // rep for h in range(H)]), axis=0)
        out = b.reshape(b.op("MatMul", b.unsqueeze(o, [3]), up_HrD), B, S, H * D)
    else:
        out = b.reshape(o, B, S, -1)
    empty = b.const(np.zeros(0, dtype=np.float16), np.float16)
    for src, dst in ((out, "output"), (ck2, "present_k"), (ckp2 or empty, "present_k_params"), (cv2, "present_v"),
                     (cvp2 or empty, "present_v_params")):
        b.nodes.append(onnx.helper.make_node("Identity", [src], [dst]))
    return b.function(DOMAIN, LOWRANK_OP, LOWRANK_INPUTS, LOWRANK_OUTPUTS, ATTRS_LOWRANK, opset,
                      "Attention over low-rank K/V latents (see docs/custom_op.md).")
