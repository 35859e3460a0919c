"""Quality benchmark on the default model: one table, every method side by side.

    python bench/quality.py --set weights        # FLRC and the weight baselines (hours on 2 cores)
    python bench/quality.py --set kv --append    # Palu KV rows, KIVI baseline, weights + KV together
    python bench/quality.py --quick --set weights --only flrc   # a smoke run

Weight rows (each at each ratio): plain SVD, ASVD and SVD-LLM with uniform ranks; Palu's
Fisher-proportional allocation; ASVD's STRS search; FLRC allocation; FLRC + progressive
decoding with two schedules. Progressive rows store ranks for ``ratio * (1 - delta)`` and
decay the active rank so that the activated parameters, pooled over all decode steps of the
XSum generations of the base model, equal those of the static row. ``delta = 0.4`` is the
best of the stored-rank margins tried by ``bench/schedule_sweep.py``.

KV rows: Palu M/G/J-LRD at 30% and 50% KV reduction with uniform, Fisher-proportional and
FLRC-greedy allocation; the best 50% setting with 4/3/2-bit latents, with and without the
Hadamard rotation; KIVI-style 2/3/4-bit KV quantization at about the same bytes per token;
the best weight setting with the best 50% KV setting.

Writes bench/results/quality_smollm2.json and .md (``--append`` keeps rows of other sets).
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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lrexport import api
from lrexport.allocate import AllocContext, Flrc, PaluFisher, ProjectionInfo, Strs, Uniform, allocate
from lrexport.allocate.strs_eval import LayerwisePerplexity
from lrexport.calib.data import TextCalibration
from lrexport.cli import TARGET_GROUPS
from lrexport.compile import compile_model
from lrexport.eval import perplexity, rouge_l, wikitext_test_text, xsum_pairs, xsum_rouge, zeroshot
from lrexport.eval.data import default_data_dir
from lrexport.factorize import Asvd, FisherWhitenSvd, PlainSvd, WhitenSvd
from lrexport.kv.kivi import KiviKV, KiviPass, kivi_bytes_per_token
from lrexport.kv.palu import PaluKV, build_latent_kv
from lrexport.plan import Plan, WeightPlan
from lrexport.schedule import Cosine, Linear, Schedule, Steps, solve_end
from lrexport.trace.export import trace

log = logging.getLogger("bench.quality")
RESULTS = Path(__file__).resolve().parent / "results"
MIN_NEW_TOKENS = 4  # the stop token is masked for the first 4 tokens (same for every row)
ALLOC_NAMES = {None: "none", Uniform: "uniform", PaluFisher: "palu", Strs: "strs", Flrc: "flrc"}


@dataclass
class Row:
    name: str
    method: object = None
    alloc: type | None = None
    ratio: float = 0.0
    schedule: str | None = None  # "linear" | "cosine" | "steps"
    stored_ratio: float | None = None
    kv: PaluKV | KiviKV | None = None
    extra: dict = field(default_factory=dict)
    targets: str | None = None  # ``compress --targets`` group factorized (None: all); ``ratio`` stays of all


def weight_rows(ratios: list[float], delta: float) -> list[Row]:
    rows = []
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
            # the same parameters removed, all from the MLP (``compress --targets mlp``; q/o/k/v stay dense,
            # which decodes faster on a GPU: docs/gpu.md, "Which projections to factorize for decode speed")
            Row(f"mlp-only-svdllm-uniform-{r:.0%}", WhitenSvd(), Uniform, r, targets="mlp"),
            Row(f"mlp-only-flrc-{r:.0%}", FisherWhitenSvd(), Flrc, r, targets="mlp"),
        ]
    return rows


def kv_float_rows(spec, kv_ratios: list[float]) -> list[Row]:
    sizes = [s for s in range(1, spec.num_kv_heads + 1) if spec.num_kv_heads % s == 0]
    rows = []
    for r in kv_ratios:
        for s in sizes:
            grouping = "M" if s == 1 else ("J" if s == spec.num_kv_heads else f"G{s}")
            for alloc, tag in ((Uniform, "uniform"), (PaluFisher, "palu"), (Flrc, "flrc")):
                rows.append(Row(f"kv-{grouping}-{tag}-{r:.0%}", kv=PaluKV(allocation=alloc(r), group_size=s)))
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
    return solve_end(lambda low: make_schedule(kind, low), target, [ranks[n] for n in names],
                     [sum(shapes[n]) for n in names], dense, total, step_counts)


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


class Bench:
    def __init__(self, args):
        self.args = args
        self.lm = api.load(None)
        self.tok = self.lm.tokenizer
        data = default_data_dir()
        self.calib = TextCalibration(path=str(data / "wikitext2" / "valid.tokens.txt"),
                                     num_windows=args.calib_windows, window=512,
                                     fisher_windows=min(8, args.calib_windows))
        t = time.perf_counter()
        self.stats = api.calibrate(self.lm, self.calib, fisher=True)
        self.calib_s = time.perf_counter() - t
        self.text = wikitext_test_text()
        self.pairs = xsum_pairs(n=args.xsum) if args.xsum else []
        self.tasks = tuple(t for t in args.zeroshot.split(",") if t)
        self.xsum_rows = tuple(p for p in args.xsum_rows.split(",") if p) if args.xsum_rows != "all" else ("",)
        self.decomp_cache: dict = {}
        self.strs: _Memo | None = None
        self._fisher_s: float | None = None
        self.base = self._load_base()

    # ------------------------------------------------------------------ weights
    def decomps(self, method):
        key = type(method).__name__
        if key not in self.decomp_cache:
            self.decomp_cache.clear()
            gc.collect()
            t0 = time.perf_counter()
            wc = api.WeightCompression(allocation=Uniform(0.1), factorization=method)
            self.decomp_cache[key] = (api.decompose(self.lm, wc, self.stats), time.perf_counter() - t0)
        return self.decomp_cache[key]

    def weight_plan(self, row: Row, plan: Plan, exclude_kv: bool = False):
        ds, factorize_s = self.decomps(row.method)
        names = [n for n in ds if not (exclude_kv and n.endswith(("k_proj", "v_proj")))]
        scale = 1.0
        if row.targets:  # the row's parameters, all removed from its targets
            size = {n: ds[n].shape[0] * ds[n].shape[1] for n in names}
            names = [n for n in names if n.rsplit(".", 1)[1] in TARGET_GROUPS[row.targets]]
            scale = sum(size.values()) / sum(size[n] for n in names)
        infos = [ProjectionInfo(name=n, m=ds[n].shape[0], n=ds[n].shape[1], sigma2=ds[n].sigma2,
                                loss_weight=ds[n].loss_weight, fisher_w=self.stats.fisher_w.get(n, 0.0))
                 for n in names]
        ctx = AllocContext(infos=infos)
        stored = (row.stored_ratio if row.stored_ratio is not None else row.ratio) * scale
        if not 0 < stored < 1:
            raise ValueError(f"{row.name}: {row.ratio:.0%} of all projections is {stored:.0%} of its targets")
        if row.alloc is Strs:
            if self.strs is None:
                windows = api.calibration_windows(self.lm, self.calib)[: self.args.strs_windows,
                                                                       : self.args.strs_window]
                self.strs = _Memo(LayerwisePerplexity(self.lm.model, windows, ds))
            ctx.evaluate = self.strs
        probe_before = self.strs.seconds if self.strs else 0.0
        alloc = allocate(row.alloc(ratio=stored), ctx)
        alloc_s = alloc.seconds
        if row.alloc is Strs:  # the whole sensitivity table counts, also when it was memoized
            alloc_s = self.strs.seconds + alloc.seconds - (self.strs.seconds - probe_before)
        if row.alloc in (Flrc, PaluFisher):
            alloc_s += self.fisher_seconds()  # their Fisher pass is part of the allocation
        factors = {n: ds[n].factors(r) for n, r in alloc.ranks.items()}
        factors = {n: type(f)(f.U.float(), f.V.float()) for n, f in factors.items()}
        plan.weights = WeightPlan(factorization=row.method, allocation=row.alloc(ratio=stored), ranks=alloc.ranks,
                                  params_kept=alloc.params_kept, params_total=alloc.total_dense,
                                  alloc_seconds=alloc_s)
        if row.schedule:
            steps = self.base["steps"] if self.base else [32] * max(len(self.pairs), 1)
            plan.schedule = solve_schedule(row.schedule, 1.0 - row.ratio, alloc.ranks, self.lm.spec, steps)
        kept = 1 - (1 - alloc.params_kept / alloc.total_dense) / scale  # of all the projections
        return factors, kept, alloc_s, factorize_s

    def fisher_seconds(self) -> float:
        """Wall time of the Fisher (backward) pass, timed in this process like the STRS probes
        (the cached statistics may have been computed on a busier or quieter machine)."""
        if self._fisher_s is None:
            from lrexport.calib.stats import collect_stats

            windows = api.calibration_windows(self.lm, self.calib)
            t = collect_stats(self.lm.model, windows, fisher=True, fisher_windows=self.calib.fisher_windows)
            self._fisher_s = t.seconds_fisher
        return self._fisher_s

    # ------------------------------------------------------------------ one row
    def run(self, row: Row) -> dict:
        log.info("=== %s", row.name)
        t_row = time.perf_counter()
        lm = self.lm
        plan = Plan(model=lm.spec.hf_config, source=lm.source, max_len=lm.model.max_len)
        factors, kept, alloc_s, factorize_s, latent, kv_build_s = {}, 1.0, 0.0, 0.0, {}, 0.0
        if row.alloc is not None:
            factors, kept, alloc_s, factorize_s = self.weight_plan(row, plan, exclude_kv=isinstance(row.kv, PaluKV))
        if isinstance(row.kv, PaluKV):
            built = build_latent_kv(lm.model, self.stats, row.kv)
            latent, plan.kv, kv_build_s = built.layers, built.plan, built.seconds
        t = time.perf_counter()
        cm = compile_model(lm.model, plan, factors, tokenizer=self.tok, graph=trace(lm.model), latent=latent)
        if isinstance(row.kv, KiviKV):
            KiviPass(row.kv)(cm.graph)
        compile_s = time.perf_counter() - t
        kv_meta = self.kv_meta(row, cm)
        res = {"name": row.name, "set": self.args.set, "weights_removed": row.ratio,
               "allocation": ALLOC_NAMES[row.alloc],
               "factorization": type(row.method).__name__ if row.method else None,
               "schedule": plan.schedule.describe() if plan.schedule else None,
               "stored_weights_removed": row.stored_ratio, **kv_meta, "params_kept": kept,
               **({"targets": row.targets} if row.targets else {}), **row.extra}
        backend = cm.backend(self.args.device)
        res["ppl"] = perplexity(backend, self.tok, self.text, window=512, num_windows=self.args.ppl_windows).ppl
        res.update(rougeL=None, rougeL_fidelity=None, avg_active_params=kept)
        if self.pairs and (row.name == "base" or row.name.startswith(self.xsum_rows)):
            gen = api.generate_fn(cm, min_new_tokens=MIN_NEW_TOKENS, device=self.args.device)
            xs = xsum_rouge(gen, self.tok, pairs=self.pairs, n=len(self.pairs),
                            max_article_tokens=self.args.article_tokens)
            res.update(rougeL=xs.rougeL, avg_active_params=gen.avg_active())
            if row.name == "base":
                self.base = {"predictions": xs.predictions, "steps": gen.steps}
                self._save_base()
            if self.base:
                res["rougeL_fidelity"] = rouge_l(xs.predictions, self.base["predictions"])
        zs = zeroshot(backend, self.tok, self.tasks, limit=self.args.zeroshot_limit) if self.tasks else {}
        res["zeroshot"] = {k: v["acc"] for k, v in zs.items()}
        compress_s = self.calib_s + factorize_s + alloc_s + kv_build_s + compile_s
        res.update(compress_s=compress_s if (row.alloc or row.kv) else 0.0, alloc_s=alloc_s,
                   factorize_s=factorize_s, kv_alloc_s=kv_build_s, row_s=time.perf_counter() - t_row)
        log.info("%s", json.dumps(res))
        return res

    def kv_meta(self, row: Row, cm) -> dict:
        spec = self.lm.spec
        dense_bpt = spec.num_layers * 2 * spec.kv_dim * 4
        if isinstance(row.kv, PaluKV):
            kv = cm.plan.kv
            return {"kv_removed": kv["kv_removed"], "kv_grouping": kv["grouping"], "kv_bits": kv["bits"],
                    "kv_hadamard": kv["hadamard"], "kv_allocation": ALLOC_NAMES[type(row.kv.allocation)],
                    "kv_bytes_per_token": kv["bytes_per_token"],
                    "kv_bits_per_element": 8 * kv["bytes_per_token"] / (dense_bpt / 4)}
        if isinstance(row.kv, KiviKV):
            bpt = kivi_bytes_per_token(spec.kv_dim, spec.num_layers, row.kv)
            return {"kv_removed": 0, "kv_grouping": None, "kv_bits": row.kv.bits, "kv_method": "kivi",
                    "kv_bytes_per_token": bpt, "kv_bits_per_element": 8 * bpt / (dense_bpt / 4)}
        return {"kv_removed": 0, "kv_grouping": None, "kv_bits": None, "kv_bytes_per_token": dense_bpt,
                "kv_bits_per_element": 32.0}

    # ------------------------------------------------------------------ base predictions sidecar
    def _base_path(self) -> Path:
        return Path(self.args.out + "_base_predictions.json")

    def _save_base(self) -> None:
        key = {"xsum": self.args.xsum, "article_tokens": self.args.article_tokens}
        self._base_path().write_text(json.dumps({"settings": key, **self.base}))

    def _load_base(self):
        p = self._base_path()
        if not p.is_file():
            return None
        d = json.loads(p.read_text())
        if d.get("settings") != {"xsum": self.args.xsum, "article_tokens": self.args.article_tokens}:
            return None
        return d


def select_best(rows: list[dict], prefix: str, ratio: float) -> dict | None:
    cands = [r for r in rows if r["name"].startswith(prefix) and abs(r.get("kv_removed", 0) - ratio) < 0.02
             and r.get("kv_bits") is None]
    return min(cands, key=lambda r: r["ppl"]) if cands else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=("weights", "kv", "all"), default="all")
    ap.add_argument("--ratios", default="0.1,0.2", help="weight ratios")
    ap.add_argument("--kv-ratios", default="0.3,0.5")
    ap.add_argument("--delta", type=float, default=0.4,
                    help="progressive rows store ranks for ratio * (1 - delta) and decay below them")
    ap.add_argument("--ppl-windows", type=int, default=40)
    ap.add_argument("--xsum", type=int, default=200)
    ap.add_argument("--article-tokens", type=int, default=384, help="XSum articles are truncated to this")
    ap.add_argument("--zeroshot", default="arc_easy,piqa")
    ap.add_argument("--zeroshot-limit", type=int, default=200)
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--strs-windows", type=int, default=2, help="STRS probes: calibration windows per probe")
    ap.add_argument("--strs-window", type=int, default=256, help="STRS probes: tokens per window")
    ap.add_argument("--xsum-rows", default="svdllm-uniform,flrc",
                    help="comma list of row-name prefixes that run XSum (the rows its targets compare; "
                         "'all' for every row); the others report rougeL null")
    ap.add_argument("--only", default=None, help="comma list of row-name prefixes to run")
    ap.add_argument("--append", action="store_true", help="keep the other rows already in the results file")
    ap.add_argument("--resume", action="store_true", help="with --append: skip rows already in the results file")
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 ppl windows, 8 pairs, 50 zero-shot items")
    ap.add_argument("--out", default=str(RESULTS / "quality_smollm2"))
    ap.add_argument("--merge", default=None, metavar="OTHER.json",
                    help="add the rows of another results file (e.g. a GPU run) that this one lacks, each "
                         "keeping its machine, rewrite the table and stop")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where the compressed graphs are evaluated (calibration and factorization stay on the CPU)")
    args = ap.parse_args(argv)
    if args.quick:
        args.ppl_windows, args.xsum, args.zeroshot_limit, args.calib_windows = 4, 8, 50, 8
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.merge:
        return merge(args)
    bench = Bench(args)
    existing = json.loads(Path(args.out + ".json").read_text())["rows"] if args.append and \
        Path(args.out + ".json").is_file() else []
    done: dict[str, dict] = {r["name"]: r for r in existing}
    keep = tuple(args.only.split(",")) if args.only else None

    measured = set(done) if args.resume else set()

    def want(name: str) -> bool:
        return (keep is None or name.startswith(keep)) and name not in measured

    def record(row: Row) -> dict:
        res = bench.run(row)
        done[row.name] = res
        write(args, list(done.values()), bench)
        return res

    # the base row is needed once, and again only when XSum fidelity needs its generations
    if not args.append or "base" not in done or (bench.pairs and bench.base is None):
        record(Row("base"))
    if args.set in ("weights", "all"):
        for row in weight_rows([float(r) for r in args.ratios.split(",")], args.delta):
            if want(row.name):
                record(row)
        gc.collect()
    if args.set in ("kv", "all"):
        kv_ratios = [float(r) for r in args.kv_ratios.split(",")]
        for row in kv_float_rows(bench.lm.spec, kv_ratios):
            if want(row.name):
                record(row)
        best = select_best(list(done.values()), "kv-", 0.5)
        best30 = select_best(list(done.values()), "kv-", 0.3)
        if best is not None:
            cfg = _kv_config_of(best, bench.lm.spec)
            for bits in (4, 3, 2):
                for had in (True, False):
                    row = Row(f"{best['name']}-{bits}bit{'' if had else '-nohadamard'}",
                              kv=PaluKV(allocation=cfg.allocation, group_size=cfg.group_size, bits=bits,
                                        hadamard=had))
                    if want(row.name):
                        record(row)
            for bits in (3, 2):  # finer quantization groups: more scale bytes, less error
                row = Row(f"{best['name']}-{bits}bit-g16", kv=PaluKV(allocation=cfg.allocation,
                                                                    group_size=cfg.group_size, bits=bits,
                                                                    quant_group=16))
                if want(row.name):
                    record(row)
        if best30 is not None:  # about 3.5 bits per original element
            cfg = _kv_config_of(best30, bench.lm.spec)
            row = Row(f"{best30['name']}-4bit", kv=PaluKV(allocation=cfg.allocation, group_size=cfg.group_size,
                                                          bits=4))
            if want(row.name):
                record(row)
        for bits in (2, 3, 4):  # the plain KV-quantization baseline, about 2.5 / 3.5 / 4.5 bits per element
            row = Row(f"kivi-{bits}bit", kv=KiviKV(bits=bits, token_group=64, channel_group=64))
            if want(row.name):
                record(row)
        wbest = min((r for r in done.values() if r["name"].startswith("flrc-") and "progressive" not in r["name"]
                     and abs(r["weights_removed"] - 0.2) < 1e-6), key=lambda r: r["ppl"], default=None)
        if best is not None and wbest is not None:
            cfg = _kv_config_of(best, bench.lm.spec)
            row = Row(f"{wbest['name']}+{best['name']}", FisherWhitenSvd(), Flrc, 0.2, kv=cfg)
            if want(row.name):
                record(row)
    return 0


def _kv_config_of(row: dict, spec) -> PaluKV:
    """Rebuild the PaluKV config of a float KV row from its name (kv-<grouping>-<alloc>-<ratio>)."""
    _, grouping, tag, pct = row["name"].split("-")[:4]
    s = 1 if grouping == "M" else (spec.num_kv_heads if grouping == "J" else int(grouping[1:]))
    alloc = {"uniform": Uniform, "palu": PaluFisher, "flrc": Flrc}[tag](float(pct.rstrip("%")) / 100)
    return PaluKV(allocation=alloc, group_size=s)


def merge(args) -> int:
    """Add the rows of ``args.merge`` that ``args.out`` lacks (each tagged with its run's machine,
    date and command); the file's own document fields stay as they are."""
    mine = json.loads(Path(args.out + ".json").read_text())
    other = json.loads(Path(args.merge).read_text())
    names = {r["name"] for r in mine["rows"]}
    added = [{**r, "run": {k: other.get(k) for k in ("machine", "date", "command")}}
             for r in other["rows"] if r["name"] not in names]
    mine["rows"] += added
    Path(args.out + ".json").write_text(json.dumps(mine, indent=2))
    write_md(args.out, mine)
    log.info("merged %d rows from %s", len(added), args.merge)
    return 0


