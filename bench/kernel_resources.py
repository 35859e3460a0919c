"""Static resources of the ahead-of-time decode kernel, compiled on this machine (no GPU needed).

    python bench/kernel_resources.py --shape llama3-8b --rk 80 --rv 80 \
        --settings "split_ranks=none;split_ranks=k;split_ranks=kv,num_stages=2"

For each kernel setting (``LREXPORT_CUDA_TUNING`` syntax, ``;`` between settings) it compiles the
float16 decode kernel of ``lrexport.kernels.aot`` for one attention shape and reports what decides
how many blocks share a multiprocessor: registers per thread and spilled bytes (``cuobjdump
--dump-resource-usage``, from Triton's CUDA tools), shared memory, and the resulting blocks per
multiprocessor (64K registers, the architecture's shared memory with 1 KB reserved per block, 64
warps), and the SASS of its main loop (the tiles of a split): instructions per tile and warp, barriers,
shared-memory operations and the most frequent opcodes. Speed is not measured here: that is
``bench/gpu_kernels.py`` on a GPU. Writes a JSON and a ``.md`` table next to it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import shlex
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {"llama2-7b": (32, 32, 128), "llama3-8b": (32, 8, 128)}  # Hq, Hkv, D
SMEM_PER_SM = {80: 167936, 86: 102400, 89: 102400, 90: 233472}  # bytes per multiprocessor


def sass(cubin: bytes) -> str:
    """The cubin's SASS, as ``cuobjdump -sass`` prints it."""
    from lrexport.kernels import aot

    return aot.cubin_dump(cubin, "-sass")


def main_loop(text: str) -> list[str]:
    """The instructions of the longest loop in ``text`` (SASS): from the target of a backward branch to the branch.

    For the decode kernel this is the loop over a split's tiles, so its length is the instructions each warp issues
    per tile (predicated-off instructions included)."""
    ins = [(int(m.group(1), 16), m.group(2)) for m in
           (re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line) for line in text.splitlines()) if m]
    index = {a: i for i, (a, _) in enumerate(ins)}
    best: list[str] = []
    for i, (a, op) in enumerate(ins):
        t = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", op)
        if t and int(t.group(1), 16) < a and int(t.group(1), 16) in index:
            body = [o for _, o in ins[index[int(t.group(1), 16)]: i + 1]]
            best = body if len(body) > len(best) else best
    return best


def opcode(instruction: str) -> str:
    """``@P0 FFMA.FTZ R1, ...`` -> ``FFMA``."""
    words = instruction.split()
    return (words[1] if words[0].startswith("@") and len(words) > 1 else words[0]).split(".")[0]


def loop_stats(cubin: bytes, top: int = 12) -> dict:
    """The main loop's instruction count, its barriers, shared-memory traffic and most frequent opcodes."""
    from collections import Counter

    ops = Counter(opcode(i) for i in main_loop(sass(cubin)))
    return dict(loop_instructions=sum(ops.values()), loop_barriers=ops["BAR"],
                loop_shared=ops["STS"] + ops["LDS"] + ops["LDSM"], loop_top=dict(ops.most_common(top)))


def main(argv=None) -> int:
    from lrexport.kernels import aot
    from lrexport.kernels.gluon_latent import blocks_per_sm

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--group-size", type=int, default=1, help="KV heads per latent group (1 = M-LRD)")
    ap.add_argument("--rk", type=int, default=80)
    ap.add_argument("--rv", type=int, default=80)
    ap.add_argument("--bits", type=int, default=0, choices=(0, 2, 4, 8))
    ap.add_argument("--quant-group", type=int, default=32)
    ap.add_argument("--arch", type=int, default=aot.DEFAULT_ARCH)
    ap.add_argument("--settings", default="split_ranks=none;split_ranks=auto",
                    help="kernel settings separated by ';', each in LREXPORT_CUDA_TUNING syntax")
    ap.add_argument("--out", default=str(RESULTS / "kernel_resources.json"))
    args = ap.parse_args(argv)
    Hq, Hkv, D = SHAPES[args.shape]
    spec = aot.DecodeSpec.for_caches(num_heads=Hq, num_kv_heads=Hkv, group_size=args.group_size, head_dim=D,
                                     rk=args.rk, rv=args.rv, bits=args.bits, quant_group=args.quant_group)
    rows = []
    for text in filter(None, (x.strip() for x in args.settings.split(";"))):
        tuning = aot.Tuning.parse(text)
        t0 = time.perf_counter()
        try:
            c = aot.compile_decode(spec, args.arch, tuning)
        except RuntimeError as e:  # e.g. shared memory that does not fit at any fallback
            rows.append(dict(settings=text, error=str(e)[:300]))
            print(f"{text}: {e}", flush=True)
            continue
        meta = aot.parse_meta(c.meta)
        use = aot.cubin_resources(c.cubin)
        shared, warps = int(meta["shared"]), int(meta["warps"])
        row = dict(settings=text, block_n=int(meta["block_n"]), warps=warps, shared_bytes=shared, **use,
                   blocks_per_sm=blocks_per_sm(use["registers"], shared, warps, SMEM_PER_SM.get(args.arch, 102400)),
                   **loop_stats(c.cubin), compile_s=round(time.perf_counter() - t0, 2))
        rows.append(row)
        print(f"{text}: {row['registers']} registers, {row['local_bytes']} B spilled, {shared} B shared, "
              f"{row['blocks_per_sm']} block(s) per SM (tile {row['block_n']}); main loop "
              f"{row['loop_instructions']} instructions, {row['loop_barriers']} barriers: {row['loop_top']}",
              flush=True)
    import triton

    argv_used = argv if argv is not None else sys.argv[1:]
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, compiled for sm_{args.arch} (no GPU), triton {triton.__version__}",
              "command": shlex.join(["python", "bench/kernel_resources.py", *argv_used]),
              "spec": spec.__dict__, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    lines = [f"# Decode kernel resources ({result['date']})", "", f"Machine: {result['machine']}", "",
             f"Command: `{result['command']}`", "",
             f"{args.shape}, group size {args.group_size}, rk {args.rk}, rv {args.rv}, bits {args.bits or '-'}: "
             "static resources of the compiled kernel (no timing).", "",
             "| settings | tile | warps | registers | spilled bytes | shared bytes | blocks per SM | loop instructions "
             "| loop barriers | loop shared-memory ops |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['settings']} | - | - | - | - | - | does not compile: {r['error'][:80]} | | | |")
        else:
            lines.append(f"| {r['settings']} | {r['block_n']} | {r['warps']} | {r['registers']} | {r['local_bytes']} | "
                         f"{r['shared_bytes']} | {r['blocks_per_sm']} | {r['loop_instructions']} | "
                         f"{r['loop_barriers']} | {r['loop_shared']} |")
    lines += ["", "Loop instructions: SASS instructions of the kernel's longest loop (the tiles of a split), issued by "
              "each warp per tile of positions."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
