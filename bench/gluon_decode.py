"""The M-LRD decode loop of ``bench/decode_probe.py`` in Gluon, with the ``wgmma`` waits placed by hand.

Triton places a full wait after every tensor-core product of the decode loop, so the key rebuild, the
RoPE arithmetic, the scores, the softmax and ``P @ V`` run one after the other (``decode_probe.py``'s
``ahead`` forms). Gluon (``triton.experimental.gluon``) exposes the asynchronous ``wgmma`` and its
waits, so this kernel can overlap them (``OVERLAP``), FlashAttention-3 style, within one warp group:

1. the scores of tile ``i`` are issued, then the next tile's key rebuild;
2. the softmax of tile ``i`` runs on the CUDA cores while the rebuild runs (wait for the scores only);
3. ``P @ V`` of tile ``i`` is issued, then the next tile's RoPE runs while it does (wait for the rebuild
   only);
4. the loop waits for ``P @ V`` before the next tile rescales the accumulator.

Without ``OVERLAP`` every product is waited for at once, as Triton does. The latent, value and table
tiles are copied asynchronously into a ring of ``NS`` stages (``cp.async``, masked at the split's end).

Shape rules: float16, head dim 128, rank 64 (M-LRD at 50%), at most 16 query heads per KV head.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

# Gluon's API as of Triton 3.6 (the H200's), with the names later versions gave it: a barrier across the block's
# threads (``thread_barrier``, later ``barrier``) and the masked global-to-shared copy (later ``async_load``)
_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier
_copy = async_copy.async_load if hasattr(async_copy, "async_load") else async_copy.async_copy_global_to_shared


@gluon.jit
def _issue(CK, CV, COS, SIN, lat_s, v_s, c_s, s_s, n0, end, b, j, lcap, st,
           HKV: gl.constexpr, R: gl.constexpr, HALF: gl.constexpr, BLOCK_N: gl.constexpr, blk: gl.constexpr):
    """Start the asynchronous copies of the tile at ``n0`` into stage ``st`` (rows past ``end`` zero-filled)."""
    offs = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, blk))
    m = (offs < end)[:, None]
    cr = gl.arange(0, R, layout=gl.SliceLayout(0, blk))
    ch = gl.arange(0, HALF, layout=gl.SliceLayout(0, blk))
    row = (b * lcap + offs.to(gl.int64)) * (HKV * R) + j * R
    _copy(lat_s.index(st), CK + row[:, None] + cr[None, :], mask=m)
    _copy(v_s.index(st), CV + row[:, None] + cr[None, :], mask=m)
    trow = offs.to(gl.int64) * HALF
    _copy(c_s.index(st), COS + trow[:, None] + ch[None, :], mask=m)
    _copy(s_s.index(st), SIN + trow[:, None] + ch[None, :], mask=m)
    async_copy.commit_group()


@gluon.jit
def _operands(Q, KUP, COS, SIN, L, qk_scale, b, j, HKV: gl.constexpr, D: gl.constexpr, R: gl.constexpr,
              NREP: gl.constexpr, M: gl.constexpr, blk: gl.constexpr):
    """The queries of KV head ``j`` RoPE'd at the last position, pre-scaled for exp2, and ``k_up``'s two halves,
    in shared memory as the products' right-hand operands: (q1, q2, u1, u2)."""
    HALF: gl.constexpr = D // 2
    q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([M, HALF], gl.float16)
    u_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([R, HALF], gl.float16)
    r = gl.arange(0, M, layout=gl.SliceLayout(1, blk))
    dq = gl.arange(0, HALF, layout=gl.SliceLayout(0, blk))
    rvalid = r < NREP
    qrow = Q + (b * HKV * NREP + j * NREP + r) * D
    q1 = gl.load(qrow[:, None] + dq[None, :], mask=rvalid[:, None], other=0.0).to(gl.float32)
    q2 = gl.load(qrow[:, None] + HALF + dq[None, :], mask=rvalid[:, None], other=0.0).to(gl.float32)
    qc = gl.load(COS + (L - 1) * HALF + dq).to(gl.float32)[None, :]
    qs = gl.load(SIN + (L - 1) * HALF + dq).to(gl.float32)[None, :]
    q1_s = gl.allocate_shared_memory(gl.float16, [M, HALF], q_sl, ((q1 * qc - q2 * qs) * qk_scale).to(gl.float16))
    q2_s = gl.allocate_shared_memory(gl.float16, [M, HALF], q_sl, ((q2 * qc + q1 * qs) * qk_scale).to(gl.float16))
    ru = gl.arange(0, R, layout=gl.SliceLayout(1, blk))
    urow = KUP + (j * R + ru) * D
    u1_s = gl.allocate_shared_memory(gl.float16, [R, HALF], u_sl, gl.load(urow[:, None] + dq[None, :]))
    u2_s = gl.allocate_shared_memory(gl.float16, [R, HALF], u_sl, gl.load(urow[:, None] + HALF + dq[None, :]))
    return q1_s, q2_s, u1_s, u2_s


