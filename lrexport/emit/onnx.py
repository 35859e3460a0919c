"""Emit a compressed (or plain) traced graph as an ONNX model.

The transformed graph is re-exported and written with ``torch.onnx.export(dynamo=True)``;
lrexport's attention ops are translated to nodes of its own op domain:

* ``lrexport::attention`` -> ``lrexport.DenseAttention``, whose standard-op body is then
  inlined (the uncompressed baseline needs no custom op);
* ``lrexport::latent_attention[_quant]`` -> ``lrexport.LowRankKVAttention``, which keeps a
  model-local function body of standard ops as a fallback: ONNX Runtime without the
  custom-op library runs the body, with the library it runs the kernel.

Inputs: ``input_ids [B, S]``, ``past_len [B]``, the caches ``past_* [B, P, w]`` and, with a
progressive schedule, ``ranks [n]``. Outputs: ``logits`` and ``present_*`` for every cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import onnx
import onnx.inliner
import onnxscript
import torch
from onnx.defs import OpSchema

from lrexport.emit.functions import (
    DENSE_OP,
    DOMAIN,
    LOWRANK_INPUTS,
    LOWRANK_OP,
    LOWRANK_OP_DEVICE_LEN,
    LOWRANK_OUTPUTS,
    AttnShape,
    dense_attention_function,
    lowrank_attention_function,
)
from lrexport.emit.fusions import fuse_shared_input_matmuls, fuse_skip_rms_norm
from lrexport.errors import PassError
from lrexport.passes.base import PassResult
from lrexport.trace.export import TracedGraph

log = logging.getLogger(__name__)

IR_VERSION = 10  # ONNX Runtime 1.20+ reads it
OPSET = 20
_T = "T"


def _schema(name: str, inputs: list[tuple[str, str, bool]], outputs: list[tuple[str, str, bool]],
            attrs: dict[str, OpSchema.AttrType]) -> OpSchema:
    F = OpSchema.FormalParameter
    opt, single = OpSchema.FormalParameterOption.Optional, OpSchema.FormalParameterOption.Single

    def params(spec):
        return [F(n, t, param_option=opt if o else single) for n, t, o in spec]

    return OpSchema(name, DOMAIN, 1, inputs=params(inputs), outputs=params(outputs),
                    type_constraints=[(_T, ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float types"),
                                      ("C", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)",
                                             "tensor(uint8)"], "cache types"),
                                      ("Q", ["tensor(float16)"], "quantization params")],
                    attributes=[OpSchema.Attribute(a, t) for a, t in attrs.items()])


_INT, _FLOAT = OpSchema.AttrType.INT, OpSchema.AttrType.FLOAT
DENSE_SCHEMA = _schema(
    DENSE_OP,
    [("query", _T, False), ("key", _T, False), ("value", _T, False), ("past_key", _T, False),
     ("past_value", _T, False), ("past_len", "tensor(int64)", False), ("cos", _T, False), ("sin", _T, False)],
    [("output", _T, False), ("present_key", _T, False), ("present_value", _T, False)],
    {"num_heads": _INT, "num_kv_heads": _INT, "window": _INT, "scale": _FLOAT})
_OPTIONAL_IN = {"past_k_params", "past_v_params", "k_bias", "v_up"}
_TYPES_IN = {"past_k": "C", "past_v": "C", "past_k_params": "Q", "past_v_params": "Q", "past_len": "tensor(int64)"}
LOWRANK_SCHEMA = _schema(
    LOWRANK_OP, [(n, _TYPES_IN.get(n, _T), n in _OPTIONAL_IN) for n in LOWRANK_INPUTS],
    [(n, {"present_k": "C", "present_v": "C"}.get(n, "Q" if "params" in n else _T), "params" in n)
     for n in LOWRANK_OUTPUTS],
    {"num_heads": _INT, "num_kv_heads": _INT, "group_size": _INT, "window": _INT, "scale": _FLOAT, "bits": _INT,
     "quant_group": _INT})

_OPSET = onnxscript.values.Opset(DOMAIN, 1)
_DENSE = onnxscript.values.Op(_OPSET, DENSE_OP, DENSE_SCHEMA)
_LOWRANK = onnxscript.values.Op(_OPSET, LOWRANK_OP, LOWRANK_SCHEMA)


def _dense(q, k, v, kc, vc, past_len, cos, sin, num_heads: int, num_kv_heads: int, window: int, scale: float):
    return _DENSE(q, k, v, kc, vc, past_len, cos, sin, num_heads=num_heads, num_kv_heads=num_kv_heads,
                  window=window, scale=scale)


def _lowrank_float(q, lk, lv, ck, cv, past_len, k_up, k_bias, v_up, cos, sin, num_heads: int, num_kv_heads: int,
                   group_size: int, window: int, scale: float):
    out, pk, _, pv, _ = _LOWRANK(q, lk, lv, ck, None, cv, None, past_len, k_up, k_bias, v_up, cos, sin,
                                 num_heads=num_heads, num_kv_heads=num_kv_heads, group_size=group_size,
                                 window=window, scale=scale, bits=0, quant_group=0)
    return out, pk, pv


def _lowrank_quant(q, lk, lv, ck, ckp, cv, cvp, past_len, k_up, k_bias, v_up, cos, sin, num_heads: int,
                   num_kv_heads: int, group_size: int, window: int, scale: float, bits: int, quant_group: int):
    return _LOWRANK(q, lk, lv, ck, ckp, cv, cvp, past_len, k_up, k_bias, v_up, cos, sin, num_heads=num_heads,
                    num_kv_heads=num_kv_heads, group_size=group_size, window=window, scale=scale, bits=bits,
                    quant_group=quant_group)


def _translations() -> dict:
    """lrexport's ops -> their ONNX nodes (the torch.onnx custom translation table)."""
    import lrexport.trace.latent_attention_op  # noqa: F401  (registers the latent ops)

    return {torch.ops.lrexport.attention.default: _dense,
            torch.ops.lrexport.latent_attention.default: _lowrank_float,
            torch.ops.lrexport.latent_attention_quant.default: _lowrank_quant}


