"""End-to-end decode speed and GPU memory on ONNX Runtime CUDA: lrexport vs uncompressed.

    python bench/gpu_e2e.py                                   # Llama-3-8B shapes, 4K/16K/32K, batch 1 and 8
    python bench/gpu_e2e.py --layers 2 --contexts 4096 --batches 1   # a quick look
    python bench/gpu_e2e.py --smoke --device cpu              # tiny model on the CPU: checks the script

The model has Llama-3-8B's shapes (hidden 4096, 32 query / 8 KV heads of 128, MLP 14336,
vocabulary 128256) and random fp16 weights; ``--layers`` sets the depth (32 in the real
model). Variants, each exported by lrexport to an ONNX folder and run by ONNX Runtime's CUDA
execution provider with the caches bound in place (IO binding, caches in GPU memory):

* ``uncompressed_gqa``: the uncompressed model on ONNX Runtime's fused operators
  (``GroupQueryAttention`` with RoPE inside and the caches updated in place, fused RMSNorm;
  ``bench/gqa_model.py``): the strongest standard baseline, against which ``speedup`` is
  reported when it runs; ``uncompressed_gqa_graph``: the same with decode steps as CUDA graphs
  (``speedup_gqa_graph`` is against it; ``graph_rel_err``: its replayed logits against the same step
  without a graph);
* ``uncompressed``: lrexport's plain export of the same model (standard-op attention over the
  dense cache; ``speedup_plain`` is against it);
* ``lrexport``: weights 20% (uniform ranks over q/o/gate/up/down, multiples of 16, as
  ``lrexport compress --align 16`` gives) + KV 50% (M-LRD, uniform), attention as
  ``LowRankKVAttention`` on lrexport's CUDA kernel;
* ``lrexport_4bit``: the same with 4-bit latents;
* ``lrexport_align1`` (not run by default): ranks not rounded (``--align 1``, the default of
  ``compress``), to show what unaligned float16 GEMMs cost;
* a name with ``_mlp`` (e.g. ``lrexport_mlp_graph``): the same weight parameters removed (20% of q/o/gate/up/down),
  all from gate/up/down (``compress --targets mlp``, here 23.8% of theirs); q and o stay dense;
* a name with ``_unfused`` (e.g. ``lrexport_unfused``): exported without the residual Add + RMSNorm
  fusion (``--no-fused-norms``); with ``_separate``: without the shared-input MatMul fusion
  (``--no-fuse-matmuls``; the default fuses float16 models), with ``_fusedmm``: with it
  (``--fuse-matmuls``); with ``_graph``: exported with ``--cuda-graph`` and run with CUDA graphs
  (each decode step one graph replay; ``OrtBackend(cuda_graph=True)``), and each such variant (and
  ``uncompressed_gqa_graph``) gets a second row, ``NAME+device_loop``: greedy decoding driven on the GPU
  (``lrexport.runtime.loop.greedy_on_device``, what ``generate()`` runs on a CUDA-graph backend): each step's
  argmax feeds the next step on the GPU and the next replay is launched before the host reads the ids;
  with ``_ranks``: a progressive
  schedule (the weight ranks an input of the model, lowered linearly to 80% over 8 steps, in multiples of 16;
  not with ``_graph``: CUDA graphs cannot capture it);
* ``NAME@SETTINGS`` (e.g. ``lrexport@waves=8+maxnreg=0``): ``NAME``'s export with its GPU decode kernels
  recompiled under other settings (``bench/retune.py``; ``+`` separates the settings);
* ``NAME%KERNEL`` (e.g. ``lrexport%triton``): ``NAME``'s export run with ``LREXPORT_CUDA_DECODE=KERNEL``
  (the library's decode kernel: ``warp``, the opt-in hand-written one, ``decode_warp.cuh``; anything else
  leaves the default: the ahead-of-time Triton kernel the export carries).

The random model's factors are drawn directly at the ranks the allocators choose for these
budgets (decomposing random matrices would only cost time: speed depends on the shapes). The
caches are filled as if ``context`` tokens had been prefilled; each step decodes one token per
sequence: it runs the model, takes the argmax of the logits where they are (GPU memory with
CUDA, for every variant) and brings the next ids to the host. Reported per (variant, context,
batch): median step time over ``--steps`` decode steps (after warm-up; ``run_ms``: the part of a step the host
spends in the model's call, ``wait_ms``: the rest, picking the next ids and bringing them to the host, which waits
for the GPU), decode tokens/s (all
sequences), cache bytes, and GPU memory in use by the process (weights + caches + ONNX
Runtime's workspace). Each variant runs in its own
process so that the memory figures do not mix.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("uncompressed_gqa", "uncompressed", "lrexport", "lrexport_4bit")
BASELINES = ("uncompressed_gqa", "uncompressed_gqa_graph", "uncompressed")  # speedup: against the first that ran


def _gqa():
    """bench/gqa_model.py (the GroupQueryAttention baseline), imported from beside this file."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gqa_model

    return gqa_model


