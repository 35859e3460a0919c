"""Compile a plan onto a traced model, and save / load the compressed result.

A compressed model on disk is a folder:

* ``lrexport.json`` -- the plan (:class:`lrexport.plan.Plan`);
* ``config.json`` -- the source architecture (Hugging Face config);
* ``weights.safetensors`` -- every tensor the compressed graph needs: the dense weights
  it keeps; for each low-rank linear, ``<fqn>.lowrank_u [m, r]`` and
  ``<fqn>.lowrank_v [r, n]``; for each latent-KV layer, ``<layer>.self_attn.latent.<part>``
  (``A_k``, ``k_up``, ``A_v``, ``v_up`` and the k/v biases, if any);
* the tokenizer files.

Loading re-traces the architecture and re-applies the plan's passes with the saved
factors, so the loaded graph computes exactly what the saved one did.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lrexport.errors import ConfigError, PlanError
from lrexport.factorize.registry import Factors
from lrexport.models.llama import LlamaLR, build_model
from lrexport.models.load import load_tokenizer
from lrexport.models.spec import ModelSpec, spec_from_hf_config
from lrexport.passes.base import PassResult
from lrexport.passes.latent_kv import LatentKVLayer, LatentKVPass
from lrexport.passes.lowrank_linear import LowRankLinearPass
from lrexport.plan import Plan
from lrexport.runtime.torch_backend import TorchBackend
from lrexport.trace.export import TracedGraph, trace
from lrexport.util import atomic_dir

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.safetensors"
LATENT_PARTS = ("A_k", "k_up", "A_v", "v_up", "k_bias", "v_bias")


@dataclass
class CompressedModel:
    """A transformed graph with its plan, factors and tokenizer."""

    graph: TracedGraph
    plan: Plan
    spec: ModelSpec
    factors: dict[str, Factors]
    dense_state: dict[str, torch.Tensor]  # the weights the graph keeps dense
    latent: dict[int, LatentKVLayer] = field(default_factory=dict)  # Palu layers
    tokenizer: Any = None
    pass_results: list[PassResult] = field(default_factory=list)

    def backend(self, device: str = "cpu") -> TorchBackend:
        """A generation/eval backend that also knows the parameter accounting (``device="cuda"``
        moves the graph's weights to the GPU)."""
        return TorchBackend(self.graph, **param_accounting(self.spec, self.plan, self.graph.rank_names),
                            device=device)

    def save(self, folder: str | Path) -> Path:
        """Write the folder atomically (an interrupted save leaves no complete-looking folder)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        tensors = {k: v.detach().contiguous() for k, v in self.dense_state.items()}
        for fqn, f in self.factors.items():
            tensors[f"{fqn}.lowrank_u"] = f.U.detach().contiguous()
            tensors[f"{fqn}.lowrank_v"] = f.V.detach().contiguous()
        for layer, L in self.latent.items():
            for part in LATENT_PARTS:
                t = getattr(L, part)
                if t is not None:
                    tensors[f"model.layers.{layer}.self_attn.latent.{part}"] = t.detach().contiguous()
        with atomic_dir(folder) as tmp:
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "producer": "lrexport"})
            (tmp / "config.json").write_text(json.dumps(self.plan.model, indent=2, default=str))
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(str(tmp))
            self.plan.save(tmp / "lrexport.json")  # written last: its presence marks a complete folder
        return folder


def param_accounting(spec: ModelSpec, plan: Plan, rank_names: list[str]) -> dict[str, Any]:
    """Parameter counts for ``avg_active_params``: cost per rank unit of each run-time-rank
    linear, the projection parameters that are always active, and the dense total."""
    total = spec.projection_params()
    ranks = plan.weights.ranks if plan.weights else {}
    shapes = {n: spec.projection_shape(n.rsplit(".", 1)[1]) for n in spec.linear_names()}
    static = sum(m * n for name, (m, n) in shapes.items() if name not in ranks)
    static += sum(r * sum(shapes[name]) for name, r in ranks.items() if name not in rank_names)
    if plan.kv is not None:  # k/v projections became latent down- and up-projections
        G, sD = int(plan.kv["groups"]), int(plan.kv["group_size"]) * spec.head_dim
        for rk_rv in plan.kv["ranks"].values():
            static -= 2 * spec.kv_dim * spec.hidden_size
            static += sum(G * r * (spec.hidden_size + sD) for r in rk_rv)
    return {"rank_cost": [sum(shapes[n]) for n in rank_names], "dense_params": static, "total_params": total}


def apply_plan(graph: TracedGraph, plan: Plan, factors: dict[str, Factors],
               latent: dict[int, LatentKVLayer] | None = None) -> list[PassResult]:
    """Run the plan's passes over ``graph`` (in place): the weight pass, then the KV pass
    (which fuses ``B_v`` into whatever ``o_proj`` became)."""
    results = []
    if plan.weights is not None:
        want = set(plan.weights.ranks)
        if want != set(factors):
            raise PlanError(f"the plan names {len(want)} low-rank linears, the factors {len(factors)}")
        for name, r in plan.weights.ranks.items():
            if factors[name].rank != r:
                raise PlanError(f"{name}: the plan's rank is {r}, its factors have rank {factors[name].rank}")
        results.append(LowRankLinearPass(factors, rank_input=plan.schedule is not None)(graph))
    if plan.kv is not None:
        if not latent or len(latent) != graph.spec.num_layers:
            raise PlanError(f"the plan has a latent KV cache but {len(latent or {})} latent layers were given")
        results.append(LatentKVPass(latent, bits=plan.kv.get("bits"), quant_group=plan.kv.get("quant_group", 32),
                                    fuse_v=plan.kv.get("config", {}).get("fuse_v", True))(graph))
    return results


def dense_state_of(model: LlamaLR, replaced: set[str], latent_layers=()) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    skip = {f"{n}.weight" for n in replaced}
    for layer in latent_layers:
        for kind in ("k", "v"):
            skip |= {f"model.layers.{layer}.self_attn.{kind}_proj.{p}" for p in ("weight", "bias")}
    if model.spec.tie_word_embeddings:
        skip.add("lm_head.weight")
    return {k: v for k, v in sd.items() if k not in skip}


def compile_model(model: LlamaLR, plan: Plan, factors: dict[str, Factors], tokenizer=None,
                  graph: TracedGraph | None = None, latent: dict[int, LatentKVLayer] | None = None) -> CompressedModel:
    """Trace ``model`` (unless ``graph`` is its trace already) and apply ``plan``."""
    graph = graph or trace(model)
    latent = latent or {}
    results = apply_plan(graph, plan, factors, latent)
    return CompressedModel(graph=graph, plan=plan, spec=model.spec, factors=factors,
                           dense_state=dense_state_of(model, set(factors), latent), latent=latent,
                           tokenizer=tokenizer, pass_results=results)


DTYPES = ("float32", "float16", "bfloat16")


def check_dtype(dtype: str) -> str:
    """``dtype`` when it is one of :data:`DTYPES`, else a ConfigError."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    return dtype


def load_compressed(folder: str | Path, *, dtype: str | None = None) -> CompressedModel:
    """Load a folder written by :meth:`CompressedModel.save`; ``dtype`` ("float32", "float16",
    "bfloat16") converts its floating-point weights (e.g. float16 for GPU deployment)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    plan = Plan.load(folder)
    wf = folder / WEIGHTS_FILE
    if not wf.is_file():
        raise PlanError(f"{folder}: no {WEIGHTS_FILE}")
    tensors = load_file(str(wf))
    spec = spec_from_hf_config(plan.model)
    ranks = plan.weights.ranks if plan.weights else {}
    factors = {}
    for name in ranks:
        try:
            factors[name] = Factors(tensors.pop(f"{name}.lowrank_u"), tensors.pop(f"{name}.lowrank_v"))
        except KeyError as e:
            raise PlanError(f"{wf}: missing factor {e} of {name}") from e
    if dtype is not None:
        plan.dtype = check_dtype(dtype)
    dtype = getattr(torch, plan.dtype)
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    factors = {n: Factors(f.U.to(dtype), f.V.to(dtype)) for n, f in factors.items()}
    latent: dict[int, LatentKVLayer] = {}
    if plan.kv is not None:
        for layer in range(spec.num_layers):
            parts = {p: tensors.pop(f"model.layers.{layer}.self_attn.latent.{p}", None) for p in LATENT_PARTS}
            if any(parts[p] is None for p in ("A_k", "k_up", "A_v", "v_up")):
                raise PlanError(f"{wf}: missing latent KV tensors of layer {layer}")
            latent[layer] = LatentKVLayer(group_size=int(plan.kv["group_size"]), **parts)
            for kind in ("k", "v"):  # placeholders for the replaced projections
                tensors[f"model.layers.{layer}.self_attn.{kind}_proj.weight"] = torch.zeros(
                    spec.kv_dim, spec.hidden_size, dtype=dtype)
                if spec.qkv_bias:
                    tensors[f"model.layers.{layer}.self_attn.{kind}_proj.bias"] = torch.zeros(spec.kv_dim, dtype=dtype)
    for name in ranks:  # placeholders for the replaced weights; the pass removes them
        m, n = spec.projection_shape(name.rsplit(".", 1)[1])
        tensors[f"{name}.weight"] = torch.zeros(m, n, dtype=dtype)
    model = build_model(spec, tensors, max_len=plan.max_len, dtype=dtype)
    return compile_model(model, plan, factors, tokenizer=load_tokenizer(folder), latent=latent)
