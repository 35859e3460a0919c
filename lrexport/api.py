"""The Python API: keyword-only functions over typed configs. The CLI is a thin layer on it.

    from lrexport import api
    from lrexport.allocate import Flrc
    res = api.compress(model=None, weights=api.WeightCompression(allocation=Flrc(ratio=0.2)))
    res.compressed.save("out/smollm2-flrc20")
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lrexport.allocate import AllocContext, Flrc, PaluFisher, ProjectionInfo, Strs, Uniform, allocate
from lrexport.allocate.strs_eval import LayerwisePerplexity
from lrexport.calib.data import SelfCalibration, TextCalibration, text_windows
from lrexport.calib.stats import CalibStats, collect_stats
from lrexport.compile import CompressedModel, check_dtype, compile_model, load_compressed, param_accounting
from lrexport.config import register_config
from lrexport.errors import ConfigError
from lrexport.factorize import Decomposition, FisherWhitenSvd, factorize
from lrexport.kv.palu import PaluKV, build_latent_kv
from lrexport.models.default import resolve_model_path
from lrexport.models.load import LoadedModel, load_model
from lrexport.models.spec import PROJECTIONS
from lrexport.plan import Plan, WeightPlan
from lrexport.runtime import Sampling, TorchBackend, generate
from lrexport.schedule import Progressive, Schedule, pooled_fraction
from lrexport.trace.export import trace
from lrexport.util import cache_dir, file_digest, json_digest, progress

log = logging.getLogger(__name__)

ALLOCATIONS = (Uniform, PaluFisher, Flrc, Strs)


@register_config
@dataclass(frozen=True)
class WeightCompression:
    """FLRC weight compression: which projections, how to factorize them, how to allocate rank."""

    allocation: Uniform | PaluFisher | Flrc | Strs
    factorization: Any = FisherWhitenSvd()
    targets: tuple[str, ...] = PROJECTIONS
    strs_windows: int = 4  # STRS only: calibration windows its perplexity probes use

    def __post_init__(self):
        if not isinstance(self.allocation, ALLOCATIONS):
            raise ConfigError(f"unknown allocation {type(self.allocation).__name__}; "
                              f"known: {', '.join(a.__name__ for a in ALLOCATIONS)}")
        bad = [t for t in self.targets if t not in PROJECTIONS]
        if bad or not self.targets:
            raise ConfigError(f"targets must be a non-empty subset of {PROJECTIONS}, got {self.targets}")


@dataclass
class CompressionResult:
    compressed: CompressedModel
    timings: dict[str, float] = field(default_factory=dict)
    stats: CalibStats | None = None


def load(model: str | Path | None = None, *, max_len: int = 2048, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a model folder / .gguf file, or the default model when ``model`` is None."""
    return load_model(resolve_model_path(model), max_len=max_len, dtype=dtype)


def _model_fingerprint(lm: LoadedModel) -> dict:
    if lm.folder is not None:
        files = sorted(lm.folder.glob("*.safetensors"))
        return {"config": file_digest(lm.folder / "config.json"),
                "weights": [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files]}
    return {"source": lm.source}


def calibration_windows(lm: LoadedModel, cfg: SelfCalibration | TextCalibration, graph=None) -> torch.Tensor:
    """Token windows ``[N, L]`` for calibration: from a file, or sampled from the model itself."""
    if isinstance(cfg, TextCalibration):
        return text_windows(cfg, lm.tokenizer)
    bos = lm.spec.bos_token_id if lm.spec.bos_token_id is not None else 0
    backend = TorchBackend(graph or trace(lm.model))
    res = generate(backend, [[bos]] * cfg.num_windows, max_new_tokens=cfg.window - 1,
                   sampling=Sampling(temperature=cfg.temperature, seed=cfg.seed))
    return torch.tensor([[bos] + t for t in res.tokens], dtype=torch.int64)


def calibrate(lm: LoadedModel, cfg: SelfCalibration | TextCalibration, *, fisher: bool = True, use_cache: bool = True,
              graph=None) -> CalibStats:
    """Collect (or read from the cache) the statistics of one streaming calibration pass."""
    key = json_digest({"model": _model_fingerprint(lm), "data": cfg.fingerprint(), "fisher": fisher, "v": 2})
    path = cache_dir() / "calib" / f"{key}.safetensors"
    if use_cache and path.is_file():
        log.info("calibration statistics from cache %s", path)
        return CalibStats.load(path)
    windows = calibration_windows(lm, cfg, graph)
    stats = collect_stats(lm.model, windows, fisher=fisher, fisher_windows=cfg.fisher_windows)
    if use_cache:
        stats.save(path)
    return stats


