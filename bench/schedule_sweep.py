"""Progressive decoding on the default model: which stored-rank margin and which decay work best.

    python bench/schedule_sweep.py --device cuda                        # the default rows
    python bench/schedule_sweep.py --rows static,linear:0.4:u --xsum 20  # a few rows, quick

Every row compresses SmolLM2-135M with FLRC to the same average of activated parameters
over a generation (``1 - ratio``, 0.9 by default) and scores XSum ROUGE-L (first 200 pairs),
its fidelity to the base model's summaries, and WikiText-2 perplexity (at the stored ranks).
A row is ``static`` (FLRC at ``ratio``, no schedule) or ``FORM:DELTA:MODE``:

* ``FORM`` -- ``linear`` (1 -> low over 16 steps), ``cosine`` (over 32 steps) or ``steps``
  (1 for 8 steps, then low), as in ``bench/quality.py``;
* ``DELTA`` -- the stored ranks are FLRC's at ``ratio * (1 - DELTA)``: more stored
  parameters early, fewer late;
* ``MODE`` -- how a fraction ``f < 1`` becomes ranks: ``u`` scales every stored rank by ``f``
  (what ``lrexport.schedule.Schedule`` does), ``f`` takes the same parameter count from the
  Fisher-greedy order of the stored components (the least important go first, so some
  projections drop much further than others; nested, 64 levels).

``low`` is solved (bisection) so that the activated parameters pooled over the base model's
XSum decode steps equal ``1 - ratio``; the table reports the average over each row's own
generations. Writes ``bench/results/schedule_sweep.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (the quality benchmark's rows, schedules and evaluation)

from lrexport.allocate import Flrc  # noqa: E402
from lrexport.factorize import FisherWhitenSvd  # noqa: E402
from lrexport.schedule import solve_end  # noqa: E402

LEVELS = 64
RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("bench.schedule_sweep")


class FisherLevels:
    """A schedule whose fraction ``f`` picks ranks from the Fisher-greedy order of the stored
    components: level ``k = floor(f * LEVELS)`` keeps the most important components worth
    ``k / LEVELS`` of the stored low-rank parameters (each projection keeps ``min_rank``)."""

    def __init__(self, base, table: list[list[int]]):
        self.base, self.table, self.prefill = base, table, base.prefill

    def fraction(self, step: int) -> float:
        return self.base.fraction(step)

    def ranks(self, step: int, max_ranks: list[int]) -> list[int]:
        f = self.fraction(step)
        if f >= 1.0:
            return list(max_ranks)
        k = max(0, min(LEVELS, math.floor(f * LEVELS + 1e-9)))
        return [min(R, r) for R, r in zip(max_ranks, self.table[k])]

    def describe(self) -> str:
        return "fisher levels, " + self.base.describe()


def fisher_table(ranks: dict, decomps: dict, shapes: dict, min_rank: int = 1) -> list[list[int]]:
    """Ranks of the low-rank projections (in ``ranks`` order) at each of ``LEVELS + 1`` levels."""
    names = [n for n, r in ranks.items() if r is not None]
    comps = []  # (loss saved per parameter, name, parameters) of every droppable component
    for n in names:
        c, s2 = sum(shapes[n]), decomps[n].sigma2[: ranks[n]].tolist()
        comps += [(decomps[n].loss_weight * s2[i] / c, n, c) for i in range(min_rank, ranks[n])]
    comps.sort(key=lambda x: -x[0])  # σ² is non-increasing, so each projection's order is a prefix
    full = sum(ranks[n] * sum(shapes[n]) for n in names)
    table = []
    for k in range(LEVELS + 1):
        cur, spent = {n: min_rank for n in names}, sum(min_rank * sum(shapes[n]) for n in names)
        for _, n, c in comps:
            if spent + c > full * k / LEVELS:
                break
            cur[n], spent = cur[n] + 1, spent + c
        table.append([cur[n] for n in names])
    return table


def solve(make, target: float, ranks: dict, shapes: dict, step_counts: list[int]):
    """The schedule ``make(low)`` whose activated fraction pooled over the decode steps equals ``target``."""
    names = [n for n, r in ranks.items() if r is not None]
    total = sum(m * n for m, n in shapes.values())
    dense = sum(m * n for nm, (m, n) in shapes.items() if ranks.get(nm) is None)
    return solve_end(make, target, [ranks[n] for n in names], [sum(shapes[n]) for n in names], dense, total,
                     step_counts, lowest=0.02)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="static,linear:0.25:u,linear:0.25:f,steps:0.25:f,cosine:0.25:f,"
                                      "linear:0.35:f,linear:0.4:u,linear:0.4:f,cosine:0.4:f,linear:0.45:f")
    ap.add_argument("--ratio", type=float, default=0.1, help="average fraction of parameters removed")
    ap.add_argument("--xsum", type=int, default=200)
    ap.add_argument("--ppl-windows", type=int, default=40)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--out", default=str(RESULTS / "schedule_sweep"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    qargs = argparse.Namespace(set="weights", ratios=str(args.ratio), kv_ratios="0.5", delta=0.0,
                               ppl_windows=args.ppl_windows, xsum=args.xsum, article_tokens=384, zeroshot="",
                               zeroshot_limit=0, calib_windows=32, strs_windows=2, strs_window=256,
                               xsum_rows="all", only=None, append=False, resume=False, quick=False,
                               out=args.out + "_work", merge=None, device=args.device)
    bench = quality.Bench(qargs)
    spec = bench.lm.spec
    shapes = {n: spec.projection_shape(n.rsplit(".", 1)[1]) for n in spec.linear_names()}
    fisher_rows: set[str] = set()
    plain_weight_plan = quality.Bench.weight_plan

    def weight_plan(self, row, plan, exclude_kv=False):
        out = plain_weight_plan(self, row, plan, exclude_kv)
        if row.name in fisher_rows:
            table = fisher_table(plan.weights.ranks, self.decomps(row.method)[0], shapes)
            plan.schedule = solve(lambda low: FisherLevels(quality.make_schedule(row.schedule, low), table),
                                  1.0 - row.ratio, plan.weights.ranks, shapes, self.base["steps"])
        return out

    quality.Bench.weight_plan = weight_plan
    keys = ("name", "schedule", "stored_weights_removed", "params_kept", "avg_active_params", "ppl", "rougeL",
            "rougeL_fidelity", "row_s")
    rows = []
    for item in ["base", *args.rows.split(",")]:
        if item == "base":  # its generations set the decode steps that the schedules are solved on
            row = quality.Row("base")
        elif item == "static":
            row = quality.Row(f"static-{args.ratio:.0%}", FisherWhitenSvd(), Flrc, args.ratio)
        else:
            form, delta, mode = item.split(":")
            if form not in ("linear", "cosine", "steps") or mode not in ("u", "f"):
                raise SystemExit(f"bad row {item!r}: expected static or FORM:DELTA:MODE (see --help)")
            row = quality.Row(f"{form}-{float(delta):g}-{mode}", FisherWhitenSvd(), Flrc, args.ratio, form,
                              args.ratio * (1 - float(delta)))
            if mode == "f":
                fisher_rows.add(row.name)
        res = bench.run(row)
        rows.append({k: res.get(k) for k in keys})
        write(args, rows)
    return 0


def write(args, rows: list[dict]) -> None:
    doc = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": quality.machine(args.device),
           "command": " ".join(["python", "bench/schedule_sweep.py", *sys.argv[1:]]),
           "ratio": args.ratio, "xsum_pairs": args.xsum, "rows": rows}
    write_doc(args.out, doc)


def write_doc(out: str, doc: dict) -> None:
    tmp = Path(out + ".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(out + ".json")
    lines = [f"# Progressive schedules on SmolLM2-135M ({doc['date']})", "",
             f"Machine: {doc['machine']}", "", f"Command: `{doc['command']}`", "",
             f"All rows: FLRC, {doc['ratio']:.0%} of the parameters removed on average over a generation; "
             f"XSum first {doc['xsum_pairs']} pairs. Perplexity is at the stored ranks.", "",
             "| row | schedule | stored removed | avg active | ppl | XSum ROUGE-L | fidelity |",
             "|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['name']} | {r['schedule'] or '-'} | {1 - r['params_kept']:.3f} | "
                     f"{r['avg_active_params']:.5f} | {r['ppl']:.2f} | {r['rougeL']:.4f} | "
                     f"{r['rougeL_fidelity']:.4f} |")
    lines += ["", *doc.get("notes", [])]
    Path(out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
