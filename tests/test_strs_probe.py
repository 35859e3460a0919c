"""STRS's perplexity probe equals an independent full forward with the projection truncated."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lrexport.allocate.strs_eval import LayerwisePerplexity
from lrexport.factorize.registry import Decomposition
from tests.tiny import VOCAB, tiny_loaded


def _ppl(model, windows):
    N, L = windows.shape
    logits = model(windows, torch.zeros(N, dtype=torch.int64), *model.empty_caches(N, L))[0]
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return math.exp(float(nll))


def test_probe_matches_full_forward_and_restores_weights():
    lm = tiny_loaded("llama", seed=41, dtype=torch.float64)
    model = lm.model
    windows = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(42))
    mods = dict(model.named_modules())
    decomps = {}
    for name in ("model.layers.1.mlp.up_proj", "model.layers.0.self_attn.q_proj"):
        U, s, Vh = torch.linalg.svd(mods[name].weight.detach(), full_matrices=False)
        decomps[name] = Decomposition(U * s, Vh, s**2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = LayerwisePerplexity(model, windows, decomps)
    with torch.no_grad():
        base = _ppl(model, windows)
        for name, d in decomps.items():
            got = probe(name, 4)
            saved = mods[name].weight.clone()
            mods[name].weight.copy_(d.reconstruct(4))
            ref = _ppl(model, windows)
            mods[name].weight.copy_(saved)
            assert abs(got - ref) < 1e-9 * ref, (name, got, ref)
            assert got != base
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
