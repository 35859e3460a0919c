"""Ahead-of-time GPU decode kernels (lrexport.kernels.aot): compiled at export on this CPU machine,
attached to the LowRankKVAttention nodes, and read intact by the library's CUDA kernel.

Running them needs a GPU: bench/gpu_check_ort.py checks nodes that carry them against the CPU
kernel and a float64 reference (bench/results/gpu_check_ort.json); here the emulated CUDA kernel
(-DLREXPORT_CUDA_EMULATE=ON) checks that ONNX Runtime hands it the cubin byte for byte.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lrexport import ortops
from lrexport.kernels import aot, triton_latent

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(triton_latent.triton is None, reason="compiling GPU kernels needs triton")


def _bench(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 2-layer float16 model with M-LRD latents (float and 4-bit caches), exported."""
    e2e = _bench("gpu_e2e")
    cfg = e2e.smoke_config(2, 96)
    work = tmp_path_factory.mktemp("aot")
    return {v: e2e.build_variant(v, cfg, "float16", work, "cpu")
            for v in ("lrexport", "lrexport_4bit", "lrexport_4bit_graph")}


def _lowrank_nodes(folder: Path):
    m = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return m, [n for n in m.graph.node if n.op_type == "LowRankKVAttention"]


def test_abi_matches_the_kernel_signature():
    """The launcher passes the kernel's run-time arguments in ABI_ARGS order: every parameter of
    _latent_attn_fwd that is not a compile-time constant, with S fixed to 1."""
    fn = triton_latent._latent_attn_fwd
    params = inspect.signature(fn.fn).parameters
    runtime = [n for n, p in params.items() if "constexpr" not in str(p.annotation) and n != "S"]
    assert tuple(runtime) == aot.ABI_ARGS
    # the C++ side lists the integer arguments in the same order (custom_ops/src/cuda/triton_aot.cc)
    ints = [n for n in aot.ABI_ARGS if n.startswith("s") or n in ("split_len", "nsplit", "RK", "RV")]
    cc = (REPO / "custom_ops" / "src" / "cuda" / "triton_aot.cc").read_text()
    listed = cc[cc.index("kIntArgs[kNumIntArgs] = {"):].split("};")[0]
    assert [s.strip().strip('"') for s in listed.split("{", 1)[1].split(",")] == ints


def _regcount(cubin: bytes) -> int:
    """Registers per thread of a cubin's kernel: its EIATTR_REGCOUNT (.nv.info: format 0x04, attribute 0x2f,
    8 bytes: symbol index, count)."""
    i = cubin.find(bytes([0x04, 0x2F, 0x08, 0x00]))
    assert i >= 0, "no register count in the cubin"
    return int.from_bytes(cubin[i + 8:i + 12], "little")


@pytest.mark.parametrize("variant,bits", [("lrexport", 0), ("lrexport_4bit", 4)])
def test_export_attaches_compiled_kernels(exported, variant, bits):
    folder = exported[variant]
    model, nodes = _lowrank_nodes(folder)
    assert len(nodes) == 2
    for n in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        meta = aot.parse_meta(attrs["cuda_kernel"].decode())
        assert meta["abi"] == str(aot.ABI) and meta["arch"] == "90" and meta["name"] == "_latent_attn_fwd"
        assert int(meta["shared"]) <= aot.SMEM_LIMIT[90] and meta["block_n"] == "64"
        assert attrs["cuda_cubin"][:4] == b"\x7fELF"  # a cubin is an ELF image
        # packed latents: capped at 168 registers per thread (three 4-warp blocks per multiprocessor)
        assert meta["maxnreg"] == ("168" if bits else "0")
        assert _regcount(attrs["cuda_cubin"]) <= (168 if bits else 255)
        # the split rule's programs per multiprocessor for the cache kind (triton_latent.decode_waves)
        assert (meta["waves"], meta["min_split"]) == ("8" if bits else "2", "512")
        spec = aot.node_spec(model, n)
        assert (spec.bits, spec.head_dim, spec.rk, spec.rv) == (bits, 32, 16, 16)  # smoke: D=32, M-LRD 50%
    info = json.loads((folder / "lrexport.json").read_text())["onnx"]["cuda_kernels"]
    assert info == {"arch": 90, "nodes": 2, "kernels": 1, "skipped": {},
                    "tuning": {"block_n": 64, "num_warps": 4, "num_stages": None, "waves": None, "min_split": 512,
                               "swap": True, "maxnreg": None, "split_ranks": "auto", "stage_tables": True,
                               "gluon": True, "gluon_narrow": True, "gluon_rel": False,
                               "gluon_ranks": True, "gluon_lazy": False, "gluon_tables": None}}


