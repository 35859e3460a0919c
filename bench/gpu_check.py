"""Correctness of the GPU kernels on the GPU, in one run (fresh random inputs each time).

    python bench/gpu_check.py [--out bench/results/gpu_check.json]

Triton latent attention (lrexport.kernels.triton_latent) in fp16, bf16 and fp32 against the
float64 PyTorch reference (``latent_attention_reference``), at Llama-3-8B attention shapes
(32 query / 8 KV heads, head size 128): M-, G- and J-LRD; float and 2/3/4/8-bit latents;
prefill of different lengths per row then decode steps; sliding window; key bias; ``v_up``.

The error measure is ``max |out - ref| / max |ref|``. A low-precision kernel passes when its
error is at most ``2x`` that of the same reference evaluated in the same dtype by PyTorch
(plus 1e-3), i.e. it is as accurate as the framework at that precision; fp32 must be within
1e-4. Quantized caches must equal the reference's codes and params bit for bit (their inputs
are the same low-precision latents). Exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time

import torch

from lrexport.kv.quant import quantize
from lrexport.trace.latent_attention_op import latent_attention_reference


def case(B, S, past, Hq, Hkv, D, s, rk, rv, bits, qg, P, seed, bias, vup):
    g = torch.Generator().manual_seed(seed)
    G = Hkv // s
    r = lambda *sh, sc=1.0: torch.randn(*sh, generator=g, dtype=torch.float64) * sc  # noqa: E731
    ang = torch.arange(P, dtype=torch.float64)[:, None] * (1 / 500000 ** (torch.arange(D // 2) / (D // 2)))[None]
    c = dict(q=r(B, S, Hq * D), lk=r(B, S, G * rk), lv=r(B, S, G * rv), k_up=r(G, rk, s * D, sc=rk ** -0.5),
             k_bias=r(Hkv * D, sc=0.1) if bias else None, v_up=r(G, rv, s * D, sc=rv ** -0.5) if vup else None,
             cos=ang.cos(), sin=ang.sin(), past=torch.tensor(past))
    hk, hv = r(B, P, G * rk), r(B, P, G * rv)
    if bits:
        c["ck"], c["pk"] = quantize(hk, bits, qg)
        c["cv"], c["pv"] = quantize(hv, bits, qg)
    else:
        c["ck"], c["pk"], c["cv"], c["pv"] = hk, None, hv, None
    return c


def cast(c, dtype, device):
    out = {}
    for k, v in c.items():
        if torch.is_tensor(v):
            v = v.to(device)
            out[k] = v.to(dtype) if v.dtype == torch.float64 else v.clone()
        else:
            out[k] = v
    return out


def run_ref(c, Hq, Hkv, s, D, window, bits, qg):
    return latent_attention_reference(c["q"], c["lk"], c["lv"], c["ck"], c["pk"], c["cv"], c["pv"], c["past"],
                                      c["k_up"], c["k_bias"], c["v_up"], c["cos"], c["sin"], Hq, Hkv, s, window,
                                      D ** -0.5, bits, qg)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--rel-rope", type=int, default=None,
                    help="the kernels' RoPE mode (triton_latent.DECODE_REL_ROPE; default: the library's)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    from lrexport.kernels import triton_latent as tlk

    Hq, Hkv, D = 32, 8, 128
    grid = []
    for gname, s in (("M", 1), ("G", 4), ("J", 8)):
        for bits, qg in ((0, 0), (4, 32), (3, 32), (2, 16), (8, 32)):
            if gname != "G" and bits in (3, 8):
                continue
            r = 64 * s // 2 if s > 1 else 64
            grid.append((gname, s, r, bits, qg))
    rows, ok_all, seed = [], True, int(time.time())

    def check(gname, s, r, bits, qg, S, past, window, dtype, seed):
        c64 = case(2, S, past, Hq, Hkv, D, s, r, r, bits, qg, 3072, seed, bias=True, vup=(S == 33))
        ref = run_ref(c64, Hq, Hkv, s, D, window, bits, qg)
        lowp = cast(c64, dtype, "cuda")
        ref_lowp = run_ref(lowp, Hq, Hkv, s, D, window, bits, qg)
        got = cast(c64, dtype, "cuda")
        out = tlk.latent_attention_(got["q"], got["lk"], got["lv"], got["ck"], got["pk"], got["cv"],
                                    got["pv"], got["past"], got["k_up"], got["k_bias"], got["v_up"],
                                    got["cos"], got["sin"], Hq, Hkv, s, window, D ** -0.5, bits, qg,
                                    **({} if args.rel_rope is None else {"rel_rope": args.rel_rope}))
        torch.cuda.synchronize()
        denom = ref[0].abs().max()
        err = float((out.double().cpu() - ref[0]).abs().max() / denom)
        err_torch = float((ref_lowp[0].double().cpu() - ref[0]).abs().max() / denom)
        bound = 1e-4 if dtype == torch.float32 else 2 * err_torch + 1e-3
        ok = err <= bound
        if bits:  # the new tokens' codes/params: same low-precision latents -> same quantization
            cache_ok = all(torch.equal(got[k].cpu(), ref_lowp[i].cpu())
                           for k, i in (("ck", 1), ("pk", 2), ("cv", 3), ("pv", 4)))
        else:
            cache_ok = torch.equal(got["ck"].cpu(), ref_lowp[1].cpu())
        ok = ok and cache_ok
        row = dict(grouping=gname, group_size=s, rank=r, bits=bits or None, quant_group=qg or None, S=S,
                   past=list(past), window=window, dtype=str(dtype).split(".")[-1], err=err,
                   err_torch_same_dtype=err_torch, bound=bound, cache_exact=cache_ok, ok=ok)
        print(f"{'ok  ' if ok else 'FAIL'} {gname} r={r} bits={bits} S={S} past={past} win={window} "
              f"{row['dtype']}: err {err:.2e} (torch {err_torch:.2e}, bound {bound:.1e}) cache "
              f"{'exact' if cache_ok else 'DIFFERS'}", flush=True)
        return row

    for gname, s, r, bits, qg in grid:
        for S, past, window in ((1, (1500, 3000), 0), (97, (0, 40), 0), (1, (2900, 700), 512), (33, (10, 2000), 0)):
            # fp16 everywhere; bf16 for decode and the long prefill; fp32 (exact math) for the chunked prefill
            dtypes = [torch.float16] + ([torch.bfloat16] if S in (1, 97) and not window else []) + (
                [torch.float32] if S == 33 else [])
            for dtype in dtypes:
                seed += 1
                rows.append(check(gname, s, r, bits, qg, S, past, window, dtype, seed))
                ok_all &= rows[-1]["ok"]
    # ranks that are not powers of two, and per-layer ranks sharing compiled kernels: the ranks are
    # run-time arguments, so ranks with the same padding compile at most one new kernel
    kernels = tlk._latent_attn_fwd.device_caches[torch.cuda.current_device()][0]
    sharing = []
    for bits, qg in ((0, 0), (4, 16)):
        before = len(kernels)
        for r in (80, 96, 112, 128):
            for S, past in ((1, (1500, 3000)), (17, (5, 900))):
                seed += 1
                rows.append(check("M", 1, r, bits, qg, S, past, 0, torch.float16, seed))
                ok_all &= rows[-1]["ok"]
        compiled = len(kernels) - before
        # one program per distinct specialization: 112 and 128 share theirs; 80 (64 + 16 channels) and 96 (64 + 32)
        # run as a power-of-two chunk and a tail (triton_latent.SPLIT_RANKS), one decode and one prefill program each
        distinct = {tuple(sorted(tlk.kernel_config(S=S, D=D, nrep=Hq // Hkv, rk=r, rv=r, bits=bits, quant_group=qg,
                                                   itemsize=2).items())) for r in (80, 96, 112, 128) for S in (1, 17)}
        share_ok = compiled <= len(distinct)
        ok_all &= share_ok
        sharing.append(dict(bits=bits or None, quant_group=qg or None, ranks=[80, 96, 112, 128],
                            kernels_compiled=compiled, specializations=len(distinct), ok=share_ok))
        print(f"{'ok  ' if share_ok else 'FAIL'} ranks 80/96/112/128, bits={bits}: {compiled} kernel(s) compiled "
              f"for decode and prefill ({len(distinct)} distinct specializations)", flush=True)
    # the torch.library op dispatches to the kernels on CUDA
    c64 = case(2, 5, (3, 9), Hq, Hkv, D, 1, 64, 64, 4, 32, 64, seed + 1, bias=False, vup=False)
    ref = run_ref(c64, Hq, Hkv, 1, D, 0, 4, 32)
    g = cast(c64, torch.float32, "cuda")
    out = torch.ops.lrexport.latent_attention_quant(g["q"], g["lk"], g["lv"], g["ck"], g["pk"], g["cv"], g["pv"],
                                                    g["past"], g["k_up"], None, None, g["cos"], g["sin"], Hq, Hkv, 1,
                                                    0, D ** -0.5, 4, 32)
    op_err = float((out[0].double().cpu() - ref[0]).abs().max() / ref[0].abs().max())
    op_ok = op_err < 1e-4 and not torch.equal(out[1], g["ck"])
    ok_all &= op_ok
    print(f"{'ok  ' if op_ok else 'FAIL'} torch.ops.lrexport.latent_attention_quant on CUDA: err {op_err:.2e}")
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}",
              "command": " ".join(["python", "bench/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
              "seed": seed, "passed": bool(ok_all), "op_dispatch_err": op_err, "rank_sharing": sharing,
              "rows": rows}
    print(f"{sum(r['ok'] for r in rows)}/{len(rows)} kernel checks passed; overall {'PASS' if ok_all else 'FAIL'}")
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        import os

        os.replace(args.out + ".tmp", args.out)
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
