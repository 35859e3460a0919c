"""Copy an exported float16 folder with its GPU decode kernels compiled under other settings.

    python bench/retune.py SRC DST --tuning "block_n=64,num_warps=8,num_stages=3,waves=8,swap=0"

Only ``model.onnx`` is rewritten (the kernels are node attributes); the weights file and the
rest are hard-linked from ``SRC``, so trying a kernel setting on a large model takes seconds, not an
export. The settings are those of :class:`lrexport.kernels.aot.Tuning`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def retune(src: Path, dst: Path, tuning: str, arch: int = 90) -> dict:
    import onnx

    from lrexport.kernels import aot
    from lrexport.util import atomic_dir

    meta = json.loads((src / "lrexport.json").read_text())
    name = meta["onnx"]["file"]
    model = onnx.load(str(src / name), load_external_data=False)
    summary = aot.attach_cuda_kernels(model, arch, aot.Tuning.parse(tuning))
    meta.setdefault("bench", {})["cuda_tuning"] = summary["tuning"]
    with atomic_dir(dst) as tmp:
        for f in src.iterdir():  # hard links: ONNX Runtime refuses external data that resolves outside the folder
            if f.name not in (name, "lrexport.json"):
                try:
                    os.link(f.resolve(), tmp / f.name)
                except OSError:  # another file system
                    shutil.copy2(f, tmp / f.name)
        onnx.save(model, str(tmp / name))
        (tmp / "lrexport.json").write_text(json.dumps(meta, indent=2, default=str))
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--tuning", required=True)
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args(argv)
    s = retune(Path(args.src), Path(args.dst), args.tuning, args.arch)
    print(f"{args.dst}: {s['kernels']} kernel(s) for {s['nodes']} node(s), {s['tuning']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
