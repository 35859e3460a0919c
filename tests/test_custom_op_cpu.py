"""The CPU kernel of ``LowRankKVAttention`` (liblrexport_ops.so) against the PyTorch reference.

Each test builds a one-node ONNX model, runs it in ONNX Runtime with the library registered
and compares with ``latent_attention_reference`` computed in float64 on the same random
inputs (a fresh seed per test, see conftest.py).

Tolerances:
* output: max |ort - ref| / max |ref| < 1e-4;
* float caches: the new latents are stored bit for bit;
* quantized caches: the kernel quantizes in float32 exactly like ``lrexport.kv.quant.quantize``
  (same float16 rounding of scale and zero point, same round-half-to-even), so codes and params
  are expected to be identical. The assertion allows at most 0.1% of codes to differ, by one
  step (a tie rounded the other way), and then loosens the output bound to 2e-2.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from lrexport import ortops
from lrexport.errors import LrexportError
from lrexport.kv.quant import quantize, unpack
from lrexport.trace.latent_attention_op import latent_attention_reference

NAMES = ["query", "latent_k", "latent_v", "past_k", "past_k_params", "past_v", "past_v_params", "past_len",
         "k_up", "k_bias", "v_up", "cos", "sin"]
OUTPUTS = ["output", "present_k", "present_k_params", "present_v", "present_v_params"]
ONNX_TYPE = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE,
             np.dtype(np.float16): TensorProto.FLOAT16, np.dtype(np.uint8): TensorProto.UINT8,
             np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32}
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def lib():
    t = time.perf_counter()
    try:
        path = ortops.library_path()
    except LrexportError as e:
        pytest.fail(f"cannot build the custom-op library: {e}")
    print(f"liblrexport_ops.so ready in {time.perf_counter() - t:.1f} s: {path}")
    return path


# ---- building and running one-node models --------------------------------------------------

def make_model(feeds: dict, attrs: dict, dynamic: bool = False) -> onnx.ModelProto:
    """One LowRankKVAttention node; absent inputs (None) get an empty name. Graph inputs have
    the feeds' shapes, or symbolic dimensions with ``dynamic``."""
    bits = attrs.get("bits", 0)
    ins = [n if feeds.get(n) is not None else "" for n in NAMES]
    outs = [o if bits or not o.endswith("params") else "" for o in OUTPUTS]
    node = helper.make_node("LowRankKVAttention", ins, outs, domain="lrexport", **attrs)
    gin = [helper.make_tensor_value_info(
        n, ONNX_TYPE[feeds[n].dtype],
        [f"{n}_{i}" for i in range(feeds[n].ndim)] if dynamic else list(feeds[n].shape))
        for n in NAMES if feeds.get(n) is not None]
    out_type = {"output": TensorProto.FLOAT, "present_k_params": TensorProto.FLOAT16,
                "present_v_params": TensorProto.FLOAT16,
                "present_k": ONNX_TYPE[feeds["past_k"].dtype], "present_v": ONNX_TYPE[feeds["past_v"].dtype]}
    gout = [helper.make_tensor_value_info(o, out_type[o], None) for o in outs if o]
    graph = helper.make_graph([node], "lowrank_kv_attention", gin, gout)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("lrexport", 1)])
    model.ir_version = 10
    return model


def session(model: onnx.ModelProto, so: ort.SessionOptions | None = None) -> ort.InferenceSession:
    so = ortops.session_options(["CPUExecutionProvider"], options=so or ort.SessionOptions())
    so.log_severity_level = 4  # the tests read the errors from the exceptions
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(feeds: dict, attrs: dict) -> list[np.ndarray]:
    sess = session(make_model(feeds, attrs))
    return sess.run(None, {k: v for k, v in feeds.items() if v is not None})


