"""The traced graph and the low-rank linear pass: equality with eager, match counts, slicing."""

from __future__ import annotations

import pytest
import torch

from lrexport.errors import PassError, ShapeError
from lrexport.factorize.registry import Factors
from lrexport.passes.lowrank_linear import LowRankLinearPass, linear_nodes
from lrexport.runtime.torch_backend import TorchBackend
from lrexport.trace.attention_op import attention
from lrexport.trace.export import trace
from tests.tiny import VOCAB, tiny_loaded, zeros_len


def _svd_factors(model, names, rank=None):
    sd = dict(model.named_parameters())
    out = {}
    for n in names:
        W = sd[f"{n}.weight"].detach().double()
        U, s, Vh = torch.linalg.svd(W, full_matrices=False)
        f = Factors(U * s, Vh)
        out[n] = f.truncate(rank) if rank else f
    return out


@pytest.fixture(params=["llama", "qwen2"])
def lm(request):
    return tiny_loaded(request.param, seed=11, dtype=torch.float64)


def test_trace_equals_eager_and_has_one_attention_node_per_layer(lm):
    tg = trace(lm.model)
    assert tg.count(attention._opoverload) == lm.spec.num_layers
    ids = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))
    ref = lm.model(ids, zeros_len(3), *lm.model.empty_caches(3, 9))[0]
    out, caches = tg(ids, zeros_len(3), tg.cache.empty(3, 9))
    assert torch.equal(out, ref)
    assert len(caches) == 2 * lm.spec.num_layers and caches[0].shape == (3, 9, lm.spec.kv_dim)


def test_full_rank_pass_equals_original(lm):
    names = lm.spec.linear_names()
    tg = trace(lm.model)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    ref, _ = tg(ids, zeros_len(2), tg.cache.empty(2, 6))
    res = LowRankLinearPass(_svd_factors(lm.model, names))(tg)
    assert res.changed == len(names) and "lm_head" in res.skipped
    assert len(linear_nodes(tg)) == 1  # only lm_head keeps a named dense weight
    out, _ = tg(ids, zeros_len(2), tg.cache.empty(2, 6))
    assert torch.allclose(out, ref, atol=1e-10, rtol=1e-10)


def test_truncated_pass_equals_truncated_weights(lm):
    """A rank-r pair computes exactly x @ (U_r V_r)^T: compare with an eager model holding U_r V_r."""
    names = lm.spec.linear_names()[:4]
    facs = _svd_factors(lm.model, names, rank=5)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    tg = trace(lm.model)
    LowRankLinearPass(facs)(tg)
    out, _ = tg(ids, zeros_len(2), tg.cache.empty(2, 6))
    mods = dict(lm.model.named_modules())
    with torch.no_grad():
        for n, f in facs.items():
            mods[n].weight.copy_(f.U @ f.V)
    ref = lm.model(ids, zeros_len(2), *lm.model.empty_caches(2, 6))[0]
    assert torch.allclose(out, ref, atol=1e-10, rtol=1e-9)


def test_rank_input_slices_factors(lm):
    names = lm.spec.linear_names()
    full = _svd_factors(lm.model, names, rank=12)
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    tg = trace(lm.model)
    res = LowRankLinearPass(full, rank_input=True)(tg)
    assert res.changed == len(names) and tg.rank_names == names and tg.rank_max == [12] * len(names)
    ranks = torch.randint(1, 13, (len(names),), generator=torch.Generator().manual_seed(4))
    out, _ = tg(ids, zeros_len(2), tg.cache.empty(2, 5), ranks)
    ref_tg = trace(tiny_loaded(lm.spec.model_type, seed=11, dtype=torch.float64).model)
    LowRankLinearPass({n: full[n].truncate(int(r)) for n, r in zip(names, ranks)})(ref_tg)
    ref, _ = ref_tg(ids, zeros_len(2), ref_tg.cache.empty(2, 5))
    assert torch.allclose(out, ref, atol=1e-12)
    backend = TorchBackend(tg)
    with pytest.raises(ShapeError, match="outside"):
        backend.step(ids, zeros_len(2), tg.cache.empty(2, 5), [0] * len(names))
    with pytest.raises(ShapeError, match="expected"):
        backend.step(ids, zeros_len(2), tg.cache.empty(2, 5), [1])


def test_pass_reports_and_errors(lm):
    tg = trace(lm.model)
    res = LowRankLinearPass({})(tg)
    assert res.changed == 0 and len(res.skipped) == len(lm.spec.linear_names()) + 1
    with pytest.raises(PassError, match="no linear named 'model.layers.9.mlp.up_proj'"):
        LowRankLinearPass({"model.layers.9.mlp.up_proj": Factors(torch.zeros(2, 1), torch.zeros(1, 2))})(tg)
    name = lm.spec.linear_names()[0]
    with pytest.raises(PassError, match="factors of .*q_proj"):
        LowRankLinearPass({name: Factors(torch.zeros(3, 2), torch.zeros(2, 5))})(tg)
    # a graph without linears: the pass says why it matched nothing
    tg.gm = torch.fx.symbolic_trace(torch.nn.ReLU())
    res2 = LowRankLinearPass({})(tg)
    assert res2.changed == 0 and "no aten.linear" in res2.unmatched and "matched nothing" in res2.summary()
