"""Generation: one loop (:func:`generate`) over pluggable backends."""

from __future__ import annotations

from lrexport.runtime.loop import GenerationResult, generate
from lrexport.runtime.sampling import Sampling
from lrexport.runtime.torch_backend import TorchBackend

__all__ = ["GenerationResult", "Sampling", "TorchBackend", "generate"]