@dataclass
class EmitResult:
    model: onnx.ModelProto
    input_names: list[str]
    output_names: list[str]
    passes: list[PassResult] = field(default_factory=list)


def io_names(tg: TracedGraph) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "past_len", *tg.cache.names] + (["ranks"] if tg.has_rank_input else [])
    outputs = ["logits", *("present_" + n.removeprefix("past_") for n in tg.cache.names)]
    return inputs, outputs


def _rename_inputs(tg: TracedGraph, names: list[str]) -> None:
    phs = [n for n in tg.gm.graph.nodes if n.op == "placeholder"]
    if len(phs) != len(names):
        raise PassError(f"the graph has {len(phs)} inputs, expected {len(names)} ({', '.join(names)})")
    for node, name in zip(phs, names):
        node.name = node.target = name
    tg.gm.recompile()


def attention_shape(node: onnx.NodeProto, head_dim: int) -> AttnShape:
    a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
    has = {i: len(node.input) > i and node.input[i] != "" for i in (9, 10)}
    return AttnShape(num_heads=a["num_heads"], num_kv_heads=a["num_kv_heads"], head_dim=head_dim,
                     window=a["window"], scale=a["scale"], group_size=a.get("group_size", 1), bits=a.get("bits", 0),
                     quant_group=a.get("quant_group", 32), has_k_bias=has[9] and node.op_type == LOWRANK_OP,
                     has_v_up=has[10] if node.op_type == LOWRANK_OP else True)


def _lowrank_nodes(model: onnx.ModelProto, head_dim: int) -> tuple[AttnShape | None, PassResult]:
    """Drop unused optional outputs of the LowRankKVAttention nodes and read their shared structure."""
    res = PassResult("lowrank_kv_attention")
    consumed = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    shapes = set()
    for node in model.graph.node:
        if node.domain != DOMAIN or node.op_type != LOWRANK_OP:
            continue
        for i in (2, 4):  # float caches have no params: leave those optional outputs empty
            if i < len(node.output) and node.output[i] not in consumed:
                node.output[i] = ""
        shapes.add(attention_shape(node, head_dim))
        res.changed += 1
    if not shapes:
        res.unmatched = "no latent-KV attention in the graph (the model has no Palu KV pass)"
        return None, res
    if len(shapes) > 1:
        raise PassError(f"the LowRankKVAttention nodes of one model must share one structure, got {len(shapes)}")
    return shapes.pop(), res