def machine(device: str) -> str:
    return (f"{platform.node()} {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"{platform.processor() or 'cpu'}" + (f"; evaluated on {torch.cuda.get_device_name()}"
                                                  if device == "cuda" else ""))


def write(args, rows: list[dict], bench: Bench) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(args.device),
           "command": " ".join(["python", "bench/quality.py", *sys.argv[1:]]),
           "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)",
           "settings": {"ppl": f"WikiText-2 test (wiki.test.raw), {args.ppl_windows} windows of 512 tokens",
                        "calibration": f"WikiText-2 valid.tokens.txt, {args.calib_windows} windows of 512 tokens "
                                       f"(Fisher pass on {min(8, args.calib_windows)} of them)",
                        "strs": f"{args.strs_windows} windows of {args.strs_window} tokens per probe, "
                                "grid 0.1..0.9 of dense parameters",
                        "calibration_s": bench.calib_s, "fisher_s_timed_in_run": bench._fisher_s,
                        "xsum": f"first {args.xsum} pairs, articles truncated to {args.article_tokens} tokens, "
                                f"greedy, {MIN_NEW_TOKENS} to 48 new tokens, first line kept, chat-template prompt "
                                "'Summarize the following article in one sentence.\\n\\nArticle: {article}'; "
                                f"run on rows {args.xsum_rows!r} (others: null)",
                        "zeroshot": f"acc, seeded sample of {args.zeroshot_limit} items per task",
                        "progressive": f"stored ranks for ratio*(1-{args.delta}); schedule solved so that the "
                                       "activated parameters pooled over the base model's XSum decode steps equal "
                                       "the static row's",
                        "kv_bytes": "float32 cache for unquantized rows; scales and zero points included"},
           "rows": rows}
    # rows of an earlier run of another set keep their settings: record them per set
    old = json.loads(Path(args.out + ".json").read_text()) if Path(args.out + ".json").is_file() else {}
    by_set = old.get("settings_by_set") or ({"weights": old["settings"]} if "settings" in old else {})
    by_set[args.set] = doc["settings"]
    doc["settings_by_set"] = by_set
    Path(args.out + ".json").write_text(json.dumps(doc, indent=2))
    write_md(args.out, doc)


