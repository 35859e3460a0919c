"""Forms of a lean M-LRD decode kernel, to learn what moves its time before changing the library's kernel.

A lean M-LRD float16 decode kernel (one new token per row, ``k_up`` on chip, keys rebuilt and RoPE'd per
tile, swapped orientation, online softmax with lazy sums, splits combined in PyTorch) in forms that differ
only in how a tile's latents reach the products:

- ``ptr``: masked pointer loads, which Triton's pipeliner turns into asynchronous copies (as the library's
  kernel, ``lrexport/kernels/triton_latent.py``, does);
- ``tma``: device-side tensor descriptors whose row count is the split's end, so the hardware zero-fills
  positions past it and the loop needs no masks or per-thread addresses;
- ``tma_ws``: the same loop with ``warp_specialize=True`` (a producer warp issuing the loads);
- ``ahead``: the next tile's keys rebuilt one iteration ahead, before this tile's RoPE, softmax and values;
- ``ahead_async``: the same with the rebuild written as an accumulator chain zeroed by a run-time flag, the
  pattern Triton's Hopper pipeliner issues as an asynchronous ``wgmma`` (its second product then runs
  under the RoPE arithmetic);
- ``gluon``, ``gluon_sync``, ``gluon2``, ``gluon2_sync``: the loop in Gluon (``bench/gluon_decode.py``), its
  products overlapped by hand or each waited for at once, with 3 or 2 pipeline stages; ``gluon_rings``:
  overlapped, with key latents and table rows copied two tiles ahead and value latents one (two blocks
  per multiprocessor); ``gluon_rings16``: the same with the keys' RoPE in float16;
- ablations, wrong on purpose, to see what a part of the loop costs: ``abl_tables`` rotates every tile's
  keys with the split's first table rows (the same loads, but no new table bytes after the first tile),
  ``abl_rope`` scales each key half by one table instead of rotating the pair (the same loads, a third of
  the arithmetic), ``abl_rebuild`` takes the latent tile itself as both key halves (rank D / 2: the same
  loads, no key-rebuild product).

It also times the library's own kernel and PyTorch SDPA on the uncompressed cache on the same shapes, and
checks each form against a float64 reference on fresh random inputs. Usage (GPU):
``python bench/decode_probe.py --modes ptr,tma,tma_ws --out bench/results/decode_probe_tma.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_kernels import bench_latent, make_latent_case  # noqa: E402
from gputime import gpu_time_us  # noqa: E402


@triton.jit
def _lean_decode(Q, CK, CV, KUP, COS, SIN, ACC, MAX, SUM, L, split_len, lcap, qk_scale,
                 HKV: tl.constexpr, D: tl.constexpr, R: tl.constexpr, NREP: tl.constexpr, M: tl.constexpr,
                 BLOCK_N: tl.constexpr, MODE: tl.constexpr):
    HALF: tl.constexpr = D // 2
    pid_bj = tl.program_id(0)
    sp = tl.program_id(1)
    nsplit = tl.num_programs(1)
    b = (pid_bj // HKV).to(tl.int64)
    j = pid_bj % HKV
    r = tl.arange(0, M)
    rvalid = r < NREP
    head = j * NREP + r % NREP
    d = tl.arange(0, HALF)
    qpos = L - 1
    qrow = Q + (b * HKV * NREP + head) * D
    q1 = tl.load(qrow[:, None] + d[None, :], mask=rvalid[:, None], other=0.0).to(tl.float32)
    q2 = tl.load(qrow[:, None] + HALF + d[None, :], mask=rvalid[:, None], other=0.0).to(tl.float32)
    qc = tl.load(COS + qpos * HALF + d).to(tl.float32)[None, :]
    qs = tl.load(SIN + qpos * HALF + d).to(tl.float32)[None, :]
    q1t = tl.trans(((q1 * qc - q2 * qs) * qk_scale).to(tl.float16))
    q2t = tl.trans(((q2 * qc + q1 * qs) * qk_scale).to(tl.float16))
    rr = tl.arange(0, R)
    u1 = tl.load(KUP + j * R * D + rr[:, None] * D + d[None, :])
    u2 = tl.load(KUP + j * R * D + rr[:, None] * D + HALF + d[None, :])

    start = sp * split_len
    end = tl.minimum(L, start + split_len)
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_t = tl.zeros([BLOCK_N, M], tl.float32)
    acc_t = tl.zeros([R, M], tl.float32)
    if MODE == 1 or MODE == 2:  # tensor descriptors
        kdesc = tl.make_tensor_descriptor(CK + b * lcap * HKV * R, shape=[end, HKV * R], strides=[HKV * R, 1],
                                          block_shape=[BLOCK_N, R])
        vdesc = tl.make_tensor_descriptor(CV + b * lcap * HKV * R, shape=[end, HKV * R], strides=[HKV * R, 1],
                                          block_shape=[BLOCK_N, R])
        cdesc = tl.make_tensor_descriptor(COS, shape=[end, HALF], strides=[HALF, 1], block_shape=[BLOCK_N, HALF])
        sdesc = tl.make_tensor_descriptor(SIN, shape=[end, HALF], strides=[HALF, 1], block_shape=[BLOCK_N, HALF])
    if MODE == 3 or MODE == 4:  # the first tile's keys, rebuilt before the loop
        offs0 = start + tl.arange(0, BLOCK_N)
        row0 = (b * lcap + offs0.to(tl.int64))[:, None] * (HKV * R) + j * R + rr[None, :]
        lat0 = tl.load(CK + row0, mask=(offs0 < end)[:, None], other=0.0)
        k1n = tl.dot(lat0, u1)
        k2n = tl.dot(lat0, u2)
    for n0 in tl.range(start, end, BLOCK_N, warp_specialize=MODE == 2):
        offs = n0 + tl.arange(0, BLOCK_N)
        nmask = offs < end
        if MODE == 3 or MODE == 4:  # this tile's keys were rebuilt last iteration; start the next tile's now
            k1 = k1n
            k2 = k2n
            offs_nx = offs + BLOCK_N
            row_nx = (b * lcap + offs_nx.to(tl.int64))[:, None] * (HKV * R) + j * R + rr[None, :]
            lat_nx = tl.load(CK + row_nx, mask=(offs_nx < end)[:, None], other=0.0)
            if MODE == 4:  # the accumulator chain the compiler makes asynchronous, zeroed by a run-time flag
                k1n = tl.dot(lat_nx, u1, tl.where(lcap > 0, 0.0, k1n))
                k2n = tl.dot(lat_nx, u2, tl.where(lcap > 0, 0.0, k2n))
            else:
                k1n = tl.dot(lat_nx, u1)
                k2n = tl.dot(lat_nx, u2)
            row = (b * lcap + offs.to(tl.int64))[:, None] * (HKV * R) + j * R + rr[None, :]
            v = tl.load(CV + row, mask=nmask[:, None], other=0.0)
            kc = tl.load(COS + offs[:, None] * HALF + d[None, :], mask=nmask[:, None], other=0.0)
            ks = tl.load(SIN + offs[:, None] * HALF + d[None, :], mask=nmask[:, None], other=0.0)
        elif MODE == 1 or MODE == 2:
            lat = kdesc.load([n0, j * R])
            v = vdesc.load([n0, j * R])
            kc = cdesc.load([n0, 0])
            ks = sdesc.load([n0, 0])
            k1 = tl.dot(lat, u1)
            k2 = tl.dot(lat, u2)
        else:
            row = (b * lcap + offs.to(tl.int64))[:, None] * (HKV * R) + j * R + rr[None, :]
            lat = tl.load(CK + row, mask=nmask[:, None], other=0.0)
            v = tl.load(CV + row, mask=nmask[:, None], other=0.0)
            # abl_tables reads the first tile's rows every time: the same loads, no new table bytes
            trow = (start + tl.arange(0, BLOCK_N)) if MODE == 5 else offs
            kc = tl.load(COS + trow[:, None] * HALF + d[None, :], mask=nmask[:, None], other=0.0)
            ks = tl.load(SIN + trow[:, None] * HALF + d[None, :], mask=nmask[:, None], other=0.0)
            if MODE == 7:  # ablation: the latent tile itself as both key halves (rank = D / 2), no rebuild product
                k1 = lat.to(tl.float32)
                k2 = lat.to(tl.float32)
            else:
                k1 = tl.dot(lat, u1)
                k2 = tl.dot(lat, u2)
        kc = kc.to(tl.float32)
        ks = ks.to(tl.float32)
        if MODE == 6:  # ablation: each half scaled by one table instead of rotated (the same loads, less arithmetic)
            kr1 = (k1 * kc).to(tl.float16)
            kr2 = (k2 * ks).to(tl.float16)
        else:
            kr1 = (k1 * kc - k2 * ks).to(tl.float16)
            kr2 = (k2 * kc + k1 * ks).to(tl.float16)
        s_t = tl.dot(kr1, q1t) + tl.dot(kr2, q2t)
        s_t = tl.where(nmask[:, None] & rvalid[None, :], s_t, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s_t, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p_t = tl.math.exp2(s_t - m_safe[None, :])
        l_t = l_t * alpha[None, :] + p_t
        acc_t = acc_t * alpha[None, :] + tl.dot(tl.trans(v), p_t.to(tl.float16))
        m_i = m_new
    l_i = tl.sum(l_t, 0)
    part = (b * HKV * NREP + head) * nsplit + sp
    tl.store(MAX + part, m_i, mask=rvalid)
    tl.store(SUM + part, l_i, mask=rvalid)
    tl.store(ACC + part[:, None] * R + rr[None, :], tl.trans(acc_t), mask=rvalid[:, None])


MODES = {"ptr": 0, "tma": 1, "tma_ws": 2, "ahead": 3, "ahead_async": 4, "abl_tables": 5, "abl_rope": 6,
         "abl_rebuild": 7}
# ablations: wrong on purpose (they measure what a part of the loop costs), so not checked against float64
ABLATIONS = ("abl_tables", "abl_rope", "abl_rebuild")


# the Gluon kernels of bench/gluon_decode.py: (pipeline stages, overlapped products, split rings, float16 RoPE)
GLUON_FORMS = {"gluon": (3, True, False, False), "gluon_sync": (3, False, False, False),
               "gluon2": (2, True, False, False), "gluon2_sync": (2, False, False, False),
               "gluon_rings": (2, True, True, False), "gluon_rings16": (2, True, True, True)}


def lean_decode(mode, q, ck, cv, kup, cos, sin, L, nsplit, block_n=64, num_stages=3):
    """Output [B, Hq, R] (value-latent space, float16) of the lean kernel in ``mode`` over the first ``L``
    positions; the splits are combined by the library's kernel (``triton_latent._combine``), as ``attend_`` does."""
    if mode in GLUON_FORMS:  # Gluon needs a GPU and a Triton that has it: imported only for these forms
        from gluon_decode import gluon_partials

        stages, overlap, rings, rope16 = GLUON_FORMS[mode]
        return combine_splits(*gluon_partials(q, ck, cv, kup, cos, sin, L, nsplit, overlap=overlap,
                                              num_stages=stages, rings=rings, rope16=rope16))
    B, Hq, D = q.shape
    Hkv, R, _ = kup.shape
    nrep = Hq // Hkv
    split_len = triton.cdiv(triton.cdiv(L, nsplit), block_n) * block_n
    nsplit = triton.cdiv(L, split_len)
    acc = torch.empty(B, Hq, nsplit, R, device=q.device, dtype=torch.float32)
    mx = torch.empty(B, Hq, nsplit, device=q.device, dtype=torch.float32)
    sm = torch.empty_like(mx)
    _lean_decode[(B * Hkv, nsplit)](q, ck, cv, kup, cos, sin, acc, mx, sm, L, split_len, ck.shape[1],
                                    D ** -0.5 * 1.4426950408889634, HKV=Hkv, D=D, R=R, NREP=nrep,
                                    M=max(16, triton.next_power_of_2(nrep)), BLOCK_N=block_n, MODE=MODES[mode],
                                    num_warps=4, num_stages=num_stages)
    return combine_splits(acc, mx, sm)


