"""``lrexport demo``: the main job on the default model, end to end.

Fetch SmolLM2-135M-Instruct (once), compress its weights with FLRC (Fisher-weighted
whitened SVD, fine-grained ranks, a progressive decoding schedule) and its KV cache with
Palu (J-LRD latents, 4-bit), export the result to ONNX, measure a short WikiText-2
perplexity of both models, and generate from the same prompts with the base model
(PyTorch) and the exported model (ONNX Runtime with lrexport's custom-op library), side by side.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

from lrexport import api
from lrexport.allocate import Flrc
from lrexport.calib.data import SelfCalibration
from lrexport.eval.data import default_data_dir
from lrexport.factorize import FisherWhitenSvd
from lrexport.kv.palu import PaluKV
from lrexport.schedule import Linear, Schedule

PROMPTS = (
    "What is the capital of France, and what is it famous for?",
    "Explain in two sentences why the sky is blue.",
)


def _side_by_side(title_a: str, a: str, title_b: str, b: str, width: int = 48) -> str:
    la = textwrap.wrap(a.replace("\n", " "), width) or [""]
    lb = textwrap.wrap(b.replace("\n", " "), width) or [""]
    rows = [f"{title_a:<{width}} | {title_b}", f"{'-' * width}-+-{'-' * width}"]
    for i in range(max(len(la), len(lb))):
        rows.append(f"{la[i] if i < len(la) else '':<{width}} | {lb[i] if i < len(lb) else ''}")
    return "\n".join(rows)


def run_demo(*, ratio: float = 0.2, kv_ratio: float = 0.5, kv_bits: int | None = 4, out: str | Path = "out/demo",
             max_new_tokens: int = 48) -> int:
    t0 = time.perf_counter()
    print("[1/5] loading the default model (SmolLM2-135M-Instruct; fetched and converted once)")
    lm = api.load(None)
    base = api.open_model(None)
    print(f"[2/5] compressing: FLRC allocation, Fisher-weighted whitened SVD, {ratio:.0%} of projection "
          "parameters removed, progressive decoding 1.0 -> 0.8 of the stored rank over 32 steps;\n"
          f"      KV cache: Palu J-LRD latents, {kv_ratio:.0%} of K/V dimensions removed (FLRC allocation)"
          + (f", {kv_bits}-bit Hadamard-rotated latents" if kv_bits else ""))
    schedule = Schedule(form=Linear(start=1.0, end=0.8, steps=32), min_rank=8)
    kv = PaluKV(allocation=Flrc(ratio=kv_ratio), group_size=0, bits=kv_bits) if kv_ratio else None
    res = api.compress(model=lm, weights=api.WeightCompression(allocation=Flrc(ratio=ratio),
                                                               factorization=FisherWhitenSvd()),
                       kv=kv, calibration=SelfCalibration(num_windows=16, window=256), schedule=schedule)
    cm = res.compressed
    for r in cm.pass_results:
        print("      " + r.summary())
    w = cm.plan.weights
    kept = w.params_kept / w.params_total
    print(f"      kept {w.params_kept:,}/{w.params_total:,} projection parameters ({kept:.1%})"
          f" in {res.timings['compress_s']:.0f}s (allocation {res.timings['alloc_s']:.2f}s)")
    if cm.plan.kv:
        k = cm.plan.kv
        print(f"      KV cache: {k['bytes_per_token']:,} bytes/token instead of {k['dense_bytes_per_token']:,} "
              f"(x{k['dense_bytes_per_token'] / k['bytes_per_token']:.1f} smaller)")
    out = Path(out)
    cm.save(out / "compressed")
    print(f"      saved {out / 'compressed'}  (lrexport inspect {out / 'compressed'} --png ranks.png)")
    print("[3/5] exporting to ONNX (LowRankKVAttention custom op with a standard-op fallback)")
    exp = api.export(model=cm, out=out / "onnx")
    print(f"      wrote {exp.folder} in {exp.seconds:.0f}s")
    try:
        default_data_dir()
        print("[4/5] WikiText-2 test perplexity, 8 windows of 512 tokens (PyTorch graphs)")
        p_base = api.evaluate(model=base, ppl_windows=8)["ppl"]["ppl"]
        p_cm = api.evaluate(model=cm, ppl_windows=8)["ppl"]["ppl"]
        print(f"      base {p_base:.2f}   compressed {p_cm:.2f}   (x{p_cm / p_base:.2f})")
    except Exception as e:  # noqa: BLE001  (no data folder: skip this step, say why)
        print(f"[4/5] perplexity skipped: {e}")
    print(f"[5/5] greedy generation, {max_new_tokens} new tokens: base (PyTorch) | exported (ONNX Runtime)")
    base_texts, _ = api.generate_text(model=base, prompts=list(PROMPTS), max_new_tokens=max_new_tokens)
    cm_texts, res_cm = api.generate_text(model=exp.folder, prompts=list(PROMPTS), max_new_tokens=max_new_tokens)
    for p, a, b in zip(PROMPTS, base_texts, cm_texts):
        print(f"\n>>> {p}")
        print(_side_by_side("base", a, f"ONNX: FLRC -{ratio:.0%} + Palu KV -{kv_ratio:.0%}", b))
    print(f"\naverage activated projection parameters while decoding: {res_cm.avg_active_params:.1%}")
    print(f"done in {time.perf_counter() - t0:.0f}s")
    return 0