def _inline(model: onnx.ModelProto, functions: list[tuple[str, str]]) -> onnx.ModelProto:
    """``onnx.inliner`` over the graph without its weights: the inliner takes the model serialized,
    and protobuf cannot serialize more than 2 GB (a 7B model's weights); it does not touch them."""
    aside = {}
    for t in model.graph.initializer:
        if len(t.raw_data) > 1024:
            aside[t.name] = t.raw_data
            t.ClearField("raw_data")
    try:
        out = onnx.inliner.inline_selected_functions(model, functions)
    except Exception:
        out = model  # leave the caller's model whole
        raise
    finally:
        for t in out.graph.initializer:
            if t.name in aside:
                t.raw_data = aside[t.name]
    return out


def emit(tg: TracedGraph, *, fuse_norms: bool = True, fuse_matmuls: bool | None = None,
         device_lengths: bool = False) -> EmitResult:
    """Translate ``tg`` to an ONNX ModelProto in memory (:mod:`lrexport.export` writes it).

    ``fuse_norms``: residual ``Add`` + RMSNorm as ONNX Runtime's ``SkipSimplifiedLayerNormalization``
    (:mod:`lrexport.emit.fusions`); False keeps standard ops only (besides the lrexport domain).
    ``fuse_matmuls``: the ``MatMul`` nodes that read the same input with constant weights as one
    ``MatMul`` and a ``Split`` (standard ops); None: when the weights are float16 (a GPU model: fewer,
    larger GEMMs), not for float32 ones (slower on ONNX Runtime's CPU provider, see docs/design.md).
    ``device_lengths``: the latent-KV attention as ``LowRankKVAttentionDeviceLen``, whose CUDA kernel
    reads ``past_len`` in device memory, so that ONNX Runtime can capture decode steps as CUDA graphs
    (the same semantics; see docs/custom_op.md)."""
    inputs, outputs = io_names(tg)
    _rename_inputs(tg, inputs)
    # torch.onnx notes at WARNING level every torchvision op it cannot register: not ours to hear
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    ep = tg.reexport()
    prog = torch.onnx.export(ep, (), dynamo=True, custom_translation_table=_translations(), output_names=outputs,
                             optimize=True, verbose=False)
    model = prog.model_proto
    results = []
    dense = [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == DENSE_OP]
    if dense:
        model.functions.append(dense_attention_function(attention_shape(dense[0], tg.spec.head_dim), OPSET))
        model = _inline(model, [(DOMAIN, DENSE_OP)])
        results.append(PassResult("dense_attention_inline", changed=len(dense)))
    sh, res = _lowrank_nodes(model, tg.spec.head_dim)
    results.append(res)
    if fuse_norms:
        n = fuse_skip_rms_norm(model)
        results.append(PassResult("skip_rms_norm", changed=n,
                                  unmatched=None if n else "no residual Add followed by an RMSNorm"))
    if fuse_matmuls is None:
        fuse_matmuls = any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    if fuse_matmuls:
        n = fuse_shared_input_matmuls(model)
        results.append(PassResult("shared_input_matmuls", changed=n,
                                  unmatched=None if n else "no two MatMuls read one input with constant weights"))
    if sh is not None:
        fn = lowrank_attention_function(sh, OPSET)
        if device_lengths:
            n = 0
            for node in model.graph.node:
                if node.domain == DOMAIN and node.op_type == LOWRANK_OP:
                    node.op_type = LOWRANK_OP_DEVICE_LEN
                    n += 1
            fn.name = LOWRANK_OP_DEVICE_LEN  # the fallback body, under the nodes' name
            results.append(PassResult("device_lengths", changed=n))
        model.functions.append(fn)
    elif device_lengths:
        raise PassError("device_lengths: the model has no latent-KV attention (it needs a Palu KV pass)")
    model.ir_version = IR_VERSION
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    return EmitResult(model=model, input_names=inputs, output_names=outputs, passes=[r.log() for r in results])