@gluon.jit
def _softmax_step(s, m_i, l_t, acc):
    """One tile of the online softmax in base 2 (masked scores ``s`` [positions, rows]): the probabilities, the
    running maximum, the per-position sums and the accumulator rescaled to the new maximum."""
    m_new = gl.maximum(m_i, gl.max(s, 0))
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_safe)
    p = gl.exp2(s - m_safe[None, :])
    return p, m_new, l_t * alpha[None, :] + p, acc * alpha[None, :]


@gluon.jit
def _store_partials(ACC, MAX, SUM, m_i, l_t, acc, rows, b, j, sp, nsplit, HKV: gl.constexpr, NREP: gl.constexpr,
                    R: gl.constexpr, mma_s: gl.constexpr):
    """This split's maximum, sum and accumulator per query row, for the library's combine kernel."""
    part = (b * HKV * NREP + j * NREP + rows) * nsplit + sp
    rv = rows < NREP
    gl.store(MAX + part, m_i, mask=rv)
    gl.store(SUM + part, gl.sum(l_t, 0), mask=rv)
    rr = gl.arange(0, R, layout=gl.SliceLayout(1, mma_s))
    gl.store(ACC + part[None, :] * R + rr[:, None], acc, mask=rv[None, :])


@gluon.jit
def _gl_decode(Q, CK, CV, KUP, COS, SIN, ACC, MAX, SUM, L, split_len, lcap, qk_scale,
               HKV: gl.constexpr, D: gl.constexpr, R: gl.constexpr, NREP: gl.constexpr, M: gl.constexpr,
               BLOCK_N: gl.constexpr, NS: gl.constexpr, OVERLAP: gl.constexpr):
    HALF: gl.constexpr = D // 2
    blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    mma_k: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HALF, 16])
    mma_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, M, 16])
    a_s: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_s, k_width=2)
    tile_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, R], gl.float16)
    tab_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HALF], gl.float16)
    p_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, M], gl.float16)

    pid_bj = gl.program_id(0)
    sp = gl.program_id(1)
    nsplit = gl.num_programs(1)
    b = (pid_bj // HKV).to(gl.int64)
    j = pid_bj % HKV

    # queries RoPE'd at the last position and pre-scaled for exp2; k_up halves: both on chip for the loop
    q1_s, q2_s, u1_s, u2_s = _operands(Q, KUP, COS, SIN, L, qk_scale, b, j, HKV, D, R, NREP, M, blk)
    lat_s = gl.allocate_shared_memory(gl.float16, [NS, BLOCK_N, R], tile_sl)
    v_s = gl.allocate_shared_memory(gl.float16, [NS, BLOCK_N, R], tile_sl)
    c_s = gl.allocate_shared_memory(gl.float16, [NS, BLOCK_N, HALF], tab_sl)
    s_s = gl.allocate_shared_memory(gl.float16, [NS, BLOCK_N, HALF], tab_sl)
    p_s = gl.allocate_shared_memory(gl.float16, [BLOCK_N, M], p_sl)
    fence_async_shared()
    _barrier()

    start = sp * split_len
    end = gl.minimum(L, start + split_len)
    n_tiles = gl.cdiv(end - start, BLOCK_N)
    for i in gl.static_range(NS - 1):
        _issue(CK, CV, COS, SIN, lat_s, v_s, c_s, s_s, start + i * BLOCK_N, end, b, j, lcap, i,
               HKV, R, HALF, BLOCK_N, blk)

    zk = gl.zeros([BLOCK_N, HALF], gl.float32, mma_k)
    zs = gl.zeros([BLOCK_N, M], gl.float32, mma_s)
    m_i = gl.full([M], float("-inf"), gl.float32, gl.SliceLayout(0, mma_s))
    l_t = gl.zeros([BLOCK_N, M], gl.float32, mma_s)
    acc = gl.zeros([R, M], gl.float32, mma_s)
    rows = gl.arange(0, M, layout=gl.SliceLayout(0, mma_s))
    pos = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma_s))

    # the first tile's keys, rebuilt and RoPE'd before the loop
    async_copy.wait_group(NS - 2)
    fence_async_shared()
    _barrier()
    k1 = warpgroup_mma(lat_s.index(0), u1_s, zk, use_acc=False)
    k2 = warpgroup_mma(lat_s.index(0), u2_s, zk, use_acc=False)
    kc = c_s.index(0).load(mma_k).to(gl.float32)
    ks = s_s.index(0).load(mma_k).to(gl.float32)
    a1 = gl.convert_layout((k1 * kc - k2 * ks).to(gl.float16), a_s)
    a2 = gl.convert_layout((k2 * kc + k1 * ks).to(gl.float16), a_s)

    for it in range(0, n_tiles):
        st = it % NS
        nx = (it + 1) % NS
        # the stage of tile it - 1 is free (its products were waited for): start tile it + NS - 1 there
        _issue(CK, CV, COS, SIN, lat_s, v_s, c_s, s_s, start + (it + NS - 1) * BLOCK_N, end, b, j, lcap,
               (it + NS - 1) % NS, HKV, R, HALF, BLOCK_N, blk)
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
        p, m_i, l_t, acc = _softmax_step(gl.where(ok, s, float("-inf")), m_i, l_t, acc)
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
        kc = c_s.index(nx).load(mma_k).to(gl.float32)
        ks = s_s.index(nx).load(mma_k).to(gl.float32)
        a1 = gl.convert_layout((k1 * kc - k2 * ks).to(gl.float16), a_s)
        a2 = gl.convert_layout((k2 * kc + k1 * ks).to(gl.float16), a_s)
        if OVERLAP:
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(pv_tok, ))
        _barrier()
    async_copy.wait_group(0)

    _store_partials(ACC, MAX, SUM, m_i, l_t, acc, rows, b, j, sp, nsplit, HKV, NREP, R, mma_s)


