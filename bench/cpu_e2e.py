"""End-to-end CPU decode speed of exported models on ONNX Runtime, side by side.

    python bench/cpu_e2e.py                      # 512, 2K and ~8K context, all variants
    python bench/cpu_e2e.py --contexts 512 --decode 8 --variants uncompressed,combined   # quick

Variants (SmolLM2-135M, fp32): ``uncompressed`` (standard-op attention, inlined), ``weights``
(FLRC, 20% of projection parameters removed), ``kv`` (Palu J-LRD, 50% of K/V dims removed),
``combined`` (both) and ``combined_4bit`` / ``combined_3bit`` (with quantized latents).
Each (variant, context) runs in its own process: ORT session with lrexport's custom-op
library, caches IO-bound in place, batch 1; a prompt of ``context`` random tokens is
prefilled, then ``decode`` tokens are generated greedily. Reported: decode tokens/s, prefill
time, KV cache bytes, peak RSS, and per decode step the bytes moved and FLOPs with the share
of this machine's roofline floor (memory bandwidth and matmul rate measured in the same run).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("uncompressed", "weights", "kv", "combined", "combined_4bit", "combined_3bit")


def build(variant: str, out: Path, max_len: int) -> Path:
    from lrexport import api
    from lrexport.allocate import Flrc
    from lrexport.calib.data import TextCalibration
    from lrexport.eval.data import default_data_dir
    from lrexport.kv.palu import PaluKV

    folder = out / variant
    if (folder / "lrexport.json").is_file():
        return folder
    lm = api.load(None, max_len=max_len)
    calib = TextCalibration(path=str(default_data_dir() / "wikitext2" / "valid.tokens.txt"), num_windows=32,
                            window=512, fisher_windows=8)
    weights = api.WeightCompression(allocation=Flrc(0.2)) if variant in ("weights",) or "combined" in variant \
        else None
    bits = {"combined_4bit": 4, "combined_3bit": 3}.get(variant)
    kv = PaluKV(allocation=Flrc(0.5), group_size=0, bits=bits) if variant == "kv" or "combined" in variant else None
    if weights is None and kv is None:
        cm = uncompressed(lm)
    else:
        cm = api.compress(model=lm, weights=weights, kv=kv, calibration=calib, max_len=max_len).compressed
    api.export(model=cm, out=folder)
    return folder


def uncompressed(lm):
    from lrexport.compile import compile_model
    from lrexport.plan import Plan

    plan = Plan(model=lm.spec.hf_config, source=lm.source, max_len=lm.model.max_len)
    return compile_model(lm.model, plan, {}, tokenizer=lm.tokenizer)


def worker(folder: str, context: int, decode: int, threads: int) -> dict:
    import torch

    from lrexport.export import load_onnx_backend

    backend, meta = load_onnx_backend(folder, threads=threads)
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(10, 40000, (1, context)).astype(np.int64))
    caches = backend.new_caches(1, context + decode + 1)
    t = time.perf_counter()
    logits, caches = backend.step(ids, torch.zeros(1, dtype=torch.int64), caches, None)
    prefill_s = time.perf_counter() - t
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    pos = torch.tensor([context])
    times = []
    for _ in range(decode):
        t = time.perf_counter()
        logits, caches = backend.step(nxt, pos, caches, None)
        times.append(time.perf_counter() - t)
        nxt, pos = logits[:, -1].argmax(-1, keepdim=True), pos + 1
    steady = times[2:] if len(times) > 4 else times
    rss = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            rss = int(line.split()[1]) * 1024
    kv_bytes = sum(c.nbytes for c in caches)
    return {"prefill_s": prefill_s, "decode_tok_s": 1.0 / float(np.median(steady)), "kv_bytes": kv_bytes,
            "rss_bytes": rss}


def step_cost(folder: Path, context: int) -> tuple[float, float]:
    """(bytes, FLOPs) of one decode step at ``context`` cached tokens (batch 1)."""
    meta = json.loads((folder / "lrexport.json").read_text())
    info = meta["onnx"]
    weight_bytes = (folder / "model.onnx.data").stat().st_size
    from lrexport.models.spec import spec_from_hf_config

    spec = spec_from_hf_config(meta["model"])
    L, Hq, Hkv, D = spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim
    kv_bpt = sum(c["width"] * {"float32": 4, "float16": 2, "uint8": 1}[c["dtype"]] for c in info["cache"])
    active = info["dense_params"] + sum(r * c for r, c in zip(info["rank_max"], info["rank_cost"]))
    flops = 2.0 * (active + spec.vocab_size * spec.hidden_size)
    if meta.get("kv"):
        s = meta["kv"]["group_size"]
        for rk, rv in meta["kv"]["ranks"].values():
            G = Hkv // s
            flops += 2.0 * context * G * rk * s * D  # rebuild every key from its latent
            flops += 2.0 * context * Hq * D + 2.0 * context * Hq * rv  # scores, P @ latent_v
    else:
        flops += L * 4.0 * context * Hq * D
    return float(weight_bytes + context * kv_bpt), flops


def machine_ceilings(threads: int) -> tuple[float, float]:
    """(bytes/s of a large copy, float32 matmul FLOP/s) measured now."""
    import torch

    torch.set_num_threads(threads)
    a = np.ones(64 << 20, dtype=np.uint8)
    b = np.empty_like(a)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(b, a)
        best = max(best, 2 * a.nbytes / (time.perf_counter() - t))
    x = torch.randn(1024, 1024)
    torch.mm(x, x)
    t = time.perf_counter()
    for _ in range(10):
        torch.mm(x, x)
    flops = 10 * 2 * 1024**3 / (time.perf_counter() - t)
    return best, flops


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="512,2048,8064", help="cached tokens (8064 + decode fits in 8K)")
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--work", default="build/bench-cpu-e2e", help="where the exported variants are kept")
    ap.add_argument("--worker", nargs=3, metavar=("FOLDER", "CONTEXT", "DECODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), int(args.worker[2]), args.threads)))
        return 0
    contexts = [int(c) for c in args.contexts.split(",")]
    variants = args.variants.split(",")
    work = Path(args.work)
    max_len = max(contexts) + args.decode + 8
    bw, peak = machine_ceilings(args.threads)
    rows = []
    for v in variants:
        folder = build(v, work, max_len)
        for ctx in contexts:
            proc = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--worker", str(folder),
                                   str(ctx), str(args.decode)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{v} @ {ctx}: worker failed:\n{proc.stderr[-2000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            nbytes, flops = step_cost(folder, ctx)
            floor = max(nbytes / bw, flops / peak)
            step_s = 1.0 / r["decode_tok_s"]
            rows.append({"variant": v, "context": ctx, **r, "step_bytes": nbytes, "step_flops": flops,
                         "roofline_s": floor, "roofline_share": floor / step_s})
            print(json.dumps(rows[-1]), flush=True)
    base = {r["context"]: r for r in rows if r["variant"] == "uncompressed"}
    for r in rows:
        b = base.get(r["context"])
        if b:
            r["speedup_vs_uncompressed"] = r["decode_tok_s"] / b["decode_tok_s"]
            r["kv_smaller_x"] = b["kv_bytes"] / r["kv_bytes"]
    doc = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores; measured copy bandwidth "
                      f"{bw / 1e9:.1f} GB/s, float32 matmul {peak / 1e9:.0f} GFLOP/s",
           "command": " ".join(["python", "bench/cpu_e2e.py", *sys.argv[1:]]),
           "settings": f"SmolLM2-135M fp32, batch 1, ORT CPU with liblrexport_ops, {args.threads} threads, "
                       f"caches IO-bound in place, {args.decode} greedy decode steps (median step time)",
           "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cpu_e2e.json").write_text(json.dumps(doc, indent=2))
    cols = ["variant", "context", "decode_tok_s", "speedup_vs_uncompressed", "prefill_s", "kv_bytes", "kv_smaller_x",
            "rss_bytes", "roofline_share"]
    lines = [f"# CPU end to end ({doc['date']})", "", doc["machine"], "", f"`{doc['command']}`", "", doc["settings"],
             "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r.get(c):.4g}" if isinstance(r.get(c), float) else str(r.get(c, "-"))
                                       for c in cols) + " |")
    (RESULTS / "cpu_e2e.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
