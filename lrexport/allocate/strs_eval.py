"""The perplexity probe STRS needs: the model with one projection truncated, all else dense.

Hidden states at the input of every layer are computed once with the dense model; a
probe of a projection in layer ``l`` swaps in its rank-``r`` reconstruction and runs only
layers ``l..L`` from the cached input, then restores the weight.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lrexport.factorize.registry import Decomposition
from lrexport.models.llama import LlamaLR


class LayerwisePerplexity:
    """``probe(name, rank) -> perplexity`` on ``windows [N, L]`` (batched internally)."""

    def __init__(self, model: LlamaLR, windows: torch.Tensor, decomps: dict[str, Decomposition]):
        self.model, self.windows, self.decomps = model, windows, decomps
        self.modules = dict(model.named_modules())
        N, L = windows.shape
        self.zeros = torch.zeros(N, dtype=torch.int64)
        with torch.no_grad():
            h = model.model.embed_tokens(windows)
            self.inputs = []
            for layer in model.model.layers:
                self.inputs.append(h)
                h = self._layer(layer, h)

    def _layer(self, layer, h):
        N, L, _ = h.shape
        kc, vc = (torch.zeros(N, L, self.model.spec.kv_dim, dtype=h.dtype) for _ in range(2))
        return layer(h, self.zeros[:N], kc, vc, self.model.rope_cos, self.model.rope_sin)[0]

    @torch.no_grad()
    def __call__(self, name: str, rank: int) -> float:
        layer_idx = int(name.split(".")[2])
        lin = self.modules[name]
        saved = lin.weight.data.clone()
        try:
            lin.weight.data.copy_(self.decomps[name].reconstruct(rank).to(saved.dtype))
            h = self.inputs[layer_idx]
            for layer in self.model.model.layers[layer_idx:]:
                h = self._layer(layer, h)
            logits = self.model.lm_head(self.model.model.norm(h))
            logits = logits if logits.dtype == torch.float64 else logits.float()
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), self.windows[:, 1:].reshape(-1))
            return math.exp(float(nll))
        finally:
            lin.weight.data.copy_(saved)
