"""The GroupQueryAttention baseline of bench/gpu_kernels.py: its one-node decode model, run by
ONNX Runtime's CPU provider with the caches bound in place, against a float64 reference."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import ort_gqa  # noqa: E402


@pytest.mark.parametrize("H,K", [(4, 2), (4, 4)], ids=["gqa", "mha"])
def test_gqa_decode_matches_reference(H, K):
    B, D, P = 2, 32, 40
    lens = np.array([17, 33])  # tokens in the cache after this step, per row
    rng = np.random.default_rng()
    q, k, v = (rng.standard_normal((B, 1, n * D)).astype(np.float32) for n in (H, K, K))
    past_k = rng.standard_normal((B, K, P, D)).astype(np.float32)
    past_v = rng.standard_normal((B, K, P, D)).astype(np.float32)
    ref_k, ref_v = past_k.astype(np.float64), past_v.astype(np.float64)
    sess = ort.InferenceSession(ort_gqa.build(B, H, K, D, P, "float32"), providers=["CPUExecutionProvider"])
    run, out = ort_gqa.session_step(sess, q, k, v, past_k, past_v, (lens - 1).astype(np.int32),
                                    np.array(lens.max(), dtype=np.int32))
    run()
    for b in range(B):
        n = int(lens[b])
        ref_k[b, :, n - 1] = k[b, 0].reshape(K, D)
        ref_v[b, :, n - 1] = v[b, 0].reshape(K, D)
        # the new token was written in place at position len - 1
        assert np.array_equal(past_k[b, :, n - 1], k[b, 0].reshape(K, D))
        qb = torch.from_numpy(q[b, 0].astype(np.float64)).view(H, 1, D)
        kb = torch.from_numpy(ref_k[b, :, :n]).repeat_interleave(H // K, 0)
        vb = torch.from_numpy(ref_v[b, :, :n]).repeat_interleave(H // K, 0)
        ref = torch.softmax(qb @ kb.transpose(1, 2) / D ** 0.5, -1) @ vb
        err = np.abs(out[b, 0] - ref.reshape(-1).numpy()).max() / np.abs(ref.numpy()).max()
        assert err < 1e-5, err  # float32 attention over <= 33 positions
