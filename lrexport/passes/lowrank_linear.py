"""LowRankLinearPass: replace selected linears by two matmuls ``x @ V[:r].T @ U[:, :r].T``.

Contract
    requires  ``aten.linear`` nodes whose weight is a ``get_attr`` named ``<fqn>.weight``.
    ensures   each selected linear becomes ``linear(linear(x, V), U, bias)``; the dense
              weight is removed from the module. With ``rank_input=True`` the graph gets
              one more input, ``ranks`` (int64 ``[n]``, in ``TracedGraph.rank_names`` order),
              and each pair slices its factors to ``ranks[i]`` at run time, so one graph
              serves every rank up to the stored one.
    in place  yes.
"""

from __future__ import annotations

import operator

import torch

from lrexport.errors import PassError
from lrexport.factorize.registry import Factors
from lrexport.passes.base import PassResult
from lrexport.trace.export import TracedGraph, add_input, del_attr, set_attr

aten = torch.ops.aten


def linear_nodes(tg: TracedGraph) -> dict[str, torch.fx.Node]:
    """Map each linear's FQN (its weight name without ``.weight``) to its graph node."""
    found = {}
    for n in tg.gm.graph.nodes:
        if n.op == "call_function" and n.target == aten.linear.default:
            w = n.args[1]
            if getattr(w, "op", None) == "get_attr" and w.target.endswith(".weight"):
                found[w.target.removesuffix(".weight")] = n
    return found


class LowRankLinearPass:
    """Replace each linear in ``factors`` by a low-rank pair (see the module docstring)."""

    name = "lowrank_linear"

    def __init__(self, factors: dict[str, Factors], *, rank_input: bool = False):
        self.factors = factors
        self.rank_input = rank_input

    def __call__(self, tg: TracedGraph) -> PassResult:
        result = PassResult(self.name)
        nodes = linear_nodes(tg)
        if not nodes:
            result.unmatched = "the graph has no aten.linear node with a named weight"
            return result.log()
        missing = sorted(set(self.factors) - set(nodes))
        if missing:
            raise PassError(f"{self.name}: no linear named {missing[0]!r} in the graph ({len(missing)} missing)")
        g = tg.gm.graph
        ranks_node = None
        if self.rank_input and self.factors:
            if tg.has_rank_input:
                raise PassError(f"{self.name}: the graph already has a ranks input")
            ranks_node = add_input(tg.gm, "ranks")
        for fqn, node in nodes.items():
            if fqn not in self.factors:
                result.skipped[fqn] = "kept dense (not in the plan)"
                continue
            f = self.factors[fqn]
            w = node.args[1]
            weight = _weight(tg, w)
            m, n = weight.shape
            if f.U.shape[0] != m or f.V.shape[1] != n or f.U.shape[1] != f.V.shape[0]:
                raise PassError(f"{self.name}: factors of {fqn} are {tuple(f.U.shape)} x {tuple(f.V.shape)}, "
                                f"weight is {(m, n)}")
            dtype = weight.dtype
            set_attr(tg.gm, f"{fqn}.lowrank_u", f.U.to(dtype).contiguous())
            set_attr(tg.gm, f"{fqn}.lowrank_v", f.V.to(dtype).contiguous())
            x = node.args[0]
            bias = node.args[2] if len(node.args) > 2 else None
            with g.inserting_before(node):
                u = g.get_attr(f"{fqn}.lowrank_u")
                v = g.get_attr(f"{fqn}.lowrank_v")
                if ranks_node is not None:
                    idx = len(tg.rank_names)
                    r_t = g.call_function(aten.select.int, (ranks_node, 0, idx))
                    r = g.call_function(aten._local_scalar_dense.default, (r_t,))
                    g.call_function(torch._check, (g.call_function(operator.ge, (r, 1)),))
                    g.call_function(torch._check, (g.call_function(operator.le, (r, f.rank)),))
                    v = g.call_function(aten.slice.Tensor, (v, 0, 0, r))
                    u = g.call_function(aten.slice.Tensor, (u, 1, 0, r))
                    tg.rank_names.append(fqn)
                    tg.rank_max.append(f.rank)
                t = g.call_function(aten.linear.default, (x, v))
                y = g.call_function(aten.linear.default, (t, u, bias) if bias is not None else (t, u))
            y.meta = dict(node.meta)
            node.replace_all_uses_with(y)
            g.erase_node(node)
            if not w.users:
                g.erase_node(w)
                del_attr(tg.gm, w.target)
            result.changed += 1
        g.lint()
        tg.gm.recompile()
        return result.log()


def _weight(tg: TracedGraph, w: torch.fx.Node) -> torch.Tensor:
    mod = tg.gm
    for p in w.target.split("."):
        mod = getattr(mod, p)
    return mod  # type: ignore[return-value]