def test_cuda_graph_exports_compile_row_split_kernels(exported):
    """``--cuda-graph``: every attention node is LowRankKVAttentionDeviceLen and carries a kernel compiled with
    ROW_SPLITS (``row_splits=1`` in its metadata: the launcher then passes each row's own split length), under
    the same register cap; the standard export's kernels have ``row_splits=0``."""
    std, _ = _lowrank_nodes(exported["lrexport_4bit"])
    graph = onnx.load(str(exported["lrexport_4bit_graph"] / "model.onnx"), load_external_data=False)
    nodes = [n for n in graph.graph.node if n.op_type == "LowRankKVAttentionDeviceLen"]
    assert len(nodes) == 2 and not any(n.op_type == "LowRankKVAttention" for n in graph.graph.node)
    a_std = {a.name: onnx.helper.get_attribute_value(a) for a in _lowrank_nodes(exported["lrexport_4bit"])[1][0]
             .attribute}
    for n in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        meta = aot.parse_meta(attrs["cuda_kernel"].decode())
        assert meta["row_splits"] == "1" and meta["maxnreg"] == "168"
        assert aot.node_spec(graph, n).row_splits
        assert _regcount(attrs["cuda_cubin"]) <= 168 and attrs["cuda_cubin"] != a_std["cuda_cubin"]
    assert aot.parse_meta(a_std["cuda_kernel"].decode())["row_splits"] == "0"
    assert not aot.node_spec(std, _lowrank_nodes(exported["lrexport_4bit"])[1][0]).row_splits


def test_gluon_waves_from_the_cubins_registers(monkeypatch):
    """An export's Gluon kernel plans as many programs per multiprocessor as blocks of it fit: its registers (read
    from the cubin with Triton's cuobjdump) and shared memory; where cuobjdump is missing, the split rule's default
    for the cache kind, not an error."""
    from lrexport.kernels import gluon_latent

    monkeypatch.setattr(aot, "cubin_resources", lambda cubin: dict(registers=154, stack_bytes=0, local_bytes=0))
    assert aot.gluon_waves(b"", 68736, 2) == 3  # 154 registers, 67 KB: three blocks
    assert aot.gluon_waves(b"", 85120, 2) == 2  # 83 KB: two
    monkeypatch.setattr(aot, "cubin_resources", lambda cubin: dict(registers=200, stack_bytes=0, local_bytes=0))
    assert aot.gluon_waves(b"", 68736, 2) == 2  # 200 registers: two blocks of 128 threads fit 64K
    assert gluon_latent.blocks_per_sm(255, 1024) == 2 and gluon_latent.blocks_per_sm(32, 0) == 16

    def missing(cubin):
        raise FileNotFoundError("Triton's cuobjdump is missing")

    monkeypatch.setattr(aot, "cubin_resources", missing)
    assert aot.gluon_waves(b"", 68736, 2) == 2


