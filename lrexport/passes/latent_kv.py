"""LatentKVPass: rewrite each attention into a latent-KV attention (Palu).

Contract
    requires  each ``lrexport.attention`` node's key and value inputs come straight from
              dense ``aten.linear`` nodes named ``model.layers.<i>.self_attn.{k,v}_proj``,
              and its key/value caches are graph inputs.
    ensures   ``k_proj``/``v_proj`` become down-projections ``A`` whose outputs (the latents)
              are cached; the attention node becomes ``lrexport.latent_attention`` with the
              per-group up-projections; ``B_v`` is fused into the linear that reads the
              attention output (``o_proj``, or its first low-rank factor) when that adds no
              weight bytes in every layer, and applied inside the op in every layer otherwise
              (so that all layers share one operator structure). The cache inputs/outputs
              hold only latents: float ``[B, P, G*r]``, or packed codes plus float16
              scale/zero params when ``bits`` is set. ``TracedGraph.cache`` is updated.
    in place  yes.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

import lrexport.trace.latent_attention_op  # noqa: F401  (registers torch.ops.lrexport.latent_attention)
from lrexport.errors import PassError
from lrexport.kv.quant import bytes_per_token, code_bytes
from lrexport.passes.base import PassResult
from lrexport.trace.export import CacheLayout, TracedGraph, del_attr, set_attr

aten = torch.ops.aten
ATTN = torch.ops.lrexport.attention.default


@dataclass
class LatentKVLayer:
    """One layer's latent projections; ``G = Hkv / group_size`` groups."""

    A_k: torch.Tensor  # [G*rk, n]   latent_k = x @ A_k.T
    k_up: torch.Tensor  # [G, rk, s*D]
    A_v: torch.Tensor  # [G*rv, n]
    v_up: torch.Tensor  # [G, rv, s*D]
    group_size: int
    k_bias: torch.Tensor | None = None  # [Hkv*D], added to rebuilt keys before RoPE
    v_bias: torch.Tensor | None = None  # [Hkv*D], passes through attention (rows of P sum to 1)

    @property
    def rk(self) -> int:
        return self.k_up.shape[1]

    @property
    def rv(self) -> int:
        return self.v_up.shape[1]

    @property
    def groups(self) -> int:
        return self.k_up.shape[0]


def _layer_of(node: fx.Node) -> int | None:
    w = node.args[1] if node.target == aten.linear.default and len(node.args) > 1 else None
    target = getattr(w, "target", "")
    if getattr(w, "op", None) == "get_attr" and target.startswith("model.layers."):
        return int(target.split(".")[2])
    return None


def _getitems(node: fx.Node) -> dict[int, fx.Node]:
    return {u.args[1]: u for u in node.users if u.target is operator.getitem}


def _param(tg: TracedGraph, target: str) -> torch.Tensor:
    mod = tg.gm
    for p in target.split("."):
        mod = getattr(mod, p)
    return mod  # type: ignore[return-value]


