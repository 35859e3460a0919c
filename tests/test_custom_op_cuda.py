"""The CUDA kernel of ``LowRankKVAttention``, as far as a machine without a GPU can check it.

* The build: without a CUDA compiler CMake says the CUDA kernel is skipped and builds the CPU
  library, which works; ``LREXPORT_CUDA=ON`` then fails with a clear message; with nvcc (slow) the
  library has the CUDA kernel, still loads without a GPU or driver and runs its CPU kernel.
* The kernel's code: built with ``-DLREXPORT_CUDA_EMULATE=ON`` (the .cu compiled by the C++
  compiler, its blocks run on the CPU, threads as fibers, see custom_ops/src/cuda/emulate.h) and
  put through ``bench/gpu_check_ort.py --emulated --quick``: prefill and decode steps with in-place
  caches, float32 and float16, bits 0 and 4, splits along the keys, errors, against the CPU kernel
  and the float64 reference; with ``LREXPORT_CUDA_MMA=0`` and by default (the float16 tensor-core path,
  WMMA emulated). On a GPU, run ``bench/gpu_check_ort.py`` itself.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from lrexport import ortops
from lrexport.errors import LrexportError

REPO = Path(__file__).resolve().parent.parent


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_ort", REPO / "bench" / "gpu_check_ort.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check_ort"] = mod
    spec.loader.exec_module(mod)
    return mod


def _run_one_case(lib: Path, shape=None, past_len=(7, 30), seed: int | None = 0) -> float:
    """One decode call through ONNX Runtime (CPU) with `lib`, by default of a quantized-cache model:
    relative error against the float64 reference."""
    g = _gpu_check()
    rng = np.random.default_rng(seed)
    sh = shape or g.Shape(s=2, bits=4, rk=40, rv=24)
    feeds = dict(g.constants(rng, sh, np.float32), **g.initial_caches(rng, sh, np.float32),
                 **g.new_tokens(rng, sh, 1, np.float32), past_len=np.asarray(past_len, np.int64))
    attrs = g.attributes(sh)
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(lib))
    sess = ort.InferenceSession(g.make_model(feeds, attrs), so, providers=["CPUExecutionProvider"])
    out = sess.run(None, {k: v for k, v in feeds.items() if v is not None})[0]
    return g.rel_err(out, g.reference(feeds, attrs)[0])


def test_build_without_cuda_compiler(tmp_path, monkeypatch):
    """No usable CUDA compiler (CUDACXX names none): CMake says the CUDA kernel is skipped and the
    CPU library builds and works."""
    monkeypatch.setenv("CUDACXX", str(tmp_path / "no-such-nvcc"))
    monkeypatch.setenv(ortops.ENV_CUDA, "AUTO")
    lib = ortops.build(build_dir=tmp_path / "build")
    assert "no CUDA compiler found: the CUDA kernel is skipped" in ortops.last_cuda_status
    assert not ortops.has_cuda_kernel(lib)
    assert _run_one_case(lib) < 1e-4

    monkeypatch.setenv(ortops.ENV_CUDA, "ON")
    with pytest.raises(LrexportError, match="LREXPORT_CUDA=ON but no working CUDA compiler"):
        ortops.build(build_dir=tmp_path / "build-on")


def test_emulated_cuda_kernel(tmp_path, monkeypatch):
    """The CUDA kernel's code, run on the CPU, agrees with the CPU kernel (codes bit for bit) and
    the reference, in place and not, and reports bad inputs. The scalar float32 path
    (``LREXPORT_CUDA_MMA=0``: no tensor cores)."""
    monkeypatch.setenv("LREXPORT_CUDA_MMA", "0")  # read by the library per call
    lib = ortops.build(build_dir=REPO / "build" / "custom_ops-cuda-emulated", extra_args=["-DLREXPORT_CUDA_EMULATE=ON"])
    assert "EMULATED" in ortops.last_cuda_status, ortops.last_cuda_status
    g = _gpu_check()
    out = tmp_path / "emulated.json"
    rc = g.main(["--emulated", str(lib), "--quick", "--out", str(out)])
    res = json.loads(out.read_text())
    fails = [r for r in res["rows"] if not r["ok"]]
    assert rc == 0 and res["passed"], fails
    steps = [r for r in res["rows"] if r["step"] != "error"]
    assert len(steps) > 20 and all("exact" in r["caches"] or r["caches"] == "unchanged" for r in steps)
    assert {r["dtype"] for r in steps} >= {"float32", "float16"}
    assert all("tensor cores" not in r["note"] for r in steps)


def test_emulated_cuda_kernel_tensor_cores(tmp_path, monkeypatch):
    """By default float16 models take the tensor-core path (WMMA, emulated by
    emulate.h: float16 operands, float accumulation) and still pass gpu_check_ort's float16
    tolerance; float32 models keep the scalar path; caches stay bit-exact (the cache write is
    unchanged)."""
    lib = ortops.build(build_dir=REPO / "build" / "custom_ops-cuda-emulated", jobs=1,
                       extra_args=["-DLREXPORT_CUDA_EMULATE=ON"])
    assert "EMULATED" in ortops.last_cuda_status, ortops.last_cuda_status
    monkeypatch.delenv("LREXPORT_CUDA_MMA", raising=False)
    g = _gpu_check()
    out = tmp_path / "emulated-mma.json"
    rc = g.main(["--emulated", str(lib), "--quick", "--out", str(out)])
    res = json.loads(out.read_text())
    fails = [r for r in res["rows"] if not r["ok"]]
    assert rc == 0 and res["passed"] and all(r["ok"] for r in res["rows"]), fails
    steps = [r for r in res["rows"] if r["step"] != "error"]
    assert all("exact" in r["caches"] or r["caches"] == "unchanged" for r in steps)
    # in-place steps log the path their kernel took: float16 on tensor cores, float32 not
    logged = [r for r in steps if not r["step"].startswith(("run:", "guard:"))]  # guard: no kernel log
    f16 = [r for r in logged if r["dtype"] == "float16"]
    assert len(f16) > 10 and all("tensor cores" in r["note"] for r in f16), f16
    assert all("tensor cores" not in r["note"] for r in logged if r["dtype"] == "float32")


@pytest.mark.parametrize("rv, v_up", [(40, True), (16, False), (160, True)])
def test_emulated_combine_many_splits(monkeypatch, rv, v_up):
    """Decode with more splits along the keys than the combination's block has threads (an emulated
    device of 256 multiprocessors: 512 programs wanted for one row), for value ranks that leave threads
    of its groups idle (40: three groups of 40), fill them (16: eight) or exceed the block (160), with and
    without ``v_up``: float32 against the float64 reference on fresh random inputs (tolerance 1e-4)."""
    monkeypatch.setenv("LREXPORT_CUDA_MMA", "0")
    monkeypatch.setenv("LREXPORT_EMU_SMS", "256")
    lib = ortops.build(build_dir=REPO / "build" / "custom_ops-cuda-emulated", extra_args=["-DLREXPORT_CUDA_EMULATE=ON"])
    sh = _gpu_check().Shape(B=1, Hq=2, Hkv=1, D=32, rk=24, rv=rv, P=10240, Prope=10240, v_up=v_up, k_bias=False)
    # 10240 positions: min(512, 10240 // 64) = 160 splits of 64, none empty
    err = _run_one_case(lib, sh, past_len=[10239], seed=None)
    assert err < 1e-4, err


def test_model_encoder_without_onnx():
    """bench/gpu_check_ort.py writes its one-node model without the onnx package when it is
    missing (the GPU machine may not have it): the same ModelProto as onnx.helper's."""
    import onnx
    g = _gpu_check()
    rng = np.random.default_rng(1)
    for bits, dt in ((0, np.float16), (3, np.float32)):
        sh = g.Shape(s=2, bits=bits, rk=40, rv=24, k_bias=bits == 0)
        feeds = dict(g.constants(rng, sh, dt), **g.initial_caches(rng, sh, dt), **g.new_tokens(rng, sh, 2, dt),
                     past_len=np.asarray([1, 2], np.int64))
        attrs = g.attributes(sh)
        for op in (g.OP, g.OP_DEVICE_LEN):
            ours = onnx.load_from_string(g._encode_model(*_encoder_args(g, feeds, attrs), op))
            assert ours == onnx.load_from_string(g.make_model(feeds, attrs, op))


