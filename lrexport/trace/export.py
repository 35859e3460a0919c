"""Trace a :class:`LlamaLR` once with ``torch.export`` into a flat FX graph.

The result, :class:`TracedGraph`, wraps the unlifted graph module with a flat calling
convention (no pytree): ``gm(input_ids, past_len, *caches[, ranks]) -> (logits, *caches)``.
Compiler passes edit ``TracedGraph.gm`` in place; PyTorch evaluation runs it directly and
:meth:`TracedGraph.reexport` turns it back into an ``ExportedProgram`` for ONNX emission.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.export import Dim

from lrexport.errors import ShapeError
from lrexport.models.llama import LlamaLR
from lrexport.models.spec import ModelSpec

log = logging.getLogger(__name__)

MAX_BATCH = 1024


@dataclass
class CacheLayout:
    """The cache tensors of the graph, in input order: ``[B, P, width]`` each, of its dtype."""

    names: list[str]
    widths: list[int]
    dtypes: list[str]

    @classmethod
    def dense(cls, spec: ModelSpec, dtype: torch.dtype = torch.float32) -> CacheLayout:
        names, widths = [], []
        for i in range(spec.num_layers):
            names += [f"past_key_{i}", f"past_value_{i}"]
            widths += [spec.kv_dim, spec.kv_dim]
        return cls(names=names, widths=widths, dtypes=[str(dtype).removeprefix("torch.")] * len(names))

    def empty(self, batch: int, capacity: int, device: str | torch.device = "cpu") -> list[torch.Tensor]:
        return [torch.zeros(batch, capacity, w, dtype=getattr(torch, d), device=device)
                for w, d in zip(self.widths, self.dtypes)]

    def bytes_per_token(self) -> int:
        """Cache bytes per token and sequence, all layers together (scales included)."""
        return sum(w * torch.empty((), dtype=getattr(torch, d)).element_size()
                   for w, d in zip(self.widths, self.dtypes))


@dataclass
class TracedGraph:
    """A traced model: a flat FX graph module plus what its inputs mean."""

    gm: fx.GraphModule
    spec: ModelSpec
    max_len: int
    cache: CacheLayout
    rank_names: list[str] = field(default_factory=list)  # linears whose rank is the `ranks` input
    rank_max: list[int] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def has_rank_input(self) -> bool:
        return bool(self.rank_names)

    def __call__(self, input_ids: torch.Tensor, past_len: torch.Tensor, caches: list[torch.Tensor],
                 ranks: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if len(caches) != len(self.cache.names):
            raise ShapeError(f"expected {len(self.cache.names)} cache tensors, got {len(caches)}")
        args = [input_ids, past_len, *caches]
        if self.has_rank_input:
            if ranks is None:
                ranks = torch.tensor(self.rank_max, dtype=torch.int64, device=input_ids.device)
            args.append(ranks)
        out = self.gm(*args)
        return out[0], list(out[1:])

    def example_inputs(self, batch: int = 2, seq: int = 3, capacity: int = 16) -> tuple:
        ids = torch.zeros(batch, seq, dtype=torch.int64)
        args = [ids, torch.zeros(batch, dtype=torch.int64), *self.cache.empty(batch, capacity)]
        if self.has_rank_input:
            args.append(torch.tensor(self.rank_max, dtype=torch.int64))
        return tuple(args)

    def dynamic_shapes(self) -> tuple:
        b, s, p = Dim("batch", min=1, max=MAX_BATCH), Dim("seq", min=1, max=self.max_len), \
            Dim("capacity", min=1, max=self.max_len)
        shapes = [{0: b, 1: s}, {0: b}, *[{0: b, 1: p} for _ in self.cache.names]]
        if self.has_rank_input:
            shapes.append(None)
        return tuple(shapes)

    def reexport(self) -> torch.export.ExportedProgram:
        """Export the (transformed) graph module again, e.g. for ONNX emission."""
        return torch.export.export(self.gm, self.example_inputs(), dynamic_shapes=self.dynamic_shapes(), strict=False)

    def count(self, target) -> int:
        return sum(1 for n in self.gm.graph.nodes if n.op == "call_function" and n.target == target)


def trace(model: LlamaLR) -> TracedGraph:
    """Trace ``model`` once (dynamic batch, sequence and cache capacity)."""
    spec = model.spec
    cache = CacheLayout.dense(spec, model.model.embed_tokens.weight.dtype)
    probe = TracedGraph(gm=None, spec=spec, max_len=model.max_len, cache=cache)  # type: ignore[arg-type]
    args = probe.example_inputs()
    ds = probe.dynamic_shapes()
    dynamic = (ds[0], ds[1], tuple(ds[2:]))
    with torch.no_grad():
        ep = torch.export.export(model, args, dynamic_shapes=dynamic, strict=False)
    gm = flatten(ep.module())
    probe.gm = gm
    log.info("traced %s: %d nodes", spec.model_type, len(gm.graph.nodes))
    return probe


def flatten(gm: fx.GraphModule) -> fx.GraphModule:
    """Give an unlifted module a flat signature and drop export's input-guard call."""
    g = gm.graph
    for node in list(g.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            g.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm._forward_pre_hooks.clear()  # export's pytree input-spec checks; inputs are flat now
    g._codegen = fx.graph.CodeGen()
    out = next(n for n in g.nodes if n.op == "output")
    if not isinstance(out.args[0], (tuple, list)):
        out.args = ((out.args[0],),)
    gm.recompile()
    return gm


def set_attr(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Register ``value`` as a parameter at dotted ``target`` (creating submodules)."""
    *path, name = target.split(".")
    mod: torch.nn.Module = gm
    for p in path:
        if not hasattr(mod, p):
            mod.add_module(p, torch.nn.Module())
        mod = getattr(mod, p)
    if hasattr(mod, name):
        delattr(mod, name)
    mod.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))


def del_attr(gm: fx.GraphModule, target: str) -> None:
    *path, name = target.split(".")
    mod: torch.nn.Module = gm
    for p in path:
        mod = getattr(mod, p)
    if hasattr(mod, name):
        delattr(mod, name)


def add_input(gm: fx.GraphModule, name: str) -> fx.Node:
    """Append a placeholder after the existing ones."""
    g = gm.graph
    last = [n for n in g.nodes if n.op == "placeholder"][-1]
    with g.inserting_after(last):
        return g.placeholder(name)
