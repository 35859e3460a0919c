"""Quality benchmark on the default model: one table, one run, every method side by side.

    python bench/quality.py                       # the full table (an hour or more on 2 cores)
    python bench/quality.py --quick               # a smoke run: few windows, few pairs

Rows: base; plain SVD, ASVD and SVD-LLM with uniform ranks; Palu's Fisher-proportional
allocation; ASVD's STRS search; FLRC allocation (whitened and Fisher-weighted whitened SVD);
FLRC + progressive decoding with two schedules; each at each ratio. Progressive rows store
ranks for ``ratio * (1 - delta)`` and decay the active rank so that the activated parameters,
averaged over all decode steps of the XSum generations, equal those of the static row.

Writes bench/results/quality_smollm2.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lrexport import api
from lrexport.allocate import AllocContext, Flrc, PaluFisher, ProjectionInfo, Strs, Uniform, allocate
from lrexport.allocate.strs_eval import LayerwisePerplexity
from lrexport.calib.data import TextCalibration
from lrexport.compile import compile_model
from lrexport.eval import perplexity, rouge_l, wikitext_test_text, xsum_pairs, xsum_rouge, zeroshot
from lrexport.eval.data import default_data_dir
from lrexport.factorize import Asvd, FisherWhitenSvd, PlainSvd, WhitenSvd
from lrexport.plan import Plan, WeightPlan
from lrexport.schedule import Cosine, Linear, Schedule, Steps
from lrexport.trace.export import trace

log = logging.getLogger("bench.quality")
RESULTS = Path(__file__).resolve().parent / "results"
MIN_NEW_TOKENS = 4  # the stop token is masked for the first 4 tokens (same for every row)
ALLOC_NAMES = {None: "none", Uniform: "uniform", PaluFisher: "palu", Strs: "strs", Flrc: "flrc"}


@dataclass
class Row:
    name: str
    method: object
    alloc: type | None
    ratio: float = 0.0
    schedule: str | None = None  # "linear" | "cosine" | "steps"
    stored_ratio: float | None = None


def rows_for(ratios: list[float], delta: float) -> list[Row]:
    rows = [Row("base", None, None)]
    for r in ratios:
        rows += [
            Row(f"svd-uniform-{r:.0%}", PlainSvd(), Uniform, r),
            Row(f"asvd-uniform-{r:.0%}", Asvd(), Uniform, r),
            Row(f"svdllm-uniform-{r:.0%}", WhitenSvd(), Uniform, r),
            Row(f"palu-fisher-{r:.0%}", WhitenSvd(), PaluFisher, r),
            Row(f"strs-{r:.0%}", WhitenSvd(), Strs, r),
            Row(f"flrc-{r:.0%}", FisherWhitenSvd(), Flrc, r),
            Row(f"flrc-progressive-linear-{r:.0%}", FisherWhitenSvd(), Flrc, r, "linear", r * (1 - delta)),
            Row(f"flrc-progressive-cosine-{r:.0%}", FisherWhitenSvd(), Flrc, r, "cosine", r * (1 - delta)),
        ]
    return rows


def make_schedule(kind: str, low: float) -> Schedule:
    if kind == "linear":
        return Schedule(form=Linear(start=1.0, end=low, steps=16), min_rank=1)
    if kind == "cosine":
        return Schedule(form=Cosine(start=1.0, end=low, steps=32), min_rank=1)
    return Schedule(form=Steps(((1, 1.0), (9, low))), min_rank=1)


def solve_schedule(kind: str, target: float, ranks: dict, spec, step_counts: list[int]) -> Schedule:
    """The schedule of this kind whose activated fraction, pooled over the decode steps of
    generations with ``step_counts`` decode steps, equals ``target`` (bisection)."""
    shapes = {n: spec.projection_shape(n.rsplit(".", 1)[1]) for n in spec.linear_names()}
    total = sum(m * n for m, n in shapes.values())
    dense = sum(m * n for name, (m, n) in shapes.items() if name not in ranks)
    names = list(ranks)
    cost = [sum(shapes[n]) for n in names]
    rmax = [ranks[n] for n in names]
    steps = [t for c in step_counts for t in range(1, c + 1)]

    def pooled(low: float) -> float:
        s = make_schedule(kind, low)
        vals = {}
        for t in set(steps):
            vals[t] = (dense + sum(r * c for r, c in zip(s.ranks(t, rmax), cost))) / total
        return sum(vals[t] for t in steps) / len(steps)

    lo, hi = 0.05, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if pooled(mid) < target else (lo, mid)
    return make_schedule(kind, hi)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", default="0.1,0.2")
    ap.add_argument("--delta", type=float, default=0.25,
                    help="progressive rows store ranks for ratio * (1 - delta) and decay below them")
    ap.add_argument("--ppl-windows", type=int, default=40)
    ap.add_argument("--xsum", type=int, default=200)
    ap.add_argument("--zeroshot", default="arc_easy,piqa")
    ap.add_argument("--zeroshot-limit", type=int, default=200)
    ap.add_argument("--article-tokens", type=int, default=384, help="XSum articles are truncated to this")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--strs-windows", type=int, default=2, help="STRS probes: calibration windows per probe")
    ap.add_argument("--strs-window", type=int, default=256, help="STRS probes: tokens per window")
    ap.add_argument("--only", default=None, help="comma list of row-name prefixes to run")
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 ppl windows, 8 pairs, 50 zero-shot items")
    ap.add_argument("--out", default=str(RESULTS / "quality_smollm2"))
    args = ap.parse_args(argv)
    if args.quick:
        args.ppl_windows, args.xsum, args.zeroshot_limit, args.calib_windows = 4, 8, 50, 8
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ratios = [float(r) for r in args.ratios.split(",")]
    tasks = tuple(t for t in args.zeroshot.split(",") if t)

    lm = api.load(None)
    tok = lm.tokenizer
    data = default_data_dir()
    calib = TextCalibration(path=str(data / "wikitext2" / "valid.tokens.txt"), num_windows=args.calib_windows,
                            window=512, fisher_windows=min(8, args.calib_windows))
    t = time.perf_counter()
    stats = api.calibrate(lm, calib, fisher=True)
    calib_s = time.perf_counter() - t
    text = wikitext_test_text()
    pairs = xsum_pairs(n=args.xsum) if args.xsum else []
    decomp_cache: dict[str, dict] = {}
    strs_cache: dict = {}
    out_rows, base_preds, base_steps = [], None, None
    rows = rows_for(ratios, args.delta)
    if args.only:
        keep = tuple(args.only.split(","))
        rows = [r for r in rows if r.name == "base" or r.name.startswith(keep)]

    def decomps(method):
        key = type(method).__name__
        if key not in decomp_cache:
            decomp_cache.clear()
            gc.collect()
            t0 = time.perf_counter()
            wc = api.WeightCompression(allocation=Uniform(0.1), factorization=method)
            decomp_cache[key] = (api.decompose(lm, wc, stats), time.perf_counter() - t0)
        return decomp_cache[key]

    for row in rows:
        log.info("=== %s", row.name)
        t_row = time.perf_counter()
        plan = Plan(model=lm.spec.hf_config, source=lm.source, max_len=lm.model.max_len)
        factors, alloc_s, factorize_s, kept = {}, 0.0, 0.0, 1.0
        if row.alloc is not None:
            ds, factorize_s = decomps(row.method)
            infos = [ProjectionInfo(name=n, m=d.shape[0], n=d.shape[1], sigma2=d.sigma2, loss_weight=d.loss_weight,
                                    fisher_w=stats.fisher_w.get(n, 0.0)) for n, d in ds.items()]
            ctx = AllocContext(infos=infos)
            stored = row.stored_ratio if row.stored_ratio is not None else row.ratio
            if row.alloc is Strs:
                if "probe" not in strs_cache:
                    windows = api.calibration_windows(lm, calib)[: args.strs_windows, : args.strs_window]
                    strs_cache["probe"] = _Memo(LayerwisePerplexity(lm.model, windows, ds))
                ctx.evaluate = strs_cache["probe"]
            probe_before = strs_cache["probe"].seconds if row.alloc is Strs else 0.0
            alloc = allocate(row.alloc(ratio=stored), ctx)
            alloc_s = alloc.seconds
            if row.alloc is Strs:  # the whole sensitivity table counts, also when it was memoized
                probe = strs_cache["probe"].seconds
                alloc_s = probe + alloc.seconds - (probe - probe_before)
            if row.alloc is Flrc or row.alloc is PaluFisher:
                alloc_s += stats.seconds_fisher  # their Fisher pass is part of the allocation
            factors = {n: ds[n].factors(r) for n, r in alloc.ranks.items()}
            factors = {n: type(f)(f.U.float(), f.V.float()) for n, f in factors.items()}
            kept = alloc.params_kept / alloc.total_dense
            plan.weights = WeightPlan(factorization=row.method, allocation=row.alloc(ratio=stored), ranks=alloc.ranks,
                                      params_kept=alloc.params_kept, params_total=alloc.total_dense,
                                      alloc_seconds=alloc_s)
            if row.schedule:
                steps = base_steps or [32] * max(len(pairs), 1)
                plan.schedule = solve_schedule(row.schedule, 1.0 - row.ratio, alloc.ranks, lm.spec, steps)
        t = time.perf_counter()
        cm = compile_model(lm.model, plan, factors, tokenizer=tok, graph=trace(lm.model))
        compile_s = time.perf_counter() - t
        backend = cm.backend()
        res = {"name": row.name, "weights_removed": row.ratio,
               "allocation": ALLOC_NAMES[row.alloc],
               "factorization": type(row.method).__name__ if row.method else None,
               "schedule": plan.schedule.describe() if plan.schedule else None,
               "stored_weights_removed": row.stored_ratio, "kv_removed": 0, "kv_grouping": None, "kv_bits": None,
               "params_kept": kept, "kv_bytes_per_token": cm.graph.cache.bytes_per_token()}
        res["ppl"] = perplexity(backend, tok, text, window=512, num_windows=args.ppl_windows).ppl
        if pairs:
            gen = api.generate_fn(cm, min_new_tokens=MIN_NEW_TOKENS)
            xs = xsum_rouge(gen, tok, pairs=pairs, n=len(pairs), max_article_tokens=args.article_tokens)
            res["rougeL"] = xs.rougeL
            res["avg_active_params"] = gen.avg_active()
            if row.name == "base":
                base_preds, base_steps = xs.predictions, gen.steps
            res["rougeL_fidelity"] = rouge_l(xs.predictions, base_preds) if base_preds else None
        else:
            res.update(rougeL=None, rougeL_fidelity=None, avg_active_params=kept)
        res["zeroshot"] = zeroshot(backend, tok, tasks, limit=args.zeroshot_limit) if tasks else {}
        res["zeroshot"] = {k: v["acc"] for k, v in res["zeroshot"].items()}
        res.update(compress_s=calib_s + factorize_s + alloc_s + compile_s if row.alloc else 0.0, alloc_s=alloc_s,
                   factorize_s=factorize_s, row_s=time.perf_counter() - t_row)
        log.info("%s", json.dumps(res))
        out_rows.append(res)
        write(args, out_rows, calib_s, stats)
        del cm, backend, factors
        gc.collect()
    return 0


class _Memo:
    """Memoizes STRS probes across ratios (the sensitivity table does not depend on the ratio)."""

    def __init__(self, fn):
        self.fn, self.cache, self.seconds = fn, {}, 0.0

    def __call__(self, name, rank):
        if (name, rank) not in self.cache:
            t = time.perf_counter()
            self.cache[(name, rank)] = self.fn(name, rank)
            self.seconds += time.perf_counter() - t
        return self.cache[(name, rank)]


def write(args, rows, calib_s, stats) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.node()} {platform.machine()} {torch.get_num_threads()} threads, "
                      f"torch {torch.__version__}, {platform.processor() or 'cpu'}",
           "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
           "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)",
           "settings": {"ppl": f"WikiText-2 test (wiki.test.raw), {args.ppl_windows} windows of 512 tokens",
                        "calibration": f"WikiText-2 valid.tokens.txt, {args.calib_windows} windows of 512 tokens "
                                       f"(Fisher pass on {min(8, args.calib_windows)} of them)",
                        "strs": f"{args.strs_windows} windows of {args.strs_window} tokens per probe, "
                                "grid 0.1..0.9 of dense parameters",
                        "calibration_s": calib_s, "fisher_s": stats.seconds_fisher,
                        "xsum": f"first {args.xsum} pairs, articles truncated to {args.article_tokens} tokens, "
                                f"greedy, {MIN_NEW_TOKENS} to 48 new tokens, first line kept, chat-template prompt "
                                "'Summarize the following article in one sentence.\\n\\nArticle: {article}'",
                        "zeroshot": f"acc, seeded sample of {args.zeroshot_limit} items per task"},
           "rows": rows}
    Path(args.out + ".json").write_text(json.dumps(doc, indent=2))
    cols = ["name", "ppl", "rougeL", "rougeL_fidelity", "params_kept", "avg_active_params", "alloc_s", "compress_s"]
    lines = [f"# Quality on SmolLM2-135M ({doc['date']})", "", f"Machine: {doc['machine']}", "",
             f"Command: `{doc['command']}`", "", *(f"- {k}: {v}" for k, v in doc["settings"].items()), "",
             "| " + " | ".join(cols + ["zeroshot"]) + " |", "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        cells = [r["name"]] + [_fmt(r.get(c)) for c in cols[1:]]
        cells.append(", ".join(f"{k} {v:.3f}" for k, v in r.get("zeroshot", {}).items()))
        lines.append("| " + " | ".join(cells) + " |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    sys.exit(main())