@gluon.jit
def _issue_keys(CK, COS, SIN, lat_s, c_s, s_s, n0, end, b, j, lcap, st,
                HKV: gl.constexpr, R: gl.constexpr, HALF: gl.constexpr, BLOCK_N: gl.constexpr, blk: gl.constexpr):
    """Start the copies of a tile's key latents and table rows into stage ``st`` (one commit group)."""
    offs = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, blk))
    m = (offs < end)[:, None]
    cr = gl.arange(0, R, layout=gl.SliceLayout(0, blk))
    ch = gl.arange(0, HALF, layout=gl.SliceLayout(0, blk))
    row = (b * lcap + offs.to(gl.int64)) * (HKV * R) + j * R
    _copy(lat_s.index(st), CK + row[:, None] + cr[None, :], mask=m)
    trow = offs.to(gl.int64) * HALF
    _copy(c_s.index(st), COS + trow[:, None] + ch[None, :], mask=m)
    _copy(s_s.index(st), SIN + trow[:, None] + ch[None, :], mask=m)
    async_copy.commit_group()


@gluon.jit
def _issue_values(CV, v_s, n0, end, b, j, lcap, st,
                  HKV: gl.constexpr, R: gl.constexpr, BLOCK_N: gl.constexpr, blk: gl.constexpr):
    """Start the copy of a tile's value latents into stage ``st`` (one commit group)."""
    offs = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, blk))
    cr = gl.arange(0, R, layout=gl.SliceLayout(0, blk))
    row = (b * lcap + offs.to(gl.int64)) * (HKV * R) + j * R
    _copy(v_s.index(st), CV + row[:, None] + cr[None, :], mask=(offs < end)[:, None])
    async_copy.commit_group()


