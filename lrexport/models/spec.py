"""The architecture description lrexport needs, read from a Hugging Face config.

Only the Llama family is supported: Llama 2/3, Mistral, Qwen2 (k/v/q biases) and
SmolLM. Anything else gets an :class:`UnsupportedModelError` naming what is supported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lrexport.errors import UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

# The seven projections of a decoder layer, in a fixed order used by plans and plots.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelSpec:
    """Shapes and options of a Llama-family decoder.

    Attributes mirror the Hugging Face config names. ``qkv_bias`` covers Qwen2's q/k/v
    biases and Llama's ``attention_bias`` (which also biases ``o_proj``: ``o_bias``).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def projection_shape(self, proj: str) -> tuple[int, int]:
        """(out_features, in_features) of one of the seven projections."""
        h, i = self.hidden_size, self.intermediate_size
        shapes = {
            "q_proj": (self.q_dim, h),
            "k_proj": (self.kv_dim, h),
            "v_proj": (self.kv_dim, h),
            "o_proj": (h, self.q_dim),
            "gate_proj": (i, h),
            "up_proj": (i, h),
            "down_proj": (h, i),
        }
        return shapes[proj]

    def linear_names(self) -> list[str]:
        """Fully qualified names of every projection, layer-major, in PROJECTIONS order."""
        names = []
        for layer in range(self.num_layers):
            for proj in PROJECTIONS:
                part = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                names.append(f"model.layers.{layer}.{part}.{proj}")
        return names

    def projection_params(self) -> int:
        """Parameters in the seven projections of all layers (biases excluded)."""
        return self.num_layers * sum(m * n for m, n in map(self.projection_shape, PROJECTIONS))

    def rope_tables(self, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables ``[max_len, head_dim // 2]`` in float32, scaling applied.

        Frequencies come from transformers' own RoPE initialisation, so every RoPE
        variant it knows (default, llama3, linear, yarn...) is reproduced exactly.
        """
        from transformers import AutoConfig
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        cfg = AutoConfig.for_model(**self.hf_config)
        cfg.head_dim = self.head_dim
        rope = LlamaRotaryEmbedding(cfg)
        pos = torch.arange(max_len, dtype=torch.float64)
        freqs = pos[:, None] * rope.inv_freq.to(torch.float64)[None, :]
        scale = float(rope.attention_scaling)
        return (freqs.cos() * scale).float(), (freqs.sin() * scale).float()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d


def spec_from_hf_config(cfg: Any) -> ModelSpec:
    """Build a :class:`ModelSpec` from a transformers config object or dict."""
    d = cfg if isinstance(cfg, dict) else cfg.to_dict()
    model_type = d.get("model_type")
    archs = d.get("architectures") or []
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} (architectures {archs}) is not supported; "
            f"lrexport supports the Llama family: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    for a in archs:
        if a not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {a!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
    heads = int(d["num_attention_heads"])
    head_dim = d.get("head_dim") or d["hidden_size"] // heads
    kv_heads = int(d.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise UnsupportedModelError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    eos = d.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    qkv_bias = model_type == "qwen2" or bool(d.get("attention_bias", False))
    o_bias = model_type != "qwen2" and bool(d.get("attention_bias", False))
    window = 0
    if model_type == "mistral" or (model_type == "qwen2" and d.get("use_sliding_window")):
        window = int(d.get("sliding_window") or 0)
    if d.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act {d.get('hidden_act')!r} is not supported (only 'silu')")
    return ModelSpec(
        model_type=model_type,
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]),
        num_layers=int(d["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(head_dim),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(d.get("mlp_bias", False)),
        sliding_window=window,
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=eos_ids,
        hf_config={k: v for k, v in d.items() if k not in ("quantization_config",)},
    )
