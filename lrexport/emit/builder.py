"""A small builder for ONNX node lists (function bodies made of standard ops).

    b = Builder("attn")
    y = b.op("MatMul", x, w)
    two = b.const([2])              # int64 constant
    fn = b.function("lrexport", "MyOp", inputs=["x", "w"], outputs=[y], attributes=[...])
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Builder:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self._n = 0

    def _name(self, hint: str) -> str:
        self._n += 1
        return f"{self.prefix}_{hint}_{self._n}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, domain: str = "", **attrs):
        """Append a node; returns its output name (or a list when ``outputs > 1``)."""
        outs = [self._name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, domain=domain, **attrs))
        return outs[0] if outputs == 1 else outs

    def const(self, values, dtype=np.int64) -> str:
        arr = np.asarray(values, dtype=dtype)
        out = self._name("const")
        self.nodes.append(helper.make_node("Constant", [], [out], value=numpy_helper.from_array(arr, out)))
        return out

    def const_like(self, value: float, like: str) -> str:
        """A scalar of ``like``'s element type (float, float16...)."""
        return self.op("CastLike", self.const(value, np.float32), like)

    # -- shapes -------------------------------------------------------------
    def dim(self, x: str, axis: int) -> str:
        """``x.shape[axis]`` as a 1-element int64 tensor."""
        return self.op("Shape", x, start=axis, end=axis + 1)

    def reshape(self, x: str, *parts) -> str:
        """Reshape to the concatenation of ``parts``: ints or 1-element int64 tensor names."""
        pieces = [self.const([p]) if isinstance(p, int) else p for p in parts]
        return self.op("Reshape", x, self.op("Concat", *pieces, axis=0))

    def transpose(self, x: str, perm: Sequence[int]) -> str:
        return self.op("Transpose", x, perm=list(perm))

    def slice_last(self, x: str, start: int, end: int) -> str:
        return self.op("Slice", x, self.const([start]), self.const([end]), self.const([-1]))

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        return self.op("Unsqueeze", x, self.const(list(axes)))

    def function(self, domain: str, name: str, inputs: Sequence[str], outputs: Sequence[str],
                 attributes: Sequence[str] = (), opset: int = 20, doc: str = "") -> onnx.FunctionProto:
        fn = helper.make_function(domain, name, list(inputs), list(outputs), self.nodes,
                                  [helper.make_opsetid("", opset)], list(attributes))
        fn.doc_string = doc
        return fn


FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