@gluon.jit
def _rope(k1, k2, c_smem, s_smem, mma_k: gl.constexpr, a_s: gl.constexpr, ROPE16: gl.constexpr):
    """The rebuilt key halves rotated by the tile's table rows, as the score product's register operands:
    in float32, or (``ROPE16``) rounded to float16 once and rotated in float16 (as Hugging Face's float16 RoPE)."""
    if ROPE16:
        kc = c_smem.load(mma_k)
        ks = s_smem.load(mma_k)
        h1 = k1.to(gl.float16)
        h2 = k2.to(gl.float16)
        return gl.convert_layout(h1 * kc - h2 * ks, a_s), gl.convert_layout(h2 * kc + h1 * ks, a_s)
    kc = c_smem.load(mma_k).to(gl.float32)
    ks = s_smem.load(mma_k).to(gl.float32)
    return (gl.convert_layout((k1 * kc - k2 * ks).to(gl.float16), a_s),
            gl.convert_layout((k2 * kc + k1 * ks).to(gl.float16), a_s))


@gluon.jit
def _gl_decode_rings(Q, CK, CV, KUP, COS, SIN, ACC, MAX, SUM, L, split_len, lcap, qk_scale,
                     HKV: gl.constexpr, D: gl.constexpr, R: gl.constexpr, NREP: gl.constexpr, M: gl.constexpr,
                     BLOCK_N: gl.constexpr, ROPE16: gl.constexpr):
    """The overlapped loop with two rings of two stages: key latents and table rows are copied two tiles ahead
    (their stage frees once the tile's keys are rebuilt and RoPE'd, an iteration early), value latents one tile
    ahead (their stage frees once ``P @ V`` is done). 86 KB of shared memory: two blocks per multiprocessor."""
    HALF: gl.constexpr = D // 2
    blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    mma_k: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HALF, 16])
    mma_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, M, 16])
    a_s: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_s, k_width=2)
    tile_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, R], gl.float16)
    tab_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HALF], gl.float16)
    p_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, M], gl.float16)

    pid_bj = gl.program_id(0)
    sp = gl.program_id(1)
    nsplit = gl.num_programs(1)
    b = (pid_bj // HKV).to(gl.int64)
    j = pid_bj % HKV

    q1_s, q2_s, u1_s, u2_s = _operands(Q, KUP, COS, SIN, L, qk_scale, b, j, HKV, D, R, NREP, M, blk)
    lat_s = gl.allocate_shared_memory(gl.float16, [2, BLOCK_N, R], tile_sl)
    v_s = gl.allocate_shared_memory(gl.float16, [2, BLOCK_N, R], tile_sl)
    c_s = gl.allocate_shared_memory(gl.float16, [2, BLOCK_N, HALF], tab_sl)
    s_s = gl.allocate_shared_memory(gl.float16, [2, BLOCK_N, HALF], tab_sl)
    p_s = gl.allocate_shared_memory(gl.float16, [BLOCK_N, M], p_sl)
    fence_async_shared()
    _barrier()

    start = sp * split_len
    end = gl.minimum(L, start + split_len)
    n_tiles = gl.cdiv(end - start, BLOCK_N)
    # commit groups, in order: K0, K1, V0, then per iteration it: K(it + 2), V(it + 1)
    _issue_keys(CK, COS, SIN, lat_s, c_s, s_s, start, end, b, j, lcap, 0, HKV, R, HALF, BLOCK_N, blk)
    _issue_keys(CK, COS, SIN, lat_s, c_s, s_s, start + BLOCK_N, end, b, j, lcap, 1, HKV, R, HALF, BLOCK_N, blk)
    _issue_values(CV, v_s, start, end, b, j, lcap, 0, HKV, R, BLOCK_N, blk)

    zk = gl.zeros([BLOCK_N, HALF], gl.float32, mma_k)
    zs = gl.zeros([BLOCK_N, M], gl.float32, mma_s)
    m_i = gl.full([M], float("-inf"), gl.float32, gl.SliceLayout(0, mma_s))
    l_t = gl.zeros([BLOCK_N, M], gl.float32, mma_s)
    acc = gl.zeros([R, M], gl.float32, mma_s)
    rows = gl.arange(0, M, layout=gl.SliceLayout(0, mma_s))
    pos = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma_s))

    async_copy.wait_group(2)  # K0
    fence_async_shared()
    _barrier()
    k1 = warpgroup_mma(lat_s.index(0), u1_s, zk, use_acc=False)
    k2 = warpgroup_mma(lat_s.index(0), u2_s, zk, use_acc=False)
    a1, a2 = _rope(k1, k2, c_s.index(0), s_s.index(0), mma_k, a_s, ROPE16)
    _barrier()

    for it in range(0, n_tiles):
        st = it % 2
        nx = (it + 1) % 2
        _issue_keys(CK, COS, SIN, lat_s, c_s, s_s, start + (it + 2) * BLOCK_N, end, b, j, lcap, st,
                    HKV, R, HALF, BLOCK_N, blk)
        _issue_values(CV, v_s, start + (it + 1) * BLOCK_N, end, b, j, lcap, nx, HKV, R, BLOCK_N, blk)
        s_tok = warpgroup_mma(a1, q1_s.permute((1, 0)), zs, use_acc=False, is_async=True)
        s_tok = warpgroup_mma(a2, q2_s.permute((1, 0)), s_tok, is_async=True)
        async_copy.wait_group(3)  # K(it + 1); V(it), K(it + 2), V(it + 1) may be in flight
        fence_async_shared()
        _barrier()
        k1_tok = warpgroup_mma(lat_s.index(nx), u1_s, zk, use_acc=False, is_async=True)
        k2_tok = warpgroup_mma(lat_s.index(nx), u2_s, zk, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=2, deps=(s_tok, ))
        ok = ((start + it * BLOCK_N + pos) < end)[:, None] & (rows < NREP)[None, :]
        p, m_i, l_t, acc = _softmax_step(gl.where(ok, s, float("-inf")), m_i, l_t, acc)
        p_s.store(p.to(gl.float16))
        async_copy.wait_group(2)  # V(it)
        fence_async_shared()
        _barrier()
        pv_tok = warpgroup_mma(v_s.index(st).permute((1, 0)), p_s, acc, is_async=True)
        k1, k2 = warpgroup_mma_wait(num_outstanding=1, deps=(k1_tok, k2_tok))
        a1, a2 = _rope(k1, k2, c_s.index(nx), s_s.index(nx), mma_k, a_s, ROPE16)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(pv_tok, ))
        _barrier()
    async_copy.wait_group(0)

    _store_partials(ACC, MAX, SUM, m_i, l_t, acc, rows, b, j, sp, nsplit, HKV, NREP, R, mma_s)


