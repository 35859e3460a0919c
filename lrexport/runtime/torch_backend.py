"""The PyTorch backend: runs the transformed FX graph (eager) behind the loop's interface.

On ``device="cuda"`` the graph's parameters and the caches live on the GPU (latent attention
runs lrexport's Triton kernels there); token ids, lengths and ranks go up each step and only
the logits come back to the CPU (float32 for half-precision models, as on the CPU), so the
loop and the evaluation code are the same on every device.
"""

from __future__ import annotations

import torch

from lrexport.errors import ConfigError, ShapeError
from lrexport.trace.export import TracedGraph


def move_graph(graph: TracedGraph, device: torch.device) -> None:
    """Move ``graph``'s parameters and buffers to ``device``, and the tensor factories that the
    trace recorded with a fixed ``device=cpu`` (``arange``, ``zeros``...) with them."""
    for mod in graph.gm.modules():  # new tensors: the traced model's own weights stay where they are
        for name, p in mod._parameters.items():
            if p is not None and p.device != device:
                mod._parameters[name] = torch.nn.Parameter(p.detach().to(device), requires_grad=False)
        for name, b in mod._buffers.items():
            if b is not None and b.device != device:
                mod._buffers[name] = b.to(device)
    for name, val in list(vars(graph.gm).items()):  # plain tensor attributes (lifted constants)
        if isinstance(val, torch.Tensor) and not isinstance(val, torch.nn.Parameter) and val.device != device:
            setattr(graph.gm, name, val.to(device))
    changed = False
    for node in graph.gm.graph.nodes:
        dev = node.kwargs.get("device") if node.op == "call_function" else None
        if isinstance(dev, torch.device) and dev != device:
            node.kwargs = {**node.kwargs, "device": device}
            changed = True
    if changed:
        graph.gm.recompile()


class TorchBackend:
    """Runs a :class:`TracedGraph`; also a ``LogitsFn`` for evaluation (``backend(ids)``).

    ``device``: where the graph runs (``"cpu"`` or ``"cuda"``); moves the graph's weights there.
    """

    def __init__(self, graph: TracedGraph, *, rank_cost: list[int] | None = None, dense_params: int = 0,
                 total_params: int = 0, device: str | torch.device = "cpu"):
        try:
            self.device = torch.device(device)
        except RuntimeError:
            self.device = None
        if self.device is None or self.device.type not in ("cpu", "cuda"):
            raise ConfigError(f"device must be cpu or cuda, got {device!r}")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for, but this PyTorch sees no CUDA device")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.graph = graph
        if self.device.type != "cpu":
            move_graph(graph, self.device)
        self.max_len = graph.max_len
        self.rank_max = list(graph.rank_max)
        self.rank_cost = list(rank_cost or [])
        self.dense_params = dense_params
        self.total_params = total_params

    def new_caches(self, batch: int, capacity: int) -> list[torch.Tensor]:
        return self.graph.cache.empty(batch, capacity, device=self.device)

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
        if self.device.type == "cpu":
            return self.graph(input_ids, past_len, caches, r)
        dev = self.device
        logits, caches = self.graph(input_ids.to(dev), past_len.to(dev), caches, None if r is None else r.to(dev))
        return logits.cpu(), caches

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, S, V]`` of a batch from an empty cache (the eval ``LogitsFn``)."""
        B, S = input_ids.shape
        logits, _ = self.step(input_ids, torch.zeros(B, dtype=torch.int64), self.new_caches(B, S))
        return logits
