"""One decode call of the latent-attention kernel, to run under Nsight Compute (``ncu``).

    ncu --kernel-name regex:_latent_attn_fwd --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats \
        python bench/ncu_decode.py --batch 1 --context 65536 --variant 0.5:M:0

The case is that of ``bench/gpu_kernels.py`` (Llama-3-8B shapes by default, random fp16
latents, the cache full to ``--context``); ``--config`` passes kernel settings as JSON (e.g.
``'{"gluon": false}'`` for the Triton kernel where the Gluon one would run). ``--sdpa`` runs PyTorch's SDPA on
the uncompressed cache of the same shape instead (profile it with ``--kernel-name regex:flash``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_kernels import GROUP, SHAPES, floor16, make_latent_case, quant_group  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=65536)
    ap.add_argument("--variant", default="0.5:M:0", help="reduction:grouping:bits")
    ap.add_argument("--config", default="{}", help="kernel settings (JSON), as attend_ takes them")
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--sdpa", action="store_true", help="SDPA on the uncompressed cache instead")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("ncu_decode: no CUDA device", file=sys.stderr)
        return 2
    if args.sdpa:
        Hq, Hkv, D = SHAPES[args.shape]
        q = torch.randn(args.batch, Hq, 1, D, dtype=torch.float16, device="cuda")
        k = torch.randn(args.batch, Hkv, args.context, D, dtype=torch.float16, device="cuda")
        v = torch.randn_like(k)
        for _ in range(args.calls):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=Hq != Hkv)
        torch.cuda.synchronize()
        return 0
    from lrexport.kernels.triton_latent import attend_

    Hq, Hkv, D = SHAPES[args.shape]
    red, gname, bits = args.variant.split(":")
    s, bits = GROUP[gname], int(bits)
    rk = rv = floor16((1 - float(red)) * s * D)
    qg = quant_group(rk)
    c = make_latent_case(args.batch, args.context, Hq, Hkv, D, s, rk, rv, bits, qg, torch.float16)
    for _ in range(args.calls):
        attend_(c["q"], c["ck"], c["pk"], c["cv"], c["pv"], c["past"], c["k_up"], None, None, c["cos"], c["sin"],
                Hq, Hkv, s, 0, D ** -0.5, bits, qg, rv=rv, kv_max=args.context, **json.loads(args.config))
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
