"""Palu: latent-KV attention against independent references, quantization, errors."""

from __future__ import annotations

import pytest
import torch

from lrexport.allocate import Flrc, Uniform
from lrexport.calib.stats import collect_stats
from lrexport.errors import ConfigError, PassError, ShapeError
from lrexport.kv.palu import PaluKV, build_latent_kv
from lrexport.kv.quant import block_hadamard, bytes_per_token, dequantize, hadamard, pack, quantize, unpack
from lrexport.passes.latent_kv import LatentKVLayer, LatentKVPass
from lrexport.trace.export import trace
from tests.tiny import VOCAB, tiny_loaded

GQA = {"num_attention_heads": 8, "num_key_value_heads": 4, "hidden_size": 64}  # head_dim 8, groups of 1/2/4


def exact_layers(lm, s, rank=None):
    """Latent projections from a plain SVD of each group's rows (truncated to ``rank``)."""
    spec, mods = lm.spec, dict(lm.model.named_modules())
    D, G = spec.head_dim, spec.num_kv_heads // s
    layers = {}
    for layer in range(spec.num_layers):
        parts = {}
        for kind in "kv":
            lin = mods[f"model.layers.{layer}.self_attn.{kind}_proj"]
            A, up = [], []
            for g in range(G):
                U, S, Vh = torch.linalg.svd(lin.weight.detach()[g * s * D:(g + 1) * s * D], full_matrices=False)
                r = rank or S.numel()
                A.append(Vh[:r] * S[:r, None])
                up.append(U[:, :r].T)
            parts[kind] = (torch.cat(A), torch.stack(up), None if lin.bias is None else lin.bias.detach().clone())
        layers[layer] = LatentKVLayer(A_k=parts["k"][0], k_up=parts["k"][1], A_v=parts["v"][0], v_up=parts["v"][1],
                                      group_size=s, k_bias=parts["k"][2], v_bias=parts["v"][2])
    return layers


def reconstructed_model(lm_kind, layers, seed, **kw):
    """Independent reference: an eager model whose k/v weights are the latent reconstructions."""
    ref = tiny_loaded(lm_kind, seed=seed, dtype=torch.float64, **kw)
    mods = dict(ref.model.named_modules())
    with torch.no_grad():
        for layer, L in layers.items():
            for kind, A, up in (("k", L.A_k, L.k_up), ("v", L.A_v, L.v_up)):
                G, r, E = up.shape
                W = torch.cat([up[g].T @ A[g * r:(g + 1) * r] for g in range(G)])  # [Hkv*D, n]
                mods[f"model.layers.{layer}.self_attn.{kind}_proj"].weight.copy_(W)
    return ref.model


def run_prefill_decode(tg, ids_a, ids_b, steps=3):
    """Batch of 2 prompts of different lengths, then a few decode steps; returns per-row logits."""
    B, La, Lb = 2, ids_a.numel(), ids_b.numel()
    ids = torch.zeros(B, La, dtype=torch.int64)
    ids[0], ids[1, :Lb] = ids_a, ids_b
    cap = La + steps + 1
    logits, caches = tg(ids, torch.zeros(B, dtype=torch.int64), tg.cache.empty(B, cap))
    rows = [[logits[0, :La]], [logits[1, :Lb]]]
    pos = torch.tensor([La, Lb])
    g = torch.Generator().manual_seed(5)
    seqs = [ids_a.tolist(), ids_b.tolist()]
    for _ in range(steps):
        nxt = torch.randint(0, VOCAB, (B, 1), generator=g)
        logits, caches = tg(nxt, pos, caches)
        for b in range(B):
            rows[b].append(logits[b])
            seqs[b].append(int(nxt[b]))
        pos = pos + 1
    return [torch.cat(r) for r in rows], seqs


def eager_logits(model, seq):
    ids = torch.tensor([seq])
    return model(ids, torch.zeros(1, dtype=torch.int64), *model.empty_caches(1, len(seq)))[0][0]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("s", [1, 2, 4])
