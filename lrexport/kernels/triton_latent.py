"""Triton kernels for latent-KV attention (the GPU form of ``LowRankKVAttention``).

Semantics are those of :func:`lrexport.trace.latent_attention_op.latent_attention_reference`
(docs/custom_op.md): the cache holds, per token and per group of ``s`` KV heads, a key latent
of ``rk`` channels and a value latent of ``rv`` channels, float (fp16/bf16/fp32) or packed
integer codes with float16 scale / zero-point params (:mod:`lrexport.kv.quant`).

One kernel serves prefill and decode. A program owns one row ``b``, one KV head ``j`` (slot
``j % s`` of group ``j // s``), a block of new tokens and one split of the cached positions
(flash-decoding). Its ``M`` query rows are the (token, query head) pairs that share KV head
``j``. For every tile of ``BLOCK_N`` positions it

1. loads the key latents (dequantizing packed codes in registers),
2. rebuilds the keys of KV head ``j`` with ``tl.dot(latent, k_up[g][:, slot])`` in
   ``RKB``-channel chunks, adds the bias and applies RoPE at each key's position,
3. scores them against the RoPE'd queries, masks causally (and by the sliding window),
4. updates an online softmax (base 2) and accumulates ``P @ latent_v``.

Decode uses several splits and a second kernel combines them; prefill writes directly.
The ranks ``rk`` and ``rv`` are run-time arguments; only their power-of-two paddings (and the
choice of unpacking path) are compile-time constants, so the per-layer ranks of an FLRC
allocation share compiled kernels instead of compiling one per distinct (rk, rv). A rank just
past a power of two is not multiplied at its padding: 80 runs as 64 + 16 channels, 96 as
64 + 32 (``SPLIT_RANKS``; a few kernels per padding, not one per rank).
The output stays in the value-latent space (``[B, S, Hq*rv]``; ``o_proj`` holds ``B_v``)
unless ``v_up`` is given, which is applied after the kernel.

Kernel constraints (checked, with clear errors): ``D`` a power of two >= 32, ``rk`` a
multiple of 16; quantization groups a power of two >= 8.
"""

from __future__ import annotations

import os

import torch

from lrexport.errors import ShapeError
from lrexport.kv.quant import SEARCH_DENOM, SEARCH_STEPS, searches

try:  # triton is optional: CPU installs run the reference
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None

LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device | str | None = None) -> bool:
    """True when the Triton path can run on ``device`` (CUDA, or the interpreter on CPU)."""
    if triton is None:
        return False
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cpu":
        return _INTERPRET
    return torch.cuda.is_available() or _INTERPRET


