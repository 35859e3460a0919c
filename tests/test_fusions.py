"""Graph fusions against the unfused graphs (ONNX Runtime, fresh random inputs, float32 and float16).

Residual Add + RMSNorm fused into ONNX Runtime's SkipSimplifiedLayerNormalization: the residual sum
still reaches its other consumers and graph outputs, and graphs that do not match are left alone.
MatMuls sharing their input fused into one MatMul + Split: the same outputs under the same names,
with weights used elsewhere, of other row counts or dtypes left out."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lrexport.emit.fusions import SKIP_RMS_NORM, fuse_shared_input_matmuls, fuse_skip_rms_norm

H = 48


def _model(dtype: int, *, eps=1e-5, exponent=2.0, sum_is_output=False, weight_first=True) -> onnx.ModelProto:
    """Two residual blocks as lrexport's RMSNorm traces: s1 = a + b, y1 = norm(s1); s2 = s1 + y1, y2 = norm(s2)."""
    f16 = dtype != TensorProto.FLOAT
    npt = np.float16 if f16 else np.float32
    nodes, inits = [], [numpy_helper.from_array(np.array(exponent, np.float32), "two"),
                        numpy_helper.from_array(np.array([-1], np.int64), "axes"),
                        numpy_helper.from_array(np.array(eps, np.float32), "eps")]

    def norm(x: str, i: int) -> str:
        w = f"w{i}"
        inits.append(numpy_helper.from_array(np.random.default_rng(i).standard_normal(H).astype(npt), w))
        x32 = x
        if f16:
            nodes.append(helper.make_node("Cast", [x], [f"x32_{i}"], to=TensorProto.FLOAT))
            x32 = f"x32_{i}"
        nodes.extend([helper.make_node("Pow", [x32, "two"], [f"p{i}"]),
                      helper.make_node("ReduceMean", [f"p{i}", "axes"], [f"m{i}"], keepdims=1),
                      helper.make_node("Add", [f"m{i}", "eps"], [f"e{i}"]),
                      helper.make_node("Sqrt", [f"e{i}"], [f"r{i}"]),
                      helper.make_node("Div", [x32, f"r{i}"], [f"d{i}"])])
        d = f"d{i}"
        if f16:
            nodes.append(helper.make_node("Cast", [d], [f"d16_{i}"], to=dtype))
            d = f"d16_{i}"
        nodes.append(helper.make_node("Mul", [w, d] if weight_first else [d, w], [f"y{i}"]))
        return f"y{i}"

    nodes.append(helper.make_node("Add", ["a", "b"], ["s1"]))
    y1 = norm("s1", 1)
    nodes.append(helper.make_node("Add", ["s1", y1], ["s2"]))
    y2 = norm("s2", 2)
    outs = [helper.make_tensor_value_info(y2, dtype, ["B", "S", H])]
    if sum_is_output:
        outs.append(helper.make_tensor_value_info("s2", dtype, ["B", "S", H]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(x, dtype, ["B", "S", H]) for x in "ab"], outs,
                          inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.mark.parametrize("dtype,tol", [(TensorProto.FLOAT, 1e-5), (TensorProto.FLOAT16, 4e-3)],
                         ids=["float32", "float16"])
@pytest.mark.parametrize("sum_is_output", [False, True], ids=["sum-internal", "sum-output"])
@pytest.mark.parametrize("weight_first", [True, False], ids=["w*x", "x*w"])
def test_fused_graph_matches_unfused(dtype, tol, sum_is_output, weight_first, rng):
    plain = _model(dtype, sum_is_output=sum_is_output, weight_first=weight_first)
    fused = _model(dtype, sum_is_output=sum_is_output, weight_first=weight_first)
    assert fuse_skip_rms_norm(fused) == 2
    onnx.checker.check_model(fused)
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count(SKIP_RMS_NORM) == 2 and not {"Pow", "Sqrt", "ReduceMean", "Add"} & set(ops)
    npt = np.float32 if dtype == TensorProto.FLOAT else np.float16
    feeds = {x: rng.standard_normal((2, 3, H)).astype(npt) for x in "ab"}
    want, got = _run(plain, feeds), _run(fused, feeds)
    assert [o.name for o in fused.graph.output] == [o.name for o in plain.graph.output]
    for w, g in zip(want, got):  # the norm's output, and the residual sum where it is an output
        w64, g64 = w.astype(np.float64), g.astype(np.float64)
        assert float(np.abs(g64 - w64).max() / np.abs(w64).max()) < tol


@pytest.mark.parametrize("change", ["exponent", "reduce-axis", "extra-use"])
def test_graphs_that_do_not_match_are_left_alone(change):
    model = _model(TensorProto.FLOAT, exponent=3.0 if change == "exponent" else 2.0)
    if change == "reduce-axis":
        model.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.array([1], np.int64), "axes"))
    if change == "extra-use":  # the mean of squares is used elsewhere: both norms' internals are
        for i in (1, 2):       # needed, so nothing is removed
            model.graph.node.append(helper.make_node("Identity", [f"m{i}"], [f"m{i}_out"]))
            model.graph.output.append(helper.make_tensor_value_info(f"m{i}_out", TensorProto.FLOAT, ["B", "S", 1]))
    before = [n.op_type for n in model.graph.node]
    assert fuse_skip_rms_norm(model) == 0
    assert [n.op_type for n in model.graph.node] == before


