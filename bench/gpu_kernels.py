"""Decode-attention kernels on the GPU: lrexport's Triton latent attention vs PyTorch SDPA.

    python bench/gpu_kernels.py                         # full sweep (an H200: a few minutes)
    python bench/gpu_kernels.py --contexts 4096 --batches 1 --shapes llama3-8b   # smoke

One decode step (one query token per sequence, ``L`` cached tokens) with Llama-2-7B shapes
(32 heads, head size 128) and Llama-3-8B shapes (32 query / 8 KV heads), fp16:

* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` on the uncompressed
  fp16 K/V cache (GQA through ``enable_gqa``);
* ``ort_gqa``: ONNX Runtime's ``GroupQueryAttention`` on the same cache (a one-node model,
  ``bench/ort_gqa.py``, IO-bound, the cache shared by past and present) where onnxruntime
  with the CUDA execution provider is installed (``--no-ort`` skips it);
* ``lrexport``: the Triton kernel of ``lrexport.kernels.triton_latent`` over Palu latents
  (M-LRD: one KV head per group; G-LRD: groups of 4 KV heads), at 30% and 50% KV reduction,
  fp16 latents or 4-bit packed latents (quantization groups of 32, fp16 scale and zero).
  Ranks are per group, ``rk = rv = floor16((1 - reduction) * s * D)``; the row's
  ``kv_removed`` is the exact fraction. The time is the attention kernel plus the split
  combine; the output stays in the value-latent space (``B_v`` fused into ``o_proj``).

Each row: ``time_us``, the GPU time of one call: the median over calls of the summed durations
of the kernels it launches, as CUPTI records them (``bench/gputime.py``; L2 flushed before each
call); ``call_us``, the median time between events around back-to-back calls
(``triton.testing.do_bench``), which counts the host too when it launches more slowly than the
GPU runs (Python launchers, ONNX Runtime's per-run work); bytes moved (caches, up-projections, RoPE
tables, queries, outputs), FLOPs (key rebuild, scores, values), achieved bandwidth and the
ratio to the roofline floor ``max(bytes / 4.3 TB/s, FLOPs / 790 TFLOP/s)`` (H200, measured
ceilings: device copy and bf16 dense matmul). Writes bench/results/gpu_kernels.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # ort_gqa
PEAK_BW = 4.3e12
PEAK_FLOPS = 7.9e14
SHAPES = {"llama2-7b": (32, 32, 128), "llama3-8b": (32, 8, 128)}  # Hq, Hkv, D
GROUP = {"M": 1, "G": 4}
QG = 32  # quantization group of the 4-bit rows (halved until it divides the rank, see quant_group)


# reduction:grouping:bits of the lrexport rows: M-LRD and G-LRD (groups of 4) at about 30% and 50%, float and 4-bit
DEFAULT_VARIANTS = "0.3:M:0,0.5:M:0,0.3:G:0,0.5:G:0,0.3:M:4,0.5:M:4,0.3:G:4,0.5:G:4"


def quant_group(rank: int) -> int:
    """The quantization group of a packed row of ``rank`` channels: :data:`QG`, halved until whole groups fill the
    rank (down to 8), as an export must choose it (``--kv-quant-group``: ranks are whole groups)."""
    qg = QG
    while rank % qg and qg > 8:
        qg //= 2
    return qg


def floor16(x: float) -> int:
    return max(16, int(x) // 16 * 16)


def roofline_us(nbytes: int, flops: int) -> float:
    return max(nbytes / PEAK_BW, flops / PEAK_FLOPS) * 1e6


def timed(fn) -> tuple[float, float]:
    """(GPU time, call time) of ``fn`` in µs: the kernels' summed durations per call (CUPTI,
    :func:`gputime.gpu_time_us`) and the event time around back-to-back calls
    (``triton.testing.do_bench``), which also counts the host when it cannot keep the GPU fed."""
    from gputime import gpu_time_us
    from triton.testing import do_bench

    fn()
    call = do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
    return gpu_time_us(fn, reps=20), call


def bench_sdpa(B, L, Hq, Hkv, D, dtype):
    q = torch.randn(B, Hq, 1, D, dtype=dtype, device="cuda")
    k = torch.randn(B, Hkv, L, D, dtype=dtype, device="cuda")
    v = torch.randn(B, Hkv, L, D, dtype=dtype, device="cuda")
    fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=Hq != Hkv)  # noqa: E731
    t, call = timed(fn)
    esz = torch.finfo(dtype).bits // 8
    nbytes = 2 * B * Hkv * L * D * esz + 2 * B * Hq * D * esz
    flops = 4 * B * Hq * L * D
    return t, call, nbytes, flops


def ort_gqa_session():
    """(onnxruntime, the CUDA provider list) when ONNX Runtime can run on CUDA, else None."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    return ort


