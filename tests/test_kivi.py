"""The KIVI-style KV-quantization baseline: its quantizers against loops, its pass, its bytes."""

from __future__ import annotations

import pytest
import torch

from lrexport.errors import ConfigError
from lrexport.kv.kivi import KiviKV, KiviPass, _quant_keys, _quant_values, kivi_bytes_per_token
from lrexport.trace.export import trace
from tests.tiny import VOCAB, tiny_loaded


def _fq(x, bits):
    lo, hi = x.min(), x.max()
    scale = torch.tensor(float((hi - lo) / (2**bits - 1))).clamp_min(1e-8).half().double()
    zero = lo.half().double()
    return torch.round((x - zero) / scale).clamp(0, 2**bits - 1) * scale + zero


def test_key_and_value_quantizers_match_loops():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 10, 6, generator=g, dtype=torch.float64)
    valid = torch.tensor([[True] * 10, [True] * 7 + [False] * 3])
    got = _quant_keys(k, valid, 3, 4)
    for b in range(2):
        for start in range(0, 10, 4):
            n = min(4, int(valid[b].sum()) - start)
            for c in range(6):
                if n <= 0:
                    continue
                ref = _fq(k[b, start:start + n, c], 3)
                assert torch.allclose(got[b, start:start + n, c], ref, atol=1e-12)
    v = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    got = _quant_values(v, 2, 4)
    for b in range(2):
        for t in range(5):
            for c0 in (0, 4):
                assert torch.allclose(got[b, t, c0:c0 + 4], _fq(v[b, t, c0:c0 + 4], 2), atol=1e-12)


def test_pass_swaps_every_attention_and_error_shrinks_with_bits():
    lm = tiny_loaded("llama", seed=3, dtype=torch.float64)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    ref = lm.model(ids, torch.zeros(2, dtype=torch.int64), *lm.model.empty_caches(2, 9))[0]
    errs = []
    for bits in (2, 4, 8):
        tg = trace(lm.model)
        res = KiviPass(KiviKV(bits=bits, token_group=4, channel_group=16))(tg)
        assert res.changed == lm.spec.num_layers
        out = tg(ids, torch.zeros(2, dtype=torch.int64), tg.cache.empty(2, 9))[0].detach()
        errs.append(float((out - ref).abs().max()))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-2


def test_bytes_and_errors():
    assert kivi_bytes_per_token(192, 30, KiviKV(bits=2, token_group=64, channel_group=64)) == 30 * 2 * (48 + 12)
    with pytest.raises(ConfigError, match="bits"):
        KiviKV(bits=5)
    with pytest.raises(ConfigError, match="token_group"):
        KiviKV(token_group=0)