def write_md(out: str, doc: dict) -> None:
    rows = doc["rows"]
    cols = ["name", "ppl", "rougeL", "rougeL_fidelity", "params_kept", "avg_active_params", "kv_bytes_per_token",
            "alloc_s", "compress_s"]
    by_set = doc.get("settings_by_set") or {"": doc["settings"]}
    lines = [f"# Quality on SmolLM2-135M ({doc['date']})", "", f"Last run's machine: {doc['machine']}", "",
             f"Last run's command: `{doc['command']}`", ""]
    for name, settings in by_set.items():
        lines += ([f"Settings of the {name} rows:", ""] if name else []) + \
            [*(f"- {k}: {v}" for k, v in settings.items()), ""]
    lines += ["| " + " | ".join(cols + ["zeroshot"]) + " |", "|" + "---|" * (len(cols) + 1)]
    runs: dict[str, int] = {}
    for r in rows:
        mark = ""
        if r.get("run"):
            key = f"{r['run']['machine']}, {r['run']['date']}: `{r['run']['command']}`"
            mark = " " + "†" * runs.setdefault(key, len(runs) + 1)
        cells = [r["name"] + mark] + [_fmt(r.get(c)) for c in cols[1:]]
        cells.append(", ".join(f"{k} {v:.3f}" for k, v in r.get("zeroshot", {}).items()))
        lines.append("| " + " | ".join(cells) + " |")
    for key, n in runs.items():
        lines += ["", f"{'†' * n} measured in another run with the same settings: {key}"]
    Path(out + ".md").write_text("\n".join(lines) + "\n")


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    sys.exit(main())
