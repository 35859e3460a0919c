"""Where a decode step's time goes in an exported folder on ONNX Runtime: per-operator totals.

    python bench/ort_profile.py FOLDER [--context 32768] [--batch 1] [--steps 10] [--device cuda]

Runs decode steps with the caches bound in place (lrexport's ONNX Runtime backend) under ONNX
Runtime's profiler and prints, per operator type, the total kernel-launch time of the node
events per timed step (the 3 warm-up steps left out; ONNX Runtime's node time: on CUDA, the host
side of the node including launches and any synchronizing copies), next to the wall time of a step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    import onnxruntime as ort
    import torch

    from lrexport import ortops
    from lrexport.export import load_onnx_backend

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if args.device == "cuda" else None
    backend, meta = load_onnx_backend(args.folder, providers=providers)
    opts = ortops.session_options(providers=providers or ["CPUExecutionProvider"])
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path("/tmp") / "lrexport_profile")
    backend.session = ort.InferenceSession(str(Path(args.folder) / meta["onnx"]["file"]), sess_options=opts,
                                           providers=providers or ["CPUExecutionProvider"])
    caches = backend.new_caches(args.batch, args.context + args.steps + 8)
    ids = torch.randint(10, 1000, (args.batch, 1))
    pos = torch.full((args.batch,), args.context, dtype=torch.int64)
    walls = []
    for _ in range(args.steps + 3):
        t0 = time.perf_counter()
        logits, caches = backend.step(ids, pos, caches, None)
        walls.append(time.perf_counter() - t0)
        ids, pos = logits[:, -1:].argmax(-1), pos + 1
    prof = backend.session.end_profiling()
    events = json.loads(Path(prof).read_text())
    per_op = defaultdict(float)
    count = defaultdict(int)
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    t_timed = runs[3]["ts"] if len(runs) > 3 else 0  # the warm-up steps (first-call setup) are left out
    runs = runs[3:]
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= t_timed:
            op = e.get("args", {}).get("op_name", "?")
            per_op[op] += e["dur"]
            count[op] += 1
    n = args.steps
    wall = sorted(walls[3:])[len(walls[3:]) // 2]
    run_us = sorted(e["dur"] for e in runs)[len(runs) // 2] if runs else float("nan")
    print(f"{args.folder}: B={args.batch} context={args.context}: step wall {1e3 * wall:.3f} ms, "
          f"ONNX Runtime model_run {run_us / 1e3:.3f} ms (medians); node time per step by operator:")
    total = sum(per_op.values()) / n
    for op, us in sorted(per_op.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {op:<32} {us / n / 1e3:8.3f} ms  {count[op] // n:5d} nodes  {100 * us / n / total:5.1f}%")
    print(f"  {'total':<32} {total / 1e3:8.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
