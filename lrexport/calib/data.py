"""Calibration data: token windows from a text/JSONL file, or text the model generates.

Two configs:

* :class:`TextCalibration` -- a ``.txt`` file (used as is) or a ``.jsonl`` file (its
  ``text`` field, records joined by blank lines) is tokenized once and cut into
  ``num_windows`` windows of ``window`` tokens, spread evenly over the text.
* :class:`SelfCalibration` -- the model samples ``num_windows`` sequences of ``window``
  tokens from its BOS token (temperature 1). This works offline for any model; the
  sampling itself runs through the generation loop (see :func:`lrexport.api.calibration_windows`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lrexport.config import register_config
from lrexport.errors import ConfigError, DataError
from lrexport.util import file_digest


@register_config
@dataclass(frozen=True)
class TextCalibration:
    path: str
    num_windows: int = 32
    window: int = 512
    fisher_windows: int = 8  # the Fisher (backward) pass uses the first this many windows

    def __post_init__(self):
        _check_sizes(self.num_windows, self.window, self.fisher_windows)
        p = Path(self.path).expanduser()
        if not p.is_file():
            raise DataError(f"calibration file {p} does not exist")

    def fingerprint(self) -> dict:
        return {"kind": "text", "sha256": file_digest(Path(self.path).expanduser()),
                "num_windows": self.num_windows, "window": self.window, "fisher_windows": self.fisher_windows}


@register_config
@dataclass(frozen=True)
class SelfCalibration:
    num_windows: int = 32
    window: int = 512
    fisher_windows: int = 8
    seed: int = 0
    temperature: float = 1.0

    def __post_init__(self):
        _check_sizes(self.num_windows, self.window, self.fisher_windows)
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")

    def fingerprint(self) -> dict:
        return {"kind": "self", "num_windows": self.num_windows, "window": self.window,
                "fisher_windows": self.fisher_windows, "seed": self.seed, "temperature": self.temperature}


def _check_sizes(num_windows: int, window: int, fisher_windows: int) -> None:
    if num_windows < 1:
        raise ConfigError(f"calibration num_windows must be >= 1, got {num_windows}")
    if fisher_windows < 1:
        raise ConfigError(f"calibration fisher_windows must be >= 1, got {fisher_windows}")
    if window < 2:
        raise ConfigError(f"calibration window must be >= 2 tokens, got {window}")


def read_text(path: str | Path) -> str:
    """A text file as is, or the ``text`` fields of a JSONL file joined by blank lines."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    if p.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(p.read_text(encoding="utf-8").split("\n")):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{i + 1}: invalid JSON ({e})") from e
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise DataError(f"{p}:{i + 1}: each JSONL record needs a string field 'text'")
            texts.append(rec["text"])
        return "\n\n".join(texts)
    return p.read_text(encoding="utf-8")


def windows_from_ids(ids: list[int] | torch.Tensor, num_windows: int, window: int, *,
                     what: str = "text") -> torch.Tensor:
    """``[num_windows, window]`` int64 windows spread evenly over ``ids``."""
    ids = torch.as_tensor(ids, dtype=torch.int64).flatten()
    n = ids.numel()
    if n < window:
        raise DataError(f"{what} has {n} tokens, fewer than one calibration window of {window}")
    avail = n // window
    if num_windows > avail:
        raise DataError(f"{what} has room for {avail} windows of {window} tokens, {num_windows} were asked for")
    starts = [i * (n - window) // (num_windows - 1) for i in range(num_windows)] if num_windows > 1 else [0]
    return torch.stack([ids[s:s + window] for s in starts])


def text_windows(cfg: TextCalibration, tokenizer) -> torch.Tensor:
    if tokenizer is None:
        raise ConfigError("text calibration needs a tokenizer; the model folder has none")
    text = read_text(cfg.path)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return windows_from_ids(ids, cfg.num_windows, cfg.window, what=str(cfg.path))