def rope_tables(n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    inv = 1.0 / (10000.0 ** (np.arange(0, d, 2) / d))
    ang = np.arange(n)[:, None] * inv[None]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def make_case(rng, *, B=2, S=1, Hq=8, Hkv=4, D=16, s=2, rk=16, rv=8, P=24, Prope=32, past_len=(5, 11), bits=0,
              quant_group=8, v_up=True, k_bias=False, window=0, scale=True):
    """Random inputs and attributes. The whole cache holds valid (quantized) latents."""
    G = Hkv // s

    def f(*shape, std=1.0):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    feeds = dict(query=f(B, S, Hq * D), latent_k=f(B, S, G * rk), latent_v=f(B, S, G * rv),
                 past_len=np.asarray(past_len, np.int64), k_up=f(G, rk, s * D, std=0.3),
                 k_bias=f(Hkv * D) if k_bias else None, v_up=f(G, rv, s * D, std=0.3) if v_up else None)
    feeds["cos"], feeds["sin"] = rope_tables(Prope, D)
    if bits:
        ck, pk = quantize(torch.from_numpy(f(B, P, G * rk)), bits, quant_group)
        cv, pv = quantize(torch.from_numpy(f(B, P, G * rv)), bits, quant_group)
        feeds.update(past_k=ck.numpy(), past_k_params=pk.numpy(), past_v=cv.numpy(), past_v_params=pv.numpy())
    else:
        feeds.update(past_k=f(B, P, G * rk), past_v=f(B, P, G * rv), past_k_params=None, past_v_params=None)
    attrs = dict(num_heads=Hq, num_kv_heads=Hkv, group_size=s, window=window, bits=bits, quant_group=quant_group)
    if scale:
        attrs["scale"] = float(D ** -0.5)
    return feeds, attrs


def reference(feeds: dict, attrs: dict):
    """latent_attention_reference in float64 (quantized caches stay codes + float16 params)."""
    def t(name):
        a = feeds.get(name)
        if a is None:
            return None
        x = torch.from_numpy(np.ascontiguousarray(a))
        return x.double() if a.dtype == np.float32 else x

    D = feeds["query"].shape[2] // attrs["num_heads"]
    return latent_attention_reference(
        t("query"), t("latent_k"), t("latent_v"), t("past_k"), t("past_k_params"), t("past_v"), t("past_v_params"),
        t("past_len"), t("k_up"), t("k_bias"), t("v_up"), t("cos"), t("sin"), attrs["num_heads"],
        attrs["num_kv_heads"], attrs["group_size"], attrs["window"], attrs.get("scale", D ** -0.5), attrs["bits"],
        attrs["quant_group"])


def rel_err(got: np.ndarray, want: torch.Tensor) -> float:
    want = want.numpy()
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got.astype(np.float64) - want).max() / max(np.abs(want).max(), 1e-30))


def check(outs: list[np.ndarray], ref, feeds: dict, attrs: dict) -> None:
    """Compare ORT outputs (output, present_k, [params], present_v, [params]) with the reference."""
    bits = attrs["bits"]
    out, ck, cv = outs[0], outs[1], outs[3 if bits else 2]
    tol = REL_TOL
    if not bits:
        assert np.array_equal(ck, ref[1].numpy().astype(np.float32)), "present_k differs from the reference cache"
        assert np.array_equal(cv, ref[3].numpy().astype(np.float32)), "present_v differs from the reference cache"
    else:
        for got, want, params, want_params, latent in ((ck, ref[1], outs[2], ref[2], "latent_k"),
                                                       (cv, ref[3], outs[4], ref[4], "latent_v")):
            width = feeds[latent].shape[2]
            gc, wc = unpack(torch.from_numpy(got), bits, width), unpack(want, bits, width)
            diff = (gc - wc).abs()
            assert int(diff.max()) <= 1, f"{latent} codes differ by {int(diff.max())} steps"
            frac = float((diff > 0).double().mean())
            assert frac <= 1e-3, f"{frac:.2%} of the {latent} codes differ from the reference"
            assert np.array_equal(params.view(np.uint16), want_params.numpy().view(np.uint16)), \
                f"{latent} scale / zero params differ from the reference"
            if frac > 0:
                tol = 2e-2
    err = rel_err(out, ref[0])
    assert err < tol, f"output relative error {err:.2e} >= {tol}"