@pytest.mark.parametrize("fuse", [True, False])
def test_full_rank_latent_equals_original(kind, s, fuse):
    lm = tiny_loaded(kind, seed=7, dtype=torch.float64, **GQA)
    tg = trace(lm.model)
    res = LatentKVPass(exact_layers(lm, s), fuse_v=fuse)(tg)
    assert res.changed == lm.spec.num_layers
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, VOCAB, (7,), generator=g), torch.randint(0, VOCAB, (4,), generator=g)
    rows, seqs = run_prefill_decode(tg, a, b)
    for row, seq in zip(rows, seqs):
        assert torch.allclose(row, eager_logits(lm.model, seq), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("s", [1, 2, 4])
def test_truncated_latent_matches_reconstructed_weights(s):
    """At reduced rank the latent graph equals a model holding the rank-r k/v reconstructions."""
    lm = tiny_loaded("qwen2", seed=8, dtype=torch.float64, **GQA)
    layers = exact_layers(lm, s, rank=3 * s)
    tg = trace(lm.model)
    LatentKVPass(layers)(tg)
    assert tg.cache.widths[0] == (4 // s) * 3 * s
    ref = reconstructed_model("qwen2", layers, seed=8, **GQA)
    g = torch.Generator().manual_seed(2)
    rows, seqs = run_prefill_decode(tg, torch.randint(0, VOCAB, (6,), generator=g),
                                    torch.randint(0, VOCAB, (3,), generator=g))
    for row, seq in zip(rows, seqs):
        assert torch.allclose(row, eager_logits(ref, seq), atol=1e-10, rtol=1e-10)


def test_hadamard_rotation_leaves_float_outputs_unchanged():
    lm = tiny_loaded("llama", seed=9, dtype=torch.float64, **GQA)
    layers = exact_layers(lm, 2, rank=8)
    H = block_hadamard(8, 8)
    rotated = {i: LatentKVLayer(A_k=torch.cat([H @ L.A_k[g * 8:(g + 1) * 8] for g in range(2)]),
                                k_up=torch.stack([H @ u for u in L.k_up]),
                                A_v=torch.cat([H @ L.A_v[g * 8:(g + 1) * 8] for g in range(2)]),
                                v_up=torch.stack([H @ u for u in L.v_up]), group_size=2)
               for i, L in layers.items()}
    assert torch.allclose(H @ H.T, torch.eye(8, dtype=torch.float64), atol=1e-12)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    outs = []
    for ls in (layers, rotated):
        tg = trace(lm.model)
        LatentKVPass(ls)(tg)
        outs.append(tg(ids, torch.zeros(2, dtype=torch.int64), tg.cache.empty(2, 6))[0])
    assert torch.allclose(outs[0], outs[1], atol=1e-10)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trip_and_quantization_error_bound(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (3, 5, 64), generator=g)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 64 * bits // 8)
    assert torch.equal(unpack(packed, bits, 64), codes)
    x = torch.randn(3, 5, 64, generator=g, dtype=torch.float64) * 3
    q, params = quantize(x, bits, 32)
    assert q.shape[-1] == 64 * bits // 8 and params.dtype == torch.float16 and params.shape[-1] == 4
    back = dequantize(q, params, bits, 32, 64, torch.float64)
    xg = x.view(3, 5, 2, 32)
    step = (xg.amax(-1) - xg.amin(-1)) / (2**bits - 1)
    # half a step of rounding, plus the float16 rounding of scale (x levels) and zero point
    bound = step / 2 + (2**bits - 1) * step * 2**-11 + xg.abs().amax(-1) * 2**-11
    err = (back - x).abs().view(3, 5, 2, 32).amax(-1)
    if bits != 2:
        assert bool((err <= bound * 1.0001).all())
    else:
        # 2-bit groups search their range: each end trimmed by at most 15/64 of it, so clipped values
        # may be off by that much more; and no group is worse in squared error than min/max
        span = xg.amax(-1) - xg.amin(-1)
        assert bool((err <= bound + span * 15 / 64 * 1.0001).all())
        lo = xg.amin(-1).half().double()
        sc = (span / 3).float().half().double()
        plain = ((torch.round((xg.float() - lo[..., None].float()) / sc[..., None].float()).clamp(0, 3).double()
                  * sc[..., None] + lo[..., None]) - xg).square().sum(-1)
        got = (back - x).view(3, 5, 2, 32).square().sum(-1)
        assert bool((got <= plain * (1 + 1e-5)).all()) and bool((got < plain * 0.999).any())
    assert bytes_per_token(64, bits, 32) == 64 * bits // 8 + 8


def test_quantized_pass_bytes_and_closeness():
    lm = tiny_loaded("llama", seed=10, dtype=torch.float32, **GQA)
    layers = exact_layers(lm, 2, rank=16)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(4))
    tg_f = trace(lm.model)
    LatentKVPass(layers)(tg_f)
    ref = tg_f(ids, torch.zeros(2, dtype=torch.int64), tg_f.cache.empty(2, 8))[0]
    errs = {}
    for bits in (8, 4):
        tg = trace(lm.model)
        LatentKVPass(layers, bits=bits, quant_group=16)(tg)
        G = 2
        assert tg.cache.widths[:4] == [G * 16 * bits // 8, 2 * G * 16 // 16, G * 16 * bits // 8, 2 * G]
        assert tg.cache.dtypes[:2] == ["uint8", "float16"]
        assert tg.cache.bytes_per_token() == lm.spec.num_layers * 2 * (G * 16 * bits // 8 + 2 * 2 * G)
        out = tg(ids, torch.zeros(2, dtype=torch.int64), tg.cache.empty(2, 8))[0]
        errs[bits] = float((out - ref).abs().max().detach())
    assert errs[8] < errs[4] < 0.5 and errs[8] < 0.05


def test_palu_build_on_calibrated_model_meets_budget():
    lm = tiny_loaded("llama", seed=12, **GQA)
    windows = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(6))
    stats = collect_stats(lm.model, windows, fisher=True)
    for cfg in (PaluKV(allocation=Uniform(0.5), group_size=1), PaluKV(allocation=Flrc(0.5), group_size=2),
                PaluKV(allocation=Flrc(0.5), group_size=0, bits=4, quant_group=8)):
        built = build_latent_kv(lm.model, stats, cfg)
        assert abs(built.plan["kv_removed"] - 0.5) < 0.02, built.plan
        assert built.plan["grouping"] == {1: "M", 2: "G", 0: "J"}[cfg.group_size]
        if cfg.bits:
            assert all(r % 8 == 0 for rr in built.plan["ranks"].values() for r in rr)


def test_errors():
    lm = tiny_loaded("llama", seed=13, dtype=torch.float64)  # 2 KV heads
    with pytest.raises(ConfigError, match="group size 3 does not divide the 2 KV heads"):
        PaluKV(allocation=Uniform(0.5), group_size=3).heads_per_group(lm.spec)
    with pytest.raises(ConfigError, match="bits must be one of"):
        PaluKV(allocation=Uniform(0.5), bits=5)
    with pytest.raises(ConfigError, match="quant_group"):
        PaluKV(allocation=Uniform(0.5), quant_group=12)
    with pytest.raises(ConfigError, match="ratio"):
        PaluKV(allocation=Uniform(1.5))
    layers = exact_layers(lm, 1)
    too_big = {i: LatentKVLayer(A_k=torch.zeros(2 * 40, 64, dtype=torch.float64),
                                k_up=torch.zeros(2, 40, 16, dtype=torch.float64), A_v=L.A_v, v_up=L.v_up, group_size=1)
               for i, L in layers.items()}
    with pytest.raises(PassError, match="rank 40 .* above"):
        LatentKVPass(too_big)(trace(lm.model))
    with pytest.raises(PassError, match="groups of 1 do not match"):
        LatentKVPass({i: LatentKVLayer(A_k=L.A_k, k_up=L.k_up[:1], A_v=L.A_v, v_up=L.v_up, group_size=1)
                      for i, L in layers.items()})(trace(lm.model))
    with pytest.raises(ConfigError, match="power of two"):
        hadamard(12)
    # the op names the bad input
    tg = trace(lm.model)
    LatentKVPass(layers)(tg)
    caches = tg.cache.empty(1, 4)
    caches[0] = torch.zeros(1, 4, 7, dtype=torch.float64)
    with pytest.raises(ShapeError, match="cache_k must be"):
        tg(torch.zeros(1, 2, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), caches)


def test_fusion_into_low_rank_o_proj_and_weight_pass_composition():
    """Weight pass first (o_proj becomes a pair), then the KV pass fuses B_v into its V factor."""
    from lrexport.factorize.registry import Factors
    from lrexport.passes.lowrank_linear import LowRankLinearPass

    lm = tiny_loaded("llama", seed=14, dtype=torch.float64, **GQA)
    mods = dict(lm.model.named_modules())
    facs = {}
    for layer in range(lm.spec.num_layers):
        name = f"model.layers.{layer}.self_attn.o_proj"
        U, S, Vh = torch.linalg.svd(mods[name].weight.detach(), full_matrices=False)
        facs[name] = Factors(U * S, Vh)
    tg = trace(lm.model)
    LowRankLinearPass(facs)(tg)
    res = LatentKVPass(exact_layers(lm, 1))(tg)
    assert "fused" in res.skipped.get("v_up", "")
    assert any(n.endswith("fused_lowrank_v") for n, _ in tg.gm.named_parameters())
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(15))
    out = tg(ids, torch.zeros(2, dtype=torch.int64), tg.cache.empty(2, 6))[0]
    ref = lm.model(ids, torch.zeros(2, dtype=torch.int64), *lm.model.empty_caches(2, 6))[0]
    assert torch.allclose(out, ref, atol=1e-10)


@pytest.mark.parametrize("s", [1, 4])
def test_weight_and_kv_passes_together_decode_matches_reconstructed_model(s):
    """Both passes on one graph (q/o/gate/up/down as truncated factor pairs, k/v as latents of
    different key and value ranks; M-LRD fuses B_v into the low-rank o_proj): prefill of two rows of
    different lengths, then decode steps with the cache, equal an eager float64 model that
    holds the factor products and the latent reconstructions as its weights."""
    from lrexport.factorize.registry import Factors
    from lrexport.passes.lowrank_linear import LowRankLinearPass

    lm = tiny_loaded("llama", seed=16, dtype=torch.float64, **GQA)
    mods = dict(lm.model.named_modules())
    facs = {}
    for name, mod in mods.items():
        if name.endswith(("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
            U, S, Vh = torch.linalg.svd(mod.weight.detach(), full_matrices=False)
            r = max(2, S.numel() // 3)
            facs[name] = Factors(U[:, :r] * S[:r], Vh[:r])
    keys, vals = exact_layers(lm, s, rank=2 * s), exact_layers(lm, s, rank=3 * s)
    layers = {i: LatentKVLayer(A_k=keys[i].A_k, k_up=keys[i].k_up, A_v=vals[i].A_v, v_up=vals[i].v_up, group_size=s)
              for i in keys}
    tg = trace(lm.model)
    LowRankLinearPass(facs)(tg)
    res = LatentKVPass(layers)(tg)
    assert res.changed == lm.spec.num_layers
    if s == 1:  # M-LRD: B_v goes into o_proj's V factor; J-LRD applies it in the attention
        assert "fused" in res.skipped.get("v_up", "")
    ref = reconstructed_model("llama", layers, seed=16, **GQA)
    ref_mods = dict(ref.named_modules())
    with torch.no_grad():
        for name, f in facs.items():
            ref_mods[name].weight.copy_(f.U @ f.V)
    g = torch.Generator().manual_seed(17)
    rows, seqs = run_prefill_decode(tg, torch.randint(0, VOCAB, (7,), generator=g),
                                    torch.randint(0, VOCAB, (4,), generator=g), steps=4)
    for row, seq in zip(rows, seqs):
        assert torch.allclose(row, eager_logits(ref, seq), atol=1e-10, rtol=1e-10)


def test_interleaved_hadamard_is_orthogonal_and_mixes_every_group():
    """The rotation folded into quantized latents: orthogonal, and output group j takes channels
    j, j + n, j + 2n, ... (n groups), so each group spans the leading and trailing directions."""
    from lrexport.kv.quant import interleaved_hadamard

    for width, block in ((96, 32), (64, 16), (32, 32)):
        R = interleaved_hadamard(width, block)
        assert torch.allclose(R @ R.T, torch.eye(width, dtype=R.dtype), atol=1e-12)
        n = width // block
        for j in range(n):
            cols = (R[j * block:(j + 1) * block].abs() > 0).any(0).nonzero().flatten()
            assert torch.equal(cols, torch.arange(j, width, n))


def test_kv_compressed_weights_compute_the_latent_reconstruction():
    """kv_compressed_weights: inside the block the model's k/v weights are the latent reconstruction
    (the independent reference above builds the same), so the eager model equals the compiled
    latent-KV graph; the original weights come back after the block, also after an error."""
    from lrexport.kv.palu import kv_compressed_weights

    lm = tiny_loaded("llama", seed=21, dtype=torch.float64, **GQA)
    layers = exact_layers(lm, 1, rank=2)
    orig = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    ref = reconstructed_model("llama", layers, seed=21, **GQA)
    g = torch.Generator().manual_seed(3)
    seq = torch.randint(0, VOCAB, (6,), generator=g).tolist()
    with kv_compressed_weights(lm.model, layers):
        for (n, p), (_, q) in zip(lm.model.named_parameters(), ref.named_parameters()):
            assert torch.equal(p, q), n
        assert torch.allclose(eager_logits(lm.model, seq), eager_logits(ref, seq), atol=1e-12)
    with pytest.raises(RuntimeError, match="boom"), kv_compressed_weights(lm.model, layers):
        raise RuntimeError("boom")
    assert all(torch.equal(p, orig[n]) for n, p in lm.model.named_parameters())


def test_compress_kv_aware_weights():
    """The weight pass calibrated on the KV-compressed model: other statistics than the original
    model's (so other factors), recorded in the plan; it needs both passes."""
    from lrexport import api
    from lrexport.calib.data import SelfCalibration

    tiny_calib = SelfCalibration(num_windows=4, window=16, fisher_windows=2)

    def run(aware):
        lm = tiny_loaded("llama", seed=4, **GQA)
        return api.compress(model=lm, weights=api.WeightCompression(Uniform(0.3)),
                            kv=PaluKV(allocation=Uniform(0.5), group_size=1), calibration=tiny_calib,
                            use_cache=False, kv_aware_weights=aware)

    plain, aware = run(False), run(True)
    assert aware.compressed.plan.calibration.get("weights_on_kv_compressed_model") is True
    assert "weights_on_kv_compressed_model" not in plain.compressed.plan.calibration
    assert plain.compressed.plan.weights.ranks == aware.compressed.plan.weights.ranks  # uniform: same ranks
    name = "model.layers.1.self_attn.q_proj"
    fp, fa = plain.compressed.factors[name], aware.compressed.factors[name]
    assert not torch.allclose(fp.U @ fp.V, fa.U @ fa.V)  # layer 1's inputs changed with layer 0's KV
    with pytest.raises(ConfigError, match="needs both"):
        api.compress(model=tiny_loaded("llama", seed=4, **GQA), kv=PaluKV(allocation=Uniform(0.5)),
                     calibration=tiny_calib, use_cache=False, kv_aware_weights=True)