def combine_splits(acc, mx, sm):
    """[B, Hq, R] float16 from per-split partials, with the library's combine kernel."""
    from lrexport.kernels import triton_latent as tlk

    B, Hq, ns, R = acc.shape
    out = torch.empty(B, Hq, R, device=acc.device, dtype=torch.float16)
    nsp = max(2, triton.next_power_of_2(ns))
    tlk._combine[(B * Hq,)](acc, mx, sm, out, ns, RV=R, RV_P=R, NSPLIT_P=nsp, num_warps=4 if nsp * R >= 2048 else 1)
    return out


def reference(q, ck, cv, kup, cos, sin, L):
    """float64: keys rebuilt from the latents, RoPE'd, softmax over the first L positions, P @ latent_v."""
    B, Hq, D = q.shape
    Hkv, R, _ = kup.shape
    half = D // 2
    c, s = cos[:L].double(), sin[:L].double()
    lat = ck[:, :L].double().view(B, L, Hkv, R)
    k = torch.einsum("blhr,hrd->bhld", lat, kup.double())
    k1, k2 = k[..., :half], k[..., half:]
    k = torch.cat([k1 * c - k2 * s, k2 * c + k1 * s], -1)
    qd = q.double()
    q1, q2 = qd[..., :half], qd[..., half:]
    qr = torch.cat([q1 * c[L - 1] - q2 * s[L - 1], q2 * c[L - 1] + q1 * s[L - 1]], -1)
    qr = qr.view(B, Hkv, Hq // Hkv, D)
    p = torch.softmax(torch.einsum("bhnd,bhld->bhnl", qr, k) * D ** -0.5, -1)
    v = cv[:, :L].double().view(B, L, Hkv, R)
    return torch.einsum("bhnl,blhr->bhnr", p, v).reshape(B, Hq, R)


def measure(shape: str, Hq: int, Hkv: int, B: int, L: int, modes: list[str], D: int = 128, R: int = 64) -> dict:
    """GPU times (us) of SDPA on the uncompressed cache, the library's kernel and each lean form, one decode step."""
    from lrexport.kernels import triton_latent as tlk

    c = make_latent_case(B, L, Hq, Hkv, D, 1, R, R, 0, 0, torch.float16)
    q = c["q"].view(B, Hq, D)
    nsms = torch.cuda.get_device_properties(0).multi_processor_count
    nsplit, _ = tlk.split_plan(S=1, batch=B, num_kv_heads=Hkv, kv_max=L, block_n=64, num_sms=nsms)
    kv = torch.randn(2, B, Hkv, L, D, device="cuda").half()
    qq = q.view(B, Hq, 1, D)
    row = dict(shape=shape, batch=B, context=L, nsplit=nsplit)
    row["sdpa_us"] = gpu_time_us(lambda: torch.nn.functional.scaled_dot_product_attention(
        qq, kv[0], kv[1], enable_gqa=Hq != Hkv))
    kv.resize_(0)
    row["lib_us"] = bench_latent(c, B, L, Hq, Hkv, D, 1, R, R, 0, 0, {}, call=False)[0]
    for mode in modes:
        row[f"{mode}_us"] = gpu_time_us(lambda m=mode: lean_decode(m, q, c["ck"], c["cv"], c["k_up"], c["cos"],
                                                                   c["sin"], L, nsplit))
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--contexts", default="16384,65536")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--modes", default=",".join(MODES), help="forms to check and time (default: all but Gluon's: "
                    + ", ".join(GLUON_FORMS) + ")")
    args = ap.parse_args()
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    shapes = {"llama3-8b": (32, 8), "llama2-7b": (32, 32)}
    D, R = 128, 64
    rows, checks = [], []
    # correctness first, on a short cache with a length that is not a multiple of the tile
    for mode in args.modes.split(","):
        c = make_latent_case(2, 3000, 32, 8, D, 1, R, R, 0, 0, torch.float16)
        args_ = (c["q"].view(2, 32, D), c["ck"], c["cv"], c["k_up"], c["cos"], c["sin"], 2999)
        try:
            out = lean_decode(mode, *args_, nsplit=5)
            ref = reference(*args_)
            err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
            checks.append(dict(mode=mode, rel_err=err, ok=err < 2e-2 or mode in ABLATIONS))
        except Exception as e:  # a form that does not compile here is reported, not fatal
            checks.append(dict(mode=mode, error=f"{type(e).__name__}: {str(e)[:300]}", ok=False))
        print("check", checks[-1], flush=True)
    for shape, (Hq, Hkv) in shapes.items():
        for B in map(int, args.batches.split(",")):
            for L in map(int, args.contexts.split(",")):
                rows.append(measure(shape, Hq, Hkv, B, L, [ch["mode"] for ch in checks if ch["ok"]]))
                print(rows[-1], flush=True)
    res = dict(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               machine=f"{torch.cuda.get_device_name(0)}, {platform.machine()}, torch {torch.__version__}, "
                       f"triton {triton.__version__}",
               command="python bench/decode_probe.py " + " ".join(sys.argv[1:]), checks=checks, rows=rows)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, args.out)
    write_md(res, os.path.splitext(args.out)[0] + ".md")
    return 0


