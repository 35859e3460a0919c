"""A compact Llama-family decoder that loads Hugging Face weights and traces cleanly.

Parameter names equal the Hugging Face ones (``model.layers.3.self_attn.q_proj.weight``)
so that plans and factor files are keyed by the names users know. The forward takes
flat cache buffers, not a ``DynamicCache``:

    forward(input_ids [B, S], past_len [B], k0, v0, k1, v1, ...) -> (logits, k0', v0', ...)

Each cache buffer is ``[B, P, Hkv*D]`` with a fixed capacity ``P``; ``past_len`` says how
many positions of each row hold valid entries. Attention is one ``lrexport::attention``
node per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import lrexport.trace.attention_op  # noqa: F401  (registers torch.ops.lrexport.attention)
from lrexport.models.spec import ModelSpec


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        x32 = x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        h = spec.hidden_size
        self.num_heads, self.num_kv_heads = spec.num_heads, spec.num_kv_heads
        self.window = spec.sliding_window
        self.scale = spec.head_dim**-0.5
        self.q_proj = nn.Linear(h, spec.q_dim, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(h, spec.kv_dim, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(h, spec.kv_dim, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(spec.q_dim, h, bias=spec.o_bias)

    def forward(self, x_BSH, past_len_B, k_cache, v_cache, cos_Pd, sin_Pd):
        out_BSQ, k_cache, v_cache = torch.ops.lrexport.attention(
            self.q_proj(x_BSH), self.k_proj(x_BSH), self.v_proj(x_BSH), k_cache, v_cache, past_len_B,
            cos_Pd, sin_Pd, self.num_heads, self.num_kv_heads, self.window, self.scale,
        )
        return self.o_proj(out_BSQ), k_cache, v_cache


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        h, i, b = spec.hidden_size, spec.intermediate_size, spec.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)

    def forward(self, h_BSH, past_len_B, k_cache, v_cache, cos_Pd, sin_Pd):
        a, k_cache, v_cache = self.self_attn(self.input_layernorm(h_BSH), past_len_B, k_cache, v_cache, cos_Pd, sin_Pd)
        h_BSH = h_BSH + a
        h_BSH = h_BSH + self.mlp(self.post_attention_layernorm(h_BSH))
        return h_BSH, k_cache, v_cache


class Decoder(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class LlamaLR(nn.Module):
    """The decoder plus LM head. ``max_len`` bounds positions (RoPE table length)."""

    def __init__(self, spec: ModelSpec, max_len: int | None = None):
        super().__init__()
        self.spec = spec
        self.max_len = int(max_len or spec.max_position_embeddings)
        self.model = Decoder(spec)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = spec.rope_tables(self.max_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, input_ids_BS: torch.Tensor, past_len_B: torch.Tensor, *caches: torch.Tensor):
        h = self.model.embed_tokens(input_ids_BS)
        new_caches = []
        for i, layer in enumerate(self.model.layers):
            h, kc, vc = layer(h, past_len_B, caches[2 * i], caches[2 * i + 1], self.rope_cos, self.rope_sin)
            new_caches += [kc, vc]
        logits = self.lm_head(self.model.norm(h))
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        return (logits, *new_caches)

    def empty_caches(self, batch: int, capacity: int, *, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> list[torch.Tensor]:
        """Zeroed cache buffers ``[batch, capacity, Hkv*D]``, two per layer."""
        dtype = dtype or self.model.embed_tokens.weight.dtype
        device = device or self.model.embed_tokens.weight.device
        kv = self.spec.kv_dim
        return [torch.zeros(batch, capacity, kv, dtype=dtype, device=device) for _ in range(2 * self.spec.num_layers)]


def build_model(spec: ModelSpec, state_dict: dict[str, torch.Tensor] | None = None, *,
                max_len: int | None = None, dtype: torch.dtype = torch.float32) -> LlamaLR:
    """Build a :class:`LlamaLR` and load ``state_dict`` (Hugging Face names) into it."""
    with torch.device("meta"):
        model = LlamaLR(spec, max_len=max_len)
    model = model.to_empty(device="cpu")
    cos, sin = spec.rope_tables(model.max_len)
    model.rope_cos, model.rope_sin = cos, sin
    if spec.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if state_dict is None:
        _init_random(model)
    else:
        sd = dict(state_dict)
        if spec.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [m for m in missing if not (spec.tie_word_embeddings and m == "lm_head.weight")]
        if missing or unexpected:
            from lrexport.errors import ModelLoadError

            raise ModelLoadError(f"weights do not match the architecture: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
    return model.to(dtype).eval()


def _init_random(model: LlamaLR, std: float = 0.02) -> None:
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.normal_(0.0, std)
            else:
                p.normal_(0.0, std)