def decompose(lm: LoadedModel, wc: WeightCompression, stats: CalibStats) -> dict[str, Decomposition]:
    names = [n for n in lm.spec.linear_names() if n.rsplit(".", 1)[1] in wc.targets]
    mods = dict(lm.model.named_modules())
    return {n: factorize(mods[n].weight, wc.factorization, stats, n)
            for n in progress(names, desc="factorize", unit="linear")}


def compress(*, model: str | Path | LoadedModel | None = None, weights: WeightCompression | None = None,
             kv: PaluKV | None = None, calibration: SelfCalibration | TextCalibration | None = None,
             schedule: Schedule | None = None, progressive: Progressive | None = None, max_len: int = 2048,
             use_cache: bool = True, kv_aware_weights: bool = False) -> CompressionResult:
    """Load (or take) a model, trace it once, calibrate, factorize, allocate and apply the passes.

    ``weights`` compresses the projections (FLRC and baselines), ``kv`` the KV cache (Palu);
    with both, ``k_proj``/``v_proj`` belong to the KV pass and leave the weight targets.
    ``kv_aware_weights`` (with both): the weight pass is calibrated a second time on the
    KV-compressed model (float latents), so that its statistics and Fisher weights see the
    activations the deployed model computes, instead of the original model's.
    ``schedule`` is a progressive schedule given as is; ``progressive`` instead stores ranks
    for ``ratio * (1 - margin)`` and solves a schedule whose average over a generation removes
    ``ratio`` (:class:`lrexport.schedule.Progressive`).
    """
    t_start = time.perf_counter()
    lm = model if isinstance(model, LoadedModel) else load(model, max_len=max_len)
    timings: dict[str, float] = {"load_s": time.perf_counter() - t_start}
    if (schedule is not None or progressive is not None) and weights is None:
        raise ConfigError("a progressive schedule needs weight compression (weights=...)")
    if kv_aware_weights and (weights is None or kv is None):
        raise ConfigError("kv_aware_weights calibrates the weight pass on the KV-compressed model: it needs both "
                          "weights= and kv=")
    if schedule is not None and progressive is not None:
        raise ConfigError("give either schedule= (a fixed schedule) or progressive= (one solved for the ratio), "
                          "not both")
    target_ratio = None
    if progressive is not None:
        target_ratio = getattr(weights.allocation, "ratio", None)
        if target_ratio is None:
            raise ConfigError(f"progressive= needs a ratio allocation, got {type(weights.allocation).__name__}")
        weights = dataclasses.replace(weights, allocation=dataclasses.replace(
            weights.allocation, ratio=progressive.stored_ratio(target_ratio)))
        schedule = progressive.schedule(1.0, getattr(weights.allocation, "align", 1))  # solved below
    t = time.perf_counter()
    graph = trace(lm.model)
    timings["trace_s"] = time.perf_counter() - t
    calibration = calibration or SelfCalibration()
    plan = Plan(model=lm.spec.hf_config, source=lm.source, max_len=lm.model.max_len, schedule=schedule,
                dtype=str(lm.model.model.embed_tokens.weight.dtype).removeprefix("torch."))
    factors, stats, latent = {}, None, {}
    if weights is not None and kv is not None and {"k_proj", "v_proj"} & set(weights.targets):
        targets = tuple(t for t in weights.targets if t not in ("k_proj", "v_proj"))
        log.info("k_proj/v_proj are compressed by the KV pass; weight targets: %s", ", ".join(targets))
        weights = dataclasses.replace(weights, targets=targets)
    if weights is not None or kv is not None:
        t = time.perf_counter()
        stats = calibrate(lm, calibration, fisher=True, use_cache=use_cache, graph=graph)
        timings["calibrate_s"] = time.perf_counter() - t
        timings["fisher_s"] = stats.seconds_fisher
        plan.calibration = {**calibration.fingerprint(), "tokens": stats.tokens}
    if kv is not None:
        built = build_latent_kv(lm.model, stats, kv)
        latent, plan.kv = built.layers, built.plan
        timings["kv_build_s"] = built.seconds
        timings["kv_alloc_s"] = built.allocation.seconds
    wstats = stats
    if kv_aware_weights:
        from lrexport.calib.stats import collect_stats
        from lrexport.kv.palu import kv_compressed_weights

        t = time.perf_counter()
        windows = calibration_windows(lm, calibration, graph)
        with kv_compressed_weights(lm.model, latent):
            wstats = collect_stats(lm.model, windows, fisher=True, fisher_windows=calibration.fisher_windows)
        timings["calibrate_kv_aware_s"] = time.perf_counter() - t
        plan.calibration["weights_on_kv_compressed_model"] = True
    if weights is not None:
        t = time.perf_counter()
        decomps = decompose(lm, weights, wstats)
        timings["factorize_s"] = time.perf_counter() - t
        infos = [ProjectionInfo(name=n, m=d.shape[0], n=d.shape[1], sigma2=d.sigma2, loss_weight=d.loss_weight,
                                fisher_w=wstats.fisher_w.get(n, 0.0)) for n, d in decomps.items()]
        ctx = AllocContext(infos=infos)
        if isinstance(weights.allocation, Strs):
            windows = calibration_windows(lm, calibration, graph)[: weights.strs_windows]
            ctx.evaluate = LayerwisePerplexity(lm.model, windows, decomps)
        alloc = allocate(weights.allocation, ctx)
        timings["alloc_s"] = alloc.seconds
        factors = {n: decomps[n].factors(r) for n, r in alloc.ranks.items()}
        dtype = lm.model.model.embed_tokens.weight.dtype
        factors = {n: type(f)(f.U.to(dtype), f.V.to(dtype)) for n, f in factors.items()}
        plan.weights = WeightPlan(factorization=weights.factorization, allocation=weights.allocation,
                                  ranks=alloc.ranks, params_kept=alloc.params_kept, params_total=alloc.total_dense,
                                  alloc_seconds=alloc.seconds)
        del decomps
    if progressive is not None:
        names = list(plan.weights.ranks)
        acct = param_accounting(lm.spec, plan, names)
        plan.schedule = progressive.solve(target_ratio, [plan.weights.ranks[n] for n in names], acct["rank_cost"],
                                          acct["dense_params"], acct["total_params"], align=schedule.align)
        log.info("progressive: ranks stored for %.4f removed, %s (average over %d decode steps: %.4f removed)",
                 progressive.stored_ratio(target_ratio), plan.schedule.describe(), progressive.tokens,
                 1 - pooled_fraction(plan.schedule, [plan.weights.ranks[n] for n in names], acct["rank_cost"],
                                     acct["dense_params"], acct["total_params"], [progressive.tokens]))
    t = time.perf_counter()
    cm = compile_model(lm.model, plan, factors, tokenizer=lm.tokenizer, graph=graph, latent=latent)
    timings["passes_s"] = time.perf_counter() - t
    timings["compress_s"] = time.perf_counter() - t_start
    return CompressionResult(compressed=cm, timings=timings, stats=stats)


