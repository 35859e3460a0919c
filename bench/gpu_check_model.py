"""Greedy tokens of an exported model on ONNX Runtime CUDA equal those on the CPU.

    python bench/gpu_check_model.py OUT/EXPORTED [--torch COMPRESSED] [--tokens 16] \
        [--out bench/results/gpu_check_model.json]

Runs the same prompts (chat template) through ``lrexport.api.open_runner(..., device="cpu")``
and ``device="cuda"`` (CUDAExecutionProvider, caches on the GPU, lrexport's CUDA kernel) with
greedy decoding and the plan's progressive schedule, and compares the first ``--tokens`` ids
of every prompt. Also reports the largest relative difference of the prefill logits. With
``--torch``, the compressed (not exported) folder's PyTorch graph is compared the same way, on
the CPU and on the GPU (Triton kernels). Exits 1 when any prompt differs, 2 when CUDA is not
available.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys

import torch  # before onnxruntime: loads the CUDA libraries its CUDA provider needs

PROMPTS = ["Explain why the sky is blue.", "Write a haiku about the sea.",
           "What is the capital of France?", "List three uses of a paperclip."]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--torch", default=None, help="also compare this compressed folder's PyTorch graph, CPU vs CUDA")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import onnxruntime as ort

    from lrexport import api
    from lrexport.runtime.loop import generate
    from lrexport.runtime.sampling import Sampling

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print("gpu_check_model: this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)",
              file=sys.stderr)
        return 2
    pairs = [("onnx", args.folder)] + ([("torch", args.torch)] if args.torch else [])
    report = {}
    for backend, folder in pairs:
        logits_by, ids_by = {}, {}
        for device in ("cpu", "cuda"):
            run = api.open_runner(folder, backend=backend, device=device)
            ids = [api.chat_prompt(run.tokenizer, p) for p in PROMPTS]
            pad = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else 0
            res = generate(run.backend, ids, max_new_tokens=args.tokens, sampling=Sampling(), stop_ids=[],
                           schedule=run.plan.schedule, pad_id=pad)
            ids_by[device] = [list(t) for t in res.tokens]
            logits, _ = run.backend.step(torch.tensor([ids[0]]), torch.zeros(1, dtype=torch.int64),
                                         run.backend.new_caches(1, len(ids[0]) + 1), None)
            logits_by[device] = logits.double().cpu()
        diff = float((logits_by["cuda"] - logits_by["cpu"]).abs().max() / logits_by["cpu"].abs().max())
        same = [a[:args.tokens] == b[:args.tokens] for a, b in zip(ids_by["cpu"], ids_by["cuda"])]
        print(f"== {backend}: {folder}")
        for p, s_, a, b in zip(PROMPTS, same, ids_by["cpu"], ids_by["cuda"]):
            print(f"{'same' if s_ else 'DIFF'}  {p!r}\n  cpu  {a}\n  cuda {b}")
        print(f"prefill logits: max |cuda - cpu| / max |cpu| = {diff:.2e}; {sum(same)}/{len(same)} prompts equal "
              f"for {args.tokens} tokens")
        report[backend] = {"folder": folder, "ids": ids_by, "equal": same, "prefill_logits_rel_diff": diff}
    if args.out:
        out = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "command": " ".join(["python", "bench/gpu_check_model.py", *(argv or sys.argv[1:])]),
               "machine": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "unknown",
               "onnxruntime": ort.__version__, "tokens": args.tokens, "prompts": PROMPTS, **report}
        with open(args.out + ".tmp", "w") as f:
            json.dump(out, f, indent=1)
        os.replace(args.out + ".tmp", args.out)
    return 0 if all(all(r["equal"]) for r in report.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
