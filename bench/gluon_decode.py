"""The M-LRD decode loop of ``bench/decode_probe.py`` in Gluon, with the ``wgmma`` waits placed by hand.

Triton places a full wait after every tensor-core product of the decode loop, so the key rebuild, the
RoPE arithmetic, the scores, the softmax and ``P @ V`` run one after the other (``decode_probe.py``'s
``ahead`` forms). Gluon (``triton.experimental.gluon``) exposes the asynchronous ``wgmma`` and its
waits. This file holds the forms that led to the library's Gluon decode kernel
(``lrexport/kernels/gluon_latent.py``, the ``gluon_rings`` forms here):

- ``_gl_decode``: one ring of ``NS`` stages holding each tile's key latents, value latents and table rows
  (``cp.async``, masked at the split's end), with every product waited for at once (as Triton does) or,
  with ``OVERLAP``, overlapped as the library's kernel does: the scores of tile ``i``, then the next
  tile's rebuild, the softmax while it runs, ``P @ V`` and the next tile's RoPE while that runs;
- the library's kernel: two rings, key latents and table rows copied two tiles ahead and value latents
  one, so that the rebuild issued early never waits on a copy issued just before it.

Shape rules: float16, head dim 128, rank 64 (M-LRD at 50%), at most 16 query heads per KV head.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from lrexport.kernels import gluon_latent as glk
from lrexport.kernels.gluon_latent import (
    _barrier,
    issue_keys,
    issue_values,
    loop_state,
    operands,
    rope,
    softmax_step,
    store_partials,
)


@gluon.jit
def _gl_decode(Q, CK, CV, KUP, COS, SIN, ACC, MAX, SUM, L, split_len, lcap, qk_scale,
               HKV: gl.constexpr, D: gl.constexpr, R: gl.constexpr, NREP: gl.constexpr, M: gl.constexpr,
               BLOCK_N: gl.constexpr, NS: gl.constexpr, OVERLAP: gl.constexpr):
    HALF: gl.constexpr = D // 2
    blk: gl.constexpr = glk.BLK  # the library kernel's layouts (64-position tiles, rank 64, D = 128, 16 rows)
    mma_k: gl.constexpr = glk.MMA_K
    mma_s: gl.constexpr = glk.MMA_S
    a_s: gl.constexpr = glk.A_S
    tile_sl: gl.constexpr = glk.TILE_SL
    p_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, M], gl.float16)

    pid_bj = gl.program_id(0)
    sp = gl.program_id(1)
    nsplit = gl.num_programs(1)
    b = (pid_bj // HKV).to(gl.int64)
    j = pid_bj % HKV
    base = b * lcap * (HKV * R) + j * R  # caches [B, lcap, HKV * R], contiguous

    q1_s, q2_s, u1_s, u2_s = operands(Q + (b * HKV + j) * NREP * D, KUP, COS, SIN, L - 1, qk_scale, j, D, R, NREP,
                                      M, blk)
    lat_s = gl.allocate_shared_memory(gl.float16, [NS, BLOCK_N, R], tile_sl)
    v_s = gl.allocate_shared_memory(gl.float16, [NS, BLOCK_N, R], tile_sl)
    c_s = gl.allocate_shared_memory(gl.float16, [NS, BLOCK_N, HALF], tile_sl)
    s_s = gl.allocate_shared_memory(gl.float16, [NS, BLOCK_N, HALF], tile_sl)
    p_s = gl.allocate_shared_memory(gl.float16, [BLOCK_N, M], p_sl)
    fence_async_shared()
    _barrier()

    start = sp * split_len
    end = gl.minimum(L, start + split_len)
    for i in gl.static_range(NS - 1):  # one copy group per tile: its key latents, table rows and value latents
        issue_keys(CK, HKV * R, COS, SIN, lat_s, c_s, s_s, base, start + i * BLOCK_N, end, i, R, HALF, BLOCK_N, blk,
                   False)
        issue_values(CV, HKV * R, v_s, base, start + i * BLOCK_N, end, i, R, BLOCK_N, blk)

    zk, zs, m_i, l_t, acc, rows, pos = loop_state(BLOCK_N, HALF, M, R, mma_k, mma_s)

    # the first tile's keys, rebuilt and RoPE'd before the loop
    async_copy.wait_group(NS - 2)
    fence_async_shared()
    _barrier()
    k1 = warpgroup_mma(lat_s.index(0), u1_s, zk, use_acc=False)
    k2 = warpgroup_mma(lat_s.index(0), u2_s, zk, use_acc=False)
    a1, a2 = rope(k1, k2, c_s.index(0), s_s.index(0), mma_k, a_s, False)

    for it in range(0, gl.cdiv(end - start, BLOCK_N)):
        st = it % NS
        nx = (it + 1) % NS
        # the stage of tile it - 1 is free (its products were waited for): start tile it + NS - 1 there
        n_new = start + (it + NS - 1) * BLOCK_N
        issue_keys(CK, HKV * R, COS, SIN, lat_s, c_s, s_s, base, n_new, end, (it + NS - 1) % NS, R, HALF, BLOCK_N,
                   blk, False)
        issue_values(CV, HKV * R, v_s, base, n_new, end, (it + NS - 1) % NS, R, BLOCK_N, blk)
        if OVERLAP:
            s_tok = warpgroup_mma(a1, q1_s.permute((1, 0)), zs, use_acc=False, is_async=True)
            s_tok = warpgroup_mma(a2, q2_s.permute((1, 0)), s_tok, is_async=True)
            async_copy.wait_group(NS - 2)  # tile it + 1 is in shared memory
            fence_async_shared()
            _barrier()
            k1_tok = warpgroup_mma(lat_s.index(nx), u1_s, zk, use_acc=False, is_async=True)
            k2_tok = warpgroup_mma(lat_s.index(nx), u2_s, zk, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=2, deps=(s_tok, ))
        else:
            s = warpgroup_mma(a1, q1_s.permute((1, 0)), zs, use_acc=False)
            s = warpgroup_mma(a2, q2_s.permute((1, 0)), s)
        ok = ((start + it * BLOCK_N + pos) < end)[:, None] & (rows < NREP)[None, :]
        p, m_i, l_t, acc = softmax_step(gl.where(ok, s, float("-inf")), m_i, l_t, acc)
        p_s.store(p.to(gl.float16))
        fence_async_shared()
        _barrier()
        if OVERLAP:
            pv_tok = warpgroup_mma(v_s.index(st).permute((1, 0)), p_s, acc, is_async=True)
            k1, k2 = warpgroup_mma_wait(num_outstanding=1, deps=(k1_tok, k2_tok))
        else:
            acc = warpgroup_mma(v_s.index(st).permute((1, 0)), p_s, acc)
            async_copy.wait_group(NS - 2)
            fence_async_shared()
            _barrier()
            k1 = warpgroup_mma(lat_s.index(nx), u1_s, zk, use_acc=False)
            k2 = warpgroup_mma(lat_s.index(nx), u2_s, zk, use_acc=False)
        a1, a2 = rope(k1, k2, c_s.index(nx), s_s.index(nx), mma_k, a_s, False)
        if OVERLAP:
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(pv_tok, ))
        _barrier()
    async_copy.wait_group(0)
    store_partials(ACC, MAX, SUM, m_i, l_t, acc, rows, (b * HKV + j) * NREP, sp, nsplit, NREP, R, mma_s)


def gluon_partials(q, ck, cv, kup, cos, sin, L, nsplit, overlap=True, block_n=64, num_stages=3, rings=False,
                   rope16=False):
    """Per-split partials (acc [B, Hq, splits, R], max and sum [B, Hq, splits]) over the first ``L`` positions, in
    the layout of the library's split combine (``triton_latent._combine``). ``rings``: the library's kernel."""
    B, Hq, D = q.shape
    Hkv, R, _ = kup.shape
    nrep = Hq // Hkv
    if D != 128 or R != 64 or nrep > 16 or q.dtype != torch.float16:
        raise ValueError(f"gluon_partials: float16, head dim 128, rank 64, at most 16 query heads per KV head; got "
                         f"{q.dtype}, D={D}, R={R}, {nrep} query heads per KV head")
    split_len = triton.cdiv(triton.cdiv(L, nsplit), block_n) * block_n
    nsplit = triton.cdiv(L, split_len)
    acc = torch.empty(B, Hq, nsplit, R, device=q.device, dtype=torch.float32)
    mx = torch.empty(B, Hq, nsplit, device=q.device, dtype=torch.float32)
    sm = torch.empty_like(mx)
    if rings:
        past = torch.full((B,), L - 1, dtype=torch.int32, device=q.device)
        glk.decode_partials(q.view(B, 1, Hq * D), ck, cv, kup, cos, sin, past, acc, mx, sm, num_kv_heads=Hkv,
                            nrep=nrep, num_splits=nsplit, split_len=split_len,
                            qk_scale=D ** -0.5 * 1.4426950408889634, rope16=rope16)
    else:
        _gl_decode[(B * Hkv, nsplit)](q, ck, cv, kup, cos, sin, acc, mx, sm, L, split_len, ck.shape[1],
                                      D ** -0.5 * 1.4426950408889634, HKV=Hkv, D=D, R=R, NREP=nrep, M=16,
                                      BLOCK_N=block_n, NS=num_stages, OVERLAP=overlap, num_warps=4)
    return acc, mx, sm


def compile_report(arch: int = 90) -> dict:
    """Compile each form for ``arch`` without a GPU (Llama-3-8B shapes: 8 KV heads, 4 query heads each) and
    report its shared memory, its ``cp.async`` copies and the ``wgmma`` waits in its code, in order: the
    overlapped forms wait for fewer than all outstanding products (``num_outstanding`` 2, then 1)."""
    import re

    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    tile = dict(HKV=8, D=128, R=64, NREP=4, M=16)
    rings = dict(TABLE_STAGES=2, SCK_P=0, SCV_P=0)  # the two rings as they were first: table rows with the keys
    forms = {"sync": (_gl_decode, dict(tile, BLOCK_N=64, NS=3, OVERLAP=False)),
             "overlap": (_gl_decode, dict(tile, BLOCK_N=64, NS=3, OVERLAP=True)),
             "rings": (glk._latent_attn_gluon, dict(tile, BLOCK=64, ROPE16=False, ROW_SPLITS=False, REL=False,
                                                       RANK_K=64, RANK_V=64, RV_P=64, LAZY=False, **rings)),
             "rings16": (glk._latent_attn_gluon, dict(tile, BLOCK=64, ROPE16=True, ROW_SPLITS=False, REL=False,
                                                         RANK_K=64, RANK_V=64, RV_P=64, LAZY=False, **rings))}
    out = {}
    for name, (fn, const) in forms.items():
        pointers = {n: "*fp16" for n in ("Q", "CK", "CV", "KUP", "COS", "SIN", "PK", "PV", "KBIAS", "OUT")}
        pointers |= {"ACC": "*fp32", "MAX": "*fp32", "SUM": "*fp32", "PAST": "*i32"}
        sig = {n: "constexpr" if n in const else pointers.get(n, "fp32" if n == "qk_scale" else "i32")
               for n in fn.arg_names}
        # pointers and strides divisible by 16, as the JIT specializes them at run time (cache rows of 64 channels)
        strides = ("sq_b", "sck_b", "sck_p", "scv_b", "scv_p", "split_len")
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in (*pointers, *strides)
                 if n in fn.arg_names}
        k = triton.compile(GluonASTSource(fn, sig, constexprs=const, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                           options=dict(num_warps=4))
        ptx = k.asm["ptx"]
        out[name] = dict(shared=k.metadata.shared, cp_async=len(re.findall(r"cp\.async\.c[ag]\.", ptx)),
                         wgmma=ptx.count("wgmma.mma_async"),
                         waits=[int(w) for w in re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx)])
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(compile_report()))
