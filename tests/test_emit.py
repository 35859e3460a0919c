"""ONNX emission: ORT with the custom-op library, ORT without it (the fallback bodies) and the
PyTorch graph agree, for prefill plus 32 decode steps of a batch of 2 prompts of different
lengths, M/G/J groupings, float and quantized latents, and ranks that change mid-generation."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from lrexport.compile import CompressedModel
from lrexport.export import export_onnx, load_onnx_backend
from lrexport.factorize.registry import Factors
from lrexport.passes.latent_kv import LatentKVPass
from lrexport.passes.lowrank_linear import LowRankLinearPass
from lrexport.plan import Plan
from lrexport.runtime.torch_backend import TorchBackend
from lrexport.trace.export import trace
from tests.test_latent_kv import GQA, exact_layers
from tests.tiny import VOCAB, tiny_loaded

REL = 1e-4  # fp32: max |a - b| / max |b| over each step's logits
STEPS = 32
CASES = {  # name: (group_size, bits, low-rank weights with a rank input)
    "dense": (None, None, False),
    "M-float-ranks": (1, None, True),
    "M-2bit": (1, 2, False),
    "G-float": (2, None, False),
    "G-4bit": (2, 4, False),
    "J-float": (4, None, False),
    "J-3bit-ranks": (4, 3, True),
}


def _build(case: str, tmp_path_factory, cuda_graph: bool = False):
    s, bits, ranks = CASES[case]
    lm = tiny_loaded("llama", seed=31, **GQA)
    tg = trace(lm.model)
    if ranks:
        mods = dict(lm.model.named_modules())
        facs = {}
        for name in lm.spec.linear_names():
            if name.endswith(("gate_proj", "up_proj", "down_proj", "q_proj")):
                U, S_, Vh = torch.linalg.svd(mods[name].weight.detach(), full_matrices=False)
                facs[name] = Factors((U[:, :16] * S_[:16]).contiguous(), Vh[:16].contiguous())
        LowRankLinearPass(facs, rank_input=True)(tg)
    if s is not None:
        LatentKVPass(exact_layers(lm, s, rank=4 * s), bits=bits, quant_group=8)(tg)
    plan = Plan(model=lm.spec.hf_config, source={"kind": "test"}, max_len=lm.model.max_len)
    cm = CompressedModel(graph=tg, plan=plan, spec=lm.spec, factors={}, dense_state={})
    torch_backend = TorchBackend(tg)
    folder = tmp_path_factory.mktemp(case) / "onnx"
    res = export_onnx(cm, folder, cuda_graph=cuda_graph)
    return torch_backend, folder, res


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    return request.param, *_build(request.param, tmp_path_factory)


def _drive(backend, prompts, steps, rank_schedule):
    """Prefill a right-padded batch, then decode ``steps`` tokens (greedy from row 0's backend
    is not needed: the tokens are fixed in advance); returns the logits of every step."""
    B = len(prompts)
    L = max(len(p) for p in prompts)
    ids = torch.zeros(B, L, dtype=torch.int64)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(p)
    caches = backend.new_caches(B, L + steps + 1)
    ranks = rank_schedule(0)
    logits, caches = backend.step(ids, torch.zeros(B, dtype=torch.int64), caches, ranks)
    out = [torch.stack([logits[b, len(p) - 1] for b, p in enumerate(prompts)]).double()]
    pos = torch.tensor([len(p) for p in prompts])
    g = torch.Generator().manual_seed(9)
    for t in range(1, steps + 1):
        nxt = torch.randint(0, VOCAB, (B, 1), generator=g)
        logits, caches = backend.step(nxt, pos, caches, rank_schedule(t))
        out.append(logits[:, -1].double())
        pos = pos + 1
    return out


def test_ort_library_fallback_and_torch_agree(exported):
    case, torch_backend, folder, res = exported
    rank_max = torch_backend.rank_max

    def schedule(t):  # full stored rank, then a lower one from step 12 on
        return None if not rank_max else [r if t < 12 else max(1, r // 2) for r in rank_max]

    prompts = [list(range(3, 12)), list(range(20, 25))]
    ref = _drive(torch_backend, prompts, STEPS, schedule)
    for use_library in (True, False):
        ort_backend, meta = load_onnx_backend(folder, use_library=use_library)
        got = _drive(ort_backend, prompts, STEPS, schedule)
        for t, (a, b) in enumerate(zip(got, ref)):
            err = float((a - b).abs().max() / b.abs().max())
            assert err < REL, (case, use_library, t, err)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    if CASES[case][0] is None:
        assert "LowRankKVAttention" not in ops and "DenseAttention" not in ops  # inlined standard ops
    else:
        assert "LowRankKVAttention" in ops and any(f.name == "LowRankKVAttention" for f in model.functions)
    assert model.ir_version == 10
    info = json.loads((folder / "lrexport.json").read_text())["onnx"]
    assert info["inputs"][:2] == ["input_ids", "past_len"] and info["outputs"][0] == "logits"
    assert ("ranks" in info["inputs"]) == bool(rank_max)


def test_ort_backend_binds_the_caches_once(exported):
    """Steps over the same cache buffers reuse one IO binding (only the token ids, lengths and ranks
    are rebound); each step's logits are a fresh array that the next step does not overwrite; new
    buffers get a new binding, and the results do not depend on the reuse."""
    _, _, folder, _ = exported
    backend, _ = load_onnx_backend(folder)
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, VOCAB, (2, 6), generator=g)
    nxt = [torch.randint(0, VOCAB, (2, 1), generator=g) for _ in range(3)]

    def run(reuse: bool):
        caches = backend.new_caches(2, 16)
        logits, caches = backend.step(prompt, torch.zeros(2, dtype=torch.int64), caches, None)
        first = backend._binding
        kept = [logits]
        for t, ids in enumerate(nxt):
            if not reuse:  # the same contents in new buffers: a new binding every step
                caches = [c.copy() for c in caches]
            logits, caches = backend.step(ids, torch.full((2,), 6 + t, dtype=torch.int64), caches, None)
            kept.append(logits)
            assert (backend._binding is first) == reuse
        return kept

    reused = run(True)
    snapshot = [x.clone() for x in reused]
    fresh = run(False)
    for a, b, c in zip(reused, snapshot, fresh):
        assert torch.equal(a, b)  # not overwritten by later steps
        assert torch.equal(a, c)  # reuse changes nothing


def test_export_is_atomic_and_checked(tmp_path, monkeypatch):
    lm = tiny_loaded("llama", seed=32)
    tg = trace(lm.model)
    cm = CompressedModel(graph=tg, plan=Plan(model=lm.spec.hf_config, source={}), spec=lm.spec, factors={},
                         dense_state={})
    import lrexport.export as ex

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ex.onnx.checker, "check_model", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_onnx(cm, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    np.testing.assert_equal(len(list(tmp_path.iterdir())), 0)


def test_cuda_device_keeps_caches_on_gpu_or_says_why(exported):
    """On a machine with onnxruntime-gpu: the CUDA backend (caches on the GPU, in place) agrees with
    the PyTorch graph; elsewhere asking for it is a clear error naming the missing provider."""
    import onnxruntime as ort

    from lrexport.errors import LrexportError

    case, torch_backend, folder, res = exported
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(LrexportError, match="CUDAExecutionProvider"):
            load_onnx_backend(folder, providers=cuda)
        return
    backend, _ = load_onnx_backend(folder, providers=cuda)
    assert backend.device == "cuda"
    prompts = [list(range(3, 12)), list(range(20, 25))]
    ref = _drive(torch_backend, prompts, 8, lambda t: None)
    got = _drive(backend, prompts, 8, lambda t: None)
    for t, (a, b) in enumerate(zip(got, ref)):
        assert float((a - b).abs().max() / b.abs().max()) < REL, (case, t)


def test_cuda_backend_needs_the_library(exported):
    from lrexport.errors import LrexportError, PlanError

    case, torch_backend, folder, res = exported
    with pytest.raises(LrexportError, match="custom-op library"):
        load_onnx_backend(folder, use_library=False, providers=["CUDAExecutionProvider"])
    with pytest.raises(PlanError, match="--cuda-graph"):  # its attention reads past_len on the host
        load_onnx_backend(folder, providers=["CUDAExecutionProvider"], cuda_graph=True)


def test_cuda_graph_export_refuses_a_rank_schedule(tmp_path_factory):
    """CUDA graphs cannot capture a model whose ranks are an input (ONNX Runtime runs their shape computations on
    the CPU): ``--cuda-graph`` says so at export, and the CUDA backend refuses ``cuda_graph=True`` for it."""
    from lrexport.errors import LrexportError, PassError
    from lrexport.runtime.ort_backend import OrtBackend

    with pytest.raises(PassError, match="progressive rank schedule"):
        _build("M-float-ranks", tmp_path_factory, cuda_graph=True)
    with pytest.raises(LrexportError, match="rank input"):
        OrtBackend("unused.onnx", cache=[], max_len=8, rank_max=[4], providers=["CUDAExecutionProvider"],
                   cuda_graph=True)


@pytest.mark.parametrize("case", ["M-2bit", "G-4bit"])
def test_device_lengths_export(case, tmp_path_factory):
    """``cuda_graph=True`` (``lrexport export --cuda-graph``): every attention node is
    LowRankKVAttentionDeviceLen, whose fallback body the model carries under that name, and the folder says
    so. On the CPU (the library's kernel, and the fallback body) it computes what the PyTorch graph does,
    prefill and 32 decode steps. CUDA graphs themselves need the CUDA provider: asking for them on the CPU is
    an error that names it."""
    from lrexport.errors import LrexportError

    torch_backend, folder, res = _build(case, tmp_path_factory, cuda_graph=True)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    assert "LowRankKVAttention" not in ops and ops.count("LowRankKVAttentionDeviceLen") == layers
    assert "LowRankKVAttentionDeviceLen" in {f.name for f in model.functions}
    assert json.loads((folder / "lrexport.json").read_text())["onnx"]["cuda_graph"] is True
    rank_max = torch_backend.rank_max

    def schedule(t):
        return None if not rank_max else [r if t < 12 else max(1, r // 2) for r in rank_max]

    prompts = [list(range(3, 12)), list(range(20, 25))]
    ref = _drive(torch_backend, prompts, STEPS, schedule)
    for use_library in (True, False):
        backend, _ = load_onnx_backend(folder, use_library=use_library)
        assert not backend.cuda_graph  # the default on the CPU
        got = _drive(backend, prompts, STEPS, schedule)
        for t, (a, b) in enumerate(zip(got, ref)):
            err = float((a - b).abs().max() / b.abs().max())
            assert err < REL, (case, use_library, t, err)
    with pytest.raises(LrexportError, match="CUDAExecutionProvider"):
        load_onnx_backend(folder, cuda_graph=True)


def test_fused_norms_and_standard_ops_agree(tmp_path):
    """The default export fuses each residual Add + RMSNorm (2 per layer; the first norm has no
    Add) into SkipSimplifiedLayerNormalization; ``fuse_matmuls=True`` also joins the projections that
    read one input into one MatMul + Split (q with the key and value latents, gate with up: 2 per
    layer); ``fuse_norms=False`` (and the default ``fuse_matmuls=False``) keeps one node per op. Both
    give the same logits under ONNX Runtime, and the same as the PyTorch graph."""
    lm = tiny_loaded("llama", seed=5, **GQA)
    tg = trace(lm.model)
    LatentKVPass(exact_layers(lm, 2, rank=8), bits=None, quant_group=8)(tg)
    plan = Plan(model=lm.spec.hf_config, source={"kind": "test"}, max_len=lm.model.max_len)
    cm = CompressedModel(graph=tg, plan=plan, spec=lm.spec, factors={}, dense_state={})
    torch_backend = TorchBackend(tg)
    prompts = [list(range(4, 15)), list(range(30, 36))]
    ref = _drive(torch_backend, prompts, 8, lambda t: None)
    counts = {}
    for fuse in (True, False):
        folder = tmp_path / f"fused{int(fuse)}"
        export_onnx(cm, folder, fuse_norms=fuse, fuse_matmuls=fuse)
        model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        ops = [n.op_type for n in model.graph.node]
        counts[fuse] = (ops.count("SkipSimplifiedLayerNormalization"), ops.count("Split"), ops.count("MatMul"))
        backend, _ = load_onnx_backend(folder)
        for t, (a, b) in enumerate(zip(_drive(backend, prompts, 8, lambda t: None), ref)):
            err = float((a - b).abs().max() / b.abs().max())
            assert err < REL, (fuse, t, err)
    L = lm.spec.num_layers
    assert counts[True][:2] == (2 * L, 2 * L) and counts[False][:2] == (0, 0)
    assert counts[False][2] - counts[True][2] == 3 * L  # per layer 5 MatMuls -> 2
