"""An uncompressed Llama decoder on ONNX Runtime's fused operators: the strongest standard baseline.

:func:`build_gqa_model` writes a random Llama-family decoder (the shapes of a Hugging Face
config, e.g. ``llama3_8b_config()`` of ``bench/gpu_e2e.py``) as an ONNX graph made with
``onnx.helper``, in the form ONNX Runtime's own generative-AI models take:

* attention is ``com.microsoft.GroupQueryAttention`` with RoPE inside the node
  (``do_rotary=1``, non-interleaved ``cos_cache`` / ``sin_cache``) over q/k/v packed in one
  MatMul; its key / value caches are BNSH ``[B, kv_heads, capacity, head_dim]`` buffers that
  are both the past inputs and the present outputs, so each step writes its token in place
  and decode runs ONNX Runtime's fused attention kernels on CUDA (flash decoding);
* RMSNorm is ``SimplifiedLayerNormalization`` (default domain) before the first layer and
  ``com.microsoft.SkipSimplifiedLayerNormalization`` (residual add and RMSNorm in one kernel)
  everywhere else; both run on the CPU and CUDA providers in float16 and float32;
* SiLU is ``x * Sigmoid(x)``, which ONNX Runtime's graph optimizer fuses into one
  ``QuickGelu`` kernel on the CPU and CUDA providers.

Step inputs: ``input_ids`` int64 ``[B, S]``, ``seqlens_k`` int32 ``[B]`` (each row's total
length after the step, minus one), ``total_sequence_length`` int32 scalar (the largest total
length), ``past_key_{i}`` / ``past_value_{i}``; outputs: ``logits`` ``[B, S, vocab]`` and
``present_key_{i}`` / ``present_value_{i}``. A step is either a first prompt (``S`` equal to
``total_sequence_length``, the cache empty) or one token per row. ONNX Runtime's CUDA
GroupQueryAttention runs float16 and bfloat16 only; its CPU kernel also runs float32.

:class:`GqaSession` runs a built folder with the caches bound in place (IO binding), optionally
with decode steps captured and replayed as CUDA graphs (``cuda_graph=True``: the token ids, lengths
and logits in fixed GPU buffers, ``total_sequence_length`` held at the caches' capacity);
:func:`gqa_worker` times decode steps with it, with the row format of ``worker()`` in
``bench/gpu_e2e.py``.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

FOLDER = "uncompressed_gqa"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
_ALIGN = 4096  # offsets of the tensors in the data file: page-aligned, so ONNX Runtime can map them
_NP_DTYPES = {"float16": np.float16, "float32": np.float32}


def _rope_tables(max_len: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Llama's RoPE tables ``cos`` / ``sin`` of shape ``[max_len, head_dim / 2]`` (float64)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.outer(np.arange(max_len, dtype=np.float64), inv_freq)
    return np.cos(angles), np.sin(angles)


class _ExternalWeights:
    """Writes initializers one by one into a single external data file (no 2 GB protobuf limit,
    and no copy of the whole model in memory)."""

    def __init__(self, folder: Path):
        self.file = open(folder / DATA_FILE, "wb")  # noqa: SIM115  (closed by close())
        self.initializers = []

    def add(self, name: str, array: np.ndarray) -> None:
        from onnx import TensorProto, helper

        array = np.ascontiguousarray(array)
        offset = (self.file.tell() + _ALIGN - 1) // _ALIGN * _ALIGN
        self.file.seek(offset)
        self.file.write(array.tobytes())
        tensor = TensorProto(name=name, dims=list(array.shape),
                             data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", DATA_FILE), ("offset", offset), ("length", array.nbytes)):
            tensor.external_data.add(key=key, value=str(value))
        self.initializers.append(tensor)

    def close(self) -> None:
        self.file.close()


def _graph(cfg: dict, dtype_name: str, weights: _ExternalWeights, randn, ones):
    """The decoder's nodes, inputs and outputs; ``randn(shape)`` / ``ones(shape)`` give the weights."""
    from onnx import TensorProto, helper

    et = helper.np_dtype_to_tensor_dtype(np.dtype(_NP_DTYPES[dtype_name]))
    hidden, inter = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    H, K = int(cfg["num_attention_heads"]), int(cfg["num_key_value_heads"])
    D = int(cfg.get("head_dim") or hidden // H)
    L, V = int(cfg["num_hidden_layers"]), int(cfg["vocab_size"])
    eps, max_len = float(cfg["rms_norm_eps"]), int(cfg["max_position_embeddings"])
    nodes = []

    def node(op, inputs, outputs, domain="", **attrs):
        nodes.append(helper.make_node(op, inputs, outputs, name=outputs[0], domain=domain, **attrs))
        return outputs[0]

    weights.add("embed_tokens.weight", randn((V, hidden)))
    cos, sin = _rope_tables(max_len, D, float(cfg["rope_theta"]))
    weights.add("cos_cache", cos.astype(_NP_DTYPES[dtype_name]))
    weights.add("sin_cache", sin.astype(_NP_DTYPES[dtype_name]))
    residual = node("Gather", ["embed_tokens.weight", "input_ids"], ["embeddings"])
    x = None  # the output of the last MLP, added to the residual stream by the next norm
    for i in range(L):
        p = f"layers.{i}."
        weights.add(p + "input_layernorm.weight", ones(hidden))
        if x is None:
            h = node("SimplifiedLayerNormalization", [residual, p + "input_layernorm.weight"], [p + "attn_in"],
                     epsilon=eps, axis=-1, stash_type=1)
        else:
            node("SkipSimplifiedLayerNormalization", [x, residual, p + "input_layernorm.weight"],
                 [p + "attn_in", "", "", p + "attn_residual"], domain="com.microsoft", epsilon=eps)
            h, residual = p + "attn_in", p + "attn_residual"
        weights.add(p + "qkv_proj.weight", randn((hidden, (H + 2 * K) * D)))  # [in, out]: columns q | k | v
        qkv = node("MatMul", [h, p + "qkv_proj.weight"], [p + "qkv"])
        attn = node("GroupQueryAttention",
                    [qkv, "", "", f"past_key_{i}", f"past_value_{i}", "seqlens_k", "total_sequence_length",
                     "cos_cache", "sin_cache"],
                    [p + "attn", f"present_key_{i}", f"present_value_{i}"], domain="com.microsoft",
                    num_heads=H, kv_num_heads=K, scale=float(D) ** -0.5, do_rotary=1, rotary_interleaved=0)
        weights.add(p + "o_proj.weight", randn((H * D, hidden)))
        o = node("MatMul", [attn, p + "o_proj.weight"], [p + "o"])
        weights.add(p + "post_attention_layernorm.weight", ones(hidden))
        node("SkipSimplifiedLayerNormalization", [o, residual, p + "post_attention_layernorm.weight"],
             [p + "mlp_in", "", "", p + "mlp_residual"], domain="com.microsoft", epsilon=eps)
        h, residual = p + "mlp_in", p + "mlp_residual"
        for kind, shape in (("gate_proj", (hidden, inter)), ("up_proj", (hidden, inter)),
                            ("down_proj", (inter, hidden))):
            weights.add(p + kind + ".weight", randn(shape))
        gate = node("MatMul", [h, p + "gate_proj.weight"], [p + "gate"])
        up = node("MatMul", [h, p + "up_proj.weight"], [p + "up"])
        silu = node("Mul", [gate, node("Sigmoid", [gate], [p + "gate_sigmoid"])], [p + "silu"])
        x = node("MatMul", [node("Mul", [silu, up], [p + "act"]), p + "down_proj.weight"], [p + "mlp_out"])
    weights.add("norm.weight", ones(hidden))
    if x is None:
        final = node("SimplifiedLayerNormalization", [residual, "norm.weight"], ["final_norm"], epsilon=eps,
                     axis=-1, stash_type=1)
    else:
        final = node("SkipSimplifiedLayerNormalization", [x, residual, "norm.weight"], ["final_norm"],
                     domain="com.microsoft", epsilon=eps)
    weights.add("lm_head.weight", randn((hidden, V)))
    node("MatMul", [final, "lm_head.weight"], ["logits"])

    cache_shape = ["batch", K, "capacity", D]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
              helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    outputs = [helper.make_tensor_value_info("logits", et, ["batch", "sequence", V])]
    for i in range(L):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}_{i}", et, cache_shape))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}_{i}", et, cache_shape))
    return nodes, inputs, outputs, {"hidden_size": hidden, "intermediate_size": inter, "num_heads": H,
                                    "num_kv_heads": K, "head_dim": D, "num_layers": L, "vocab_size": V,
                                    "max_len": max_len}