# ---- agreement with the reference ----------------------------------------------------------

@pytest.mark.parametrize("bits", [0, 2, 3, 4, 8])
@pytest.mark.parametrize("S,past_len", [(1, (5, 11)), (5, (0, 9)), (20, (3, 0))],
                         ids=["decode", "prefill5", "prefill20"])
@pytest.mark.parametrize("group_size", [1, 2, 4])
@pytest.mark.parametrize("v_up", [True, False], ids=["v_up", "latent_out"])
def test_matches_reference(lib, rng, bits, S, past_len, group_size, v_up):
    """GQA Hq=8, Hkv=4, D=16; batch 2 with different past lengths; k_bias with v_up."""
    feeds, attrs = make_case(rng, S=S, past_len=past_len, s=group_size, bits=bits, v_up=v_up, k_bias=v_up)
    outs = run(feeds, attrs)
    assert outs[0].shape == (2, S, 8 * 16 if v_up else 8 * 8)  # Hq*D or Hq*rv
    check(outs, reference(feeds, attrs), feeds, attrs)


@pytest.mark.parametrize("bits", [0, 3, 4])
@pytest.mark.parametrize("window", [1, 4, 9])
@pytest.mark.parametrize("S,past_len", [(1, (7, 15)), (6, (2, 12)), (17, (0, 4))],
                         ids=["decode", "prefill6", "prefill17"])
def test_window_and_bias(lib, rng, bits, window, S, past_len):
    feeds, attrs = make_case(rng, S=S, past_len=past_len, s=2, bits=bits, k_bias=True, window=window, P=32)
    check(run(feeds, attrs), reference(feeds, attrs), feeds, attrs)


@pytest.mark.parametrize("bits,window", [(0, 0), (4, 0), (2, 50), (8, 120)])
def test_many_blocks(lib, rng, bits, window):
    """More than one 64-position block and 16-query block per row (several tasks per thread)."""
    feeds, attrs = make_case(rng, B=3, S=70, past_len=(0, 100, 37), P=200, Prope=256, s=2, rk=24, rv=16,
                             bits=bits, window=window, k_bias=True)
    check(run(feeds, attrs), reference(feeds, attrs), feeds, attrs)


def test_default_scale_and_mixed_cache_types(lib, rng):
    """No scale attribute means 1/sqrt(D); only the key cache quantized also runs (bits applies
    to both caches, so a float value cache with bits > 0 is reported)."""
    feeds, attrs = make_case(rng, S=3, scale=False)
    check(run(feeds, attrs), reference(feeds, attrs), feeds, attrs)
    feeds, attrs = make_case(rng, S=1, bits=4)
    feeds["past_v"] = np.zeros((2, 24, 16), np.float32)
    with pytest.raises(Exception, match=r"past_v.*must be uint8"):
        run(feeds, attrs)


def test_no_new_tokens(lib, rng):
    feeds, attrs = make_case(rng, S=0, past_len=(3, 4), bits=4)
    outs = run(feeds, attrs)
    assert outs[0].shape == (2, 0, 128)
    assert np.array_equal(outs[1], feeds["past_k"]) and np.array_equal(outs[4], feeds["past_v_params"])


def test_inputs_not_modified(lib, rng):
    feeds, attrs = make_case(rng, S=2, bits=3)
    before = {k: v.copy() for k, v in feeds.items() if v is not None}
    run(feeds, attrs)
    for k, v in before.items():
        assert np.array_equal(v, feeds[k]), f"input {k} was modified"


# ---- in-place caches -----------------------------------------------------------------------