class LatentKVPass:
    """See the module docstring. ``layers`` maps layer index -> :class:`LatentKVLayer`."""

    name = "latent_kv"

    def __init__(self, layers: dict[int, LatentKVLayer], *, bits: int | None = None, quant_group: int = 32,
                 fuse_v: bool = True):
        self.layers, self.bits, self.quant_group, self.fuse_v = layers, bits, quant_group, fuse_v

    def __call__(self, tg: TracedGraph) -> PassResult:
        result = PassResult(self.name)
        g = tg.gm.graph
        attns = [n for n in g.nodes if n.op == "call_function" and n.target == ATTN]
        if not attns:
            result.unmatched = "the graph has no lrexport.attention node (was the model traced by lrexport?)"
            return result.log()
        placeholders = [n for n in g.nodes if n.op == "placeholder"]
        cache_ph = placeholders[2:2 + len(tg.cache.names)]
        out_node = next(n for n in g.nodes if n.op == "output")
        outs = list(out_node.args[0])
        new_names, new_widths, new_dtypes, new_ph, new_outs = [], [], [], [], []
        float_dtype = tg.cache.dtypes[0]
        # one decision for the whole model, so that every layer's op has the same structure
        fuse_all = self.fuse_v and all(
            self._fusable(tg, a, self.layers.get(_layer_of(a.args[1]), None)) is not None for a in attns)
        fused = 0
        to_erase = []
        for li, attn in enumerate(attns):
            q, k, v, kc, vc = attn.args[:5]
            layer = _layer_of(k)
            if layer is None or _layer_of(v) != layer or kc not in cache_ph or vc not in cache_ph:
                raise PassError(f"{self.name}: attention #{li} does not read dense k_proj/v_proj linears and graph "
                                "caches; run it before any pass that factorizes k_proj or v_proj")
            if layer not in self.layers:
                raise PassError(f"{self.name}: no latent projections given for layer {layer}")
            L = self.layers[layer]
            spec = tg.spec
            if L.groups * L.group_size != spec.num_kv_heads or L.k_up.shape[2] != L.group_size * spec.head_dim:
                raise PassError(f"{self.name}: layer {layer}: {L.groups} groups of {L.group_size} do not match "
                                f"{spec.num_kv_heads} KV heads of size {spec.head_dim}")
            for what, r in (("key", L.rk), ("value", L.rv)):
                if r > L.group_size * spec.head_dim:
                    raise PassError(f"{self.name}: layer {layer}: rank {r} of the {what} latent is above the "
                                    f"{L.group_size * spec.head_dim} dimensions of its group's heads")
            pre = f"model.layers.{layer}.self_attn"
            x = k.args[0]
            with g.inserting_before(attn):
                lk = self._linear(tg, x, f"{pre}.latent_k_down", L.A_k)
                lv = self._linear(tg, x, f"{pre}.latent_v_down", L.A_v)
                set_attr(tg.gm, f"{pre}.latent_k_up", L.k_up.contiguous())
                k_up = g.get_attr(f"{pre}.latent_k_up")
                k_bias = None
                if L.k_bias is not None:
                    set_attr(tg.gm, f"{pre}.latent_k_bias", L.k_bias.contiguous())
                    k_bias = g.get_attr(f"{pre}.latent_k_bias")
            fuse_into = self._fusable(tg, attn, L) if fuse_all else None
            v_up = None
            if fuse_into is None:
                set_attr(tg.gm, f"{pre}.latent_v_up", L.v_up.contiguous())
                with g.inserting_before(attn):
                    v_up = g.get_attr(f"{pre}.latent_v_up")
            # cache placeholders: float latents, or codes + params
            names, widths, dtypes = self._cache_entries(layer, L, float_dtype)
            with g.inserting_before(kc):
                phs = [g.placeholder(n) for n in names]
            if self.bits:
                ck, ckp, cv, cvp = phs
            else:
                (ck, cv), ckp, cvp = phs, None, None
            _, _, _, _, _, past_len, cos, sin, H, Hkv, window, scale = attn.args
            with g.inserting_before(attn):
                if self.bits:
                    new = g.call_function(torch.ops.lrexport.latent_attention_quant.default, (
                        q, lk, lv, ck, ckp, cv, cvp, past_len, k_up, k_bias, v_up, cos, sin, H, Hkv, L.group_size,
                        window, scale, self.bits, self.quant_group))
                    items = {i: g.call_function(operator.getitem, (new, i)) for i in range(5)}
                else:
                    new = g.call_function(torch.ops.lrexport.latent_attention.default, (
                        q, lk, lv, ck, cv, past_len, k_up, k_bias, v_up, cos, sin, H, Hkv, L.group_size,
                        window, scale))
                    items = {i: g.call_function(operator.getitem, (new, i)) for i in range(3)}
            new.meta.update({k2: v2 for k2, v2 in attn.meta.items() if k2 in ("nn_module_stack", "stack_trace")})
            old = _getitems(attn)
            out0 = items[0]
            if fuse_into is None and L.v_bias is not None:
                # v's bias passes through attention unchanged (rows of P sum to 1): add it per query head
                rep = spec.num_heads // spec.num_kv_heads
                vb = L.v_bias.view(spec.num_kv_heads, spec.head_dim).repeat_interleave(rep, 0).reshape(-1)
                set_attr(tg.gm, f"{pre}.latent_v_bias", vb.contiguous())
                with g.inserting_after(items[0]):
                    vb_node = g.get_attr(f"{pre}.latent_v_bias")
                with g.inserting_after(vb_node):
                    out0 = g.call_function(aten.add.Tensor, (items[0], vb_node))
            old[0].replace_all_uses_with(out0)
            if fuse_into is not None:
                self._fuse(tg, fuse_into, L)
                fused += 1
            # outputs: the old cache outputs are replaced by the new ones, in the same place
            kc_out, vc_out = old.get(1), old.get(2)
            repl = [items[i] for i in range(1, len(items))]
            idx = [i for i, o in enumerate(outs) if o is kc_out or o is vc_out]
            if len(idx) != 2:
                raise PassError(f"{self.name}: layer {layer}: its cache outputs are not graph outputs")
            new_outs.append((idx[0], repl))
            new_names += names
            new_widths += widths
            new_dtypes += dtypes
            new_ph.append((kc, vc))
            to_erase.append((attn, old, k, v))
            result.changed += 1
        # rebuild the output tuple: logits, then every layer's new cache outputs in order
        out_list = [outs[0]]
        for _, repl in sorted(new_outs, key=lambda t: t[0]):
            out_list += repl
        out_node.args = (tuple(out_list),)
        for attn, old, k, v in to_erase:
            self._erase_old(tg, attn, old, k, v)
        for kc, vc in new_ph:
            g.erase_node(kc)
            g.erase_node(vc)
        g.eliminate_dead_code()
        g.lint()
        tg.gm.recompile()
        tg.cache = CacheLayout(names=new_names, widths=new_widths, dtypes=new_dtypes)
        tg.meta["latent_kv"] = {"bits": self.bits, "quant_group": self.quant_group, "fused_v": fused}
        if fused:
            result.skipped["v_up"] = f"B_v fused into the output projection in {fused} of {result.changed} layers"
        return result.log()

    def _linear(self, tg, x, target, W):
        set_attr(tg.gm, target, W.contiguous())
        g = tg.gm.graph
        return g.call_function(aten.linear.default, (x, g.get_attr(target)))

    def _cache_entries(self, layer, L: LatentKVLayer, float_dtype):
        G = L.groups
        if not self.bits:
            return ([f"past_latent_k_{layer}", f"past_latent_v_{layer}"], [G * L.rk, G * L.rv],
                    [float_dtype, float_dtype])
        names, widths, dtypes = [], [], []
        for kind, r in (("k", L.rk), ("v", L.rv)):
            names += [f"past_latent_{kind}_{layer}", f"past_latent_{kind}_params_{layer}"]
            widths += [code_bytes(G * r, self.bits), 2 * G * r // self.quant_group]
            dtypes += ["uint8", "float16"]
        return names, widths, dtypes

    def _fusable(self, tg: TracedGraph, attn: fx.Node, L: LatentKVLayer | None) -> fx.Node | None:
        """The linear reading the attention output, if fusing B_v into it adds no weight bytes."""
        if L is None:
            return None
        out0 = _getitems(attn).get(0)
        users = list(out0.users) if out0 is not None else []
        if len(users) != 1 or users[0].target != aten.linear.default or users[0].args[0] is not out0:
            return None
        lin = users[0]
        w = lin.args[1]
        if getattr(w, "op", None) != "get_attr":
            return None  # e.g. a sliced low-rank factor (run-time ranks): keep v_up in the op
        if L.v_bias is not None and not w.target.endswith("o_proj.weight"):
            return None
        W = _param(tg, w.target)
        Hq = tg.spec.num_heads
        fused_size = W.shape[0] * Hq * L.rv
        unfused_size = W.numel() + L.v_up.numel()
        return lin if fused_size <= unfused_size else None

    def _fuse(self, tg: TracedGraph, lin: fx.Node, L: LatentKVLayer) -> None:
        spec = tg.spec
        Hq, Hkv, D, s = spec.num_heads, spec.num_kv_heads, spec.head_dim, L.group_size
        w = lin.args[1]
        W = _param(tg, w.target).detach()
        rep = Hq // Hkv
        kv = torch.arange(Hq) // rep
        up_HrD = L.v_up.to(W.dtype).view(L.groups, L.rv, s, D)[kv // s, :, kv % s, :]  # [Hq, rv, D]
        W_hD = W.view(W.shape[0], Hq, D)
        fused = torch.einsum("ohd,hrd->ohr", W_hD, up_HrD).reshape(W.shape[0], Hq * L.rv)
        mod_path, leaf = w.target.rsplit(".", 1)
        target = f"{mod_path}.fused_{leaf}"  # o_proj.fused_weight, or o_proj.fused_lowrank_v
        set_attr(tg.gm, target, fused.contiguous())
        g = tg.gm.graph
        with g.inserting_before(lin):
            nw = g.get_attr(target)
        args = list(lin.args)
        args[1] = nw
        if L.v_bias is not None:
            vb = L.v_bias.to(W.dtype).view(Hkv, D)[kv]  # [Hq, D]: each query head's value bias
            extra = torch.einsum("ohd,hd->o", W_hD, vb)
            old_b = _param(tg, args[2].target).detach() if len(args) > 2 and args[2] is not None else 0
            bt = f"{mod_path}.fused_bias"
            set_attr(tg.gm, bt, (old_b + extra).contiguous())
            with g.inserting_before(lin):
                bnode = g.get_attr(bt)
            args = args[:2] + [bnode]
        lin.args = tuple(args)
        if not w.users:
            g.erase_node(w)
            del_attr(tg.gm, w.target)

    def _erase_old(self, tg, attn, old, k, v):
        g = tg.gm.graph
        for o in old.values():
            if not o.users:
                g.erase_node(o)
        g.erase_node(attn)
        for lin in (k, v):
            if not lin.users:
                w, b = lin.args[1], lin.args[2] if len(lin.args) > 2 else None
                g.erase_node(lin)
                for p in (w, b):
                    if p is not None and not p.users:
                        g.erase_node(p)
                        del_attr(tg.gm, p.target)


def latent_bytes_per_token(layers: dict[int, LatentKVLayer], bits: int | None, quant_group: int,
                           float_bytes: int) -> int:
    return sum(bytes_per_token(L.groups * r, bits, quant_group, float_bytes)
               for L in layers.values() for r in (L.rk, L.rv))
