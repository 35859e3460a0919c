"""A Gluon decode kernel for ``LowRankKVAttention``: M-LRD, float16, with its tensor-core products overlapped.

Triton places a full wait after every ``wgmma`` of the decode loop of :mod:`triton_latent`, so the key rebuild,
the RoPE arithmetic, the scores, the softmax and ``P @ V`` of a tile run one after the other. Gluon
(``triton.experimental.gluon``) exposes the asynchronous ``wgmma`` and its waits, so one warp group here

1. issues the scores of tile ``i``, then the rebuild of tile ``i + 1``'s keys;
2. runs the softmax of tile ``i`` while the rebuild runs (waiting for the scores only);
3. issues ``P @ V`` of tile ``i`` and RoPEs tile ``i + 1``'s keys while it runs (waiting for the rebuild only);
4. waits for ``P @ V`` before the next tile rescales the accumulator.

Key latents are copied (``cp.async``, masked at the split's end) two tiles ahead into a ring of two stages, since
their stage frees once a tile's keys are rebuilt; value latents and RoPE table rows one tile ahead (the table rows
into one stage: :data:`TABLE_STAGES`). The caches' strides are compiled in (:data:`CONST_STRIDES`). At ranks up to
64 with query rows padded to 8: 68736 bytes of shared memory and about 150 registers, three blocks per
multiprocessor on sm_90, and the split rule plans as many programs per multiprocessor (:func:`resident_blocks`).
The keys' RoPE runs in float16, the key halves rounded once, as Hugging Face's float16 RoPE. On an H200, with two
stages of table rows and the strides at run time, it took 0.86-0.93x the Triton kernel's time for M-LRD at 50% and
64K tokens, query rows padded to 8 (bench/results/gpu_kernels_gluon.md); one table stage and constant strides took
about 0.88-0.99x of that again (the products of the two changes' ratios, measured in two runs:
gpu_kernels_gluon_tables.md, gpu_kernels_gluon_strides.md).

Shape rules (:func:`supported`): one new token per row, float16, float latents, per-head latents (M-LRD), head dim
128, key and value ranks of 16 to 128 in steps of 16, at most 16 query heads per KV head, no key bias, no window,
compute capability 9.0. On an H200 it was timed faster than the Triton kernel at every rank it takes, so decode
steps run it wherever it applies (:func:`preferred`). Everything else runs the Triton kernel.
"""

from __future__ import annotations

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait
except Exception:  # noqa: BLE001 - no triton, or one without Gluon: the Triton kernel serves every shape
    gluon = None

# why the kernel could not run in this process (None: it can), set by :func:`fail`
failure: str | None = None


def fail(err: BaseException) -> None:
    """Record that the kernel failed to build or launch here (Gluon is an experimental Triton API, and another
    Triton version may not take this code), warn once, and leave its decode steps to the Triton kernel."""
    global failure
    if failure is None:
        import logging

        failure = f"{type(err).__name__}: {str(err)[:300]}"
        logging.getLogger(__name__).warning("the Gluon decode kernel failed (%s); decode steps run the Triton kernel",
                                            failure)


# rows of a tile, the channels of a latent tile (ranks up to 64 take one, up to 128 one and a tail), the only head
# dim the kernel takes and its query-row padding
BLOCK_N = 64
RANK = 64
HEAD_DIM = 128
ROWS = 16

# the ranks per head whose decode steps run the kernel by default: where it was timed faster than the Triton
# kernel on an H200, which is every rank it takes (M-LRD at 64K tokens, batch 1 and 8, Llama-2-7B and Llama-3-8B
# shapes: 1.11-1.38x at ranks 16, 32, 48, 96 and 128, bench/results/gpu_kernels_gluon_ranks.md; 1.47-1.73x at rank
# 80, bench/results/gpu_kernels_gluon_rank80.md; rank 64: bench/results/gpu_kernels_gluon.md)
DEFAULT_RANKS = tuple(range(16, 2 * RANK + 1, 16))

# query rows padded to 8 instead of 16 (the N of the score and P @ V products, wgmma n8) where a KV head has at most
# 8 query heads: half the softmax work on padding rows. Compiled for sm_90 with Triton 3.6 (Llama-3-8B shapes) the
# loop over tiles takes 401 instead of 435 instructions per warp, 164 instead of 184 registers and 85120 instead of
# 88320 bytes of shared memory (bench/results/kernel_loop_gluon_llama3-8b.md); on an H200 at 64K tokens 349.5
# against 364.2 us at batch 8 with Llama-3-8B shapes, 1244.8 against 1292.4 with Llama-2-7B's
# (bench/results/gpu_kernels_gluon.md).
NARROW_ROWS = True

# RoPE by relative position: a score needs the query and key rotations only through their difference,
# R(qpos)q . R(n0 + t)k = R(qpos - n0)q . R(t)k, so the keys of every tile are rotated by the same table rows
# 0 .. BLOCK_N - 1 (copied into shared memory once) and the queries by one row per tile, instead of a table row
# copied per key. This needs the tables of rotary embeddings: row p = a * (cos(p * theta), sin(p * theta)) with the
# same theta and factor a for every row (Hugging Face's default, linear, dynamic, YaRN and Llama-3 RoPE all build
# them so); a table of any other form gives other scores. It frees the tables' pipeline stages (70784 instead of
# 85120 bytes of shared memory: three blocks per multiprocessor) and halves the bytes each tile reads, but the
# per-tile query rotation added 75 instructions per tile and warp (476 against 401) and a dependent load: on an H200
# at 64K tokens it took 379.3 against 357.7 us (Llama-3-8B shapes, batch 8) and 76.1 against 55.6 us (batch 1)
# (bench/results/gpu_kernels_gluon_rel.md). Off: the table reads are not what the kernel waits on. Since then the
# query rows stay in registers, pre-scaled, and each tile's table row is loaded a tile ahead: 441 instructions
# (177 registers, two blocks per multiprocessor), or 469 capped at 168 registers (no spills, three blocks); still
# 7-13% slower, and slower again with the third block (bench/results/gpu_kernels_gluon_rel2.md).
RELATIVE_ROPE = False