@pytest.mark.parametrize("bits", [0, 4])
def test_in_place_caches_with_io_binding(lib, rng, bits, monkeypatch, capfd):
    """past_k/present_k (and the others) bound to one buffer: prefill then two decode steps
    update the caches in place and match the reference chain."""
    monkeypatch.setenv("LREXPORT_OPS_DEBUG", "1")
    B, Hq, D, G, rk, rv = 2, 8, 16, 2, 16, 8
    feeds, attrs = make_case(rng, S=4, past_len=(0, 2), bits=bits, k_bias=True)
    sess = session(make_model(feeds, attrs, dynamic=True))
    caches = {n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(feeds[n]))
              for n in ("past_k", "past_k_params", "past_v", "past_v_params") if feeds[n] is not None}
    state = {n: feeds[n] for n in caches}
    past_len = feeds["past_len"]
    for step, S in enumerate((4, 1, 1)):
        f = dict(feeds)
        if step:
            f["query"] = rng.standard_normal((B, S, Hq * D)).astype(np.float32)
            f["latent_k"] = rng.standard_normal((B, S, G * rk)).astype(np.float32)
            f["latent_v"] = rng.standard_normal((B, S, G * rv)).astype(np.float32)
        f["past_len"] = past_len
        f.update(state)
        ref = reference(f, attrs)
        io = sess.io_binding()
        for n in NAMES:
            if n in caches:
                io.bind_ortvalue_input(n, caches[n])
            elif f.get(n) is not None:
                io.bind_cpu_input(n, np.ascontiguousarray(f[n]))
        io.bind_output("output")
        for n, v in caches.items():
            io.bind_ortvalue_output(n.replace("past", "present"), v)
        sess.run_with_iobinding(io)
        out = io.get_outputs()[0].numpy()
        assert rel_err(out, ref[0]) < REL_TOL
        new_state = dict(zip(("past_k", "past_k_params", "past_v", "past_v_params"), ref[1:]))
        for n, v in caches.items():  # the bound buffers hold the updated caches
            assert np.array_equal(v.numpy(), new_state[n].numpy().astype(v.numpy().dtype)), f"{n} not updated in place"
        state = {n: v.numpy().copy() for n, v in caches.items()}
        past_len = past_len + S
    err = capfd.readouterr().err
    assert err.count("present_k aliases past_k") == 3 and "is a copy of" not in err


@pytest.mark.parametrize("output,shared_input", [("present_k", "past_v"), ("output", "query")])
def test_wrongly_shared_buffer_is_an_error(lib, rng, output, shared_input):
    """Only a present cache may be bound to its own past: any other sharing is reported."""
    feeds, attrs = make_case(rng, S=2, rk=8, rv=8)  # past_k and past_v of one shape
    sess = session(make_model(feeds, attrs))
    vals = {n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for n, v in feeds.items() if v is not None}
    io = sess.io_binding()
    for n, v in vals.items():
        io.bind_ortvalue_input(n, v)
    for o in ("output", "present_k", "present_v"):
        if o == output:
            io.bind_ortvalue_output(o, vals[shared_input])
        else:
            io.bind_output(o)
    with pytest.raises(Exception, match=f"output '{output}' shares memory with input '{shared_input}'"):
        sess.run_with_iobinding(io)


def test_may_inplace_hint(lib, rng, monkeypatch, capfd):
    """The op declares past -> present as may-in-place (OrtCustomOp::GetMayInplace): when the
    past is an intermediate value of known shape used only here, ONNX Runtime's planner gives
    the kernel the same buffer, and the result is unchanged."""
    monkeypatch.setenv("LREXPORT_OPS_DEBUG", "1")
    feeds, attrs = make_case(rng, S=2, k_bias=True)
    model = make_model(feeds, attrs)
    g = model.graph
    node = g.node[0]
    pre = []
    for i, name in enumerate(node.input):
        if name in ("past_k", "past_v"):
            pre.append(helper.make_node("Mul", [name, "one"], [name + "_mid"]))
            node.input[i] = name + "_mid"
    post = []
    for i, name in enumerate(node.output):
        if name in ("present_k", "present_v"):
            post.append(helper.make_node("Mul", [name + "_mid", "one"], [name]))
            node.output[i] = name + "_mid"
    vi = []
    for n in ("past_k", "past_v"):
        shape = list(feeds[n].shape)
        vi += [helper.make_tensor_value_info(n + "_mid", TensorProto.FLOAT, shape),
               helper.make_tensor_value_info(n.replace("past", "present") + "_mid", TensorProto.FLOAT, shape)]
    graph = helper.make_graph(pre + [node] + post, "hint", list(g.input), list(g.output),
                              initializer=[helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])], value_info=vi)
    m2 = helper.make_model(graph, opset_imports=list(model.opset_import))
    m2.ir_version = 10
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the Mul nodes
    outs = session(m2, so).run(None, {k: v for k, v in feeds.items() if v is not None})
    check(outs, reference(feeds, attrs), feeds, attrs)
    assert "present_k aliases past_k, present_v aliases past_v" in capfd.readouterr().err


