"""The ``lrexport`` command line: a thin layer over :mod:`lrexport.api`.

    lrexport compress [--model PATH] --ratio 0.2 --alloc flrc --schedule linear:1.0:0.7:48 --out DIR
    lrexport eval DIR --ppl-windows 40 --xsum 200 --zeroshot arc_easy,piqa
    lrexport generate DIR --prompt "..." --max-new-tokens 64
    lrexport inspect DIR --png ranks.png
    lrexport demo
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from lrexport.allocate import Flrc, PaluFisher, Strs, Uniform
from lrexport.calib.data import SelfCalibration, TextCalibration
from lrexport.errors import ConfigError, LrexportError
from lrexport.factorize import Asvd, FisherWhitenSvd, PlainSvd, WhitenSvd
from lrexport.models.spec import PROJECTIONS
from lrexport.runtime.sampling import Sampling
from lrexport.schedule import Constant, Cosine, Linear, Progressive, Schedule, Steps

log = logging.getLogger("lrexport")

ALLOCATORS = {"flrc": Flrc, "uniform": Uniform, "palu": PaluFisher, "strs": Strs}
METHODS = {"fwsvd": FisherWhitenSvd, "whiten": WhitenSvd, "asvd": Asvd, "svd": PlainSvd}


def parse_schedule(text: str | None, *, min_rank: int = 8, align: int = 1) -> Schedule | None:
    """``none`` | ``constant:F`` | ``linear:START:END:STEPS`` | ``cosine:START:END:STEPS`` |
    ``steps:T1=F1,T2=F2,...``"""
    if text is None or text == "none":
        return None
    kind, _, rest = text.partition(":")
    try:
        if kind == "constant":
            form = Constant(float(rest))
        elif kind in ("linear", "cosine"):
            start, end, steps = rest.split(":")
            form = (Linear if kind == "linear" else Cosine)(float(start), float(end), int(steps))
        elif kind == "steps":
            pts = tuple((int(t), float(f)) for t, f in (p.split("=") for p in rest.split(",")))
            form = Steps(pts)
        else:
            raise ConfigError(f"unknown schedule {kind!r}: use none, constant, linear, cosine or steps")
    except ValueError as e:
        raise ConfigError(f"cannot parse schedule {text!r} ({e}); examples: linear:1.0:0.6:64, "
                          "steps:1=1.0,16=0.8,32=0.6") from e
    return Schedule(form=form, min_rank=min_rank, align=align)


def parse_progressive(text: str | None) -> Progressive | None:
    """``FORM[:MARGIN[:TOKENS]]``, FORM ``linear`` or ``cosine``: see :class:`lrexport.schedule.Progressive`."""
    if text is None or text == "none":
        return None
    form, *rest = text.split(":")
    if len(rest) > 2:
        raise ConfigError(f"cannot parse --progressive {text!r}: expected FORM[:MARGIN[:TOKENS]], e.g. cosine:0.4:48")
    try:
        kw = {"margin": float(rest[0])} if rest else {}
        if len(rest) > 1:
            kw["tokens"] = int(rest[1])
    except ValueError as e:
        raise ConfigError(f"cannot parse --progressive {text!r} ({e}): expected FORM[:MARGIN[:TOKENS]], "
                          "e.g. cosine:0.4:48") from e
    return Progressive(form=form, **kw)


# --targets shorthands: the attention projections and the MLP's
TARGET_GROUPS = {"all": PROJECTIONS, "attn": PROJECTIONS[:4], "mlp": PROJECTIONS[4:]}


def parse_targets(text: str) -> tuple[str, ...]:
    """``--targets``: comma-separated projections (``q``, ``q_proj``, ...; ``attn``, ``mlp``, ``all``), in
    :data:`PROJECTIONS` order."""
    picked = set()
    for item in (t.strip() for t in text.split(",")):
        if item in TARGET_GROUPS:
            picked.update(TARGET_GROUPS[item])
        elif item in PROJECTIONS or f"{item}_proj" in PROJECTIONS:
            picked.add(item if item in PROJECTIONS else f"{item}_proj")
        else:
            names = ", ".join(p.removesuffix("_proj") for p in PROJECTIONS)
            raise ConfigError(f"--targets: unknown projection {item!r}; use names from {names} "
                              f"or {', '.join(TARGET_GROUPS)}")
    return tuple(p for p in PROJECTIONS if p in picked)


def _calibration(args) -> SelfCalibration | TextCalibration:
    if args.calib == "self":
        return SelfCalibration(num_windows=args.calib_windows, window=args.calib_window)
    return TextCalibration(path=args.calib, num_windows=args.calib_windows, window=args.calib_window)


def _kv(args):
    from lrexport.kv.palu import PaluKV

    if args.kv_ratio is None:
        return None
    if args.kv_alloc == "strs":
        raise ConfigError("--kv-alloc strs is not supported; use flrc, palu or uniform")
    alloc = ALLOCATORS[args.kv_alloc](ratio=args.kv_ratio, align=args.kv_align)
    return PaluKV(allocation=alloc, group_size=args.kv_group, bits=args.kv_bits, quant_group=args.kv_quant_group,
                  hadamard=not args.no_hadamard)


def cmd_compress(args) -> int:
    from lrexport import api

    if args.ratio is None and args.kv_ratio is None:
        raise ConfigError("nothing to do: give --ratio (weights), --kv-ratio (KV cache) or both")
    weights = None
    if args.ratio is not None:
        alloc = ALLOCATORS[args.alloc](ratio=args.ratio, align=args.align)
        weights = api.WeightCompression(allocation=alloc, factorization=METHODS[args.method](),
                                        targets=parse_targets(args.targets))
    res = api.compress(model=args.model, weights=weights, kv=_kv(args), calibration=_calibration(args),
                       schedule=parse_schedule(args.schedule, align=args.align),
                       progressive=parse_progressive(args.progressive), max_len=args.max_len,
                       use_cache=not args.no_cache, kv_aware_weights=args.kv_aware_weights)
    cm = res.compressed
    for r in cm.pass_results:
        print(r.summary())
    w = cm.plan.weights
    if w is not None:
        print(f"kept {w.params_kept:,} of {w.params_total:,} projection parameters "
              f"({w.params_kept / w.params_total:.1%}); {len(w.ranks)} low-rank linears")
    if cm.plan.schedule is not None:
        print(f"progressive schedule: {cm.plan.schedule.describe()}")
    if cm.plan.kv is not None:
        kv = cm.plan.kv
        print(f"KV cache: {kv['grouping']}-LRD, {kv['kv_removed']:.1%} of K/V dimensions removed, "
              f"{kv['bytes_per_token']:,} bytes/token (was {kv['dense_bytes_per_token']:,})")
    print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in res.timings.items()))
    cm.save(args.out)
    print(f"saved {args.out}")
    return 0


def cmd_eval(args) -> int:
    from lrexport import api

    tasks = tuple(t for t in (args.zeroshot or "").split(",") if t)
    out = api.evaluate(model=args.model, ppl=not args.no_ppl, ppl_window=args.ppl_window,
                       ppl_windows=args.ppl_windows, xsum=args.xsum, zeroshot_tasks=tasks,
                       zeroshot_limit=args.zeroshot_limit, data_dir=args.data,
                       schedule=True if args.schedule is None else parse_schedule(args.schedule),
                       device=args.device)
    if "ppl" in out:
        p = out["ppl"]
        print(f"wikitext-2 perplexity {p['ppl']:.3f}  ({p['windows']} windows of {p['window']} tokens)")
    if "xsum" in out:
        x = out["xsum"]
        print(f"xsum rouge-L {x['rougeL']:.4f}  (n={x['n']}, avg active params {x['avg_active_params']:.3f})")
    for task, r in out.get("zeroshot", {}).items():
        print(f"{task:11s} acc {r['acc']:.4f}  acc_norm {r['acc_norm']:.4f}  (n={r['n']})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


def cmd_export(args) -> int:
    from lrexport import api

    res = api.export(model=args.model, out=args.out, cuda_arch=args.cuda_arch, dtype=args.dtype,
                     cuda_tuning=args.cuda_tuning, fuse_norms=not args.no_fused_norms,
                     fuse_matmuls=args.fuse_matmuls, cuda_graph=args.cuda_graph)
    for r in res.passes:
        print(r.summary())
    info = res.onnx_info
    if info.get("cuda_kernels"):
        k = info["cuda_kernels"]
        print(f"GPU decode kernels (sm_{k['arch']}): {k['kernels']} compiled for {k['nodes']} attention nodes"
              + (f"; {len(k['skipped'])} nodes use the CUDA C++ kernel only" if k["skipped"] else ""))
    print(f"inputs: {', '.join(info['inputs'][:4])}{', ...' if len(info['inputs']) > 4 else ''}")
    print(f"wrote {res.folder} ({res.seconds:.0f}s); run it: lrexport generate {res.folder} --prompt ...")
    return 0


def cmd_generate(args) -> int:
    from lrexport import api

    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    stream = len(args.prompt) == 1 and not args.no_stream
    run = api.open_runner(args.model, backend=args.backend, use_library=not args.no_library, device=args.device,
                          cuda_graph=args.cuda_graph)

    def on_token(step, ids):
        if ids[0] is not None:
            sys.stdout.write(run.tokenizer.decode([ids[0]], skip_special_tokens=True))
            sys.stdout.flush()

    texts, res = api.generate_text(model=run, prompts=args.prompt, max_new_tokens=args.max_new_tokens,
                                   sampling=sampling, schedule=not args.no_schedule,
                                   on_token=on_token if stream else None)
    if stream:
        print()
    else:
        for p, t in zip(args.prompt, texts):
            print(f"### {p}\n{t}\n")
    print(f"[{sum(map(len, res.tokens))} tokens, avg active params {res.avg_active_params:.3f}]", file=sys.stderr)
    return 0


def cmd_inspect(args) -> int:
    from lrexport.inspect import plot_plan, summarize

    print(summarize(args.model))
    if args.png:
        plot_plan(args.model, args.png)
        print(f"wrote {args.png}")
    return 0


def cmd_demo(args) -> int:
    from lrexport.demo import run_demo

    return run_demo(ratio=args.ratio, kv_ratio=args.kv_ratio, kv_bits=args.kv_bits or None, out=args.out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lrexport",
                                description="Low-rank compression and ONNX export of Llama-family LLMs")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("compress", help="compress weights (FLRC or a baseline) and/or the KV cache (Palu)")
    c.add_argument("--model", default=None, help="HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    c.add_argument("--ratio", type=float, default=None,
                   help="weights: fraction of the --targets projections' parameters to remove, in (0,1)")
    c.add_argument("--targets", default="all",
                   help="projections --ratio compresses: comma-separated q,k,v,o,gate,up,down, or attn, mlp, all "
                        "(default); with --kv-ratio, k and v belong to the KV pass (docs/gpu.md: on an H200 a "
                        "decode step's low-rank o at 20%% took longer than the dense o)")
    c.add_argument("--alloc", choices=sorted(ALLOCATORS), default="flrc")
    c.add_argument("--method", choices=sorted(METHODS), default="fwsvd")
    c.add_argument("--align", type=int, default=1, help="round ranks to a multiple of this (1, 8, 16, 32)")
    c.add_argument("--schedule", default="none", help="progressive decoding: none | constant:F | linear:S:E:N | "
                   "cosine:S:E:N | steps:T=F,...")
    c.add_argument("--progressive", default=None, metavar="FORM[:MARGIN[:TOKENS]]",
                   help="progressive decoding at the --ratio budget on average: store ranks for ratio*(1-MARGIN) "
                        "(default 0.4) and decay them (FORM linear or cosine) so that a generation of TOKENS "
                        "(default 48) decode steps removes --ratio on average; instead of --schedule")
    c.add_argument("--kv-ratio", type=float, default=None, help="KV cache (Palu): fraction of K/V dims to remove")
    c.add_argument("--kv-group", type=int, default=1, help="KV heads per latent: 1 = M-LRD, 0 = all (J-LRD)")
    c.add_argument("--kv-alloc", choices=sorted(ALLOCATORS), default="flrc")
    c.add_argument("--kv-bits", type=int, default=None, choices=(2, 3, 4, 8), help="quantize the cached latents")
    c.add_argument("--kv-quant-group", type=int, default=32, help="latent channels per scale/zero point")
    c.add_argument("--kv-align", type=int, default=1, help="round latent ranks to a multiple of this")
    c.add_argument("--no-hadamard", action="store_true", help="do not rotate quantized latents")
    c.add_argument("--kv-aware-weights", action="store_true",
                   help="with --ratio and --kv-ratio: calibrate the weight pass on the KV-compressed model")
    c.add_argument("--calib", default="self", help="'self' (model-generated text) or a .txt/.jsonl file")
    c.add_argument("--calib-windows", type=int, default=32)
    c.add_argument("--calib-window", type=int, default=512)
    c.add_argument("--max-len", type=int, default=2048, help="longest sequence the compressed model serves")
    c.add_argument("--no-cache", action="store_true", help="do not read or write cached calibration statistics")
    c.add_argument("--out", required=True, help="output folder (written atomically)")
    c.set_defaults(fn=cmd_compress)

    e = sub.add_parser("eval", help="perplexity, XSum ROUGE-L and zero-shot accuracy")
    e.add_argument("model", nargs="?", default=None, help="compressed folder, HF folder or .gguf (default model)")
    e.add_argument("--no-ppl", action="store_true")
    e.add_argument("--ppl-window", type=int, default=512)
    e.add_argument("--ppl-windows", type=int, default=40)
    e.add_argument("--xsum", type=int, default=0, help="number of XSum pairs to summarize (0: skip)")
    e.add_argument("--zeroshot", default="", help="comma list of: arc_easy, piqa, winogrande, hellaswag")
    e.add_argument("--zeroshot-limit", type=int, default=None)
    e.add_argument("--schedule", default=None, help="override the plan's schedule for generation ('none' disables)")
    e.add_argument("--data", default=None, help="evaluation data folder (default: ../shared/data or $LREXPORT_DATA)")
    e.add_argument("--json", default=None, help="also write the results to this JSON file")
    e.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: run the PyTorch graph on the GPU (latent attention on lrexport's Triton kernels)")
    e.set_defaults(fn=cmd_eval)

    g = sub.add_parser("generate", help="generate text (streams tokens for one prompt)")
    g.add_argument("model", nargs="?", default=None)
    g.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-schedule", action="store_true", help="run at the stored ranks, ignoring the schedule")
    g.add_argument("--no-stream", action="store_true")
    g.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto",
                   help="auto: ONNX Runtime for exported folders, PyTorch otherwise")
    g.add_argument("--no-library", action="store_true",
                   help="ONNX Runtime without lrexport's custom-op library (the fallback bodies run)")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: for ONNX folders, ONNX Runtime's CUDA execution provider with the caches on "
                        "the GPU (onnxruntime-gpu and the library's CUDA kernel); otherwise the PyTorch graph "
                        "on the GPU (Triton kernels)")
    g.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="ONNX folders on --device cuda: decode steps as CUDA graphs (default: on for folders "
                        "exported with --cuda-graph)")
    g.set_defaults(fn=cmd_generate)

    x = sub.add_parser("export", help="write a compressed model as an ONNX folder for ONNX Runtime")
    x.add_argument("model", nargs="?", default=None, help="compressed folder (or HF folder / .gguf / default model)")
    x.add_argument("--out", required=True)
    x.add_argument("--dtype", choices=("float32", "float16"), default=None,
                   help="convert the weights (float16: for ONNX Runtime's CUDA execution provider; the CPU kernel "
                        "of the custom op is float32; default: the folder's)")
    x.add_argument("--cuda-arch", type=int, default=None, metavar="CC",
                   help="compile the GPU decode kernels of a float16 model for this compute capability "
                        "(e.g. 90 = H100/H200; default: 90 for float16 models; 0: none)")
    x.add_argument("--cuda-tuning", default=None, metavar="SETTINGS",
                   help="decode kernel settings, e.g. 'waves=8,min_split=512,num_warps=4,block_n=64,swap=1,"
                        "split_ranks=auto'; 'gluon=0': the Triton decode kernel also where the Gluon one applies "
                        "(M-LRD ranks 16-128, sm_90); 'gluon_narrow=0': the Gluon kernel's query rows padded to 16; "
                        "'gluon_ranks=0': the Gluon kernel at per-head rank 64 only "
                        "(default: the tuned ones, or LREXPORT_CUDA_TUNING)")
    x.add_argument("--no-fused-norms", action="store_true",
                   help="keep residual Adds and RMSNorms as standard ONNX ops instead of ONNX Runtime's "
                        "SkipSimplifiedLayerNormalization (for runtimes without its com.microsoft ops)")
    x.add_argument("--fuse-matmuls", action=argparse.BooleanOptionalAction, default=None,
                   help="one MatMul + Split instead of one MatMul per projection for the projections that read "
                        "the same input (q/k/v's first factors, gate/up's): fewer, larger GEMMs on a GPU "
                        "(default: on for float16 models, off for float32 ones, which run 2-3%% slower fused on "
                        "ONNX Runtime's CPU provider; docs/design.md)")
    x.add_argument("--cuda-graph", action="store_true",
                   help="the latent-KV attention reads past_len in GPU memory (LowRankKVAttentionDeviceLen), so "
                        "that ONNX Runtime's CUDA provider can capture each decode step as a CUDA graph and replay "
                        "it: one launch per step instead of one per node (docs/gpu.md)")
    x.set_defaults(fn=cmd_export)

    i = sub.add_parser("inspect", help="print a compressed model's plan; plot its ranks")
    i.add_argument("model")
    i.add_argument("--png", default=None, help="write a heatmap of rank per layer and projection")
    i.set_defaults(fn=cmd_inspect)

    d = sub.add_parser("demo", help="compress the default model, evaluate briefly, generate side by side")
    d.add_argument("--ratio", type=float, default=0.2)
    d.add_argument("--kv-ratio", type=float, default=0.5, help="0 to leave the KV cache alone")
    d.add_argument("--kv-bits", type=int, default=4, help="0 for float latents")
    d.add_argument("--out", default="out/demo")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except LrexportError as e:
        print(f"lrexport: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lrexport: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
