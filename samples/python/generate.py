"""Generate from an exported lrexport folder with ONNX Runtime: the Python twin of ``lrexport_generate``.

    python samples/python/generate.py out/onnx --prompt "The capital of France is" --max-new-tokens 32
    python samples/python/generate.py out/onnx --prompt-ids 1,2,3 --max-new-tokens 16 [--no-library]

``--prompt`` goes through :func:`lrexport.api.generate_text` (tokenizer, chat template, the plan's
progressive schedule, greedy decoding) and prints the text. ``--prompt-ids`` feeds token ids to the
same runner and prints the generated ids on one line, exactly as the C++ sample does, so the two
can be compared. ``--no-library`` runs the model's fallback bodies instead of lrexport's custom-op
library (``build/custom_ops/liblrexport_ops.so``, built on first use).
"""

from __future__ import annotations

import argparse
import sys

from lrexport import api
from lrexport.errors import LrexportError
from lrexport.runtime import generate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Greedy generation from an exported lrexport folder (ONNX Runtime).")
    ap.add_argument("folder", help="folder written by `lrexport export`")
    prompt = ap.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs the folder's tokenizer)")
    prompt.add_argument("--prompt-ids", help="comma-separated prompt token ids, e.g. 1,2,3")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--no-library", action="store_true", help="do not register liblrexport_ops.so")
    args = ap.parse_args(argv)
    try:
        runner = api.open_runner(args.folder, backend="onnx", use_library=not args.no_library)
        if args.prompt is not None:
            texts, _ = api.generate_text(model=runner, prompts=[args.prompt], max_new_tokens=args.max_new_tokens)
            print(texts[0])
        else:
            ids = [int(t) for t in args.prompt_ids.split(",")]
            res = generate(runner.backend, [ids], max_new_tokens=args.max_new_tokens, stop_ids=runner.stop_ids,
                           schedule=runner.plan.schedule)
            print(" ".join(map(str, res.tokens[0])))
    except (LrexportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