def test_output_feeds_another_node(lib, rng):
    """Without shape inference the output's type still resolves (k_bias / params absent)."""
    feeds, attrs = make_case(rng, S=2)
    model = make_model(feeds, attrs)
    node = model.graph.node[0]
    node.output[0] = "attn"
    graph = helper.make_graph([node, helper.make_node("Mul", ["attn", "two"], ["output"])], "chain",
                              list(model.graph.input), list(model.graph.output),
                              initializer=[helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])])
    m2 = helper.make_model(graph, opset_imports=list(model.opset_import))
    m2.ir_version = 10
    outs = session(m2).run(None, {k: v for k, v in feeds.items() if v is not None})
    assert rel_err(outs[0] / 2, reference(feeds, attrs)[0]) < REL_TOL


# ---- errors --------------------------------------------------------------------------------

def _bad(name, mutate, match):
    return pytest.param(mutate, match, id=name)


BAD_CASES = [
    _bad("query_rank", lambda f, a: f.update(query=f["query"][0]), r"query.*\[B, S, num_heads\*D\]"),
    _bad("query_dtype", lambda f, a: f.update(query=f["query"].astype(np.float64)), r"double.*query|query.*double"),
    _bad("query_width", lambda f, a: f.update(query=f["query"][:, :, :100]), r"query.*width 100.*num_heads=8"),
    _bad("latent_k_width", lambda f, a: f.update(latent_k=f["latent_k"][:, :, :-1]),
         r"latent_k.*\[B=2, S=1, G\*rk=32\]"),
    _bad("latent_v_batch", lambda f, a: f.update(latent_v=np.concatenate([f["latent_v"]] * 2)),
         r"latent_v.*\[B=2, S=1, G\*rv\]"),
    _bad("latent_v_groups", lambda f, a: f.update(latent_v=f["latent_v"][:, :, :-1]), r"latent_v.*multiple of G=2"),
    _bad("past_k_capacity_mismatch", lambda f, a: f.update(past_v=f["past_v"][:, :-1]), r"past_v.*P=24"),
    _bad("past_k_width", lambda f, a: f.update(past_k=f["past_k"][:, :, :-2]), r"past_k.*G\*rk=32"),
    _bad("past_k_dtype_for_bits0", lambda f, a: f.update(past_k=f["past_k"].astype(np.uint8)),
         r"past_k.*must be float.*bits=0"),
    _bad("params_with_bits0", lambda f, a: f.update(past_k_params=np.zeros((2, 24, 8), np.float16)),
         r"past_k_params.*absent when bits=0"),
    _bad("past_len_length", lambda f, a: f.update(past_len=np.array([1, 2, 3])), r"past_len.*\[B=2\]"),
    _bad("past_len_negative", lambda f, a: f.update(past_len=np.array([-1, 2])), r"past_len\[0\]=-1.*>= 0"),
    _bad("past_len_beyond_cache", lambda f, a: f.update(past_len=np.array([1, 24])), r"past_len\[1\]=24.*P=24"),
    _bad("beyond_rope_table", lambda f, a: f.update(cos=f["cos"][:10], sin=f["sin"][:10]),
         r"past_len\[1\]=11.*RoPE table of 10"),
    _bad("cos_width", lambda f, a: f.update(cos=f["cos"][:, :4], sin=f["sin"][:, :4]), r"cos.*D/2=8"),
    _bad("sin_mismatch", lambda f, a: f.update(sin=f["sin"][:20]), r"sin.*\[32, D/2=8\]"),
    _bad("k_up_shape", lambda f, a: f.update(k_up=f["k_up"][:, :, :-1]), r"k_up.*\[G=2, rk, group_size\*D=32\]"),
    _bad("v_up_shape", lambda f, a: f.update(v_up=f["v_up"][:, :-1]), r"v_up.*\[G=2, rv=8, group_size\*D=32\]"),
    _bad("k_bias_shape", lambda f, a: f.update(k_bias=f["query"][0, 0, :10].copy()), r"k_bias.*num_kv_heads\*D=64"),
    _bad("num_heads_not_divisible", lambda f, a: a.update(num_kv_heads=3),
         r"num_heads=8.*not divisible.*num_kv_heads=3"),
    _bad("group_size_not_dividing", lambda f, a: a.update(group_size=3), r"group_size=3.*num_kv_heads=4"),
    _bad("bits_unsupported", lambda f, a: a.update(bits=5), r"bits=5.*not one of"),
    _bad("negative_window", lambda f, a: a.update(window=-2), r"window=-2"),
]


