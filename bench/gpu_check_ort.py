#!/usr/bin/env python
"""Check the CUDA kernel of ``LowRankKVAttention`` (liblrexport_ops.so) in ONNX Runtime.

Run on a machine with a GPU and onnxruntime-gpu (import torch first so that the CUDA libraries of
its wheels are loaded; the script does)::

    python bench/gpu_check_ort.py [--out results.json] [--quick]

It builds the library when needed (``lrexport.ortops``; the CUDA kernel needs nvcc at build time)
and, for fresh random inputs over a grid (M/G/J grouping, GQA, bits 0/2/3/4/8, float32 and float16,
batch 2 with different past_len), runs single-node ONNX models: a prefill, then several decode
steps with the caches bound in place on the GPU (IO binding, the same OrtValue for past_* and
present_*). Every step is compared with

* ONNX Runtime's CPU kernel (the same library) on the same inputs, float16 inputs upcast to
  float32 (the CPU kernel is float32 only): outputs, float caches bit for bit, packed codes and
  params of quantized caches bit for bit (they are computed with the same arithmetic; the table
  says "exact", or how many codes differ by one step -- accepted up to 0.1%, as a tie rounded the
  other way -- and anything else fails);
* ``latent_attention_reference`` in float64 on the same inputs.

It also runs whole exported float16 models through the runtime's ONNX Runtime backend (logits of a
prefill and decode steps, CUDA against CPU; tokens from ``generate``), checks the copy path (plain
``run``: present is a new buffer), an S=0 call, a larger
model (several query tiles, splits along the keys, more than 48 KiB of shared memory) with
timings, and that bad inputs give ONNX Runtime errors that name them while the session stays
usable. It prints a table and exits 1 on any failure (2 when it cannot run: no
CUDAExecutionProvider, or a library without the CUDA kernel). ``--out PATH`` writes the results
as JSON.

Float16 models run the kernel's tensor-core path (the rows of the in-place steps say "tensor
cores"); ``LREXPORT_CUDA_MMA=0`` in the environment selects the float32 path. The tolerances are
the same.

``--emulated LIB`` runs the same checks against a library built with
``-DLREXPORT_CUDA_EMULATE=ON`` (the CUDA kernel's code run on the CPU, registered for the CPU
provider): for testing this script and the kernel's logic on machines without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

NAMES = ["query", "latent_k", "latent_v", "past_k", "past_k_params", "past_v", "past_v_params", "past_len",
         "k_up", "k_bias", "v_up", "cos", "sin"]
OUTPUTS = ["output", "present_k", "present_k_params", "present_v", "present_v_params"]
CACHES = ("past_k", "past_k_params", "past_v", "past_v_params")
OP = "LowRankKVAttention"
OP_DEVICE_LEN = "LowRankKVAttentionDeviceLen"  # past_len in device memory (exports for CUDA graphs)
FLOAT_INPUTS = ("query", "latent_k", "latent_v", "k_up", "k_bias", "v_up", "cos", "sin")

TOL = {np.float32: 1e-4, np.float16: 3e-3}  # output: max |got - want| / max |want|
TOL_NEAR = 2e-2                              # when some codes differ by one step
MAX_NEAR_FRACTION = 1e-3


@dataclass
class Row:
    case: str
    dtype: str
    bits: int
    group_size: int
    step: str
    out_vs_cpu: float = float("nan")
    out_vs_ref: float = float("nan")
    caches: str = ""
    ok: bool = True
    note: str = ""
    ms: dict = field(default_factory=dict)


# ---- models and inputs --------------------------------------------------------------------------

ELEM_TYPE = {np.dtype(np.float32): 1, np.dtype(np.uint8): 2, np.dtype(np.int64): 7, np.dtype(np.float16): 10}


def make_model(feeds: dict, attrs: dict, op: str = OP) -> bytes:
    """One LowRankKVAttention node (as in tests/test_custom_op_cpu.py), serialized; symbolic
    dimensions so that one session serves prefill and decode; the output has the query's dtype.
    With the onnx package it is built by onnx.helper, else by the small encoder below (the GPU
    machine need not have onnx)."""
    bits = attrs.get("bits", 0)
    ins = [n if feeds.get(n) is not None else "" for n in NAMES]
    outs = [o if bits or not o.endswith("params") else "" for o in OUTPUTS]
    gin = [(n, ELEM_TYPE[feeds[n].dtype], [f"{n}_{i}" for i in range(feeds[n].ndim)])
           for n in NAMES if feeds.get(n) is not None]
    out_type = {"output": feeds["query"].dtype, "present_k": feeds["past_k"].dtype,
                "present_v": feeds["past_v"].dtype, "present_k_params": np.float16, "present_v_params": np.float16}
    gout = [(o, ELEM_TYPE[np.dtype(out_type[o])], None) for o in outs if o]
    try:
        from onnx import helper
    except ImportError:
        return _encode_model(ins, outs, attrs, gin, gout, op)
    node = helper.make_node(op, ins, outs, domain="lrexport", **attrs)
    graph = helper.make_graph([node], "lowrank_kv_attention",
                              [helper.make_tensor_value_info(n, t, d) for n, t, d in gin],
                              [helper.make_tensor_value_info(n, t, d) for n, t, d in gout])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("lrexport", 1)])
    model.ir_version = 10
    return model.SerializeToString()


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 two's complement
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _field(num: int, value) -> bytes:
    """One protobuf field: int -> varint, float -> fixed32, str / bytes -> length-delimited."""
    import struct
    if isinstance(value, int):  # bool too
        return _varint(num << 3) + _varint(int(value))
    if isinstance(value, float):
        return _varint(num << 3 | 5) + struct.pack("<f", value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(num << 3 | 2) + _varint(len(data)) + data


def _encode_model(ins, outs, attrs, gin, gout, op=OP) -> bytes:
    """The ModelProto onnx.helper would make (onnx.proto field numbers)."""
    def value_info(name, elem, dims):
        tensor = _field(1, elem)  # TypeProto.Tensor.elem_type
        if dims is not None:
            tensor += _field(2, b"".join(_field(1, _field(2, d)) for d in dims))  # shape.dim.dim_param
        return _field(1, name) + _field(2, _field(1, tensor))  # name, type.tensor_type

    def attribute(name, v):  # AttributeProto: name, f / i / s, type (FLOAT=1, INT=2, STRING=3)
        if isinstance(v, (str, bytes)):
            return _field(1, name) + _field(4, v) + _field(20, 3)
        return _field(1, name) + (_field(2, float(v)) + _field(20, 1) if isinstance(v, float)
                                  else _field(3, int(v)) + _field(20, 2))

    node = (b"".join(_field(1, n) for n in ins) + b"".join(_field(2, o) for o in outs)
            + _field(4, op) + b"".join(_field(5, attribute(k, v)) for k, v in sorted(attrs.items()))
            + _field(7, "lrexport"))
    graph = (_field(1, node) + _field(2, "lowrank_kv_attention") + b"".join(_field(11, value_info(*v)) for v in gin)
             + b"".join(_field(12, value_info(*v)) for v in gout))
    return (_field(1, 10) + _field(7, graph) + _field(8, _field(1, "") + _field(2, 18))
            + _field(8, _field(1, "lrexport") + _field(2, 1)))


def rope_tables(n: int, d: int):
    inv = 1.0 / (10000.0 ** (np.arange(0, d, 2) / d))
    ang = np.arange(n)[:, None] * inv[None]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


@dataclass
class Shape:
    B: int = 2
    Hq: int = 8
    Hkv: int = 4
    D: int = 32
    s: int = 1
    rk: int = 24
    rv: int = 16
    P: int = 64
    Prope: int = 64
    bits: int = 0
    qg: int = 8
    window: int = 0
    v_up: bool = True
    k_bias: bool = True

    @property
    def G(self):
        return self.Hkv // self.s


def new_tokens(rng, sh: Shape, S: int, dt) -> dict:
    def f(*shape):
        return rng.standard_normal(shape).astype(np.float32).astype(dt)
    return dict(query=f(sh.B, S, sh.Hq * sh.D), latent_k=f(sh.B, S, sh.G * sh.rk), latent_v=f(sh.B, S, sh.G * sh.rv))


def constants(rng, sh: Shape, dt) -> dict:
    def f(*shape, std=1.0):
        return (rng.standard_normal(shape) * std).astype(np.float32).astype(dt)
    cos, sin = rope_tables(sh.Prope, sh.D)
    return dict(k_up=f(sh.G, sh.rk, sh.s * sh.D, std=0.3), k_bias=f(sh.Hkv * sh.D) if sh.k_bias else None,
                v_up=f(sh.G, sh.rv, sh.s * sh.D, std=0.3) if sh.v_up else None, cos=cos.astype(dt), sin=sin.astype(dt))


def initial_caches(rng, sh: Shape, dt) -> dict:
    """Caches full of valid (quantized) latents: positions past past_len hold junk never read."""
    import torch

    from lrexport.kv.quant import quantize
    if not sh.bits:
        return dict(past_k=rng.standard_normal((sh.B, sh.P, sh.G * sh.rk)).astype(np.float32).astype(dt),
                    past_v=rng.standard_normal((sh.B, sh.P, sh.G * sh.rv)).astype(np.float32).astype(dt),
                    past_k_params=None, past_v_params=None)
    ck, pk = quantize(torch.from_numpy(rng.standard_normal((sh.B, sh.P, sh.G * sh.rk)).astype(np.float32)), sh.bits,
                      sh.qg)
    cv, pv = quantize(torch.from_numpy(rng.standard_normal((sh.B, sh.P, sh.G * sh.rv)).astype(np.float32)), sh.bits,
                      sh.qg)
    return dict(past_k=ck.numpy(), past_k_params=pk.numpy(), past_v=cv.numpy(), past_v_params=pv.numpy())


def attributes(sh: Shape) -> dict:
    return dict(num_heads=sh.Hq, num_kv_heads=sh.Hkv, group_size=sh.s, window=sh.window, bits=sh.bits,
                quant_group=sh.qg, scale=float(sh.D ** -0.5))


def triton_attributes(sh: Shape, arch: int, row_splits: bool = False) -> dict:
    """The node attributes of the ahead-of-time Triton decode kernel for ``sh`` (float16), as the
    exporter attaches them (lrexport.kernels.aot); ``row_splits``: as for LowRankKVAttentionDeviceLen."""
    from lrexport.kernels import aot

    spec = aot.DecodeSpec.for_caches(num_heads=sh.Hq, num_kv_heads=sh.Hkv, group_size=sh.s, head_dim=sh.D, rk=sh.rk,
                                     rv=sh.rv, bits=sh.bits, quant_group=sh.qg, window=sh.window,
                                     has_k_bias=sh.k_bias, row_splits=row_splits)
    c = aot.compile_decode(spec, arch)
    return {"cuda_kernel": c.meta, "cuda_cubin": c.cubin}


def fnv1a(data: bytes) -> str:
    h = 1469598103934665603
    for b in data:
        h = ((h ^ b) * 1099511628211) & (1 << 64) - 1
    return f"{h:016x}"


def as_f32(feeds: dict) -> dict:
    """The CPU kernel's inputs: float16 activations and float caches upcast (exactly) to float32."""
    up = FLOAT_INPUTS + ("past_k", "past_v")
    return {k: (v.astype(np.float32) if v is not None and v.dtype == np.float16 and k in up else v)
            for k, v in feeds.items()}


