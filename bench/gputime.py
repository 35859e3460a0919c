"""GPU time of a call, from the kernels' own durations (CUPTI, through PyTorch's profiler).

Timing a call with events around it measures whatever keeps the GPU waiting too: when the host
takes longer to launch a call's kernels than the GPU takes to run them (small decode steps,
Python launchers, ONNX Runtime's per-node work), the events measure the host. The numbers
here are the kernels' durations as the GPU recorded them, summed per call, so they measure the
work, and the host-inclusive time can be reported beside them.

CUPTI records every kernel of the process, whoever launched it: PyTorch, Triton, or ONNX
Runtime's CUDA execution provider and lrexport's custom-op library.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from collections import defaultdict
from collections.abc import Callable

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
SHORT_GAP_US = 20.0  # a gap between two GPU events shorter than this: launch latency, not the host

# kernel name fragments (lowercase) -> category, first match wins
CATEGORIES = (
    ("attention (lrexport)", ("latent_attn", "write_tokens", "past_len_i32", "combine", "lowrank", "attend")),
    ("attention (other)", ("flash", "attention", "attn", "fmha", "mha", "xqa", "gqa", "rotary", "softmax")),
    ("matmul", ("gemm", "gemv", "xmma", "cutlass", "cublas", "nvjet", "matmul", "splitk", "dot_kernel")),
    ("norm", ("layernorm", "layer_norm", "rmsnorm", "skip")),
    ("copy", ("memcpy", "memset", "copy")),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "elementwise/other"


def _trace(fn: Callable[[], object]) -> list[dict]:
    """The GPU events (kernels, copies, memsets) recorded while ``fn`` runs, in start order."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    finally:
        os.unlink(path)
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATS]
    return sorted(gpu, key=lambda e: float(e["ts"]))


def gpu_time_us(fn: Callable[[], object], reps: int = 20, flush_bytes: int = 256 << 20) -> float:
    """Median over ``reps`` calls of the summed duration (µs) of the GPU work each call launches.

    Before every call a ``flush_bytes`` buffer is rewritten so that the call does not find its
    inputs in L2 (as ``triton.testing.do_bench`` does); the flush's own kernel (a bitwise not,
    which the measured calls do not launch) delimits the calls and is not counted. Raises if a
    call shows no GPU work.
    """
    import torch

    flush = torch.empty(flush_bytes, dtype=torch.int8, device="cuda")
    fn()
    flush_names = {e["name"] for e in _trace(flush.bitwise_not_)}

    def body():
        for _ in range(reps):
            flush.bitwise_not_()
            fn()

    per_call: list[float] = []
    for e in _trace(body):
        if e["name"] in flush_names:
            per_call.append(0.0)
        elif per_call:
            per_call[-1] += float(e["dur"])
    if len(per_call) != reps or min(per_call) <= 0:
        raise RuntimeError(f"gpu_time_us: expected {reps} calls with GPU work, the trace shows {per_call}")
    return statistics.median(per_call)


def step_breakdown(fn: Callable[[], object], steps: int) -> dict:
    """GPU work of ``steps`` calls of ``fn``: the busy time per call and its split by kernel category.

    Returns ``{"gpu_ms": mean summed duration per call, "kernels_per_step": ..., "by_category":
    {category: ms per call}, "top": [(kernel name, ms per call), ...], "span_ms": first start to last
    end per call, "gap_ms": the GPU's idle time between its events within that span per call, split into
    ``gap_short_ms`` (gaps under ``SHORT_GAP_US``: one launch after another, as inside a graph) and
    ``gap_long_ms`` (longer: the GPU waiting for the host)}``.
    """
    def body():
        for _ in range(steps):
            fn()

    events = _trace(body)
    by_cat: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    for e in events:
        name = e["name"] if e["cat"] == "kernel" else e["cat"]
        by_cat[category(name)] += float(e["dur"])
        by_name[name] += float(e["dur"])
    total = sum(by_cat.values())
    short = long = 0.0
    end = None
    for e in events:  # in start order; events may overlap (several streams)
        start = float(e["ts"])
        if end is not None and start > end:
            if start - end < SHORT_GAP_US:
                short += start - end
            else:
                long += start - end
        end = max(end or start, start + float(e["dur"]))
    span = (end - float(events[0]["ts"])) if events else 0.0
    return {"gpu_ms": total / steps / 1e3, "kernels_per_step": len(events) / steps,
            "span_ms": span / steps / 1e3, "gap_ms": (short + long) / steps / 1e3,
            "gap_short_ms": short / steps / 1e3, "gap_long_ms": long / steps / 1e3,
            "by_category": {k: v / steps / 1e3 for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
            "top": [(n[:120], v / steps / 1e3) for n, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:12]]}