@pytest.mark.parametrize("mutate,match", BAD_CASES)
def test_bad_input_is_an_error(lib, rng, mutate, match):
    """Every bad input gives an onnxruntime exception (at session creation or run) that names it."""
    feeds, attrs = make_case(rng, S=1, k_bias=True)
    mutate(feeds, attrs)
    with pytest.raises(Exception) as info:
        run(feeds, attrs)
    assert info.type.__module__.startswith("onnxruntime"), info.type
    assert re.search(match, str(info.value)), str(info.value)


@pytest.mark.parametrize("case", ["width_vs_quant_group", "params_width", "params_missing", "quant_group"])
def test_bad_quantized_input_is_an_error(lib, rng, case):
    feeds, attrs = make_case(rng, S=1, bits=4, quant_group=8, rk=16, rv=8, s=4)  # G=1: widths 16 and 8
    if case == "width_vs_quant_group":
        attrs["quant_group"] = 16
        match = r"G\*rv=8.*not a multiple of quant_group=16"
    elif case == "params_width":
        feeds["past_k_params"] = feeds["past_k_params"][:, :, :1]
        match = r"past_k_params.*2\*G\*rk/quant_group=4"
    elif case == "params_missing":
        feeds["past_k_params"] = None
        match = r"past_k_params.*required"
    else:
        attrs["quant_group"] = 12
        match = r"quant_group=12.*multiple of 8"
    with pytest.raises(Exception) as info:
        run(feeds, attrs)
    assert re.search(match, str(info.value)), str(info.value)


def test_error_leaves_session_usable(lib, rng):
    feeds, attrs = make_case(rng, S=1)
    sess = session(make_model(feeds, attrs))
    bad = {k: v for k, v in feeds.items() if v is not None}
    bad["past_len"] = np.array([23, 24], np.int64)
    with pytest.raises(Exception, match="does not fit in the cache"):
        sess.run(None, bad)
    good = {k: v for k, v in feeds.items() if v is not None}
    assert rel_err(sess.run(None, good)[0], reference(feeds, attrs)[0]) < REL_TOL


# ---- locator -------------------------------------------------------------------------------

def test_locator(lib):
    assert ortops.library_path(build=False) == lib and lib.name == "liblrexport_ops.so"
    with pytest.raises(LrexportError, match="not available"):
        ortops.session_options(["NoSuchExecutionProvider"])


# ---- AddressSanitizer ----------------------------------------------------------------------

