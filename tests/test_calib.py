"""Tests of lrexport.calib: the streaming statistics pass (Gram, |x|, Fisher) and the data readers.

References are computed here with plain forwards/backwards of the whole tiny model and our own
hooks: Gram matrices and |x| from a float32 forward accumulated in float64, Fisher statistics
from a float64 copy of the model with the loss computed in float64 from the final norm's output.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lrexport.calib.data import SelfCalibration, TextCalibration, read_text, text_windows, windows_from_ids
from lrexport.calib.stats import CalibStats, collect_stats, input_key
from lrexport.errors import CacheOverflowError, ConfigError, DataError

MODULE_SEED = 20240611


def layer_linears(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def reference_inputs(model, windows):
    """Gram XᵀX and mean |x| per input key, from our own pre-hooks on one plain full forward."""
    gram, abs_sum = {}, {}
    handles = []

    def make(key):
        def hook(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            if key in gram:  # q/k/v (gate/up) read the same input: count it once
                return
            gram[key] = x.T @ x
            abs_sum[key] = x.abs().sum(0)
        return hook

    for fqn, lin in layer_linears(model).items():
        handles.append(lin.register_forward_pre_hook(make(input_key(fqn))))
    try:
        N, L = windows.shape
        with torch.no_grad():
            model(windows, torch.zeros(N, dtype=torch.int64), *model.empty_caches(N, L))
    finally:
        for h in handles:
            h.remove()
    return gram, {k: v / windows.numel() for k, v in abs_sum.items()}


def reference_fisher(model64, windows):
    """fisher_out[fqn] = Σ_windows Σ_tokens (∂L_w/∂y)², fisher_w[fqn] = Σ_windows ||∂L_w/∂W||², with
    L_w the summed next-token cross-entropy of window w; everything in float64."""
    lins = layer_linears(model64)
    fisher_out = {n: torch.zeros(lin.out_features, dtype=torch.float64) for n, lin in lins.items()}
    fisher_w = dict.fromkeys(lins, 0.0)
    captured = {}
    handles = [model64.model.norm.register_forward_hook(lambda m, a, out: captured.__setitem__("h", out))]

    def make(fqn):
        def fwd(_mod, _args, out):
            def grad_hook(g):
                fisher_out[fqn] += g.detach().pow(2).reshape(-1, g.shape[-1]).sum(0)
            out.register_hook(grad_hook)
        return fwd

    for fqn, lin in lins.items():
        handles.append(lin.register_forward_hook(make(fqn)))
    for p in model64.parameters():
        p.requires_grad_(True)
    try:
        for w in range(windows.shape[0]):
            ids = windows[w:w + 1]
            model64.zero_grad(set_to_none=True)
            model64(ids, torch.zeros(1, dtype=torch.int64), *model64.empty_caches(1, ids.shape[1]))
            logits = model64.lm_head(captured["h"])  # float64 logits (the model's own are cast to float32)
            assert logits.dtype == torch.float64
            loss = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
            loss.backward()
            for fqn, lin in lins.items():
                fisher_w[fqn] += float(lin.weight.grad.pow(2).sum())
    finally:
        for h in handles:
            h.remove()
        for p in model64.parameters():
            p.requires_grad_(False)
            p.grad = None
    return fisher_out, fisher_w


@pytest.fixture(scope="module")
def fisher_case(make_tiny_model, make_windows):
    """One collect_stats run with Fisher (batch 2, 5 windows) and its float64 reference."""
    windows = make_windows(MODULE_SEED, num=5, length=12)
    model = make_tiny_model(seed=MODULE_SEED)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    stats = collect_stats(model, windows, fisher=True, batch_size=2)
    model64 = make_tiny_model(seed=MODULE_SEED).double()
    ref_out, ref_w = reference_fisher(model64, windows)
    return dict(windows=windows, model=model, before=before, flags=flags, stats=stats, ref_out=ref_out, ref_w=ref_w)


# ------------------------------------------------------------------ Gram / |x|


def test_gram_and_abs_mean_match_an_independent_forward(tiny_model, calib_windows, tiny_spec):
    ref_gram, ref_abs = reference_inputs(tiny_model, calib_windows)
    stats = collect_stats(tiny_model, calib_windows, fisher=False, batch_size=2)
    keys = {f"model.layers.{i}.{k}" for i in range(tiny_spec.num_layers)
            for k in ("self_attn.qkv", "self_attn.o_proj", "mlp.gate_up", "mlp.down_proj")}
    assert set(stats.gram) == set(stats.abs_mean) == set(ref_gram) == keys
    for k in keys:
        assert stats.gram[k].dtype == torch.float64
        assert rel(stats.gram[k], ref_gram[k]) < 1e-6, k
        assert torch.allclose(stats.gram[k], stats.gram[k].T)
        assert rel(stats.abs_mean[k], ref_abs[k]) < 1e-6, k
    assert stats.tokens == calib_windows.numel() and stats.windows == calib_windows.shape[0]
    assert not stats.has_fisher and stats.fisher_out == {} and stats.fisher_w == {}
    # the accessors map every linear to its input key
    assert stats.gram_of("model.layers.1.self_attn.v_proj") is stats.gram["model.layers.1.self_attn.qkv"]
    assert stats.abs_mean_of("model.layers.0.mlp.up_proj") is stats.abs_mean["model.layers.0.mlp.gate_up"]


def test_gram_of_a_float16_model_is_finite_and_accurate(make_tiny_model, calib_windows):
    model = make_tiny_model(3).half()
    with torch.no_grad():  # activations of ~40 (real models have larger ones): Σ x² over 60 tokens > 65504
        model.model.layers[0].input_layernorm.weight.fill_(40.0)
    ref_gram, _ = reference_inputs(model, calib_windows)  # the same float16 inputs, products in float64
    stats = collect_stats(model, calib_windows, fisher=False, batch_size=5)
    for k, r in ref_gram.items():
        assert torch.isfinite(r).all()
        assert torch.isfinite(stats.gram[k]).all(), f"{k}: non-finite Gram"
        assert rel(stats.gram[k], r) < 1e-3, k


def test_input_key():
    assert input_key("model.layers.3.self_attn.q_proj") == "model.layers.3.self_attn.qkv"
    assert input_key("model.layers.3.self_attn.k_proj") == "model.layers.3.self_attn.qkv"
    assert input_key("model.layers.3.mlp.up_proj") == "model.layers.3.mlp.gate_up"
    assert input_key("model.layers.3.self_attn.o_proj") == "model.layers.3.self_attn.o_proj"
    assert input_key("model.layers.3.mlp.down_proj") == "model.layers.3.mlp.down_proj"


def test_batch_size_does_not_change_the_statistics(make_tiny_model, calib_windows, seed):
    s1 = collect_stats(make_tiny_model(seed), calib_windows, fisher=True, batch_size=1)
    s3 = collect_stats(make_tiny_model(seed), calib_windows, fisher=True, batch_size=3)  # batches of 3 and 2
    assert set(s1.gram) == set(s3.gram) and set(s1.fisher_out) == set(s3.fisher_out) == set(s3.fisher_w)
    for k in s1.gram:
        assert rel(s3.gram[k], s1.gram[k]) < 1e-6, k
        assert rel(s3.abs_mean[k], s1.abs_mean[k]) < 1e-6, k
    for k in s1.fisher_out:
        assert rel(s3.fisher_out[k], s1.fisher_out[k]) < 1e-6, k
        assert s3.fisher_w[k] == pytest.approx(s1.fisher_w[k], rel=1e-6), k
    assert (s1.tokens, s1.windows) == (s3.tokens, s3.windows)


# ------------------------------------------------------------------ Fisher


def test_fisher_out_matches_float64_full_backward(fisher_case, tiny_spec):
    stats, ref = fisher_case["stats"], fisher_case["ref_out"]
    assert stats.has_fisher
    assert set(stats.fisher_out) == set(ref) == set(tiny_spec.linear_names())
    for fqn, r in ref.items():
        got = stats.fisher_out[fqn]
        assert got.dtype == torch.float64 and got.shape == r.shape
        assert float(r.sum()) > 0, fqn
        assert rel(got, r) < 1e-5, f"{fqn}: relative error {rel(got, r):.2e}"


def test_fisher_w_matches_float64_full_backward(fisher_case):
    stats, ref = fisher_case["stats"], fisher_case["ref_w"]
    assert set(stats.fisher_w) == set(ref)
    for fqn, r in ref.items():
        assert r > 0
        assert stats.fisher_w[fqn] == pytest.approx(r, rel=1e-5), fqn


def test_collect_stats_leaves_no_hooks_no_grads_and_the_weights_unchanged(fisher_case):
    """Hooks removed, no .grad left, requires_grad and train/eval restored, weights unchanged."""
    model = fisher_case["model"]
    for name, mod in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            assert len(getattr(mod, attr)) == 0, f"{name}.{attr} not empty"
    for name, p in model.named_parameters():
        assert p.requires_grad == fisher_case["flags"][name], name
        assert p.grad is None, name
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in fisher_case["before"].items())
    assert not model.training


def test_hooks_are_removed_when_the_forward_pass_fails(make_tiny_model, make_windows):
    model = make_tiny_model(1, max_len=8)
    with pytest.raises(CacheOverflowError):
        collect_stats(model, make_windows(5, num=2, length=12), fisher=False)  # longer than the RoPE table
    for name, mod in model.named_modules():
        assert not mod._forward_pre_hooks and not mod._forward_hooks, name


def test_hooks_and_grad_flags_are_reset_when_the_fisher_pass_fails(make_tiny_model, make_windows):
    model = make_tiny_model(2)

    def fail_under_grad(_mod, _args, _out):  # only the Fisher recompute runs with grad enabled
        if torch.is_grad_enabled():
            raise RuntimeError("injected failure")

    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 2 == 0)  # a mixed state that must come back as it was
    flags = [p.requires_grad for p in model.parameters()]
    mine = model.model.layers[1].mlp.register_forward_hook(fail_under_grad)
    with pytest.raises(RuntimeError, match="injected failure"):
        collect_stats(model, make_windows(6, num=2, length=8), fisher=True)
    mine.remove()
    for name, mod in model.named_modules():
        assert not mod._forward_pre_hooks and not mod._forward_hooks, name
    assert [p.requires_grad for p in model.parameters()] == flags


def test_calib_stats_save_load_round_trip_is_exact(fisher_case, tmp_path):
    stats = fisher_case["stats"]
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["stats.safetensors"]
    back = CalibStats.load(path)
    for kind in ("gram", "abs_mean", "fisher_out"):
        a, b = getattr(stats, kind), getattr(back, kind)
        assert set(a) == set(b), kind
        for k in a:
            assert b[k].dtype == a[k].dtype and torch.equal(b[k], a[k]), (kind, k)
    assert back.fisher_w == stats.fisher_w  # exact floats
    assert (back.tokens, back.windows) == (stats.tokens, stats.windows) == (60, 5)
    assert back.seconds_forward == stats.seconds_forward and back.seconds_fisher == stats.seconds_fisher
    assert back.has_fisher


def test_empty_calib_stats_round_trip(tmp_path):
    s = CalibStats(tokens=7, windows=1)
    s.save(tmp_path / "s.safetensors")
    back = CalibStats.load(tmp_path / "s.safetensors")
    assert back == s


# ------------------------------------------------------------------ data: windows


@pytest.mark.parametrize("n,num,window", [(100, 4, 10), (100, 10, 10), (37, 3, 12), (50, 1, 50), (1000, 7, 64)])
def test_windows_from_ids_shape_and_spacing(n, num, window):
    ids = torch.arange(1000, 1000 + n)
    w = windows_from_ids(ids, num, window)
    assert w.shape == (num, window) and w.dtype == torch.int64
    starts = (w[:, 0] - 1000).tolist()
    for row, s in zip(w, starts):  # every window is one contiguous slice of the text
        assert torch.equal(row, ids[s:s + window])
    assert starts[0] == 0
    if num > 1:
        assert starts[-1] == n - window  # spread over the whole text
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        assert min(gaps) >= window, "windows overlap"
        assert max(gaps) - min(gaps) <= 1, "windows not evenly spaced"


def test_windows_from_ids_accepts_lists_and_2d():
    assert windows_from_ids(list(range(20)), 2, 10).tolist() == [list(range(10)), list(range(10, 20))]
    assert windows_from_ids(torch.arange(20).reshape(4, 5), 2, 10).tolist() == [list(range(10)),
                                                                                 list(range(10, 20))]


def test_windows_from_ids_errors():
    with pytest.raises(DataError, match="corpus.txt has 9 tokens, fewer than one calibration window of 10"):
        windows_from_ids(list(range(9)), 1, 10, what="corpus.txt")
    with pytest.raises(DataError, match="text has room for 3 windows of 10 tokens, 4 were asked for"):
        windows_from_ids(list(range(39)), 4, 10)


def test_windows_from_ids_beyond_float32_integer_range():
    n = 2**24 + 3 + 8
    ids = torch.zeros(1, dtype=torch.int64).expand(n)  # 16.8M "tokens" without allocating them
    assert windows_from_ids(ids, 3, 8).shape == (3, 8)


def test_calibration_config_validation(tmp_path):
    with pytest.raises(ConfigError, match="num_windows must be >= 1, got 0"):
        SelfCalibration(num_windows=0)
    with pytest.raises(ConfigError, match="window must be >= 2 tokens, got 1"):
        SelfCalibration(window=1)
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        SelfCalibration(temperature=0.0)
    with pytest.raises(DataError, match="does not exist"):
        TextCalibration(path=str(tmp_path / "missing.txt"))


def test_text_windows_with_a_tokenizer(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("x" * 40, encoding="utf-8")

    class CharTok:
        def __call__(self, text, add_special_tokens=True):
            assert add_special_tokens is False
            return type("Enc", (), {"input_ids": [ord(c) - 100 + i for i, c in enumerate(text)]})()

    w = text_windows(TextCalibration(path=str(p), num_windows=2, window=20), CharTok())
    assert w.tolist() == [[20 + i for i in range(20)], [40 + i for i in range(20)]]
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        text_windows(TextCalibration(path=str(p), num_windows=2, window=20), None)


# ------------------------------------------------------------------ data: files


def test_read_text_txt_as_is(tmp_path):
    text = "first line\nsecond — ünïcode line\n\n  indented\n"
    p = tmp_path / "a.txt"
    p.write_text(text, encoding="utf-8")
    assert read_text(p) == text
    assert read_text(str(p)) == text


def test_read_text_jsonl(tmp_path):
    p = tmp_path / "a.jsonl"
    recs = [{"text": "alpha beta", "id": 1}, {"text": "gamma\ndelta"}, {"text": "ε"}]
    p.write_text(json.dumps(recs[0]) + "\n\n" + json.dumps(recs[1]) + "\n   \n"
                 + json.dumps(recs[2], ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_text(p) == "alpha beta\n\ngamma\ndelta\n\nε"


@pytest.mark.parametrize("lines,lineno,match", [
    (['{"text": "ok"}', "", '{"text": "broken"'], 3, "invalid JSON"),
    (['{"text": "ok"}', '{"body": "no text"}'], 2, "needs a string field 'text'"),
    (['{"text": 3}'], 1, "needs a string field 'text'"),
    (['["text"]'], 1, "needs a string field 'text'"),
])
def test_read_text_jsonl_errors_name_the_line(tmp_path, lines, lineno, match):
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"bad.jsonl:{lineno}: .*{match}"):
        read_text(p)


def test_read_text_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_text(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x85"])
def test_read_text_jsonl_with_unicode_line_separators_in_text(tmp_path, sep):
    p = tmp_path / "u.jsonl"
    p.write_text(json.dumps({"text": f"a{sep}b"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_text(p) == f"a{sep}b"


def test_fisher_windows_subset(make_tiny_model, make_windows):
    """Fisher from a subset equals a full Fisher pass over that subset; Gram still uses every window."""
    from lrexport.calib.stats import fisher_subset

    windows = make_windows(31, num=6, length=10)
    model = make_tiny_model(seed=31)
    part = collect_stats(model, windows, fisher=True, batch_size=4, fisher_windows=2)
    sel = fisher_subset(6, 2)
    assert sel == [0, 3]
    ref = collect_stats(model, windows[sel], fisher=True, batch_size=4)
    full = collect_stats(model, windows, fisher=False, batch_size=4)
    assert part.fisher_tokens == 20 and part.fisher_norm == 20 and part.tokens == 60
    for k in ref.fisher_out:
        assert rel(part.fisher_out[k], ref.fisher_out[k]) < 1e-6, k
        assert part.fisher_w[k] == pytest.approx(ref.fisher_w[k], rel=1e-6)
    for k in full.gram:
        assert rel(part.gram[k], full.gram[k]) < 1e-6, k
    with pytest.raises(ConfigError, match="fisher_windows"):
        collect_stats(model, windows, fisher_windows=0)