# the softmax maximum a tile late: probabilities are taken against the maximum of the tiles before (the reference
# the accumulators are kept in), and each warp's maximum of the tile goes to shared memory ahead of the barrier
# the value product waits at anyway. Only where a score exceeds the reference by more than LAZY_LIMIT (in base-2
# exponent: probabilities up to 2^15 fit float16), and at a row's first scores, does the tile take a new
# reference, rescale the accumulators and write its probabilities again. This replaces the cross-warp reduction
# of every tile (two barriers) with none in the common case. Exact: the reference cancels in the combine.
LAZY_MAX = False
LAZY_LIMIT = gl.constexpr(15.0) if gluon is not None else 15.0


# the stages of table rows: 2, each tile's rows copied with its key latents two tiles ahead; 1, one stage, each tile's
# rows copied a tile ahead (at the start of the iteration before the one that rotates its keys, waited for with the
# value latents). One stage frees 16 KB of shared memory: compiled for sm_90 with Triton 3.6 at rank 64 (Llama-3-8B
# shapes, query rows padded to 8) 68736 instead of 85120 bytes and 154 instead of 164 registers, so three blocks fit
# a multiprocessor instead of two, and 382 instead of 401 loop instructions. On an H200 at 64K tokens, with the split
# rule's programs per multiprocessor at the blocks that fit (resident_blocks): 306.0-307.6 against 331.7-331.9 us
# (Llama-3-8B shapes, batch 8), 157.6-157.7 against 170.6-172.3 us (Llama-2-7B, batch 1), 50.6-50.8 against
# 50.7-51.0 us (Llama-3-8B, batch 1); at rank 80 (two blocks either way) 0.93-0.97x the time
# (bench/results/gpu_kernels_gluon_tables.md).
TABLE_STAGES = 1

# the caches' position strides compiled in as constants (each model's caches have one layout), so that the rows of a
# tile's copies are constant offsets from one address instead of a 64-bit multiply-add each. Compiled for sm_90 with
# Triton 3.6: 338 instead of 382 loop instructions at rank 64 (Llama-3-8B shapes), 443 instead of 483 at rank 80. On
# an H200 at 64K tokens: 290.4-291.4 against 303.7-304.3 us (Llama-3-8B shapes, batch 8), 1155.8-1155.9 against
# 1193.2-1194.4 us (Llama-2-7B, batch 8); within 2.5% either way at batch 1 and at rank 80
# (bench/results/gpu_kernels_gluon_strides.md).
CONST_STRIDES = True

# shared memory per multiprocessor of compute capability 9.0 (CUDA programming guide), and the kernel's warps
SMEM_PER_SM = 233472
WARPS = 4


