"""The GroupQueryAttention decoder of bench/gqa_model.py on ONNX Runtime's CPU provider: a prefill and
decode steps with the caches bound in place, against a float64 PyTorch Llama built from the model's own
weights; and its decode-speed worker."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gqa_model = _load("gqa_model")
CFG = _load("gpu_e2e").smoke_config(2, 64)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return gqa_model.build_gqa_model(CFG, "float32", tmp_path_factory.mktemp("gqa"), "cpu", seed=0)


def _rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def reference(weights: dict[str, torch.Tensor], ids: torch.Tensor):
    """Llama over all of ``ids`` ``[B, T]`` in float64: the logits ``[B, T, V]`` and each layer's
    keys (after RoPE) and values ``[B, kv_heads, T, head_dim]``."""
    H, K, D = CFG["num_attention_heads"], CFG["num_key_value_heads"], CFG["head_dim"]
    eps = CFG["rms_norm_eps"]
    B, T = ids.shape
    inv_freq = 1.0 / CFG["rope_theta"] ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None]
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    causal = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    x = weights["embed_tokens.weight"][ids]
    kv = []
    for i in range(CFG["num_hidden_layers"]):
        p = f"layers.{i}."
        h = _rms_norm(x, weights[p + "input_layernorm.weight"], eps)
        q, k, v = (h @ weights[p + "qkv_proj.weight"]).split([H * D, K * D, K * D], -1)
        q, k, v = (t.view(B, T, n, D).transpose(1, 2) for t, n in ((q, H), (k, K), (v, K)))
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        kv.append((k, v))
        k, v = k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / D ** 0.5 + causal, -1) @ v
        x = x + att.transpose(1, 2).reshape(B, T, H * D) @ weights[p + "o_proj.weight"]
        h = _rms_norm(x, weights[p + "post_attention_layernorm.weight"], eps)
        gate = h @ weights[p + "gate_proj.weight"]
        x = x + (torch.nn.functional.silu(gate) * (h @ weights[p + "up_proj.weight"])) @ weights[p + "down_proj.weight"]
    return _rms_norm(x, weights["norm.weight"], eps) @ weights["lm_head.weight"], kv


def _rel_err(out: np.ndarray, ref: torch.Tensor) -> float:
    return float(np.abs(out - ref.numpy()).max() / ref.abs().max())


def test_prefill_and_decode_match_reference(folder, rng):
    model = onnx.load(str(folder / "model.onnx"))  # with its external data
    weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).astype(np.float64)) for t in model.graph.initializer}
    B, S, steps, capacity = 2, 5, 3, 12
    ids = torch.from_numpy(rng.integers(0, CFG["vocab_size"], (B, S + steps)))
    ref, ref_kv = reference(weights, ids)

    gqa = gqa_model.GqaSession(folder, "cpu")
    caches = gqa.new_caches(B, capacity)
    bound = gqa.bind(caches)
    # a first prompt writes S tokens into the empty shared caches
    out = bound.step(ids[:, :S].numpy(), np.full(B, S - 1), S)
    assert _rel_err(out, ref[:, :S]) < 1e-4
    for t in range(S, S + steps):  # then one token per row, each step's keys and values written in place
        out = bound.step(ids[:, t:t + 1].numpy(), np.full(B, t), t + 1)
        assert _rel_err(out, ref[:, t:t + 1]) < 1e-4, t
    T = S + steps
    for i, (k, v) in enumerate(ref_kv):
        assert _rel_err(caches[2 * i][:, :, :T], k) < 1e-4
        assert _rel_err(caches[2 * i + 1][:, :, :T], v) < 1e-4
        assert not caches[2 * i][:, :, T:].any() and not caches[2 * i + 1][:, :, T:].any()


def test_worker_row(folder):
    (row,) = gqa_model.gqa_worker(str(folder), [16], [2], 2, "cpu")
    L, K, D = CFG["num_hidden_layers"], CFG["num_key_value_heads"], CFG["head_dim"]
    assert row["context"] == 16 and row["batch"] == 2 and row["finite"] is True
    assert row["kv_bytes"] == 2 * L * 2 * K * (16 + 2 + 4) * D * 4  # float32 caches of context + steps + 4
    assert row["step_ms"] > 0 and row["gpu_mem_bytes"] is None


def test_reused_when_complete(folder):
    stamp = (folder / "model.onnx.data").stat().st_mtime_ns
    assert gqa_model.build_gqa_model(CFG, "float32", folder.parent, "cpu", seed=0) == folder
    assert (folder / "model.onnx.data").stat().st_mtime_ns == stamp
