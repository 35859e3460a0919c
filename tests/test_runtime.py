"""The generation loop: cached decoding equals recomputation, batching, sampling, schedules, errors."""

from __future__ import annotations

import pytest
import torch

from lrexport.errors import CacheOverflowError, ConfigError
from lrexport.factorize.registry import Factors
from lrexport.passes.lowrank_linear import LowRankLinearPass
from lrexport.runtime import Sampling, TorchBackend, generate
from lrexport.runtime.sampling import sample
from lrexport.schedule import Linear, Schedule, Steps
from lrexport.trace.export import trace
from tests.tiny import VOCAB, tiny_loaded


@pytest.fixture(scope="module")
def lm():
    return tiny_loaded("llama", seed=21, dtype=torch.float64)


def _greedy_by_recompute(model, prompt, n):
    """Independent reference: re-run the whole sequence each step, no cache."""
    seq = list(prompt)
    for _ in range(n):
        ids = torch.tensor([seq])
        logits = model(ids, torch.zeros(1, dtype=torch.int64), *model.empty_caches(1, len(seq)))[0]
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


def test_greedy_matches_recompute_and_batching(lm):
    backend = TorchBackend(trace(lm.model))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 2, 8)]
    res = generate(backend, prompts, max_new_tokens=6)
    for p, toks in zip(prompts, res.tokens):
        assert toks == _greedy_by_recompute(lm.model, p, 6)
        alone = generate(backend, [p], max_new_tokens=6)
        assert alone.tokens[0] == toks
    assert res.finish_reasons == ["length"] * 3


def test_stop_tokens_and_streaming(lm):
    backend = TorchBackend(trace(lm.model))
    first = generate(backend, [[1, 2, 3]], max_new_tokens=8).tokens[0]
    k = max(i for i in range(len(first)) if first[i] not in first[:i])  # the last new token id
    seen = []
    res = generate(backend, [[1, 2, 3], [4]], max_new_tokens=8, stop_ids=[first[k]],
                   on_token=lambda step, ids: seen.append((step, ids)))
    assert res.tokens[0] == first[:k + 1] and res.finish_reasons[0] == "stop"
    assert seen[0][0] == 1 and seen[0][1][0] == first[0]
    assert all(ids[0] is None for step, ids in seen if step > k + 1)