def reference(feeds: dict, attrs: dict):
    """latent_attention_reference in float64 (codes and float16 params as they are)."""
    import torch

    from lrexport.trace.latent_attention_op import latent_attention_reference

    def t(name):
        a = feeds.get(name)
        if a is None:
            return None
        x = torch.from_numpy(np.ascontiguousarray(a))
        return x.double() if name in FLOAT_INPUTS or (name in ("past_k", "past_v") and not attrs["bits"]) else x

    return [None if x is None else x.numpy() for x in latent_attention_reference(
        t("query"), t("latent_k"), t("latent_v"), t("past_k"), t("past_k_params"), t("past_v"), t("past_v_params"),
        t("past_len"), t("k_up"), t("k_bias"), t("v_up"), t("cos"), t("sin"), attrs["num_heads"],
        attrs["num_kv_heads"], attrs["group_size"], attrs["window"], attrs["scale"], attrs["bits"],
        attrs["quant_group"])]


def rel_err(got, want) -> float:
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if got.shape != want.shape:
        return float("inf")
    if want.size == 0:
        return 0.0
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def compare_caches(gpu: dict, cpu: dict, sh: Shape) -> tuple[bool, bool, str]:
    """(ok, near, text): float caches bit for bit; codes and params bit for bit, or codes within one
    step for at most 0.1% of them (near)."""
    import torch

    from lrexport.kv.quant import unpack
    if not sh.bits:
        bad = [n for n in ("past_k", "past_v") if not np.array_equal(np.asarray(gpu[n], np.float32), cpu[n])]
        return (not bad, False, "exact" if not bad else f"{', '.join(bad)} differ")
    texts, ok, near = [], True, False
    for n, width in (("past_k", sh.G * sh.rk), ("past_v", sh.G * sh.rv)):
        gc = unpack(torch.from_numpy(np.ascontiguousarray(gpu[n])), sh.bits, width)
        cc = unpack(torch.from_numpy(np.ascontiguousarray(cpu[n])), sh.bits, width)
        diff = (gc - cc).abs()
        nd, md = int((diff > 0).sum()), int(diff.max()) if diff.numel() else 0
        if nd:
            near = True
            frac = nd / diff.numel()
            texts.append(f"{n[5:]}: {nd} codes differ (max {md})")
            if md > 1 or frac > MAX_NEAR_FRACTION:
                ok = False
        p = n + "_params"
        if not np.array_equal(gpu[p].view(np.uint16), cpu[p].view(np.uint16)):
            ok = False
            texts.append(f"{p[5:]} differ")
    return ok, near, "; ".join(texts) if texts else "codes+params exact"


