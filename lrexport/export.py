"""``lrexport export``: write a compressed model as an ONNX folder.

    out/
      model.onnx, model.onnx.data   the graph (weights as external data)
      lrexport.json                 the plan, plus the ONNX I/O and cache layout ("onnx")
      config.json, tokenizer files

Float16 models with latent-KV attention also carry GPU decode kernels: the Triton kernel
compiled ahead of time for one GPU architecture (``cuda_arch``, default sm_90) and attached to
each ``LowRankKVAttention`` node, which the library's CUDA kernel launches for one-token steps
(:mod:`lrexport.kernels.aot`). ``cuda_arch=0`` leaves them out.

The folder is written to a temporary folder and renamed, so an interrupted export leaves
nothing that looks complete. ``onnx.checker`` runs on the result.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from lrexport.compile import CompressedModel, param_accounting
from lrexport.emit.onnx import IR_VERSION, emit
from lrexport.errors import PassError
from lrexport.passes.base import PassResult
from lrexport.util import atomic_dir

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"


@dataclass
class ExportResult:
    folder: Path
    passes: list[PassResult]
    seconds: float
    onnx_info: dict[str, Any]


def export_onnx(cm: CompressedModel, out: str | Path, *, cuda_arch: int | None = None,
                cuda_tuning: str | None = None, fuse_norms: bool = True,
                fuse_matmuls: bool | None = None, cuda_graph: bool = False) -> ExportResult:
    """Emit ``cm``'s graph as ONNX and write the deployable folder ``out`` (atomically).

    ``cuda_arch``: the compute capability (e.g. 90) to compile the GPU decode kernels of a float16
    model's latent-KV attention for; None: 90 when the model is float16 and Triton is installed;
    0: none. ``cuda_tuning``: their settings (:meth:`lrexport.kernels.aot.Tuning.parse`; default
    the tuned ones, or ``LREXPORT_CUDA_TUNING``). ``fuse_norms``: residual Adds and RMSNorms as ONNX
    Runtime's ``SkipSimplifiedLayerNormalization`` (False: standard ops, for runtimes without
    ONNX Runtime's contrib ops). ``fuse_matmuls``: the MatMuls that read one input with constant
    weights (e.g. q/k/v's first factors) as one MatMul and a Split; None: for float16 models (the
    GPU's: fewer, larger GEMMs), not for float32 ones (slower on ONNX Runtime's CPU provider; see
    docs/design.md). ``cuda_graph``: the attention reads ``past_len`` in device memory
    (``LowRankKVAttentionDeviceLen``), so that ONNX Runtime's CUDA provider can capture each decode
    step as a CUDA graph and replay it (:class:`~lrexport.runtime.ort_backend.OrtBackend`'s
    ``cuda_graph``); the folder records it (``onnx.cuda_graph`` in lrexport.json).
    """
    from lrexport.errors import ConfigError
    from lrexport.kernels import aot

    try:
        tuning = aot.Tuning.parse(cuda_tuning) if cuda_tuning else None
    except ValueError as e:
        raise ConfigError(f"--cuda-tuning: {e}") from None
    t0 = time.perf_counter()
    tg = cm.graph
    if "kivi" in tg.meta:
        raise PassError("the KIVI baseline is a quality simulation and cannot be exported")
    if cuda_graph and tg.has_rank_input:
        raise PassError("--cuda-graph: the model has a progressive rank schedule, and CUDA graphs cannot capture it "
                        "(its ranks are a model input whose shape computations ONNX Runtime runs on the CPU); "
                        "export it without --cuda-graph, or compress without a schedule")
    res = emit(tg, fuse_norms=fuse_norms, fuse_matmuls=fuse_matmuls, device_lengths=cuda_graph)
    gpu = _gpu_kernels(res.model, cuda_arch, tuning)
    if gpu:
        _warn_unaligned_ranks(cm)
        _warn_grouped_latents(cm)
        _warn_padded_kv_ranks(cm)
    info = {
        "file": MODEL_FILE, "ir_version": IR_VERSION, "inputs": res.input_names, "outputs": res.output_names,
        "cache": [{"name": n, "width": w, "dtype": d} for n, w, d in zip(tg.cache.names, tg.cache.widths,
                                                                        tg.cache.dtypes)],
        "rank_inputs": list(tg.rank_names), "rank_max": list(tg.rank_max), "max_len": tg.max_len,
        "eos_token_ids": list(cm.spec.eos_token_ids), "cuda_graph": bool(cuda_graph),
        **param_accounting(cm.spec, cm.plan, tg.rank_names),
    }
    if gpu:
        info["cuda_kernels"] = gpu
    folder = Path(out)
    with atomic_dir(folder) as tmp:
        onnx.save_model(res.model, str(tmp / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=MODEL_FILE + ".data", size_threshold=1024)
        onnx.checker.check_model(str(tmp / MODEL_FILE))
        (tmp / "config.json").write_text(json.dumps(cm.plan.model, indent=2, default=str))
        if cm.tokenizer is not None:
            cm.tokenizer.save_pretrained(str(tmp))
        plan = cm.plan.to_dict()
        plan["onnx"] = info
        (tmp / "lrexport.json").write_text(json.dumps(plan, indent=2, default=str))  # last: marks completion
    seconds = time.perf_counter() - t0
    log.info("exported %s in %.1fs", folder, seconds)
    return ExportResult(folder=folder, passes=res.passes, seconds=seconds, onnx_info=info)


def _warn_unaligned_ranks(cm: CompressedModel) -> None:
    """Float16 GEMMs run on the GPU's tensor cores only with dimensions in multiples of 8: say so
    when the weight ranks of a model compiled for the GPU are not."""
    ranks = dict(getattr(cm.plan.weights, "ranks", None) or {})
    odd = sorted(n for n, r in ranks.items() if r % 8)
    if odd:
        log.warning("%d of %d factorized projections have ranks that are not multiples of 8 (e.g. %s: %d); float16 "
                    "GEMMs on GPUs run much slower with them: compress with --align 16", len(odd), len(ranks),
                    odd[0], ranks[odd[0]])


def _warn_grouped_latents(cm: CompressedModel) -> None:
    """Latents shared by groups of KV heads (G-LRD, J-LRD) make the GPU decode kernel rebuild each head's keys from
    the group's whole latent: say so, with what was measured, when such a model is compiled for the GPU."""
    kv = cm.plan.kv or {}
    s = int(kv.get("group_size", 1) or 1)
    if s > 1:
        log.warning("the KV latents are shared by groups of %d KV heads (%s-LRD): on the GPU each head rebuilds "
                    "its keys from the group's whole latent, about %dx the tensor-core work per cached token of "
                    "per-head latents; on an H200 such decode kernels ran 2.5-4.5x slower than per-head ones (M-LRD) "
                    "at the same cache size (docs/gpu.md). Compress with --kv-group 1 where decode speed matters",
                    s, kv.get("grouping", "G"), s)


def _warn_padded_kv_ranks(cm: CompressedModel) -> None:
    """The GPU decode kernel's time follows each per-head latent rank padded to a power of two: on an H200 (bench/
    results/gpu_kernels_ranks.md) ranks 80 to 128 took about 1.9x the time of rank 64, and ranks 32 to 64 the time
    of 64. Say so when a GPU export of per-head latents (M-LRD) has ranks from 65 to 80, where a rank of 64 would
    take about half that layer's attention time."""
    kv = cm.plan.kv or {}
    if int(kv.get("group_size", 1) or 1) != 1:
        return
    ranks = sorted((kv.get("ranks") or {}).items(), key=lambda item: int(item[0]))
    past = [(int(layer), side, int(r)) for layer, pair in ranks for side, r in zip(("key", "value"), pair)
            if 64 < int(r) <= 80]
    if past:
        layer, side, r = past[0]
        log.warning("%d of %d KV latent ranks are just past 64 (e.g. layer %d, %s rank %d): the GPU decode kernel "
                    "pads them to 128, and on an H200 ranks 80-128 took about 1.9x the time of rank 64 "
                    "(docs/gpu.md). A KV allocation that keeps them at 64 or below decodes faster",
                    len(past), 2 * len(ranks), layer, side, r)


def _gpu_kernels(model: onnx.ModelProto, cuda_arch: int | None, tuning=None) -> dict | None:
    from lrexport.emit.functions import LOWRANK_OPS
    from lrexport.kernels import aot, triton_latent

    if cuda_arch == 0 or not any(n.op_type in LOWRANK_OPS for n in model.graph.node):
        return None
    if cuda_arch is None:
        if triton_latent.triton is None:
            log.info("triton is not installed: the export carries no GPU decode kernels")
            return None
        f16 = any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
        if not f16:
            return None
        cuda_arch = aot.DEFAULT_ARCH
    elif triton_latent.triton is None:
        raise PassError(f"compiling GPU kernels for sm_{cuda_arch} needs triton (pip install triton)")
    try:
        summary = aot.attach_cuda_kernels(model, cuda_arch, tuning)
    except ValueError as e:  # LREXPORT_CUDA_TUNING
        raise PassError(str(e)) from None
    log.info("GPU decode kernels for sm_%d: %d nodes, %d compiled kernels%s", cuda_arch, summary["nodes"],
             summary["kernels"], f", {len(summary['skipped'])} nodes without" if summary["skipped"] else "")
    return summary


def load_onnx_backend(folder: str | Path, *, use_library: bool = True, **kw):
    """An :class:`~lrexport.runtime.ort_backend.OrtBackend` over an exported folder.

    ``cuda_graph`` (in ``kw``): None (default) uses CUDA graphs on CUDA when the folder was exported
    with ``--cuda-graph``."""
    from lrexport.errors import PlanError
    from lrexport.runtime.ort_backend import OrtBackend, first_provider

    folder = Path(folder)
    meta_path = folder / "lrexport.json"
    if not meta_path.is_file():
        raise PlanError(f"{folder}: no lrexport.json (not an exported lrexport folder, or an incomplete one)")
    meta = json.loads(meta_path.read_text())
    info = meta.get("onnx")
    if not info:
        raise PlanError(f"{folder}: lrexport.json has no 'onnx' section; export the model with `lrexport export`")
    cache = [(c["name"], c["width"], c["dtype"]) for c in info["cache"]]
    if kw.get("cuda_graph") is None:  # by default: on CUDA, for the models exported for it
        kw["cuda_graph"] = first_provider(kw.get("providers")) == "CUDAExecutionProvider" and bool(
            info.get("cuda_graph"))
    if kw["cuda_graph"] and not info.get("cuda_graph"):
        raise PlanError(f"{folder}: CUDA graphs need a model whose attention reads past_len on the GPU; export it "
                        "with `lrexport export --cuda-graph`")
    return OrtBackend(folder / info["file"], cache=cache, max_len=info["max_len"], rank_max=info["rank_max"],
                      rank_cost=info["rank_cost"], dense_params=info["dense_params"],
                      total_params=info["total_params"], use_library=use_library, **kw), meta
