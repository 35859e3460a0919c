"""Weights 20% + KV 50% with the weight pass calibrated on the original model or on the KV-compressed one.

    python bench/kv_aware_weights.py [--ppl-windows 40] [--xsum 32]

The combined row of the quality table (FLRC 20% with Fisher-weighted whitened SVD, and Palu
J-LRD FLRC 50% in float) compressed twice with ``lrexport.api.compress``: with the weight pass
calibrated on the original model (as the table's row), and with ``kv_aware_weights=True`` (its
statistics and Fisher weights collected with the KV latents in place). Reports WikiText-2
perplexity and XSum ROUGE-L on the first ``--xsum`` pairs with the quality benchmark's settings
(``bench/quality.py``), and the share of summaries whose first line is a new chat turn
("user"), the failure seen on the combined row. Writes
``bench/results/kv_aware_weights.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402

from lrexport import api  # noqa: E402
from lrexport.allocate import Flrc  # noqa: E402
from lrexport.eval.ppl import perplexity  # noqa: E402
from lrexport.eval.rouge import xsum_rouge  # noqa: E402
from lrexport.kv.palu import PaluKV  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ppl-windows", type=int, default=40)
    ap.add_argument("--xsum", type=int, default=32)
    ap.add_argument("--out", default=str(RESULTS / "kv_aware_weights"))
    args = ap.parse_args(argv)
    qargs = argparse.Namespace(set="kv", ratios="0.2", kv_ratios="0.5", delta=0.4, ppl_windows=args.ppl_windows,
                               xsum=args.xsum, article_tokens=384, zeroshot="", zeroshot_limit=0, calib_windows=32,
                               strs_windows=2, strs_window=256, xsum_rows="", only=None, append=False,
                               resume=False, quick=False, out=args.out + "_work", merge=None, device="cpu")
    bench = quality.Bench(qargs)
    rows = []
    for aware in (False, True):
        res = api.compress(model=bench.lm, weights=api.WeightCompression(Flrc(0.2)),
                           kv=PaluKV(allocation=Flrc(0.5), group_size=bench.lm.spec.num_kv_heads),
                           calibration=bench.calib, kv_aware_weights=aware)
        cm = res.compressed
        ppl = perplexity(cm.backend("cpu"), bench.tok, bench.text, window=512, num_windows=args.ppl_windows).ppl
        gen = api.generate_fn(cm, min_new_tokens=quality.MIN_NEW_TOKENS)
        xs = xsum_rouge(gen, bench.tok, pairs=bench.pairs, n=len(bench.pairs), max_article_tokens=384)
        turn = sum(p.strip().split("\n")[0].strip().lower() == "user" for p in xs.predictions) / len(xs.predictions)
        rows.append({"weights_calibrated_on": "KV-compressed model" if aware else "original model", "ppl": ppl,
                     "rougeL": xs.rougeL, "new_turn_share": turn, "predictions": xs.predictions[:4],
                     "compress_s": res.timings["compress_s"]})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "predictions"}), flush=True)
    doc = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.node()} {platform.machine()} {torch.get_num_threads()} threads, "
                      f"torch {torch.__version__}, cpu",
           "command": " ".join(["python", "bench/kv_aware_weights.py", *(argv if argv is not None else sys.argv[1:])]),
           "setting": "FLRC 20% (Fisher-weighted whitened SVD) + Palu J-LRD FLRC 50% float latents; WikiText-2 test "
                      f"{args.ppl_windows}x512; XSum first {args.xsum} pairs (quality.py settings)",
           "rows": rows}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2))
    lines = [f"# Weights + KV: where the weight pass is calibrated ({doc['date']})", "", f"Machine: {doc['machine']}",
             "", f"Command: `{doc['command']}`", "", doc["setting"], "",
             "| weights calibrated on | ppl | XSum ROUGE-L | summaries opening a new turn |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['weights_calibrated_on']} | {r['ppl']:.2f} | {r['rougeL']:.4f} | "
                     f"{r['new_turn_share']:.0%} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