def open_model(model: str | Path | CompressedModel | None, *, max_len: int = 2048,
               dtype: str | None = None) -> CompressedModel:
    """A compressed folder, a plain model (as an uncompressed graph), or the default model;
    ``dtype`` ("float32", "float16", "bfloat16") converts a folder's or model's weights."""
    if isinstance(model, CompressedModel):
        if dtype is not None and dtype != model.plan.dtype:
            raise ConfigError(f"cannot convert a compressed model in memory to {dtype}; save it and open the folder")
        return model
    if model is not None and (Path(model) / "lrexport.json").is_file():
        return load_compressed(model, dtype=dtype)
    dtype = check_dtype(dtype or "float32")
    lm = load(model, max_len=max_len, dtype=getattr(torch, dtype))
    plan = Plan(model=lm.spec.hf_config, source=lm.source, max_len=lm.model.max_len, dtype=dtype)
    return compile_model(lm.model, plan, {}, tokenizer=lm.tokenizer)


def stop_ids(cm: CompressedModel) -> list[int]:
    """The model's stop tokens: its config's eos ids plus the tokenizer's eos."""
    ids = set(cm.spec.eos_token_ids)
    tok = cm.tokenizer
    if tok is not None and getattr(tok, "eos_token_id", None) is not None:
        ids.add(int(tok.eos_token_id))
    return sorted(ids)