def _matmul_model(dtype: int, rng) -> onnx.ModelProto:
    """x [B, S, 32] times five weights: three [32, n] (q/k/v-like, fused), one [32, 8] also read by an
    Identity (left alone), one [16, 8] on another input; a second group on y = x * 2 (gate/up-like) whose
    first output is also a graph output."""
    npt = np.float16 if dtype == TensorProto.FLOAT16 else np.float32

    def w(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(npt), name)

    inits = [w("wq", 32, 24), w("wk", 32, 16), w("wv", 32, 8), w("wshared", 32, 8), w("wz", 16, 8),
             w("wg", 32, 40), w("wu", 32, 40), numpy_helper.from_array(np.array(2, npt), "two")]
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"]), helper.make_node("MatMul", ["x", "wk"], ["k"]),
             helper.make_node("MatMul", ["x", "wshared"], ["sh"]), helper.make_node("Identity", ["wshared"], ["wid"]),
             helper.make_node("MatMul", ["x", "wv"], ["v"]), helper.make_node("MatMul", ["z", "wz"], ["zz"]),
             helper.make_node("Mul", ["x", "two"], ["y"]), helper.make_node("MatMul", ["y", "wg"], ["g"]),
             helper.make_node("MatMul", ["y", "wu"], ["u"]), helper.make_node("Mul", ["g", "u"], ["gu"]),
             helper.make_node("Add", ["q", "q"], ["q2"])]
    shapes = {"q2": ["B", "S", 24], "k": ["B", "S", 16], "v": ["B", "S", 8], "sh": ["B", "S", 8], "wid": [32, 8],
              "zz": ["B", 8], "gu": ["B", "S", 40], "g": ["B", "S", 40]}
    outs = [helper.make_tensor_value_info(n, dtype, shape) for n, shape in shapes.items()]
    ins = [helper.make_tensor_value_info("x", dtype, ["B", "S", 32]), helper.make_tensor_value_info("z", dtype,
                                                                                                    ["B", 16])]
    g = helper.make_graph(nodes, "g", ins, outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


@pytest.mark.parametrize("dtype,tol", [(TensorProto.FLOAT, 1e-5), (TensorProto.FLOAT16, 2e-3)],
                         ids=["float32", "float16"])
def test_shared_input_matmuls_fused(dtype, tol):
    rng = np.random.default_rng(11)
    plain = _matmul_model(dtype, rng)
    fused = onnx.ModelProto()
    fused.CopyFrom(plain)
    assert fuse_shared_input_matmuls(fused) == 2  # {q, k, v} on x, {g, u} on y
    onnx.checker.check_model(fused)
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("MatMul") == 4 and ops.count("Split") == 2  # fused x2, wshared's, wz's
    names = {t.name for t in fused.graph.initializer}
    assert {"wshared", "wz"} <= names and not {"wq", "wk", "wv", "wg", "wu"} & names
    npt = np.float16 if dtype == TensorProto.FLOAT16 else np.float32
    feeds = {"x": rng.standard_normal((2, 5, 32)).astype(npt), "z": rng.standard_normal((2, 16)).astype(npt)}
    want, got = _run(plain, feeds), _run(fused, feeds)
    for o, w, g in zip(plain.graph.output, want, got):
        w64, g64 = w.astype(np.float64), g.astype(np.float64)
        assert w.shape == g.shape and float(np.abs(g64 - w64).max() / np.abs(w64).max()) < tol, o.name
    assert fuse_shared_input_matmuls(fused) == 0  # nothing left to fuse


def test_matmuls_of_other_dtypes_or_dynamic_weights_are_not_fused():
    """Weights of different dtypes stay apart; a weight computed in the graph (e.g. sliced to an active
    rank) is not a constant and is never fused."""
    f16 = numpy_helper.from_array(np.ones((8, 4), np.float16), "a")
    f32 = numpy_helper.from_array(np.ones((8, 4), np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "a"], ["ya"]), helper.make_node("Cast", ["x"], ["x32"], to=1),
             helper.make_node("MatMul", ["x32", "b"], ["yb"]), helper.make_node("Identity", ["a"], ["a2"]),
             helper.make_node("MatMul", ["x", "a2"], ["yc"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 8])],
                          [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None) for n in ("ya", "yb", "yc")],
                          [f16, f32])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    before = [n.op_type for n in model.graph.node]
    assert fuse_shared_input_matmuls(model) == 0
    assert [n.op_type for n in model.graph.node] == before


def test_fused_weights_keep_their_element_type():
    """bfloat16 weights (no numpy type of their own) are concatenated bit for bit and stay bfloat16."""
    rng = np.random.default_rng(3)
    bits = [rng.integers(0, 2**16, size=(8, n), dtype=np.uint16) for n in (4, 6)]
    inits = [helper.make_tensor(f"w{i}", TensorProto.BFLOAT16, list(b.shape), b.tobytes(), raw=True)
             for i, b in enumerate(bits)]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(2)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2, 8])],
                          [helper.make_tensor_value_info(f"y{i}", TensorProto.BFLOAT16, [2, b.shape[1]])
                           for i, b in enumerate(bits)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    assert fuse_shared_input_matmuls(model) == 1
    onnx.checker.check_model(model)
    (w,) = [t for t in model.graph.initializer if t.data_type != TensorProto.INT64]
    assert w.data_type == TensorProto.BFLOAT16 and list(w.dims) == [8, 10]
    got = np.frombuffer(w.raw_data, np.uint16).reshape(8, 10)
    assert np.array_equal(got, np.concatenate(bits, axis=1))
