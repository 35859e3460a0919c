"""Load Llama-family models from Hugging Face folders or GGUF files.

A folder holds ``config.json`` and ``*.safetensors`` (sharded or not) and, usually, the
tokenizer files. A GGUF file is read through transformers' GGUF support (it needs the
``gguf`` package) and dequantized; :func:`gguf_to_folder` converts it once into a folder
so that later loads are fast.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lrexport.errors import ModelLoadError
from lrexport.models.llama import LlamaLR, build_model
from lrexport.models.spec import ModelSpec, spec_from_hf_config
from lrexport.util import atomic_dir, file_digest

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json",
)


@dataclass
class LoadedModel:
    """A model with its spec, tokenizer (or None) and where it came from."""

    model: LlamaLR
    spec: ModelSpec
    tokenizer: Any
    source: dict[str, Any]
    folder: Path | None = None


def read_spec(path: str | Path) -> ModelSpec:
    """Read only the architecture of a folder (its config.json)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise ModelLoadError(f"{path}: no config.json (expected a Hugging Face model folder or a .gguf file)")
    try:
        return spec_from_hf_config(json.loads(cfg.read_text()))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg}: invalid JSON ({e})") from e


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's safetensors files (sharded or not)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors weight files")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def load_tokenizer(folder: Path, gguf_file: str | None = None):
    """The folder's tokenizer, or None when it has none."""
    from transformers import AutoTokenizer

    if gguf_file is None and not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    except Exception as e:  # noqa: BLE001  (transformers raises many types here)
        raise ModelLoadError(f"{folder}: could not load the tokenizer ({e})") from e


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32, max_len: int | None = None) -> LoadedModel:
    """Load a Hugging Face folder or a ``.gguf`` file into a :class:`LlamaLR`."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file or folder")
    if p.is_file() and p.suffix == ".gguf":
        return _load_gguf(p, dtype=dtype, max_len=max_len)
    if not p.is_dir():
        raise ModelLoadError(f"{p}: expected a Hugging Face model folder or a .gguf file")
    spec = read_spec(p)
    sd = load_state_dict(p)
    model = build_model(spec, sd, max_len=max_len, dtype=dtype)
    tok = load_tokenizer(p)
    source = {"path": str(p.resolve()), "format": "hf", "model_type": spec.model_type}
    return LoadedModel(model=model, spec=spec, tokenizer=tok, source=source, folder=p)


def _load_gguf(p: Path, *, dtype: torch.dtype, max_len: int | None) -> LoadedModel:
    hf_model, tok = _read_gguf(p)
    spec = spec_from_hf_config(hf_model.config)
    sd = {k: v.detach() for k, v in hf_model.state_dict().items()}
    model = build_model(spec, sd, max_len=max_len, dtype=dtype)
    source = {"path": str(p.resolve()), "format": "gguf", "model_type": spec.model_type, "sha256": file_digest(p)}
    return LoadedModel(model=model, spec=spec, tokenizer=tok, source=source, folder=None)


def _read_gguf(p: Path):
    try:
        import gguf  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ModelLoadError(f"reading {p} needs the 'gguf' package ({e})") from e
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    except ValueError as e:
        raise ModelLoadError(f"{p}: transformers could not read this GGUF file ({e})") from e
    return hf_model, tok


def gguf_to_folder(gguf_path: str | Path, folder: str | Path) -> Path:
    """Dequantize a GGUF file once into a Hugging Face folder (atomic)."""
    from safetensors.torch import save_file

    gguf_path, folder = Path(gguf_path), Path(folder)
    hf_model, tok = _read_gguf(gguf_path)
    spec_from_hf_config(hf_model.config)  # fail early on unsupported architectures
    with atomic_dir(folder) as tmp:
        cfg = hf_model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["architectures"] = [type(hf_model).__name__]
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
        sd = {k: v.detach().contiguous() for k, v in hf_model.state_dict().items()}
        if cfg.get("tie_word_embeddings"):
            sd.pop("lm_head.weight", None)
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(str(tmp))
    return folder