def test_sampling_is_seeded_and_filters():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    cfg = Sampling(temperature=0.8, top_k=5, top_p=0.9, seed=3)
    a = [sample(logits, cfg, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert all(torch.equal(a[0], x) for x in a)
    top5 = logits.topk(5).indices
    for _ in range(20):
        t = sample(logits, cfg, None)
        assert all(int(t[b]) in top5[b].tolist() for b in range(4))
    # top_p tiny keeps only the argmax
    t = sample(logits, Sampling(temperature=1.0, top_p=1e-6), None)
    assert torch.equal(t, logits.argmax(-1))
    with pytest.raises(ConfigError, match="top_p"):
        Sampling(top_p=0)
    with pytest.raises(ConfigError, match="temperature"):
        Sampling(temperature=-1)


def test_schedule_lowers_ranks_and_counts_active_params(lm):
    names = lm.spec.linear_names()
    sd = dict(lm.model.named_parameters())
    facs = {}
    for n in names:
        U, s, Vh = torch.linalg.svd(sd[f"{n}.weight"].detach(), full_matrices=False)
        facs[n] = Factors(U[:, :16] * s[:16], Vh[:16])
    tg = trace(lm.model)
    LowRankLinearPass(facs, rank_input=True)(tg)
    cost = [sum(sd[f"{n}.weight"].shape) for n in names]
    total = sum(sd[f"{n}.weight"].numel() for n in names)
    backend = TorchBackend(tg, rank_cost=cost, dense_params=0, total_params=total)
    sched = Schedule(form=Steps(((1, 1.0), (3, 0.5))), min_rank=2)
    seen_ranks = []
    orig_step = backend.step

    def spy(ids, past, caches, ranks):
        seen_ranks.append(ranks)
        return orig_step(ids, past, caches, ranks)

    backend.step = spy
    res = generate(backend, [[1, 2, 3]], max_new_tokens=5, schedule=sched)
    assert seen_ranks[0] == [16] * len(names)  # prefill at full stored rank
    assert seen_ranks[1] == [16] * len(names) and seen_ranks[2] == [16] * len(names)
    assert seen_ranks[3] == [8] * len(names) and seen_ranks[4] == [8] * len(names)
    full = 16 * sum(cost) / total
    assert res.active_fractions == pytest.approx([full, full, full / 2, full / 2])
    assert res.avg_active_params == pytest.approx(0.75 * full)
    # a decaying schedule changes the tokens relative to a constant one only through the ranks
    lin = generate(TorchBackend(tg), [[1, 2, 3]], max_new_tokens=5,
                   schedule=Schedule(form=Linear(1.0, 1.0, 4), min_rank=1))
    static = generate(TorchBackend(tg), [[1, 2, 3]], max_new_tokens=5)
    assert lin.tokens == static.tokens


def test_errors(lm):
    backend = TorchBackend(trace(lm.model))
    with pytest.raises(CacheOverflowError, match="maximum length 256"):
        generate(backend, [[1] * 250], max_new_tokens=10)
    with pytest.raises(ConfigError, match="at least one token"):
        generate(backend, [[]], max_new_tokens=3)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate(backend, [[1]], max_new_tokens=0)


def test_min_new_tokens_masks_stop_tokens(lm):
    backend = TorchBackend(trace(lm.model))
    first = generate(backend, [[1, 2, 3]], max_new_tokens=1).tokens[0][0]
    stopped = generate(backend, [[1, 2, 3]], max_new_tokens=6, stop_ids=[first])
    assert stopped.tokens[0] == [first] and stopped.finish_reasons == ["stop"]
    held = generate(backend, [[1, 2, 3]], max_new_tokens=6, stop_ids=[first], min_new_tokens=3)
    assert first not in held.tokens[0][:3] and len(held.tokens[0]) >= 4 or held.finish_reasons == ["length"]


def test_cuda_device_runs_the_graph_on_the_gpu_or_says_why(lm):
    """On a CUDA machine the graph moves to the GPU (its own copy of the weights: the model stays on
    the CPU) and generates the same greedy tokens as on the CPU; elsewhere a clear error."""
    tg = trace(lm.model)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            TorchBackend(tg, device="cuda")
        return
    prompts = [[3, 1, 4, 1, 5], [9, 2]]
    cpu = generate(TorchBackend(trace(lm.model)), prompts, max_new_tokens=6).tokens
    gpu_backend = TorchBackend(tg, device="cuda")
    assert all(p.device.type == "cpu" for p in lm.model.parameters())
    assert generate(gpu_backend, prompts, max_new_tokens=6).tokens == cpu
    ids = torch.tensor([prompts[0]])
    ref = TorchBackend(trace(lm.model))(ids)
    got = gpu_backend(ids)
    assert got.device.type == "cpu"
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-9  # float64 model, other reduction order


def test_bad_device_is_a_clear_error(lm):
    with pytest.raises(ConfigError, match="cpu or cuda"):
        TorchBackend(trace(lm.model), device="tpu")


def test_cuda_logits_binding_reads_the_models_logits_output(tmp_path):
    """The CUDA backend binds a GPU tensor as ``logits`` each step: it takes the vocabulary size and dtype from
    the model's output, and names a model whose logits it cannot bind (a symbolic vocabulary, an integer
    type). The lookup is the same on any provider, so it is checked here on the CPU."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from lrexport.errors import LrexportError
    from lrexport.runtime.ort_backend import OrtBackend

    def model(vocab, dt):
        ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
        out = helper.make_tensor_value_info("logits", dt, ["batch", "seq", vocab])
        if isinstance(vocab, int):
            inits, ins = [helper.make_tensor("emb", dt, [7, vocab], np.arange(7 * vocab).tolist())], [ids]
        else:  # a table fed at run time: the vocabulary is not known until then
            inits, ins = [], [ids, helper.make_tensor_value_info("emb", dt, [7, vocab])]
        g = helper.make_graph([helper.make_node("Gather", ["emb", "input_ids"], ["logits"])], "m", ins, [out], inits)
        path = tmp_path / f"m_{vocab}_{dt}.onnx"
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(path))
        return OrtBackend(path, cache=[], max_len=8, use_library=False)

    assert model(5, TensorProto.FLOAT)._output_info("logits") == (5, torch.float32)
    assert model(9, TensorProto.FLOAT16)._output_info("logits") == (9, torch.float16)
    with pytest.raises(LrexportError, match="fixed vocabulary size"):
        model("vocab", TensorProto.FLOAT)._output_info("logits")
    with pytest.raises(LrexportError, match="float32 or float16 logits"):
        model(5, TensorProto.INT64)._output_info("logits")
    with pytest.raises(LrexportError, match="no 'scores' output"):
        model(5, TensorProto.FLOAT)._output_info("scores")
