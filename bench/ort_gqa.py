"""ONNX Runtime's GroupQueryAttention (``com.microsoft``) as a decode baseline.

:func:`build` makes a one-node model: one new token per sequence attends over a BNSH key /
value cache of ``max_len`` positions that is both the node's past and present (the buffer
ONNX Runtime shares in place when both are bound to the same memory). RoPE is not part of
the node (``do_rotary=0``), as in the SDPA baseline. :func:`session_step` binds the inputs
and caches (IO binding) and returns a callable that runs one decode step, so a benchmark
times the attention alone. ``tests/test_ort_gqa.py`` checks the node against a float64
reference on ONNX Runtime's CPU provider; ``bench/gpu_kernels.py`` times it on CUDA.
"""

from __future__ import annotations

import numpy as np


def build(batch: int, num_heads: int, kv_heads: int, head_dim: int, max_len: int, dtype: str = "float16") -> bytes:
    """The serialized model (inputs ``query key value past_key past_value seqlens_k total_sequence_length``)."""
    from onnx import TensorProto, helper

    et = {"float16": TensorProto.FLOAT16, "float32": TensorProto.FLOAT}[dtype]
    B, H, K, D = batch, num_heads, kv_heads, head_dim
    inputs = [helper.make_tensor_value_info("query", et, [B, 1, H * D]),
              helper.make_tensor_value_info("key", et, [B, 1, K * D]),
              helper.make_tensor_value_info("value", et, [B, 1, K * D]),
              helper.make_tensor_value_info("past_key", et, [B, K, max_len, D]),
              helper.make_tensor_value_info("past_value", et, [B, K, max_len, D]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [B]),
              helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    outputs = [helper.make_tensor_value_info("output", et, [B, 1, H * D]),
               helper.make_tensor_value_info("present_key", et, [B, K, max_len, D]),
               helper.make_tensor_value_info("present_value", et, [B, K, max_len, D])]
    node = helper.make_node("GroupQueryAttention", [i.name for i in inputs], [o.name for o in outputs],
                            domain="com.microsoft", num_heads=H, kv_num_heads=K, scale=float(D) ** -0.5)
    graph = helper.make_graph([node], "gqa_decode", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10  # ONNX Runtime reads IR <= 13; onnx may write newer by default
    return model.SerializeToString()


def session_step(sess, q, k, v, past_k, past_v, seqlens, total, device: str = "cpu"):
    """Bind one decode step's inputs (numpy arrays, or torch tensors on ``device``) to ``sess``.

    ``past_k`` / ``past_v`` are bound as inputs and as the present outputs (the same memory),
    so the new token is written into them in place. Returns ``(run, output)``: ``run()``
    executes the bound step and ``output`` holds its result (a numpy array on the CPU, a
    torch tensor on CUDA).
    """
    import onnxruntime as ort

    io = sess.io_binding()
    if device == "cpu":
        vals = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in
                (("query", q), ("key", k), ("value", v), ("past_key", past_k), ("past_value", past_v),
                 ("seqlens_k", seqlens), ("total_sequence_length", total))}
        for n, val in vals.items():
            io.bind_ortvalue_input(n, val)
        io.bind_ortvalue_output("present_key", vals["past_key"])
        io.bind_ortvalue_output("present_value", vals["past_value"])
        out = np.empty_like(q)
        out_val = ort.OrtValue.ortvalue_from_numpy(out)
        io.bind_ortvalue_output("output", out_val)
        result = out
    else:
        import torch

        np_type = {torch.float16: np.float16, torch.float32: np.float32, torch.int32: np.int32}

        def bind(name, t, output=False):
            args = (name, "cuda", 0, np_type[t.dtype], list(t.shape), t.data_ptr())
            (io.bind_output if output else io.bind_input)(*args)

        for n, t in (("query", q), ("key", k), ("value", v), ("past_key", past_k), ("past_value", past_v)):
            bind(n, t)
        # the lengths are host inputs of the CUDA kernel
        io.bind_cpu_input("seqlens_k", seqlens)
        io.bind_cpu_input("total_sequence_length", total)
        bind("present_key", past_k, True)
        bind("present_value", past_v, True)
        result = torch.empty_like(q)
        bind("output", result, True)

    def run():
        sess.run_with_iobinding(io)

    return run, result