def test_kernel_tuning_settings(exported, tmp_path, monkeypatch):
    """Other kernel settings (bench/retune.py, LREXPORT_CUDA_TUNING) compile another kernel and
    reach the metadata the launcher reads; bad settings are refused by name."""
    retune = _bench("retune")
    dst = tmp_path / "tuned"
    summary = retune.retune(exported["lrexport"], dst,
                            "block_n=32,num_warps=8,waves=6,min_split=512,swap=0,maxnreg=96")
    assert summary["tuning"] == {"block_n": 32, "num_warps": 8, "num_stages": None, "waves": 6, "min_split": 512,
                                 "swap": False, "maxnreg": 96, "split_ranks": "auto", "stage_tables": True,
                                 "gluon": True, "gluon_narrow": True, "gluon_rel": False,
                                 "gluon_ranks": True, "gluon_lazy": False, "gluon_tables": None}
    (_, before), (_, after) = _lowrank_nodes(exported["lrexport"]), _lowrank_nodes(dst)
    a0 = {a.name: onnx.helper.get_attribute_value(a) for a in before[0].attribute}
    a1 = {a.name: onnx.helper.get_attribute_value(a) for a in after[0].attribute}
    m1 = aot.parse_meta(a1["cuda_kernel"].decode())
    assert (m1["warps"], m1["block_n"], m1["waves"], m1["min_split"], m1["maxnreg"]) == ("8", "32", "6", "512", "96")
    assert _regcount(a1["cuda_cubin"]) <= 96
    assert a1["cuda_cubin"] != a0["cuda_cubin"] and a1["cuda_cubin"][:4] == b"\x7fELF"
    assert (dst / "model.onnx.data").samefile(exported["lrexport"] / "model.onnx.data")  # linked, not copied
    assert not dst.with_name("tuned.tmp").exists()
    monkeypatch.setenv(aot.TUNING_ENV, "waves=2")
    assert aot.Tuning.from_env() == aot.Tuning(waves=2)
    assert aot.Tuning.parse("split_ranks=kv").split_ranks == "kv"
    assert aot.Tuning.parse("split_ranks=none").split_ranks == ""
    assert aot.Tuning.parse("stage_tables=0").stage_tables is False
    for bad, msg in (("warps=4", "bad kernel tuning item 'warps=4'"), ("block_n=48", "kernel tuning out of range"),
                     ("maxnreg=300", "kernel tuning out of range"),
                     ("num_stages=x", "bad kernel tuning item"),
                     ("split_ranks=q", "bad kernel tuning item 'split_ranks=q': split_ranks is one of")):
        monkeypatch.setenv(aot.TUNING_ENV, bad)
        with pytest.raises(ValueError, match=f"{aot.TUNING_ENV}: {msg}"):
            aot.Tuning.from_env()


def test_no_kernels_when_asked_or_float32(tmp_path):
    e2e = _bench("gpu_e2e")
    cfg = e2e.smoke_config(1, 64)
    f32 = e2e.build_variant("lrexport", cfg, "float32", tmp_path / "f32", "cpu")
    _, nodes = _lowrank_nodes(f32)
    assert nodes and not any(a.name.startswith("cuda_") for n in nodes for a in n.attribute)
    assert "cuda_kernels" not in json.loads((f32 / "lrexport.json").read_text())["onnx"]
    # an explicit architecture on a float32 model: every node is skipped, with the reason
    model, nodes = _lowrank_nodes(f32)
    summary = aot.attach_cuda_kernels(model, 90)
    assert summary["nodes"] == 0 and all("float16" in why for why in summary["skipped"].values())


def test_unsupported_shapes_are_refused():
    spec = aot.DecodeSpec(num_heads=4, num_kv_heads=2, group_size=1, head_dim=32, rk=24, rv=16, bits=0,
                          quant_group=0, window=0, has_k_bias=False, k_width=48, v_width=32, kp_width=0, vp_width=0)
    assert "multiple of 16" in aot.supported(spec)
    with pytest.raises(ValueError, match="no Triton decode kernel"):
        aot.compile_decode(spec)


def _emulated_lib():
    lib = ortops.build(build_dir=REPO / "build" / "custom_ops-cuda-emulated", jobs=1,
                       extra_args=["-DLREXPORT_CUDA_EMULATE=ON"])
    assert "EMULATED" in ortops.last_cuda_status, ortops.last_cuda_status
    return lib


