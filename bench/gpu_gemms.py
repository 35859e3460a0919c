"""Decode-step GEMMs of a low-rank Llama-3-8B layer on the GPU: time and bandwidth per shape and layout.

    python bench/gpu_gemms.py                       # batch 1 and 8, the shapes of bench/gpu_e2e.py's lrexport
    python bench/gpu_gemms.py --ratio 0.2 --align 16 --batches 1,8 --out bench/results/gpu_gemms

A decode step's matrix products are memory-bound (a few rows against a weight matrix), so each should run near
the card's copy bandwidth. This times every product of one decoder layer as ``bench/gpu_e2e.py`` exports it
(weights 20% with uniform ranks over q/o/gate/up/down, M-LRD 50% latents, products that share an input fused)
and of the uncompressed layer, with cuBLAS through PyTorch (the library ONNX Runtime's CUDA MatMul calls), in
these forms:

* ``matmul``: ``x @ W`` with ``W`` stored ``[K, N]`` (ONNX MatMul's layout, as exported);
* ``linear``: ``W`` stored ``[N, K]`` (``torch.nn.functional.linear``'s layout, ONNX ``Gemm`` with ``transB``);
* ``matmul_r128``: the ranks rounded down to multiples of 128 instead of 16.

Each product cycles through enough copies of its weight that they do not stay in the 50 MB L2 cache. Times are
CUDA-event medians over CUDA-graph replays of 32 products each (``--reps`` products in all); ``TB/s`` counts
the weight, input and output bytes once.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

HIDDEN, INTER, HEADS_KV, HEAD_DIM = 4096, 14336, 8, 128
CHAIN = 32  # products per timed graph replay


def layer_shapes(ratio: float, align: int) -> dict[str, list[tuple[str, int, int]]]:
    """(name, K, N) of one layer's products: ``dense`` (uncompressed, q/k/v and gate/up fused as ONNX Runtime's
    own exports do) and ``lowrank`` (uniform ranks keeping ``1 - ratio`` of q/o/gate/up/down, ranks multiples of
    ``align``; k/v as M-LRD 50% latents; shared-input products fused)."""
    keep = 1.0 - ratio

    def rank(m, n):
        return int(keep * m * n / (m + n)) // align * align

    rq, rg = rank(HIDDEN, HIDDEN), rank(HIDDEN, INTER)
    lat = HEADS_KV * HEAD_DIM // 2
    kv = HEADS_KV * HEAD_DIM
    return {
        "dense": [("qkv", HIDDEN, HIDDEN + 2 * kv), ("o", HIDDEN, HIDDEN), ("gate_up", HIDDEN, 2 * INTER),
                  ("down", INTER, HIDDEN)],
        "lowrank": [("q_a+k+v latents", HIDDEN, rq + 2 * lat), ("q_b", rq, HIDDEN), ("o_a", HIDDEN, rq),
                    ("o_b", rq, HIDDEN), ("gate_a+up_a", HIDDEN, 2 * rg), ("gate_b", rg, INTER),
                    ("up_b", rg, INTER), ("down_a", INTER, rg), ("down_b", rg, HIDDEN)],
    }


def time_gemm(M: int, K: int, N: int, layout: str, reps: int, l2_bytes: int = 50 << 20) -> float:
    """Median microseconds of one ``[M, K] x [K, N]`` float16 product with the weight in ``layout``."""
    import torch
    import torch.nn.functional as F

    copies = max(2, -(-4 * l2_bytes // (K * N * 2)))
    ws = [torch.randn((K, N) if layout == "matmul" else (N, K), device="cuda", dtype=torch.float16) * 0.02
          for _ in range(copies)]
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)

    def call(i):
        return x @ ws[i % copies] if layout == "matmul" else F.linear(x, ws[i % copies])

    # CUDA graphs of CHAIN products each: the host's launches (several microseconds each, as long as a small
    # product) stay out of the timing, as in an exported model replayed as a graph
    for i in range(3):
        call(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CHAIN):
            call(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(max(1, reps // CHAIN)):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / CHAIN)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--align", type=int, default=16)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--reps", type=int, default=640)
    ap.add_argument("--blas", default="cublas,cublaslt", help="PyTorch's preferred BLAS libraries to try")
    ap.add_argument("--out", default=str(RESULTS / "gpu_gemms"))
    args = ap.parse_args(argv)
    import torch

    rows = []
    for blas in args.blas.split(","):
        torch.backends.cuda.preferred_blas_library(blas)
        for M in (int(b) for b in args.batches.split(",")):
            for form, align in (("matmul", args.align), ("linear", args.align), ("matmul_r128", 128)):
                layout = form.split("_")[0]
                for kind, shapes in layer_shapes(args.ratio, align).items():
                    if kind == "dense" and form == "matmul_r128":
                        continue
                    for name, K, N in shapes:
                        us = time_gemm(M, K, N, layout, args.reps)
                        nbytes = 2 * (K * N + M * K + M * N)
                        rows.append(dict(blas=blas, batch=M, form=form, layer=kind, product=name, K=K, N=N,
                                         time_us=round(us, 2), tb_s=round(nbytes / us / 1e6, 3)))
                        print(rows[-1], flush=True)
    doc = dict(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               machine=f"{torch.cuda.get_device_name()}; {platform.machine()}, torch {torch.__version__}",
               command="python bench/gpu_gemms.py " + " ".join(argv or []), rows=rows)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    lines = [f"# Decode GEMMs of one layer ({doc['date']})", "", doc["machine"], "", f"`{doc['command']}`", "",
             "Sum over the layer's products, microseconds (TB/s over their bytes):", "",
             "| blas | batch | form | dense layer | low-rank layer | low-rank / dense time |",
             "|---|---|---|---|---|---|"]
    for blas in args.blas.split(","):
        for M in (int(b) for b in args.batches.split(",")):
            dense = [r for r in rows if r["blas"] == blas and r["batch"] == M and r["layer"] == "dense"
                     and r["form"] == "matmul"]
            for form in ("matmul", "linear", "matmul_r128"):
                lr = [r for r in rows if r["blas"] == blas and r["batch"] == M and r["layer"] == "lowrank"
                      and r["form"] == form]
                td, tl = sum(r["time_us"] for r in dense), sum(r["time_us"] for r in lr)
                bd = sum(2 * r["K"] * r["N"] for r in dense) / td / 1e6
                bl = sum(2 * r["K"] * r["N"] for r in lr) / tl / 1e6
                lines.append(f"| {blas} | {M} | {form} | {td:.1f} ({bd:.2f}) | {tl:.1f} ({bl:.2f}) | {tl / td:.3f} |")
    lines += ["", "Per product:", "", "| blas | batch | form | layer | product | K | N | us | TB/s |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['blas']} | {r['batch']} | {r['form']} | {r['layer']} | {r['product']} | {r['K']} | {r['N']} | "
              f"{r['time_us']} | {r['tb_s']} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:8 + 2 * 3 * 2]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
