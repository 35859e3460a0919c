"""The PyTorch backend: runs the transformed FX graph (eager) behind the loop's interface."""

from __future__ import annotations

import torch

from lrexport.errors import ShapeError
from lrexport.trace.export import TracedGraph


class TorchBackend:
    """Runs a :class:`TracedGraph`; also a ``LogitsFn`` for evaluation (``backend(ids)``)."""

    def __init__(self, graph: TracedGraph, *, rank_cost: list[int] | None = None, dense_params: int = 0,
                 total_params: int = 0):
        self.graph = graph
        self.max_len = graph.max_len
        self.rank_max = list(graph.rank_max)
        self.rank_cost = list(rank_cost or [])
        self.dense_params = dense_params
        self.total_params = total_params

    def new_caches(self, batch: int, capacity: int) -> list[torch.Tensor]:
        return self.graph.cache.empty(batch, capacity)

    @torch.no_grad()
    def step(self, input_ids, past_len, caches, ranks=None):
        r = None
        if ranks is not None:
            if len(ranks) != len(self.rank_max):
                raise ShapeError(f"expected {len(self.rank_max)} ranks, got {len(ranks)}")
            bad = [(i, r, m) for i, (r, m) in enumerate(zip(ranks, self.rank_max)) if not 1 <= r <= m]
            if bad:
                i, r_, m = bad[0]
                raise ShapeError(f"rank {r_} for {self.graph.rank_names[i]} is outside [1, {m}]")
            r = torch.tensor(ranks, dtype=torch.int64)
        return self.graph(input_ids, past_len, caches, r)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, S, V]`` of a batch from an empty cache (the eval ``LogitsFn``)."""
        B, S = input_ids.shape
        logits, _ = self.step(input_ids, torch.zeros(B, dtype=torch.int64), self.new_caches(B, S))
        return logits