def test_kernel_attributes_reach_the_cuda_kernel(monkeypatch, capfd):
    """The emulated CUDA kernel receives the node's cubin intact (size and FNV-1a hash in its debug
    line; ONNX Runtime's string attributes are binary-safe), and a malformed cuda_kernel fails at
    session creation with a message that names it."""
    g = _bench("gpu_check_ort")
    lib = _emulated_lib()
    sh = g.Shape(s=2, bits=4, rk=32, rv=16, qg=8)
    rng = np.random.default_rng(0)
    feeds = dict(g.constants(rng, sh, np.float16), **g.initial_caches(rng, sh, np.float16),
                 **g.new_tokens(rng, sh, 1, np.float16), past_len=np.asarray([3, 7], np.int64))
    attrs = g.attributes(sh)
    extra = g.triton_attributes(sh, 90)
    monkeypatch.setenv("LREXPORT_OPS_DEBUG", "1")

    def session(a):
        so = ort.SessionOptions()
        so.register_custom_ops_library(str(lib))
        return ort.InferenceSession(g.make_model(feeds, a), so, providers=["CPUExecutionProvider"])

    sess = session({**attrs, **extra})
    out = sess.run(None, {k: v for k, v in feeds.items() if v is not None})[0]
    assert g.rel_err(out, g.reference(g.as_f32(feeds), attrs)[0]) < 3e-3
    err = capfd.readouterr().err
    assert f"{len(extra['cuda_cubin'])} cubin bytes (fnv1a {g.fnv1a(extra['cuda_cubin'])})" in err, err
    assert "not used for this call: an emulated CUDA kernel (no GPU)" in err

    bad = dict(attrs, cuda_kernel="abi=1 arch=90 warps=4", cuda_cubin=extra["cuda_cubin"])
    with pytest.raises(Exception, match="attribute cuda_kernel: no kernel name"):
        session(bad)
    with pytest.raises(Exception, match="cuda_kernel and cuda_cubin come together"):
        session(dict(attrs, cuda_kernel=extra["cuda_kernel"]))
    newer = dict(attrs, cuda_kernel=extra["cuda_kernel"].replace("abi=1", "abi=99"), cuda_cubin=extra["cuda_cubin"])
    sess = session(newer)  # another exporter's kernel: the CUDA C++ kernel runs
    out = sess.run(None, {k: v for k, v in feeds.items() if v is not None})[0]
    assert g.rel_err(out, g.reference(g.as_f32(feeds), attrs)[0]) < 3e-3
    assert "Triton decode kernel not used: abi=99" in capfd.readouterr().err