if triton is not None:

    @triton.jit
    def _load_block(C, Pp, row_c, row_p, nmask, base, BLOCK_N: tl.constexpr, W: tl.constexpr, VALID,
                    AL: tl.constexpr, BITS: tl.constexpr, QG: tl.constexpr, NGROUPS, FAST: tl.constexpr, sc, ze,
                    H16: tl.constexpr = False):
        """Latent values [BLOCK_N, W] of channels ``base .. base+W`` (the first VALID of them).

        ``row_c`` / ``row_p``: [BLOCK_N, 1] offsets of the positions' cache / params rows. FAST (2, 4
        and 8 bits with whole quantization groups, ``base`` a multiple of QG): bytes are loaded as
        vectors and split into codes in registers, with the groups' scales / zero points ``sc`` /
        ``ze`` from :func:`_qparams` (loaded ahead by the caller). Otherwise each
        channel gathers its bits (3-bit codes straddle bytes). Float caches come back in their
        own dtype, codes dequantized in float32, or with ``H16`` (FAST, float16 models) in float16
        without conversions: a code ``c`` or'ed into the mantissa of 1024.0 (``0x6400 | c``) is
        ``1024 + c`` exactly, and ``- 1024`` leaves ``c``; then one fused multiply-add with the
        float16 scale and zero point, rounded once, as the float32 path's final rounding to
        float16. ``VALID`` is a multiple of ``AL`` (a power of
        two): the channel mask is written per ``AL`` channels so that the compiler sees it constant
        over them, and vectorizes (and pipelines) the loads although ``VALID`` is a run-time value.
        """
        w = tl.arange(0, W)
        m2 = nmask[:, None] & ((w // AL) * AL < VALID)[None, :]
        if BITS == 0:  # as stored: a load that feeds an MMA directly is pipelined through shared memory
            return tl.load(C + row_c + base + w[None, :], mask=m2, other=0.0)
        elif FAST:
            PER: tl.constexpr = 8 // BITS
            wb = tl.arange(0, W // PER)
            GB: tl.constexpr = AL // PER  # bytes per mask granule
            byt = tl.load(C + row_c + base // PER + wb[None, :],
                          mask=nmask[:, None] & ((wb // GB) * AL < VALID)[None, :], other=0)
            byt = byt.to(tl.int16) if H16 else byt.to(tl.int32)
            if BITS == 8:
                code = byt
            elif BITS == 4:
                code = tl.reshape(tl.join(byt & 15, byt >> 4), (BLOCK_N, W))
            else:
                code = tl.reshape(tl.join(tl.join(byt & 3, (byt >> 4) & 3), tl.join((byt >> 2) & 3, byt >> 6)),
                                  (BLOCK_N, W))
            NGW: tl.constexpr = W // QG
            if H16:
                val = (code | 0x6400).to(tl.float16, bitcast=True) - 1024.0
            else:
                val = code.to(tl.float32)
            x = tl.reshape(val, (BLOCK_N, NGW, QG)) * sc[:, :, None] + ze[:, :, None]
            return tl.reshape(x, (BLOCK_N, W))
        else:
            ch = base + w
            bitpos = ch * BITS
            byte = bitpos // 8
            shift = bitpos % 8
            b0 = tl.load(C + row_c + byte[None, :], mask=m2, other=0).to(tl.int32)
            if BITS == 3:
                span = (shift > 5) & (w < VALID)
                b1 = tl.load(C + row_c + byte[None, :] + 1, mask=nmask[:, None] & span[None, :], other=0)
                b0 = b0 | (b1.to(tl.int32) << 8)
            code = (b0 >> shift[None, :]) & ((1 << BITS) - 1)
            grp = ch // QG
            scale = tl.load(Pp + row_p + grp[None, :], mask=m2, other=0.0).to(tl.float32)
            zero = tl.load(Pp + row_p + NGROUPS + grp[None, :], mask=m2, other=0.0).to(tl.float32)
            return code.to(tl.float32) * scale + zero

    @triton.jit
    def _qparams(Pp, row_p, nmask, base, W: tl.constexpr, VALID, QG: tl.constexpr, NGROUPS, H16: tl.constexpr = False):
        """Scales and zero points (float32), one per quantization group, of channels ``base .. base+W``.

        [BLOCK_N, W // QG], for the vector unpacking path of :func:`_load_block` (float16 with ``H16``). These loads are
        too narrow for the compiler's pipelining, so the kernel issues them a tile ahead.
        """
        i = tl.arange(0, W // QG)
        m2 = nmask[:, None] & (i * QG < VALID)[None, :]
        grp = base // QG + i
        sc = tl.load(Pp + row_p + grp[None, :], mask=m2, other=0.0)
        ze = tl.load(Pp + row_p + NGROUPS + grp[None, :], mask=m2, other=0.0)
        if H16:
            sc = sc.to(tl.float16)
            ze = ze.to(tl.float16)
        else:
            sc = sc.to(tl.float32)
            ze = ze.to(tl.float32)
        return sc, ze

    @triton.jit
    def _rope_rows(COS, SIN, pos, pmask, d, HALF: tl.constexpr):
        """The RoPE table rows (cos, sin) [len(pos), HALF] of positions ``pos`` (rows masked by ``pmask``)."""
        c = tl.load(COS + pos[:, None] * HALF + d[None, :], mask=pmask[:, None], other=0.0)
        s = tl.load(SIN + pos[:, None] * HALF + d[None, :], mask=pmask[:, None], other=0.0)
        return c, s

    @triton.jit
    def _mma(a, b, IEEE: tl.constexpr):
        """``a @ b`` on the tensor cores; exact float32 products for float32 models."""
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _pv(p, v, CC: tl.constexpr, IEEE: tl.constexpr):
        """``P @ V`` for one tile: an MMA, or multiply-and-reduce on the CUDA cores (CC, few query rows)."""
        if CC:
            return tl.sum(p.to(v.dtype).to(tl.float32)[:, :, None] * v.to(tl.float32)[None, :, :], 1)
        else:
            return _mma(p.to(v.dtype), v, IEEE)

    @triton.jit
    def _rope16(a, b, c, s, ASM: tl.constexpr):
        """RoPE of the key halves ``a``, ``b`` by the table rows ``c`` (cos), ``s`` (sin), all float16:
        ``(a c - b s, b c + a s)``, each product and sum in float16 as Hugging Face's float16 RoPE. ASM: two
        values per instruction (``f16x2``; the GPU only: the interpreter has no inline assembly)."""
        if ASM:
            return tl.inline_asm_elementwise(
                asm="""{
                .reg .b32 t, u;
                mul.rn.f16x2 t, $3, $5;
                neg.f16x2 t, t;
                fma.rn.f16x2 $0, $2, $4, t;
                mul.rn.f16x2 u, $2, $5;
                fma.rn.f16x2 $1, $3, $4, u;
                }""",
                constraints="=r,=r,r,r,r,r", args=[a, b, c, s], dtype=(tl.float16, tl.float16), is_pure=True,
                pack=2)
        else:
            return a * c - b * s, b * c + a * s

    @triton.jit
    def _latent_attn_fwd(
        Q, sq_b, sq_s,
        CK, sck_b, sck_p, PK, spk_b, spk_p,
        CV, scv_b, scv_p, PV, spv_b, spv_p,
        KUP, KBIAS, COS, SIN, PAST,
        OUT, so_b, so_s,
        ACC, MAX, SUM,
        S, split_len, nsplit, qk_scale,
        HQ: tl.constexpr, HKV: tl.constexpr, GS: tl.constexpr, D: tl.constexpr,
        RK, RV, RV_P: tl.constexpr, RKB: tl.constexpr, AL_K: tl.constexpr, AL_V: tl.constexpr,
        NREP: tl.constexpr, BLOCK_T: tl.constexpr, M: tl.constexpr, BLOCK_N: tl.constexpr,
        SPLIT: tl.constexpr, BITS: tl.constexpr, QG: tl.constexpr, WINDOW: tl.constexpr,
        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, HOIST: tl.constexpr, RK_P: tl.constexpr,
        FAST_K: tl.constexpr, FAST_KC: tl.constexpr, FAST_V: tl.constexpr, CC: tl.constexpr, SWAP: tl.constexpr,
        REL_ROPE: tl.constexpr, PAIR: tl.constexpr, UNPACK16: tl.constexpr, ROPE16: tl.constexpr = 0,
        LAZY_SUM: tl.constexpr = False, ROW_SPLITS: tl.constexpr = False, RK_T: tl.constexpr = 0,
        RV_A: tl.constexpr = 0, RV_T: tl.constexpr = 0, STAGE_TABLES: tl.constexpr = True,
    ):
        HALF: tl.constexpr = D // 2
        G: tl.constexpr = HKV // GS
        pid_bj = tl.program_id(0)
        pid_t = tl.program_id(1)
        pid_s = tl.program_id(2)
        b = (pid_bj // HKV).to(tl.int64)  # 64-bit offsets: caches past 2^31 elements
        j = pid_bj % HKV
        g = j // GS
        slot = j % GS
        cdt = KUP.dtype.element_ty
        H16: tl.constexpr = UNPACK16 and cdt == tl.float16  # packed codes dequantized in float16

        if ROW_SPLITS:  # each row divides its own length among the splits (the launch planned nsplit from the
            # cache's capacity, without reading the lengths on the host): PAST holds (past_len, split_len) per row,
            # split_len as split_plan's rule for that row (row_split_lengths; computed before the launch: division
            # here costs registers the 4-bit kernels do not have)
            past = tl.load(PAST + 2 * b).to(tl.int32)
            split_len = tl.load(PAST + 2 * b + 1)
        else:
            past = tl.load(PAST + b).to(tl.int32)
        t0 = pid_t * BLOCK_T
        r = tl.arange(0, M)
        t = t0 + r // NREP
        head = j * NREP + r % NREP
        rvalid = (r < BLOCK_T * NREP) & (t < S)
        qpos = past + t
        d = tl.arange(0, HALF)

        # queries, RoPE'd at their positions, pre-scaled for exp2
        qrow = Q + b * sq_b + t * sq_s + head * D
        q1 = tl.load(qrow[:, None] + d[None, :], mask=rvalid[:, None], other=0.0).to(tl.float32)
        q2 = tl.load(qrow[:, None] + HALF + d[None, :], mask=rvalid[:, None], other=0.0).to(tl.float32)
        qc = tl.load(COS + qpos[:, None] * HALF + d[None, :], mask=rvalid[:, None], other=0.0)
        qs = tl.load(SIN + qpos[:, None] * HALF + d[None, :], mask=rvalid[:, None], other=0.0)
        q1r = ((q1 * qc - q2 * qs) * qk_scale).to(cdt)
        q2r = ((q2 * qc + q1 * qs) * qk_scale).to(cdt)

        # key positions this program reads: causal, windowed, then its split
        n_tok = tl.minimum(S - t0, BLOCK_T)
        hi = past + t0 + n_tok  # one past the last query position of the block
        lo = 0
        if WINDOW > 0:
            lo = tl.maximum(past + t0 - WINDOW + 1, 0)
        start = tl.maximum(lo, pid_s * split_len)
        end = tl.minimum(hi, pid_s * split_len + split_len)

        m_i = tl.full([M], float("-inf"), tl.float32)
        l_i = tl.zeros([M], tl.float32)
        R16: tl.constexpr = ROPE16 > 0 and cdt == tl.float16 and REL_ROPE == 0 and not PAIR
        if LAZY_SUM:  # the softmax sums per (position, row), reduced over positions once after the loop (swapped
            # orientation only: kernel_config sets it so)
            l_t = tl.zeros([BLOCK_N, M], tl.float32)
        if REL_ROPE:
            # keys' RoPE by angle addition: the key at n0 + i from the tile's row n0 and the offset rows i (a
            # table the loop reuses), divided by row 0 (the table's own scale, e.g. YaRN's attention factor)
            offs_i = tl.arange(0, BLOCK_N)
            imask = offs_i < end - start  # offsets past the split's length are masked in every tile
            if REL_ROPE == 1:  # the offset rows stay in registers across the loop
                kc_i = tl.load(COS + offs_i[:, None] * HALF + d[None, :], mask=imask[:, None], other=0.0)
                ks_i = tl.load(SIN + offs_i[:, None] * HALF + d[None, :], mask=imask[:, None], other=0.0)
            inv_c0 = 1.0 / tl.load(COS + d).to(tl.float32)
        # ranks that are not powers of two: a power-of-two chunk and a narrow tail instead of one padded product
        # (kernel_config's split_ranks): keys RK_P + RK_T channels (HOIST), values RV_A + RV_T (SWAP); RV_A is RV_P
        # when there is no value tail (RV_P stays the partials' row stride)
        VA: tl.constexpr = RV_A if RV_A > 0 else RV_P
        if SWAP:  # positions as the rows of the score and value MMAs (decode: few query rows)
            if PAIR:  # channels i and HALF + i side by side: one rebuild and one score product per tile
                qt = tl.trans(tl.reshape(tl.join(q1r, q2r), (M, D)))
            else:
                q1t = tl.trans(q1r)
                q2t = tl.trans(q2r)
            acc_t = tl.zeros([VA, M], tl.float32)
            if RV_T > 0:
                acc_tt = tl.zeros([RV_T, M], tl.float32)
        else:
            acc = tl.zeros([M, VA], tl.float32)
        cv_idx = tl.arange(0, VA)
        cvmask = cv_idx < RV
        kch = tl.arange(0, RKB)
        kup_base = KUP + g * RK * (GS * D) + slot * D

        if HOIST:  # the whole k_up slice stays on chip across the loop (rk <= RK_P, zero-padded)
            chp = tl.arange(0, RK_P)
            u1h = tl.load(kup_base + chp[:, None] * (GS * D) + d[None, :], mask=chp[:, None] < RK, other=0.0)
            u2h = tl.load(kup_base + chp[:, None] * (GS * D) + HALF + d[None, :], mask=chp[:, None] < RK, other=0.0)
            if PAIR:  # columns i and HALF + i side by side (columns 2i, 2i + 1)
                uh = tl.reshape(tl.join(u1h, u2h), (RK_P, D))
            if RK_T > 0:  # the tail rows RK_P .. RK (zero-padded to RK_T)
                cht = RK_P + tl.arange(0, RK_T)
                u1t = tl.load(kup_base + cht[:, None] * (GS * D) + d[None, :], mask=cht[:, None] < RK, other=0.0)
                u2t = tl.load(kup_base + cht[:, None] * (GS * D) + HALF + d[None, :], mask=cht[:, None] < RK,
                              other=0.0)

        # quantized vector paths: the next tile's scales / zero points are loaded a tile ahead
        PRE_K: tl.constexpr = HOIST and FAST_K
        PRE_V: tl.constexpr = FAST_V
        NGK = (G * RK) // QG
        NGV = (G * RV) // QG
        first = start + tl.arange(0, BLOCK_N)
        sck, zek, scv, zev = 0.0, 0.0, 0.0, 0.0  # unused by the other unpacking paths
        sckt, zekt, scvt, zevt = 0.0, 0.0, 0.0, 0.0
        first_pk = b * spk_b + first.to(tl.int64)[:, None] * spk_p
        first_pv = b * spv_b + first.to(tl.int64)[:, None] * spv_p
        if PRE_K:
            sck, zek = _qparams(PK, first_pk, first < end, g * RK, RK_P, RK, QG, NGK, H16)
            if RK_T > 0:
                sckt, zekt = _qparams(PK, first_pk, first < end, g * RK + RK_P, RK_T, RK - RK_P, QG, NGK, H16)
        if PRE_V:
            scv, zev = _qparams(PV, first_pv, first < end, g * RV, VA, RV, QG, NGV, H16)
            if RV_T > 0:
                scvt, zevt = _qparams(PV, first_pv, first < end, g * RV + VA, RV_T, RV - VA, QG, NGV, H16)

        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < end
            pos64 = offs_n.to(tl.int64)[:, None]
            nxt = offs_n + BLOCK_N
            if PRE_K:
                nxt_pk = b * spk_b + nxt.to(tl.int64)[:, None] * spk_p
                sck_n, zek_n = _qparams(PK, nxt_pk, nxt < end, g * RK, RK_P, RK, QG, NGK, H16)
                if RK_T > 0:
                    sckt_n, zekt_n = _qparams(PK, nxt_pk, nxt < end, g * RK + RK_P, RK_T, RK - RK_P, QG, NGK, H16)
            if PRE_V:
                nxt_pv = b * spv_b + nxt.to(tl.int64)[:, None] * spv_p
                scv_n, zev_n = _qparams(PV, nxt_pv, nxt < end, g * RV, VA, RV, QG, NGV, H16)
                if RV_T > 0:
                    scvt_n, zevt_n = _qparams(PV, nxt_pv, nxt < end, g * RV + VA, RV_T, RV - VA, QG, NGV, H16)
            row_ck = b * sck_b + pos64 * sck_p
            row_pk = b * spk_b + pos64 * spk_p
            if HOIST:
                lat = _load_block(CK, PK, row_ck, row_pk, nmask, g * RK, BLOCK_N, RK_P, RK, AL_K, BITS, QG, NGK,
                                  FAST_K, sck, zek, H16).to(cdt)
                if PAIR:
                    k1, k2 = tl.split(tl.reshape(_mma(lat, uh, IEEE), (BLOCK_N, HALF, 2)))
                else:
                    k1 = _mma(lat, u1h, IEEE)
                    k2 = _mma(lat, u2h, IEEE)
                if RK_T > 0:
                    latt = _load_block(CK, PK, row_ck, row_pk, nmask, g * RK + RK_P, BLOCK_N, RK_T, RK - RK_P, AL_K,
                                       BITS, QG, NGK, FAST_K, sckt, zekt, H16).to(cdt)
                    k1 += _mma(latt, u1t, IEEE)
                    k2 += _mma(latt, u2t, IEEE)
            else:
                k1 = tl.zeros([BLOCK_N, HALF], tl.float32)
                k2 = tl.zeros([BLOCK_N, HALF], tl.float32)
                for c in range(0, RK // RKB):
                    cb = g * RK + c * RKB
                    ch = c * RKB + kch
                    sc_c, ze_c = 0.0, 0.0
                    if FAST_KC:
                        sc_c, ze_c = _qparams(PK, row_pk, nmask, cb, RKB, RKB, QG, NGK, H16)
                    lat = _load_block(CK, PK, row_ck, row_pk, nmask, cb, BLOCK_N, RKB, RKB, RKB, BITS, QG, NGK,
                                      FAST_KC, sc_c, ze_c, H16).to(cdt)
                    u1 = tl.load(kup_base + ch[:, None] * (GS * D) + d[None, :])
                    u2 = tl.load(kup_base + ch[:, None] * (GS * D) + HALF + d[None, :])
                    k1 += _mma(lat, u1, IEEE)
                    k2 += _mma(lat, u2, IEEE)
            if HAS_BIAS:
                k1 += tl.load(KBIAS + j * D + d).to(tl.float32)[None, :]
                k2 += tl.load(KBIAS + j * D + HALF + d).to(tl.float32)[None, :]
            if REL_ROPE == 0 and STAGE_TABLES:  # pipelined with the latents: shared memory in every stage
                kc, ks = _rope_rows(COS, SIN, offs_n, nmask, d, HALF)
            elif REL_ROPE == 0:  # behind a run-time condition (always true: nsplit >= 1), which the compiler's
                # pipelining leaves alone: read when needed, no shared memory per stage
                if nsplit > 0:
                    kc, ks = _rope_rows(COS, SIN, offs_n, nmask, d, HALF)
                else:
                    kc = tl.zeros([BLOCK_N, HALF], COS.dtype.element_ty)
                    ks = tl.zeros([BLOCK_N, HALF], COS.dtype.element_ty)
            else:
                if REL_ROPE == 1:
                    kc_o = kc_i
                    ks_o = ks_i
                else:  # reloaded each tile (the same rows: cache hits)
                    kc_o = tl.load(COS + offs_i[:, None] * HALF + d[None, :], mask=imask[:, None], other=0.0)
                    ks_o = tl.load(SIN + offs_i[:, None] * HALF + d[None, :], mask=imask[:, None], other=0.0)
                cb = tl.load(COS + n0 * HALF + d).to(tl.float32) * inv_c0
                sb = tl.load(SIN + n0 * HALF + d).to(tl.float32) * inv_c0
                kc_o = kc_o.to(tl.float32)
                ks_o = ks_o.to(tl.float32)
                kc = kc_o * cb[None, :] - ks_o * sb[None, :]
                ks = ks_o * cb[None, :] + kc_o * sb[None, :]
            if PAIR:
                kr = tl.reshape(tl.join((k1 * kc - k2 * ks).to(cdt), (k2 * kc + k1 * ks).to(cdt)), (BLOCK_N, D))
            elif R16:  # in float16: the keys rounded once, no table conversions
                kr1, kr2 = _rope16(k1.to(tl.float16), k2.to(tl.float16), kc.to(tl.float16), ks.to(tl.float16),
                                   ROPE16 == 2)
            else:
                kr1 = (k1 * kc - k2 * ks).to(cdt)
                kr2 = (k2 * kc + k1 * ks).to(cdt)
            row_cv = b * scv_b + pos64 * scv_p
            row_pv = b * spv_b + pos64 * spv_p
            v = _load_block(CV, PV, row_cv, row_pv, nmask, g * RV, BLOCK_N, VA, RV, AL_V, BITS, QG, NGV, FAST_V,
                            scv, zev, H16).to(cdt)
            if SWAP:  # scores [BLOCK_N, M]: the rebuilt keys feed the MMA from registers
                if PAIR:
                    s_t = _mma(kr, qt, IEEE)
                else:
                    s_t = _mma(kr1, q1t, IEEE) + _mma(kr2, q2t, IEEE)
                ok = nmask[:, None] & (offs_n[:, None] <= qpos[None, :]) & rvalid[None, :]
                if WINDOW > 0:
                    ok = ok & (offs_n[:, None] > qpos[None, :] - WINDOW)
                s_t = tl.where(ok, s_t, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s_t, 0))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.math.exp2(m_i - m_safe)
                p_t = tl.math.exp2(s_t - m_safe[None, :])
                if LAZY_SUM:
                    l_t = l_t * alpha[None, :] + p_t
                else:
                    l_i = l_i * alpha + tl.sum(p_t, 0)
                acc_t = acc_t * alpha[None, :] + _mma(tl.trans(v), p_t.to(cdt), IEEE)
                if RV_T > 0:
                    vt = _load_block(CV, PV, row_cv, row_pv, nmask, g * RV + VA, BLOCK_N, RV_T, RV - VA, AL_V, BITS,
                                     QG, NGV, FAST_V, scvt, zevt, H16).to(cdt)
                    acc_tt = acc_tt * alpha[None, :] + _mma(tl.trans(vt), p_t.to(cdt), IEEE)
            else:
                if CC:  # few query rows: multiply-and-reduce on the CUDA cores, no padded MMA rows
                    s = tl.sum(q1r.to(tl.float32)[:, None, :] * kr1.to(tl.float32)[None, :, :], 2)
                    s += tl.sum(q2r.to(tl.float32)[:, None, :] * kr2.to(tl.float32)[None, :, :], 2)
                else:
                    s = _mma(q1r, tl.trans(kr1), IEEE) + _mma(q2r, tl.trans(kr2), IEEE)
                ok = nmask[None, :] & (offs_n[None, :] <= qpos[:, None]) & rvalid[:, None]
                if WINDOW > 0:
                    ok = ok & (offs_n[None, :] > qpos[:, None] - WINDOW)
                s = tl.where(ok, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.math.exp2(m_i - m_safe)
                p = tl.math.exp2(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + _pv(p, v, CC, IEEE)
            m_i = m_new
            if PRE_K:
                sck = sck_n
                zek = zek_n
                if RK_T > 0:
                    sckt = sckt_n
                    zekt = zekt_n
            if PRE_V:
                scv = scv_n
                zev = zev_n
                if RV_T > 0:
                    scvt = scvt_n
                    zevt = zevt_n

        if SWAP:
            acc = tl.trans(acc_t)
            if RV_T > 0:
                acc_tail = tl.trans(acc_tt)
                ct_idx = VA + tl.arange(0, RV_T)
        if LAZY_SUM:
            l_i = tl.sum(l_t, 0)
        if not SPLIT:
            den = tl.where(l_i == 0.0, 1.0, l_i)
            optr = OUT + b * so_b + t[:, None] * so_s + head[:, None] * RV
            tl.store(optr + cv_idx[None, :], (acc / den[:, None]).to(OUT.dtype.element_ty),
                     mask=rvalid[:, None] & cvmask[None, :])
            if RV_T > 0:
                tl.store(optr + ct_idx[None, :], (acc_tail / den[:, None]).to(OUT.dtype.element_ty),
                         mask=rvalid[:, None] & (ct_idx < RV)[None, :])
        else:
            # partials [B, S, HQ, NSPLIT(, RV_P)]
            part = ((b * S + t) * HQ + head) * nsplit + pid_s
            tl.store(MAX + part, m_i, mask=rvalid)
            tl.store(SUM + part, l_i, mask=rvalid)
            tl.store(ACC + part[:, None] * RV_P + cv_idx[None, :], acc, mask=rvalid[:, None])
            if RV_T > 0:
                tl.store(ACC + part[:, None] * RV_P + ct_idx[None, :], acc_tail, mask=rvalid[:, None])

    @triton.jit
    def _combine(ACC, MAX, SUM, OUT, NSPLIT, RV, RV_P: tl.constexpr, NSPLIT_P: tl.constexpr):
        row = tl.program_id(0)  # (b, t, head)
        sp = tl.arange(0, NSPLIT_P)
        smask = sp < NSPLIT
        m = tl.load(MAX + row * NSPLIT + sp, mask=smask, other=float("-inf"))
        l_ = tl.load(SUM + row * NSPLIT + sp, mask=smask, other=0.0)
        mx = tl.max(m, 0)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        w = tl.math.exp2(m - mx)
        cv = tl.arange(0, RV_P)
        a = tl.load(ACC + (row * NSPLIT + sp)[:, None] * RV_P + cv[None, :], mask=smask[:, None], other=0.0)
        num = tl.sum(a * w[:, None], 0)
        den = tl.sum(l_ * w, 0)
        den = tl.where(den == 0.0, 1.0, den)
        tl.store(OUT + row * RV + cv, (num / den).to(OUT.dtype.element_ty), mask=cv < RV)

    @triton.jit
    def _round_half_even(q, INTERP: tl.constexpr):
        if INTERP:  # the interpreter lacks libdevice: 1.5 * 2^23 rounds half to even for |q| < 2^22
            q = (q + 12582912.0) - 12582912.0
        else:
            q = libdevice.rint(q)  # round half to even, as torch.round
        return q

    @triton.jit
    def _halving_sum(v, N: tl.constexpr, LOGN: tl.constexpr):
        """Sum of ``v`` ([N = 2**LOGN]) by adding halves, as ``lrexport.kv.quant._halving_sum``."""
        for i in tl.static_range(LOGN):
            v = tl.sum(tl.reshape(v, (2, N >> (i + 1))), 0)
        return tl.sum(v, 0)

    @triton.jit
    def _store_quant(X, sx_row, C, sc_b, sc_p, Pp, sp_b, sp_p, PAST, S,
                     R: tl.constexpr, QG: tl.constexpr, BITS: tl.constexpr, SEARCH: tl.constexpr,
                     STEPS: tl.constexpr, DENOM: tl.constexpr, QG_LOG2: tl.constexpr, INTERP: tl.constexpr):
        """Quantize one new token's latent row (R channels) into the packed cache at its position.

        Program (b, t, quant group); bit-exact with :func:`lrexport.kv.quant.quantize`, including
        its range search (``SEARCH``: 2-bit groups).
        """
        pid = tl.program_id(0)
        grp = tl.program_id(1)
        b = (pid // S).to(tl.int64)
        t = pid % S
        pos = tl.load(PAST + b).to(tl.int64) + t
        NG: tl.constexpr = R // QG
        LEVELS: tl.constexpr = (1 << BITS) - 1
        c = tl.arange(0, QG)
        x = tl.load(X + pid * sx_row + grp * QG + c).to(tl.float32)
        lo = tl.min(x, 0)
        hi = tl.max(x, 0)
        scale = tl.maximum(tl.math.div_rn(hi - lo, LEVELS + 0.0), 1e-8).to(tl.float16)
        zero = lo.to(tl.float16)
        if SEARCH:  # candidates as lrexport.kv.quant._searched, (0, 0) first
            span = hi - lo
            INV_DENOM: tl.constexpr = 1.0 / DENOM
            best = 0.0
            for a in tl.static_range(STEPS):
                for bb in tl.static_range(STEPS):
                    sc = tl.maximum(tl.math.div_rn((span * (DENOM - a - bb + 0.0)) * INV_DENOM, LEVELS + 0.0),
                                    1e-8).to(tl.float16)
                    if a == 0:
                        ze = lo.to(tl.float16)
                    else:
                        ze = (lo + (span * (a + 0.0)) * INV_DENOM).to(tl.float16)
                    tq = tl.math.div_rn(x - ze.to(tl.float32), sc.to(tl.float32))
                    if INTERP:  # _round_half_even inline: the interpreter takes milliseconds per jitted call
                        cq = (tq + 12582912.0) - 12582912.0
                    else:
                        cq = _round_half_even(tq, INTERP)
                    cq = tl.where(cq != cq, 0.0, cq)
                    cq = tl.minimum(tl.maximum(cq, 0.0), LEVELS)
                    d = cq.to(tl.float64) - tq.to(tl.float64)
                    s64 = sc.to(tl.float32).to(tl.float64)
                    if INTERP:  # the same sums by tl.split: the interpreter runs each tl.sum's combine function
                        # as a call of a jitted function, 1024 per program here
                        d2 = d * d
                        for h in tl.static_range(QG_LOG2 - 1):
                            lo_h, hi_h = tl.split(tl.permute(tl.reshape(d2, (2, QG >> (h + 1))), (1, 0)))
                            d2 = lo_h + hi_h
                        lo_h, hi_h = tl.split(d2)
                        err = (lo_h + hi_h) * (s64 * s64)
                    else:
                        err = _halving_sum(d * d, QG, QG_LOG2) * (s64 * s64)
                    if a == 0 and bb == 0:
                        best = err
                    else:
                        better = err < best
                        best = tl.where(better, err, best)
                        scale = tl.where(better, sc, scale)
                        zero = tl.where(better, ze, zero)
        q = tl.math.div_rn(x - zero.to(tl.float32), scale.to(tl.float32))  # IEEE division, as torch
        q = _round_half_even(q, INTERP)
        q = tl.where(q != q, 0.0, q)  # 0/0 for a constant group whose scale rounded to 0
        q = tl.minimum(tl.maximum(q, 0.0), LEVELS).to(tl.int32)
        prow = Pp + b * sp_b + pos * sp_p
        tl.store(prow + grp, scale)
        tl.store(prow + NG + grp, zero)
        crow = C + b * sc_b + pos * sc_p + grp * QG * BITS // 8
        if BITS == 3:
            words = tl.sum(tl.reshape(q, (QG // 8, 8)) << (tl.arange(0, 8) * 3)[None, :], 1)
            w = tl.arange(0, QG // 8)
            tl.store(crow + w * 3, (words & 0xFF).to(tl.uint8))
            tl.store(crow + w * 3 + 1, ((words >> 8) & 0xFF).to(tl.uint8))
            tl.store(crow + w * 3 + 2, ((words >> 16) & 0xFF).to(tl.uint8))
        else:
            PER: tl.constexpr = 8 // BITS
            packed = tl.sum(tl.reshape(q, (QG // PER, PER)) << (tl.arange(0, PER) * BITS)[None, :], 1)
            tl.store(crow + tl.arange(0, QG // PER), packed.to(tl.uint8))


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _align(valid: int) -> int:
    """The kernels' channel-mask granule: the largest power of two that divides ``valid``, at most 16.

    16 channels are 32 bytes of fp16 (two 16-byte vector loads) and 8 bytes of 4-bit codes; the cap
    keeps ranks that are multiples of 16 on one compiled kernel.
    """
    return min(valid & -valid, 16)


# the keys' RoPE in the kernels: 0 = a table row per key; 1 = by angle addition (a row per tile and the
# offset rows 0..BLOCK_N-1, held in registers across the loop); 2 = the same, the offset rows reloaded each tile
DECODE_REL_ROPE = 0

# decode's key rebuild and scores: True = one product each per tile, with the k_up columns i and D/2 + i (and
# the query's) side by side so that RoPE pairs them in registers; False = a product per half
DECODE_PAIR = False

# decode's RoPE of the rebuilt keys in float16 models: 2 = in float16, two values per instruction (f16x2 inline
# assembly; the interpreter runs the same arithmetic as plain float16 operations), as Hugging Face's float16 RoPE
# rounds; 0 = in float32 (table rows converted). Decode's softmax sums: True = kept per (position, row) and reduced
# over positions once after the loop, which saves a reduction across warps per tile. Both measured on an H200
# (bench/results/gpu_kernels_rope16_*.md; 64K tokens, 50% M-LRD, batch 8): float latents 469 -> 410 us
# (Llama-3-8B shapes) and 1619 -> 1400 us (Llama-2-7B); 4-bit 528 -> 474 and 2484 -> 2344 us.
DECODE_ROPE16 = 2
DECODE_LAZY_SUM = True

# ranks that are not powers of two (rk = 80, 96, 352; rv likewise): which products run as a power-of-two chunk of
# half the padding plus a narrow power-of-two tail (80 = 64 + 16 channels) instead of one product over the padded
# width: "k" the key rebuild (hoisted k_up only), "v" P @ V (decode), "kv" both, "" neither; "auto": the keys when
# k_up is hoisted (M-LRD), else the values. Measured on an H200 (bench/results/gpu_kernels_split_ranks.md, 64K
# tokens, batch 1 and 8, both shapes): G-LRD at 31% (rk = rv = 352), values split: float 1.28-1.32x faster, 4-bit
# 1.38-1.61x; M-LRD at 37.5% (rk = rv = 80), keys split: 1.02-1.04x, values split: 0.67-0.72x (slower: more
# registers at one block per multiprocessor), so "auto" splits no values there.
SPLIT_RANKS = "auto"

# the RoPE table rows of each tile: True = pipelined with the latents (16 KB of shared memory per stage at D = 128
# and 64-position tiles, as much as the float16 latents at rank 64); False = read when needed, outside the pipeline
# (bench/kernel_resources.py: rank 80 with split keys, 139264 -> 112640 bytes, two blocks per multiprocessor
# instead of one). Slower on an H200 except for rank 80 on Llama-2-7B shapes (1-2%): M-LRD 50%, Llama-3-8B,
# 64K tokens, 59.7 -> 94.3 us (bench/results/gpu_kernels_tables.md), so the rows stay staged.
DECODE_STAGE_TABLES = True

# decode's pipeline stages by cache kind (float, packed), as tuned on an H200
# (bench/results/gpu_kernels_tuned_per_batch.json, gpu_kernels_pair.json)
DECODE_STAGES = {False: 3, True: 3}

# decode's register cap per thread by cache kind (None: the compiler's choice), for 4 warps: packed latents take
# 176 registers uncapped, two blocks per multiprocessor; capped at 168 (no spills) three fit the 64K registers
# (4-bit, Llama-3-8B shapes, batch 8 at 64K tokens on an H200: 694 -> 550 us; gpu_kernels_pair.json). Float
# latents are held to two blocks by shared memory at 3 stages, and lose more to spills than they gain with fewer.
# The cap is for kernels that keep a small k_up slice on chip (up to DECODE_HOIST_BYTES: M-LRD). Kernels that
# stream it (G-LRD) need more registers: capped at 168 they spill (110 bytes) and are slower (4-bit, 31% G-LRD at
# 64K tokens: 471 -> 347 us at batch 1, 2848 -> 2741 us at batch 8 with Llama-3-8B shapes, 1567 -> 1349 / 12927 ->
# 10568 us with Llama-2-7B's; gpu_kernels_bits4.json). So do kernels that keep a 64 KB slice on chip (4-bit G-LRD
# at 50%): capped, they spilled 88 bytes and took twice as long (gpu_kernels_hoist.json).
DECODE_MAXNREG = {False: None, True: 168}


def decode_maxnreg(bits: int, num_warps: int, maxnreg: int | None = None, kup_bytes: int = 0) -> int | None:
    """The register cap of a decode kernel: ``maxnreg`` when given (0: none), else the tuned default for
    the cache kind at 4 warps where the ``k_up`` slice on chip is ``kup_bytes`` (:func:`kup_on_chip`), at most
    :data:`DECODE_HOIST_BYTES` (other warp counts, larger slices, streamed ``k_up``: none)."""
    if maxnreg is not None:
        return maxnreg or None
    return DECODE_MAXNREG[bool(bits)] if num_warps == 4 and 0 < kup_bytes <= DECODE_HOIST_BYTES else None


def kup_on_chip(cfg: dict, itemsize: int) -> int:
    """Bytes of the ``k_up`` slice a kernel of :func:`kernel_config` ``cfg`` keeps on chip (0: streamed)."""
    return (cfg["RK_P"] + cfg["RK_T"]) * cfg["D"] * itemsize if cfg["HOIST"] else 0


# the largest k_up slice kept on chip by default (``hoist``; larger ones are streamed in chunks of RKB ranks per
# tile): 32 KB, and 64 KB for 16-bit decode. Measured on an H200 (64K tokens): G-LRD at 50% (groups of 4, rank
# 256: a 64 KB slice) with float latents ran 16-26% faster hoisted (gpu_kernels_rank_chunk.md: Llama-3-8B 224 ->
# 189 us at batch 1, 1679 -> 1370 us at batch 8; Llama-2-7B 844 -> 660 and 6749 -> 5007 us), and with 4-bit
# latents, without the register cap, 4-16% faster (gpu_kernels_hoist.md: Llama-3-8B 272 -> 244 and 2123 -> 1836 us;
# Llama-2-7B 1070 -> 1009 and 8302 -> 8010 us). The slice of rank 352 (31%, 96-128 KB padded) was 1.5-3.3x as
# slow hoisted (same file).
DECODE_HOIST_BYTES = 32768
DECODE_HOIST_BYTES_F16 = 65536


def kernel_config(*, S: int, D: int, nrep: int, rk: int, rv: int, bits: int, quant_group: int, itemsize: int,
                  block_n: int | None = None, hoist: bool | None = None, vector_unpack: bool = True,
                  cuda_core_scores: bool = False, swap: bool = True, rel_rope: int = DECODE_REL_ROPE,
                  pair: bool = DECODE_PAIR, unpack16: bool = True, rope16: int = DECODE_ROPE16,
                  lazy_sum: bool = DECODE_LAZY_SUM, split_ranks: str = SPLIT_RANKS,
                  stage_tables: bool = DECODE_STAGE_TABLES, rank_chunk: int | None = None) -> dict:
    """The shape-dependent compile-time constants of ``_latent_attn_fwd`` for ``S`` new tokens per row.

    Shared by the JIT launch (:func:`attend_`) and the ahead-of-time kernels of the ONNX Runtime
    library (:mod:`lrexport.kernels.aot`), so both run the same specialization. ``itemsize``:
    bytes per element of ``k_up`` (the compute dtype).
    """
    block_t = 1 if S == 1 else max(1, 64 // nrep)
    cc = cuda_core_scores and S == 1 and nrep <= 8
    m_rows = _next_pow2(block_t * nrep) if cc else max(16, _next_pow2(block_t * nrep))
    rv_p = max(16, _next_pow2(rv))
    if rank_chunk is None:  # key ranks per step of the streamed k_up's chunk loop
        rkb = 32 if rk % 32 == 0 else 16
    elif rank_chunk in (16, 32, 64) and rk % rank_chunk == 0:
        rkb = rank_chunk
    else:
        raise ValueError(f"rank_chunk must be 16, 32 or 64 and divide the key rank {rk}, got {rank_chunk}")
    rk_p = _next_pow2(rk)
    if hoist is None:  # keep k_up on chip when its slice is small (M-LRD); stream it in chunks otherwise
        big = S == 1 and itemsize == 2
        hoist = rk_p * D * itemsize <= (DECODE_HOIST_BYTES_F16 if big else DECODE_HOIST_BYTES)
    if hoist:  # the chunk settings are unused: fix them so that they do not split the compiled kernels
        rkb = 16

    def fast(valid: int, width: int) -> bool:  # vector unpacking: 2/4/8 bits, whole quantization groups
        return vector_unpack and bits in (2, 4, 8) and valid % quant_group == 0 and width % quant_group == 0

    if split_ranks == "auto":
        split_ranks = "k" if hoist else "v"
    if not set(split_ranks) <= {"k", "v"}:
        raise ValueError(f"split_ranks must be 'auto', '', 'k', 'v' or 'kv', got {split_ranks!r}")

    def chunks(r: int, r_p: int, side: str) -> tuple[int, int]:
        # (first chunk, tail) widths: half the padding and a power-of-two tail of at least 16 channels when that
        # is narrower than the padding, packed caches only when both chunks unpack as vectors
        half = r_p // 2
        tail = max(16, _next_pow2(r - half)) if r > half else 0
        if side not in split_ranks or not tail or half + tail >= r_p or (
                bits and not (fast(half, half) and fast(r - half, tail))):
            return r_p, 0
        return half, tail

    swapped = swap and S == 1 and not cc
    paired = pair and hoist and swapped
    rk_a, rk_t = chunks(rk, rk_p, "k") if hoist and not paired else (rk_p, 0)
    rv_a, rv_t = chunks(rv, rv_p, "v") if swapped else (rv_p, 0)
    return dict(D=D, RV_P=rv_p, RKB=rkb, AL_K=_align(rk), AL_V=_align(rv), NREP=nrep, BLOCK_T=block_t, M=m_rows,
                BLOCK_N=block_n or (64 if S == 1 else 32), BITS=bits, QG=quant_group if bits else 1, HOIST=hoist,
                RK_P=rk_a if hoist else 16, FAST_K=hoist and fast(rk, rk_p), FAST_KC=not hoist and fast(rk, rkb),
                FAST_V=fast(rv, rv_p), CC=cc, SWAP=swapped, REL_ROPE=rel_rope, PAIR=paired,
                UNPACK16=unpack16, ROPE16=(min(rope16, 1) if _INTERPRET else rope16) if S == 1 else 0,
                LAZY_SUM=lazy_sum and swapped, RK_T=rk_t, RV_A=rv_a, RV_T=rv_t, STAGE_TABLES=stage_tables)


# decode's split rule: at most ``waves`` programs per multiprocessor, rounded down so that the splits fill whole waves
# of resident blocks, and no split shorter than ``min_split`` positions. Measured on an H200 (64K and 16K tokens,
# both shapes, batch 1 and 8; bench/results/gpu_kernels_waves_*.md): float per-head latents (the Gluon kernel at
# rank 64, the Triton one at rank 80) were fastest at 2 per multiprocessor (their two or one resident blocks: one
# wave), 3-8% ahead of 8; 4-bit and G-LRD latents at 8 (up to 12% ahead of 2). Rounding up instead (17 splits at
# batch 8 with 8 KV heads: 4.1 waves of two blocks per multiprocessor) left the last wave a quarter full: at 64K
# tokens 4 splits took 333.5 us against 370.6 (Gluon kernel, Llama-3-8B shapes, batch 8;
# gpu_kernels_gluon_splits.md). Splits of at least 512 positions rather than 1024 took 19.3 against 21.7 us (M-LRD)
# and 55.6 against 86.7 us (G-LRD) at 16K tokens and batch 1.
DECODE_WAVES_FLOAT = 2
DECODE_WAVES = 8
DECODE_MIN_SPLIT = 512


def decode_waves(group_size: int, bits: int) -> int:
    """The split rule's programs per multiprocessor for a cache kind (see :data:`DECODE_WAVES_FLOAT`)."""
    return DECODE_WAVES_FLOAT if group_size == 1 and not bits else DECODE_WAVES

# decode steps the Gluon kernel takes (gluon_latent.supported: M-LRD at ranks 16-128, float16, head dim 128,
# sm_90) run on it in the PyTorch path: its products overlap on the tensor and CUDA cores; with its query rows
# padded to 8 it took 0.86-0.93x the Triton kernel's time on an H200 at 64K tokens at rank 64
# (bench/results/gpu_kernels_gluon.md), 0.58-0.68x at rank 80 and 0.72-0.90x at other ranks
# (gpu_kernels_gluon_rank80.md, gpu_kernels_gluon_ranks.md). The ONNX
# Runtime library compiles it for the same nodes (aot.Tuning.gluon).
DECODE_GLUON = True

# which kernel ran the last attend_ call ("triton" or "gluon"), for benchmarks that report it
last_kernel = ""


def row_split_lengths(past_len_B: torch.Tensor, S: int, num_splits: int, block_n: int) -> torch.Tensor:
    """The ``PAST`` argument of the decode kernel compiled with ``ROW_SPLITS``: int32 ``(past_len, split_len)``
    per row, ``split_len`` :func:`split_plan`'s rule applied to the row's own length ``past_len + S`` (the
    C++ launcher of LowRankKVAttentionDeviceLen computes the same on the device)."""
    past = past_len_B.to(torch.int64)
    split = (past + S + num_splits - 1) // num_splits
    split = (split + block_n - 1) // block_n * block_n
    return torch.stack([past, split], 1).reshape(-1).to(torch.int32)


def split_plan(*, S: int, batch: int, num_kv_heads: int, kv_max: int, block_n: int, num_sms: int,
               waves: int = DECODE_WAVES, num_splits: int | None = None,
               min_split: int = DECODE_MIN_SPLIT) -> tuple[int, int]:
    """(splits, positions per split) of the cached positions: flash-decoding for decode.

    Decode aims at no more than ``waves`` programs per multiprocessor (at least one split per row) with splits of
    at least ``min_split`` positions, unless that leaves its waves of ``waves * num_sms`` programs less than 3/4
    full: then the splits (up to four waves' worth) that fill them best (:func:`fill_waves`). Prefill does not
    split. The C++ launcher of the ahead-of-time kernels (``plan_triton`` in
    custom_ops/src/cuda/lowrank_kv_attention.cu) computes the same.
    """
    if num_splits is None and S == 1:
        rows, slots, cap = batch * num_kv_heads, waves * num_sms, _cdiv(kv_max, min_split)
        num_splits = fill_waves(rows, slots, cap, max(1, min(slots // rows, cap)))
    elif num_splits is None:
        num_splits = 1
    split_len = _cdiv(_cdiv(kv_max, num_splits), block_n) * block_n
    return _cdiv(kv_max, split_len), split_len


def fill_waves(rows: int, slots: int, cap: int, splits: int) -> int:
    """``splits`` per row, or where ``rows * splits`` programs leave their waves of ``slots`` less than 3/4 full,
    the splits up to ``cap`` and four waves' worth that fill them best (the fewest of equals). On an H200 the Gluon
    kernel at rank 64 with Llama-2-7B shapes (256 rows, three resident blocks: 396 slots) took 1208.6-1209.7 us at
    batch 8 and 64K tokens with three splits (two waves, 97% full) against 1253.3-1256.2 with one (65% full)
    (bench/results/gpu_kernels_gluon_tables.md)."""
    def waves(n: int) -> int:
        return _cdiv(rows * n, slots)

    if 4 * rows * splits >= 3 * waves(splits) * slots:
        return splits
    best = splits
    for n in range(splits + 1, min(cap, 4 * slots // rows) + 1):
        if n * waves(best) > best * waves(n):
            best = n
    return best


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def fallbacks(block_n: int, num_stages: int | None) -> list[tuple[int, int | None]]:
    """(tile, stages) settings to try in order when shared memory does not fit."""
    return [(block_n, num_stages), (block_n, 1), (max(16, block_n // 2), 1), (16, 1)]


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def write_latents(cache: torch.Tensor, params: torch.Tensor | None, new_BSR: torch.Tensor, past_len_B: torch.Tensor,
                  bits: int, quant_group: int) -> None:
    """Write the new tokens' latents into ``cache`` (in place) at ``past_len + t``, quantizing when ``bits``."""
    B, S, R = new_BSR.shape
    if S == 0:
        return
    if not bits:
        pos = past_len_B[:, None].long() + torch.arange(S, device=cache.device)[None]
        b_idx = torch.arange(B, device=cache.device)[:, None].expand_as(pos)
        cache[b_idx, pos] = new_BSR.to(cache.dtype)
        return
    x = new_BSR.reshape(B * S, R)
    if x.stride(-1) != 1:
        x = x.contiguous()
    _store_quant[(B * S, R // quant_group)](
        x, x.stride(0), cache, cache.stride(0), cache.stride(1), params, params.stride(0), params.stride(1),
        past_len_B, S, R=R, QG=quant_group, BITS=bits, SEARCH=searches(bits, quant_group),
        STEPS=SEARCH_STEPS, DENOM=SEARCH_DENOM, QG_LOG2=quant_group.bit_length() - 1, INTERP=_INTERPRET,
        num_warps=1)


def supports(D: int, rk: int, bits: int, quant_group: int) -> bool:
    """Whether the kernels take these shapes (otherwise callers use the reference)."""
    try:
        _check_kernel_shapes(D, rk, bits, quant_group)
    except ShapeError:
        return False
    return True


def _check_kernel_shapes(D: int, rk: int, bits: int, quant_group: int) -> None:
    if D < 32 or D & (D - 1):
        raise ShapeError(f"triton latent attention: head dim {D} must be a power of two >= 32")
    if rk % 16:
        raise ShapeError(f"triton latent attention: key rank {rk} must be a multiple of 16 "
                         "(round the plan's ranks to 16 for the GPU kernels)")
    if bits and (quant_group < 8 or quant_group & (quant_group - 1)):
        raise ShapeError(f"triton latent attention: quantization group {quant_group} must be a power of two >= 8")


def latent_attention_(query_BSQ: torch.Tensor, latent_k_BSR: torch.Tensor, latent_v_BSR: torch.Tensor,
                      cache_k: torch.Tensor, cache_k_params: torch.Tensor | None, cache_v: torch.Tensor,
                      cache_v_params: torch.Tensor | None, past_len_B: torch.Tensor, k_up_GrE: torch.Tensor,
                      k_bias: torch.Tensor | None, v_up_GrE: torch.Tensor | None, cos_Pd: torch.Tensor,
                      sin_Pd: torch.Tensor, num_heads: int, num_kv_heads: int, group_size: int, window: int,
                      scale: float, bits: int = 0, quant_group: int = 0, **config) -> torch.Tensor:
    """Latent attention with the caches updated **in place**; returns the output.

    Same arguments and result as the reference (``cache_*`` are written at the new
    positions instead of being returned). ``k_up`` / ``v_up`` set the compute dtype
    (fp16, bf16 or fp32); ``config`` passes kernel settings to :func:`attend_`. The RoPE
    tables are read in their own dtype (the model's, as in Hugging Face), math in float32.
    """
    from lrexport.trace.latent_attention_op import _check  # the shared shape checks

    D, G, rk, rv = _check(query_BSQ, latent_k_BSR, latent_v_BSR, cache_k, cache_v, past_len_B, k_up_GrE, v_up_GrE,
                          num_heads, num_kv_heads, group_size, bits, quant_group)
    _check_kernel_shapes(D, rk, bits, quant_group)
    B, S, _ = query_BSQ.shape
    P = cache_k.shape[1]
    if S and int((past_len_B + S).max()) > min(P, cos_Pd.shape[0]):
        from lrexport.errors import CacheOverflowError
        raise CacheOverflowError(f"latent attention: past_len + {S} new tokens exceeds the cache of {P} positions "
                                 f"or the RoPE table of {cos_Pd.shape[0]}")
    write_latents(cache_k, cache_k_params, latent_k_BSR, past_len_B, bits, quant_group)
    write_latents(cache_v, cache_v_params, latent_v_BSR, past_len_B, bits, quant_group)
    return attend_(query_BSQ, cache_k, cache_k_params, cache_v, cache_v_params, past_len_B, k_up_GrE, k_bias,
                   v_up_GrE, cos_Pd, sin_Pd, num_heads, num_kv_heads, group_size, window, scale, bits, quant_group,
                   rv=rv, **config)


def attend_(query_BSQ: torch.Tensor, cache_k: torch.Tensor, cache_k_params: torch.Tensor | None,
            cache_v: torch.Tensor, cache_v_params: torch.Tensor | None, past_len_B: torch.Tensor,
            k_up_GrE: torch.Tensor, k_bias: torch.Tensor | None, v_up_GrE: torch.Tensor | None, cos_Pd: torch.Tensor,
            sin_Pd: torch.Tensor, num_heads: int, num_kv_heads: int, group_size: int, window: int, scale: float,
            bits: int, quant_group: int, *, rv: int, block_n: int | None = None, num_warps: int = 4,
            num_stages: int | None = None, num_splits: int | None = None, kv_max: int | None = None,
            waves: int | None = None, min_split: int = DECODE_MIN_SPLIT, hoist: bool | None = None,
            vector_unpack: bool = True,
            cuda_core_scores: bool = False, swap: bool = True, rel_rope: int = DECODE_REL_ROPE,
            pair: bool = DECODE_PAIR, unpack16: bool = True, maxnreg: int | None = None,
            rope16: int = DECODE_ROPE16, lazy_sum: bool = DECODE_LAZY_SUM,
            row_splits: bool = False, split_ranks: str = SPLIT_RANKS,
            stage_tables: bool = DECODE_STAGE_TABLES, rank_chunk: int | None = None,
            gluon: bool | None = None, gluon_narrow: bool | None = None,
            gluon_rel: bool | None = None, gluon_lazy: bool | None = None,
            gluon_table_stages: int | None = None, gluon_const_strides: bool | None = None) -> torch.Tensor:
    """Attention of the new tokens over caches that already hold them (no checks, no cache writes).

    ``kv_max`` (the longest row's ``past_len + S``) saves a device-to-host read when given.
    ``row_splits``: the number of splits is planned from ``kv_max`` (e.g. the cache's capacity) and
    each row divides its own length among them in the kernel (as the ahead-of-time kernels of
    ``LowRankKVAttentionDeviceLen`` do).
    Kernel settings: ``block_n`` positions per tile, ``num_warps``, ``num_stages``,
    ``num_splits`` (or ``waves`` programs per multiprocessor, None: :func:`decode_waves`, or for the Gluon kernel
    the blocks of it that fit a multiprocessor, :func:`gluon_latent.resident_blocks`; and splits of at least
    ``min_split`` positions), ``hoist`` (keep ``k_up`` on
    chip), ``vector_unpack`` (False: per-channel code gathers, for testing),
    ``cuda_core_scores`` (decode with at most 8 query rows per KV head: scores and ``P @ V`` as
    multiply-and-reduce on the CUDA cores instead of MMAs padded to 16 rows), ``swap`` (decode:
    the cached positions as the MMA rows, ``k @ q^T`` and ``v^T @ p^T``, so that the rebuilt keys
    feed the score MMA from registers), ``rel_rope`` (see ``DECODE_REL_ROPE``), ``pair`` (see
    ``DECODE_PAIR``), ``unpack16`` (float16 models: packed codes dequantized in float16, see
    :func:`_load_block`; False: in float32), ``maxnreg`` (a register cap per thread: more programs
    per multiprocessor; decode defaults to :data:`DECODE_MAXNREG`, 0 for none), ``rope16`` and
    ``lazy_sum`` (see :data:`DECODE_ROPE16`, :data:`DECODE_LAZY_SUM`), ``split_ranks`` (see
    :data:`SPLIT_RANKS`), ``stage_tables`` (see :data:`DECODE_STAGE_TABLES`), ``rank_chunk`` (key ranks per
    step when ``k_up`` is streamed: 16, 32 or 64 dividing the rank; None: 32 where it divides, else 16). A setting whose
    shared memory does not fit is retried with fewer pipeline stages, then smaller tiles. ``gluon``: decode steps the
    Gluon kernel takes (:mod:`gluon_latent`: M-LRD at ranks 16-128, float16, head dim 128, sm_90) run on it when None
    and :data:`DECODE_GLUON` (True: required, an error otherwise; False: never); the Triton kernel's settings
    above then do not apply, except ``num_splits`` / ``waves`` / ``min_split``; ``gluon_narrow``: its query rows
    padded to 8 (:func:`gluon_latent.query_rows`; None: :data:`gluon_latent.NARROW_ROWS`); ``gluon_rel``: its
    RoPE by relative position (None: :data:`gluon_latent.RELATIVE_ROPE`; only for tables of rotary embeddings);
    ``gluon_lazy``: its softmax maximum a tile late (None: :data:`gluon_latent.LAZY_MAX`); ``gluon_table_stages``:
    its stages of table rows (None: :data:`gluon_latent.TABLE_STAGES`); ``gluon_const_strides``: the caches' strides
    compiled in (None: :data:`gluon_latent.CONST_STRIDES`).
    ``maxnreg`` applies to the Gluon kernel too when given (none by default).
    """
    global last_kernel
    B, S, Q = query_BSQ.shape
    D = Q // num_heads
    G = num_kv_heads // group_size
    rk = k_up_GrE.shape[1]
    dev = query_BSQ.device
    cdt = k_up_GrE.dtype
    nrep = num_heads // num_kv_heads
    out_dt = query_BSQ.dtype
    out = torch.empty(B, S, num_heads * rv, dtype=out_dt, device=dev)
    if S == 0:
        return out if v_up_GrE is None else query_BSQ.new_empty(B, 0, num_heads * D)
    q = query_BSQ if query_BSQ.stride(-1) == 1 else query_BSQ.contiguous()
    k_up = k_up_GrE.contiguous()
    cos = cos_Pd.contiguous()
    sin = sin_Pd.contiguous()
    past = past_len_B if past_len_B.dtype == torch.int32 else past_len_B.to(torch.int32)
    ck_params = cache_k_params if bits else cache_k
    cv_params = cache_v_params if bits else cache_v

    if kv_max is None:
        kv_max = int((past_len_B + S).max())
    cfg = kernel_config(S=S, D=D, nrep=nrep, rk=rk, rv=rv, bits=bits, quant_group=quant_group,
                        itemsize=k_up_GrE.element_size(), block_n=block_n, hoist=hoist, vector_unpack=vector_unpack,
                        cuda_core_scores=cuda_core_scores, swap=swap, rel_rope=rel_rope, pair=pair,
                        unpack16=unpack16, rope16=rope16, lazy_sum=lazy_sum, split_ranks=split_ranks,
                        stage_tables=stage_tables, rank_chunk=rank_chunk)
    block_n, block_t = cfg["BLOCK_N"], cfg["BLOCK_T"]
    rv_p = cfg["RV_P"]
    n_tblocks = triton.cdiv(S, block_t)
    splits_arg = num_splits
    num_splits, split_len = split_plan(S=S, batch=B, num_kv_heads=num_kv_heads, kv_max=kv_max, block_n=block_n,
                                       num_sms=_num_sms(dev), num_splits=num_splits,
                                       waves=decode_waves(group_size, bits) if waves is None else waves,
                                       min_split=min_split)

    if gluon is not False and not row_splits:
        from lrexport.kernels import gluon_latent

        ok = gluon_latent.supported(S=S, D=D, rk=rk, rv=rv, bits=bits, group_size=group_size, nrep=nrep, dtype=cdt,
                                    has_bias=k_bias is not None, window=window, device=dev) and (
            cos.dtype == sin.dtype == torch.float16 and cache_k.stride(-1) == cache_v.stride(-1) == 1
            and block_n == gluon_latent.BLOCK_N)
        if gluon and not ok:
            raise ValueError("gluon=True: the Gluon decode kernel takes one new token per row, float16 caches, "
                             "tables and k_up, per-head latents of ranks 16-128 (multiples of 16) at head dim 128, "
                             "no k_bias or window, on compute capability 9.0")
        ok = ok and (gluon or gluon_latent.preferred(rk, rv))
        if ok and (gluon or (DECODE_GLUON and gluon_latent.failure is None)):
            opts = dict(num_kv_heads=num_kv_heads, nrep=nrep, qk_scale=scale * LOG2E, narrow=gluon_narrow,
                        rel=gluon_rel, maxnreg=maxnreg, lazy=gluon_lazy, table_stages=gluon_table_stages,
                        const_strides=gluon_const_strides)
            try:
                g_splits, g_len = num_splits, split_len
                if waves is None and splits_arg is None:  # as many programs per multiprocessor as fit at once
                    g_splits, g_len = split_plan(
                        S=S, batch=B, num_kv_heads=num_kv_heads, kv_max=kv_max, block_n=block_n,
                        num_sms=_num_sms(dev), min_split=min_split,
                        waves=gluon_latent.resident_blocks(q, cache_k, cache_v, k_up, cos, sin, past, **opts))
                # the Gluon kernel always writes partials
                g_acc = torch.empty(B * num_heads * g_splits * rv_p, dtype=torch.float32, device=dev)
                g_mx = torch.empty(B * num_heads * g_splits, dtype=torch.float32, device=dev)
                g_sm = torch.empty_like(g_mx)
                gluon_latent.decode_partials(q, cache_k, cache_v, k_up, cos, sin, past, g_acc, g_mx, g_sm,
                                             num_splits=g_splits, split_len=g_len, **opts)
            except Exception as e:  # noqa: BLE001 - an experimental Triton API: a version it does not build on
                if gluon:
                    raise
                gluon_latent.fail(e)  # says so once; from now on the Triton kernel runs these steps
                ok = False
        if ok and (gluon or (DECODE_GLUON and gluon_latent.failure is None)):
            last_kernel = "gluon"
            nsplit_p = max(2, _next_pow2(g_splits))
            _combine[(B * num_heads,)](g_acc, g_mx, g_sm, out, g_splits, RV=rv, RV_P=rv_p, NSPLIT_P=nsplit_p,
                                       num_warps=4 if nsplit_p * rv_p >= 2048 else 1)
            return _values_up(out, v_up_GrE, G, rv, group_size, D, nrep) if v_up_GrE is not None else out

    if num_splits > 1:  # the Triton kernel's partials (the Gluon kernel above allocates its own)
        acc = torch.empty(B * S * num_heads * num_splits * rv_p, dtype=torch.float32, device=dev)
        mx = torch.empty(B * S * num_heads * num_splits, dtype=torch.float32, device=dev)
        sm = torch.empty_like(mx)
    else:
        acc = mx = sm = out
    grid = (B * num_kv_heads, n_tblocks, num_splits)

    # a setting whose shared memory does not fit: fewer pipeline stages, then smaller tiles
    if S == 1:  # decode defaults as tuned on an H200 (bench/results/gpu_kernels_tuned_per_batch.json)
        num_stages = DECODE_STAGES[bool(bits)] if num_stages is None else num_stages
        maxnreg = decode_maxnreg(bits, num_warps, maxnreg, kup_on_chip(cfg, k_up.element_size()))
    else:
        maxnreg = maxnreg or None
    last_kernel = "triton"
    for i, (bn, st) in enumerate(fallbacks(block_n, num_stages)):
        stage = ({} if st is None else {"num_stages": st}) | ({} if maxnreg is None else {"maxnreg": maxnreg})
        past_arg = row_split_lengths(past, S, num_splits, bn) if row_splits else past
        try:
            _latent_attn_fwd[grid](
                q, q.stride(0), q.stride(1),
                cache_k, cache_k.stride(0), cache_k.stride(1), ck_params, ck_params.stride(0), ck_params.stride(1),
                cache_v, cache_v.stride(0), cache_v.stride(1), cv_params, cv_params.stride(0), cv_params.stride(1),
                k_up, k_bias if k_bias is not None else k_up, cos, sin, past_arg,
                out, out.stride(0), out.stride(1),
                acc, mx, sm,
                S, split_len, num_splits, scale * LOG2E, RK=rk, RV=rv,
                **{**cfg, "BLOCK_N": bn}, HQ=num_heads, HKV=num_kv_heads, GS=group_size, SPLIT=num_splits > 1,
                WINDOW=window, HAS_BIAS=k_bias is not None, IEEE=cdt == torch.float32, ROW_SPLITS=row_splits,
                num_warps=num_warps, **stage)
            break
        except triton.runtime.errors.OutOfResources:
            if i == len(fallbacks(block_n, num_stages)) - 1:
                raise
    if num_splits > 1:
        nsplit_p = max(2, _next_pow2(num_splits))
        _combine[(B * S * num_heads,)](acc, mx, sm, out, num_splits, RV=rv, RV_P=rv_p, NSPLIT_P=nsplit_p,
                                       num_warps=4 if nsplit_p * rv_p >= 2048 else 1)
    if v_up_GrE is None:
        return out
    return _values_up(out, v_up_GrE, G, rv, group_size, D, nrep)


def _values_up(out: torch.Tensor, v_up_GrE: torch.Tensor, G: int, rv: int, group_size: int, D: int,
               nrep: int) -> torch.Tensor:
    """The attention output [B, S, Hq * rv] in the value-latent space taken up to the heads' [B, S, Hq * D].

    Head ``h`` reads KV head ``kv = h // nrep`` = ``g * group_size + j``, whose values come up by the columns
    ``j * D .. (j + 1) * D`` of group ``g``'s ``v_up``: one batched product over (group, KV head of the group) on
    views, with no per-head copy of ``v_up``."""
    B, S, _ = out.shape
    o = out.view(B, S, G, group_size, nrep, rv)
    up = v_up_GrE.view(G, rv, group_size, D).to(out.dtype)
    return torch.einsum("bsgjnr,grjd->bsgjnd", o, up).reshape(B, S, G * group_size * nrep * D)


def latent_attention(query_BSQ, latent_k_BSR, latent_v_BSR, cache_k, cache_k_params, cache_v, cache_v_params,
                     past_len_B, k_up_GrE, k_bias, v_up_GrE, cos_Pd, sin_Pd, num_heads, num_kv_heads, group_size,
                     window, scale, bits=0, quant_group=0):
    """Functional form (the ``torch.library`` op's semantics): returns the output and new caches."""
    ck, cv = cache_k.clone(), cache_v.clone()
    pk = cache_k_params.clone() if cache_k_params is not None else None
    pv = cache_v_params.clone() if cache_v_params is not None else None
    out = latent_attention_(query_BSQ, latent_k_BSR, latent_v_BSR, ck, pk, cv, pv, past_len_B, k_up_GrE, k_bias,
                            v_up_GrE, cos_Pd, sin_Pd, num_heads, num_kv_heads, group_size, window, scale, bits,
                            quant_group)
    return out, ck, pk, cv, pv


def attention_flops(B: int, S: int, L: int, num_heads: int, num_kv_heads: int, D: int, rk: int, rv: int,
                    group_size: int) -> int:
    """FLOPs of one call over ``L`` cached positions: key rebuild per KV head, scores, ``P @ latent_v``."""
    rebuild = 2 * B * L * rk * D * num_kv_heads  # each KV head rebuilds its D channels from rk
    scores = 2 * B * S * num_heads * L * D
    values = 2 * B * S * num_heads * L * rv
    return rebuild + scores + values