def blocks_per_sm(registers: int, shared: int, warps: int = WARPS, smem_per_sm: int = SMEM_PER_SM) -> int:
    """Blocks of ``warps`` warps that fit one multiprocessor: 64K registers (allocated per warp in units of 256),
    ``smem_per_sm`` bytes of shared memory with 1 KB reserved per block, at most 64 warps."""
    regs_per_warp = -(-registers * 32 // 256) * 256
    by_regs = 65536 // (regs_per_warp * warps) if registers else 64
    by_smem = smem_per_sm // (shared + 1024) if shared else 64
    return max(1, min(by_regs, by_smem, 64 // warps))


def query_rows(nrep: int, narrow: bool | None = None) -> int:
    """The query-row padding ``M`` of the kernel for ``nrep`` query heads per KV head: 8 with ``narrow`` (default
    :data:`NARROW_ROWS`) where they fit, else :data:`ROWS`."""
    return 8 if (NARROW_ROWS if narrow is None else narrow) and nrep <= 8 else ROWS

if gluon is not None:
    # the layouts of the kernels' tiles (four warps, one warp group): global loads, the key rebuild's accumulator
    # [positions, D / 2], the scores' and values' [positions or ranks, query rows] (for ROWS query rows; the decode
    # kernel builds them for its M), the keys as the score product's register operand, and the shared-memory tiles
    # of latents, table rows and probabilities
    BLK = gl.constexpr(gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0]))
    MMA_K = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                   instr_shape=[16, HEAD_DIM // 2, 16]))
    MMA_S = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, ROWS, 16]))
    A_S = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=MMA_S.value, k_width=2))
    TILE_SL = gl.constexpr(gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2))

    # Gluon's API as of Triton 3.6, with the names later versions gave it: a barrier across the block's threads
    # (``thread_barrier``, later ``barrier``) and the masked global-to-shared copy (later ``async_load``)
    _barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier
    _copy = async_copy.async_load if hasattr(async_copy, "async_load") else async_copy.async_copy_global_to_shared

    @gluon.jit
    def issue_keys(CK, sck_p, COS, SIN, lat_s, c_s, s_s, base, n0, end, st, R: gl.constexpr, HALF: gl.constexpr,
                   BLOCK: gl.constexpr, blk: gl.constexpr, COMMIT: gl.constexpr = True, TABLES: gl.constexpr = True,
                   LATENTS: gl.constexpr = True, RANK: gl.constexpr = 0):
        """Start the copies of the key latents (``CK + base + position * sck_p``; ``LATENTS``) and table rows
        (``TABLES``) of the tile at ``n0`` into stage ``st``; rows from ``end`` on are zero-filled, and with
        ``RANK`` < ``R`` the latents' channels from ``RANK`` on. ``COMMIT``: close the copy group."""
        offs = n0 + gl.arange(0, BLOCK, layout=gl.SliceLayout(1, blk))
        m = (offs < end)[:, None]
        if LATENTS:
            if RANK > 0 and RANK < R:
                copy_rows(lat_s.index(st), CK, base, sck_p, n0, end, 0, R, RANK, BLOCK, blk)
            else:
                cr = gl.arange(0, R, layout=gl.SliceLayout(0, blk))
                _copy(lat_s.index(st), CK + base + offs.to(gl.int64)[:, None] * sck_p + cr[None, :], mask=m)
        if TABLES:
            ch = gl.arange(0, HALF, layout=gl.SliceLayout(0, blk))
            trow = offs.to(gl.int64) * HALF
            _copy(c_s.index(st), COS + trow[:, None] + ch[None, :], mask=m)
            _copy(s_s.index(st), SIN + trow[:, None] + ch[None, :], mask=m)
        if COMMIT:
            async_copy.commit_group()

    @gluon.jit
    def copy_rows(dst, SRC, base, stride, n0, end, C0: gl.constexpr, W: gl.constexpr, RANK: gl.constexpr,
                  BLOCK: gl.constexpr, blk: gl.constexpr):
        """Start the copy of channels ``C0 .. C0 + W`` of the latents of the tile at ``n0`` (``SRC + base + position
        * stride``) into ``dst`` [BLOCK, W]; rows from ``end`` on and channels from ``RANK`` on are zero-filled."""
        offs = n0 + gl.arange(0, BLOCK, layout=gl.SliceLayout(1, blk))
        c = C0 + gl.arange(0, W, layout=gl.SliceLayout(0, blk))
        _copy(dst, SRC + base + offs.to(gl.int64)[:, None] * stride + c[None, :],
              mask=(offs < end)[:, None] & (c < RANK)[None, :])

    @gluon.jit
    def issue_values(CV, scv_p, v_s, base, n0, end, st, R: gl.constexpr, BLOCK: gl.constexpr, blk: gl.constexpr,
                     RANK: gl.constexpr = 0, COMMIT: gl.constexpr = True):
        """Start the copy of the value latents of the tile at ``n0`` into stage ``st`` (channels from ``RANK`` on
        zero-filled where ``RANK`` < ``R``) and (``COMMIT``) close the group."""
        if RANK > 0 and RANK < R:
            copy_rows(v_s.index(st), CV, base, scv_p, n0, end, 0, R, RANK, BLOCK, blk)
        else:
            offs = n0 + gl.arange(0, BLOCK, layout=gl.SliceLayout(1, blk))
            cr = gl.arange(0, R, layout=gl.SliceLayout(0, blk))
            _copy(v_s.index(st), CV + base + offs.to(gl.int64)[:, None] * scv_p + cr[None, :],
                  mask=(offs < end)[:, None])
        if COMMIT:
            async_copy.commit_group()

    @gluon.jit
    def query_halves(Q, D: gl.constexpr, NREP: gl.constexpr, M: gl.constexpr, blk: gl.constexpr):
        """The KV head's query rows (``Q`` at its first head; rows from ``NREP`` on zero) as float32 halves
        [M, D / 2]."""
        HALF: gl.constexpr = D // 2
        r = gl.arange(0, M, layout=gl.SliceLayout(1, blk))
        dq = gl.arange(0, HALF, layout=gl.SliceLayout(0, blk))
        rvalid = (r < NREP)[:, None]
        q1 = gl.load(Q + r[:, None] * D + dq[None, :], mask=rvalid, other=0.0).to(gl.float32)
        q2 = gl.load(Q + r[:, None] * D + HALF + dq[None, :], mask=rvalid, other=0.0).to(gl.float32)
        return q1, q2

    @gluon.jit
    def table_row(COS, SIN, ang, HALF: gl.constexpr, blk: gl.constexpr):
        """Row ``ang`` of the RoPE tables, as stored, [1, D / 2] each."""
        dq = gl.arange(0, HALF, layout=gl.SliceLayout(0, blk))
        return gl.load(COS + ang * HALF + dq)[None, :], gl.load(SIN + ang * HALF + dq)[None, :]

    @gluon.jit
    def rotated(q1, q2, qc, qs, qk_scale):
        """Query halves (float32) RoPE'd by a table row and scaled by ``qk_scale``, as float16."""
        c = qc.to(gl.float32)
        s = qs.to(gl.float32)
        return ((q1 * c - q2 * s) * qk_scale).to(gl.float16), ((q2 * c + q1 * s) * qk_scale).to(gl.float16)

    @gluon.jit
    def queries(Q, COS, SIN, ang, qk_scale, D: gl.constexpr, NREP: gl.constexpr, M: gl.constexpr,
                blk: gl.constexpr):
        """The KV head's query rows (``Q`` at its first head; rows from ``NREP`` on zero) RoPE'd by table row
        ``ang`` and pre-scaled for exp2, as float16 halves [M, D / 2]."""
        q1, q2 = query_halves(Q, D, NREP, M, blk)
        qc, qs = table_row(COS, SIN, ang, D // 2, blk)
        return rotated(q1, q2, qc, qs, qk_scale)

    @gluon.jit
    def up_operands(KUP, j, D: gl.constexpr, R: gl.constexpr, blk: gl.constexpr, RANK: gl.constexpr = 0,
                    R0: gl.constexpr = 0):
        """KV head ``j``'s ``k_up`` halves in shared memory, the key rebuild's right-hand operands: (u1, u2). With
        ``RANK`` (the head's rank; 0: ``R``), rows ``R0 .. R0 + R`` of the head's ``RANK``, those past it zero."""
        HALF: gl.constexpr = D // 2
        RH: gl.constexpr = RANK if RANK > 0 else R
        u_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([R, HALF], gl.float16)
        dq = gl.arange(0, HALF, layout=gl.SliceLayout(0, blk))
        r = R0 + gl.arange(0, R, layout=gl.SliceLayout(1, blk))
        urow = KUP + (j * RH + r) * D
        if RH < R0 + R:
            um = (r < RH)[:, None]
            u1 = gl.load(urow[:, None] + dq[None, :], mask=um, other=0.0)
            u2 = gl.load(urow[:, None] + HALF + dq[None, :], mask=um, other=0.0)
        else:
            u1 = gl.load(urow[:, None] + dq[None, :])
            u2 = gl.load(urow[:, None] + HALF + dq[None, :])
        u1_s = gl.allocate_shared_memory(gl.float16, [R, HALF], u_sl, u1)
        u2_s = gl.allocate_shared_memory(gl.float16, [R, HALF], u_sl, u2)
        return u1_s, u2_s

    @gluon.jit
    def operands(Q, KUP, COS, SIN, qpos, qk_scale, j, D: gl.constexpr, R: gl.constexpr, NREP: gl.constexpr,
                 M: gl.constexpr, blk: gl.constexpr):
        """KV head ``j``'s query rows (``Q`` at its first head) RoPE'd at ``qpos`` and pre-scaled for exp2, and its
        ``k_up`` halves, in shared memory as the products' right-hand operands: (q1, q2, u1, u2)."""
        HALF: gl.constexpr = D // 2
        q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([M, HALF], gl.float16)
        q1, q2 = queries(Q, COS, SIN, qpos, qk_scale, D, NREP, M, blk)
        q1_s = gl.allocate_shared_memory(gl.float16, [M, HALF], q_sl, q1)
        q2_s = gl.allocate_shared_memory(gl.float16, [M, HALF], q_sl, q2)
        u1_s, u2_s = up_operands(KUP, j, D, R, blk)
        return q1_s, q2_s, u1_s, u2_s

    @gluon.jit
    def rope(k1, k2, c_smem, s_smem, mma_k: gl.constexpr, a_s: gl.constexpr, ROPE16: gl.constexpr):
        """The rebuilt key halves rotated by the tile's table rows, as the score product's register operands: in
        float32, or (``ROPE16``) rounded to float16 once and rotated in float16."""
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
    def loop_state(BLOCK: gl.constexpr, HALF: gl.constexpr, M: gl.constexpr, R: gl.constexpr, mma_k: gl.constexpr,
                   mma_s: gl.constexpr):
        """The decode loop's starting state: zero accumulators of the key rebuild and the scores, the running
        maximum, the per-position sums, the value accumulator, and the query-row and position indices."""
        zk = gl.zeros([BLOCK, HALF], gl.float32, mma_k)
        zs = gl.zeros([BLOCK, M], gl.float32, mma_s)
        m_i = gl.full([M], float("-inf"), gl.float32, gl.SliceLayout(0, mma_s))
        l_t = gl.zeros([BLOCK, M], gl.float32, mma_s)
        acc = gl.zeros([R, M], gl.float32, mma_s)
        rows = gl.arange(0, M, layout=gl.SliceLayout(0, mma_s))
        pos = gl.arange(0, BLOCK, layout=gl.SliceLayout(1, mma_s))
        return zk, zs, m_i, l_t, acc, rows, pos

    @gluon.jit
    def softmax_alpha(s, m_i, l_t):
        """One tile of the online softmax in base 2 (masked scores ``s`` [positions, rows]): the probabilities, the
        running maximum, the per-position sums, and the factor [rows] that rescales accumulators to the new
        maximum."""
        m_new = gl.maximum(m_i, gl.max(s, 0))
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_safe)
        p = gl.exp2(s - m_safe[None, :])
        return p, m_new, l_t * alpha[None, :] + p, alpha

    @gluon.jit
    def softmax_step(s, m_i, l_t, acc):
        """:func:`softmax_alpha`, with the accumulator rescaled: (probabilities, maximum, sums, accumulator)."""
        p, m_new, l_new, alpha = softmax_alpha(s, m_i, l_t)
        return p, m_new, l_new, acc * alpha[None, :]

    @gluon.jit
    def store_partials(ACC, MAX, SUM, m_i, l_t, acc, rows, row0, sp, nsplit, NREP: gl.constexpr, R: gl.constexpr,
                       mma_s: gl.constexpr, RP: gl.constexpr = 0):
        """This split's maximum, sum and accumulator for query rows ``row0 + rows`` (``[B, Hq]`` flattened), in
        the layout of :func:`triton_latent._combine` (accumulator rows of ``RP`` values; 0: ``R``)."""
        RS: gl.constexpr = RP if RP > 0 else R
        part = (row0 + rows) * nsplit + sp
        rv = rows < NREP
        gl.store(MAX + part, m_i, mask=rv)
        gl.store(SUM + part, gl.sum(l_t, 0), mask=rv)
        rr = gl.arange(0, R, layout=gl.SliceLayout(1, mma_s))
        if RS < R:  # value ranks below R: their rows of zeros are not stored
            gl.store(ACC + part[None, :] * RS + rr[:, None], acc, mask=rv[None, :] & (rr < RS)[:, None])
        else:
            gl.store(ACC + part[None, :] * RS + rr[:, None], acc, mask=rv[None, :])

    @gluon.jit
    def store_tail(ACC, acc_t, rows, row0, sp, nsplit, NREP: gl.constexpr, R: gl.constexpr, RP: gl.constexpr,
                   mma_s: gl.constexpr):
        """The value ranks ``R .. 2R`` of this split's accumulator (rows of ``RP`` values)."""
        part = (row0 + rows) * nsplit + sp
        rr = R + gl.arange(0, R, layout=gl.SliceLayout(1, mma_s))
        gl.store(ACC + part[None, :] * RP + rr[:, None], acc_t, mask=(rows < NREP)[None, :])

    @gluon.jit
    def _latent_attn_gluon(Q, sq_b, sq_s, CK, sck_b, sck_p, PK, spk_b, spk_p, CV, scv_b, scv_p, PV, spv_b, spv_p,
                           KUP, KBIAS, COS, SIN, PAST, OUT, so_b, so_s, ACC, MAX, SUM, split_len, nsplit, qk_scale,
                           RK, RV, HKV: gl.constexpr, D: gl.constexpr, R: gl.constexpr, NREP: gl.constexpr,
                           M: gl.constexpr, BLOCK: gl.constexpr, ROPE16: gl.constexpr,
                           ROW_SPLITS: gl.constexpr = False, REL: gl.constexpr = False,
                           RANK_K: gl.constexpr = 64, RANK_V: gl.constexpr = 64, RV_P: gl.constexpr = 64,
                           LAZY: gl.constexpr = False, TABLE_STAGES: gl.constexpr = 2, SCK_P: gl.constexpr = 0,
                           SCV_P: gl.constexpr = 0):
        # the run-time arguments of triton_latent._latent_attn_fwd (aot.ABI_ARGS), so that the ONNX Runtime
        # library's launcher of the ahead-of-time kernels launches this one as it is; the packed-latent parameters
        # (PK, PV and their strides), KBIAS, OUT and its strides, sq_s, RK and RV are not read (this kernel's
        # shapes have none, writes partials, takes one new token per row and its ranks as constants).
        # REL: RoPE by relative position (see RELATIVE_ROPE): the keys of every tile rotated by the table rows
        # 0 .. BLOCK - 1 (copied once), the queries by the row qpos - n0 of each tile at n0.
        # RANK_K, RANK_V: the key and value ranks per head, 16 to 128. Ranks up to R (64) take tiles of R channels
        # (those past the rank zero); larger ones a tile of R and a tail: keys a tail of 16, 32 or 64 channels (a
        # second product of the rebuild), values one of R channels (wgmma's M is 64: a second P @ V product).
        # RV_P: the accumulator rows' stride in ACC (triton_latent's RV_P: the value rank's power of two, >= 16).
        # LAZY: the softmax maximum a tile late (see LAZY_MAX).
        # TABLE_STAGES: 2, each tile's table rows copied with its key latents, two tiles ahead; 1, into one stage,
        # a tile ahead, once the tile before was rotated (see TABLE_STAGES).
        # SCK_P, SCV_P: the caches' position strides as constants (0: the run-time sck_p, scv_p), so that each
        # tile's rows are constant offsets from one address (see CONST_STRIDES).
        if SCK_P > 0:
            sck_p = SCK_P
        if SCV_P > 0:
            scv_p = SCV_P
        HALF: gl.constexpr = D // 2
        blk: gl.constexpr = BLK
        mma_k: gl.constexpr = MMA_K
        mma_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, M, 16])
        a_s: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_s, k_width=2)
        tile_sl: gl.constexpr = TILE_SL
        p_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK, M], gl.float16)
        q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([M, HALF], gl.float16)
        T1: gl.constexpr = TABLE_STAGES == 1 and not REL  # table rows copied a tile ahead, apart from the latents
        NT: gl.constexpr = 1 if REL or T1 else 2  # stages of table rows
        NQ: gl.constexpr = 2 if REL else 1  # buffers of query rows
        KT: gl.constexpr = 0 if RANK_K <= R else (16 if RANK_K <= R + 16 else (32 if RANK_K <= R + 32 else R))
        VT: gl.constexpr = 0 if RANK_V <= R else R
        KTC: gl.constexpr = KT // 8 if KT > 0 else 1  # threads of a warp across the key tail's channels
        kt_blk: gl.constexpr = gl.BlockedLayout([1, 8], [32 // KTC, KTC], [4, 1], [1, 0])
        kt_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK, 8 * KTC], gl.float16)
        NKG: gl.constexpr = 4 if KT > 0 else 2  # wgmma groups of a tile's key rebuild
        NVG: gl.constexpr = 2 if VT > 0 else 1  # of its P @ V

        pid_bj = gl.program_id(0)
        sp = gl.program_id(2)
        b = (pid_bj // HKV).to(gl.int64)
        j = pid_bj % HKV
        if ROW_SPLITS:  # LowRankKVAttentionDeviceLen: (past_len, split_len) per row, planned by the launcher
            qpos = gl.load(PAST + 2 * b).to(gl.int32)
            split_len = gl.load(PAST + 2 * b + 1)
        else:
            qpos = gl.load(PAST + b).to(gl.int32)  # the new token's position; keys 0 .. qpos
        start = sp * split_len
        end = gl.minimum(qpos + 1, start + split_len)
        base_k = b * sck_b + j * RANK_K
        base_v = b * scv_b + j * RANK_V
        Qj = Q + b * sq_b + j * NREP * D

        if REL:  # the query rows stay in registers; each tile's table row is loaded a tile ahead
            q1r, q2r = query_halves(Qj, D, NREP, M, blk)
            q1r = q1r * qk_scale  # pre-scaled once (RoPE is linear)
            q2r = q2r * qk_scale
            qc, qs = table_row(COS, SIN, gl.maximum(qpos - start, 0), HALF, blk)
            q_a, q_b = rotated(q1r, q2r, qc, qs, 1.0)
            qc, qs = table_row(COS, SIN, gl.maximum(qpos - start - BLOCK, 0), HALF, blk)
        else:
            q_a, q_b = queries(Qj, COS, SIN, qpos, qk_scale, D, NREP, M, blk)
        q1_s = gl.allocate_shared_memory(gl.float16, [NQ, M, HALF], q_sl)
        q2_s = gl.allocate_shared_memory(gl.float16, [NQ, M, HALF], q_sl)
        q1_s.index(0).store(q_a)
        q2_s.index(0).store(q_b)
        u1_s, u2_s = up_operands(KUP, j, D, R, blk, RANK_K)
        lat_s = gl.allocate_shared_memory(gl.float16, [2, BLOCK, R], tile_sl)
        v_s = gl.allocate_shared_memory(gl.float16, [2, BLOCK, R], tile_sl)
        c_s = gl.allocate_shared_memory(gl.float16, [NT, BLOCK, HALF], tile_sl)
        s_s = gl.allocate_shared_memory(gl.float16, [NT, BLOCK, HALF], tile_sl)
        p_s = gl.allocate_shared_memory(gl.float16, [BLOCK, M], p_sl)
        if LAZY:  # the four warps' maxima of a tile's scores
            red_s = gl.allocate_shared_memory(gl.float32, [4, M], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        if KT > 0:  # the keys' rank tail: its k_up rows and a ring of latent tiles
            u1_t, u2_t = up_operands(KUP, j, D, KT, blk, RANK_K, R)
            lat_t = gl.allocate_shared_memory(gl.float16, [2, BLOCK, KT], kt_sl)
        if VT > 0:  # the values' rank tail: a ring of latent tiles
            v_t = gl.allocate_shared_memory(gl.float16, [2, BLOCK, R], tile_sl)
        fence_async_shared()
        _barrier()

        # copy groups, in order: K0, K1, V0, then per iteration it: K(it + 2), V(it + 1); with T1, K0 takes tile 0's
        # table rows and each iteration starts with T(it + 1), the next tile's
        if REL:  # the offset rows 0 .. BLOCK - 1 (those past qpos zero-filled), with K0
            issue_keys(CK, sck_p, COS, SIN, lat_s, c_s, s_s, base_k, 0, qpos + 1, 0, R, HALF, BLOCK, blk, COMMIT=False,
                       LATENTS=False)
        for i in gl.static_range(2):
            issue_keys(CK, sck_p, COS, SIN, lat_s, c_s, s_s, base_k, start + i * BLOCK, end, i, R, HALF, BLOCK, blk,
                       COMMIT=KT == 0, TABLES=not REL and (i == 0 or not T1), RANK=RANK_K)
            if KT > 0:
                copy_rows(lat_t.index(i), CK, base_k, sck_p, start + i * BLOCK, end, R, KT, RANK_K, BLOCK, kt_blk)
                async_copy.commit_group()
        issue_values(CV, scv_p, v_s, base_v, start, end, 0, R, BLOCK, blk, RANK_V, COMMIT=VT == 0)
        if VT > 0:
            copy_rows(v_t.index(0), CV, base_v, scv_p, start, end, R, R, RANK_V, BLOCK, blk)
            async_copy.commit_group()

        zk, zs, m_i, l_t, acc, rows, pos = loop_state(BLOCK, HALF, M, R, mma_k, mma_s)
        if VT > 0:
            acc_t = gl.zeros([R, M], gl.float32, mma_s)

        async_copy.wait_group(2)  # K0
        fence_async_shared()
        _barrier()
        k1 = warpgroup_mma(lat_s.index(0), u1_s, zk, use_acc=False)
        k2 = warpgroup_mma(lat_s.index(0), u2_s, zk, use_acc=False)
        if KT > 0:
            k1 = warpgroup_mma(lat_t.index(0), u1_t, k1)
            k2 = warpgroup_mma(lat_t.index(0), u2_t, k2)
        a1, a2 = rope(k1, k2, c_s.index(0), s_s.index(0), mma_k, a_s, ROPE16)
        _barrier()

        for it in range(0, gl.cdiv(gl.maximum(end - start, 0), BLOCK)):
            st = it % 2
            nx = (it + 1) % 2
            if T1:  # the next tile's table rows, into the stage whose rows the last tile's RoPE read
                issue_keys(CK, sck_p, COS, SIN, lat_s, c_s, s_s, base_k, start + (it + 1) * BLOCK, end, 0, R, HALF,
                           BLOCK, blk, LATENTS=False)
            issue_keys(CK, sck_p, COS, SIN, lat_s, c_s, s_s, base_k, start + (it + 2) * BLOCK, end, st, R, HALF,
                       BLOCK, blk, COMMIT=KT == 0, TABLES=not REL and not T1, RANK=RANK_K)
            if KT > 0:
                copy_rows(lat_t.index(st), CK, base_k, sck_p, start + (it + 2) * BLOCK, end, R, KT, RANK_K, BLOCK,
                          kt_blk)
                async_copy.commit_group()
            issue_values(CV, scv_p, v_s, base_v, start + (it + 1) * BLOCK, end, nx, R, BLOCK, blk, RANK_V,
                         COMMIT=VT == 0)
            if VT > 0:
                copy_rows(v_t.index(nx), CV, base_v, scv_p, start + (it + 1) * BLOCK, end, R, R, RANK_V, BLOCK, blk)
                async_copy.commit_group()
            s_tok = warpgroup_mma(a1, q1_s.index(it % NQ).permute((1, 0)), zs, use_acc=False, is_async=True)
            s_tok = warpgroup_mma(a2, q2_s.index(it % NQ).permute((1, 0)), s_tok, is_async=True)
            if REL:  # the next tile's queries, into the buffer the scores of tile it - 1 read (waited for)
                q_a, q_b = rotated(q1r, q2r, qc, qs, 1.0)
                qc, qs = table_row(COS, SIN, gl.maximum(qpos - start - (it + 2) * BLOCK, 0), HALF, blk)
                q1_s.index(nx).store(q_a)
                q2_s.index(nx).store(q_b)
            async_copy.wait_group(4 if T1 else 3)  # K(it + 1); V(it), (T(it + 1),) K(it + 2), V(it + 1) in flight
            fence_async_shared()
            _barrier()
            k1_tok = warpgroup_mma(lat_s.index(nx), u1_s, zk, use_acc=False, is_async=True)
            if KT > 0:
                k1_tok = warpgroup_mma(lat_t.index(nx), u1_t, k1_tok, is_async=True)
            k2_tok = warpgroup_mma(lat_s.index(nx), u2_s, zk, use_acc=False, is_async=True)
            if KT > 0:
                k2_tok = warpgroup_mma(lat_t.index(nx), u2_t, k2_tok, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=NKG, deps=(s_tok, ))
            ok = ((start + it * BLOCK + pos) < end)[:, None] & (rows < NREP)[None, :]
            s = gl.where(ok, s, float("-inf"))
            if LAZY:  # probabilities against the maximum so far; this tile's, per warp, to shared memory
                red_s.store(gl.max(gl.reshape(s, [4, BLOCK // 4, M]), 1))
                m_safe = gl.where(m_i == float("-inf"), 0.0, m_i)
                p = gl.exp2(s - m_safe[None, :])
            else:
                p, m_i, l_t, alpha = softmax_alpha(s, m_i, l_t)
                acc = acc * alpha[None, :]
                if VT > 0:
                    acc_t = acc_t * alpha[None, :]
            p_s.store(p.to(gl.float16))
            async_copy.wait_group(2)  # V(it) (and T(it + 1))
            fence_async_shared()
            _barrier()
            if LAZY:  # the tile's maximum from the four warps' (after the barrier the products need anyway)
                m_tile = gl.max(red_s.load(mma_s), 0)
                grow = (m_tile > m_safe + LAZY_LIMIT) | ((m_i == float("-inf")) & (m_tile > float("-inf")))
                if gl.max(grow.to(gl.int32), 0) > 0:  # the same on every thread: a new reference, then again
                    m_new = gl.maximum(m_i, m_tile)
                    m_ns = gl.where(m_new == float("-inf"), 0.0, m_new)
                    alpha = gl.exp2(m_i - m_ns)
                    acc = acc * alpha[None, :]
                    if VT > 0:
                        acc_t = acc_t * alpha[None, :]
                    l_t = l_t * alpha[None, :]
                    m_i = m_new
                    p = gl.exp2(s - m_ns[None, :])
                    p_s.store(p.to(gl.float16))
                    fence_async_shared()
                    _barrier()
                l_t = l_t + p
            pv_tok = warpgroup_mma(v_s.index(st).permute((1, 0)), p_s, acc, is_async=True)
            if VT > 0:
                pvt_tok = warpgroup_mma(v_t.index(st).permute((1, 0)), p_s, acc_t, is_async=True)
            k1, k2 = warpgroup_mma_wait(num_outstanding=NVG, deps=(k1_tok, k2_tok))
            a1, a2 = rope(k1, k2, c_s.index(nx % NT), s_s.index(nx % NT), mma_k, a_s, ROPE16)
            if VT > 0:
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(pv_tok, ))
                acc_t = warpgroup_mma_wait(num_outstanding=0, deps=(pvt_tok, ))
            else:
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(pv_tok, ))
            _barrier()
        async_copy.wait_group(0)
        row0 = b * HKV * NREP + j * NREP
        store_partials(ACC, MAX, SUM, m_i, l_t, acc, rows, row0, sp, nsplit, NREP, R, mma_s, RV_P)
        if VT > 0:
            store_tail(ACC, acc_t, rows, row0, sp, nsplit, NREP, R, RV_P, mma_s)


def rank_ok(rank: int) -> bool:
    """Whether the kernel takes this key or value rank per head: 16 to 128, a multiple of 16."""
    return 16 <= rank <= 2 * RANK and rank % 16 == 0


def supported(*, S: int, D: int, rk: int, rv: int, bits: int, group_size: int, nrep: int, dtype: torch.dtype,
              has_bias: bool, window: int, device: torch.device) -> bool:
    """Whether :func:`decode_partials` takes this decode step (else the Triton kernel runs it)."""
    if gluon is None or device.type != "cuda" or not torch.cuda.is_available():
        return False
    return (S == 1 and D == HEAD_DIM and rank_ok(rk) and rank_ok(rv) and bits == 0 and group_size == 1
            and nrep <= ROWS and dtype == torch.float16 and not has_bias and window == 0
            and torch.cuda.get_device_capability(device) == (9, 0))


def acc_rows(rv: int) -> int:
    """The values per accumulator row of the partials the kernel writes for value rank ``rv``: the rank's power of
    two, at least 16 (``triton_latent``'s ``RV_P``, which its combine kernel reads)."""
    return max(16, 1 << (rv - 1).bit_length())


def preferred(rk: int, rv: int) -> bool:
    """Whether decode steps at these ranks run the kernel by default (where :func:`supported`): the ranks it was
    timed faster than the Triton kernel at (:data:`DEFAULT_RANKS`: all of them). Others run it on request
    (``gluon=True``)."""
    return rk in DEFAULT_RANKS and rv in DEFAULT_RANKS


def _launch(q, cache_k, cache_v, k_up, cos, sin, past, acc, mx, sm, *, num_kv_heads: int, nrep: int, num_splits: int,
            split_len: int, qk_scale: float, rope16: bool = True, narrow: bool | None = None, rel: bool | None = None,
            maxnreg: int | None = None, lazy: bool | None = None, table_stages: int | None = None,
            const_strides: bool | None = None):
    """The grid, run-time arguments and constants of :func:`_latent_attn_gluon` for :func:`decode_partials`."""
    const = CONST_STRIDES if const_strides is None else const_strides
    B = q.shape[0]
    rk, rv = k_up.shape[1], cache_v.shape[-1] // num_kv_heads
    ck_b, ck_p = cache_k.stride(0), cache_k.stride(1)
    cv_b, cv_p = cache_v.stride(0), cache_v.stride(1)
    args = (q, q.stride(0), q.stride(1), cache_k, ck_b, ck_p, cache_k, ck_b, ck_p, cache_v, cv_b, cv_p, cache_v, cv_b,
            cv_p, k_up, k_up, cos, sin, past, q, 0, 0, acc, mx, sm, split_len, num_splits, qk_scale, rk, rv)
    kw = dict(HKV=num_kv_heads, D=HEAD_DIM, R=RANK, NREP=nrep, M=query_rows(nrep, narrow), BLOCK=BLOCK_N, ROPE16=rope16,
              REL=RELATIVE_ROPE if rel is None else rel, RANK_K=rk, RANK_V=rv, RV_P=acc_rows(rv),
              LAZY=LAZY_MAX if lazy is None else lazy, TABLE_STAGES=table_stages or TABLE_STAGES,
              SCK_P=ck_p if const else 0, SCV_P=cv_p if const else 0, num_warps=WARPS,
              **({"maxnreg": maxnreg} if maxnreg else {}))
    return (B * num_kv_heads, 1, num_splits), args, kw


# resident blocks per multiprocessor of the kernels compiled in this process, by their constants and device
_resident: dict[tuple, int] = {}


def resident_blocks(q, cache_k, cache_v, k_up, cos, sin, past, **opts) -> int:
    """How many blocks of the kernel that :func:`decode_partials` runs with these arguments fit one multiprocessor:
    it is compiled (not launched) and its registers and shared memory read. The split rule aims at that many
    programs per multiprocessor (one wave): the kernel is latency-bound, so a third resident block pays where it
    fits."""
    # what the kernel's constants depend on (looked up every decode step: nothing is allocated or built for a hit)
    key = (q.device.index, k_up.shape[1], cache_v.shape[-1], cache_k.stride(1), cache_v.stride(1),
           tuple(sorted(opts.items())))
    if key not in _resident:
        f32 = torch.empty(1, dtype=torch.float32, device=q.device)
        # two splits: Triton compiles integer arguments equal to 1 as constants, which decode steps' are not
        grid, args, kw = _launch(q, cache_k, cache_v, k_up, cos, sin, past, f32, f32, f32, num_splits=2,
                                 split_len=BLOCK_N, **opts)
        k = _latent_attn_gluon.warmup(*args, grid=grid, **kw)
        k._init_handles()
        smem = getattr(torch.cuda.get_device_properties(q.device), "shared_memory_per_multiprocessor", SMEM_PER_SM)
        _resident[key] = blocks_per_sm(k.n_regs, k.metadata.shared, WARPS, smem)
    return _resident[key]


def decode_partials(q, cache_k, cache_v, k_up, cos, sin, past, acc, mx, sm, *, num_kv_heads: int, nrep: int,
                    num_splits: int, split_len: int, qk_scale: float, rope16: bool = True,
                    narrow: bool | None = None, rel: bool | None = None, maxnreg: int | None = None,
                    lazy: bool | None = None, table_stages: int | None = None,
                    const_strides: bool | None = None) -> None:
    """Per-split partials of one decode step into ``acc`` / ``mx`` / ``sm`` (``[B, Hq, splits(, RV_P)]``, the
    layout of ``triton_latent._combine``; ``RV_P`` 64 for value ranks up to 64, else 128). ``q`` [B, 1, Hq * D];
    caches [B, P, Hkv * rank] with unit stride last; ``k_up`` [Hkv, rk, D]; ``split_len`` a multiple of
    :data:`BLOCK_N`. ``rope16=False``: the keys' RoPE in float32 (for comparison); ``narrow``: query rows padded
    to 8 (see :func:`query_rows`); ``rel``: RoPE by relative position (default :data:`RELATIVE_ROPE`);
    ``maxnreg``: a register cap per thread (none by default); ``lazy``: the softmax maximum a tile late (default
    :data:`LAZY_MAX`); ``table_stages``: 1 or 2 (default :data:`TABLE_STAGES`); ``const_strides``: the caches'
    position strides compiled in (default :data:`CONST_STRIDES`)."""
    grid, args, kw = _launch(q, cache_k, cache_v, k_up, cos, sin, past, acc, mx, sm, num_kv_heads=num_kv_heads,
                             nrep=nrep, num_splits=num_splits, split_len=split_len, qk_scale=qk_scale, rope16=rope16,
                             narrow=narrow, rel=rel, maxnreg=maxnreg, lazy=lazy, table_stages=table_stages,
                             const_strides=const_strides)
    _latent_attn_gluon[grid](*args, **kw)