ASAN_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np, onnx, onnxruntime as ort
    with open("/proc/self/maps") as maps:
        assert "libasan" in maps.read(), "the AddressSanitizer runtime is not loaded"
    data = np.load(sys.argv[1], allow_pickle=True)
    so = ort.SessionOptions()
    so.register_custom_ops_library(sys.argv[2])
    so.log_severity_level = 4
    fails = 0
    for i in range(int(data["n"])):
        model = onnx.load_from_string(data[f"model{i}"].tobytes())
        feeds = data[f"feeds{i}"].item()
        try:
            sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            out = sess.run(None, feeds)[0]
        except Exception as e:
            if data[f"expect_error{i}"]:
                continue
            print("unexpected error", i, e); fails += 1; continue
        if data[f"expect_error{i}"]:
            print("no error for bad case", i); fails += 1; continue
        want = data[f"want{i}"]
        err = np.abs(out - want).max() / np.abs(want).max()
        if not err < 1e-4:
            print("mismatch", i, err); fails += 1
    print("asan-script-done", fails)
    sys.exit(1 if fails else 0)
""")


def test_asan_build(lib, rng, tmp_path):
    """The library built with -DLREXPORT_ASAN=ON runs valid and invalid inputs under
    AddressSanitizer (python with LD_PRELOAD of libasan) without a report."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is needed to find the AddressSanitizer runtime")
    asan_rt = subprocess.run([gcc, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not asan_rt or not os.path.exists(asan_rt):
        pytest.skip("no AddressSanitizer runtime (libasan.so) for gcc")
    t = time.perf_counter()
    asan_lib = ortops.build(asan=True)
    print(f"ASan build: {time.perf_counter() - t:.1f} s")
    cases = []
    for kw in (dict(S=1, bits=0, k_bias=True), dict(S=20, bits=3, window=5, past_len=(0, 4), P=32),
               dict(S=5, bits=4, v_up=False, past_len=(19, 0))):
        feeds, attrs = make_case(rng, **kw)
        cases.append((feeds, attrs, reference(feeds, attrs)[0].numpy(), False))
    bad_inputs = (dict(past_len=np.array([-1, 2])), dict(past_len=np.array([1, 24])), dict(k_up=np.zeros((2, 16, 31))),
                  dict(cos=np.zeros((4, 8), np.float32), sin=np.zeros((4, 8), np.float32)),
                  dict(latent_v=np.zeros((2, 1, 15), np.float32)))
    for bad in bad_inputs:
        feeds, attrs = make_case(rng, S=1)
        feeds.update({k: v.astype(feeds[k].dtype) for k, v in bad.items()})
        cases.append((feeds, attrs, None, True))
    arrays = {"n": len(cases)}
    for i, (feeds, attrs, want, bad) in enumerate(cases):
        arrays[f"model{i}"] = np.frombuffer(make_model(feeds, attrs).SerializeToString(), np.uint8)
        arrays[f"feeds{i}"] = np.array({k: v for k, v in feeds.items() if v is not None}, dtype=object)
        arrays[f"want{i}"] = want if want is not None else np.zeros(1)
        arrays[f"expect_error{i}"] = bad
    np.savez(tmp_path / "cases.npz", **arrays)
    script = tmp_path / "asan_run.py"
    script.write_text(ASAN_SCRIPT)
    # libstdc++ right after libasan: python loads it only later (dlopen), and ASan's __cxa_throw
    # interceptor must find the real one at start-up. Python itself leaks by design: no LSan.
    preload = [asan_rt]
    stdcxx = subprocess.run([gcc, "-print-file-name=libstdc++.so.6"], capture_output=True, text=True).stdout.strip()
    if os.path.isabs(stdcxx) and os.path.exists(stdcxx):
        preload.append(stdcxx)
    env = dict(os.environ, LD_PRELOAD=" ".join(preload), ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=99")
    env.pop("LREXPORT_OPS_LIB", None)
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "cases.npz"), str(asan_lib)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert "AddressSanitizer" not in res.stderr, res.stderr[-4000:]
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "asan-script-done 0" in res.stdout
