"""Triton latent-attention kernels against the float64 PyTorch reference.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set here
before triton is imported), which executes the same kernel code with numpy. The GPU run
of the same comparisons, in fp16/bf16, is ``bench/gpu_check.py``.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from lrexport.errors import CacheOverflowError, ShapeError  # noqa: E402
from lrexport.kv.quant import dequantize, quantize  # noqa: E402
from lrexport.trace.latent_attention_op import latent_attention_reference  # noqa: E402

tlk = pytest.importorskip("lrexport.kernels.triton_latent")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True, scope="module")
def _interpreter_scalars():
    """Triton's interpreter turns loop bounds into ints with ``int(array)``, which numpy >= 2.4
    refuses for its one-element scalars; read the element instead (interpreter only)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    from triton.runtime import interpreter

    orig = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    yield
    interpreter._patch_lang_tensor = orig


def make_case(*, B=2, S=1, Hq=4, Hkv=2, gs=1, D=32, rk=16, rv=12, P=48, past=(5, 17), bits=0, qg=8, bias=True,
              vup=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = Hkv // gs

    def rnd(*shape, s=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * s

    ang = torch.arange(P, dtype=torch.float64)[:, None] * (1 / 10000 ** (torch.arange(D // 2) / (D // 2)))[None]
    hist_k, hist_v = rnd(B, P, G * rk), rnd(B, P, G * rv)
    case = dict(q=rnd(B, S, Hq * D), lk=rnd(B, S, G * rk), lv=rnd(B, S, G * rv), k_up=rnd(G, rk, gs * D, s=rk ** -0.5),
                k_bias=rnd(Hkv * D) if bias else None, v_up=rnd(G, rv, gs * D) if vup else None,
                cos=ang.cos(), sin=ang.sin(), past=torch.tensor(past), Hq=Hq, Hkv=Hkv, gs=gs, D=D, bits=bits, qg=qg)
    if bits:
        case["ck"], case["pk"] = quantize(hist_k, bits, qg)
        case["cv"], case["pv"] = quantize(hist_v, bits, qg)
    else:
        case["ck"], case["pk"], case["cv"], case["pv"] = hist_k, None, hist_v, None
    return case


def reference(c, window=0):
    return latent_attention_reference(c["q"], c["lk"], c["lv"], c["ck"], c["pk"], c["cv"], c["pv"], c["past"],
                                      c["k_up"], c["k_bias"], c["v_up"], c["cos"], c["sin"], c["Hq"], c["Hkv"],
                                      c["gs"], window, c["D"] ** -0.5, c["bits"], c["qg"])


def run_kernel(c, dtype=torch.float32, window=0, **kw):
    kw.setdefault("hoist", c["gs"] == 1)  # both ways of reading k_up: on chip (M-LRD default) and streamed
    """The in-place kernel on copies of the case's caches; returns (out, ck, pk, cv, pv)."""
    def dev(x, float_dtype=dtype):
        if x is None:
            return None
        x = x.to(DEVICE)
        return x.to(float_dtype) if x.dtype == torch.float64 else x.clone()

    ck, cv = dev(c["ck"]), dev(c["cv"])
    pk, pv = dev(c["pk"]), dev(c["pv"])
    out = tlk.latent_attention_(dev(c["q"]), dev(c["lk"]), dev(c["lv"]), ck, pk, cv, pv, c["past"].to(DEVICE),
                                dev(c["k_up"]), dev(c["k_bias"]), dev(c["v_up"]), dev(c["cos"], torch.float32),
                                dev(c["sin"], torch.float32), c["Hq"], c["Hkv"], c["gs"], window, c["D"] ** -0.5,
                                c["bits"], c["qg"], **kw)
    return out.cpu(), ck.cpu(), None if pk is None else pk.cpu(), cv.cpu(), None if pv is None else pv.cpu()


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# fp32 kernel vs float64 reference: 1e-5 relative (fp32 accumulation over <= 64 positions)
TOL = 1e-5


@pytest.mark.parametrize("S,past", [(1, (5, 17)), (6, (0, 9)), (3, (20, 2))], ids=["decode", "prefill", "chunk"])
@pytest.mark.parametrize("gs,Hkv,Hq", [(1, 2, 4), (2, 2, 4), (2, 4, 8), (1, 3, 3)], ids=["M-gqa", "J-gqa", "G-gqa",
                                                                                         "M-mha"])
def test_float_cache_matches_reference(S, past, gs, Hkv, Hq):
    c = make_case(S=S, past=past, gs=gs, Hkv=Hkv, Hq=Hq, seed=S * 100 + gs * 10 + Hkv)
    ref = reference(c)
    got = run_kernel(c)
    assert rel_err(got[0], ref[0]) < TOL
    # the new latents were written at their positions, the rest untouched
    assert torch.allclose(got[1].double(), ref[1], atol=1e-6) and torch.allclose(got[3].double(), ref[3], atol=1e-6)


@pytest.mark.parametrize("bits,qg", [(2, 8), (3, 8), (4, 16), (8, 8)])
@pytest.mark.parametrize("S", [1, 5])
@pytest.mark.parametrize("vector_unpack", [True, False], ids=["vector", "gather"])
def test_quantized_cache_matches_reference(bits, qg, S, vector_unpack):
    c = make_case(S=S, bits=bits, qg=qg, gs=2, rv=16, past=(7, 30), seed=bits * 10 + S)
    ref = reference(c)
    out, ck, pk, cv, pv = run_kernel(c, vector_unpack=vector_unpack)
    assert rel_err(out, ref[0]) < TOL
    # packed codes and fp16 params of the new tokens are those of lrexport.kv.quant (bit-exact)
    assert torch.equal(ck, ref[1]) and torch.equal(cv, ref[3])
    assert torch.equal(pk, ref[2]) and torch.equal(pv, ref[4])
    assert torch.equal(dequantize(ck, pk, bits, qg, c["lk"].shape[-1]), dequantize(ref[1], ref[2], bits, qg,
                                                                                      c["lk"].shape[-1]))


def test_window_bias_and_v_up():
    c = make_case(S=4, past=(10, 3), vup=True, bits=8, qg=8, rv=16)
    ref = reference(c, window=6)
    assert rel_err(run_kernel(c, window=6)[0], ref[0]) < TOL


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("rk,rv", [(32, 16), (48, 24)], ids=["pow2", "padded"])
def test_quantized_mlrd_hoisted(bits, rk, rv):
    """k_up on chip with a padded rank, vector unpacking of whole quantization groups."""
    c = make_case(S=3, bits=bits, qg=8, gs=1, rk=rk, rv=rv, past=(12, 40), seed=bits + rk)
    ref = reference(c)
    out, ck, pk, cv, pv = run_kernel(c, hoist=True)
    assert rel_err(out, ref[0]) < TOL
    assert torch.equal(ck, ref[1]) and torch.equal(pv, ref[4])


def test_split_decode_long_cache():
    """Flash-decoding: several splits over a long cache, combined, rows of different lengths."""
    c = make_case(P=700, past=(650, 90), gs=2, Hq=6, Hkv=2, rk=32, seed=7)
    ref = reference(c)
    for splits in (1, 3, 5):
        for hoist in (False, True):
            for swap in (False, True):  # decode's MMA orientation: query rows, or positions, as the rows
                got = run_kernel(c, num_splits=splits, block_n=32, hoist=hoist, swap=swap)[0]
                assert rel_err(got, ref[0]) < TOL


def test_row_splits_from_capacity():
    """Splits planned from the cache's capacity and each row dividing its own length among them in the kernel (the
    ahead-of-time kernels of LowRankKVAttentionDeviceLen, which never read the lengths on the host): rows far
    shorter than the capacity, and one with nothing cached, against the float64 reference."""
    c = make_case(B=3, P=700, past=(650, 90, 0), gs=2, Hq=6, Hkv=2, rk=32, seed=9)
    ref = reference(c)
    for splits in (1, 4, 7):
        for hoist, swap in ((False, False), (True, True)):
            got = run_kernel(c, num_splits=splits, kv_max=700, row_splits=True, block_n=32, hoist=hoist,
                             swap=swap)[0]
            assert rel_err(got, ref[0]) < TOL


def test_no_bias_and_empty_rows():
    """A row with nothing cached yet (past 0) and no key bias."""
    c = make_case(S=1, past=(0, 4), bias=False)
    assert rel_err(run_kernel(c)[0], reference(c)[0]) < TOL


def test_functional_form_leaves_inputs():
    c = make_case(S=2, bits=4, qg=8, rv=16)
    ck0 = c["ck"].clone()
    args = [c[k] if not (torch.is_tensor(c[k]) and c[k].dtype == torch.float64) else c[k].float()
            for k in ("q", "lk", "lv", "ck", "pk", "cv", "pv", "past", "k_up", "k_bias", "v_up", "cos", "sin")]
    args = [a.to(DEVICE) if torch.is_tensor(a) else a for a in args]
    out, ck, pk, cv, pv = tlk.latent_attention(*args, c["Hq"], c["Hkv"], c["gs"], 0, c["D"] ** -0.5, 4, 8)
    assert torch.equal(args[3].cpu(), ck0) and not torch.equal(ck.cpu(), ck0)
    assert rel_err(out.cpu(), reference(c)[0]) < TOL


def test_errors():
    c = make_case(rk=24)
    with pytest.raises(ShapeError, match="multiple of 16"):
        run_kernel(c)
    c = make_case(D=48)
    with pytest.raises(ShapeError, match="power of two"):
        run_kernel(c)
    c = make_case(P=20, past=(19, 3), S=2)
    with pytest.raises(CacheOverflowError, match="exceeds the cache"):
        run_kernel(c)


@pytest.mark.parametrize("gs,Hkv,Hq,bits", [(1, 2, 2, 0), (1, 2, 4, 4), (2, 2, 6, 0), (4, 4, 8, 2)],
                         ids=["mha", "gqa-4bit", "nrep3", "J-2bit"])
def test_cuda_core_scores_decode(gs, Hkv, Hq, bits):
    """Decode with scores and P @ V on the CUDA cores (no 16-row MMA padding), splits combined."""
    c = make_case(S=1, gs=gs, Hkv=Hkv, Hq=Hq, bits=bits, qg=8, rv=16, P=300, past=(250, 37), seed=Hq + bits)
    ref = reference(c)
    for splits in (1, 3):
        out = run_kernel(c, cuda_core_scores=True, num_splits=splits, block_n=32)[0]
        assert rel_err(out, ref[0]) < TOL



@pytest.mark.parametrize("gs,Hkv,Hq,bits,window", [(1, 2, 2, 0, 0), (1, 2, 4, 4, 0), (2, 2, 6, 0, 40), (4, 4, 8, 2, 0)],
                         ids=["mha", "gqa-4bit", "nrep3-window", "J-2bit"])
def test_swapped_decode(gs, Hkv, Hq, bits, window):
    """Decode with the cached positions as the MMA rows (``k @ q^T``, ``v^T @ p^T``), splits combined."""
    c = make_case(S=1, gs=gs, Hkv=Hkv, Hq=Hq, bits=bits, qg=8, rv=16, P=300, past=(250, 37), seed=3 * Hq + bits)
    ref = reference(c, window=window)
    for splits in (1, 3):
        out = run_kernel(c, window=window, swap=True, num_splits=splits, block_n=32)[0]
        assert rel_err(out, ref[0]) < TOL


@pytest.mark.parametrize("rel_rope", [0, 1, 2], ids=["absolute", "relative", "relative-reload"])
@pytest.mark.parametrize("S,past,swap,window", [(1, (250, 37), True, 0), (1, (250, 37), False, 40),
                                                (5, (60, 0), False, 0), (4, (9, 31), False, 6)],
                         ids=["decode-swap", "decode-window", "prefill", "chunk-window"])
def test_rope_modes(rel_rope, S, past, swap, window):
    """RoPE at each key's position, or by relative angle (keys by their offset in the tile, queries by
    qpos - tile start), reach the same scores: against the float64 reference, with splits."""
    c = make_case(S=S, Hq=4, Hkv=2, rv=16, P=300, past=past, seed=S + rel_rope)
    ref = reference(c, window=window)
    for splits in (1, 3):
        out = run_kernel(c, window=window, swap=swap, num_splits=splits if S == 1 else None, block_n=32,
                         rel_rope=rel_rope)[0]
        assert rel_err(out, ref[0]) < TOL


@pytest.mark.parametrize("bits,qg", [(0, 8), (4, 16), (2, 8)], ids=["float", "4bit", "2bit"])
@pytest.mark.parametrize("gs,Hkv,Hq,window", [(1, 2, 8, 0), (2, 2, 4, 0), (1, 3, 3, 20)], ids=["M-gqa", "J-gqa",
                                                                                             "M-mha-window"])
def test_paired_rebuild(bits, qg, gs, Hkv, Hq, window):
    """Decode with the key rebuild and scores as one product each (k_up's columns i and D/2 + i side by side,
    RoPE pairing them in registers) against the float64 reference, with splits and a key bias."""
    c = make_case(Hq=Hq, Hkv=Hkv, gs=gs, rv=16, P=200, past=(150, 41), bits=bits, qg=qg, seed=7 + bits + gs + Hq)
    ref = reference(c, window=window)
    for splits in (1, 3):
        out = run_kernel(c, window=window, hoist=True, swap=True, pair=True, num_splits=splits, block_n=32)[0]
        assert rel_err(out, ref[0]) < TOL
    assert tlk.kernel_config(S=1, D=32, nrep=1, rk=16, rv=16, bits=0, quant_group=0, itemsize=2, pair=True)["PAIR"]
    # pairing needs the hoisted k_up slice and the swapped orientation; otherwise the halves stay separate
    assert not tlk.kernel_config(S=1, D=32, nrep=1, rk=16, rv=16, bits=0, quant_group=0, itemsize=2, pair=True,
                                 hoist=False)["PAIR"]
    assert not tlk.kernel_config(S=4, D=32, nrep=1, rk=16, rv=16, bits=0, quant_group=0, itemsize=2,
                                 pair=True)["PAIR"]


@pytest.mark.parametrize("bits,qg", [(2, 8), (4, 16), (8, 8)])
@pytest.mark.parametrize("gs,hoist", [(1, True), (2, False)], ids=["M-hoisted", "J-streamed"])
def test_float16_unpacking(bits, qg, gs, hoist):
    """Float16 models dequantize packed codes in float16 (``0x6400 | code`` is 1024 + code, minus 1024, then
    one fused multiply-add with the scale and zero point): against the float64 reference within float16
    rounding, and against the float32 dequantization path of the same kernel."""
    c = make_case(B=2, S=1, Hq=4, Hkv=2, gs=gs, rk=32, rv=32, P=160, past=(130, 57), bits=bits, qg=qg, seed=bits + gs)
    ref = reference(c)[0]
    half = run_kernel(c, dtype=torch.float16, hoist=hoist, num_splits=2, block_n=32)[0]
    wide = run_kernel(c, dtype=torch.float16, hoist=hoist, num_splits=2, block_n=32, unpack16=False)[0]
    # float16 inputs, products and outputs (2^-11 relative each): 1e-2 of the largest output
    assert rel_err(half, ref) < 1e-2
    # the two paths round each dequantized latent to float16 once; they differ at most where the float32
    # path rounds twice, and then by one float16 step
    assert rel_err(half, wide) < 2e-3


@pytest.mark.parametrize("bits,qg", [(0, 8), (4, 16)])
@pytest.mark.parametrize("gs,hoist", [(1, True), (2, False)], ids=["M-hoisted", "J-streamed"])
@pytest.mark.parametrize("rope16,lazy_sum", [(2, False), (0, True), (2, True)])  # (2, True): the decode default
def test_float16_rope_and_lazy_sums(bits, qg, gs, hoist, rope16, lazy_sum):
    """Decode with the keys' RoPE in float16 (two values per instruction on the GPU; plain float16 operations
    in the interpreter) and with the softmax sums kept per position until after the loop: against the float64
    reference within float16 rounding, and against the kernel without them (float32 RoPE, sums reduced per
    tile)."""
    c = make_case(B=2, S=1, Hq=8, Hkv=2, gs=gs, D=64, rk=32, rv=32, P=230, past=(200, 77), bits=bits, qg=qg,
                  seed=11 + bits + gs + rope16)
    # the reference sees the float16 inputs the kernel sees (so that the new tokens get the same codes)
    c = {k: v.half().double() if isinstance(v, torch.Tensor) and v.dtype == torch.float64 else v for k, v in c.items()}
    ref = reference(c)[0]
    base = run_kernel(c, dtype=torch.float16, hoist=hoist, num_splits=3, block_n=32, rope16=0, lazy_sum=False)[0]
    out = run_kernel(c, dtype=torch.float16, hoist=hoist, num_splits=3, block_n=32, rope16=rope16,
                     lazy_sum=lazy_sum)[0]
    # float16 inputs, keys and outputs (2^-11 relative each): 1e-2 of the largest output, as the default path
    assert rel_err(base, ref) < 1e-2
    assert rel_err(out, ref) < 1e-2
    # float16 RoPE rounds each product and sum of the key (a few float16 steps of the scores); the lazy sums
    # only reorder float32 additions
    assert rel_err(out, base) < (4e-3 if rope16 else 1e-4)
    cfg = tlk.kernel_config(S=1, D=64, nrep=4, rk=32, rv=32, bits=bits, quant_group=qg, itemsize=2,
                            rope16=rope16, lazy_sum=lazy_sum)
    assert cfg["LAZY_SUM"] == lazy_sum and bool(cfg["ROPE16"]) == bool(rope16)
    # prefill keeps the float32 RoPE and per-tile sums
    assert tlk.kernel_config(S=5, D=64, nrep=4, rk=32, rv=32, bits=bits, quant_group=qg, itemsize=2,
                             rope16=rope16, lazy_sum=lazy_sum)["ROPE16"] == 0


@pytest.mark.parametrize("bits,qg", [(0, 8), (4, 16)])
@pytest.mark.parametrize("rk,rv", [(80, 80), (48, 96), (96, 48)])
@pytest.mark.parametrize("gs,sides", [(1, "kv"), (1, "auto"), (2, "auto")], ids=["M-both", "M-auto", "G-auto"])
def test_split_ranks(bits, qg, rk, rv, gs, sides):
    """Ranks that are not powers of two run as a power-of-two chunk plus a narrow tail (80 = 64 + 16) instead
    of one product over the padded width: against the float64 reference, and against the padded kernel.
    "auto" splits the keys when k_up is hoisted (M-LRD) and the values when it is streamed (G-LRD)."""
    hoist = gs == 1
    c = make_case(B=2, S=1, Hq=4, Hkv=2, gs=gs, rk=rk, rv=rv, P=100, past=(90, 33), bits=bits, qg=qg,
                  seed=rk + rv + bits + gs)
    cfg = tlk.kernel_config(S=1, D=32, nrep=2, rk=rk, rv=rv, bits=bits, quant_group=qg, itemsize=4, hoist=hoist,
                            split_ranks=sides)
    rk_p, rv_p = tlk._next_pow2(rk), tlk._next_pow2(rv)
    want = "kv" if sides == "kv" else ("k" if hoist else "v")
    # the chunks cover the rank, are powers of two, and are narrower than the padding
    assert bool(cfg["RK_T"]) == ("k" in want) and bool(cfg["RV_T"]) == ("v" in want)
    if cfg["RK_T"]:
        assert rk <= cfg["RK_P"] + cfg["RK_T"] < rk_p and cfg["RK_P"] == rk_p // 2
    if cfg["RV_T"]:
        assert rv <= cfg["RV_A"] + cfg["RV_T"] < rv_p and cfg["RV_A"] == rv_p // 2
    ref = reference(c)
    split = run_kernel(c, num_splits=3, block_n=32, split_ranks=sides)
    padded = run_kernel(c, num_splits=3, block_n=32, split_ranks="")
    assert rel_err(split[0], ref[0]) < TOL
    assert rel_err(split[0], padded[0]) < TOL
    # the prefill orientation splits only the keys; its values keep the padded product
    pre = tlk.kernel_config(S=4, D=32, nrep=2, rk=rk, rv=rv, bits=bits, quant_group=qg, itemsize=4, hoist=hoist,
                            split_ranks=sides)
    assert pre["RK_T"] == cfg["RK_T"] and pre["RV_T"] == 0
    if hoist:
        c5 = make_case(B=2, S=5, Hq=4, Hkv=2, gs=1, rk=rk, rv=rv, P=60, past=(40, 3), bits=bits, qg=qg, seed=rk + 1)
        assert rel_err(run_kernel(c5, split_ranks=sides)[0], reference(c5)[0]) < TOL


@pytest.mark.parametrize("bits,qg", [(0, 8), (4, 16)])
@pytest.mark.parametrize("chunk", [16, 64])
def test_rank_chunk(bits, qg, chunk):
    """The streamed k_up's chunk loop takes 16-64 key ranks per step (``rank_chunk``): the same attention as the
    float64 reference and as the default chunk (32 here); a chunk that does not divide the rank is refused."""
    c = make_case(B=2, S=1, Hq=4, Hkv=2, gs=2, rk=128, rv=64, P=100, past=(90, 33), bits=bits, qg=qg,
                  seed=chunk + bits)
    cfg = dict(S=1, D=32, nrep=2, rv=64, bits=bits, quant_group=qg, itemsize=4, hoist=False)
    assert tlk.kernel_config(rk=128, rank_chunk=chunk, **cfg)["RKB"] == chunk
    assert tlk.kernel_config(rk=128, **cfg)["RKB"] == 32
    ref = reference(c)
    out = run_kernel(c, num_splits=3, block_n=32, rank_chunk=chunk)
    assert rel_err(out[0], ref[0]) < TOL
    assert rel_err(out[0], run_kernel(c, num_splits=3, block_n=32)[0]) < TOL
    for bad, rk in ((48, 96), (64, 96), (128, 128)):
        with pytest.raises(ValueError, match="rank_chunk must be 16, 32 or 64 and divide the key rank"):
            tlk.kernel_config(rk=rk, rank_chunk=bad, **cfg)


def test_hoist_defaults():
    """k_up slices up to 32 KB stay on chip; 16-bit decode keeps them up to 64 KB (G-LRD 50%, rank 256 of groups
    of 4 at D=128, ran faster hoisted on an H200, float and 4-bit latents); prefill, float32 and larger slices
    stream them in chunks."""
    def hoisted(rk, bits=0, S=1, itemsize=2):
        return tlk.kernel_config(S=S, D=128, nrep=4, rk=rk, rv=rk, bits=bits, quant_group=32,
                                 itemsize=itemsize)["HOIST"]

    assert hoisted(64) and hoisted(128) and hoisted(64, bits=4) and hoisted(128, bits=4)  # 32 KB and less
    assert hoisted(256) and hoisted(192) and hoisted(256, bits=4)  # 64 KB: 16-bit decode
    assert not hoisted(256, S=4) and not hoisted(256, itemsize=4) and not hoisted(256, bits=4, S=4)
    assert not hoisted(352) and not hoisted(352, bits=4) and not hoisted(512)  # padded to 512: 128 KB


def test_split_ranks_only_where_they_save():
    cfg = dict(S=1, D=128, nrep=4, itemsize=2, split_ranks="kv")
    # a tail as wide as the padding saves nothing: 112 = 64 + 64 stays one 128-wide product
    assert tlk.kernel_config(rk=112, rv=112, bits=0, quant_group=0, **cfg)["RK_T"] == 0
    assert tlk.kernel_config(rk=64, rv=64, bits=0, quant_group=0, **cfg)["RV_T"] == 0
    # packed caches split only along whole quantization groups: 80 = 64 + 16 is not at groups of 32
    packed = tlk.kernel_config(rk=80, rv=96, bits=4, quant_group=32, **cfg)
    assert packed["RK_T"] == 0 and packed["RK_P"] == 128
    assert packed["RV_T"] == 32 and packed["RV_A"] == 64
    # each side on its own
    cfg.pop("split_ranks")
    keys = tlk.kernel_config(rk=80, rv=80, bits=0, quant_group=0, split_ranks="k", **cfg)
    values = tlk.kernel_config(rk=80, rv=80, bits=0, quant_group=0, split_ranks="v", **cfg)
    assert (keys["RK_T"], keys["RV_T"], values["RK_T"], values["RV_T"]) == (16, 0, 0, 16)
    assert tlk.kernel_config(rk=80, rv=80, bits=0, quant_group=0, split_ranks="", **cfg)["RK_T"] == 0
    with pytest.raises(ValueError, match="split_ranks"):
        tlk.kernel_config(rk=80, rv=80, bits=0, quant_group=0, split_ranks="x", **cfg)


@pytest.mark.parametrize("bits,qg", [(0, 8), (4, 16)])
def test_unstaged_rope_tables(bits, qg):
    """Decode with the RoPE table rows read outside the pipeline (``stage_tables=False``): the same attention as
    the float64 reference and as the staged kernel."""
    c = make_case(B=2, S=1, Hq=4, Hkv=2, gs=1, rk=80, rv=48, P=100, past=(90, 33), bits=bits, qg=qg, seed=5 + bits)
    ref = reference(c)
    staged = run_kernel(c, num_splits=3, block_n=32)
    unstaged = run_kernel(c, num_splits=3, block_n=32, stage_tables=False)
    assert rel_err(unstaged[0], ref[0]) < TOL
    assert rel_err(unstaged[0], staged[0]) < TOL
    assert not tlk.kernel_config(S=1, D=32, nrep=2, rk=80, rv=48, bits=bits, quant_group=qg, itemsize=4,
                                 stage_tables=False)["STAGE_TABLES"]


@pytest.mark.parametrize("mode", ["ptr", "tma", "ahead", "ahead_async"])
def test_decode_probe_forms_match_float64(mode):
    """Each form of bench/decode_probe.py's lean decode kernel (pointer loads, tensor descriptors whose row count
    is the split's end, the next tile's keys rebuilt ahead) against its float64 reference, on fresh random float16
    inputs: a length that is not a multiple of the tile, three splits, a cache longer than the length (positions
    past it hold large values that must not leak in). Tolerance: float16 rounding of keys and probabilities."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "decode_probe.py"
    spec = importlib.util.spec_from_file_location("decode_probe", path)
    probe = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("decode_probe", probe)
    spec.loader.exec_module(probe)
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=DEVICE))
    g = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, ())))
    B, Hq, Hkv, D, R, L = 2, 8, 2, 128, 64, 203
    ck = torch.randn(B, L + 40, Hkv * R, generator=g)
    cv = torch.randn(B, L + 40, Hkv * R, generator=g)
    ck[:, L:], cv[:, L:] = 3e4, 3e4
    ang = torch.arange(L + 40.0)[:, None] * (1 / 10000 ** (torch.arange(D // 2) / (D // 2)))[None]
    args = [t.half().to(DEVICE) for t in (torch.randn(B, Hq, D, generator=g), ck, cv,
                                          torch.randn(Hkv, R, D, generator=g) / R ** 0.5, ang.cos(), ang.sin())]
    ref = probe.reference(*args, L)
    out = probe.lean_decode(mode, *args, L, nsplit=3)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    assert err < 5e-3, f"{mode}: relative error {err:.2e}"


def _gluon_ready() -> bool:
    from lrexport.kernels import gluon_latent

    return gluon_latent.supported(S=1, D=128, rk=64, rv=64, bits=0, group_size=1, nrep=4, dtype=torch.float16,
                                  has_bias=False, window=0, device=torch.device(DEVICE))


def test_decode_splits_fill_whole_waves():
    """The decode split rule (the C++ launcher's plan_triton computes the same): at most ``waves`` programs per
    multiprocessor, rounded down, splits of whole tiles and at least ``min_split`` positions, at least one split per
    row, unless that leaves the wave less than 3/4 full: then up to four waves, as full as they come; float
    per-head latents default to 2 per multiprocessor (one wave of two resident blocks), packed and grouped latents
    to 8."""
    plan = functools.partial(tlk.split_plan, S=1, kv_max=65536, block_n=64, num_sms=132)
    assert plan(batch=8, num_kv_heads=8, waves=2) == (4, 16384)  # 256 programs: one wave of 264
    assert plan(batch=1, num_kv_heads=8, waves=2) == (32, 2048)  # 33 rounded to whole tiles
    assert plan(batch=8, num_kv_heads=8, waves=8) == (16, 4096)
    assert plan(batch=8, num_kv_heads=32, waves=2) == (1, 65536)  # 256 programs: one wave of 264, 97% full
    # 256 rows and three resident blocks (396 slots): one split leaves the wave 65% full, three fill two waves 97%
    assert plan(batch=8, num_kv_heads=32, waves=3) == (3, 21888)
    assert plan(batch=8, num_kv_heads=8, waves=3) == (6, 10944)  # 384 programs of 396
    assert plan(batch=1, num_kv_heads=8, waves=2, kv_max=16384) == (32, 512)  # the shortest split
    assert plan(batch=1, num_kv_heads=8, waves=2, kv_max=16384, min_split=1024) == (16, 1024)
    for _ in range(200):
        B, Hkv = int(torch.randint(1, 33, ())), int(torch.randint(1, 33, ()))
        kv, waves = int(torch.randint(1, 200000, ())), int(torch.randint(1, 17, ()))
        n, length = plan(batch=B, num_kv_heads=Hkv, waves=waves, kv_max=kv, min_split=512)
        assert length % 64 == 0 and (n - 1) * length < kv <= n * length
        rows, slots = B * Hkv, waves * 132
        one_wave = max(1, min(slots // rows, -(-kv // 512)))
        full = 4 * rows * one_wave >= 3 * -(-rows * one_wave // slots) * slots
        assert n == 1 or (rows * n <= slots if full else rows * n <= 4 * slots)
        if not full:  # the waves the plan fills are at least as full as with one split per row's wave
            assert rows * n * -(-rows * one_wave // slots) >= rows * one_wave * -(-rows * n // slots)
    assert (tlk.decode_waves(1, 0), tlk.decode_waves(1, 4), tlk.decode_waves(4, 0)) == (2, 8, 8)
    assert tlk.split_plan(S=7, batch=1, num_kv_heads=8, kv_max=65536, block_n=32, num_sms=132) == (1, 65536)


def test_gluon_query_row_padding():
    """The Gluon kernel pads a KV head's query rows to 8 only when asked (``narrow`` or ``NARROW_ROWS``, off until
    timed on a GPU) and when they fit; otherwise to 16, the most it takes."""
    from lrexport.kernels import gluon_latent

    assert [gluon_latent.query_rows(n, True) for n in (1, 4, 8, 9, 16)] == [8, 8, 8, 16, 16]
    assert [gluon_latent.query_rows(n, False) for n in (1, 8, 16)] == [16, 16, 16]
    assert gluon_latent.query_rows(4) == (8 if gluon_latent.NARROW_ROWS else 16)


def test_gluon_kernel_refuses_what_it_does_not_take():
    """``gluon=True`` asks for the Gluon decode kernel; a step it does not take (here: value rank 12, head dim 32,
    and on a machine without an sm_90 GPU every step) is an error naming its shape rules, not a silent fallback.
    Its ranks: 16 to 128 in steps of 16, all of which run it by default."""
    from lrexport.kernels import gluon_latent

    assert [r for r in range(8, 145, 8) if gluon_latent.rank_ok(r)] == list(range(16, 129, 16))
    assert gluon_latent.preferred(64, 64) and gluon_latent.preferred(80, 80) and gluon_latent.preferred(64, 48)
    assert not gluon_latent.preferred(64, 12) and not gluon_latent.preferred(144, 64)
    for r in range(16, 129, 16):  # the partials' rows, as the combine kernel reads them
        assert gluon_latent.acc_rows(r) == tlk.kernel_config(S=1, D=128, nrep=4, rk=r, rv=r, bits=0, quant_group=1,
                                                             itemsize=2)["RV_P"]
    c = make_case(S=1, bias=False)
    with pytest.raises(ValueError, match="Gluon decode kernel takes"):
        run_kernel(c, gluon=True)


@pytest.mark.skipif(not torch.cuda.is_available() or not _gluon_ready(), reason="the Gluon kernel needs an sm_90 GPU")
@pytest.mark.parametrize("narrow,rel,maxnreg,tables", [(False, False, None, 2), (True, False, None, 2),
                                                       (True, False, None, 1), (False, False, None, 1),
                                                       (True, True, None, None), (False, True, None, None),
                                                       (True, True, 168, None)],
                         ids=["rows16", "rows8", "rows8-tables1", "rows16-tables1", "rows8-rel", "rows16-rel",
                              "rows8-rel-168regs"])
@pytest.mark.parametrize("Hq,Hkv,splits", [(32, 8, None), (32, 32, 4), (16, 2, 1)])
def test_gluon_decode_matches_reference(Hq, Hkv, splits, narrow, rel, maxnreg, tables):
    """The Gluon decode kernel (M-LRD, rank 64, float16) against the float64 reference and the Triton kernel on
    fresh random inputs: rows of different lengths (one shorter than a tile, one not a multiple of it), one or
    several splits, query rows padded to 16 or to 8 (where they fit: 8 query heads per KV head pad to 16), RoPE
    by table row per key (copied with the key latents two tiles ahead, or into one stage a tile ahead) or by
    relative position (the tables are rotary embeddings'), with or without a register cap.
    Tolerance: float16 rounding of the keys, their RoPE and the probabilities."""
    seed = int(torch.randint(0, 2 ** 31, ()))
    c = make_case(B=3, S=1, Hq=Hq, Hkv=Hkv, gs=1, D=128, rk=64, rv=64, P=2600, past=(2500, 37, 1473), bias=False,
                  seed=seed)
    ref = reference(c)

    def run(gluon):
        h = {k: (v.to(DEVICE, torch.float16) if torch.is_tensor(v) and v.dtype == torch.float64 else v)
             for k, v in c.items()}
        ck, cv = h["ck"].clone(), h["cv"].clone()
        return tlk.latent_attention_(h["q"], h["lk"], h["lv"], ck, None, cv, None, c["past"].to(DEVICE),
                                     h["k_up"], None, None, h["cos"], h["sin"], Hq, Hkv, 1, 0, 128 ** -0.5, 0, 0,
                                     num_splits=splits, gluon=gluon, gluon_narrow=narrow, gluon_rel=rel,
                                     maxnreg=maxnreg, gluon_table_stages=tables).cpu()

    got = run(True)
    assert tlk.last_kernel == "gluon"
    triton_out = run(False)
    assert tlk.last_kernel == "triton"
    assert rel_err(got, ref[0]) < 5e-3, f"seed {seed}"
    assert rel_err(got, triton_out) < 5e-3, f"seed {seed}"


@pytest.mark.skipif(not torch.cuda.is_available() or not _gluon_ready(), reason="the Gluon kernel needs an sm_90 GPU")
def test_gluon_resident_blocks():
    """The blocks of the Gluon kernel that fit a multiprocessor, which the split rule plans its programs per
    multiprocessor from: three at rank 64 with one stage of table rows and query rows padded to 8 (the default),
    two with two stages, as the registers and shared memory of the compiled kernel give them."""
    from lrexport.kernels import gluon_latent

    c = make_case(B=2, S=1, Hq=32, Hkv=8, gs=1, D=128, rk=64, rv=64, P=256, past=(200, 100), bias=False)
    h = {k: (v.to(DEVICE, torch.float16) if torch.is_tensor(v) and v.dtype == torch.float64 else v)
         for k, v in c.items()}
    args = (h["q"], h["ck"], h["cv"], h["k_up"], h["cos"], h["sin"], c["past"].to(DEVICE, torch.int32))
    opts = dict(num_kv_heads=8, nrep=4, qk_scale=1.0)
    assert gluon_latent.TABLE_STAGES == 1 and gluon_latent.resident_blocks(*args, **opts) == 3
    assert gluon_latent.resident_blocks(*args, table_stages=2, **opts) == 2
    assert gluon_latent.blocks_per_sm(154, 68736) == 3 and gluon_latent.blocks_per_sm(164, 85120) == 2


@pytest.mark.skipif(not torch.cuda.is_available() or not _gluon_ready(), reason="the Gluon kernel needs an sm_90 GPU")
@pytest.mark.parametrize("const", [True, False], ids=["const-strides", "runtime-strides"])
def test_gluon_decode_strided_caches(const):
    """The Gluon decode kernel on caches that are views into wider buffers (position strides 48 elements past their
    widths), with the strides compiled in as constants (the default; each distinct stride its own kernel) or passed
    at run time, against the float64 reference on fresh random inputs. Tolerance as
    test_gluon_decode_matches_reference."""
    seed = int(torch.randint(0, 2 ** 31, ()))
    c = make_case(B=3, S=1, Hq=32, Hkv=8, gs=1, D=128, rk=64, rv=80, P=2600, past=(2500, 37, 1473), bias=False,
                  seed=seed)
    ref = reference(c)
    h = {k: (v.to(DEVICE, torch.float16) if torch.is_tensor(v) and v.dtype == torch.float64 else v)
         for k, v in c.items()}

    def wide(x):  # the same values in a buffer 48 elements wider per position
        buf = torch.full((x.shape[0], x.shape[1], x.shape[2] + 48), float("nan"), dtype=x.dtype, device=x.device)
        buf[..., :x.shape[2]] = x
        return buf[..., :x.shape[2]]

    ck, cv = wide(h["ck"]), wide(h["cv"])
    assert ck.stride(1) == ck.shape[2] + 48 and not ck.is_contiguous()
    got = tlk.latent_attention_(h["q"], h["lk"], h["lv"], ck, None, cv, None, c["past"].to(DEVICE), h["k_up"], None,
                                None, h["cos"], h["sin"], 32, 8, 1, 0, 128 ** -0.5, 0, 0, num_splits=3, gluon=True,
                                gluon_const_strides=const).cpu()
    assert tlk.last_kernel == "gluon"
    assert rel_err(got, ref[0]) < 5e-3, f"seed {seed}"


@pytest.mark.skipif(not torch.cuda.is_available() or not _gluon_ready(), reason="the Gluon kernel needs an sm_90 GPU")
@pytest.mark.parametrize("tables", [1, 2], ids=["tables1", "tables2"])
@pytest.mark.parametrize("rk,rv", [(80, 80), (48, 48), (128, 128), (80, 64), (64, 96), (32, 16)])
def test_gluon_decode_other_ranks(rk, rv, tables):
    """The Gluon decode kernel at key / value ranks other than 64 (by default, as rank 64): ranks below 64 as
    zero-padded tiles of 64 channels, ranks above as a tile and a tail (keys: a second rebuild product of 16, 32
    or 64 channels; values: a second P @ V product), with one or two stages of table rows, against the float64
    reference and the Triton kernel on fresh random inputs, rows of different lengths over several splits.
    Tolerance as test_gluon_decode_matches_reference."""
    seed = int(torch.randint(0, 2 ** 31, ()))
    c = make_case(B=3, S=1, Hq=32, Hkv=8, gs=1, D=128, rk=rk, rv=rv, P=2600, past=(2500, 37, 1473), bias=False,
                  seed=seed)
    ref = reference(c)

    def run(gluon):
        h = {k: (v.to(DEVICE, torch.float16) if torch.is_tensor(v) and v.dtype == torch.float64 else v)
             for k, v in c.items()}
        return tlk.latent_attention_(h["q"], h["lk"], h["lv"], h["ck"].clone(), None, h["cv"].clone(), None,
                                     c["past"].to(DEVICE), h["k_up"], None, None, h["cos"], h["sin"], 32, 8, 1, 0,
                                     128 ** -0.5, 0, 0, num_splits=3, gluon=gluon,
                                     gluon_table_stages=tables).cpu()

    got = run(True)
    assert tlk.last_kernel == "gluon"
    triton_out = run(False)
    assert rel_err(got, ref[0]) < 5e-3, f"seed {seed}"
    assert rel_err(got, triton_out) < 5e-3, f"seed {seed}"


@pytest.mark.skipif(not torch.cuda.is_available() or not _gluon_ready(), reason="the Gluon kernel needs an sm_90 GPU")
@pytest.mark.parametrize("narrow", [True, False], ids=["rows8", "rows16"])
@pytest.mark.parametrize("Hq,Hkv,rk,rv,spike", [(32, 8, 64, 64, 0.0), (32, 8, 64, 64, 8.0), (16, 2, 80, 128, 8.0),
                                                (32, 32, 48, 64, 8.0)])
def test_gluon_decode_lazy_max(Hq, Hkv, rk, rv, spike, narrow):
    """The Gluon decode kernel with its softmax maximum a tile late (``gluon_lazy``; probabilities against the
    maximum of the tiles before, a new reference only where a score exceeds it by more than 2^15) against the
    float64 reference and the kernel's per-tile maximum, on fresh random inputs: rows of different lengths over
    several splits, and (``spike``) the key latents of each row's second half scaled up, so that their scores
    (in base 2, about 5 at most in the first half, about 40 in the second) exceed the maximum so far by more
    than the limit, which takes the new-reference path mid-split; value ranks above 64 (the second value
    product). Tolerance: against the kernel's per-tile maximum (the same float16 keys) as
    test_gluon_decode_matches_reference; against the float64 reference too, or, with scores near 40, 3e-2
    (float16 keys shift such scores by about 40 * 2^-11, probabilities by a few percent)."""
    seed = int(torch.randint(0, 2 ** 31, ()))
    c = make_case(B=3, S=1, Hq=Hq, Hkv=Hkv, gs=1, D=128, rk=rk, rv=rv, P=2600, past=(2500, 37, 1473), bias=False,
                  seed=seed)
    if spike:
        for b, n in enumerate((2500, 37, 1473)):
            c["ck"][b, n // 2:n] *= spike
    ref = reference(c)

    def run(lazy):
        h = {k: (v.to(DEVICE, torch.float16) if torch.is_tensor(v) and v.dtype == torch.float64 else v)
             for k, v in c.items()}
        return tlk.latent_attention_(h["q"], h["lk"], h["lv"], h["ck"].clone(), None, h["cv"].clone(), None,
                                     c["past"].to(DEVICE), h["k_up"], None, None, h["cos"], h["sin"], Hq, Hkv, 1, 0,
                                     128 ** -0.5, 0, 0, num_splits=3, gluon=True, gluon_narrow=narrow,
                                     gluon_lazy=lazy).cpu()

    got = run(True)
    assert tlk.last_kernel == "gluon"
    per_tile = run(False)
    assert torch.isfinite(got).all()
    assert rel_err(got, ref[0]) < (3e-2 if spike else 5e-3), f"seed {seed}"
    assert rel_err(got, per_tile) < 5e-3, f"seed {seed}"


def test_gluon_kernel_failure_falls_back_to_triton(monkeypatch, caplog):
    """Gluon is an experimental Triton API: where the Gluon kernel fails to build or launch, a decode step it would
    take runs the Triton kernel (same result as asking for Triton) with one warning naming the error, and later
    steps do not try again; with ``gluon=True`` the error is raised. The failure is simulated: this checks the
    fallback, and the kernel itself is checked on an sm_90 GPU (test_gluon_decode_matches_reference)."""
    import logging

    from lrexport.kernels import gluon_latent

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no such Gluon op in this Triton")

    monkeypatch.setattr(gluon_latent, "supported", lambda **kw: True)
    monkeypatch.setattr(gluon_latent, "preferred", lambda rk, rv: True)
    monkeypatch.setattr(gluon_latent, "decode_partials", broken)
    monkeypatch.setattr(gluon_latent, "resident_blocks", lambda *a, **kw: 2)  # it compiles the kernel for a GPU
    monkeypatch.setattr(gluon_latent, "failure", None)
    c = make_case(S=1, bias=False, seed=int(torch.randint(0, 2 ** 31, ())))
    h = {k: (v.to(DEVICE, torch.float16) if torch.is_tensor(v) and v.dtype == torch.float64 else v)
         for k, v in c.items()}  # float16 throughout, tables included, as the Gluon kernel takes

    def run(**kw):
        return tlk.latent_attention_(h["q"], h["lk"], h["lv"], h["ck"].clone(), None, h["cv"].clone(), None,
                                     c["past"].to(DEVICE), h["k_up"], None, None, h["cos"], h["sin"], c["Hq"],
                                     c["Hkv"], 1, 0, c["D"] ** -0.5, 0, 0, **kw).cpu()

    with caplog.at_level(logging.WARNING, logger="lrexport.kernels.gluon_latent"):
        got, again = run(), run()
    assert tlk.last_kernel == "triton"
    want = run(gluon=False)
    assert torch.equal(got, want) and torch.equal(again, want)
    assert len(calls) == 1 and caplog.text.count("the Gluon decode kernel failed") == 1
    assert "no such Gluon op" in gluon_latent.failure
    with pytest.raises(RuntimeError, match="no such Gluon op"):
        run(gluon=True)