def llama3_8b_config(layers: int, max_len: int) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
            "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "num_hidden_layers": layers, "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "max_position_embeddings": max_len, "tie_word_embeddings": False, "hidden_act": "silu",
            "bos_token_id": 128000, "eos_token_id": 128001}


def smoke_config(layers: int, max_len: int) -> dict:
    return {**llama3_8b_config(layers, max_len), "hidden_size": 256, "intermediate_size": 512,
            "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 1024}


def _randn(shape, dtype, gen_device, scale=0.02):
    import torch

    return (torch.randn(*shape, device=gen_device, dtype=torch.float32) * scale).to(dtype).cpu()


def build_variant(variant: str, cfg: dict, dtype_name: str, out: Path, gen_device: str, seed: int = 0) -> Path:
    """Export ``variant`` of the random model to ``out/variant`` (reused when already there)."""
    import torch

    from lrexport.allocate import AllocContext, ProjectionInfo, Uniform, allocate
    from lrexport.compile import compile_model
    from lrexport.export import export_onnx
    from lrexport.factorize.registry import Factors
    from lrexport.factorize.svd import PlainSvd
    from lrexport.kv.palu import PaluKV, kv_plan
    from lrexport.models.llama import build_model
    from lrexport.models.spec import spec_from_hf_config
    from lrexport.passes.latent_kv import LatentKVLayer
    from lrexport.plan import Plan, WeightPlan

    folder = out / variant
    if (folder / "lrexport.json").is_file():
        return folder
    if "@" in variant:  # another kernel setting of a built variant
        from retune import retune

        name, tuning = variant.split("@", 1)
        retune(build_variant(name, cfg, dtype_name, out, gen_device, seed), folder, tuning.replace("+", ","))
        return folder
    torch.manual_seed(seed)
    dtype = getattr(torch, dtype_name)
    spec = spec_from_hf_config(cfg)
    max_len = int(cfg["max_position_embeddings"])
    compressed = variant != "uncompressed"
    targets = ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    ratio = 0.2
    if "_mlp" in variant:  # the same parameters removed, all from the MLP (compress --targets mlp)
        params = {t: spec.projection_shape(t)[0] * spec.projection_shape(t)[1] for t in targets}
        ratio = 0.2 * sum(params.values()) / sum(params[t] for t in targets[2:])
        targets = targets[2:]
    names = [n for n in spec.linear_names() if n.rsplit(".", 1)[1] in targets] if compressed else []
    t0 = time.perf_counter()
    sd = {"model.embed_tokens.weight": _randn((spec.vocab_size, spec.hidden_size), dtype, gen_device),
          "lm_head.weight": _randn((spec.vocab_size, spec.hidden_size), dtype, gen_device),
          "model.norm.weight": torch.ones(spec.hidden_size, dtype=dtype)}
    replaced = set(names)
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = torch.ones(spec.hidden_size, dtype=dtype)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(spec.hidden_size, dtype=dtype)
        for kind in ("q_proj", "k_proj", "v_proj", "o_proj"):
            fqn = p + "self_attn." + kind
            m, n = spec.projection_shape(kind)
            dense = not (fqn in replaced or (compressed and kind in ("k_proj", "v_proj")))
            sd[fqn + ".weight"] = _randn((m, n), dtype, gen_device) if dense else torch.zeros(m, n, dtype=dtype)
        for kind in ("gate_proj", "up_proj", "down_proj"):
            fqn = p + "mlp." + kind
            m, n = spec.projection_shape(kind)
            sd[fqn + ".weight"] = torch.zeros(m, n, dtype=dtype) if fqn in replaced else _randn((m, n), dtype,
                                                                                                  gen_device)
    model = build_model(spec, sd, max_len=max_len, dtype=dtype)
    del sd
    plan = Plan(model=cfg, source={"kind": "random", "seed": seed}, max_len=max_len, dtype=dtype_name)
    factors, latent = {}, {}
    if compressed:
        shapes = {n: spec.projection_shape(n.rsplit(".", 1)[1]) for n in names}
        infos = [ProjectionInfo(name=n, m=m, n=k, sigma2=torch.ones(min(m, k), dtype=torch.float64))
                 for n, (m, k) in shapes.items()]
        align = 1 if "align1" in variant else 16  # tensor cores want float16 GEMM dimensions in multiples of 8
        alloc = allocate(Uniform(ratio, align=align), AllocContext(infos=infos))
        for n, r in alloc.ranks.items():
            m, k = shapes[n]
            factors[n] = Factors(_randn((m, r), dtype, gen_device, scale=r ** -0.5),
                                 _randn((r, k), dtype, gen_device))
        if "_ranks" in variant:  # progressive decoding: the weight ranks are an input of the model
            from lrexport.schedule import Linear, Schedule
            plan.schedule = Schedule(form=Linear(1.0, 0.8, 8), min_rank=16, align=16)
        plan.weights = WeightPlan(factorization=PlainSvd(), allocation=Uniform(ratio, align=align), ranks=alloc.ranks,
                                  params_kept=alloc.params_kept, params_total=alloc.total_dense)
        bits = 4 if "4bit" in variant else None
        kv = PaluKV(allocation=Uniform(0.5), group_size=1, bits=bits)
        D, G = spec.head_dim, spec.num_kv_heads
        r = D // 2  # M-LRD 50%: half of each KV head's dimensions (a multiple of 16 and of 32)
        for i in range(spec.num_layers):
            latent[i] = LatentKVLayer(A_k=_randn((G * r, spec.hidden_size), dtype, gen_device),
                                      k_up=_randn((G, r, D), dtype, gen_device, scale=r ** -0.5),
                                      A_v=_randn((G * r, spec.hidden_size), dtype, gen_device),
                                      v_up=_randn((G, r, D), dtype, gen_device, scale=r ** -0.5), group_size=1)
        plan.kv = kv_plan(spec, kv, {i: [r, r] for i in range(spec.num_layers)}, dtype)
    built_s = time.perf_counter() - t0
    cm = compile_model(model, plan, factors, latent=latent)
    res = export_onnx(cm, folder, fuse_norms="_unfused" not in variant, fuse_matmuls=(True if "_fusedmm" in variant
                                                                  else False if "_separate" in variant else None),
                      cuda_graph="_graph" in variant)
    meta = json.loads((folder / "lrexport.json").read_text())
    meta["bench"] = {"build_s": built_s, "export_s": res.seconds,
                     "onnx_bytes": sum(f.stat().st_size for f in folder.glob("model.onnx*"))}
    (folder / "lrexport.json").write_text(json.dumps(meta, indent=2, default=str))
    print(f"{variant}: built in {built_s:.0f}s, exported in {res.seconds:.0f}s", flush=True)
    return folder


def worker(folder: str, contexts: list[int], batches: list[int], steps: int, device: str,
           profile: bool = False) -> list[dict]:
    import torch

    from lrexport.export import load_onnx_backend

    providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"])
    if device == "cuda":
        torch.cuda.init()
        torch.zeros(1, device="cuda")
        free0, total = torch.cuda.mem_get_info()
    backend, meta = load_onnx_backend(folder, providers=providers)
    rows = []
    for B in batches:
        for C in contexts:
            cap = C + steps + 4
            caches = backend.new_caches(B, cap)
            # numpy arrays or torch tensors; for cap positions (a CUDA-graph backend rounds its caches up to 256)
            kv_bytes = sum(c.nbytes // c.shape[1] * cap for c in caches)
            ids = torch.randint(10, 1000, (B, 1))
            pos = torch.full((B,), C, dtype=torch.int64)
            times, run_times = [], []
            for _ in range(steps + 3):
                t0 = time.perf_counter()
                logits, caches = backend.step(ids, pos, caches, None)
                run_times.append(time.perf_counter() - t0)
                ids, pos = logits[:, -1:].argmax(-1).cpu(), pos + 1  # greedy, as lrexport's generation loop
                times.append(time.perf_counter() - t0)
            rows.append(_gqa().decode_row(C, B, times[3:], kv_bytes, bool(torch.isfinite(logits).all()),
                                          free0 if device == "cuda" else None, run_times[3:]))
            if profile:
                _gqa().profile_steps(rows[-1], functools.partial(backend.step, ids, pos, caches, None))
            dl = backend.device_loop(caches) if hasattr(backend, "device_loop") else None
            if dl is not None:  # CUDA graphs: greedy decoding driven on the GPU, as generate() runs it
                rows.append(_gqa().device_loop_row(dl, C, B, steps, kv_bytes, free0, profile))
                del dl
            del caches
            if getattr(backend, "cuda_graph", False):
                backend.release_caches()
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (Llama-3-8B has 32)")
    ap.add_argument("--contexts", default="4096,16384,32768")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", type=int, default=10, help="timed decode steps per setting (after 3 warm-up)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--smoke", action="store_true", help="a tiny model of the same structure (checks the script)")
    ap.add_argument("--work", default="build/bench-gpu-e2e", help="where the exported variants are kept")
    ap.add_argument("--out", default=str(RESULTS / "gpu_e2e"))
    ap.add_argument("--build-only", action="store_true", help="export the variants to --work and stop")
    ap.add_argument("--profile", action="store_true",
                    help="also record each setting's GPU work per step (CUPTI kernel durations, by category)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--gqa", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--graph", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    if args.worker:
        if args.gqa:
            out = _gqa().gqa_worker(args.worker, contexts, batches, args.steps, args.device, args.profile, args.graph)
        else:
            out = worker(args.worker, contexts, batches, args.steps, args.device, args.profile)
        print(json.dumps(out))
        return 0
    import torch

    dtype = "float16" if args.device == "cuda" else "float32"
    max_len = max(contexts) + args.steps + 16
    cfg = (smoke_config if args.smoke else llama3_8b_config)(args.layers, max_len)
    gen_device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(args.work)
    rows, info = [], {}
    for v in args.variants.split(","):
        gqa = v.startswith("uncompressed_gqa")
        built, _, decode = v.partition("%")  # NAME%KERNEL: NAME's model, LREXPORT_CUDA_DECODE=KERNEL
        env = dict(os.environ, LREXPORT_CUDA_DECODE=decode) if decode else None
        if gqa:
            t0 = time.perf_counter()
            folder = _gqa().build_gqa_model(cfg, dtype, work, gen_device)
            info[v] = {"build_s": time.perf_counter() - t0}
        else:
            folder = build_variant(built, cfg, dtype, work, gen_device)
        if args.build_only:
            continue
        if not gqa:
            meta = json.loads((folder / "lrexport.json").read_text())
            info[v] = {**meta.get("bench", {}), "kv_bytes_per_token": (meta.get("kv") or {}).get("bytes_per_token")}
        cmd = [sys.executable, __file__, "--worker", str(folder), "--contexts", args.contexts, "--batches",
               args.batches, "--steps", str(args.steps), "--device", args.device] + (["--gqa"] if gqa else []) + (
                   ["--graph"] if v == "uncompressed_gqa_graph" else []) + (
                   ["--profile"] if args.profile else [])
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{v}: the worker failed (exit {proc.returncode})")
        for r in json.loads(proc.stdout.strip().splitlines()[-1]):
            setting = v + ("+device_loop" if r.get("loop") == "device" else "")
            rows.append({"variant": "uncompressed" if v in BASELINES else "lrexport", "setting": setting, **r})
    if args.build_only:
        return 0
    ran = [b for b in BASELINES if any(r["setting"] == b for r in rows)]
    base = {(r["context"], r["batch"]): r for r in rows if ran and r["setting"] == ran[0]}
    plain = {(r["context"], r["batch"]): r for r in rows if r["setting"] == "uncompressed"}
    ggraph = {(r["context"], r["batch"]): r for r in rows if r["setting"] == "uncompressed_gqa_graph"}
    gdevice = {(r["context"], r["batch"]): r for r in rows if r["setting"] == "uncompressed_gqa_graph+device_loop"}
    for r in rows:
        b = base.get((r["context"], r["batch"]))
        if b and r is not b:
            r["speedup"] = r["decode_tok_s"] / b["decode_tok_s"]
            r["kv_smaller_x"] = b["kv_bytes"] / r["kv_bytes"]
            if r["gpu_mem_bytes"] and b["gpu_mem_bytes"]:
                r["gpu_mem_smaller_x"] = b["gpu_mem_bytes"] / r["gpu_mem_bytes"]
        g = ggraph.get((r["context"], r["batch"]))
        if g and r is not g and r["setting"] not in BASELINES:
            r["speedup_gqa_graph"] = r["decode_tok_s"] / g["decode_tok_s"]
        d = gdevice.get((r["context"], r["batch"]))
        if d and r is not d and r["setting"].endswith("+device_loop"):
            r["speedup_device_loops"] = r["decode_tok_s"] / d["decode_tok_s"]
        p = plain.get((r["context"], r["batch"]))
        if p and r is not p and not r["setting"].startswith("uncompressed_gqa"):
            r["speedup_plain"] = r["decode_tok_s"] / p["decode_tok_s"]
    machine = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    doc = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{machine}; {platform.node()}, {os.cpu_count()} cores, torch {torch.__version__}",
           "command": " ".join(["python", "bench/gpu_e2e.py", *(argv if argv is not None else sys.argv[1:])]),
           "model": f"{'tiny smoke' if args.smoke else 'Llama-3-8B'} shapes, {args.layers} layers, random {dtype} "
                    "weights",
           "settings": f"ONNX Runtime {'CUDA' if args.device == 'cuda' else 'CPU'} execution provider, "
                       f"caches IO-bound in place, median of {args.steps} decode steps after 3 warm-up",
           "variants": info, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, out.with_suffix(".json"))
    doc["baseline"] = ran[0] if ran else None
    print(write_md(doc, out.with_suffix(".md")))
    return 0


def write_md(doc: dict, path: Path) -> str:
    """The results table (and, for ``--profile`` runs, the GPU work by kernel category) as markdown."""
    rows = doc["rows"]
    profiled = any("gpu_ms" in r for r in rows)
    split = ["run_ms", "wait_ms"] if any("run_ms" in r for r in rows) else []
    spans = ["span_ms", "gap_short_ms", "gap_long_ms"] if any("span_ms" in r for r in rows) else []
    cols = ["setting", "context", "batch", "step_ms"] + split + (["gpu_ms", "kernels_per_step"] if profiled else []) + (
        spans) + ["decode_tok_s", "speedup", "speedup_gqa_graph", "speedup_device_loops", "speedup_plain",
                  "kv_bytes", "kv_smaller_x", "gpu_mem_bytes", "gpu_mem_smaller_x"]
    if any("graph_rel_err" in r for r in rows):
        cols.append("graph_rel_err")
    lines = [f"# GPU end to end ({doc['date']})", "", doc["machine"], "", f"`{doc['command']}`", "", doc["model"] + "; "
             + doc["settings"], "", f"speedup: decode tokens/s over {doc.get('baseline') or '-'} (same context and "
             "batch, same run); speedup_gqa_graph: over uncompressed_gqa_graph (the baseline with CUDA graphs); "
             "speedup_device_loops: a +device_loop row over uncompressed_gqa_graph+device_loop (both driven on the "
             "GPU); span_ms: a step's GPU time from first start to last end, gap_short_ms / gap_long_ms: the GPU idle "
             "in it between events, under / over 20 us apart; "
             "speedup_plain: over the plain uncompressed export; *_smaller_x: that baseline's bytes / these", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r.get(c):.4g}" if isinstance(r.get(c), float) else str(r.get(c, "-"))
                                       for c in cols) + " |")
    if profiled:
        lines += ["", "GPU work per step (CUPTI kernel durations summed; gpu_ms well under step_ms: the host sets "
                  "the pace), ms by kernel category:", ""]
        cats = sorted({c for r in rows for c in r.get("gpu_by_category", {})})
        lines += ["| setting | context | batch | step_ms | gpu_ms | " + " | ".join(cats) + " |",
                  "|" + "---|" * (5 + len(cats))]
        for r in rows:
            if "gpu_by_category" in r:
                lines.append(f"| {r['setting']} | {r['context']} | {r['batch']} | {r['step_ms']:.3f} | "
                             f"{r['gpu_ms']:.3f} | " + " | ".join(f"{r['gpu_by_category'].get(c, 0):.3f}"
                                                                    for c in cats) + " |")
    if doc.get("note"):
        lines += ["", doc["note"]]
    text = "\n".join(lines) + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return text


if __name__ == "__main__":
    sys.exit(main())
