"""The compact model against transformers' own implementation (float64), and its cache semantics."""

from __future__ import annotations

import pytest
import torch

from lrexport.errors import CacheOverflowError, ShapeError, UnsupportedModelError
from lrexport.models.llama import build_model
from lrexport.models.spec import spec_from_hf_config
from tests.tiny import VOCAB, hf_model, zeros_len

TOL = 1e-6  # float64 vs transformers, which evaluates RoPE in float32


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_matches_transformers(kind):
    hf = hf_model(kind, seed=1)
    spec = spec_from_hf_config(hf.config)
    m = build_model(spec, hf.state_dict(), dtype=torch.float64, max_len=64)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))
    ref = hf(ids).logits
    out = m(ids, zeros_len(2), *m.empty_caches(2, 16))[0]
    assert torch.allclose(out, ref, atol=TOL, rtol=TOL), (out - ref).abs().max()


def test_incremental_decode_equals_full_forward():
    hf = hf_model("llama", seed=3)
    m = build_model(spec_from_hf_config(hf.config), hf.state_dict(), dtype=torch.float64, max_len=64)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    full = m(ids, zeros_len(2), *m.empty_caches(2, 12))[0]
    caches = m.empty_caches(2, 12)
    out = m(ids[:, :5], zeros_len(2), *caches)
    logits, caches = [out[0]], list(out[1:])
    for t in range(5, 9):
        out = m(ids[:, t:t + 1], torch.full((2,), t), *caches)
        logits.append(out[0])
        caches = list(out[1:])
    assert torch.allclose(torch.cat(logits, 1), full, atol=1e-10)


def test_rows_with_different_past_lengths():
    """Each row attends only to its own valid prefix; right padding never leaks."""
    hf = hf_model("llama", seed=5)
    m = build_model(spec_from_hf_config(hf.config), hf.state_dict(), dtype=torch.float64, max_len=64)
    a = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(6))
    b = torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(7))
    ref_a, ref_b = hf(a).logits, hf(b).logits
    ids = torch.zeros(2, 7, dtype=torch.int64)
    ids[0], ids[1, :4] = a[0], b[0]
    out = m(ids, zeros_len(2), *m.empty_caches(2, 10))
    assert torch.allclose(out[0][0], ref_a[0], atol=TOL)
    assert torch.allclose(out[0][1, :4], ref_b[0], atol=TOL)
    # decode one more token for each row at its own position
    nxt = torch.tensor([[3], [5]])
    step = m(nxt, torch.tensor([7, 4]), *out[1:])[0]
    assert torch.allclose(step[0, 0], hf(torch.cat([a, nxt[:1]], 1)).logits[0, -1], atol=TOL)
    assert torch.allclose(step[1, 0], hf(torch.cat([b, nxt[1:]], 1)).logits[0, -1], atol=TOL)


def test_cache_overflow_and_shape_errors():
    hf = hf_model("llama", seed=8)
    m = build_model(spec_from_hf_config(hf.config), hf.state_dict(), max_len=64)
    ids = torch.zeros(1, 6, dtype=torch.int64)
    with pytest.raises(CacheOverflowError, match="does not fit in a cache of 4"):
        m(ids, zeros_len(1), *m.empty_caches(1, 4))
    with pytest.raises(CacheOverflowError, match="RoPE table"):
        m(ids, torch.tensor([60]), *m.empty_caches(1, 100))
    bad = m.empty_caches(1, 8)
    bad[0] = torch.zeros(1, 8, 5)
    with pytest.raises(ShapeError, match="key_cache"):
        m(ids, zeros_len(1), *bad)


def test_unsupported_architecture_is_named():
    with pytest.raises(UnsupportedModelError, match="gpt2.*Llama family"):
        spec_from_hf_config({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(UnsupportedModelError, match="FalconForCausalLM"):
        spec_from_hf_config({"model_type": "llama", "architectures": ["FalconForCausalLM"]})