def gluon_partials(q, ck, cv, kup, cos, sin, L, nsplit, overlap=True, block_n=64, num_stages=3, rings=False,
                   rope16=False):
    """Per-split partials (acc [B, Hq, splits, R], max and sum [B, Hq, splits]) over the first ``L`` positions, in
    the layout of the library's split combine (``triton_latent._combine``)."""
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
    args = (q, ck, cv, kup, cos, sin, acc, mx, sm, L, split_len, ck.shape[1], D ** -0.5 * 1.4426950408889634)
    if rings:
        _gl_decode_rings[(B * Hkv, nsplit)](*args, HKV=Hkv, D=D, R=R, NREP=nrep, M=16, BLOCK_N=block_n,
                                            ROPE16=rope16, num_warps=4)
    else:
        _gl_decode[(B * Hkv, nsplit)](*args, HKV=Hkv, D=D, R=R, NREP=nrep, M=16, BLOCK_N=block_n, NS=num_stages,
                                      OVERLAP=overlap, num_warps=4)
    return acc, mx, sm


def compile_report(arch: int = 90) -> dict:
    """Compile each form for ``arch`` without a GPU (Llama-3-8B shapes: 8 KV heads, 4 query heads each) and
    report its shared memory, its ``cp.async`` copies and the ``wgmma`` waits in its code, in order: the
    overlapped forms wait for fewer than all outstanding products (``num_outstanding`` 2, then 1)."""
    import re

    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    forms = {"sync": (_gl_decode, dict(NS=3, OVERLAP=False)), "overlap": (_gl_decode, dict(NS=3, OVERLAP=True)),
             "rings": (_gl_decode_rings, dict(ROPE16=False)), "rings16": (_gl_decode_rings, dict(ROPE16=True))}
    pointers = {"Q": "*fp16", "CK": "*fp16", "CV": "*fp16", "KUP": "*fp16", "COS": "*fp16", "SIN": "*fp16",
                "ACC": "*fp32", "MAX": "*fp32", "SUM": "*fp32"}
    out = {}
    for name, (fn, extra) in forms.items():
        const = dict(HKV=8, D=128, R=64, NREP=4, M=16, BLOCK_N=64, **extra)
        sig = {n: "constexpr" if n in const else pointers.get(n, "fp32" if n == "qk_scale" else "i32")
               for n in fn.arg_names}
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in pointers}
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