def test_export_float16_from_a_compressed_folder(tmp_path):
    """``lrexport export --dtype float16``: a float32 compressed folder exported for the GPU, its
    weights converted and the decode kernels attached (head dim 32, key ranks of 16)."""
    from lrexport import api
    from lrexport.allocate import Uniform
    from lrexport.calib.data import SelfCalibration
    from lrexport.kv.palu import PaluKV
    from tests.tiny import tiny_loaded

    lm = tiny_loaded("llama", seed=3, hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
    res = api.compress(model=lm, kv=PaluKV(allocation=Uniform(0.5), group_size=1), use_cache=False,
                       calibration=SelfCalibration(num_windows=4, window=16, fisher_windows=2))
    res.compressed.save(tmp_path / "compressed")
    out = api.export(model=tmp_path / "compressed", out=tmp_path / "onnx", dtype="float16")
    model = onnx.load(str(out.folder / "model.onnx"), load_external_data=False)
    weights = [t for t in model.graph.initializer if len(t.dims) >= 1 and np.prod(t.dims) > 1]
    floats = {t.data_type for t in weights} & {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    assert floats == {onnx.TensorProto.FLOAT16}  # (scalars such as the norms' epsilon stay float32)
    assert out.onnx_info["cuda_kernels"]["nodes"] == lm.spec.num_layers
    assert json.loads((out.folder / "lrexport.json").read_text())["dtype"] == "float16"
    with pytest.raises(Exception, match="dtype must be"):
        api.export(model=tmp_path / "compressed", out=tmp_path / "bad", dtype="int8")
    # kernel settings at export (lrexport export --cuda-tuning): in the metadata the launcher reads
    tuned = api.export(model=tmp_path / "compressed", out=tmp_path / "tuned", dtype="float16",
                       cuda_tuning="waves=6,min_split=512")
    _, nodes = _lowrank_nodes(tuned.folder)
    meta = aot.parse_meta(next(a.s for a in nodes[0].attribute if a.name == "cuda_kernel").decode())
    assert (meta["waves"], meta["min_split"]) == ("6", "512")
    assert tuned.onnx_info["cuda_kernels"]["tuning"]["waves"] == 6
    with pytest.raises(ValueError, match="--cuda-tuning: bad kernel tuning item 'wave=6'"):
        api.export(model=tmp_path / "compressed", out=tmp_path / "bad2", dtype="float16", cuda_tuning="wave=6")
    assert not (tmp_path / "bad2").exists()


def test_unaligned_ranks_warn_at_a_gpu_export(tmp_path, caplog):
    """Weight ranks that are not multiples of 8 keep float16 GEMMs off the tensor cores: a GPU
    export says so and names the option that fixes it."""
    import logging

    e2e = _bench("gpu_e2e")
    cfg = e2e.smoke_config(1, 64)
    with caplog.at_level(logging.WARNING, logger="lrexport.export"):
        folder = e2e.build_variant("lrexport_align1", cfg, "float16", tmp_path, "cpu")
    ranks = json.loads((folder / "lrexport.json").read_text())["weights"]["ranks"]
    assert any(r % 8 for r in ranks.values())
    assert "not multiples of 8" in caplog.text and "--align 16" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lrexport.export"):
        folder = e2e.build_variant("lrexport", cfg, "float16", tmp_path, "cpu")
    assert all(r % 16 == 0 for r in json.loads((folder / "lrexport.json").read_text())["weights"]["ranks"].values())
    assert "not multiples of 8" not in caplog.text


def test_grouped_latents_warn_at_a_gpu_export(caplog):
    """Latents shared by groups of KV heads make each head rebuild its keys from the whole group latent: a GPU
    export says so and names the option for per-head latents; per-head latents (and no latents) say nothing."""
    import logging
    from types import SimpleNamespace

    from lrexport.export import _warn_grouped_latents

    for kv, warned in (({"grouping": "G", "group_size": 4}, True), ({"grouping": "J", "group_size": 8}, True),
                       ({"grouping": "M", "group_size": 1}, False), (None, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lrexport.export"):
            _warn_grouped_latents(SimpleNamespace(plan=SimpleNamespace(kv=kv)))
        assert ("--kv-group 1" in caplog.text) == warned
        if warned:
            s = kv["group_size"]
            assert f"groups of {s} KV heads ({kv['grouping']}-LRD)" in caplog.text and f"about {s}x" in caplog.text


def test_split_ranks_reach_the_compiled_kernel(tmp_path):
    """``split_ranks`` and ``stage_tables`` in the kernel settings reach the ahead-of-time compile of the Triton
    kernel (``gluon=0``; rank 80 runs the Gluon one by default): at rank 80
    the split keys (64 + 16 channels) stage less shared memory than the keys padded to 128, and RoPE tables read
    outside the pipeline less again; bench/kernel_resources.py reads registers and shared memory from the cubins,
    and the instructions of their loop over tiles (no GPU)."""
    res = _bench("kernel_resources")
    out = tmp_path / "res.json"
    assert res.main(["--rk", "80", "--rv", "80", "--settings",
                     "gluon=0,split_ranks=none;gluon=0,split_ranks=k;gluon=0,split_ranks=k,stage_tables=0",
                     "--out", str(out)]) == 0
    padded, split, unstaged = json.loads(out.read_text())["rows"]
    assert split["shared_bytes"] < padded["shared_bytes"] <= aot.SMEM_LIMIT[90]
    # the RoPE table rows read outside the pipeline: no shared memory for them in every stage
    assert unstaged["shared_bytes"] < split["shared_bytes"]
    assert all(r["registers"] > 0 and r["blocks_per_sm"] >= 1 for r in (padded, split, unstaged))
    assert "| gluon=0,split_ranks=k | 64 | 4 |" in out.with_suffix(".md").read_text()
    # the SASS of the loop over tiles: the key rebuild, scores and P @ V are Hopper wgmma (HGMMA) instructions, its
    # copies asynchronous (LDGSTS), and the pipeline's stages are joined by barriers
    for r in (padded, split, unstaged):
        assert r["loop_instructions"] > 100 and r["loop_barriers"] >= 1
        assert r["loop_top"]["HGMMA"] >= 8 and sum(r["loop_top"].values()) <= r["loop_instructions"]
    assert "LDGSTS" in split["loop_top"]


@pytest.mark.parametrize("group_size,rank,on_chip,capped", [(1, 64, True, True), (4, 256, True, False),
                                                           (4, 352, False, False)])
def test_register_cap_only_for_small_k_up_slices_on_chip(group_size, rank, on_chip, capped):
    """4-bit kernels that keep a small ``k_up`` slice on chip (M-LRD, 16 KB) are capped at 168 registers per thread
    (three blocks per multiprocessor); those that keep a 64 KB slice (G-LRD groups of 4 at 50%, rank 256) or stream
    it (rank 352) are not: capped, they spill and run slower (bench/results/gpu_kernels_bits4.md,
    gpu_kernels_hoist.md). An explicit ``maxnreg`` wins either way."""
    spec = aot.DecodeSpec.for_caches(num_heads=32, num_kv_heads=8, group_size=group_size, head_dim=128, rk=rank,
                                     rv=rank, bits=4, quant_group=32)  # Llama-3-8B shapes
    cfg = triton_latent.kernel_config(S=1, D=128, nrep=4, rk=rank, rv=rank, bits=4, quant_group=32, itemsize=2)
    assert cfg["HOIST"] == on_chip
    kup = triton_latent.kup_on_chip(cfg, 2)
    assert kup == (rank * 128 * 2 if on_chip else 0)
    meta = aot.parse_meta(aot.compile_decode(spec, 90, aot.Tuning()).meta)
    assert meta["maxnreg"] == ("168" if capped else "0")
    assert triton_latent.decode_maxnreg(4, 4, None, kup) == (168 if capped else None)
    assert triton_latent.decode_maxnreg(4, 4, 200, kup) == 200 and triton_latent.decode_maxnreg(4, 4, 0, kup) is None
    assert triton_latent.decode_maxnreg(0, 4, None, kup) is None  # float latents: never capped by default
    assert triton_latent.decode_maxnreg(4, 8, None, kup) is None  # the cap was tuned at 4 warps


def test_benchmark_4bit_caches_are_whole_quantization_groups():
    """bench/gpu_kernels.py times packed caches an export can build: each rank of its default variants is whole
    quantization groups (groups of 32, halved until they divide the rank; PaluKV accepts 8-64), which is what
    the kernel's vector unpacking needs; the tables mark groups other than 32."""
    gk = _bench("gpu_kernels")
    from lrexport.allocate import Uniform
    from lrexport.kv.palu import PaluKV

    seen = set()
    for v in gk.DEFAULT_VARIANTS.split(","):
        red, g, bits = v.split(":")
        if not int(bits):
            continue
        rank = gk.floor16((1 - float(red)) * gk.GROUP[g] * 128)
        qg = gk.quant_group(rank)
        assert rank % qg == 0
        PaluKV(allocation=Uniform(ratio=float(red)), bits=int(bits), quant_group=qg)  # a group an export accepts
        seen.add((g, rank, qg))
    assert {("M", 80, 16), ("M", 64, 32), ("G", 352, 32), ("G", 256, 32)} <= seen
    assert gk._bits(dict(bits=4, quant_group=16)) == "4/16" and gk._bits(dict(bits=4, quant_group=32)) == "4"


def test_kv_ranks_just_past_64_warn_at_a_gpu_export(caplog):
    """The decode kernel's time follows the per-head rank padded to a power of two (ranks 80-128 took about 1.9x
    rank 64's time on an H200): a GPU export of per-head latents with ranks from 65 to 80 says so, naming a layer;
    ranks of 64 or less, or 96 and up, and grouped latents (streamed k_up) say nothing."""
    import logging
    from types import SimpleNamespace

    from lrexport.export import _warn_padded_kv_ranks

    cases = (({"0": [64, 64], "1": [72, 64], "2": [48, 80]}, "2 of 6 KV latent ranks", "layer 1, key rank 72"),
             ({"0": [64, 48], "1": [96, 128], "2": [32, 64]}, None, None),
             ({"0": [65, 64]}, "1 of 2", "layer 0, key rank 65"))
    for ranks, count, example in cases:
        for group_size in (1, 4):
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="lrexport.export"):
                _warn_padded_kv_ranks(SimpleNamespace(plan=SimpleNamespace(kv={"ranks": ranks,
                                                                               "group_size": group_size})))
            if count is None or group_size > 1:
                assert "just past 64" not in caplog.text
            else:
                assert count in caplog.text and example in caplog.text and "1.9x" in caplog.text
    caplog.clear()
    _warn_padded_kv_ranks(SimpleNamespace(plan=SimpleNamespace(kv=None)))  # no latent KV cache: nothing to say
    assert not caplog.text


def test_gluon_decode_loop_compiles_with_its_products_overlapped():
    """The Gluon decode kernels compile for sm_90 without a GPU: the library's (lrexport/kernels/gluon_latent.py,
    the two-ring forms; on the H200 1.07-1.17x faster than the Triton kernel with query rows padded to 8,
    bench/results/gpu_kernels_gluon.md)
    and bench/gluon_decode.py's single-ring one. The overlapped forms wait for fewer than all outstanding products,
    the other form always for all; the two-ring form stages little enough shared memory for two blocks per
    multiprocessor, the three-stage one does not. Numerics: tests/test_triton_kernels.py on an sm_90 GPU."""
    import os
    import subprocess

    pytest.importorskip("triton.experimental.gluon")
    env = {**os.environ, "TRITON_INTERPRET": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gluon_decode.py")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(rep["sync"]["waits"]) == {0}
    for form in ("overlap", "rings", "rings16"):
        assert 1 in rep[form]["waits"] and 2 in rep[form]["waits"], (form, rep[form]["waits"])
        assert rep[form]["cp_async"] > 0 and rep[form]["wgmma"] > 0
    per_sm = aot.SMEM_LIMIT[90]  # shared memory a block may take on sm_90; two blocks share the multiprocessor's
    assert 2 * rep["rings"]["shared"] <= per_sm < 2 * rep["sync"]["shared"]


def test_gluon_decode_kernel_compiles_ahead_of_time_for_the_launcher():
    """By default (``--cuda-tuning gluon=0`` turns it off) the export compiles the Gluon decode kernel
    (lrexport/kernels/gluon_latent.py) for the nodes it takes, with the Triton kernel's launcher arguments
    (aot.ABI_ARGS) and metadata, so the library launches it unchanged; other nodes (here rank 144, groups of 4,
    4-bit latents) and other architectures keep the Triton kernel. Its numerics through the library are checked
    on an sm_90 GPU (bench/gpu_check_ort.py), those of its PyTorch path by test_triton_kernels.py
    (test_gluon_decode_*)."""
    pytest.importorskip("triton.experimental.gluon")
    from lrexport.kernels import gluon_latent

    assert aot.Tuning().gluon and aot.Tuning().gluon_narrow and not aot.Tuning.parse("gluon=0").gluon
    gluon = aot.Tuning(gluon=True, gluon_narrow=False)
    for row_splits in (False, True):
        spec = aot.DecodeSpec.for_caches(num_heads=32, num_kv_heads=8, group_size=1, head_dim=128, rk=64, rv=64,
                                         row_splits=row_splits)
        assert aot.gluon_spec(spec)
        meta = aot.parse_meta(aot.compile_decode(spec, 90, gluon).meta)
        assert meta["kernel"] == "gluon" and meta["name"] == "_latent_attn_gluon"
        assert meta["row_splits"] == str(int(row_splits))
        assert int(meta["shared"]) <= aot.SMEM_LIMIT[90] // 2  # two blocks per multiprocessor
        assert (meta["block_n"], meta["rv_p"], meta["warps"], meta["abi"]) == ("64", "64", "4", str(aot.ABI))
    others = [dict(rk=144, rv=144), dict(group_size=4, rk=256, rv=256), dict(rk=64, rv=64, bits=4, quant_group=32)]
    for kw in others:
        spec = aot.DecodeSpec.for_caches(**{**dict(num_heads=32, num_kv_heads=8, group_size=1, head_dim=128), **kw})
        assert not aot.gluon_spec(spec)
        assert aot.parse_meta(aot.compile_decode(spec, 90, gluon).meta)["name"] == "_latent_attn_fwd"
    spec = aot.DecodeSpec.for_caches(num_heads=32, num_kv_heads=8, group_size=1, head_dim=128, rk=64, rv=64)
    assert aot.parse_meta(aot.compile_decode(spec, 80, gluon).meta)["name"] == "_latent_attn_fwd"
    # query rows padded to 8 (gluon_narrow=1): a smaller probability tile and query operands in shared memory, and
    # the tuning's split settings in the metadata the launcher plans from
    narrow = aot.Tuning.parse("gluon=1,gluon_narrow=1,waves=6")
    wide = aot.parse_meta(aot.compile_decode(spec, 90, gluon).meta)
    meta = aot.parse_meta(aot.compile_decode(spec, 90, narrow).meta)
    assert meta["kernel"] == "gluon" and int(meta["shared"]) < int(wide["shared"]) and meta["waves"] == "6"
    # by default one stage of table rows (gluon_latent.TABLE_STAGES): three blocks fit a multiprocessor, and the
    # split rule plans that many programs per multiprocessor; with query rows padded to 16, more registers: two
    compiled = aot.compile_decode(spec, 90, aot.Tuning())
    default = aot.parse_meta(compiled.meta)
    assert int(default["shared"]) <= aot.SMEM_LIMIT[90] // 3 - 1024
    registers = aot.cubin_resources(compiled.cubin)["registers"]
    assert default["waves"] == str(gluon_latent.blocks_per_sm(registers, int(default["shared"])))
    assert registers > 168 or default["waves"] == "3"
    # other ranks (by default; gluon_ranks=0: rank 64 only): rank 80 as a tile and a tail, partials in rows of 128
    # as the combine reads them, still two blocks per multiprocessor
    spec80 = aot.DecodeSpec.for_caches(num_heads=32, num_kv_heads=8, group_size=1, head_dim=128, rk=80, rv=80)
    assert aot.gluon_spec(spec80) and not aot.gluon_spec(spec80, all_ranks=False)
    triton80 = aot.parse_meta(aot.compile_decode(spec80, 90, aot.Tuning.parse("gluon_ranks=0")).meta)
    assert triton80["name"] == "_latent_attn_fwd"
    m80 = aot.parse_meta(aot.compile_decode(spec80, 90, aot.Tuning()).meta)
    assert m80["kernel"] == "gluon" and m80["rv_p"] == "128" and int(m80["shared"]) <= aot.SMEM_LIMIT[90] // 2 - 1024
    assert m80["waves"] == "2"  # three blocks do not fit its shared memory
    # the softmax maximum a tile late (gluon_lazy=1): still two blocks per multiprocessor
    lazy = aot.parse_meta(aot.compile_decode(spec, 90, aot.Tuning.parse("gluon_lazy=1")).meta)
    assert lazy["kernel"] == "gluon" and int(lazy["shared"]) <= aot.SMEM_LIMIT[90] // 2 - 1024
    # RoPE by relative position (gluon_rel=1): no table stages, three blocks per multiprocessor
    rel = aot.parse_meta(aot.compile_decode(spec, 90, aot.Tuning.parse("gluon_rel=1")).meta)
    assert rel["kernel"] == "gluon" and int(rel["shared"]) <= aot.SMEM_LIMIT[90] // 3 - 1024