def _encoder_args(g, feeds, attrs):
    bits = attrs["bits"]
    ins = [n if feeds.get(n) is not None else "" for n in g.NAMES]
    outs = [o if bits or not o.endswith("params") else "" for o in g.OUTPUTS]
    gin = [(n, g.ELEM_TYPE[feeds[n].dtype], [f"{n}_{i}" for i in range(feeds[n].ndim)])
           for n in g.NAMES if feeds.get(n) is not None]
    out_type = {"output": feeds["query"].dtype, "present_k": feeds["past_k"].dtype,
                "present_v": feeds["past_v"].dtype, "present_k_params": np.float16, "present_v_params": np.float16}
    gout = [(o, g.ELEM_TYPE[np.dtype(out_type[o])], None) for o in outs if o]
    return ins, outs, attrs, gin, gout


@pytest.mark.slow
def test_cuda_build_loads_without_gpu():
    """With nvcc the library has the CUDA kernel (static CUDA runtime), and still loads and runs
    its CPU kernel on this machine without a GPU or driver."""
    nvcc, why = ortops.find_nvcc()
    if nvcc is None:
        pytest.skip(f"no CUDA compiler: {why}")
    lib = ortops.library_path()
    if not ortops.has_cuda_kernel(lib):
        lib = ortops.build(build_dir=REPO / "build" / "custom_ops-cuda")
    assert ortops.has_cuda_kernel(lib), ortops.last_cuda_status
    assert _run_one_case(lib) < 1e-4
