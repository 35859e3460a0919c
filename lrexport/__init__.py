"""lrexport: an ONNX export compiler for low-rank-compressed LLMs.

The pipeline is load -> trace -> calibrate -> allocate -> passes -> {PyTorch graph, ONNX}
-> generate / eval. The public entry points live in :mod:`lrexport.api`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from lrexport.errors import LrexportError  # noqa: E402

__all__ = ["LrexportError", "__version__"]