def write_md(res: dict, path: str) -> None:
    """The short table of a result: GPU time per form and each form's speed against SDPA (same run)."""
    modes = [m for m in [*MODES, *GLUON_FORMS] if any(f"{m}_us" in r for r in res["rows"])]
    others = [m for m in modes if m != "ptr"] if "ptr" in modes else []  # each form's time over pointer loads'
    cols = ["shape", "batch", "context", "sdpa", "lib", *modes, "lib x", *(f"{m} x" for m in modes),
            *(f"{m} / ptr" for m in others)]
    lines = [f"# Forms of a lean decode kernel ({res['date']})", "",
             f"Machine: {res['machine']}", "", f"Command: `{res['command']}`", "",
             "M-LRD 50% (rank 64), float16, one decode step; GPU time in us (CUPTI, L2 flushed, median); "
             "`lib`: the library's kernel (`attend_` defaults); the other columns: forms of the lean kernel of "
             "`bench/decode_probe.py` (see its docstring); x: SDPA time / this time.", "",
             *([f"Note: {res['note']}.", ""] if res.get("note") else []),
             "Checks against float64: " + ", ".join(
                 f"{c['mode']} " + (f"rel. error {c['rel_err']:.1e}" if "rel_err" in c else f"failed ({c['error']})")
                 + (" (ablation: wrong on purpose)" if c["mode"] in ABLATIONS else "")
                 for c in res["checks"]), "",
             "| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for r in res["rows"]:
        t = [r["lib_us"]] + [r[f"{m}_us"] for m in modes]
        lines.append(f"| {r['shape']} | {r['batch']} | {r['context']} | {r['sdpa_us']:.1f} | "
                     + " | ".join(f"{x:.1f}" for x in t) + " | "
                     + " | ".join(f"{r['sdpa_us'] / x:.2f}" for x in t) + " |"
                     + "".join(f" {r[f'{m}_us'] / r['ptr_us']:.3f} |" for m in others))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
