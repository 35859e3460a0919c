"""Fusions over the emitted ONNX graph: fewer, larger kernels for ONNX Runtime.

``fuse_skip_rms_norm``: a residual ``Add`` followed by an RMSNorm becomes one
``com.microsoft.SkipSimplifiedLayerNormalization`` (ONNX Runtime's contrib op, on the CPU and
CUDA execution providers), whose fourth output is the residual sum for the next block. ONNX
Runtime fuses a lone RMSNorm into ``SimplifiedLayerNormalization`` by itself, but not the
residual ``Add`` in front of it: on a GPU that ``Add`` is one more kernel launch per norm.

The RMSNorm is matched as :class:`lrexport.models.llama.RMSNorm` traces::

    s = Add(a, b)
    x = Cast(s, to=FLOAT)            # float16 / bfloat16 models only
    y = Mul(w, Cast(Div(x, Sqrt(Add(ReduceMean(Pow(x, 2), axes=[-1]), eps))), to=s's type))

with ``w`` a ``[hidden]`` initializer (either side of the ``Mul``). The fused op computes in
float32 and rounds once, where the pattern rounds after the division and again after the
``Mul``: the results differ by float16 rounding at most.

``fuse_shared_input_matmuls``: ``MatMul`` nodes that multiply the same tensor by constant
weights (the first factors of ``q_proj`` and of the latent key / value projections, which all
read the normed hidden state; ``gate_proj`` / ``up_proj``; dense q/k/v) become one ``MatMul``
by the concatenated weights and a ``Split`` of its columns. On a GPU that is one GEMM launch
instead of two or three (ONNX Runtime's host time per ``MatMul`` node sets the pace of a
small-batch decode step), and a wider one. Each output column is the same dot product as
before; the GEMM may order its sums differently, so results agree to rounding.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"
SKIP_RMS_NORM = "SkipSimplifiedLayerNormalization"


class _Graph:
    """Producer / consumer maps and constant values of a graph's tensors."""

    def __init__(self, graph: onnx.GraphProto):
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in graph.node:
            for i in n.input:
                self.consumers[i].append(n)
        self.inits = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        n = self.producer.get(name)
        if n is not None and n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            return numpy_helper.to_array(n.attribute[0].t)
        return None

    def only_use(self, name: str, op_type: str) -> onnx.NodeProto | None:
        """The single consumer of ``name`` when it has that type (and ``name`` is no graph output)."""
        users = self.consumers.get(name, [])
        if len(users) != 1 or users[0].op_type != op_type or users[0].domain or name in self.outputs:
            return None
        return users[0]


def _scalar(value: np.ndarray | None, want: float | None = None) -> float | None:
    if value is None or value.size != 1:
        return None
    v = float(value.reshape(-1)[0])
    return v if want is None or v == want else None


def _match(g: _Graph, add: onnx.NodeProto) -> tuple[list[onnx.NodeProto], str, str, float] | None:
    """(the norm's nodes, its output, the weight, epsilon) of an RMSNorm reading ``add``'s sum."""
    s = add.output[0]
    users = g.consumers.get(s, [])
    casts = [u for u in users if u.op_type == "Cast" and not u.domain]
    nodes: list[onnx.NodeProto] = []
    x = s
    if len(casts) == 1:  # float16 / bfloat16: the norm runs in float32
        to = helper.get_attribute_value(casts[0].attribute[0]) if casts[0].attribute else None
        if to != onnx.TensorProto.FLOAT:
            return None
        nodes.append(casts[0])
        x = casts[0].output[0]
    x_users = g.consumers.get(x, [])
    pows = [u for u in x_users if u.op_type == "Pow" and not u.domain]
    divs = [u for u in x_users if u.op_type == "Div" and not u.domain and u.input[0] == x]
    if len(pows) != 1 or len(divs) != 1 or (x != s and len(x_users) != 2):
        return None
    pw, div = pows[0], divs[0]
    if _scalar(g.const(pw.input[1]), 2.0) is None:
        return None
    mean = g.only_use(pw.output[0], "ReduceMean")
    if mean is None:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in mean.attribute}
    axes = list(attrs.get("axes", [])) if len(mean.input) < 2 else g.const(mean.input[1])
    if axes is None or list(np.asarray(axes).reshape(-1)) != [-1] or attrs.get("keepdims", 1) != 1:
        return None
    add_eps = g.only_use(mean.output[0], "Add")
    if add_eps is None:
        return None
    eps_name = add_eps.input[1] if add_eps.input[0] == mean.output[0] else add_eps.input[0]
    eps = _scalar(g.const(eps_name))
    sqrt = g.only_use(add_eps.output[0], "Sqrt")
    if eps is None or sqrt is None or div.input[1] != sqrt.output[0] or len(g.consumers[sqrt.output[0]]) != 1:
        return None
    y = div.output[0]
    nodes += [pw, mean, add_eps, sqrt, div]
    if x != s:  # back to the model's dtype
        back = g.only_use(y, "Cast")
        if back is None:
            return None
        nodes.append(back)
        y = back.output[0]
    mul = g.only_use(y, "Mul")
    if mul is None:
        return None
    w = mul.input[0] if mul.input[1] == y else mul.input[1]
    wv = g.inits.get(w)
    if wv is None or len(wv.dims) != 1:
        return None
    nodes.append(mul)
    return nodes, mul.output[0], w, eps


