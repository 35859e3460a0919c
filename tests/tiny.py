"""Tiny random Llama-family models for tests (built in-process, no downloads)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, MistralConfig, Qwen2Config

from lrexport.models.llama import build_model
from lrexport.models.load import LoadedModel
from lrexport.models.spec import spec_from_hf_config

VOCAB = 97


def hf_config(kind: str = "llama", **kw):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    common.update(kw)
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "mistral":
        return MistralConfig(sliding_window=common.pop("sliding_window", 5), **common)
    if kind == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(kind)


def hf_model(kind: str = "llama", seed: int = 0, **kw):
    """A random transformers model (float64) whose weights seed our model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(hf_config(kind, **kw)).double().eval()
    with torch.no_grad():  # make biases (Qwen2) non-zero so that they are tested
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return m


def tiny_loaded(kind: str = "llama", seed: int = 0, dtype=torch.float32, max_len: int = 256, **kw) -> LoadedModel:
    hf = hf_model(kind, seed, **kw)
    spec = spec_from_hf_config(hf.config)
    model = build_model(spec, hf.state_dict(), max_len=max_len, dtype=dtype)
    return LoadedModel(model=model, spec=spec, tokenizer=None, source={"kind": "random", "seed": seed})


def zeros_len(b: int) -> torch.Tensor:
    return torch.zeros(b, dtype=torch.int64)


def tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained in-process on a little WikiText (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lrexport.eval.data import default_data_dir

    lines = (default_data_dir() / "wikitext2" / "valid.tokens.txt").read_text(encoding="utf-8").splitlines()[:300]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_folder(path, kind: str = "llama", seed: int = 0):
    """A Hugging Face folder (config, safetensors, tokenizer) of a tiny random model."""
    tok = tiny_tokenizer()
    hf = hf_model(kind, seed, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id).float()
    hf.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path