def build_gqa_model(cfg: dict, dtype_name: str, out: Path, gen_device: str, seed: int = 0) -> Path:
    """Write the random decoder of ``cfg`` to ``out/uncompressed_gqa`` and return that folder.

    The folder holds ``model.onnx``, its weights in ``model.onnx.data`` and ``meta.json`` (the
    cache layout and the model's dimensions). Weights are ``normal * 0.02`` in ``dtype_name``
    (``"float16"`` or ``"float32"``), drawn on ``gen_device`` with ``seed``; norms are ones;
    projections are stored as ``[in, out]``. A complete folder built from the same config,
    dtype and seed is reused; the model is written to a temporary folder first and renamed
    when complete.
    """
    import torch
    from onnx import helper, save_model

    if dtype_name not in _NP_DTYPES:
        raise ValueError(f"dtype_name must be one of {sorted(_NP_DTYPES)}, got {dtype_name!r}")
    if cfg.get("rope_scaling"):
        raise ValueError(f"rope_scaling {cfg['rope_scaling']!r} is not supported: the model has Llama's plain RoPE")
    out = Path(out)
    folder = out / FOLDER
    source = {"config": cfg, "dtype": dtype_name, "seed": seed}
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        if json.loads(meta_path.read_text()).get("source") == source:
            return folder
        print(f"{folder}: built from another config, dtype or seed; rebuilding", file=sys.stderr, flush=True)
    tmp = out / (FOLDER + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    torch.manual_seed(seed)
    dtype = getattr(torch, dtype_name)

    def randn(shape):
        return (torch.randn(*shape, device=gen_device, dtype=torch.float32) * 0.02).to(dtype).cpu().numpy()

    def ones(n):
        return np.ones(n, dtype=_NP_DTYPES[dtype_name])

    t0 = time.perf_counter()
    weights = _ExternalWeights(tmp)
    try:
        nodes, inputs, outputs, dims = _graph(cfg, dtype_name, weights, randn, ones)
    finally:
        weights.close()
    graph = helper.make_graph(nodes, "llama_gqa_decoder", inputs, outputs, initializer=weights.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10  # ONNX Runtime reads IR <= 13; onnx may write newer by default
    save_model(model, str(tmp / MODEL_FILE))
    caches = [f"past_{kind}_{i}" for i in range(dims["num_layers"]) for kind in ("key", "value")]
    meta = {"format": "onnxruntime GroupQueryAttention decoder", "file": MODEL_FILE, "dtype": dtype_name, **dims,
            "cache_layout": "BNSH [batch, num_kv_heads, capacity, head_dim], past_* bound as present_*",
            "caches": caches, "source": source, "build_s": time.perf_counter() - t0,
            "onnx_bytes": sum(f.stat().st_size for f in tmp.glob("model.onnx*"))}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    print(f"{FOLDER}: built in {meta['build_s']:.0f}s ({meta['onnx_bytes'] / 2**30:.2f} GiB)", file=sys.stderr,
          flush=True)
    return folder


class GqaSession:
    """An ONNX Runtime session over a folder of :func:`build_gqa_model`.

    ``device`` is ``"cpu"`` (CPU provider; caches are numpy arrays) or ``"cuda"`` (CUDA
    provider first, CPU second; caches are ``torch`` tensors in GPU memory, bound by pointer).
    ``cuda_graph``: decode steps (one token per row) as CUDA graphs, one per set of bound caches.
    """

    def __init__(self, folder: str | Path, device: str = "cpu", cuda_graph: bool = False):
        import onnxruntime as ort

        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        folder = Path(folder)
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{folder}: no meta.json (not a folder of build_gqa_model, or an incomplete one)")
        self.meta = json.loads(meta_path.read_text())
        if device == "cuda" and self.meta["dtype"] != "float16":
            raise ValueError(f"{folder}: ONNX Runtime's CUDA GroupQueryAttention runs float16, not "
                             f"{self.meta['dtype']} (build the model with dtype_name='float16')")
        self.device = device
        self.np_dtype = _NP_DTYPES[self.meta["dtype"]]
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        self.stream = None  # CUDA graphs: ONNX Runtime's stream, the session's own (BoundCaches.device_loop)
        if cuda_graph:
            if device != "cuda":
                raise ValueError("cuda_graph needs device='cuda'")
            import torch

            self.stream = torch.cuda.Stream()
            providers[0] = ("CUDAExecutionProvider", {"enable_cuda_graph": "1",
                                                      "user_compute_stream": str(self.stream.cuda_stream)})
        self.cuda_graph = cuda_graph
        self._graphs = 0  # graph ids handed out
        self.session = ort.InferenceSession(str(folder / self.meta["file"]), providers=providers)
        if device == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise RuntimeError("ONNX Runtime has no CUDA execution provider here (install onnxruntime-gpu); "
                               f"available: {ort.get_available_providers()}")

    def new_caches(self, batch: int, capacity: int) -> list:
        """Zeroed key / value caches of ``capacity`` positions, in the order of ``meta["caches"]``."""
        m = self.meta
        shape = (batch, m["num_kv_heads"], capacity, m["head_dim"])
        if self.device == "cpu":
            return [np.zeros(shape, dtype=self.np_dtype) for _ in m["caches"]]
        import torch

        caches = [torch.zeros(shape, dtype=getattr(torch, m["dtype"]), device="cuda") for _ in m["caches"]]
        torch.cuda.synchronize()  # ONNX Runtime runs on its own stream
        return caches

    def bind(self, caches: list) -> BoundCaches:
        """An IO binding of ``caches`` as both the past inputs and the present outputs."""
        return BoundCaches(self, caches)


class BoundCaches:
    """Caches bound in place to a :class:`GqaSession`; :meth:`step` runs one step over them."""

    def __init__(self, gqa: GqaSession, caches: list):
        import onnxruntime as ort

        m = gqa.meta
        if len(caches) != len(m["caches"]):
            raise ValueError(f"expected {len(m['caches'])} caches, got {len(caches)}")
        self.gqa, self.caches = gqa, caches
        self.batch, _, self.capacity, _ = caches[0].shape
        self.io = gqa.session.io_binding()
        self._logits = {}  # sequence length -> logits OrtValue
        self._graph = None  # CUDA graphs: (graph id, ids + seqlens_k on the GPU and pinned, logits, total)
        self._graph_bound = False
        for name, buf in zip(m["caches"], caches):
            expected = (self.batch, m["num_kv_heads"], self.capacity, m["head_dim"])
            if tuple(buf.shape) != expected:
                raise ValueError(f"{name}: shape {tuple(buf.shape)}, expected {expected}")
            present = "present_" + name.removeprefix("past_")
            if gqa.device == "cpu":
                val = ort.OrtValue.ortvalue_from_numpy(buf)  # shares the array's memory
                self.io.bind_ortvalue_input(name, val)
                self.io.bind_ortvalue_output(present, val)
            else:
                if not buf.is_cuda or not buf.is_contiguous():
                    raise ValueError(f"{name}: caches must be contiguous tensors in GPU memory")
                where = ("cuda", buf.device.index or 0, gqa.np_dtype, list(buf.shape), buf.data_ptr())
                self.io.bind_input(name, *where)
                self.io.bind_output(present, *where)

    def step(self, input_ids: np.ndarray, seqlens_k: np.ndarray, total_sequence_length: int,
             graph: bool = True) -> np.ndarray:
        """Run one step of ``input_ids`` ``[B, S]``; returns the logits ``[B, S, vocab]``: a numpy array on
        the CPU, a PyTorch tensor in GPU memory with CUDA (the caller picks tokens there).

        ``seqlens_k[b]`` is row ``b``'s length after the step minus one; ``total_sequence_length``
        the largest length after the step. The new keys and values are written into the caches.
        With CUDA graphs, one token per row replays the graph (:meth:`_graph_step`) unless ``graph``
        is False; other steps run without one, from host inputs.
        """
        import onnxruntime as ort

        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        batch, S = ids.shape
        if batch != self.batch:
            raise ValueError(f"input_ids has batch {batch}, the caches {self.batch}")
        if total_sequence_length > min(self.capacity, self.gqa.meta["max_len"]):
            raise ValueError(f"total_sequence_length {total_sequence_length} is past the cache capacity "
                             f"{self.capacity} or the model's max_len {self.gqa.meta['max_len']}")
        lens = np.ascontiguousarray(seqlens_k, dtype=np.int32)
        total = np.array(total_sequence_length, dtype=np.int32)
        if lens.shape != (batch,):
            raise ValueError(f"seqlens_k has shape {lens.shape}, expected ({batch},)")
        ro = None
        if self.gqa.cuda_graph:
            if S == 1 and graph:
                return self._graph_step(ids, lens)
            self._graph_bound = False  # host inputs bound: a replay rebinds its buffers
            ro = ort.RunOptions()
            ro.add_run_config_entry("gpu_graph_id", "-1")
        # the arrays stay referenced until the run: the binding may point at their memory
        self.io.bind_cpu_input("input_ids", ids)
        self.io.bind_cpu_input("seqlens_k", lens)
        self.io.bind_cpu_input("total_sequence_length", total)
        shape = [batch, S, self.gqa.meta["vocab_size"]]
        if self.gqa.device != "cpu":  # as lrexport's CUDA backend: a fresh PyTorch tensor in GPU memory
            import torch

            from lrexport.runtime.ort_backend import bind_gpu_output

            logits = bind_gpu_output(self.io, "logits", shape, getattr(torch, np.dtype(self.gqa.np_dtype).name), 0)
            self.gqa.session.run_with_iobinding(self.io, ro)
            return logits
        if S not in self._logits:
            self._logits[S] = ort.OrtValue.ortvalue_from_shape_and_type(shape, self.gqa.np_dtype, "cpu", 0)
        self.io.bind_ortvalue_output("logits", self._logits[S])
        self.gqa.session.run_with_iobinding(self.io)
        return self._logits[S].numpy().copy()  # a view of the bound buffer otherwise


    def _graph_step(self, ids: np.ndarray, lens: np.ndarray):
        """One token per row as a CUDA graph replay. A replay repeats the captured launches, so
        ``total_sequence_length`` (a host input of GroupQueryAttention) is held at the caches'
        capacity and the row lengths come from ``seqlens_k`` in GPU memory."""
        import torch

        batch = ids.shape[0]
        dtype = getattr(torch, np.dtype(self.gqa.np_dtype).name)
        if self._graph is None:  # ids (int64) then seqlens_k (int32) in one buffer: one copy per step
            raw = torch.zeros(12 * batch, dtype=torch.uint8, device="cuda")
            host = torch.zeros(12 * batch, dtype=torch.uint8).pin_memory()
            out = torch.empty(batch, 1, self.gqa.meta["vocab_size"], dtype=dtype, device="cuda")
            self._graph = (self.gqa._graphs, raw, host, out, np.array(self.capacity, dtype=np.int32))
            self.gqa._graphs += 1
            self._graph_bound = False
        gid, raw, host, out, total = self._graph
        host[:8 * batch].view(torch.int64).copy_(torch.from_numpy(ids.reshape(batch)))
        host[8 * batch:].view(torch.int32).copy_(torch.from_numpy(lens))
        torch.cuda.current_stream().synchronize()
        self.gqa.stream.synchronize()  # a device loop's last work
        raw.copy_(host)
        return self._replay(sync=True)

    def _replay(self, sync: bool):
        import onnxruntime as ort

        gid, raw, host, out, total = self._graph
        batch = out.shape[0]
        if not self._graph_bound:  # bound once (a prompt binds host inputs in between)
            self.io.bind_input("input_ids", "cuda", 0, np.int64, [batch, 1], raw.data_ptr())
            self.io.bind_input("seqlens_k", "cuda", 0, np.int32, [batch], raw.data_ptr() + 8 * batch)
            self.io.bind_cpu_input("total_sequence_length", total)
            self.io.bind_output("logits", "cuda", 0, self.gqa.np_dtype, list(out.shape), out.data_ptr())
            self._graph_bound = True
        ro = ort.RunOptions()
        ro.add_run_config_entry("gpu_graph_id", str(gid))
        if not sync:
            ro.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self.gqa.session.run_with_iobinding(self.io, ro)
        return out

    def device_loop(self):
        """Decode steps driven on the GPU (``lrexport.runtime.ort_backend.DeviceLoop``): the graph's token ids
        and ``seqlens_k`` buffers on the session's stream. Needs a graph step first (the buffers exist then)."""
        import torch

        from lrexport.runtime.ort_backend import DeviceLoop

        if self._graph is None:
            raise RuntimeError("device_loop: run one graph step first")
        gid, raw, host, out, total = self._graph
        B = out.shape[0]
        torch.cuda.synchronize()
        return DeviceLoop(stream=self.gqa.stream, ids=raw[:8 * B].view(torch.int64).view(B, 1),
                          past_len=raw[8 * B:].view(torch.int32), replay=lambda: self._replay(sync=False))


def profile_steps(row: dict, step, steps: int = 5) -> None:
    """Add the GPU work of ``steps`` calls of ``step`` to ``row`` (``bench/gputime.py``): the
    summed kernel durations per step (``gpu_ms``), their share of the step's wall time, and the
    split by kernel category. A step's wall time well above its ``gpu_ms`` means the host (the
    launches, ONNX Runtime's per-node work) sets the pace, not the kernels."""
    from gputime import step_breakdown

    b = step_breakdown(step, steps)
    row.update(gpu_ms=b["gpu_ms"], gpu_busy=b["gpu_ms"] / row["step_ms"], kernels_per_step=b["kernels_per_step"],
               span_ms=b["span_ms"], gap_short_ms=b["gap_short_ms"], gap_long_ms=b["gap_long_ms"],
               gpu_by_category=b["by_category"], gpu_top_kernels=b["top"])
    print(json.dumps({k: row[k] for k in ("context", "batch", "step_ms", "gpu_ms", "span_ms", "gap_short_ms",
                                          "gap_long_ms", "kernels_per_step", "gpu_by_category")}),
          file=sys.stderr, flush=True)


def device_loop_row(dl, context: int, batch: int, steps: int, kv_bytes: int, free0: int | None,
                    profile: bool = False) -> dict:
    """A result row of greedy decoding driven on the GPU (``lrexport.runtime.loop.greedy_on_device`` over
    the device loop ``dl``): ``steps + 3`` decode steps from position ``context`` (the first 3 not timed);
    a step's time is the interval between two tokens reaching the host. ``profile``: the GPU work of 5
    such steps as well (``profile_steps``; their span and idle gaps show whether the GPU ran back to back)."""
    import torch

    from lrexport.runtime.loop import greedy_on_device

    first = torch.randint(10, 1000, (batch,), device=dl.ids.device)
    pos = torch.full((batch,), context, dtype=torch.int64)
    torch.cuda.synchronize()
    times = []
    t0 = time.perf_counter()
    for _ in greedy_on_device(dl, first, pos, steps + 4):
        t = time.perf_counter()
        times.append(t - t0)
        t0 = t
    row = decode_row(context, batch, times[3:], kv_bytes, True, free0)
    row["loop"] = "device"
    if profile:
        def five():
            for _ in greedy_on_device(dl, first, pos, 6):
                pass
        profile_steps(row, five, steps=1)
        for k in ("gpu_ms", "span_ms", "gap_short_ms", "gap_long_ms", "kernels_per_step"):  # 5 decode steps
            row[k] /= 5
        row["gpu_by_category"] = {c: v / 5 for c, v in row["gpu_by_category"].items()}
        row["gpu_top_kernels"] = [(n, v / 5) for n, v in row["gpu_top_kernels"]]
        row["gpu_busy"] = row["gpu_ms"] / row["step_ms"]
    return row


def decode_row(context: int, batch: int, times: list[float], kv_bytes: int, finite: bool,
               free0: int | None, run_times: list[float] | None = None) -> dict:
    """One result row of the end-to-end benchmark (printed to stderr as it comes): the median of
    the timed steps ``times`` (seconds) and, when ``free0`` (free GPU memory before the session)
    is given, the GPU memory taken since. ``run_times``: the part of each step spent in the model's
    call (the host's work up to the run's return); ``run_ms`` and ``wait_ms`` (the rest: picking the
    next ids and bringing them to the host, which waits for the GPU) are their medians."""
    import torch

    step_s = float(np.median(times))
    mem = None
    if free0 is not None:
        free, _ = torch.cuda.mem_get_info()
        mem = free0 - free
    row = {"context": context, "batch": batch, "step_ms": 1e3 * step_s, "decode_tok_s": batch / step_s,
           "kv_bytes": kv_bytes, "gpu_mem_bytes": mem, "finite": finite}
    if run_times:
        row["run_ms"] = 1e3 * float(np.median(run_times))
        row["wait_ms"] = 1e3 * float(np.median([t - r for t, r in zip(times, run_times)]))
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def gqa_worker(folder: str, contexts: list[int], batches: list[int], steps: int, device: str,
               profile: bool = False, cuda_graph: bool = False) -> list[dict]:
    """Decode speed of a :func:`build_gqa_model` folder: rows as ``worker()`` of ``bench/gpu_e2e.py``.

    For each batch and context, caches of ``context + steps + 4`` positions are allocated once
    and taken as already holding ``context`` tokens per row; ``steps + 3`` steps then decode
    one token per row (the argmax of the last logits), and ``step_ms`` is the median of the
    last ``steps``. A step binds the token ids and lengths, runs, and picks the next ids (argmax
    of the logits, on the GPU with CUDA, then copied to the host). ``gpu_mem_bytes`` is the GPU
    memory taken since before the session was created (CUDA only); ``kv_bytes`` the size of all
    cache buffers. ``profile``: also the GPU work of a step (:func:`profile_steps`). ``cuda_graph``:
    decode steps as CUDA graphs; each row then also has ``graph_rel_err``: the first step's logits
    replayed against the same step run without a graph, with the exact ``total_sequence_length``.
    """
    import torch

    if device == "cuda":
        torch.cuda.init()
        torch.zeros(1, device="cuda")
        free0, _ = torch.cuda.mem_get_info()
    gqa = GqaSession(folder, device, cuda_graph=cuda_graph)
    rng = np.random.default_rng(0)
    rows = []
    for B in batches:
        for C in contexts:
            caches = gqa.new_caches(B, C + steps + 4)
            kv_bytes = sum(c.nbytes for c in caches)  # numpy arrays or torch tensors
            bound = gqa.bind(caches)
            ids = rng.integers(10, min(1000, gqa.meta["vocab_size"]), (B, 1))
            graph_err = None
            if cuda_graph:  # the same step (same token, same position) without a graph, exact total length
                lens = np.full(B, C, dtype=np.int32)
                ref = bound.step(ids, lens, C + 1, graph=False).double().cpu()
                for _ in range(4):  # ONNX Runtime's warm-up runs, the capture, a replay
                    got = bound.step(ids, lens, C + 1).double().cpu()
                graph_err = float((got - ref).abs().max() / ref.abs().max())
            times, run_times = [], []
            for t in range(steps + 3):
                total = C + t + 1
                t0 = time.perf_counter()
                logits = bound.step(ids, np.full(B, total - 1, dtype=np.int32), total)
                run_times.append(time.perf_counter() - t0)
                ids = logits[:, -1:].argmax(-1)
                if device == "cuda":  # the next ids to the host, as lrexport's generation loop does
                    ids = ids.cpu().numpy()
                times.append(time.perf_counter() - t0)
            finite = bool(torch.isfinite(logits).all()) if device == "cuda" else bool(np.isfinite(logits).all())
            rows.append(decode_row(C, B, times[3:], kv_bytes, finite,
                                   free0 if device == "cuda" else None, run_times[3:]))
            if graph_err is not None:
                rows[-1]["graph_rel_err"] = graph_err
            if profile:
                lens = np.full(B, C + steps + 2, dtype=np.int32)
                profile_steps(rows[-1], functools.partial(bound.step, ids, lens, C + steps + 3))
            if cuda_graph:
                rows.append(device_loop_row(bound.device_loop(), C, B, steps, kv_bytes, free0, profile))
            del bound, caches
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows
