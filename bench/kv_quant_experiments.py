"""Experiments on quantized KV latents (the 3-bit and 2-bit rows of ``bench/quality.py``).

    python bench/kv_quant_experiments.py --experiment split   # which of K / V suffers at low bits
    python bench/kv_quant_experiments.py --experiment clip    # MSE-searched clipping of each group
    python bench/kv_quant_experiments.py --experiment rotation  # other rotations than the block Hadamard
    python bench/kv_quant_experiments.py --experiment mixed     # more bits for leading groups, same average

Both run the best 50% KV setting of the quality table (J-LRD, FLRC ranks, Hadamard on) and
report WikiText-2 perplexity with the quality benchmark's settings (40 windows of 512 tokens).
They change the quantizer of the PyTorch path only (the reference op that runs on the CPU),
so they measure quality, not a deployable layout:

* ``split``: caches at 8 bits, and one of the key / value latents fake-quantized first to
  ``b`` bits with the product's quantizer (``lrexport.kv.quant``). Rows: none, K at 3, V at
  3, K at 2, V at 2 bits. 8-bit rounding adds about 1/255 of each group's range.
* ``clip``: the product's layout and dequantization, but each group's range is searched:
  ``K`` candidates shrink ``[min, max]`` about its centre by ``1 - k/16`` (k < K) and the one
  with the least squared error in the group is stored (``--search shrink``); ``grid`` trims
  each end independently by ``k/32`` of the range (8 x 8 candidates). Rows at 3 and 2 bits,
  for each search of ``--search`` and each group size of ``--groups``.
* ``rotation``: the product's quantizer and layout with other orthogonal rotations folded
  into the latent projections in place of the product's (any orthogonal ``R`` folds:
  ``A' = R A``, ``k_up' = R k_up``): the block Hadamard after random sign flips; after an
  interleaving permutation (quantization group ``g`` takes channels ``g, g + n, g + 2n, ...``,
  so every group mixes leading and trailing singular directions); and one seeded random
  orthogonal matrix over the whole latent. Rows at ``--bits`` (3 by default). The interleaved
  one won and is now the product's rotation (``lrexport.kv.quant.interleaved_hadamard``).
* ``mixed``: caches at 8 bits, and both latents fake-quantized first with the product's
  quantizer at 3 bits in every group, or with 4, 3 and 2 bits for the first, middle and last
  thirds of the quantization groups (in singular-value order, which the block Hadamard
  keeps; an average of 3 bits per channel, the same bytes as 3 bits when packed). This
  measures what a per-group bit allocation would gain before any cache layout supports it.

* ``fp8``: keys rebuilt from FP8 (e4m3) operands, as an FP8 tensor-core product would rebuild them (twice
  the bfloat16/float16 rate on an H100/H200): ``k_up`` in e4m3 with one scale per RoPE pair of columns
  (columns ``d`` and ``d + D/2`` of a head share it, so the scale commutes with RoPE and folds into the
  query), and the key latents as cached, in e4m3 either raw (no scale: what a kernel can convert on the fly)
  or with one scale per token and latent group (an upper bound). With 4-bit latents the codes are exact in
  e4m3 and the groups' scales and zero points apply after the product, so only ``k_up``'s rounding counts.
  Rows for M-LRD and J-LRD at 50% (float caches) and J-LRD with 4-bit latents. The values are untouched.

Writes ``bench/results/kv_quant_experiments_<experiment>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402

import lrexport.trace.latent_attention_op as op  # noqa: E402
from lrexport.allocate import Flrc  # noqa: E402
from lrexport.kv import quant  # noqa: E402
from lrexport.kv.palu import PaluKV  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _range_search(x: torch.Tensor, bits: int, group: int, trims: list[tuple[float, float]]):
    """``lrexport.kv.quant.quantize`` with each group's range searched over ``trims``: pairs of
    fractions of the range cut from the bottom and the top; the least squared (float32
    reconstruction) error is stored, ties keep the first."""
    R = x.shape[-1]
    xg = x.float().reshape(*x.shape[:-1], R // group, group)
    lo, hi = xg.amin(-1), xg.amax(-1)
    levels = (1 << bits) - 1
    span = hi - lo
    best = None
    for low, high in trims:
        scale = ((span * (1 - low - high)) / levels).clamp_min(1e-8).half()
        zero = (lo + span * low).half()
        sf, zf = scale.float()[..., None], zero.float()[..., None]
        q = torch.round((xg - zf) / sf).clamp(0, levels)
        err = ((q * sf + zf) - xg).square().sum(-1)
        if best is None:
            best = (err, q, scale, zero)
        else:
            m = err < best[0]
            best = (torch.where(m, err, best[0]), torch.where(m[..., None], q, best[1]),
                    torch.where(m, scale, best[2]), torch.where(m, zero, best[3]))
    _, q, scale, zero = best
    return quant.pack(q.reshape(x.shape).long(), bits), torch.cat([scale, zero], dim=-1)


def clip_quantize(x: torch.Tensor, bits: int, group: int, candidates: int = 8):
    """The range shrunk about its centre by ``k/16`` (k < ``candidates``)."""
    return _range_search(x, bits, group, [(k / 32, k / 32) for k in range(candidates)])


def grid_quantize(x: torch.Tensor, bits: int, group: int, steps: int = 8):
    """``steps`` trims of the lower end times ``steps`` of the upper end, each ``k/32`` of the
    range (so ``steps**2`` candidates, asymmetric ones included). The product's 2-bit quantizer
    (``lrexport.kv.quant``) searches the same candidates, with the error of the codes' levels."""
    return _range_search(x, bits, group, [(a / 32, b / 32) for a in range(steps) for b in range(steps)])


def group_bits(plan: str, n: int) -> list[int]:
    """Bits of each of ``n`` quantization groups: 3 everywhere, or 4/3/2 by thirds (average 3 when
    ``n % 3 != 1``; otherwise one more group at 3)."""
    if plan == "uniform 3":
        return [3] * n
    k = n // 3 + (n % 3 == 2)
    return [4] * k + [3] * (n - 2 * k) + [2] * k


def fake_quant_groups(x: torch.Tensor, plan: str, group: int) -> torch.Tensor:
    """Quantize-dequantize ``x [..., R]`` group by group with the product's quantizer at each group's bits."""
    R = x.shape[-1]
    parts = []
    for g, bits in enumerate(group_bits(plan, R // group)):
        xg = x[..., g * group:(g + 1) * group]
        codes, p = quant.quantize(xg, bits, group)
        parts.append(quant.dequantize(codes, p, bits, group, group, x.dtype))
    return torch.cat(parts, -1)


ROTATIONS = ("block hadamard", "signs + block hadamard", "interleave + block hadamard", "random orthogonal")


def rotation(name: str, width: int, block: int, dtype=torch.float64) -> torch.Tensor:
    """An orthogonal ``[width, width]`` rotation of the latent channels (see the module doc)."""
    g = torch.Generator().manual_seed(width)
    H = quant.block_hadamard(width, block, dtype)
    if name == "block hadamard":
        return H
    if name == "signs + block hadamard":
        signs = torch.randint(0, 2, (width,), generator=g).to(dtype) * 2 - 1
        return H * signs[None, :]
    if name == "interleave + block hadamard":
        return quant.interleaved_hadamard(width, block, dtype)
    q, r = torch.linalg.qr(torch.randn(width, width, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))[None, :]).to(dtype)


def fine_quantize(x: torch.Tensor, bits: int, group: int):
    """The grid's range of trims (up to 15/64 of the range from each end) in steps of 1/64: 256 candidates."""
    return _range_search(x, bits, group, [(a / 64, b / 64) for a in range(16) for b in range(16)])


def wide_quantize(x: torch.Tensor, bits: int, group: int):
    """Trims of up to 11/32 of the range from each end, in steps of 1/32: 144 candidates."""
    return _range_search(x, bits, group, [(a / 32, b / 32) for a in range(12) for b in range(12)])


SEARCHES = {"none": (functools.partial(quant.quantize, search=False), ""), "shrink": (clip_quantize, ", clip search"),
            "grid": (grid_quantize, ", clip grid search"), "fine": (fine_quantize, ", fine grid search"),
            "wide": (wide_quantize, ", wide grid search"),
            "product": (functools.partial(quant.quantize, search=True), ", the product's search")}


E4M3_MAX = 448.0


def e4m3(x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` rounded to float8 e4m3 (saturating at +-448) after division by ``scale`` (broadcast), then scaled back."""
    y = x.float() if scale is None else x.float() / scale
    y = y.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()
    return (y if scale is None else y * scale).to(x.dtype)


def pair_scales(k_up: torch.Tensor, head_dim: int) -> torch.Tensor:
    """One e4m3 scale per RoPE pair of ``k_up``'s columns ([G, rk, s*D] -> broadcastable [G, 1, s*D]): the
    largest magnitude of columns ``d`` and ``d + D/2`` of each head over the ranks, over 448."""
    G, _, E = k_up.shape
    amax = k_up.abs().amax(1).view(G, E // head_dim, 2, head_dim // 2).amax(2, keepdim=True)
    amax = amax.expand(G, E // head_dim, 2, head_dim // 2).reshape(G, 1, E)
    return (amax / E4M3_MAX).clamp_min(1e-12)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", choices=("split", "clip", "rotation", "mixed", "fp8"), required=True)
    ap.add_argument("--bits", default=None, help="rotation, clip: latent bits to run (default 3; clip: 3,2)")
    ap.add_argument("--ppl-windows", type=int, default=40)
    ap.add_argument("--groups", default="32", help="clip: quantization group sizes to run (e.g. 32,16)")
    ap.add_argument("--search", default="none,shrink",
                    help="clip: range searches to run: none, shrink (8 symmetric shrinks), grid (8 x 8 trims of "
                         "each end), fine (16 x 16 trims, steps of 1/64), wide (12 x 12 trims), product "
                         "(lrexport.kv.quant's search)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = args.out or str(RESULTS / f"kv_quant_experiments_{args.experiment}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    qargs = argparse.Namespace(set="kv", ratios="0.1", kv_ratios="0.5", delta=0.4, ppl_windows=args.ppl_windows,
                               xsum=0, article_tokens=384, zeroshot="", zeroshot_limit=0, calib_windows=32,
                               strs_windows=2, strs_window=256, xsum_rows="", only=None, append=False,
                               resume=False, quick=False, out=out + "_work", merge=None, device="cpu")
    bench = quality.Bench(qargs)
    best = dict(allocation=Flrc(0.5), group_size=bench.lm.spec.num_kv_heads)  # kv-J-flrc-50%
    rows = []

    def record(name: str, kv: PaluKV, **info) -> None:
        res = bench.run(quality.Row(name, kv=kv))
        rows.append({"name": name, "ppl": res["ppl"], "kv_bytes_per_token": res["kv_bytes_per_token"], **info})
        write(out, args, rows)

    if args.experiment == "split":
        plain_store = op._store
        state = {"which": None, "bits": 0, "calls": 0}

        def store(cache, params, new, pos, bits, quant_group, width):  # the op stores K, then V
            which = "k" if state["calls"] % 2 == 0 else "v"
            state["calls"] += 1
            if which == state["which"]:
                codes, p = quant.quantize(new, state["bits"], quant_group)
                new = quant.dequantize(codes, p, state["bits"], quant_group, new.shape[-1], new.dtype)
            return plain_store(cache, params, new, pos, bits, quant_group, width)

        op._store = store
        for which, bits in ((None, 0), ("k", 3), ("v", 3), ("k", 2), ("v", 2)):
            state.update(which=which, bits=bits, calls=0)
            tag = f"{which.upper()}{bits}" if which else "none"
            record(f"8bit-cache, {tag}", PaluKV(**best, bits=8), fake_quantized=which, fake_bits=bits or None)
    elif args.experiment == "mixed":
        plain_store = op._store
        state = {"plan": None}

        def store(cache, params, new, pos, bits, quant_group, width):
            if state["plan"]:
                new = fake_quant_groups(new, state["plan"], quant_group)
            return plain_store(cache, params, new, pos, bits, quant_group, width)

        op._store = store
        for plan in ("uniform 3", "4/3/2"):
            state["plan"] = plan
            record(f"8bit-cache, {plan}", PaluKV(**best, bits=8), fake_bits=plan)
        op._store = plain_store
    elif args.experiment == "fp8":
        plain_store, plain_ref = op._store, op.latent_attention_reference
        state = {"latents": None, "k_up": False, "calls": 0}

        def store(cache, params, new, pos, bits, quant_group, width):  # the op stores K, then V
            cache, params, full = plain_store(cache, params, new, pos, bits, quant_group, width)
            which = "k" if state["calls"] % 2 == 0 else "v"
            state["calls"] += 1
            if which == "k" and state["latents"] == "raw":
                full = e4m3(full)
            elif which == "k" and state["latents"] == "token":
                G = state["groups"]
                rows = full.view(*full.shape[:-1], G, full.shape[-1] // G)
                scale = (rows.abs().amax(-1, keepdim=True).float() / E4M3_MAX).clamp_min(1e-12)
                full = e4m3(rows, scale).view(full.shape)
            return cache, params, full

        def reference(query, lk, lv, ck, pk, cv, pv, past, k_up, *rest):
            if state["k_up"]:
                num_heads = rest[4]
                k_up = e4m3(k_up, pair_scales(k_up, query.shape[-1] // num_heads))
            return plain_ref(query, lk, lv, ck, pk, cv, pv, past, k_up, *rest)

        op._store, op.latent_attention_reference = store, reference
        Hkv = bench.lm.spec.num_kv_heads
        settings = [("M", 1, 0), ("J", Hkv, 0), ("J", Hkv, 4)]
        modes = [("float", None, False), ("k_up e4m3", None, True), ("k_up + latents e4m3 (raw)", "raw", True),
                 ("k_up + latents e4m3 (per-token scales)", "token", True)]
        for grouping, gs, bits in settings:
            for label, latents, kup in modes:
                if bits and latents:  # 4-bit codes are exact in e4m3
                    continue
                state.update(latents=latents, k_up=kup, calls=0, groups=Hkv // gs)
                tag = f"-{bits}bit" if bits else ""
                name = f"kv-{grouping}-flrc-50%{tag}, {label.replace('float', 'as cached') if bits else label}"
                record(name, PaluKV(allocation=Flrc(0.5), group_size=gs, bits=bits or None), grouping=grouping,
                       bits=bits, fp8_k_up=kup, fp8_latents=latents)
        op._store, op.latent_attention_reference = plain_store, plain_ref
    elif args.experiment == "rotation":
        from lrexport.kv import palu

        plain = palu.interleaved_hadamard
        for bits in map(int, (args.bits or "3").split(",")):
            for name in ROTATIONS:
                palu.interleaved_hadamard = lambda width, block, dtype=torch.float64, name=name: rotation(
                    name, width, block, dtype)
                record(f"{bits}bit-g32, {name}", PaluKV(**best, bits=bits), bits=bits, rotation=name)
        palu.interleaved_hadamard = plain
    else:
        bits_list = [int(b) for b in (args.bits or "3,2").split(",")]
        for bits, group in ((b, int(g)) for g in args.groups.split(",") for b in bits_list):
            for search in args.search.split(","):
                op.quantize, label = SEARCHES[search]
                record(f"{bits}bit-g{group}{label}", PaluKV(**best, bits=bits, quant_group=group), bits=bits,
                       quant_group=group, clip_search=search != "none", search=search)
        op.quantize = quant.quantize
    return 0


def write(out: str, args, rows: list[dict]) -> None:
    doc = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": quality.machine("cpu"),
           "command": " ".join(["python", "bench/kv_quant_experiments.py", *sys.argv[1:]]),
           "setting": ("M-LRD and J-LRD (kv-M/J-flrc-50%), FLRC ranks, 50% of K/V dims removed, Hadamard on for the "
                       "4-bit rows" if args.experiment == "fp8" else
                       "kv-J-flrc-50% (J-LRD, FLRC ranks, 50% of K/V dims removed, Hadamard on)") + "; "
                      f"WikiText-2 test, {args.ppl_windows} windows of 512 tokens (quality_smollm2.md uses 40: "
                      "base 28.69, this setting in float 32.87)",
           "rows": rows}
    tmp = Path(out + ".json.tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(out + ".json")
    lines = [f"# KV latent quantization: {args.experiment} ({doc['date']})", "", f"Machine: {doc['machine']}", "",
             f"Command: `{doc['command']}`", "", f"Setting: {doc['setting']}", "",
             "| row | ppl | KV bytes/token |", "|---|---|---|"]
    lines += [f"| {r['name']} | {r['ppl']:.2f} | {r['kv_bytes_per_token']} |" for r in rows]
    Path(out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