@contextlib.contextmanager
def env_var(name: str, value):
    """``name`` set to ``value`` (None: left as it is) for the block."""
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


@contextlib.contextmanager
def captured_stderr(sink: list):
    """Collect what C code writes to file descriptor 2 (the kernel's LREXPORT_OPS_DEBUG lines)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            sink.append(tmp.read().decode(errors="replace"))


# ---- the runner ---------------------------------------------------------------------------------

class Checker:
    def __init__(self, ort, gpu_lib: Path, cpu_lib: Path, emulated: bool):
        self.ort = ort
        self.gpu_lib, self.cpu_lib, self.emulated = gpu_lib, cpu_lib, emulated
        self.provider = "CPUExecutionProvider" if emulated else "CUDAExecutionProvider"
        self.device = "cpu" if emulated else "cuda"
        self.rows: list[Row] = []
        self.arch = 90  # the Triton kernels' target: the GPU's compute capability (90 when emulated)
        if not emulated:
            import torch
            major, minor = torch.cuda.get_device_capability(0)
            self.arch = 10 * major + minor

    def session(self, model, gpu: bool, debug: bool = False):
        """A session with the library under test (gpu) or the CPU kernel's. With ``debug`` the
        kernel prints one line per call (LREXPORT_OPS_DEBUG is read when the kernel is created)."""
        ort = self.ort
        if debug:
            os.environ["LREXPORT_OPS_DEBUG"] = "1"
        else:
            os.environ.pop("LREXPORT_OPS_DEBUG", None)
        so = ort.SessionOptions()
        so.log_severity_level = 4  # errors are read from the exceptions
        so.register_custom_ops_library(str(self.gpu_lib if gpu else self.cpu_lib))
        if gpu and not self.emulated:
            # every node on the CUDA provider, or no session: proves the CUDA kernel was picked
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
            return ort.InferenceSession(model, so, providers=[self.provider])
        return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])

    def ortvalue(self, a):
        return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), self.device, 0)

    def run_gpu_inplace(self, sess, feeds: dict, caches: dict, device_lengths: bool = False):
        """IO binding: caches bound as past and present (the same OrtValue), past_len on the host
        (``device_lengths``: in device memory, as LowRankKVAttentionDeviceLen takes it)."""
        io = sess.io_binding()
        for n in NAMES:
            if n in caches:
                io.bind_ortvalue_input(n, caches[n])
            elif n == "past_len" and not device_lengths:
                io.bind_cpu_input(n, np.ascontiguousarray(feeds[n]))
            elif feeds.get(n) is not None:
                io.bind_ortvalue_input(n, self.ortvalue(feeds[n]))
        io.bind_output("output", self.device, 0)
        for n, v in caches.items():
            io.bind_ortvalue_output(n.replace("past", "present"), v)
        sess.run_with_iobinding(io)
        return io.copy_outputs_to_cpu()[0]

    def add(self, row: Row):
        self.rows.append(row)
        flag = "ok  " if row.ok else "FAIL"
        if row.step == "error":
            print(f"{flag} error: {row.case:<30} {row.note}", flush=True)
            return
        print(f"{flag} {row.case:<24} {row.dtype:<8} bits={row.bits} s={row.group_size} {row.step:<10} "
              f"out/cpu {row.out_vs_cpu:9.2e}  out/ref {row.out_vs_ref:9.2e}  {row.caches}"
              f"{'  ' + row.note if row.note else ''}", flush=True)

    # -- a prefill and decode steps with in-place caches
    def chain(self, name: str, sh: Shape, dt, steps=(9, 1, 1, 1), past_len=(0, 5), seed=0, timing=False,
              triton=False, device_lengths=False, warp=False):
        """``triton``: the node carries the ahead-of-time Triton decode kernel (float16), which
        the decode steps must run (on a GPU; the emulation reports the attached cubin instead).
        ``warp``: with LREXPORT_CUDA_DECODE=warp, the decode steps must run the warp decode kernel
        (decode_warp.cuh; opt-in).
        ``device_lengths``: the node is LowRankKVAttentionDeviceLen, past_len bound in device memory
        (the CPU reference is LowRankKVAttention)."""
        with env_var("LREXPORT_CUDA_DECODE", "triton" if triton else "warp" if warp else None):
            self._chain(name, sh, dt, steps, past_len, seed, timing, triton, device_lengths, warp)

    def _chain(self, name, sh, dt, steps, past_len, seed, timing, triton, device_lengths, warp):
        rng = np.random.default_rng(seed)
        attrs = attributes(sh)
        const = constants(rng, sh, dt)
        state = initial_caches(rng, sh, dt)
        feeds0 = dict(const, **state, **new_tokens(rng, sh, 1, dt), past_len=np.asarray(past_len, np.int64))
        gpu_attrs = dict(attrs)
        if triton:
            gpu_attrs.update(triton_attributes(sh, self.arch, row_splits=device_lengths))
            cubin_id = f"{len(gpu_attrs['cuda_cubin'])} cubin bytes (fnv1a {fnv1a(gpu_attrs['cuda_cubin'])})"
        gpu_sess = self.session(make_model(feeds0, gpu_attrs, OP_DEVICE_LEN if device_lengths else OP), gpu=True,
                                debug=True)
        cpu_sess = self.session(make_model(as_f32(feeds0), attrs), gpu=False)
        caches = {n: self.ortvalue(v) for n, v in state.items() if v is not None}
        pl = np.asarray(past_len, np.int64)
        tol = TOL[dt]
        for i, S in enumerate(steps):
            feeds = dict(const, **{n: v.numpy().copy() for n, v in caches.items()}, **new_tokens(rng, sh, S, dt),
                         past_len=pl.copy())
            if sh.bits == 0:
                feeds.update(past_k_params=None, past_v_params=None)
            log: list[str] = []
            with captured_stderr(log):
                out = self.run_gpu_inplace(gpu_sess, feeds, caches, device_lengths)
            after = {n: v.numpy() for n, v in caches.items()}
            cpu_out = cpu_sess.run(None, {k: v for k, v in as_f32(feeds).items() if v is not None})
            cpu_state = dict(zip([n for n in CACHES if feeds.get(n) is not None], cpu_out[1:]))
            ref = reference(as_f32(feeds), attrs)
            ok_c, near, ctext = compare_caches(after, cpu_state, sh)
            t = TOL_NEAR if near else tol
            row = Row(name, np.dtype(dt).name, sh.bits, sh.s, f"{'prefill' if S > 1 else 'decode'}{i}:S={S}",
                      rel_err(out, cpu_out[0]), rel_err(out, ref[0]), ctext)
            row.ok = ok_c and row.out_vs_cpu < t and row.out_vs_ref < t
            if out.dtype != np.dtype(dt):
                row.ok, row.note = False, f"output dtype {out.dtype}"
            # the CUDA kernel ran (not a CPU fallback) and wrote the caches in place
            text = "".join(log)
            want = "present_k aliases past_k, present_v aliases past_v"
            if want not in text or "CUDA device" not in text:
                row.ok, row.note = False, f"kernel log lacks '{want}' / 'CUDA device': {text.strip()[:200]}"
            elif triton and cubin_id not in text:  # the attributes reached the kernel intact
                row.ok, row.note = False, f"kernel log lacks '{cubin_id}': {text.strip()[:300]}"
            elif triton and S == 1 and not self.emulated and ", Triton decode kernel" not in text:
                row.ok, row.note = False, f"the Triton decode kernel did not run: {text.strip()[:300]}"
            elif warp and S == 1 and "warp decode kernel" not in text:
                row.ok, row.note = False, f"the warp decode kernel did not run: {text.strip()[:300]}"
            elif ", Triton decode kernel" in text:
                row.note = "Triton (ahead of time)"
            elif "warp decode kernel" in text:
                row.note = "tensor cores (warp decode kernel)"
            elif "tensor cores" in text:  # a float16 model (unless LREXPORT_CUDA_MMA=0)
                row.note = "tensor cores"
            if timing:  # re-runs write the same tokens at the same positions: the caches stay as checked
                with captured_stderr([]):
                    row.ms = self.time_step(gpu_sess, cpu_sess, feeds, caches)
                row.note = (row.note + " " if row.note else "") + \
                    f"ms/call: {self.device} {row.ms['gpu']:.3f}, cpu {row.ms['cpu']:.2f}"
            self.add(row)
            pl = pl + S

    def time_step(self, gpu_sess, cpu_sess, feeds, caches, n=20):
        bound = dict(feeds)
        for _ in range(3):
            self.run_gpu_inplace(gpu_sess, bound, caches)
        t0 = time.perf_counter()
        for _ in range(n):
            self.run_gpu_inplace(gpu_sess, bound, caches)
        g = (time.perf_counter() - t0) / n * 1e3
        f = {k: v for k, v in as_f32(feeds).items() if v is not None}
        cpu_sess.run(None, f)
        t0 = time.perf_counter()
        for _ in range(3):
            cpu_sess.run(None, f)
        c = (time.perf_counter() - t0) / 3 * 1e3
        return {"gpu": g, "cpu": c}

    # -- plain run(): present is a new buffer (the past -> present copy on the stream)
    def copy_path(self, name: str, sh: Shape, dt, S: int, past_len, seed=0):
        rng = np.random.default_rng(seed)
        attrs = attributes(sh)
        feeds = dict(constants(rng, sh, dt), **initial_caches(rng, sh, dt), **new_tokens(rng, sh, S, dt),
                     past_len=np.asarray(past_len, np.int64))
        gpu = self.session(make_model(feeds, attrs), gpu=True)
        cpu = self.session(make_model(as_f32(feeds), attrs), gpu=False)
        present = {k: v for k, v in feeds.items() if v is not None}
        got = gpu.run(None, present)
        want = cpu.run(None, {k: v for k, v in as_f32(feeds).items() if v is not None})
        names = [n for n in CACHES if feeds.get(n) is not None]
        ok_c, near, ctext = compare_caches(dict(zip(names, got[1:])), dict(zip(names, want[1:])), sh)
        ref = reference(as_f32(feeds), attrs)
        row = Row(name, np.dtype(dt).name, sh.bits, sh.s, f"run:S={S}", rel_err(got[0], want[0]),
                  rel_err(got[0], ref[0]), ctext)
        t = TOL_NEAR if near else TOL[dt]
        row.ok = ok_c and row.out_vs_cpu < t and row.out_vs_ref < t
        unchanged = all(np.array_equal(present[n], feeds[n]) for n in names)
        if not unchanged:
            row.ok, row.note = False, "the past inputs were modified"
        self.add(row)

    # -- errors
    def expect_error(self, name: str, fn, pattern: str, after=None):
        row = Row(name, "-", 0, 0, "error")
        try:
            fn()
            row.ok, row.note = False, "no error"
        except Exception as e:  # onnxruntime's exception types
            msg = str(e)
            # onnxruntime's exception types; run_with_iobinding raises RuntimeError
            row.ok = bool(re.search(pattern, msg)) and (type(e).__module__.startswith("onnxruntime")
                                                        or isinstance(e, RuntimeError))
            ours = msg.find("LowRankKVAttention:")
            text = (msg[ours:] if ours >= 0 else msg).strip().splitlines()[0]
            row.note = text[:200] if row.ok else f"unexpected: {msg[:400]}"
        if row.ok and after is not None:
            try:
                err = after()
                row.ok = err < 1e-4
                row.note += f" | session still usable (rel err {err:.1e})"
            except Exception as e:
                row.ok, row.note = False, f"session unusable after the error: {e}"
        self.add(row)

    def errors(self):
        sh = Shape(s=2, rk=16, rv=16, bits=0)  # past_k and past_v of one shape
        rng = np.random.default_rng(7)
        attrs = attributes(sh)
        feeds = dict(constants(rng, sh, np.float32), **initial_caches(rng, sh, np.float32),
                     **new_tokens(rng, sh, 1, np.float32), past_len=np.asarray([3, 9], np.int64))
        sess = self.session(make_model(feeds, attrs), gpu=True)
        good = {k: v for k, v in feeds.items() if v is not None}
        ref = reference(feeds, attrs)[0]

        def usable():
            return rel_err(sess.run(None, good)[0], ref)

        def run_with(**changes):
            f = dict(good, **changes)
            return lambda: sess.run(None, f)

        self.expect_error("past_len beyond cache", run_with(past_len=np.asarray([1, sh.P], np.int64)),
                          rf"past_len\[1\]={sh.P}.*P={sh.P}", after=usable)
        self.expect_error("negative past_len", run_with(past_len=np.asarray([-1, 2], np.int64)),
                          r"past_len\[0\]=-1", after=usable)
        self.expect_error("latent_k width", run_with(latent_k=good["latent_k"][:, :, :-1].copy()),
                          r"'latent_k' \(1\) must be float \[B=2, S=1, G\*rk=32\]", after=usable)
        self.expect_error("k_up shape", run_with(k_up=good["k_up"][:, :, :-2].copy()),
                          r"'k_up' \(8\) must be float \[G=2, rk, group_size\*D=64\]", after=usable)
        self.expect_error("RoPE table too short", run_with(cos=good["cos"][:5].copy(), sin=good["sin"][:5].copy()),
                          r"RoPE table of 5", after=usable)

        def shared_buffer():
            io = sess.io_binding()
            vals = {n: self.ortvalue(v) for n, v in good.items() if n != "past_len"}
            for n, v in vals.items():
                io.bind_ortvalue_input(n, v)
            io.bind_cpu_input("past_len", good["past_len"])
            io.bind_output("output", self.device, 0)
            io.bind_ortvalue_output("present_k", vals["past_v"])  # same shape, another input's buffer
            io.bind_output("present_v", self.device, 0)
            sess.run_with_iobinding(io)
        self.expect_error("present_k on past_v's buffer", shared_buffer,
                          r"output 'present_k' shares memory with input 'past_v'", after=usable)
        bad = dict(attrs, bits=5)
        self.expect_error("bits=5", lambda: self.session(make_model(feeds, bad), gpu=True), r"bits=5.*not one of")
        mixed = dict(feeds, query=feeds["query"].astype(np.float16))
        self.expect_error("float16 query, float k_up", lambda: self.session(make_model(mixed, attrs), gpu=True).run(
            None, {k: v for k, v in mixed.items() if v is not None}), r".")  # no kernel: any ORT error, no crash

    # -- LowRankKVAttentionDeviceLen: lengths out of range are the kernels' to guard (no host reads)
    def device_length_guard(self, dt, bits: int, seed: int = 21):
        """Decode with one row's past_len out of range (beyond the cache, or negative): the call
        succeeds, that row's output is NaN and its caches are left alone; the other row matches the
        CPU kernel (output and cache write) as in a valid call."""
        sh = Shape(s=2, rk=16, rv=16, bits=bits, **({"qg": 8} if bits else {}))
        rng = np.random.default_rng(seed)
        attrs = attributes(sh)
        const, state = constants(rng, sh, dt), initial_caches(rng, sh, dt)
        feeds = dict(const, **state, **new_tokens(rng, sh, 1, dt), past_len=np.asarray([3, 9], np.int64))
        if bits == 0:
            feeds.update(past_k_params=None, past_v_params=None)
        sess = self.session(make_model(feeds, attrs, OP_DEVICE_LEN), gpu=True)
        cpu = self.session(make_model(as_f32(feeds), attrs), gpu=False)
        for bad_row, bad in ((1, sh.P), (0, -1), (1, 1 << 40)):
            lens = np.asarray([3, 9], np.int64)
            lens[bad_row] = bad
            good_row = 1 - bad_row
            caches = {n: self.ortvalue(v) for n, v in state.items() if v is not None}
            run = dict(feeds, past_len=lens)
            row = Row(f"device past_len={bad}", np.dtype(dt).name, bits, sh.s, "guard:S=1")
            try:
                out = self.run_gpu_inplace(sess, run, caches, device_lengths=True)
            except Exception as e:  # noqa: BLE001  (onnxruntime's exception types)
                row.ok, row.note = False, f"the call failed: {str(e)[:200]}"
                self.add(row)
                continue
            after = {n: v.numpy() for n, v in caches.items()}
            ok_lens = np.asarray([3, 9], np.int64)
            want = cpu.run(None, {k: v for k, v in as_f32(dict(feeds, past_len=ok_lens)).items() if v is not None})
            names = [n for n in CACHES if feeds.get(n) is not None]
            row.out_vs_cpu = rel_err(out[good_row], want[0][good_row])
            nan_row = bool(np.isnan(out[bad_row].astype(np.float32)).all())
            untouched = all(np.array_equal(after[n][bad_row], state[n][bad_row]) for n in names)
            ok_c, near, ctext = compare_caches({n: after[n][good_row:good_row + 1] for n in names},
                                               {n: w[good_row:good_row + 1] for n, w in zip(names, want[1:])}, sh)
            row.caches = f"row {bad_row}: {'NaN output' if nan_row else 'NOT NaN'}, " \
                         f"{'cache untouched' if untouched else 'CACHE WRITTEN'}; row {good_row}: {ctext}"
            row.ok = nan_row and untouched and ok_c and row.out_vs_cpu < (TOL_NEAR if near else TOL[dt])
            self.add(row)
        big = dict(feeds, **new_tokens(rng, sh, sh.P + 1, dt), past_len=np.asarray([0, 0], np.int64))
        self.expect_error("device lengths: S > P",
                          lambda: sess.run(None, {k: v for k, v in big.items() if v is not None}),
                          rf"S={sh.P + 1} new tokens do not fit in the cache of P={sh.P}")

    def s_zero(self):
        sh = Shape(s=2, rk=24, rv=16, bits=4)
        rng = np.random.default_rng(3)
        attrs = attributes(sh)
        feeds = dict(constants(rng, sh, np.float32), **initial_caches(rng, sh, np.float32),
                     **new_tokens(rng, sh, 0, np.float32), past_len=np.asarray([3, 4], np.int64))
        sess = self.session(make_model(feeds, attrs), gpu=True)
        got = sess.run(None, {k: v for k, v in feeds.items() if v is not None})
        row = Row("S=0", "float32", 4, 2, "run:S=0", caches="unchanged")
        row.ok = got[0].shape == (2, 0, sh.Hq * sh.D) and all(
            np.array_equal(g, feeds[n]) for g, n in zip(got[1:], CACHES))
        if not row.ok:
            row.caches = "changed or wrong shape"
        self.add(row)


# ---- the grid -----------------------------------------------------------------------------------

GROUP_SHAPES = {1: dict(rk=24, rv=16), 2: dict(rk=40, rv=24), 4: dict(rk=48, rv=40)}  # partial 32-channel chunks


def run_all(ck: Checker, quick: bool):
    dtypes = (np.float32, np.float16)
    bits_all = (0, 4) if quick else (0, 2, 3, 4, 8)
    groups = (2,) if quick else (1, 2, 4)
    for dt in dtypes:
        for bits in bits_all:
            for s in groups:
                sh = Shape(s=s, bits=bits, v_up=s != 2, k_bias=s != 2, **GROUP_SHAPES[s])
                prefill = 20 if bits in (0, 3, 8) else 9  # 20: two query tiles of 16
                ck.chain("grid", sh, dt, steps=(prefill, 1, 1, 1), past_len=(0, 5), seed=100 * bits + s)
    # more rows than the kernel passes past_len for in its parameters (16): past_len copied to the device
    ck.chain("batch 17", Shape(B=17, s=4, bits=2, **GROUP_SHAPES[4]), np.float32, steps=(3, 1),
             past_len=tuple(range(0, 34, 2)), seed=12)
    # MHA (no GQA), a sliding window, prefill on top of a filled cache
    ck.chain("mha", Shape(Hq=4, Hkv=4, s=2, bits=3, **GROUP_SHAPES[2]), np.float32, steps=(7, 1, 1), seed=5)
    for dt in dtypes:
        ck.chain("window=6", Shape(s=2, bits=4, window=6, **GROUP_SHAPES[2]), dt, steps=(12, 1, 1, 5, 1),
                 past_len=(3, 20), seed=6)
    # the copy path (no IO binding), and an empty call
    for dt in dtypes:
        ck.copy_path("copy path", Shape(s=2, bits=0, **GROUP_SHAPES[2]), dt, 5, (0, 9), seed=8)
        ck.copy_path("copy path", Shape(s=1, bits=8, **GROUP_SHAPES[1]), dt, 1, (30, 11), seed=9)
    ck.s_zero()
    # LowRankKVAttentionDeviceLen (exports for CUDA graphs): past_len in device memory, splits planned from the
    # cache's capacity; the same results, and lengths out of range guarded on the device
    for dt, bits in ((np.float32, 0), (np.float16, 4)):
        ck.chain("device lengths", Shape(s=2, bits=bits, **GROUP_SHAPES[2]), dt, steps=(9, 1, 1, 1),
                 past_len=(0, 5), seed=40 + bits, device_lengths=True)
        ck.device_length_guard(dt, bits)
    # larger: query tiles > 1, splits along the keys (decode), shared memory above 48 KiB, timings
    if ck.emulated:  # a size the CPU emulation runs in seconds, still above 48 KiB and with splits
        big, steps, past = dict(B=2, Hq=8, Hkv=2, D=128, s=2, rk=64, rv=128, P=320, Prope=320, qg=32), \
            (40, 1, 1), (0, 200)
    else:
        big, steps, past = dict(B=2, Hq=32, Hkv=8, D=128, s=2, rk=128, rv=128, P=2048, Prope=2048, qg=32), \
            (300, 1, 1), (0, 600)
    for dt, bits in ((np.float16, 4), (np.float32, 0)) if not quick else ((np.float16, 4),):
        ck.chain("large", Shape(bits=bits, **big), dt, steps=steps, past_len=past, seed=11, timing=not ck.emulated)
    triton_grid(ck, quick)
    warp_grid(ck, quick)
    if not ck.emulated:
        generation(ck)
    ck.errors()


# Triton decode kernel shapes: a key rank that is a multiple of 16 (value ranks need not be)
TRITON_SHAPES = {1: dict(rk=32, rv=16), 2: dict(rk=48, rv=24), 4: dict(rk=64, rv=40)}


def triton_grid(ck: Checker, quick: bool):
    """Float16 nodes carrying the ahead-of-time Triton decode kernel: prefill on the CUDA C++
    kernel, decode steps on the Triton kernel, the same checks."""
    try:
        from lrexport.kernels import triton_latent
    except ImportError:
        triton_latent = None
    if triton_latent is None or triton_latent.triton is None:
        ck.rows.append(Row("triton", "-", 0, 0, "-", ok=False, note="triton is not installed: no ahead-of-time "
                           "kernels to check"))
        return
    for bits in ((0, 4) if quick else (0, 2, 3, 4, 8)):
        for s in ((2,) if quick else (1, 2, 4)):
            sh = Shape(s=s, bits=bits, v_up=s != 2, k_bias=s != 2, **TRITON_SHAPES[s])
            ck.chain("triton", sh, np.float16, steps=(9, 1, 1, 1), past_len=(0, 5), seed=300 + 10 * bits + s,
                     triton=True)
    ck.chain("triton, device lengths", Shape(s=2, bits=4, **TRITON_SHAPES[2]), np.float16, steps=(9, 1, 1, 1),
             past_len=(0, 5), seed=304, triton=True, device_lengths=True)
    if quick:
        return
    ck.chain("triton batch 17", Shape(B=17, s=4, bits=2, **TRITON_SHAPES[4]), np.float16, steps=(3, 1, 1),
             past_len=tuple(range(0, 34, 2)), seed=13, triton=True)
    ck.chain("triton window=6", Shape(s=2, bits=4, window=6, **TRITON_SHAPES[2]), np.float16, steps=(12, 1, 1, 5, 1),
             past_len=(3, 20), seed=14, triton=True)
    big = dict(B=2, Hq=32, Hkv=8, D=128, s=2, rk=128, rv=128, P=2048, Prope=2048, qg=32)
    if ck.emulated:
        big.update(Hq=8, Hkv=2, P=320, Prope=320)
    for bits in (0, 4):
        ck.chain("triton large", Shape(bits=bits, **big), np.float16, steps=(40, 1, 1), past_len=(0, 200), seed=15,
                 timing=not ck.emulated, triton=True)
        # the device-lengths op: splits from the capacity, each row splitting its own length in the kernel
        ck.chain("triton large, device lengths", Shape(bits=bits, **big), np.float16, steps=(40, 1, 1),
                 past_len=(0, 200), seed=16, triton=True, device_lengths=True)
    if not ck.emulated and ck.arch == 90:  # M-LRD float16 at head dim 128, no key bias: the Gluon decode kernel
        from lrexport.kernels import aot
        for i, (rk, rv) in enumerate(((64, 64), (80, 80), (48, 96), (128, 32))):
            gl = dict(B=2, Hq=32, Hkv=8, D=128, s=1, rk=rk, rv=rv, P=2048, Prope=2048, k_bias=False, v_up=i % 2 == 0)
            assert aot.gluon_spec(aot.DecodeSpec.for_caches(num_heads=32, num_kv_heads=8, group_size=1, head_dim=128,
                                                            rk=rk, rv=rv)), "the Gluon kernel should take this node"
            ck.chain(f"gluon rk={rk} rv={rv}", Shape(bits=0, **gl), np.float16, steps=(40, 1, 1), past_len=(0, 1500),
                     seed=18 + i, triton=True, device_lengths=i == 1)
    if not ck.emulated:  # groups of 4 at rank 256: float and 4-bit latents keep the 64 KB k_up slice on chip
        g4 = dict(B=2, Hq=32, Hkv=8, D=128, s=4, rk=256, rv=256, P=2048, Prope=2048, qg=32)
        for bits in (0, 4):
            ck.chain("triton groups of 4, rank 256", Shape(bits=bits, **g4), np.float16, steps=(40, 1, 1),
                     past_len=(0, 200), seed=17, triton=True)


def warp_grid(ck: Checker, quick: bool):
    """Float16 decode steps on the warp decode kernel (custom_ops/src/cuda/decode_warp.cuh): head dims 64
    and 128, float16 and 4-bit latents, 1 to 8 query heads per KV head, M-LRD and groups, key and value
    ranks from 16 to 128 (both of its register layouts), k_bias and v_up or not, a sliding window, rows
    of different lengths, past_len in device memory. Prefills run the other kernels."""
    if os.environ.get("LREXPORT_CUDA_MMA") == "0" or (not ck.emulated and ck.arch < 80):
        return  # the kernel is off (no tensor cores) or the GPU predates it
    P = 320 if ck.emulated else 4096
    past = (0, 200) if ck.emulated else (0, 3000)
    cases = [  # name, shape, prefill length
        ("warp D=128 M-LRD", Shape(B=2, Hq=8, Hkv=2, D=128, s=1, rk=64, rv=64, P=P, Prope=P, bits=4, qg=32), 40),
        ("warp D=128 M-LRD", Shape(B=2, Hq=8, Hkv=2, D=128, s=1, rk=64, rv=64, P=P, Prope=P, bits=0,
                                   v_up=False, k_bias=False), 40),
        ("warp D=64 groups of 2", Shape(B=2, Hq=8, Hkv=4, D=64, s=2, rk=32, rv=32, P=P, Prope=P, bits=4, qg=8,
                                        v_up=False), 33),
        ("warp rep=8 rk=48 rv=16", Shape(B=2, Hq=16, Hkv=2, D=64, s=1, rk=48, rv=16, P=P, Prope=P, bits=0), 17),
    ]
    if not quick:
        cases += [
            ("warp rk=rv=128", Shape(B=2, Hq=8, Hkv=2, D=128, s=2, rk=128, rv=128, P=P, Prope=P, bits=4, qg=32), 40),
            ("warp rk=128 rv=96 MHA", Shape(B=2, Hq=2, Hkv=2, D=128, s=1, rk=128, rv=96, P=P, Prope=P, bits=0), 40),
            ("warp window=50", Shape(B=2, Hq=8, Hkv=2, D=64, s=1, rk=32, rv=64, P=P, Prope=P, bits=4, qg=16,
                                     window=50), 60),
        ]
    for i, (name, sh, prefill) in enumerate(cases):
        ck.chain(name, sh, np.float16, steps=(prefill, 1, 1, 1), past_len=past, seed=500 + i, warp=True)
    sh = Shape(B=3, Hq=8, Hkv=2, D=128, s=1, rk=64, rv=64, P=P, Prope=P, bits=4, qg=32)
    ck.chain("warp device lengths", sh, np.float16, steps=(20, 1, 1), past_len=(0, 7, P // 2), seed=520,
             warp=True, device_lengths=True)


def generation(ck: Checker, new_tokens: int = 16):
    """A whole exported float16 model (2 layers, random weights, KV 50% M-LRD) through the runtime's ONNX
    Runtime backend, CUDA against CPU: the logits of a prefill and of ``new_tokens`` decode steps fed the same
    tokens (caches and logits in GPU memory on CUDA), and the tokens ``generate`` picks, greedy and sampled, on
    each device. The same with the model exported for CUDA graphs (``--cuda-graph``), its decode steps replayed
    as CUDA graphs on the GPU, and with a model whose ranks are an input, generating with its progressive
    schedule (without graphs: they cannot capture it). (Float latents only: the CPU kernel has no float16 form
    for packed latents.)"""
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_e2e import build_variant, smoke_config

    from lrexport.export import load_onnx_backend
    from lrexport.plan import Plan

    prompts = [[11, 22, 33, 44, 55], [7, 8, 9, 10, 12]]
    providers = {"cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"], "cpu": ["CPUExecutionProvider"]}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("lrexport", "lrexport_graph", "lrexport_ranks"):
            folder = build_variant(variant, smoke_config(2, 64), "float16", Path(tmp), "cpu")
            backends = {dev: load_onnx_backend(folder, providers=prov)[0] for dev, prov in providers.items()}
            graph = backends["cuda"].cuda_graph
            if graph != variant.endswith("_graph"):
                ck.add(Row(f"generate {variant}", "float16", 0, 1, "-", ok=False,
                           note=f"the CUDA backend's cuda_graph is {graph}"))
                continue
            schedule = Plan.load(folder / "lrexport.json").schedule
            ranks = "_ranks" in variant
            if (schedule is not None) != ranks or bool(backends["cpu"].rank_max) != ranks:
                ck.add(Row(f"generate {variant}", "float16", 0, 1, "-", ok=False,
                           note="the model's rank input or schedule is not what the variant asks for"))
                continue
            _generation_pair(ck, variant, backends, prompts, new_tokens, schedule)


def _generation_pair(ck: Checker, variant: str, backends: dict, prompts: list, new_tokens: int, schedule=None):
    """One model on both devices. A model with a rank input (``_ranks``) generates with its progressive
    schedule."""
    import torch

    from lrexport.runtime.loop import generate
    from lrexport.runtime.sampling import Sampling

    # teacher-forced: the same tokens on both devices (the CPU's greedy picks)
    caches = {dev: be.new_caches(2, 5 + new_tokens + 1) for dev, be in backends.items()}
    ids, pos, worst = torch.tensor(prompts), torch.zeros(2, dtype=torch.int64), 0.0
    for _ in range(new_tokens + 1):
        out = {}
        for dev, be in backends.items():
            logits, caches[dev] = be.step(ids, pos, caches[dev], None)
            out[dev] = logits[:, -1].double().cpu()
        worst = max(worst, rel_err(out["cuda"].numpy(), out["cpu"].numpy()))
        pos = pos + ids.shape[1]
        ids = out["cpu"].argmax(-1)[:, None]
    toks = {dev: [generate(be, prompts, max_new_tokens=new_tokens, sampling=smp, schedule=schedule).tokens
                  for smp in (Sampling(), Sampling(temperature=0.8, top_k=50, seed=3))]
            for dev, be in backends.items()}
    same = sum(a == b for ga, gb in zip(toks["cuda"], toks["cpu"]) for ra, rb in zip(ga, gb)
               for a, b in zip(ra, rb))
    total = sum(len(r) for g in toks["cpu"] for r in g)
    graphs = " (decode steps as CUDA graphs)" if backends["cuda"].cuda_graph else ""
    if backends["cuda"].cuda_graph:
        _device_loop_pair(ck, variant, backends["cuda"], prompts, new_tokens)
    if schedule is not None:
        settings = {tuple(schedule.ranks(t, backends["cpu"].rank_max)) for t in range(new_tokens + 1)}
        graphs += f"; progressive schedule: {len(settings)} rank settings"
    ck.add(Row(f"generate {variant}", "float16", 0, 1, f"{new_tokens} steps",
               out_vs_cpu=worst, ok=worst < 2e-2 and same == total,
               note=f"ONNX Runtime backend, logits on the GPU{graphs}; generate(): {same}/{total} tokens equal "
                    "to the CPU's (greedy and sampled)"))


def _device_loop_pair(ck: Checker, variant: str, be, prompts: list, new_tokens: int):
    """Greedy generate() on a CUDA-graph backend drives its decode steps on the GPU (``device_loop``,
    ``greedy_on_device``: argmax into the next step's ids, one step launched ahead). Against the same
    backend's step-by-step loop (the device loop switched off): the tokens and finish reasons, plain, with
    a stop token met mid-way by one row, and with that stop token held back by ``min_new_tokens``; and a
    graph step whose rows do not match its caches, refused with a ShapeError."""
    import torch

    from lrexport.errors import ShapeError
    from lrexport.runtime.loop import generate

    def run(device_loop: bool, **kw):
        if not device_loop:
            be.device_loop = lambda caches: None  # the instance's attribute hides the method
        try:
            r = generate(be, prompts, max_new_tokens=new_tokens, **kw)
        finally:
            be.__dict__.pop("device_loop", None)
        return r.tokens, r.finish_reasons, r.live_rows

    plain = run(False)
    stop = plain[0][0][new_tokens // 2]  # row 0's token half-way
    cases = {"plain": {}, "stop": {"stop_ids": [stop]}, "stop+min_new": {"stop_ids": [stop],
                                                                          "min_new_tokens": new_tokens - 2}}
    same = {name: run(True, **kw) == run(False, **kw) for name, kw in cases.items()}
    stopped = run(True, stop_ids=[stop])[1]
    # a graph step of one row over caches of two: a ShapeError, and the backend still generates the same
    try:
        be.step(torch.tensor([[5]]), torch.tensor([3]), be.new_caches(2, 32), None)
        mismatch = "no error"
    except ShapeError:
        mismatch = "ShapeError"
    except Exception as e:  # noqa: BLE001 - named in the note
        mismatch = f"{type(e).__name__}: {e}"
    same["after the row mismatch"] = run(True) == plain
    ck.add(Row(f"generate {variant} device loop", "float16", 0, 1, f"{new_tokens} steps",
               ok=all(same.values()) and "stop" in stopped and mismatch == "ShapeError",
               note="greedy generate() on the GPU-driven loop against the step-by-step loop, same backend: "
                    + ", ".join(f"{k} {'equal' if v else 'DIFFERENT'}" for k, v in same.items())
                    + f"; finish reasons with the stop token {stopped}; a graph step of 1 row over caches of 2: "
                    + mismatch))


def environment(ort, emulated: bool) -> dict:
    env = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
           "python": platform.python_version(), "emulated": emulated}
    try:
        import torch
        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # torch without CUDA, or none
        pass
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="write the results as JSON")
    ap.add_argument("--quick", action="store_true", help="a smaller grid")
    ap.add_argument("--lib", type=Path, help="the library to check (default: lrexport.ortops builds it); with "
                    "--emulated, the library whose CPU kernel is the reference")
    ap.add_argument("--emulated", type=Path, metavar="LIB",
                    help="check a -DLREXPORT_CUDA_EMULATE=ON build on the CPU instead of the GPU")
    args = ap.parse_args(argv)

    try:
        import torch  # noqa: F401  (first: onnxruntime-gpu finds the CUDA libraries it loaded)
    except ImportError:
        print("torch is needed (the reference and lrexport import it)", file=sys.stderr)
        return 2
    import onnxruntime as ort

    from lrexport import ortops
    from lrexport.errors import LrexportError

    try:
        return _check(args, ort, ortops)
    except LrexportError as e:  # the library could not be built
        print(f"error: {e}. Nothing was checked.")
        return 2


def _check(args, ort, ortops) -> int:
    if args.emulated:
        gpu_lib = args.emulated
    else:
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            print(f"no CUDAExecutionProvider in this onnxruntime ({ort.__version__}, {ort.__file__}; providers: "
                  f"{', '.join(ort.get_available_providers())}): install onnxruntime-gpu, import torch first, and run "
                  "on a machine with a GPU. Nothing was checked.")
            return 2
        gpu_lib = args.lib or ortops.library_path()
        if not ortops.has_cuda_kernel(gpu_lib) and args.lib is None:
            gpu_lib = ortops.build()  # built before nvcc was there? CMake looks for it again
            print(f"rebuilt {gpu_lib}: {ortops.last_cuda_status}")
        if not ortops.has_cuda_kernel(gpu_lib):
            why = ortops.last_cuda_status or "no CUDA compiler found"
            print(f"{gpu_lib} was built without the CUDA kernel ({why}): put nvcc on PATH or set CUDACXX, then "
                  "`python -m lrexport.ortops --cuda on`. Nothing was checked.")
            return 2
    cpu_lib = gpu_lib if not args.emulated else (args.lib or ortops.library_path())  # its CPU kernel
    print(f"kernel under test: {gpu_lib} ({'emulated on the CPU' if args.emulated else 'CUDAExecutionProvider'}); "
          f"CPU reference kernel: {cpu_lib}")
    ck = Checker(ort, Path(gpu_lib), Path(cpu_lib), emulated=bool(args.emulated))
    t0 = time.perf_counter()
    try:
        run_all(ck, args.quick)
    except Exception as e:  # report what ran so far
        import traceback
        traceback.print_exc()
        ck.rows.append(Row("crashed", "-", 0, 0, "-", ok=False, note=f"{type(e).__name__}: {e}"))
    fails = [r for r in ck.rows if not r.ok]
    near = [r for r in ck.rows if "differ (max 1)" in r.caches]
    print(f"\n{len(ck.rows) - len(fails)}/{len(ck.rows)} checks passed in {time.perf_counter() - t0:.0f} s; codes: "
          + ("all bit-exact with the CPU kernel" if not near else f"{len(near)} steps with codes one step apart"))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        import datetime as dt

        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps({"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                   "command": " ".join(["python", "bench/gpu_check_ort.py", *sys.argv[1:]]),
                                   "environment": environment(ort, bool(args.emulated)),
                                   "library": str(gpu_lib), "passed": not fails,
                                   "rows": [asdict(r) for r in ck.rows]}, indent=1))
        tmp.replace(args.out)
        print(f"results: {args.out}")
    if fails:
        print(f"{len(fails)} FAILED:")
        for r in fails:
            print(f"  {r.case} {r.dtype} bits={r.bits} s={r.group_size} {r.step}: {r.caches} {r.note}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