def generate_fn(cm: CompressedModel, *, schedule: Schedule | None | bool = True, batch_size: int = 8,
                min_new_tokens: int = 0, device: str = "cpu"):
    """A ``GenerateFn`` (greedy) over the compressed graph, applying the plan's schedule.

    ``schedule=True`` uses the plan's schedule, ``None``/``False`` none, or pass another one.
    ``fn.avg_active()`` is the activated-parameter fraction pooled over every decode step of
    every prompt so far, and ``fn.steps`` the number of decode steps of each prompt.
    ``device="cuda"`` runs the graph on the GPU.
    """
    backend = cm.backend(device)
    sched = cm.plan.schedule if schedule is True else (schedule or None)
    stops = stop_ids(cm)
    acc = {"sum": 0.0, "n": 0, "prefill": 1.0}

    def fn(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        out = []
        for i in range(0, len(prompts), batch_size):
            res = generate(backend, prompts[i:i + batch_size], max_new_tokens=max_new_tokens, stop_ids=stops,
                           schedule=sched, min_new_tokens=min_new_tokens)
            s, n = res.active_sum
            acc["sum"], acc["n"], acc["prefill"] = acc["sum"] + s, acc["n"] + n, res.prefill_fraction
            fn.steps.extend(len(t) - 1 for t in res.tokens)
            out.extend(res.tokens)
        return out

    fn.steps = []  # type: ignore[attr-defined]
    fn.avg_active = lambda: acc["sum"] / acc["n"] if acc["n"] else acc["prefill"]  # type: ignore[attr-defined]
    return fn


def evaluate(*, model: str | Path | CompressedModel | None = None, ppl: bool = True, ppl_window: int = 512,
             ppl_windows: int | None = 40, xsum: int = 0, xsum_min_new_tokens: int = 4,
             zeroshot_tasks: tuple[str, ...] = (),
             zeroshot_limit: int | None = None, data_dir: str | Path | None = None,
             schedule: Schedule | None | bool = True, reference_predictions: list[str] | None = None,
             device: str = "cpu") -> dict[str, Any]:
    """Perplexity, XSum ROUGE-L and zero-shot accuracy of a (compressed) model, as a dict
    (``device="cuda"``: the graph runs on the GPU)."""
    from lrexport import eval as ev

    cm = open_model(model)
    if cm.tokenizer is None:
        raise ConfigError("evaluation needs a tokenizer; the model folder has none")
    backend = cm.backend(device)
    out: dict[str, Any] = {}
    if ppl:
        text = ev.wikitext_test_text(data_dir=data_dir)
        r = ev.perplexity(backend, cm.tokenizer, text, window=ppl_window, num_windows=ppl_windows)
        out["ppl"] = {"ppl": r.ppl, "window": r.window, "windows": r.windows, "tokens": r.tokens}
    if xsum:
        gen = generate_fn(cm, schedule=schedule, min_new_tokens=xsum_min_new_tokens, device=device)
        pairs = ev.xsum_pairs(n=xsum, data_dir=data_dir)
        r = ev.xsum_rouge(gen, cm.tokenizer, pairs=pairs, n=xsum)
        out["xsum"] = {"rougeL": r.rougeL, "n": r.n, "prompt_format": r.prompt_format,
                       "predictions": r.predictions,
                       "avg_active_params": gen.avg_active()}
        if reference_predictions is not None:
            out["xsum"]["rougeL_fidelity"] = ev.rouge_l(r.predictions, reference_predictions[: len(r.predictions)])
    if zeroshot_tasks:
        out["zeroshot"] = ev.zeroshot(backend, cm.tokenizer, tuple(zeroshot_tasks), limit=zeroshot_limit,
                                      data_dir=data_dir)
    return out


def chat_prompt(tokenizer, text: str, *, chat: bool | None = None) -> list[int]:
    """Token ids of a prompt; wrapped in the chat template when the tokenizer has one (or ``chat``)."""
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if use_chat:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        return tokenizer(rendered, add_special_tokens=False).input_ids
    return tokenizer(text).input_ids


@dataclass
class Runner:
    """What generation needs, whatever the backend: the backend, tokenizer, plan and stop ids."""

    backend: Any
    tokenizer: Any
    plan: Plan
    stop_ids: list[int]
    kind: str  # "torch" or "onnx"


def is_onnx_folder(path: str | Path | None) -> bool:
    if path is None or isinstance(path, CompressedModel):
        return False
    meta = Path(path) / "lrexport.json"
    return meta.is_file() and bool(json.loads(meta.read_text()).get("onnx"))


DEVICES = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def open_runner(model: str | Path | CompressedModel | None, *, backend: str = "auto",
                use_library: bool = True, device: str = "cpu", cuda_graph: bool | None = None) -> Runner:
    """An exported ONNX folder runs on ONNX Runtime; anything else on the PyTorch graph.

    ``device``: ``cpu`` or ``cuda``. ONNX folders use ONNX Runtime's CUDA execution provider
    (caches kept on the GPU; needs onnxruntime-gpu and the library's CUDA kernel); the PyTorch
    graph moves to the GPU and runs lrexport's Triton kernels there. ``cuda_graph``: decode steps of an
    ONNX folder as CUDA graphs (None: on CUDA for folders exported with ``--cuda-graph``).
    """
    if backend not in ("auto", "torch", "onnx"):
        raise ConfigError(f"backend must be auto, torch or onnx, got {backend!r}")
    if device not in DEVICES:
        raise ConfigError(f"device must be one of {sorted(DEVICES)}, got {device!r}")
    onnx_folder = is_onnx_folder(model)
    if backend == "onnx" and not onnx_folder:
        raise ConfigError(f"{model} is not an exported ONNX folder; run `lrexport export` first")
    if onnx_folder and backend != "torch":
        from lrexport.export import load_onnx_backend
        from lrexport.models.load import load_tokenizer

        be, meta = load_onnx_backend(model, use_library=use_library, providers=DEVICES[device],
                                     cuda_graph=cuda_graph)
        plan = Plan.from_dict({k: v for k, v in meta.items() if k != "onnx"})
        tok = load_tokenizer(Path(model))
        stops = set(meta["onnx"].get("eos_token_ids", []))
        if tok is not None and tok.eos_token_id is not None:
            stops.add(int(tok.eos_token_id))
        return Runner(be, tok, plan, sorted(stops), "onnx")
    cm = open_model(model)
    return Runner(cm.backend(device), cm.tokenizer, cm.plan, stop_ids(cm), "torch")


def export(*, model: str | Path | CompressedModel | None = None, out: str | Path, cuda_arch: int | None = None,
           dtype: str | None = None, cuda_tuning: str | None = None, fuse_norms: bool = True,
           fuse_matmuls: bool | None = None, cuda_graph: bool = False):
    """Export a compressed folder (or a plain model) as a deployable ONNX folder.

    ``dtype``: convert the weights first ("float16" for ONNX Runtime's CUDA execution provider;
    the CPU kernel of the custom op is float32). ``cuda_arch``, ``cuda_tuning``: see
    :func:`lrexport.export.export_onnx` (GPU decode kernels of float16 models); ``fuse_norms``: residual
    Adds and RMSNorms as ONNX Runtime's ``SkipSimplifiedLayerNormalization`` (False: standard ops);
    ``fuse_matmuls``: MatMuls sharing their input as one MatMul and a Split (None: for float16 models);
    ``cuda_graph``: ``past_len`` read in GPU memory by the attention, so that decode steps can run as
    CUDA graphs (``load_onnx_backend(..., cuda_graph=True)``)."""
    from lrexport.export import export_onnx

    return export_onnx(open_model(model, dtype=dtype), out, cuda_arch=cuda_arch, cuda_tuning=cuda_tuning,
                       fuse_norms=fuse_norms, fuse_matmuls=fuse_matmuls, cuda_graph=cuda_graph)


def generate_text(*, model: str | Path | CompressedModel | Runner | None = None, prompts: list[str],
                  max_new_tokens: int = 64,
                  sampling: Sampling = Sampling(), schedule: Schedule | None | bool = True, chat: bool | None = None,
                  on_token=None, backend: str = "auto", use_library: bool = True):
    """Generate text for ``prompts``; returns ``(texts, GenerationResult)``.

    ``model`` is a compressed folder or model (PyTorch graph), an exported ONNX folder (ONNX
    Runtime), a plain model folder or None (the default model)."""
    run = model if isinstance(model, Runner) else open_runner(model, backend=backend, use_library=use_library)
    tok = run.tokenizer
    if tok is None:
        raise ConfigError("text generation needs a tokenizer; the model folder has none")
    ids = [chat_prompt(tok, p, chat=chat) for p in prompts]
    sched = run.plan.schedule if schedule is True else (schedule or None)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    res = generate(run.backend, ids, max_new_tokens=max_new_tokens, sampling=sampling, stop_ids=run.stop_ids,
                   schedule=sched, pad_id=pad, on_token=on_token)
    texts = [tok.decode(t, skip_special_tokens=True) for t in res.tokens]
    return texts, res