def fuse_skip_rms_norm(model: onnx.ModelProto) -> int:
    """Fuse each residual ``Add`` + RMSNorm of ``model``'s main graph (in place); returns how many."""
    g = _Graph(model.graph)
    drop: set[int] = set()
    replace: dict[int, onnx.NodeProto] = {}
    rename: dict[str, str] = {}
    n_fused = 0
    for add in model.graph.node:
        if add.op_type != "Add" or add.domain or len(add.input) != 2:
            continue
        m = _match(g, add)
        if m is None:
            continue
        nodes, out, w, eps = m
        s = add.output[0]
        fused = helper.make_node(SKIP_RMS_NORM, [add.input[0], add.input[1], w], [out, "", "", s + "_sum"],
                                 name=f"skip_rms_norm_{n_fused}", domain=MS_DOMAIN, epsilon=eps)
        replace[id(add)] = fused
        drop.update(id(n) for n in nodes)
        rename[s] = s + "_sum"
        n_fused += 1
    if not n_fused:
        return 0
    kept, gone = [], set(rename)
    for n in model.graph.node:
        if id(n) in drop:
            gone.update(n.output)
            continue
        n = replace.get(id(n), n)
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
        kept.append(n)
    vi = [v for v in model.graph.value_info if v.name not in gone]
    del model.graph.value_info[:]
    model.graph.value_info.extend(vi)
    for o in model.graph.output:
        if o.name in rename:  # a residual sum that is a graph output keeps its name
            kept.append(helper.make_node("Identity", [rename[o.name]], [o.name]))
    del model.graph.node[:]
    model.graph.node.extend(kept)
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return n_fused


def fuse_shared_input_matmuls(model: onnx.ModelProto) -> int:
    """Fuse the ``MatMul`` nodes of ``model``'s main graph that share their first input and have 2-D
    initializer weights of one dtype and row count (in place); returns how many groups were fused.

    A weight also read by another node stays as it is (that ``MatMul`` is left out of its group).
    """
    g = _Graph(model.graph)
    groups: dict[tuple, list[onnx.NodeProto]] = defaultdict(list)  # (input, weight dtype, weight rows)
    for n in model.graph.node:
        if n.op_type != "MatMul" or n.domain or len(n.input) != 2:
            continue
        w = g.inits.get(n.input[1])
        if w is None or len(w.dims) != 2 or len(g.consumers[w.name]) != 1 or w.name in g.outputs:
            continue
        groups[(n.input[0], w.data_type, w.dims[0])].append(n)
    taken = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}

    def fresh(base: str) -> str:
        name, i = base, 0
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        taken.add(name)
        return name

    first_of: dict[int, list[onnx.NodeProto]] = {}
    drop: set[int] = set()
    dropped_inits: set[str] = set()
    new_inits: list[onnx.TensorProto] = []
    n_fused = 0
    for (x, kind, rows_k), members in groups.items():
        if len(members) < 2:
            continue
        weights = [numpy_helper.to_array(g.inits[n.input[1]]) for n in members]
        w_name = fresh(f"{members[0].input[1]}_cat")
        sizes = fresh(f"{w_name}_split")
        y = fresh(f"{members[0].output[0]}_cat")
        # rows of bytes side by side: any element type (bfloat16 too) keeps its bits and its type
        rows = np.concatenate([np.ascontiguousarray(a).view(np.uint8).reshape(rows_k, -1) for a in weights], 1)
        new_inits += [helper.make_tensor(w_name, kind, [rows_k, sum(a.shape[1] for a in weights)], rows.tobytes(),
                                         raw=True),
                      numpy_helper.from_array(np.array([a.shape[1] for a in weights], np.int64), sizes)]
        first_of[id(members[0])] = [
            helper.make_node("MatMul", [x, w_name], [y], name=fresh(f"matmul_cat_{n_fused}")),
            helper.make_node("Split", [y, sizes], [n.output[0] for n in members], axis=-1,
                             name=fresh(f"split_cat_{n_fused}"))]
        drop.update(id(n) for n in members)
        dropped_inits.update(n.input[1] for n in members)
        n_fused += 1
    if not n_fused:
        return 0
    kept = []
    for n in model.graph.node:  # the fused pair takes the first member's place: every output comes earlier
        kept.extend(first_of.get(id(n), []))
        if id(n) not in drop:
            kept.append(n)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    inits = [t for t in model.graph.initializer if t.name not in dropped_inits] + new_inits
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    return n_fused