def bench_ort_gqa(ort, B, L, Hq, Hkv, D, dtype):
    """One decode step of ``GroupQueryAttention`` over ``L`` cached tokens (the last one new)."""
    import numpy as np
    import ort_gqa

    opts = ort.SessionOptions()
    sess = ort.InferenceSession(ort_gqa.build(B, Hq, Hkv, D, L, "float16"), opts,
                                providers=[("CUDAExecutionProvider", {"device_id": torch.cuda.current_device()})])
    q = torch.randn(B, 1, Hq * D, dtype=dtype, device="cuda")
    k = torch.randn(B, 1, Hkv * D, dtype=dtype, device="cuda")
    v = torch.randn(B, 1, Hkv * D, dtype=dtype, device="cuda")
    pk = torch.randn(B, Hkv, L, D, dtype=dtype, device="cuda")
    pv = torch.randn(B, Hkv, L, D, dtype=dtype, device="cuda")
    run, _ = ort_gqa.session_step(sess, q, k, v, pk, pv, np.full(B, L - 1, dtype=np.int32),
                                  np.array(L, dtype=np.int32), device="cuda")
    t = timed(run)
    del sess
    return t


def make_latent_case(B, L, Hq, Hkv, D, s, rk, rv, bits, qg, dtype):
    G = Hkv // s
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    if bits:
        ck = torch.randint(0, 256, (B, L, G * rk * bits // 8), dtype=torch.uint8, device=dev, generator=g)
        cv = torch.randint(0, 256, (B, L, G * rv * bits // 8), dtype=torch.uint8, device=dev, generator=g)
        pk = torch.cat([torch.full((B, L, G * rk // qg), 0.05), torch.full((B, L, G * rk // qg), -0.4)], -1)
        pv = torch.cat([torch.full((B, L, G * rv // qg), 0.05), torch.full((B, L, G * rv // qg), -0.4)], -1)
        pk, pv = pk.to(dev, torch.float16), pv.to(dev, torch.float16)
    else:
        ck = torch.randn(B, L, G * rk, dtype=dtype, device=dev, generator=g)
        cv = torch.randn(B, L, G * rv, dtype=dtype, device=dev, generator=g)
        pk = pv = None
    k_up = (torch.randn(G, rk, s * D, device=dev, generator=g) / rk ** 0.5).to(dtype)
    ang = torch.arange(L, device=dev, dtype=torch.float32)[:, None] * (
        1 / 10000 ** (torch.arange(D // 2, device=dev) / (D // 2)))[None]
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    q = torch.randn(B, 1, Hq * D, dtype=dtype, device=dev)
    past = torch.full((B,), L - 1, dtype=torch.int32, device=dev)
    return dict(q=q, ck=ck, pk=pk, cv=cv, pv=pv, k_up=k_up, cos=cos, sin=sin, past=past)


def latent_bytes_flops(B, L, Hq, Hkv, D, s, rk, rv, bits, qg, esz):
    from lrexport.kernels.triton_latent import attention_flops

    G = Hkv // s
    if bits:
        cache = B * L * G * ((rk + rv) * bits // 8 + 4 * (rk + rv) // qg)
    else:
        cache = B * L * G * (rk + rv) * esz
    tables = 2 * L * (D // 2) * esz
    weights = G * rk * s * D * esz
    io = B * Hq * D * esz + B * Hq * rv * esz
    flops = attention_flops(B, 1, L, Hq, Hkv, D, rk, rv, s)
    return cache + tables + weights + io, flops, cache


def bench_latent(c, B, L, Hq, Hkv, D, s, rk, rv, bits, qg, cfg, call: bool = True):
    """(GPU time, call time) in µs; the call time only with ``call`` (else None). ``cfg``: attend_'s settings
    (``rep`` only tells repeats of one setting apart)."""
    from gputime import gpu_time_us

    from lrexport.kernels.triton_latent import attend_

    cfg = {k: v for k, v in cfg.items() if k != "rep"}

    def fn():
        return attend_(c["q"], c["ck"], c["pk"], c["cv"], c["pv"], c["past"], c["k_up"], None, None, c["cos"],
                       c["sin"], Hq, Hkv, s, 0, D ** -0.5, bits, qg, rv=rv, kv_max=L, **cfg)

    if call:
        return timed(fn)
    fn()
    return gpu_time_us(fn, reps=10), None


def ort_latent_session(ort, lib: str, B, L, Hq, Hkv, D, s, rk, rv, bits, qg):
    """A one-node LowRankKVAttention model (``bench/gpu_check_ort.make_model``) on ONNX Runtime's CUDA
    provider with the library ``lib``: float16, caches of ``L`` positions, output in the value-latent space."""
    import numpy as np
    from gpu_check_ort import Shape, attributes, make_model

    G = Hkv // s
    z = lambda *shape, dt=np.float16: np.zeros(shape, dt)  # noqa: E731  (shapes and types only)
    ck, cv = (G * rk * bits // 8, G * rv * bits // 8) if bits else (G * rk, G * rv)
    cdt = np.uint8 if bits else np.float16
    feeds = dict(query=z(B, 1, Hq * D), latent_k=z(B, 1, G * rk), latent_v=z(B, 1, G * rv),
                 past_k=z(B, L, ck, dt=cdt), past_v=z(B, L, cv, dt=cdt), past_len=z(B, dt=np.int64),
                 k_up=z(G, rk, s * D), cos=z(L, D // 2), sin=z(L, D // 2),
                 past_k_params=z(B, L, 2 * G * rk // qg) if bits else None,
                 past_v_params=z(B, L, 2 * G * rv // qg) if bits else None)
    attrs = attributes(Shape(B=B, Hq=Hq, Hkv=Hkv, D=D, s=s, rk=rk, rv=rv, P=L, Prope=L, bits=bits, qg=qg))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.register_custom_ops_library(lib)
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    return ort.InferenceSession(make_model(feeds, attrs), so,
                                providers=[("CUDAExecutionProvider", {"device_id": torch.cuda.current_device()})])


def bench_latent_ort(ort, lib: str, c, B, L, Hq, Hkv, D, s, rk, rv, bits, qg):
    """(GPU time, call time) in µs of the library's CUDA kernel on the case ``c`` (the same caches as the
    Triton rows), through ONNX Runtime with IO binding: the new token written in place at ``L - 1``, the
    attention and the split combine. Which decode kernel runs is the library's choice for the call
    (``LREXPORT_CUDA_DECODE``)."""
    import numpy as np

    sess = ort_latent_session(ort, lib, B, L, Hq, Hkv, D, s, rk, rv, bits, qg)
    G = Hkv // s
    io = sess.io_binding()
    np_type = {torch.float16: np.float16, torch.uint8: np.uint8}

    def bind(name, t, output=False):
        (io.bind_output if output else io.bind_input)(name, "cuda", 0, np_type[t.dtype], list(t.shape), t.data_ptr())

    new_k = torch.randn(B, 1, G * rk, dtype=torch.float16, device="cuda")
    new_v = torch.randn(B, 1, G * rv, dtype=torch.float16, device="cuda")
    out = torch.empty(B, 1, Hq * rv, dtype=torch.float16, device="cuda")
    for n, t in (("query", c["q"]), ("latent_k", new_k), ("latent_v", new_v), ("past_k", c["ck"]),
                 ("past_v", c["cv"]), ("k_up", c["k_up"]), ("cos", c["cos"]), ("sin", c["sin"])):
        bind(n, t)
    io.bind_cpu_input("past_len", np.full(B, L - 1, np.int64))
    bind("present_k", c["ck"], True)
    bind("present_v", c["cv"], True)
    if bits:
        bind("past_k_params", c["pk"])
        bind("past_v_params", c["pv"])
        bind("present_k_params", c["pk"], True)
        bind("present_v_params", c["pv"], True)
    bind("output", out, True)

    def run():
        sess.run_with_iobinding(io)

    return timed(run)


CONFIGS = [dict(block_n=bn, num_warps=w, num_stages=st, waves=wv, swap=sw)
           for bn, w, st in ((64, 4, 2), (64, 4, 3), (64, 8, 3), (128, 4, 2))
           for sw in (False, True)
           for wv in (2, 4, 8)]
# a quick grid around the settings the full one picks most (bench/results/gpu_kernels_tuned_per_batch.json)
SMALL_CONFIGS = [dict(block_n=bn, num_warps=w, num_stages=st, waves=wv, swap=True)
                 for bn, w, st in ((64, 4, 3), (64, 8, 3), (128, 4, 2)) for wv in (4, 8)]


# the split rule: programs per multiprocessor and the shortest split
SPLIT_CONFIGS = [dict(block_n=64, num_warps=4, num_stages=3, waves=wv, min_split=ms, swap=True)
                 for wv in (4, 8, 16, 32) for ms in (256, 1024)]


# programs per multiprocessor: smaller tiles, fewer warps, a register cap
OCCUPANCY_CONFIGS = [dict(block_n=bn, num_warps=w, num_stages=st, waves=16, min_split=256, swap=True)
                     | ({} if nreg is None else {"maxnreg": nreg})
                     for bn in (16, 32, 64) for w in (2, 4) for st in (2, 3, 4) for nreg in (None, 128)]


# one key-rebuild / score product per tile (``pair``) or one per half; pipeline stages and a register cap that
# let three blocks share a multiprocessor (168 registers x 128 threads x 3 fit the 64K registers); more splits
PAIR_CONFIGS = [dict(block_n=64, num_warps=4, num_stages=st, waves=wv, swap=True, pair=pr)
                | ({} if nreg is None else {"maxnreg": nreg})
                for pr in (False, True) for st, nreg in ((None, None), (2, None), (2, 168), (3, 168))
                for wv in (8, 16)]


# the keys' RoPE in float16 pairs (``rope16=2``) and the softmax sums reduced once after the loop (``lazy_sum``),
# each on top of the library's defaults
ROPE16_CONFIGS = [dict(rope16=r, lazy_sum=lz) for r in (0, 2) for lz in (False, True)]


# each row dividing its own length among the splits in the kernel (LowRankKVAttentionDeviceLen's kernels, for
# CUDA graphs) against split lengths from the launch, on the same split plan
ROW_SPLITS_CONFIGS = [dict(row_splits=rs) for rs in (False, True)]


# ranks that are not powers of two: a power-of-two chunk plus a narrow tail (keys, values, both), or one product over
# the padding
SPLIT_RANKS_CONFIGS = [dict(split_ranks=sr) for sr in ("", "k", "v", "kv")]
# the same with smaller tiles and deeper pipelines (more blocks per multiprocessor for the rank-80 M-LRD kernel)
SPLIT_RANKS_TILE_CONFIGS = [dict(split_ranks=sr, block_n=bn, num_stages=st) for sr in ("", "k", "kv")
                            for bn in (32, 64) for st in (3, 4)]


# the RoPE table rows staged with the latents or read outside the pipeline (less shared memory per stage), with
# each rank split; and unstaged tables under a 128-register cap (four 4-bit blocks per multiprocessor)
TABLES_CONFIGS = ([dict(stage_tables=st, split_ranks=sr) for st in (True, False) for sr in ("auto", "kv")]
                  + [dict(stage_tables=False, maxnreg=128)])


# 4-bit latents: the register cap (168 by default, 0 = none), two pipeline stages, eight warps, unsplit ranks,
# tiles of 32 positions
BITS4_CONFIGS = [{}, dict(maxnreg=0), dict(num_stages=2), dict(maxnreg=0, num_stages=2), dict(num_warps=8),
                 dict(split_ranks=""), dict(block_n=32)]


# key ranks per step of the streamed k_up's chunk loop (G-LRD): 32 (the default where it divides the rank) or 64
RANK_CHUNK_CONFIGS = [{}, dict(rank_chunk=64)]


# G-LRD with k_up on chip: as it is, without the 4-bit register cap, with two stages, and with both sides of the
# rank split (rank 352 = 256 + 96 of a 128 tail)
HOIST_CONFIGS = [{}, dict(hoist=True), dict(hoist=True, maxnreg=0), dict(hoist=True, maxnreg=0, num_stages=2),
                 dict(hoist=True, maxnreg=0, split_ranks="kv")]


# ranks just past a power of two (M-LRD at 37.5%, rank 80: one block per multiprocessor at 4 warps): eight warps
# in that block, larger tiles, two stages
RANK80_CONFIGS = [{}, dict(num_warps=8), dict(num_warps=8, num_stages=2), dict(num_warps=8, block_n=128),
                  dict(num_warps=8, block_n=128, num_stages=2), dict(block_n=128, num_stages=2)]


# G-LRD at 50% with its 64 KB k_up slice on chip (one block per multiprocessor): a second warp group in that block,
# with two stages or tiles of 128 positions
GLRD_WARPS_CONFIGS = [{}, dict(num_warps=8), dict(num_warps=8, num_stages=2), dict(num_warps=8, block_n=128)]


# the Triton decode kernel against the Gluon one (lrexport/kernels/gluon_latent.py; M-LRD at rank 64 only), with its
# query rows padded to 16 or to 8 (gluon_latent.query_rows)
GLUON_CONFIGS = [dict(gluon=False), dict(gluon=True, gluon_narrow=False), dict(gluon=True, gluon_narrow=True)]
# the Gluon kernel's RoPE by table row per key against by relative position (gluon_latent.RELATIVE_ROPE); capped at
# 168 registers the relative form fits three blocks per multiprocessor
GLUON_REL_CONFIGS = [dict(gluon=False), dict(gluon=True, gluon_narrow=True), dict(gluon=True, gluon_narrow=True,
                     gluon_rel=True), dict(gluon=True, gluon_narrow=False, gluon_rel=True),
                     dict(gluon=True, gluon_narrow=True, gluon_rel=True, maxnreg=168)]

# the Gluon kernel's softmax maximum per tile (a reduction across its warps, two barriers) against a tile late
# (gluon_latent.LAZY_MAX), with query rows padded to 8 and to 16
GLUON_LAZY_CONFIGS = [dict(gluon=False), dict(gluon=True), dict(gluon=True, gluon_lazy=True),
                      dict(gluon=True, gluon_narrow=False), dict(gluon=True, gluon_narrow=False, gluon_lazy=True)]
# the same two, alternated three times (the spread of one setting's times against the difference between them)
GLUON_LAZY_AB_CONFIGS = [dict(gluon=True, gluon_lazy=lazy, rep=i) for i in range(3) for lazy in (True, False)]

# the Gluon kernel's table rows in two stages (copied with the key latents two tiles ahead; two blocks per
# multiprocessor) against one (a tile ahead; three blocks fit), with the split rule's 2, 3, 4 or 6 programs per
# multiprocessor, alternated twice
GLUON_TABLES_CONFIGS = [dict(gluon=True, gluon_table_stages=t, waves=w, rep=i) for i in range(2)
                        for t, w in ((2, 2), (1, 2), (1, 3), (2, 4), (1, 6))]

# the Gluon kernel with the caches' position strides compiled in (gluon_latent.CONST_STRIDES) or passed at run
# time, alternated twice
GLUON_STRIDES_CONFIGS = [dict(gluon=True, gluon_const_strides=c, rep=i) for i in range(2) for c in (True, False)]

# the Gluon kernel's number of splits: the split rule's (None) against whole waves of resident blocks
GLUON_SPLIT_CONFIGS = [dict(gluon=True, gluon_narrow=True)] + [dict(gluon=True, gluon_narrow=True, num_splits=n)
                                                               for n in (4, 8, 16, 32)]

# the split rule's programs per multiprocessor (rounded down: whole waves of two resident blocks at 2) and shortest
# split, for every kernel
WAVES_CONFIGS = [dict(waves=w, min_split=m) for w in (2, 4, 8) for m in (512, 1024)]

# the library's defaults only (attend_'s own settings): no tuning
DEFAULT_CONFIGS = [{}]


GRIDS = {"full": CONFIGS, "small": SMALL_CONFIGS, "splits": SPLIT_CONFIGS, "occupancy": OCCUPANCY_CONFIGS,
         "pair": PAIR_CONFIGS, "rope16": ROPE16_CONFIGS, "rowsplits": ROW_SPLITS_CONFIGS,
         "splitranks": SPLIT_RANKS_CONFIGS, "splitranks_tiles": SPLIT_RANKS_TILE_CONFIGS, "tables": TABLES_CONFIGS,
         "bits4": BITS4_CONFIGS, "rankchunk": RANK_CHUNK_CONFIGS, "hoist": HOIST_CONFIGS,
         "rank80": RANK80_CONFIGS, "glrd_warps": GLRD_WARPS_CONFIGS, "gluon": GLUON_CONFIGS,
         "gluon_rel": GLUON_REL_CONFIGS, "gluon_lazy": GLUON_LAZY_CONFIGS,
         "gluon_lazy_ab": GLUON_LAZY_AB_CONFIGS, "gluon_tables": GLUON_TABLES_CONFIGS,
         "gluon_strides": GLUON_STRIDES_CONFIGS,
         "gluon_splits": GLUON_SPLIT_CONFIGS, "waves": WAVES_CONFIGS,
         "default": DEFAULT_CONFIGS}


def grid(name: str, rel_ropes: list[int]) -> list[dict]:
    """The kernel settings to tune over: a grid times the RoPE modes of ``triton_latent.DECODE_REL_ROPE``."""
    return [dict(cfg, rel_rope=rr) for cfg in GRIDS[name] for rr in rel_ropes]


def _kernel_cache() -> dict:
    from lrexport.kernels import triton_latent as tlk

    caches = tlk._latent_attn_fwd.device_caches
    dev = torch.cuda.current_device()
    return caches[dev][0] if dev in caches else {}


def _resources(kernels: list) -> dict:
    """Registers, spills, shared memory and blocks per multiprocessor of a newly compiled attention kernel."""
    if not kernels:
        return {}
    from triton.runtime.errors import OutOfResources

    from lrexport.kernels.gluon_latent import blocks_per_sm

    for k in reversed(kernels):  # the newest one that launches (a setting too large was compiled, then retried)
        try:
            k._init_handles()
            break
        except OutOfResources:
            continue
    else:
        return {}
    props = torch.cuda.get_device_properties(0)
    smem_sm = getattr(props, "shared_memory_per_multiprocessor", 233472)
    return dict(n_regs=k.n_regs, n_spills=k.n_spills, shared=k.metadata.shared,
                blocks_per_sm=blocks_per_sm(k.n_regs, k.metadata.shared, k.metadata.num_warps, smem_sm))


def tune(c, B, L, Hq, Hkv, D, s, rk, rv, bits, qg, configs=None, try_hoist=True):
    """The fastest kernel config for this variant (timed at the tuning context) and every config's time.

    With ``try_hoist``, G-LRD variants also try keeping the whole ``k_up`` slice on chip (``hoist``),
    which the kernel does by itself only for small slices (``--grid default`` does not: its rows are
    what the library picks).
    """
    best, timings = None, []
    configs = configs or CONFIGS
    configs = configs + ([dict(cfg, hoist=True) for cfg in configs
                          if cfg.get("block_n", 64) == 64 and cfg.get("num_warps", 4) == 4 and "hoist" not in cfg
                          and dict(cfg, hoist=True) not in configs]
                         if s > 1 and try_hoist else [])
    for cfg in configs:
        before = set(_kernel_cache())
        try:
            t, _ = bench_latent(c, B, L, Hq, Hkv, D, s, rk, rv, bits, qg, cfg, call=False)
        except Exception as e:  # a config that does not fit (shared memory, registers)
            print(f"  config {cfg} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        new = [k for key, k in _kernel_cache().items() if key not in before]
        timings.append(dict(cfg, time_us=t, **_resources(new)))
        if best is None or t < best[0]:
            best = (t, cfg)
    return (None if best is None else best[1]), timings


def save(args, argv, rows, tuning, t_start) -> None:
    """Write the rows so far (atomically): a sweep cut short still leaves its measurements."""
    props = torch.cuda.get_device_properties(0)
    import triton

    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{props.name}, {props.multi_processor_count} SMs, {platform.machine()}, torch "
                         f"{torch.__version__}, triton {triton.__version__}",
              "command": " ".join(["python", "bench/gpu_kernels.py", *(argv if argv is not None else sys.argv[1:])]),
              "settings": {"dtype": "float16", "quant_group": QG, "peak_bw": PEAK_BW, "peak_flops": PEAK_FLOPS,
                           "timing": "time_us: median over 20 calls of the summed CUPTI kernel durations per call "
                                     "(L2 flushed before each); call_us: triton.testing.do_bench median "
                                     "(warmup 25 ms, rep 100 ms); tuning by time_us (10 calls)",
                           "lrexport_time": "attention kernel + split combine; cache holds the new token",
                           "wall_s": time.time() - t_start},
              "rows": rows, "tuning": tuning}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json.tmp").write_text(json.dumps(result, indent=1))
    out.with_suffix(".json.tmp").replace(out)
    write_md(result, out.with_suffix(".md"))


def main(argv=None) -> int:
    from lrexport.kernels import triton_latent as tlk

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama2-7b,llama3-8b")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--contexts", default="4096,16384,32768,65536,131072")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help="reduction:grouping:bits, comma separated")
    ap.add_argument("--tune-context", type=int, default=32768)
    ap.add_argument("--grid", choices=list(GRIDS),
                    default="full",
                    help="kernel settings to tune over")
    ap.add_argument("--rel-rope", default=str(tlk.DECODE_REL_ROPE),
                    help="RoPE modes to tune over, comma separated (0: a table row per key, 1/2: angle addition)")
    ap.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime's GroupQueryAttention rows")
    ap.add_argument("--lib", default=None,
                    help="liblrexport_ops.so built with its CUDA kernel: also time it through ONNX Runtime on the "
                         "same caches (rows with kernel 'cuda warp|wmma (ONNX Runtime)': LREXPORT_CUDA_DECODE=warp "
                         "runs the hand-written decode kernel, else the WMMA one, as the node here carries no "
                         "Triton kernel)")
    ap.add_argument("--out", default=str(RESULTS / "gpu_kernels.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_kernels: no CUDA device; this benchmark runs on a GPU machine", file=sys.stderr)
        return 2
    dtype = torch.float16
    esz = 2
    rows, tuning = [], []
    ort = None if args.no_ort else ort_gqa_session()
    if ort is None and not args.no_ort:
        print("gpu_kernels: onnxruntime with the CUDA execution provider is not installed; no ort_gqa rows",
              flush=True)
    variants = [(float(r), gname, int(b)) for r, gname, b in (v.split(":") for v in args.variants.split(","))]
    t_start = time.time()
    for shape in args.shapes.split(","):
        Hq, Hkv, D = SHAPES[shape]
        configs = {}
        for B in map(int, args.batches.split(",")):
            for L in map(int, args.contexts.split(",")):
                t, call, nbytes, flops = bench_sdpa(B, L, Hq, Hkv, D, dtype)
                base = dict(shape=shape, batch=B, context=L, variant="sdpa", kv_removed=0.0, grouping=None, bits=None,
                            time_us=t, call_us=call, bytes=nbytes, flops=flops, roofline_us=roofline_us(nbytes, flops),
                            kv_bytes=2 * B * Hkv * L * D * esz)
                base.update(bw_tb_s=nbytes / t / 1e6, of_roofline=t / base["roofline_us"], speedup_vs_sdpa=1.0)
                rows.append(base)
                print(f"{shape} B={B} L={L} sdpa {t:.1f} us (call {call:.1f}; {base['bw_tb_s']:.2f} TB/s)", flush=True)
                torch.cuda.empty_cache()
                if ort is not None:
                    tg, call_g = bench_ort_gqa(ort, B, L, Hq, Hkv, D, dtype)
                    row = dict(base, variant="ort_gqa", time_us=tg, call_us=call_g, bw_tb_s=nbytes / tg / 1e6,
                               of_roofline=tg / base["roofline_us"], speedup_vs_sdpa=t / tg)
                    rows.append(row)
                    print(f"  ort_gqa {tg:.1f} us (call {call_g:.1f}; x{t / tg:.2f} vs sdpa)", flush=True)
                    torch.cuda.empty_cache()
                for red, gname, bits in variants:
                    s = GROUP[gname]
                    rk = rv = floor16((1 - red) * s * D)
                    qg = quant_group(rk)
                    c = make_latent_case(B, L, Hq, Hkv, D, s, rk, rv, bits, qg, dtype)
                    key = (red, gname, bits, B)  # tuned per batch: the best split differs
                    if key not in configs:
                        tc = make_latent_case(B, args.tune_context, Hq, Hkv, D, s, rk, rv, bits, qg, dtype)
                        configs[key], timings = tune(tc, B, args.tune_context, Hq, Hkv, D, s, rk, rv, bits, qg,
                                                       grid(args.grid, [int(x) for x in args.rel_rope.split(",")]),
                                                       try_hoist=args.grid != "default")
                        tuning.append(dict(shape=shape, kv_removed=1 - rk / (s * D), grouping=gname, bits=bits or None,
                                           quant_group=qg if bits else None, context=args.tune_context, batch=B,
                                           configs=timings))
                        del tc
                    cfg = configs[key]
                    if cfg is None:
                        print(f"  lrexport {gname} -{red:.0%} bits={bits}: no kernel config fits", flush=True)
                        continue
                    tl_us, call_l = bench_latent(c, B, L, Hq, Hkv, D, s, rk, rv, bits, qg, cfg)
                    kernel = tlk.last_kernel  # which kernel ran it
                    nb, fl, cache = latent_bytes_flops(B, L, Hq, Hkv, D, s, rk, rv, bits, qg, esz)
                    row = dict(shape=shape, batch=B, context=L, variant="lrexport", kv_removed=1 - rk / (s * D),
                               grouping=gname, bits=bits or None, quant_group=qg if bits else None, rank_k=rk,
                               rank_v=rv, group_size=s, time_us=tl_us,
                               call_us=call_l,
                               bytes=nb, flops=fl, roofline_us=roofline_us(nb, fl), kv_bytes=cache, config=cfg)
                    row.update(bw_tb_s=nb / tl_us / 1e6, of_roofline=tl_us / row["roofline_us"],
                               speedup_vs_sdpa=t / tl_us)
                    row["kernel"] = kernel
                    rows.append(row)
                    if ort is not None and args.lib:
                        tw, call_w = bench_latent_ort(ort, args.lib, c, B, L, Hq, Hkv, D, s, rk, rv, bits, qg)
                        which = "warp" if os.environ.get("LREXPORT_CUDA_DECODE") == "warp" else "wmma"
                        wrow = dict(row, kernel=f"cuda {which} (ONNX Runtime)", time_us=tw, call_us=call_w, config=None,
                                    bw_tb_s=nb / tw / 1e6, of_roofline=tw / row["roofline_us"],
                                    speedup_vs_sdpa=t / tw, speedup_vs_triton=tl_us / tw)
                        rows.append(wrow)
                        print(f"  lrexport {gname} -{red:.0%} bits={bits} CUDA library: {tw:.1f} us "
                              f"(call {call_w:.1f}), x{t / tw:.2f} vs sdpa, x{tl_us / tw:.2f} vs Triton, "
                              f"{wrow['of_roofline']:.2f} of roofline", flush=True)
                    bound = "compute" if fl / PEAK_FLOPS > nb / PEAK_BW else "memory"
                    bq = f"{bits}/{qg}" if bits else "0"
                    print(f"  lrexport {gname} -{red:.0%} bits={bq} r={rk}: {tl_us:.1f} us (call {call_l:.1f}), "
                          f"x{t / tl_us:.2f} vs sdpa, {row['of_roofline']:.2f} of roofline ({bound}-bound floor) "
                          f"cfg={cfg}", flush=True)
                    del c
                    torch.cuda.empty_cache()
                save(args, argv, rows, tuning, t_start)
    save(args, argv, rows, tuning, t_start)
    return 0


def _bits(row: dict) -> str:
    qg = row.get("quant_group")
    return f"{row['bits']}/{qg}" if row["bits"] and qg and qg != QG else str(row["bits"] or "-")


def write_md(result: dict, path: Path) -> None:
    lines = [f"# Decode attention on the GPU ({result['date']})", "", f"Machine: {result['machine']}", "",
             f"Command: `{result['command']}`", "",
             "fp16; time = GPU time per call (summed kernel durations, median); call = event time around "
             "back-to-back calls (host included when it is the bottleneck); "
             "`x sdpa` = SDPA time / this time (same shape, batch, context, same run); "
             "`roofline` = time / max(bytes/4.3 TB/s, FLOPs/790 TFLOP/s); `bits` 4/16: 4-bit codes in "
             f"quantization groups of 16 channels (the rank is not a multiple of {QG}).", "",
             "| shape | batch | context | variant | kernel | kv_removed | grouping | bits | time_us | call_us | TB/s | "
             "roofline | x sdpa |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['shape']} | {r['batch']} | {r['context']} | {r['variant']} | {r.get('kernel', '-')} | "
                     f"{r['kv_removed']:.3f} | "
                     f"{r['grouping'] or '-'} | {_bits(r)} | {r['time_us']:.1f} | "
                     f"{r.get('call_us') or float('nan'):.1f} | {r['bw_tb_s']:.2f} | {r['of_roofline']:.2f} | "
                     f"{r['speedup_vs_sdpa']:.2f} |")
    tuned = [t for t in result.get("tuning", []) if len(t["configs"]) > 1]
    if tuned:
        lines += ["", "Kernel settings tried (time at the tuning context; registers per thread, spilled bytes, shared "
                  "memory per block and blocks per multiprocessor of the compiled kernel):", "",
                  "| shape | batch | context | kv_removed | grouping | bits | settings | time_us | registers | spilled "
                  "| shared | blocks/SM |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for t in tuned:
            for c in t["configs"]:
                cfg = ", ".join(f"{k}={v}" for k, v in c.items()
                                if k not in ("time_us", "n_regs", "n_spills", "shared", "blocks_per_sm", "rel_rope"))
                lines.append(f"| {t['shape']} | {t['batch']} | {t['context']} | {t['kv_removed']:.3f} | "
                             f"{t['grouping']} | {_bits(t)} | {cfg or 'defaults'} | {c['time_us']:.1f} | "
                             + " | ".join(str(c.get(k, "-")) for k in ("n_regs", "n_spills", "shared", "blocks_per_sm"))
                             + " |")
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
